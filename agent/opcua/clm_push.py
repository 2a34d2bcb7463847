"""The CLM as an OPC UA push server (OPC 10000-12 §7.7): one enrollment of one device, with stage timings.

CreateSigningRequest (the device makes the key and the CSR) → upstream CA (lab, EST or CMP: the CLM's
``agent.clm.Upstream``) → pre-verification (``agent.clm.pre_verify``, and the OPC UA purpose: the device's
applicationUri, serverAuth) → UpdateCertificate → TrustList (the upstream's roots and the issuing chain, written
only when the device's differs) → ApplyChanges. Nothing is sent to the device that the CLM could have refused
itself, so an issued certificate is never orphaned by a check that could have been made before.

The stages mirror seed 003's Table 1 (and ``agent.clm.Clm.enroll_once``): ``connect_s`` (endpoint discovery,
server certificate check, secure channel, session), ``csr_s`` (CreateSigningRequest round trip: the device's key
generation and CSR signing are inside it; OPC UA has no field to report them separately), ``enroll_s`` (upstream,
including pre-verification), ``pre_verify_s``, ``update_s`` (UpdateCertificate: the device's verification),
``trustlist_s``, ``apply_s`` (the device's commit and deployment; 0 when the device needed no ApplyChanges because
it reported applyChangesRequired FALSE, as servers without transactions do) and ``total_s``.
"""
from __future__ import annotations

import datetime
import time
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent.opcua import trustlist as tlmod
from agent.opcua.client import Identity, PushClient
from agent.opcua.errors import PushClientError

KEY_TYPES = ("rsa", "p256", "p384")
DER = Encoding.DER


def desired_trustlist(anchors: Sequence[x509.Certificate], chain: Sequence[x509.Certificate]) -> tlmod.TrustList:
    """What the CLM puts on a device: the domain's roots as trusted, the issuing CAs of the chain as issuers."""
    roots = [a.public_bytes(DER) for a in anchors]
    issuers = [c.public_bytes(DER) for c in chain if c.subject != c.issuer and c.public_bytes(DER) not in roots]
    return tlmod.TrustList(trusted_certificates=tuple(dict.fromkeys(roots)),
                           issuer_certificates=tuple(dict.fromkeys(issuers)))


