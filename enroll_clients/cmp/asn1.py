"""ASN.1 types for CMP (RFC 4210/9810, RFC 4211 CRMF, RFC 9480/9481), defined here with pyasn1's type system.

Why not a module library: ``pyasn1_alt_modules.rfc9480`` imports dozens of RFC modules (~0.5-1 s on x86,
several seconds on a Pi Zero 2 W), and even pyasn1-modules' ``rfc4210`` (which pulls ``rfc2459``, ``rfc2511``,
``rfc2315``, ``rfc2314``: every X.509, PKCS#7 and PKCS#10 structure) costs ~30-40 ms of a ~250 ms
``devagent enroll`` on the CI host. CMP needs far less: the message, header and body structures, CRMF, and the
few X.509 types a CertTemplate holds (Name, AlgorithmIdentifier, SubjectPublicKeyInfo, Extensions,
GeneralName). Those are defined below with the names, tags and field names of pyasn1-modules' ``rfc2459``,
``rfc2511`` and ``rfc4210`` (so values built and read by name are the same), with these differences:

- **Opaque where the client never looks inside.** Certificates (CMPCertificate), CRLs and PKCS#10 requests are
  kept as a SEQUENCE of their three top-level elements, each an untouched DER TLV (``_Shallow``): they are
  parsed by ``cryptography`` (``keystore.certs``), never by pyasn1, and re-encode to the very bytes received.
  The bodies and fields this client neither sends nor reads (popdecc, popdecr, krp, ckuann, cann, rann,
  crlann, nested; EncryptedValue/EncryptedKey, PKIPublicationInfo; x400Address, ediPartyName) are single
  opaque values (``_Opaque``) under their tag. They still decode (a message carrying one is a valid
  PKIMessage) and re-encode byte for byte, so protection over them verifies.
- **Fixes over pyasn1-modules** (all but the second checked against OpenSSL's messages in tests/interop; the client
  never sends poposkInput and the lab server refuses it): ``CertId.issuer`` is a GeneralName (RFC 4211;
  pyasn1-modules has an OCTET STRING), and so is ``POPOSigningKeyInput``'s ``sender [0]``; ``CertStatus`` has the CMPv3 ``hashAlg [0]`` (RFC 9480 2.10);
  ``PKIBody`` names ``genp`` correctly (pyasn1-modules: ``gen``); ``ProtectedPart`` names its second field
  ``body`` (pyasn1-modules: ``infoValue``).
- RFC 9480/9481 additions: the id-it OIDs, ``RootCaKeyUpdateContent``, ``CertReqTemplateContent``,
  ``CertProfileValue``, PBMAC1/PBKDF2 parameters.

tests/unit/test_cmp_asn1.py holds the two to each other: every recorded and generated CMP message (the fuzz
corpus, OpenSSL's, the MockCA's and our own) decodes, re-encodes and names its parts identically with these
types and with pyasn1-modules' (kept as a test dependency only), and no CMP enrollment imports pyasn1-modules.

Invariant: encode/decode here is DER only (``der_encode``/``der_decode``); a decode that leaves trailing
bytes is an error.
"""
from __future__ import annotations

from pyasn1.codec.der import decoder as _der_decoder
from pyasn1.codec.der import encoder as _der_encoder
from pyasn1.type import char, constraint, namedtype, namedval, tag, tagmap, univ, useful

MAX = float("inf")


class _NamedTypes(namedtype.NamedTypes):
    """NamedTypes with a short repr.

    pyasn1 builds an error text with the repr of the *whole* type tree each time two components of a type share
    a tag (a harmless "postponed" error, e.g. for PKIMessage, whose body CHOICE and protection both use [0]);
    with the default repr that text costs more than everything else in defining these types."""

    def __repr__(self):
        return f"<NamedTypes {', '.join(self)}>"


def _nt(*fields) -> _NamedTypes:
    return _NamedTypes(*fields)


_F = namedtype.NamedType
_O = namedtype.OptionalNamedType


