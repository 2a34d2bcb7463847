"""An OPC UA TrustList (OPC 10000-12 §7.8.2): the value, its UA Binary file form, and its store on disk.

Pure part: ``TrustList`` (four lists of DER blobs: trusted certificates and CRLs, issuer certificates and CRLs),
``encode``/``decode`` of the TrustListDataType stream a client reads and writes through the TrustList's FileType
methods, ``merge`` (a write updates only the lists named by its SpecifiedLists mask), ``check`` (every entry
parses, issuers are CAs, CRLs are signed by a CA of the list, nothing expired) and ``thumbprint`` (SHA-1 of the DER,
the OPC UA thumbprint, as RemoveCertificate takes it).

``TrustListStore`` keeps the versions on disk: ``<dir>/trustlist/NNNN.bin`` (immutable, UA Binary) and
``<dir>/trustlist.json`` naming the live version and its LastUpdateTime, replaced in one atomic write. A crash at
any instant leaves the previous live version.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from pathlib import Path

from cryptography import x509

from agent.opcua.errors import PushError
from keystore import fsutil

TRUSTED_CERTIFICATES = 1
TRUSTED_CRLS = 2
ISSUER_CERTIFICATES = 4
ISSUER_CRLS = 8
ALL = 15
FIELDS = (("trusted_certificates", TRUSTED_CERTIFICATES), ("trusted_crls", TRUSTED_CRLS),
          ("issuer_certificates", ISSUER_CERTIFICATES), ("issuer_crls", ISSUER_CRLS))


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def thumbprint(der: bytes) -> str:
    """OPC UA certificate thumbprint: SHA-1 of the DER certificate, upper-case hex (OPC 10000-6 §6.1)."""
    return hashlib.sha1(der).hexdigest().upper()


@dataclasses.dataclass(frozen=True)
class TrustList:
    """An OPC UA TrustList (Part 12): trusted and issuer certificates and CRLs, as DER."""

    trusted_certificates: tuple[bytes, ...] = ()
    trusted_crls: tuple[bytes, ...] = ()
    issuer_certificates: tuple[bytes, ...] = ()
    issuer_crls: tuple[bytes, ...] = ()

    def certificates(self, field: str) -> list[x509.Certificate]:
        return [x509.load_der_x509_certificate(d) for d in getattr(self, field)]

    def anchors(self) -> list[x509.Certificate]:
        """What a peer's certificate must chain to: every trusted certificate (CA or a pinned peer)."""
        return self.certificates("trusted_certificates")

    def issuers(self) -> list[x509.Certificate]:
        return self.certificates("issuer_certificates")

    def size(self) -> int:
        return len(encode(self))


def encode(tl: TrustList, mask: int = ALL) -> bytes:
    """The TrustListDataType stream (UA Binary) with the lists selected by ``mask``."""
    from asyncua import ua
    from asyncua.ua.ua_binary import struct_to_binary

    v = ua.TrustListDataType(SpecifiedLists=mask)
    v.TrustedCertificates = list(tl.trusted_certificates) if mask & TRUSTED_CERTIFICATES else []
    v.TrustedCrls = list(tl.trusted_crls) if mask & TRUSTED_CRLS else []
    v.IssuerCertificates = list(tl.issuer_certificates) if mask & ISSUER_CERTIFICATES else []
    v.IssuerCrls = list(tl.issuer_crls) if mask & ISSUER_CRLS else []
    return struct_to_binary(v)


def decode(data: bytes) -> tuple[int, TrustList]:
    """Parse a TrustListDataType stream. Returns (SpecifiedLists, lists).

    Raises:
        PushError(BadDecodingError): truncated, trailing bytes, null entries or an unknown mask bit.
    """
    from asyncua import ua
    from asyncua.common.utils import Buffer
    from asyncua.ua.ua_binary import struct_from_binary

    buf = Buffer(data)
    try:
        v = struct_from_binary(ua.TrustListDataType, buf)
    except Exception as e:  # asyncua raises NotEnoughData, struct.error, UnicodeDecodeError ... on garbage
        raise PushError("BadDecodingError", f"the TrustList written is not a UA Binary TrustListDataType ({len(data)} "
                        f"bytes): {type(e).__name__}") from None
    if len(buf):
        raise PushError("BadDecodingError", f"the TrustList written has {len(buf)} bytes after the TrustListDataType")
    mask = int(v.SpecifiedLists)
    if mask & ~ALL:
        raise PushError("BadDecodingError", f"SpecifiedLists {mask:#x} has bits outside TrustListMasks (0..15)")
    lists = {}
    for (field, bit), ua_name in zip(FIELDS, ("TrustedCertificates", "TrustedCrls", "IssuerCertificates",
                                             "IssuerCrls"), strict=True):
        items = getattr(v, ua_name) or []
        if any(not isinstance(x, bytes) or not x for x in items):
            raise PushError("BadDecodingError", f"{ua_name} holds a null or empty entry")
        if items and not mask & bit:
            raise PushError("BadDecodingError", f"{ua_name} has entries but SpecifiedLists {mask} does not include "
                            "it")
        lists[field] = tuple(items)
    return mask, TrustList(**lists)


def merge(current: TrustList, mask: int, update: TrustList) -> TrustList:
    """The list after writing ``update``: a field whose bit is in ``mask`` is replaced, the others are kept."""
    return TrustList(**{f: getattr(update, f) if mask & bit else getattr(current, f) for f, bit in FIELDS})


def _is_ca(cert: x509.Certificate) -> bool:
    from keystore.validator import is_ca  # the one copy (basicConstraints cA; malformed counts as not a CA)

    return is_ca(cert)


