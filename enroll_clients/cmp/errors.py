"""CMP errors: PKIStatus and PKIFailureInfo in words. Pure, no pyasn1 import (cheap).

Every error here is an ``enroll_clients.base.EnrollError``; ``str(err)`` names the message type, the
server's status, each failInfo bit in words, the server's statusString, and what to do.
"""
from __future__ import annotations

from enroll_clients.base import ProtocolError, ServerError

# RFC 4210/9810 section 5.2.3 PKIStatus
STATUS_NAMES = {
    0: "accepted",
    1: "grantedWithMods",
    2: "rejection",
    3: "waiting",
    4: "revocationWarning",
    5: "revocationNotification",
    6: "keyUpdateWarning",
}

# RFC 4210/9810 PKIFailureInfo bit -> (name, meaning in words)
FAIL_INFO = {
    0: ("badAlg", "unrecognized or unsupported algorithm"),
    1: ("badMessageCheck", "integrity check failed (wrong shared secret or signature)"),
    2: ("badRequest", "transaction not permitted or supported"),
    3: ("badTime", "messageTime too far from the server's time (check the device clock)"),
    4: ("badCertId", "no certificate matches the given certificate ID"),
    5: ("badDataFormat", "data submitted has the wrong format"),
    6: ("wrongAuthority", "the authority indicated in the request differs from the one of the server"),
    7: ("incorrectData", "the requester's data is incorrect"),
    8: ("missingTimeStamp", "a timestamp is required but missing"),
    9: ("badPOP", "proof-of-possession failed"),
    10: ("certRevoked", "the certificate has already been revoked"),
    11: ("certConfirmed", "the certificate has already been confirmed"),
    12: ("wrongIntegrity", "wrong kind of protection (MAC vs signature)"),
    13: ("badRecipientNonce", "recipNonce missing or wrong"),
    14: ("timeNotAvailable", "time source not available"),
    15: ("unacceptedPolicy", "requested policy not supported"),
    16: ("unacceptedExtension", "requested extension not supported"),
    17: ("addInfoNotAvailable", "additional information not available"),
    18: ("badSenderNonce", "senderNonce missing or wrong"),
    19: ("badCertTemplate", "certificate template invalid or missing data"),
    20: ("signerNotTrusted", "the signer of the message is unknown or not trusted"),
    21: ("transactionIdInUse", "the transactionID is already in use"),
    22: ("unsupportedVersion", "the protocol version (pvno) is not supported"),
    23: ("notAuthorized", "the sender is not authorized to make this request"),
    24: ("systemUnavail", "the request cannot be handled because the system is unavailable"),
    25: ("systemFailure", "the request cannot be handled because of a system failure"),
    26: ("duplicateCertReq", "a certificate for this request already exists"),
}

# What a person should do for the common failInfo bits.
_HINTS = {
    "badMessageCheck": "check the shared secret/reference or the signing certificate",
    "badTime": "set the device clock (e.g. from NTP or the server's messageTime) and retry",
    "signerNotTrusted": "the server does not trust our IDevID/LDevID chain; check extraCerts and the server's trust store",
    "badPOP": "the request's proof-of-possession did not verify; the key may not match",
    "notAuthorized": "this credential may not request this certificate",
    "systemUnavail": "retry later",
    "systemFailure": "retry later or contact the CA operator",
    "unsupportedVersion": "the server does not speak this CMP version",
    "badCertTemplate": "the subject, key type or extensions are not acceptable; ask for the certReqTemplate",
}


def fail_info_names(bits) -> tuple[str, ...]:
    """Names of the set bits of a PKIFailureInfo given as an iterable of 0/1 (pyasn1 BitString)."""
    return tuple(FAIL_INFO.get(i, (f"bit{i}", ""))[0] for i, b in enumerate(bits) if b)


def describe_status(status: int, fail_info: tuple[str, ...] = (), text: str = "") -> str:
    words = [f"status {STATUS_NAMES.get(status, f'unknown({status})')}"]
    by_name = {n: m for n, m in FAIL_INFO.values()}
    if fail_info:
        words.append("failInfo " + ", ".join(f"{n} ({by_name.get(n, 'unknown')})" for n in fail_info))
    if text:
        words.append(f"server text: {text!r}")
    return "; ".join(words)


class CmpServerError(ServerError):
    """The CMP server refused (error message or negative status).

    ``protected`` is False when the refusal came unprotected or with protection we could not verify: it is
    reported, but never used to change state (an attacker could have sent it).
    """

    def __init__(self, what: str, *, status: int, fail_info: tuple[str, ...] = (), text: str = "",
                 protected: bool = True, error_code: int | None = None, details: str = "",
                 protection_problem: str = ""):
        msg = f"{what}: {describe_status(status, fail_info, text)}"
        if error_code is not None:
            msg += f"; errorCode {error_code}"
        if details:  # the server's words only; our own findings follow separately
            msg += f"; server errorDetails {details!r}"
        if not protected:
            why = f" ({protection_problem})" if protection_problem else ""
            msg += f" [UNAUTHENTICATED: response protection missing or invalid{why}; not trusted]"
        hints = [_HINTS[n] for n in fail_info if n in _HINTS]
        if hints:
            msg += " -- " + "; ".join(hints)
        super().__init__(msg, status=STATUS_NAMES.get(status, status), fail_info=fail_info, text=text)
        self.protected = protected
        self.error_code = error_code
        self.details = details
        self.protection_problem = protection_problem


class KeyMismatchError(ProtocolError):
    """The certificate returned is for another public key than the one we asked for."""