def _ctx(n: int, constructed: bool = True) -> tag.Tag:
    return tag.Tag(tag.tagClassContext, tag.tagFormatConstructed if constructed else tag.tagFormatSimple, n)


def _exp(n: int) -> dict:
    return {"explicitTag": _ctx(n)}


def _imp(n: int, constructed: bool = False) -> dict:
    return {"implicitTag": _ctx(n, constructed)}


def _size1() -> constraint.ValueSizeConstraint:
    return constraint.ValueSizeConstraint(1, MAX)


class _Opaque(univ.Any):
    """A value kept as the DER it arrived as, under its (explicit or implicit) tag.

    A tagged ``univ.Any`` would make itself the *default* of every CHOICE and SEQUENCE position it is in (it
    matches any tag), so two of them in one CHOICE are an error and one swallows unknown tags; this one matches
    only its own tag. Untagged it behaves as ``univ.Any``."""

    @property
    def tagMap(self):
        if not self.tagSet:
            return univ.Any.tagMap.fget(self)
        try:
            return self._opaqueTagMap
        except AttributeError:
            self._opaqueTagMap = tagmap.TagMap({self.tagSet: self})
            return self._opaqueTagMap


class _Shallow(univ.SequenceOf):
    """A SEQUENCE whose elements are kept as their DER TLVs (certificates, CRLs, CSRs: see the module doc)."""

    componentType = univ.Any()


# --- X.509 (RFC 5280; names as pyasn1-modules' rfc2459) ---------------------------------------------
class AttributeTypeAndValue(univ.Sequence):
    componentType = _nt(_F("type", univ.ObjectIdentifier()), _F("value", univ.Any()))


class RelativeDistinguishedName(univ.SetOf):
    componentType = AttributeTypeAndValue()


class RDNSequence(univ.SequenceOf):
    componentType = RelativeDistinguishedName()


class Name(univ.Choice):
    """Name ::= CHOICE { rdnSequence RDNSequence }; the alternative is named '' as in pyasn1-modules."""

    componentType = _nt(_F("", RDNSequence()))


class AlgorithmIdentifier(univ.Sequence):
    componentType = _nt(_F("algorithm", univ.ObjectIdentifier()), _O("parameters", univ.Any()))


class SubjectPublicKeyInfo(univ.Sequence):
    componentType = _nt(_F("algorithm", AlgorithmIdentifier()), _F("subjectPublicKey", univ.BitString()))


class Extension(univ.Sequence):
    componentType = _nt(
        _F("extnID", univ.ObjectIdentifier()),
        namedtype.DefaultedNamedType("critical", univ.Boolean("False")),
        _F("extnValue", univ.OctetString()),
    )


class Extensions(univ.SequenceOf):
    componentType = Extension()
    sizeSpec = univ.SequenceOf.sizeSpec + _size1()


class Time(univ.Choice):
    componentType = _nt(_F("utcTime", useful.UTCTime()), _F("generalTime", useful.GeneralizedTime()))


class Version(univ.Integer):
    namedValues = namedval.NamedValues(("v1", 0), ("v2", 1), ("v3", 2))


class UniqueIdentifier(univ.BitString):
    pass


class KeyIdentifier(univ.OctetString):
    pass


class AnotherName(univ.Sequence):
    componentType = _nt(_F("type-id", univ.ObjectIdentifier()), _F("value", _Opaque().subtype(**_exp(0))))


class GeneralName(univ.Choice):
    componentType = _nt(
        _F("otherName", AnotherName().subtype(**_imp(0))),
        _F("rfc822Name", char.IA5String().subtype(**_imp(1))),
        _F("dNSName", char.IA5String().subtype(**_imp(2))),
        _F("x400Address", _Opaque().subtype(**_imp(3, True))),  # ORAddress
        _F("directoryName", Name().subtype(**_imp(4))),
        _F("ediPartyName", _Opaque().subtype(**_imp(5, True))),  # EDIPartyName
        _F("uniformResourceIdentifier", char.IA5String().subtype(**_imp(6))),
        _F("iPAddress", univ.OctetString().subtype(**_imp(7))),
        _F("registeredID", univ.ObjectIdentifier().subtype(**_imp(8))),
    )


