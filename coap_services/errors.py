"""Errors of the CoAP device services and of the CLM's CoAP client.

``ServiceError`` is what a device resource raises: it carries the CoAP response code, a stable ``reason`` code
and a person-readable message, and it renders itself as a CBOR diagnostic (see ``coap_services.codec``). The
message is composed by us from facts about the request; internal exception text is never sent to a peer.
"""
from __future__ import annotations

# CoAP response codes as (class << 5) | detail, so this module needs no aiocoap import.
BAD_REQUEST = 0x80  # 4.00
UNAUTHORIZED = 0x81  # 4.01
FORBIDDEN = 0x83  # 4.03
NOT_FOUND = 0x84  # 4.04
METHOD_NOT_ALLOWED = 0x85  # 4.05
CONFLICT = 0x89  # 4.09
REQUEST_ENTITY_TOO_LARGE = 0x8D  # 4.13
UNSUPPORTED_CONTENT_FORMAT = 0x8F  # 4.15
INTERNAL_SERVER_ERROR = 0xA0  # 5.00
SERVICE_UNAVAILABLE = 0xA3  # 5.03


def code_str(code: int) -> str:
    """``0x83`` -> ``"4.03"``."""
    return f"{code >> 5}.{code & 0x1F:02d}"


class CoapServiceError(Exception):
    """Root of every coap_services error."""


class ServiceError(CoapServiceError):
    """A request the device refuses; rendered as ``code`` + CBOR diagnostic ``{"error": reason, "message": ...}``.

    Args:
        code: CoAP response code (one of the constants above).
        reason: stable machine-readable code (``malformed-cbor``, ``key-mismatch``, ``rate-limited`` ...).
        message: what was wrong and what to do, for a person.
        max_age: seconds, sent as Max-Age (with 5.03: when to retry).
    """

    def __init__(self, code: int, reason: str, message: str, *, max_age: int | None = None):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.max_age = max_age

    def __str__(self) -> str:
        return f"{code_str(self.code)} {self.reason}: {self.message}"


class PayloadError(ServiceError, ValueError):
    """A payload that does not decode or violates the schema/limits (4.00 unless said otherwise)."""

    def __init__(self, reason: str, message: str, code: int = BAD_REQUEST):
        super().__init__(code, reason, message)


class SecurityConfigError(CoapServiceError):
    """Provisioned security contexts are missing, unreadable, too open (permissions) or inconsistent."""


class DeviceError(CoapServiceError):
    """The device answered with an error code; ``code``/``reason``/``message`` come from its diagnostic."""

    def __init__(self, uri: str, code: str, reason: str, message: str, max_age: int | None = None):
        super().__init__(f"{uri}: device answered {code} {reason}: {message}")
        self.uri = uri
        self.code = code
        self.reason = reason
        self.device_message = message
        self.max_age = max_age


class DeviceUnreachableError(CoapServiceError):
    """No answer within the timeout (device down, wrong address, or wrong DTLS PSK: DTLS fails silently)."""
