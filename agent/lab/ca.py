"""Lab CA: per-domain root + issuing CA that issues real certificates for the public key in a request.

TEST-ONLY. Layout of a lab directory (all files 0600, directories 0700)::

    lab/
      state.json                   serials issued, revocations, lifetimes
      <domain>/root.pem root.key   self-signed root (pathlen 1)
      <domain>/ca.pem   ca.key     issuing CA (pathlen 0)
      <domain>/issued/<serial>.pem every certificate issued
      <domain>/old/...             previous generation after a rollover
      <domain>/generations/G<n>/   every earlier generation (G1 = the original)

Profiles (``profile`` argument of ``issue``): ``ldevid`` (digitalSignature, clientAuth), ``tls-client``,
``tls-server`` (serverAuth + clientAuth), ``opcua`` (digitalSignature, keyEncipherment, nonRepudiation,
dataEncipherment; serverAuth + clientAuth), ``ca`` (test only, for bad-input tests).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_LIFETIME_S = 90 * 24 * 3600
CA_LIFETIME_S = 10 * 365 * 24 * 3600
BACKDATE_S = 60  # tolerate small clock skew of relying parties

PROFILES = {
    "ldevid": dict(ku=dict(digital_signature=True), eku=[ExtendedKeyUsageOID.CLIENT_AUTH]),
    "tls-client": dict(ku=dict(digital_signature=True), eku=[ExtendedKeyUsageOID.CLIENT_AUTH]),
    "tls-server": dict(
        ku=dict(digital_signature=True, key_encipherment=True),
        eku=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    ),
    "opcua": dict(
        ku=dict(digital_signature=True, content_commitment=True, key_encipherment=True, data_encipherment=True),
        eku=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    ),
}


class LabCAError(Exception):
    """A lab CA refusal (bad CSR signature, revoked, unknown domain)."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def _new_key(key_type: str):
    if key_type == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[3:]))
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown lab CA key type {key_type!r}")


def _sig_hash(key):
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _write(path: Path, data: bytes) -> None:
    from keystore import fsutil  # the project's one safe writer (temp, fsync, replace, fsync dir)

    fsutil.atomic_write(path, data)


def _ku(digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=False, crl_sign=False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature, content_commitment, key_encipherment, data_encipherment,
                         key_agreement, key_cert_sign, crl_sign, False, False)


@dataclasses.dataclass
class LabDomain:
    """One domain of the lab CA: root and issuing CA certificates and keys (and rollover links)."""

    name: str
    root_cert: x509.Certificate
    root_key: object
    ca_cert: x509.Certificate
    ca_key: object
    # After a root rollover: links an old relying party uses to reach the new root.
    old_root_cert: x509.Certificate | None = None
    new_with_old: x509.Certificate | None = None
    old_with_new: x509.Certificate | None = None

    @property
    def chain(self) -> list[x509.Certificate]:
        """Issuing CA then root: what a client is given with its certificate."""
        return [self.ca_cert, self.root_cert]


