"""TEST ORACLE ONLY: the CMP ASN.1 types as they were defined up to session 16, on pyasn1-modules' rfc2459,
rfc2511 and rfc4210 (plus the local fixes and RFC 9480/9481 additions of that time).

``enroll_clients.cmp.asn1`` now defines its own types (no pyasn1-modules on the enrollment path);
tests/unit/test_cmp_asn1.py checks that every recorded and generated CMP message decodes, re-encodes and
names its parts the same with both. Nothing outside that test imports this module.
"""
from __future__ import annotations

from pyasn1.type import char, constraint, namedtype, namedval, tag, univ

# The codec is the product's: what this module stands for is the types.
from enroll_clients.cmp.asn1 import der_decode, der_encode  # noqa: F401


def _short_repr(self):
    return f"<NamedTypes {', '.join(self)}>"


# pyasn1 builds an error text with the repr of the *whole* type tree each time two components of a type
# share a tag (a harmless "postponed" error for SEQUENCEs such as PKIMessage, whose body CHOICE and
# protection both use [0]). During these imports that is most of their cost (rfc2459 + rfc4210: ~110 of
# ~160 ms here). A short repr while the modules load; restored at once, and nothing else changes.
_full_repr = namedtype.NamedTypes.__repr__
namedtype.NamedTypes.__repr__ = _short_repr
try:
    from pyasn1_modules import rfc2314, rfc2459, rfc2511, rfc4210
finally:
    namedtype.NamedTypes.__repr__ = _full_repr

MAX = float("inf")

# Re-exported so the rest of the package imports ASN.1 from one place.
AlgorithmIdentifier = rfc2459.AlgorithmIdentifier
Name = rfc2459.Name
GeneralName = rfc2459.GeneralName
SubjectPublicKeyInfo = rfc2459.SubjectPublicKeyInfo
Extension = rfc2459.Extension
Extensions = rfc2459.Extensions
AttributeTypeAndValue = rfc2459.AttributeTypeAndValue
CMPCertificate = rfc4210.CMPCertificate
CertificationRequest = rfc2314.CertificationRequest
CertTemplate = rfc2511.CertTemplate
CertRequest = rfc2511.CertRequest
CertReqMsg = rfc2511.CertReqMsg
CertReqMessages = rfc2511.CertReqMessages
Controls = rfc2511.Controls
ProofOfPossession = rfc2511.ProofOfPossession
POPOSigningKey = rfc2511.POPOSigningKey
PKIHeader = rfc4210.PKIHeader
PKIStatusInfo = rfc4210.PKIStatusInfo
PKIFreeText = rfc4210.PKIFreeText
InfoTypeAndValue = rfc4210.InfoTypeAndValue
CertRepMessage = rfc4210.CertRepMessage
ErrorMsgContent = rfc4210.ErrorMsgContent
PollReqContent = rfc4210.PollReqContent
PollRepContent = rfc4210.PollRepContent
RevDetails = rfc4210.RevDetails
RevReqContent = rfc4210.RevReqContent
GenMsgContent = rfc4210.GenMsgContent
GenRepContent = rfc4210.GenRepContent
PBMParameter = rfc4210.PBMParameter


class _NamedTypes(namedtype.NamedTypes):
    """NamedTypes with the short repr (see above) for the types defined here."""

    __repr__ = _short_repr


def _ctx(n: int, constructed: bool = True) -> tag.Tag:
    return tag.Tag(tag.tagClassContext, tag.tagFormatConstructed if constructed else tag.tagFormatSimple, n)


# --- Fixed / added types --------------------------------------------------------------------------
class CertId(univ.Sequence):
    """CertId ::= SEQUENCE { issuer GeneralName, serialNumber INTEGER } (RFC 4211)."""

    componentType = _NamedTypes(
        namedtype.NamedType("issuer", rfc2459.GeneralName()),
        namedtype.NamedType("serialNumber", univ.Integer()),
    )


class RevRepContent(univ.Sequence):
    componentType = _NamedTypes(
        namedtype.NamedType("status", univ.SequenceOf(componentType=rfc4210.PKIStatusInfo()).subtype(
            sizeSpec=constraint.ValueSizeConstraint(1, MAX))),
        namedtype.OptionalNamedType("revCerts", univ.SequenceOf(componentType=CertId()).subtype(
            sizeSpec=constraint.ValueSizeConstraint(1, MAX), explicitTag=_ctx(0))),
        namedtype.OptionalNamedType("crls", univ.SequenceOf(componentType=rfc2459.CertificateList()).subtype(
            sizeSpec=constraint.ValueSizeConstraint(1, MAX), explicitTag=_ctx(1))),
    )