class GeneralNames(univ.SequenceOf):
    componentType = GeneralName()
    sizeSpec = univ.SequenceOf.sizeSpec + _size1()


class CMPCertificate(_Shallow):
    """CMPCertificate ::= CHOICE { x509v3PKCert Certificate }: a Certificate, opaque (``_Shallow``)."""


class CertificateList(_Shallow):
    pass


class CertificationRequest(_Shallow):
    """PKCS#10 CertificationRequest (p10cr), opaque (``_Shallow``)."""


# --- CRMF (RFC 4211; names as pyasn1-modules' rfc2511) ----------------------------------------------
class CertId(univ.Sequence):
    """CertId ::= SEQUENCE { issuer GeneralName, serialNumber INTEGER } (RFC 4211)."""

    componentType = _nt(_F("issuer", GeneralName()), _F("serialNumber", univ.Integer()))


class OptionalValidity(univ.Sequence):
    componentType = _nt(_O("notBefore", Time().subtype(**_imp(0))), _O("notAfter", Time().subtype(**_imp(1))))


class CertTemplate(univ.Sequence):
    componentType = _nt(
        _O("version", Version().subtype(**_imp(0))),
        _O("serialNumber", univ.Integer().subtype(**_imp(1))),
        _O("signingAlg", AlgorithmIdentifier().subtype(**_imp(2, True))),
        _O("issuer", Name().subtype(**_imp(3, True))),
        _O("validity", OptionalValidity().subtype(**_imp(4, True))),
        _O("subject", Name().subtype(**_imp(5, True))),
        _O("publicKey", SubjectPublicKeyInfo().subtype(**_imp(6, True))),
        _O("issuerUID", UniqueIdentifier().subtype(**_imp(7))),
        _O("subjectUID", UniqueIdentifier().subtype(**_imp(8))),
        _O("extensions", Extensions().subtype(**_imp(9, True))),
    )


class Controls(univ.SequenceOf):
    componentType = AttributeTypeAndValue()
    sizeSpec = univ.SequenceOf.sizeSpec + _size1()


class CertRequest(univ.Sequence):
    componentType = _nt(
        _F("certReqId", univ.Integer()),
        _F("certTemplate", CertTemplate()),
        _O("controls", Controls()),
    )


class PKMACValue(univ.Sequence):
    componentType = _nt(_F("algId", AlgorithmIdentifier()), _F("value", univ.BitString()))


class POPOSigningKeyInput(univ.Sequence):
    componentType = _nt(
        _F("authInfo", univ.Choice(componentType=_nt(
            _F("sender", GeneralName().subtype(**_exp(0))),  # [0] GeneralName: a tagged CHOICE is explicit
            _F("publicKeyMAC", PKMACValue()),
        ))),
        _F("publicKey", SubjectPublicKeyInfo()),
    )


class POPOSigningKey(univ.Sequence):
    componentType = _nt(
        _O("poposkInput", POPOSigningKeyInput().subtype(**_imp(0, True))),
        _F("algorithmIdentifier", AlgorithmIdentifier()),
        _F("signature", univ.BitString()),
    )


class SubsequentMessage(univ.Integer):
    namedValues = namedval.NamedValues(("encrCert", 0), ("challengeResp", 1))


class POPOPrivKey(univ.Choice):
    componentType = _nt(
        _F("thisMessage", univ.BitString().subtype(**_imp(0))),
        _F("subsequentMessage", SubsequentMessage().subtype(**_imp(1))),
        _F("dhMAC", univ.BitString().subtype(**_imp(2))),
    )


class ProofOfPossession(univ.Choice):
    componentType = _nt(
        _F("raVerified", univ.Null().subtype(**_imp(0))),
        _F("signature", POPOSigningKey().subtype(**_imp(1, True))),
        _F("keyEncipherment", POPOPrivKey().subtype(**_imp(2, True))),
        _F("keyAgreement", POPOPrivKey().subtype(**_imp(3, True))),
    )