async def enroll_once(rec: dict, upstream, identity: Identity, *, domain: str, timeout_s: float = 30.0,
                      policy: str = "Basic256Sha256", keep_trust: Sequence[x509.Certificate] = (),
                      intermediates: Sequence[x509.Certificate] = ()) -> dict:
    """One push enrollment of the inventory record ``rec`` (``uri`` opc.tcp://…, ``key_type`` rsa|p256|p384,
    ``subject``, ``profile``, ``opcua``: {``server_fingerprint``, ``application_uri``}).

    ``intermediates``: CA certificates to verify the device's current certificate with (the chain the CLM saved at
    the previous enrollment). ``keep_trust``: further certificates the device must keep trusting (the CLM's own CA when it differs from the
    domain's), so that the TrustList never locks the CLM out.

    Returns {"stages": {...}, "certificate": cert, "chain": (...)}. Raises ``agent.clm.ClmError`` (a pre-verification
    or upstream refusal) or ``PushClientError`` (the device refused, with its StatusCode).
    """
    from agent.clm import PreVerificationError, pre_verify
    from keystore.errors import VerificationError
    from keystore.purpose_opcua import validate_application

    t_total = time.perf_counter()
    kt = (rec.get("key_type") or "rsa").lower()
    kt = {"rsa2048": "rsa", "ec": "p256"}.get(kt, kt)
    if kt not in KEY_TYPES:
        raise PushClientError(f"device {rec['id']}: key type {rec.get('key_type')!r} is not an OPC UA certificate "
                              f"type of the DefaultApplicationGroup ({', '.join(KEY_TYPES)})")
    o = rec.get("opcua") or {}
    anchors = upstream.trust_anchors(domain)
    client = PushClient(rec["uri"], identity, anchors=anchors, intermediates=intermediates,
                        server_fingerprint=o.get("server_fingerprint"),
                        server_uri=o.get("application_uri"), policy=policy, timeout_s=timeout_s)
    stages = {}
    await client.connect()
    try:
        stages["connect_s"] = client.timings["connect_s"]
        app_uri = o.get("application_uri") or client.endpoint_uri
        t = time.perf_counter()
        csr = await client.create_signing_request(kt, rec.get("subject") or "")
        stages["csr_s"] = time.perf_counter() - t
        if not csr.is_signature_valid:
            raise PreVerificationError("bad-csr", "the device's CSR signature does not verify")
        uris = []
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            pass
        if app_uri and app_uri not in uris:
            raise PreVerificationError("bad-application-uri", f"the device's CSR names {', '.join(uris) or 'no URI'}, "
                                       f"not its applicationUri {app_uri}")
        t = time.perf_counter()
        up = await upstream.enroll(csr, domain=domain, profile=rec.get("profile") or "opcua")
        t_pre = time.perf_counter()
        path = pre_verify(csr, up.certificate, up.chain, anchors)
        try:
            validate_application(up.certificate, up.chain, anchors, application_uri=app_uri or (uris[0] if uris
                                 else None), role="server", public_key=csr.public_key(),
                                 what="certificate for the device")
        except VerificationError as e:
            raise PreVerificationError(e.reason, str(e)) from e
        now = time.perf_counter()
        stages["enroll_s"] = now - t
        stages["pre_verify_s"] = now - t_pre
        chain = tuple(path[1:])
        t = time.perf_counter()
        # applyChangesRequired: a server without transactions (open62541, for one) applies at once and says FALSE;
        # ApplyChanges is then not called (such a server may refuse it with nothing pending).
        apply_needed = bool(await client.update_certificate(up.certificate, [c for c in chain if c.subject != c.issuer],
                                                            kt))
        stages["update_s"] = time.perf_counter() - t
        t = time.perf_counter()
        # The CLM's own chain stays trusted on the device (its CA may not be the domain's), so a TrustList written
        # here never locks the CLM out (the device would refuse it: Bad_RequestNotAllowed).
        own = tuple(identity.chain)
        want = desired_trustlist([*anchors, *keep_trust, *(c for c in own if c.subject == c.issuer)],
                                 [*chain, *own])
        have = await client.read_trust_list()
        if set(have.trusted_certificates) != set(want.trusted_certificates) or \
                set(have.issuer_certificates) != set(want.issuer_certificates):
            apply_needed |= bool(await client.write_trust_list(tlmod.TrustList(
                trusted_certificates=want.trusted_certificates, trusted_crls=have.trusted_crls,
                issuer_certificates=want.issuer_certificates, issuer_crls=have.issuer_crls)))
        stages["trustlist_s"] = time.perf_counter() - t
        t = time.perf_counter()
        if apply_needed:
            await client.apply_changes()
        stages["apply_s"] = time.perf_counter() - t
    finally:
        await client.close()
    stages["total_s"] = time.perf_counter() - t_total
    return {"stages": stages, "certificate": up.certificate, "chain": chain,
            "answer": {"stored": rec.get("id"), "not_after": int(up.certificate.not_valid_after_utc.timestamp())},
            "at": datetime.datetime.now(datetime.timezone.utc).isoformat()}


def identity_from_keystore(ks, name: str) -> Identity:
    """The CLM's OPC UA client identity: a credential of its keystore (its key stays in its backend)."""
    from keystore.purpose_opcua import application_uris

    cred = ks.get(name)
    uris = application_uris(cred.certificate)
    if not uris:
        raise PushClientError(f"credential {name}: its certificate has no URI in subjectAltName; an OPC UA client "
                              "needs its applicationUri there (request it with --san uri:urn:…)")
    return Identity(cred.certificate, ks.private_key(cred.key_uri), uris[0], tuple(cred.chain))