class CertStatus(univ.Sequence):
    """CMPv3 CertStatus: certHash, certReqId, statusInfo OPTIONAL, hashAlg [0] OPTIONAL (RFC 9480 2.10)."""

    componentType = _NamedTypes(
        namedtype.NamedType("certHash", univ.OctetString()),
        namedtype.NamedType("certReqId", univ.Integer()),
        namedtype.OptionalNamedType("statusInfo", rfc4210.PKIStatusInfo()),
        namedtype.OptionalNamedType("hashAlg", rfc2459.AlgorithmIdentifier().subtype(explicitTag=_ctx(0))),
    )


class CertConfirmContent(univ.SequenceOf):
    componentType = CertStatus()


class CaCertsValue(univ.SequenceOf):
    """id-it-caCerts infoValue: SEQUENCE SIZE (1..MAX) OF CMPCertificate (RFC 9480 section 2.15)."""

    componentType = rfc4210.CMPCertificate()
    sizeSpec = univ.SequenceOf.sizeSpec + constraint.ValueSizeConstraint(1, MAX)


class RootCaKeyUpdateContent(univ.Sequence):
    """RFC 9480 section 2.16: newWithNew, newWithOld [0] OPTIONAL, oldWithNew [1] OPTIONAL."""

    componentType = _NamedTypes(
        namedtype.NamedType("newWithNew", rfc4210.CMPCertificate()),
        namedtype.OptionalNamedType("newWithOld", rfc4210.CMPCertificate().subtype(explicitTag=_ctx(0))),
        namedtype.OptionalNamedType("oldWithNew", rfc4210.CMPCertificate().subtype(explicitTag=_ctx(1))),
    )


class CertReqTemplateContent(univ.Sequence):
    """RFC 9480 section 2.14: certTemplate, keySpec Controls OPTIONAL."""

    componentType = _NamedTypes(
        namedtype.NamedType("certTemplate", rfc2511.CertTemplate()),
        namedtype.OptionalNamedType("keySpec", univ.SequenceOf(componentType=rfc2459.AttributeTypeAndValue()).subtype(
            sizeSpec=constraint.ValueSizeConstraint(1, MAX))),
    )


class CertProfileValue(univ.SequenceOf):
    componentType = char.UTF8String()
    sizeSpec = univ.SequenceOf.sizeSpec + constraint.ValueSizeConstraint(1, MAX)


class PBKDF2Params(univ.Sequence):
    """RFC 8018 PBKDF2-params, restricted to what RFC 9481 uses (salt is 'specified')."""

    componentType = _NamedTypes(
        namedtype.NamedType("salt", univ.OctetString()),
        namedtype.NamedType("iterationCount", univ.Integer().subtype(
            subtypeSpec=constraint.ValueRangeConstraint(1, MAX))),
        namedtype.OptionalNamedType("keyLength", univ.Integer().subtype(
            subtypeSpec=constraint.ValueRangeConstraint(1, MAX))),
        namedtype.OptionalNamedType("prf", rfc2459.AlgorithmIdentifier()),
    )


class PBMAC1Params(univ.Sequence):
    componentType = _NamedTypes(
        namedtype.NamedType("keyDerivationFunc", rfc2459.AlgorithmIdentifier()),
        namedtype.NamedType("messageAuthScheme", rfc2459.AlgorithmIdentifier()),
    )


def _body_types():
    replace = {
        "rp": RevRepContent().subtype(explicitTag=_ctx(12)),
        "certConf": CertConfirmContent().subtype(explicitTag=_ctx(24)),
    }
    out = []
    for nt in rfc4210.PKIBody.componentType.namedTypes:
        name = "genp" if nt.name == "gen" else nt.name
        out.append(namedtype.NamedType(name, replace.get(name, nt.asn1Object)))
    return _NamedTypes(*out)


class PKIBody(univ.Choice):
    componentType = _body_types()


class PKIMessage(univ.Sequence):
    componentType = _NamedTypes(
        namedtype.NamedType("header", rfc4210.PKIHeader()),
        namedtype.NamedType("body", PKIBody()),
        namedtype.OptionalNamedType("protection", univ.BitString().subtype(explicitTag=_ctx(0, False))),
        namedtype.OptionalNamedType("extraCerts", univ.SequenceOf(componentType=rfc4210.CMPCertificate()).subtype(
            sizeSpec=constraint.ValueSizeConstraint(1, MAX), explicitTag=_ctx(1))),
    )


class ProtectedPart(univ.Sequence):
    componentType = _NamedTypes(
        namedtype.NamedType("header", rfc4210.PKIHeader()),
        namedtype.NamedType("body", PKIBody()),
    )


class ReasonFlags(univ.Enumerated):  # CRLReason, for rr crlEntryDetails
    namedValues = namedval.NamedValues(
        ("unspecified", 0), ("keyCompromise", 1), ("cACompromise", 2), ("affiliationChanged", 3),
        ("superseded", 4), ("cessationOfOperation", 5), ("certificateHold", 6), ("removeFromCRL", 8),
        ("privilegeWithdrawn", 9), ("aACompromise", 10))