class CertReqMsg(univ.Sequence):
    componentType = _nt(
        _F("certReq", CertRequest()),
        _O("pop", ProofOfPossession()),
        _O("regInfo", univ.SequenceOf(componentType=AttributeTypeAndValue()).subtype(sizeSpec=_size1())),
    )


class CertReqMessages(univ.SequenceOf):
    componentType = CertReqMsg()
    sizeSpec = univ.SequenceOf.sizeSpec + _size1()


# --- CMP (RFC 4210/9810; names as pyasn1-modules' rfc4210) ------------------------------------------
class PKIFreeText(univ.SequenceOf):
    componentType = char.UTF8String()
    sizeSpec = univ.SequenceOf.sizeSpec + _size1()


class InfoTypeAndValue(univ.Sequence):
    componentType = _nt(_F("infoType", univ.ObjectIdentifier()), _O("infoValue", univ.Any()))


class PKIHeader(univ.Sequence):
    componentType = _nt(
        _F("pvno", univ.Integer(namedValues=namedval.NamedValues(("cmp1999", 1), ("cmp2000", 2)))),
        _F("sender", GeneralName()),
        _F("recipient", GeneralName()),
        _O("messageTime", useful.GeneralizedTime().subtype(**_exp(0))),
        _O("protectionAlg", AlgorithmIdentifier().subtype(**_exp(1))),
        _O("senderKID", KeyIdentifier().subtype(**_exp(2))),
        _O("recipKID", KeyIdentifier().subtype(**_exp(3))),
        _O("transactionID", univ.OctetString().subtype(**_exp(4))),
        _O("senderNonce", univ.OctetString().subtype(**_exp(5))),
        _O("recipNonce", univ.OctetString().subtype(**_exp(6))),
        _O("freeText", PKIFreeText().subtype(**_exp(7))),
        _O("generalInfo", univ.SequenceOf(componentType=InfoTypeAndValue()).subtype(**_exp(8))),
    )


class PKIStatus(univ.Integer):
    namedValues = namedval.NamedValues(
        ("accepted", 0), ("grantedWithMods", 1), ("rejection", 2), ("waiting", 3), ("revocationWarning", 4),
        ("revocationNotification", 5), ("keyUpdateWarning", 6))


class PKIFailureInfo(univ.BitString):
    namedValues = namedval.NamedValues(
        ("badAlg", 0), ("badMessageCheck", 1), ("badRequest", 2), ("badTime", 3), ("badCertId", 4),
        ("badDataFormat", 5), ("wrongAuthority", 6), ("incorrectData", 7), ("missingTimeStamp", 8), ("badPOP", 9),
        ("certRevoked", 10), ("certConfirmed", 11), ("wrongIntegrity", 12), ("badRecipientNonce", 13),
        ("timeNotAvailable", 14), ("unacceptedPolicy", 15), ("unacceptedExtension", 16),
        ("addInfoNotAvailable", 17), ("badSenderNonce", 18), ("badCertTemplate", 19), ("signerNotTrusted", 20),
        ("transactionIdInUse", 21), ("unsupportedVersion", 22), ("notAuthorized", 23), ("systemUnavail", 24),
        ("systemFailure", 25), ("duplicateCertReq", 26))


class PKIStatusInfo(univ.Sequence):
    componentType = _nt(
        _F("status", PKIStatus()),
        _O("statusString", PKIFreeText()),
        _O("failInfo", PKIFailureInfo()),
    )


class ErrorMsgContent(univ.Sequence):
    componentType = _nt(
        _F("pKIStatusInfo", PKIStatusInfo()),
        _O("errorCode", univ.Integer()),
        _O("errorDetails", PKIFreeText()),
    )


class CertOrEncCert(univ.Choice):
    componentType = _nt(
        _F("certificate", CMPCertificate().subtype(**_exp(0))),
        _F("encryptedCert", _Opaque().subtype(**_exp(1))),  # EncryptedKey (RFC 9480) / EncryptedValue
    )


