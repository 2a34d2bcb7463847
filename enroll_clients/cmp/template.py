"""The server's certReqTemplate (RFC 9483 4.3.3, RFC 9480 2.14) and how it is applied to a request.

Rules applied (RFC 9483 4.3.3): a template field with a value is fixed by the server and used as is; a field
present with an empty value must be filled in by us (from the CertRequest); a subject attribute the
template leaves out is dropped (it would be refused); extensions it does not mention are kept.
The key type must match ``keySpec`` (id-regCtrl-algId / id-regCtrl-rsaKeyLen) or the template's publicKey
algorithm; keys are generated on the device before the exchange, so a mismatch is an error the caller
must act on (generate a key of the requested type).
"""
from __future__ import annotations

import dataclasses

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ObjectIdentifier
from pyasn1.codec.der import decoder as _generic

from enroll_clients.base import EnrollError, ProtocolError
from enroll_clients.cmp import asn1 as A
from keystore.certs import spki_der


class TemplateMismatchError(EnrollError):
    """Our key or request cannot satisfy the server's certReqTemplate."""


@dataclasses.dataclass(frozen=True)
class Template:
    """A certificate request template (CRMF CertTemplate from a genp or a profile): what the CA asks for."""

    subject: tuple[tuple[str, str | None], ...] | None  # (oid, value or None = to be filled by us)
    extensions: tuple[tuple[str, bool, bytes | None], ...]  # (oid, critical, DER value or None = fill)
    key_alg: tuple[str, bytes | None] | None  # (algorithm oid, DER parameters)
    rsa_key_len: int | None


def _attr_value(any_value) -> str:
    raw = bytes(any_value)
    try:
        v, _ = _generic.decode(raw)
        return str(v)
    except Exception:
        raise ProtocolError("certReqTemplate: a subject attribute value is not a string") from None


def decode_template(der: bytes | None) -> Template | None:
    """Template from the genp id-it-certReqTemplate value; None when the server sends no template."""
    if der is None:
        return None
    try:
        c = A.der_decode(der, A.CertReqTemplateContent())
    except ValueError as e:
        raise ProtocolError(f"genp certReqTemplate value is malformed: {e}") from None
    t = c["certTemplate"]
    subject = None
    if t["subject"].isValue:
        subject = tuple((str(atv["type"]), _attr_value(atv["value"]) or None)
                        for rdn in t["subject"].getComponent() for atv in rdn)
    exts = ()
    if t["extensions"].isValue:
        exts = tuple((str(e["extnID"]), bool(e["critical"]), bytes(e["extnValue"]) or None) for e in t["extensions"])
    key_alg = None
    if t["publicKey"].isValue:
        alg = t["publicKey"]["algorithm"]
        key_alg = (str(alg["algorithm"]), bytes(alg["parameters"]) if alg["parameters"].isValue else None)
    rsa_len = None
    if c["keySpec"].isValue:
        for i, atv in enumerate(c["keySpec"]):
            try:
                if str(atv["type"]) == str(A.id_regCtrl_algId):
                    alg = A.der_decode(bytes(atv["value"]), A.AlgorithmIdentifier())
                    key_alg = (str(alg["algorithm"]), bytes(alg["parameters"]) if alg["parameters"].isValue else None)
                elif str(atv["type"]) == str(A.id_regCtrl_rsaKeyLen):
                    rsa_len = int(A.der_decode(bytes(atv["value"]), A.Integer()))
            except ValueError as e:
                raise ProtocolError(f"genp certReqTemplate keySpec[{i}] ({atv['type']}) is malformed: {e}") from None
        if rsa_len is not None and rsa_len < 1:
            raise ProtocolError(f"genp certReqTemplate keySpec rsaKeyLen {rsa_len} is not a key length (1..MAX)")
    return Template(subject=subject, extensions=exts, key_alg=key_alg, rsa_key_len=rsa_len)


def _check_key(t: Template, key) -> None:
    spki = A.der_decode(spki_der(key), A.SubjectPublicKeyInfo())
    ours = (str(spki["algorithm"]["algorithm"]),
            bytes(spki["algorithm"]["parameters"]) if spki["algorithm"]["parameters"].isValue else None)
    if t.key_alg is not None:
        oid, params = t.key_alg
        # RSA's NULL parameters and absent parameters are the same request.
        null = A.der_encode(A.Null(""))
        if oid != ours[0] or (params not in (None, null) and params != ours[1]):
            raise TemplateMismatchError(f"the server's certReqTemplate asks for key algorithm {oid}"
                                        f"{' with parameters ' + params.hex() if params else ''}; our key is "
                                        f"{ours[0]} -- generate a key of that type and retry")
    if t.rsa_key_len is not None:
        if not isinstance(key, rsa.RSAPrivateKey) or key.key_size != t.rsa_key_len:
            raise TemplateMismatchError(f"the server's certReqTemplate asks for an RSA-{t.rsa_key_len} key; "
                                        f"ours is {type(key).__name__} {getattr(key, 'key_size', '')}")