class LabCA:
    """A test-only CA hierarchy per domain, persisted in a directory. Thread-safe for the lab servers."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self._lock = threading.RLock()
        self._domains: dict[str, LabDomain] = {}
        state_file = self.dir / "state.json"
        self._state = json.loads(state_file.read_text()) if state_file.exists() else {
            "revoked": {}, "lifetime_s": DEFAULT_LIFETIME_S, "domains": []}

    # ---- creation -------------------------------------------------------------------------------
    @classmethod
    def create(cls, directory, domains=("plant",), key_type: str = "p256",
               lifetime_s: int = DEFAULT_LIFETIME_S) -> "LabCA":
        """Create (or reopen) a lab directory with a root + issuing CA for each domain."""
        d = Path(directory)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca = cls(d)
        ca._state["lifetime_s"] = int(lifetime_s)
        for name in domains:
            if not (d / name / "ca.pem").exists():
                ca._create_domain(name, key_type)
        ca._save()
        return ca

    def _create_domain(self, name: str, key_type: str) -> None:
        ddir = self.dir / name
        (ddir / "issued").mkdir(mode=0o700, parents=True, exist_ok=True)
        root_key = _new_key(key_type)
        root = self._make_ca_cert(f"devagent lab root CA ({name})", root_key, root_key.public_key(), None, None, 1)
        ca_key = _new_key(key_type)
        ca = self._make_ca_cert(f"devagent lab issuing CA ({name})", ca_key, ca_key.public_key(), root_key, root, 0)
        self._store_domain(name, root, root_key, ca, ca_key)
        if name not in self._state["domains"]:
            self._state["domains"].append(name)

    def _store_domain(self, name, root, root_key, ca, ca_key):
        ddir = self.dir / name
        pem = serialization.Encoding.PEM
        nokey = serialization.NoEncryption()
        pk8 = serialization.PrivateFormat.PKCS8
        _write(ddir / "root.pem", root.public_bytes(pem))
        _write(ddir / "root.key", root_key.private_bytes(pem, pk8, nokey))
        _write(ddir / "ca.pem", ca.public_bytes(pem))
        _write(ddir / "ca.key", ca_key.private_bytes(pem, pk8, nokey))
        self._domains.pop(name, None)

    @staticmethod
    def _make_ca_cert(cn, key, public_key, issuer_key, issuer_cert, pathlen, not_before=None, lifetime_s=None):
        now = not_before or _now()
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "devagent lab (TEST ONLY)"),
                             x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        signer = issuer_key or key
        b = (x509.CertificateBuilder()
             .subject_name(subject)
             .issuer_name(issuer_cert.subject if issuer_cert else subject)
             .public_key(public_key)
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(seconds=BACKDATE_S))
             .not_valid_after(now + datetime.timedelta(seconds=lifetime_s or CA_LIFETIME_S))
             .add_extension(x509.BasicConstraints(ca=True, path_length=pathlen), critical=True)
             .add_extension(_ku(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))
        if issuer_cert is not None:
            b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key()),
                                critical=False)
        return b.sign(signer, _sig_hash(signer))

    # ---- access ---------------------------------------------------------------------------------
    @property
    def domains(self) -> list[str]:
        return list(self._state["domains"])

    def domain(self, name: str) -> LabDomain:
        with self._lock:
            if name in self._domains:
                return self._domains[name]
            ddir = self.dir / name
            if not (ddir / "ca.pem").exists():
                raise LabCAError(f"unknown lab CA domain {name!r} (have: {', '.join(self.domains) or 'none'})")

            def cert(n):
                return x509.load_pem_x509_certificate((ddir / n).read_bytes())

            def key(n):
                return serialization.load_pem_private_key((ddir / n).read_bytes(), None)

            dom = LabDomain(name, cert("root.pem"), key("root.key"), cert("ca.pem"), key("ca.key"))
            for attr, fname in (("old_root_cert", "old_root.pem"), ("new_with_old", "new_with_old.pem"),
                                ("old_with_new", "old_with_new.pem")):
                if (ddir / fname).exists():
                    setattr(dom, attr, cert(fname))
            self._domains[name] = dom
            return dom

    @property
    def lifetime_s(self) -> int:
        return int(self._state["lifetime_s"])

    # ---- issuance -------------------------------------------------------------------------------
    def issue(self, domain: str, public_key, subject: x509.Name, sans=(), profile: str = "ldevid",
              lifetime_s: int | None = None, not_before: datetime.datetime | None = None,
              extensions=()) -> x509.Certificate:
        """Issue a certificate for ``public_key`` in ``domain``'s issuing CA and record it."""
        if profile == "ca":  # deliberately wrong certificate for negative tests
            prof = dict(ku=dict(key_cert_sign=True), eku=[])
        elif profile in PROFILES:
            prof = PROFILES[profile]
        else:
            raise LabCAError(f"unknown certificate profile {profile!r} (known: {', '.join(PROFILES)})")
        dom = self.domain(domain)
        now = not_before or _now()
        life = self.lifetime_s if lifetime_s is None else int(lifetime_s)
        b = (x509.CertificateBuilder()
             .subject_name(subject)
             .issuer_name(dom.ca_cert.subject)
             .public_key(public_key)
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(seconds=BACKDATE_S))
             .not_valid_after(now + datetime.timedelta(seconds=life))
             .add_extension(x509.BasicConstraints(ca=profile == "ca", path_length=None), critical=True)
             .add_extension(_ku(**prof["ku"]), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(dom.ca_cert.public_key()),
                            critical=False))
        if prof["eku"]:
            b = b.add_extension(x509.ExtendedKeyUsage(prof["eku"]), critical=False)
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        for ext in extensions:
            if ext.oid not in (x509.oid.ExtensionOID.BASIC_CONSTRAINTS, x509.oid.ExtensionOID.KEY_USAGE,
                               x509.oid.ExtensionOID.EXTENDED_KEY_USAGE, x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
                               x509.oid.ExtensionOID.SUBJECT_KEY_IDENTIFIER,
                               x509.oid.ExtensionOID.AUTHORITY_KEY_IDENTIFIER):
                b = b.add_extension(ext.value, critical=ext.critical)
        cert = b.sign(dom.ca_key, _sig_hash(dom.ca_key))
        with self._lock:
            _write(self.dir / domain / "issued" / f"{cert.serial_number:x}.pem",
                   cert.public_bytes(serialization.Encoding.PEM))
        return cert

    def issue_from_csr(self, domain: str, csr: x509.CertificateSigningRequest, profile: str = "ldevid",
                       lifetime_s: int | None = None) -> x509.Certificate:
        """Verify the CSR's self-signature (proof of possession), then issue for its key, subject and SAN."""
        if not csr.is_signature_valid:
            raise LabCAError("CSR signature does not verify (proof of possession failed)")
        sans = ()
        try:
            sans = tuple(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        except x509.ExtensionNotFound:
            pass
        return self.issue(domain, csr.public_key(), csr.subject, sans, profile, lifetime_s)

    # ---- revocation -----------------------------------------------------------------------------
    def revoke(self, serial: int, reason: str = "unspecified") -> None:
        with self._lock:
            self._state["revoked"][f"{serial:x}"] = {"reason": reason, "at": _now().isoformat()}
            self._save()

    def is_revoked(self, serial: int) -> bool:
        return f"{serial:x}" in self._state["revoked"]

    def issued(self, domain: str, serial: int) -> x509.Certificate | None:
        p = self.dir / domain / "issued" / f"{serial:x}.pem"
        return x509.load_pem_x509_certificate(p.read_bytes()) if p.exists() else None

    def crl(self, domain: str) -> x509.CertificateRevocationList:
        dom = self.domain(domain)
        now = _now()
        b = (x509.CertificateRevocationListBuilder().issuer_name(dom.ca_cert.subject)
             .last_update(now).next_update(now + datetime.timedelta(days=1)))
        for serial_hex in self._state["revoked"]:
            if self.issued(domain, int(serial_hex, 16)) is not None:
                b = b.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(int(serial_hex, 16)).revocation_date(now).build())
        return b.sign(dom.ca_key, _sig_hash(dom.ca_key))

    # ---- rollover (seed 000 §II.G) --------------------------------------------------------------
    def rollover(self, domain: str, key_type: str = "p256") -> LabDomain:
        """Replace root and issuing CA with new keys; publish newWithOld/oldWithNew link certificates
        (RFC 4210 §4.4). The old generation is kept under ``<domain>/old``."""
        with self._lock:
            old = self.domain(domain)
            ddir = self.dir / domain
            old_dir = ddir / "old"
            gens = self._state.setdefault("generations", {})
            gen = int(gens.get(domain, 1)) + 1
            for d in (old_dir, ddir / "generations" / f"G{gen - 1}"):  # old/ = previous; generations/ = all
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
                for n in ("root.pem", "root.key", "ca.pem", "ca.key"):
                    _write(d / n, (ddir / n).read_bytes())
            new_root_key = _new_key(key_type)
            cn = f"devagent lab root CA ({domain}) G{gen}"
            new_root = self._make_ca_cert(cn, new_root_key, new_root_key.public_key(), None, None, 1)
            new_ca_key = _new_key(key_type)
            new_ca = self._make_ca_cert(f"devagent lab issuing CA ({domain}) G{gen}", new_ca_key,
                                        new_ca_key.public_key(), new_root_key, new_root, 0)
            # newWithOld: new root's key certified by the old root; oldWithNew: old key by the new root.
            new_with_old = self._cross(new_root, old.root_key, old.root_cert)
            old_with_new = self._cross(old.root_cert, new_root_key, new_root)
            self._store_domain(domain, new_root, new_root_key, new_ca, new_ca_key)
            pem = serialization.Encoding.PEM
            _write(ddir / "old_root.pem", old.root_cert.public_bytes(pem))
            _write(ddir / "new_with_old.pem", new_with_old.public_bytes(pem))
            _write(ddir / "old_with_new.pem", old_with_new.public_bytes(pem))
            gens[domain] = gen
            self._save()
            return self.domain(domain)

    @staticmethod
    def _cross(subject_cert, issuer_key, issuer_cert) -> x509.Certificate:
        now = _now()
        return (x509.CertificateBuilder()
                .subject_name(subject_cert.subject)
                .issuer_name(issuer_cert.subject)
                .public_key(subject_cert.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(seconds=BACKDATE_S))
                .not_valid_after(min(subject_cert.not_valid_after_utc, issuer_cert.not_valid_after_utc))
                .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
                .add_extension(_ku(digital_signature=True, key_cert_sign=True, crl_sign=True), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_cert.public_key()), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key()),
                               critical=False)
                .sign(issuer_key, _sig_hash(issuer_key)))

    def _save(self) -> None:
        _write(self.dir / "state.json", json.dumps(self._state, indent=1).encode())