class CertifiedKeyPair(univ.Sequence):
    componentType = _nt(
        _F("certOrEncCert", CertOrEncCert()),
        _O("privateKey", _Opaque().subtype(**_exp(0))),  # EncryptedKey / EncryptedValue
        _O("publicationInfo", _Opaque().subtype(**_exp(1))),  # PKIPublicationInfo
    )


class CertResponse(univ.Sequence):
    componentType = _nt(
        _F("certReqId", univ.Integer()),
        _F("status", PKIStatusInfo()),
        _O("certifiedKeyPair", CertifiedKeyPair()),
        _O("rspInfo", univ.OctetString()),
    )


class CertRepMessage(univ.Sequence):
    componentType = _nt(
        _O("caPubs", univ.SequenceOf(componentType=CMPCertificate()).subtype(sizeSpec=_size1(), **_exp(1))),
        _F("response", univ.SequenceOf(componentType=CertResponse())),
    )


class PollReqContent(univ.SequenceOf):
    class CertReq(univ.Sequence):
        componentType = _nt(_F("certReqId", univ.Integer()))

    componentType = CertReq()


class PollRepContent(univ.SequenceOf):
    class CertReq(univ.Sequence):
        componentType = _nt(
            _F("certReqId", univ.Integer()),
            _F("checkAfter", univ.Integer()),
            _O("reason", PKIFreeText()),
        )

    componentType = CertReq()


class GenMsgContent(univ.SequenceOf):
    componentType = InfoTypeAndValue()


class GenRepContent(univ.SequenceOf):
    componentType = InfoTypeAndValue()


class RevDetails(univ.Sequence):
    componentType = _nt(_F("certDetails", CertTemplate()), _O("crlEntryDetails", Extensions()))


class RevReqContent(univ.SequenceOf):
    componentType = RevDetails()


class RevRepContent(univ.Sequence):
    componentType = _nt(
        _F("status", univ.SequenceOf(componentType=PKIStatusInfo()).subtype(sizeSpec=_size1())),
        _O("revCerts", univ.SequenceOf(componentType=CertId()).subtype(sizeSpec=_size1(), **_exp(0))),
        _O("crls", univ.SequenceOf(componentType=CertificateList()).subtype(sizeSpec=_size1(), **_exp(1))),
    )


class CertStatus(univ.Sequence):
    """CMPv3 CertStatus: certHash, certReqId, statusInfo OPTIONAL, hashAlg [0] OPTIONAL (RFC 9480 2.10)."""

    componentType = _nt(
        _F("certHash", univ.OctetString()),
        _F("certReqId", univ.Integer()),
        _O("statusInfo", PKIStatusInfo()),
        _O("hashAlg", AlgorithmIdentifier().subtype(**_exp(0))),
    )


class CertConfirmContent(univ.SequenceOf):
    componentType = CertStatus()


class PBMParameter(univ.Sequence):
    componentType = _nt(
        _F("salt", univ.OctetString().subtype(subtypeSpec=constraint.ValueSizeConstraint(0, 128))),
        _F("owf", AlgorithmIdentifier()),
        _F("iterationCount", univ.Integer()),
        _F("mac", AlgorithmIdentifier()),
    )


