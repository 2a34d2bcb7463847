"""The agent's errors. Each carries the CoAP response code it renders as, so every transport (serial
frames, CoAP) reports the same failure the same way; ``str(err)`` is a fixed text of ours, safe to send
to a peer (it never embeds peer-supplied or internal text beyond field names)."""


class AgentError(Exception):
    """Root of the board agent's errors."""

    code = "5.00"


class BadInput(AgentError):
    """Malformed request or certificate (truncated DER, garbage, wrong content type)."""

    code = "4.00"


class Unauthorized(AgentError):
    """Missing or wrong request authentication, or a replayed request."""

    code = "4.01"


class Untrusted(AgentError):
    """The certificate does not chain to our trust anchor, is expired, or is not acceptable."""

    code = "4.03"


class WrongKey(AgentError):
    """The certificate is for another key, or there is no pending key to match it."""

    code = "4.09"


class Unsupported(AgentError):
    """A content format or algorithm we do not implement."""

    code = "4.15"


class StorageError(AgentError):
    """Flash storage failed; the previous version is still in place."""

    code = "5.00"
