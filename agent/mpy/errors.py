"""The agent's errors. Each carries the CoAP response code it renders as and a stable machine-readable
``reason`` (the same reason codes ``devagent serve`` uses, docs/coap.md "Error reasons"), so every
transport (serial frames, CoAP) reports the same failure the same way. ``str(err)`` is a fixed text of
ours, safe to send to a peer (it never embeds internal text; peer-supplied values only where they are
the thing being refused, cut short)."""


class AgentError(Exception):
    """Root of the board agent's errors. ``AgentError(message, reason=None)``."""

    code = "5.00"
    reason = "internal"

    def __init__(self, message="", reason=None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class BadInput(AgentError):
    """Malformed request or certificate (truncated DER, garbage, wrong schema)."""

    code = "4.00"
    reason = "schema"


class Unauthorized(AgentError):
    """Missing or wrong request authentication, or a replayed request."""

    code = "4.01"
    reason = "unauthenticated"


class Untrusted(AgentError):
    """The certificate does not chain to our trust anchor, is expired, or is not acceptable."""

    code = "4.03"
    reason = "untrusted"


class WrongKey(Untrusted):
    """The certificate is for another key than the pending one (4.03 ``key-mismatch``, as ``devagent serve``)."""

    reason = "key-mismatch"


class Conflict(AgentError):
    """State conflict: no pending key to match a certificate, or no trust anchor for the domain."""

    code = "4.09"
    reason = "no-pending-key"


class Unsupported(AgentError):
    """A content format or algorithm we do not implement."""

    code = "4.15"
    reason = "unsupported-content-format"


class StorageError(AgentError):
    """Flash storage failed; the previous version is still in place."""

    code = "5.00"
    reason = "store-failed"


class TooLarge(AgentError):
    """A request larger than the board accepts (one datagram, no block-wise transfer)."""

    code = "4.13"
    reason = "too-large"


class BadOption(AgentError):
    """A critical CoAP option the board does not implement (e.g. Block1)."""

    code = "4.02"
    reason = "bad-option"