class PKIBody(univ.Choice):
    componentType = _nt(
        _F("ir", CertReqMessages().subtype(**_exp(0))),
        _F("ip", CertRepMessage().subtype(**_exp(1))),
        _F("cr", CertReqMessages().subtype(**_exp(2))),
        _F("cp", CertRepMessage().subtype(**_exp(3))),
        _F("p10cr", CertificationRequest().subtype(**_exp(4))),
        _F("popdecc", _Opaque().subtype(**_exp(5))),
        _F("popdecr", _Opaque().subtype(**_exp(6))),
        _F("kur", CertReqMessages().subtype(**_exp(7))),
        _F("kup", CertRepMessage().subtype(**_exp(8))),
        _F("krr", CertReqMessages().subtype(**_exp(9))),
        _F("krp", _Opaque().subtype(**_exp(10))),
        _F("rr", RevReqContent().subtype(**_exp(11))),
        _F("rp", RevRepContent().subtype(**_exp(12))),
        _F("ccr", CertReqMessages().subtype(**_exp(13))),
        _F("ccp", CertRepMessage().subtype(**_exp(14))),
        _F("ckuann", _Opaque().subtype(**_exp(15))),
        _F("cann", _Opaque().subtype(**_exp(16))),
        _F("rann", _Opaque().subtype(**_exp(17))),
        _F("crlann", _Opaque().subtype(**_exp(18))),
        _F("pkiconf", univ.Null().subtype(**_exp(19))),
        _F("nested", _Opaque().subtype(**_exp(20))),
        _F("genm", GenMsgContent().subtype(**_exp(21))),
        _F("genp", GenRepContent().subtype(**_exp(22))),
        _F("error", ErrorMsgContent().subtype(**_exp(23))),
        _F("certConf", CertConfirmContent().subtype(**_exp(24))),
        _F("pollReq", PollReqContent().subtype(**_exp(25))),
        _F("pollRep", PollRepContent().subtype(**_exp(26))),
    )


class PKIMessage(univ.Sequence):
    componentType = _nt(
        _F("header", PKIHeader()),
        _F("body", PKIBody()),
        _O("protection", univ.BitString().subtype(explicitTag=_ctx(0, False))),
        _O("extraCerts", univ.SequenceOf(componentType=CMPCertificate()).subtype(sizeSpec=_size1(), **_exp(1))),
    )


class ProtectedPart(univ.Sequence):
    componentType = _nt(_F("header", PKIHeader()), _F("body", PKIBody()))


# --- RFC 9480/9481 additions ------------------------------------------------------------------------
class CaCertsValue(univ.SequenceOf):
    """id-it-caCerts infoValue: SEQUENCE SIZE (1..MAX) OF CMPCertificate (RFC 9480 section 2.15)."""

    componentType = CMPCertificate()
    sizeSpec = univ.SequenceOf.sizeSpec + _size1()


class RootCaKeyUpdateContent(univ.Sequence):
    """RFC 9480 section 2.16: newWithNew, newWithOld [0] OPTIONAL, oldWithNew [1] OPTIONAL."""

    componentType = _nt(
        _F("newWithNew", CMPCertificate()),
        _O("newWithOld", CMPCertificate().subtype(**_exp(0))),
        _O("oldWithNew", CMPCertificate().subtype(**_exp(1))),
    )


class CertReqTemplateContent(univ.Sequence):
    """RFC 9480 section 2.14: certTemplate, keySpec Controls OPTIONAL."""

    componentType = _nt(
        _F("certTemplate", CertTemplate()),
        _O("keySpec", univ.SequenceOf(componentType=AttributeTypeAndValue()).subtype(sizeSpec=_size1())),
    )


class CertProfileValue(univ.SequenceOf):
    componentType = char.UTF8String()
    sizeSpec = univ.SequenceOf.sizeSpec + _size1()


class PBKDF2Params(univ.Sequence):
    """RFC 8018 PBKDF2-params, restricted to what RFC 9481 uses (salt is 'specified')."""

    componentType = _nt(
        _F("salt", univ.OctetString()),
        _F("iterationCount", univ.Integer().subtype(subtypeSpec=constraint.ValueRangeConstraint(1, MAX))),
        _O("keyLength", univ.Integer().subtype(subtypeSpec=constraint.ValueRangeConstraint(1, MAX))),
        _O("prf", AlgorithmIdentifier()),
    )


class PBMAC1Params(univ.Sequence):
    componentType = _nt(_F("keyDerivationFunc", AlgorithmIdentifier()), _F("messageAuthScheme", AlgorithmIdentifier()))


class ReasonFlags(univ.Enumerated):  # CRLReason, for rr crlEntryDetails
    namedValues = namedval.NamedValues(
        ("unspecified", 0), ("keyCompromise", 1), ("cACompromise", 2), ("affiliationChanged", 3),
        ("superseded", 4), ("cessationOfOperation", 5), ("certificateHold", 6), ("removeFromCRL", 8),
        ("privilegeWithdrawn", 9), ("aACompromise", 10))