def check(tl: TrustList, now: datetime.datetime | None = None, check_validity: bool = True) -> None:
    """Every entry must be what its list says (OPC 10000-12 §7.8.2.5: the whole new list is validated).

    Trusted certificates: CA certificates or pinned application certificates; issuer certificates: CA
    certificates; CRLs: signed by a CA certificate of the list. Nothing expired (``check_validity``).

    Raises:
        PushError: BadCertificateInvalid (does not parse, wrong kind, duplicate), BadCertificateTimeInvalid (expired
        or not yet valid), naming the list and index.
    """
    from keystore.certs import load_der_certificate
    from keystore.errors import CorruptFileError

    now = now or _now()
    cas = []
    seen = set()
    for field, ua_name in (("trusted_certificates", "TrustedCertificates"), ("issuer_certificates",
                                                                            "IssuerCertificates")):
        for i, der in enumerate(getattr(tl, field)):
            try:
                c = load_der_certificate(der, f"TrustList {ua_name}[{i}]")  # the one parse boundary
                is_ca = _is_ca(c)
            except CorruptFileError as e:
                raise PushError("BadCertificateInvalid", str(e)) from None
            if field == "issuer_certificates" and not is_ca:
                raise PushError("BadCertificateInvalid", f"{ua_name}[{i}] ({c.subject.rfc4514_string()}) is not a "
                                "CA certificate; issuer certificates must be CAs")
            if der in seen:
                raise PushError("BadCertificateInvalid", f"{ua_name}[{i}] ({c.subject.rfc4514_string()}) is listed "
                                "twice")
            seen.add(der)
            if check_validity and not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
                raise PushError("BadCertificateTimeInvalid", f"{ua_name}[{i}] ({c.subject.rfc4514_string()}) is "
                                f"valid {c.not_valid_before_utc.isoformat()} to {c.not_valid_after_utc.isoformat()}, "
                                f"not now ({now.isoformat()})")
            if is_ca:
                cas.append(c)
    for field, ua_name in (("trusted_crls", "TrustedCrls"), ("issuer_crls", "IssuerCrls")):
        for i, der in enumerate(getattr(tl, field)):
            crl = load_crl(der, f"{ua_name}[{i}]")
            if not any(ca.subject == crl.issuer and _crl_signed_by(crl, ca) for ca in cas):
                raise PushError("BadCertificateInvalid", f"{ua_name}[{i}] (issuer {crl.issuer.rfc4514_string()}) is "
                                "not signed by any CA certificate in the TrustList")


def load_crl(der: bytes, where: str) -> x509.CertificateRevocationList:
    """A DER CRL with every lazily parsed part touched (issuer, times, signature algorithm, extensions, each
    revoked entry), so a malformed one is refused here, naming ``where``, and not later by whatever reads it.

    Raises:
        PushError(BadCertificateInvalid): not a DER CRL, or a part of it does not parse.
    """
    from keystore.certs import PARSE_ERRORS

    try:
        crl = x509.load_der_x509_crl(der)
        _ = (crl.issuer, crl.last_update_utc, crl.next_update_utc, crl.signature_algorithm_oid, crl.extensions)
        for r in crl:
            _ = (r.serial_number, r.revocation_date_utc, r.extensions)
    except PARSE_ERRORS as e:  # cryptography parses CRL parts on first access (InvalidVersion, DuplicateExtension...)
        raise PushError("BadCertificateInvalid", f"{where} is not a DER CRL: {e}") from None
    return crl


def _crl_signed_by(crl, ca) -> bool:
    try:
        return crl.is_signature_valid(ca.public_key())
    except (TypeError, ValueError):
        return False


class TrustListStore:
    """Versions of the TrustList under ``directory`` (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self._pointer = self.dir / "trustlist.json"

    def state(self) -> dict:
        try:
            return json.loads(self._pointer.read_bytes())
        except FileNotFoundError:
            return {"version": 0, "last_update": None}

    def version(self) -> int:
        return int(self.state()["version"])

    def last_update(self) -> datetime.datetime | None:
        v = self.state().get("last_update")
        return datetime.datetime.fromisoformat(v) if v else None

    def _file(self, version: int) -> Path:
        return self.dir / "trustlist" / f"{version:04d}.bin"

    def load(self, version: int | None = None) -> TrustList:
        v = self.version() if version is None else version
        if v == 0:
            return TrustList()
        return decode(self._file(v).read_bytes())[1]

    def write_version(self, tl: TrustList) -> int:
        """Write ``tl`` as a new immutable version (not live yet). Returns its number."""
        fsutil.ensure_dir(self.dir)
        d = fsutil.ensure_dir(self.dir / "trustlist")
        existing = [int(p.stem) for p in d.glob("*.bin") if p.stem.isdigit()]
        n = max([self.version(), *existing], default=0) + 1
        fsutil.atomic_write(self._file(n), encode(tl), mode=0o644)
        return n

    def make_live(self, version: int, when: datetime.datetime | None = None) -> None:
        """Point at ``version`` (one atomic replace); keep it and the previous one, drop older versions."""
        previous = self.version()
        if previous == version:
            return
        fsutil.atomic_write(self._pointer, json.dumps({"version": version, "previous": previous, "last_update": (
            when or _now()).isoformat()}).encode(), mode=0o644)
        for p in (self.dir / "trustlist").glob("*.bin"):
            if p.stem.isdigit() and int(p.stem) not in (version, previous):
                fsutil.secure_delete(p)
