"""Certificate chains for validator tests, built with ``cryptography`` (TEST-ONLY).

``Chain`` makes root -> [intermediates] -> leaf with every knob the validator matrix needs: validity per level,
basicConstraints, pathLen, keyUsage, EKU, SAN, name constraints, extra (critical) extensions, the key type. Every
certificate carries SKI (and AKI below the root), so OpenSSL's ``-x509_strict`` can judge the same chain.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

NOW = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
DAY = datetime.timedelta(days=1)


@functools.lru_cache(maxsize=None)
def key(kind: str, n: int = 0):
    """A cached private key: ``kind`` p256 / p384 / rsa2048 / rsa1024 / ed25519, ``n`` tells keys apart."""
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind.startswith("rsa"):
        return rsa.generate_private_key(65537, int(kind[3:]))
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(kind)


def name(cn: str, o: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o)] if o else []
    return x509.Name(attrs + [x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def ku(**bits) -> x509.KeyUsage:
    d = dict(digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
             key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False)
    d.update(bits)
    return x509.KeyUsage(**d)


@dataclasses.dataclass
class Spec:
    """One certificate of a chain. ``None`` fields get the defaults of its role."""

    subject: x509.Name | None = None
    ca: bool | None = None          # basicConstraints cA; None = role default; "absent" via bc=False
    bc: bool = True                 # include basicConstraints at all
    bc_critical: bool = True
    path_length: int | None = None
    key_usage: x509.KeyUsage | None | bool = None   # False = no keyUsage extension
    eku: list | None = None
    san: list | None = None
    extra: list = dataclasses.field(default_factory=list)  # [(ExtensionType, critical)]
    not_before: datetime.datetime | None = None
    not_after: datetime.datetime | None = None
    key: object = None
    sign_with: object = None        # sign with another key than the issuer's (bad signature)


def build(spec: Spec, issuer_name: x509.Name | None, issuer_key, role: str, kind: str, idx: int):
    k = spec.key or key(kind, idx)
    subject = spec.subject or name({"root": "Test Root", "inter": f"Test CA {idx}", "leaf": "device 1"}[role])
    is_ca = spec.ca if spec.ca is not None else role != "leaf"
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name or subject)
         .public_key(k.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(spec.not_before or NOW - DAY).not_valid_after(spec.not_after or NOW + 30 * DAY))
    if spec.bc:
        b = b.add_extension(x509.BasicConstraints(is_ca, spec.path_length if is_ca else None),
                            critical=spec.bc_critical)
    if spec.key_usage is not False:
        u = spec.key_usage or (ku(key_cert_sign=True, crl_sign=True) if is_ca else ku(digital_signature=True))
        b = b.add_extension(u, critical=True)
    b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(k.public_key()), critical=False)
    signer = issuer_key or k
    if issuer_key is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                            critical=False)
    if spec.eku:
        b = b.add_extension(x509.ExtendedKeyUsage(spec.eku), critical=False)
    if spec.san:
        b = b.add_extension(x509.SubjectAlternativeName(spec.san), critical=False)
    for e, crit in spec.extra:
        b = b.add_extension(e, critical=crit)
    signer = spec.sign_with or signer
    h = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(signer, h), k


@dataclasses.dataclass
class Chain:
    root: x509.Certificate
    inters: list
    leaf: x509.Certificate
    leaf_key: object

    @property
    def untrusted(self) -> list:
        return list(self.inters)

    def write(self, d: Path) -> dict:
        d.mkdir(parents=True, exist_ok=True)
        files = {"root": d / "root.pem", "untrusted": d / "untrusted.pem", "leaf": d / "leaf.pem"}
        pem = lambda cs: b"".join(c.public_bytes(serialization.Encoding.PEM) for c in cs)  # noqa: E731
        files["root"].write_bytes(pem([self.root]))
        files["untrusted"].write_bytes(pem(self.inters))
        files["leaf"].write_bytes(pem([self.leaf]))
        return files


def chain(kind: str = "p256", depth: int = 3, *, root: Spec | None = None, inters: list | None = None,
          leaf: Spec | None = None) -> Chain:
    """root -> (depth - 2) intermediates -> leaf. ``inters`` gives a Spec per intermediate."""
    root = root or Spec(path_length=None)
    inters = inters if inters is not None else [Spec() for _ in range(depth - 2)]
    leaf = leaf or Spec()
    r, rk = build(root, None, None, "root", kind, 0)
    issuer, ik, out = r, rk, []
    for i, s in enumerate(inters, start=1):
        c, k = build(s, issuer.subject, ik, "inter", kind, i)
        out.append(c)
        issuer, ik = c, k
    lc, lk = build(leaf, issuer.subject, ik, "leaf", kind, 9)
    return Chain(r, out, lc, lk)


def openssl_verify(ch: Chain, d: Path, purpose: str = "sslclient", at: datetime.datetime = NOW,
                   extra: tuple = (), strict: bool = True) -> tuple[bool, str]:
    """``openssl verify -x509_strict -purpose PURPOSE -policy_check -policy anyPolicy`` on ``ch`` (the user-initial
    policy set the validator uses): (accepted, output)."""
    f = ch.write(d)
    cmd = ["openssl", "verify", *(["-x509_strict"] if strict else []), "-policy_check", "-policy", "2.5.29.32.0",
           "-purpose", purpose, "-attime", str(int(at.timestamp())), "-CAfile", str(f["root"]), *extra]
    if ch.inters:
        cmd += ["-untrusted", str(f["untrusted"])]
    cmd.append(str(f["leaf"]))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    return p.returncode == 0, (p.stdout + p.stderr).strip()
