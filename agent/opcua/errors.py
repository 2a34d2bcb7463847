"""Errors of the OPC UA push-management roles.

``PushError`` is a refusal the device's server returns to the caller as an OPC UA StatusCode (its ``status`` is the
StatusCode's name, e.g. ``BadCertificateUriInvalid``); its text is for the device's log and audit trail, built from
facts, never sent over the wire (a Call result carries only the code). ``PushClientError`` is the management side's
(the CLM's) error: what the device answered, or why the channel could not be opened.
"""
from __future__ import annotations


class OpcuaError(Exception):
    """Root of the OPC UA roles' errors."""


class PushError(OpcuaError):
    """A refused push-management call; ``status`` names the OPC UA StatusCode returned."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status

    def __str__(self) -> str:
        return f"{self.status}: {super().__str__()}"


class PushClientError(OpcuaError):
    """The push server (CLM/GDS side) could not complete a call; ``status`` is the device's StatusCode name, or
    None for a transport/channel failure."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


# keystore VerificationError reason -> OPC 10000-4 §7.39 certificate StatusCode
REASON_STATUS = {
    "key-mismatch": "BadCertificateInvalid",
    "untrusted": "BadCertificateUntrusted",
    "bad-signature": "BadCertificateInvalid",
    "expired": "BadCertificateTimeInvalid",
    "not-yet-valid": "BadCertificateTimeInvalid",
    "not-a-ca": "BadCertificateIssuerUseNotAllowed",
    "bad-key-usage": "BadCertificateUseNotAllowed",
    "bad-eku": "BadCertificateUseNotAllowed",
    "is-ca": "BadCertificateUseNotAllowed",
    "bad-application-uri": "BadCertificateUriInvalid",
    "unknown-critical-extension": "BadCertificateInvalid",
    "malformed": "BadCertificateInvalid",
    "subject-mismatch": "BadCertificateInvalid",
    "revoked": "BadCertificateRevoked",
    "path-length": "BadCertificateIssuerUseNotAllowed",
    "name-constraints": "BadCertificateUseNotAllowed",
    "policy": "BadCertificatePolicyCheckFailed",
    "weak-key": "BadCertificatePolicyCheckFailed",
    "bad-algorithm": "BadCertificatePolicyCheckFailed",
}


def status_for(verification_error) -> str:
    return REASON_STATUS.get(getattr(verification_error, "reason", ""), "BadSecurityChecksFailed")