def apply_template(t: Template, subject: x509.Name, sans, extensions, key):
    """(subject, extensions) for the request after applying ``t``.

    Raises:
        TemplateMismatchError: our key or request cannot satisfy the template.
        ProtocolError: the template fixes a value that cannot be put into a request (names the attribute).
    """
    _check_key(t, key)
    if t.subject is not None:
        ours = {a.oid.dotted_string: a.value for a in subject}
        attrs = []
        for oid, value in t.subject:
            if value is None:
                if oid not in ours:
                    raise TemplateMismatchError(f"the server's certReqTemplate needs subject attribute {oid}, "
                                                "which our request does not have")
                value = ours[oid]
            try:
                attrs.append(x509.NameAttribute(ObjectIdentifier(oid), value))
            except ValueError as e:  # e.g. a CN over 64 characters, a country name that is not 2 letters
                raise ProtocolError(f"the server's certReqTemplate fixes subject attribute {oid} to a value that "
                                    f"cannot be requested: {e}") from None
        subject = x509.Name(attrs)
    ours_ext = {e.oid.dotted_string: e for e in extensions}
    if sans and x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME.dotted_string not in ours_ext:
        ours_ext[x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME.dotted_string] = x509.Extension(
            x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME, False, x509.SubjectAlternativeName(list(sans)))
    out = []
    for oid, critical, value in t.extensions:
        if value is None:
            if oid in ours_ext:
                out.append(ours_ext[oid])
            continue
        try:
            o = ObjectIdentifier(oid)
        except ValueError as e:
            raise ProtocolError(f"the server's certReqTemplate names extension {oid}: {e}") from None
        out.append(x509.Extension(o, critical, x509.UnrecognizedExtension(o, value)))
    listed = {oid for oid, _, _ in t.extensions}
    # Extensions the template does not mention stay: the template constrains, it does not forbid.
    out.extend(e for k, e in ours_ext.items() if k not in listed)
    return subject, tuple(out)


_OID_NAMES = {"2.5.4.3": "CN", "2.5.4.10": "O", "2.5.4.11": "OU", "2.5.4.6": "C", "2.5.4.7": "L", "2.5.4.8": "ST",
              "2.5.4.5": "serialNumber", "1.2.840.113549.1.9.1": "emailAddress",
              "2.5.29.17": "subjectAltName", "2.5.29.15": "keyUsage", "2.5.29.37": "extendedKeyUsage",
              "2.5.29.19": "basicConstraints", "1.2.840.10045.2.1": "EC", "1.2.840.113549.1.1.1": "RSA",
              "1.3.101.112": "Ed25519", "1.3.101.113": "Ed448", "1.2.840.10045.3.1.7": "P-256",
              "1.3.132.0.34": "P-384", "1.3.132.0.35": "P-521"}


def describe_template(t: Template | None) -> dict:
    """A person's (and JSON) view of a template: what the server fixes, what we must fill in, the key type."""
    if t is None:
        return {"template": None}
    name = lambda oid: _OID_NAMES.get(oid, oid)  # noqa: E731
    subject = None
    if t.subject is not None:
        subject = ", ".join(f"{name(o)}={v if v is not None else '<ours>'}" for o, v in t.subject)
    key = None
    if t.key_alg is not None:
        oid, params = t.key_alg
        key = name(oid)
        if params:
            try:
                curve = str(A.der_decode(params, A.univ.ObjectIdentifier()))
                key += f" {name(curve)}"
            except ValueError:
                pass
    if t.rsa_key_len:
        key = f"RSA-{t.rsa_key_len}"
    exts = [f"{name(o)}{' (critical)' if c else ''}: {'fixed by the server' if v is not None else '<ours>'}"
            for o, c, v in t.extensions]
    return {"template": True, "subject": subject or "(ours)", "key": key or "(any)",
            "extensions": "; ".join(exts) or "(ours)"}