# --- OIDs -------------------------------------------------------------------------------------------
id_PasswordBasedMac = univ.ObjectIdentifier("1.2.840.113533.7.66.13")
id_PBMAC1 = univ.ObjectIdentifier("1.2.840.113549.1.5.14")
id_PBKDF2 = univ.ObjectIdentifier("1.2.840.113549.1.5.12")
id_hmacWithSHA1 = univ.ObjectIdentifier("1.2.840.113549.2.7")
id_hmacWithSHA224 = univ.ObjectIdentifier("1.2.840.113549.2.8")
id_hmacWithSHA256 = univ.ObjectIdentifier("1.2.840.113549.2.9")
id_hmacWithSHA384 = univ.ObjectIdentifier("1.2.840.113549.2.10")
id_hmacWithSHA512 = univ.ObjectIdentifier("1.2.840.113549.2.11")
id_hmac_sha1 = univ.ObjectIdentifier("1.3.6.1.5.5.8.1.2")  # RFC 2104 / OpenSSL's default PBM MAC
id_sha1 = univ.ObjectIdentifier("1.3.14.3.2.26")
id_sha224 = univ.ObjectIdentifier("2.16.840.1.101.3.4.2.4")
id_sha256 = univ.ObjectIdentifier("2.16.840.1.101.3.4.2.1")
id_sha384 = univ.ObjectIdentifier("2.16.840.1.101.3.4.2.2")
id_sha512 = univ.ObjectIdentifier("2.16.840.1.101.3.4.2.3")

id_it = "1.3.6.1.5.5.7.4."
id_it_caKeyUpdateInfo = univ.ObjectIdentifier(id_it + "5")
id_it_implicitConfirm = univ.ObjectIdentifier(id_it + "13")
id_it_confirmWaitTime = univ.ObjectIdentifier(id_it + "14")
id_it_caCerts = univ.ObjectIdentifier(id_it + "17")
id_it_rootCaKeyUpdate = univ.ObjectIdentifier(id_it + "18")
id_it_certReqTemplate = univ.ObjectIdentifier(id_it + "19")
id_it_rootCaCert = univ.ObjectIdentifier(id_it + "20")
id_it_certProfile = univ.ObjectIdentifier(id_it + "21")

id_regCtrl_oldCertID = univ.ObjectIdentifier("1.3.6.1.5.5.7.5.1.5")  # RFC 4211 section 6.5
id_regCtrl_algId = univ.ObjectIdentifier("1.3.6.1.5.5.7.5.1.11")  # RFC 9480 section 2.14
id_regCtrl_rsaKeyLen = univ.ObjectIdentifier("1.3.6.1.5.5.7.5.1.12")
id_ce_cRLReasons = univ.ObjectIdentifier("2.5.29.21")

GeneralizedTime = useful.GeneralizedTime
OctetString = univ.OctetString
Integer = univ.Integer
BitString = univ.BitString
Null = univ.Null
Any = univ.Any
ObjectIdentifier = univ.ObjectIdentifier
UTF8String = char.UTF8String


# --- Codec ------------------------------------------------------------------------------------------
def der_encode(value) -> bytes:
    return _der_encoder.encode(value)


def der_decode(data: bytes, spec):
    """Decode DER ``data`` against ``spec``; raises ValueError (with pyasn1's reason) on any problem."""
    try:
        value, rest = _der_decoder.decode(data, asn1Spec=spec)
    except Exception as e:  # pyasn1 raises PyAsn1Error and, on some garbage, IndexError/TypeError
        raise ValueError(f"not a valid DER {type(spec).__name__}: {e}") from None
    if rest:
        raise ValueError(f"{len(rest)} trailing byte(s) after the {type(spec).__name__}")
    return value


def from_crypto(der: bytes, spec):
    """A pyasn1 value from the DER of a ``cryptography`` object (certificate, name, SPKI, CSR)."""
    return der_decode(der, spec)
