"""One-off generator of the non-CMP seed corpora (CMP: ``record_cmp_seeds.py``, from OpenSSL's mock server).

    .venv/bin/python -m tests.fuzz.make_seeds            # rewrites tests/fuzz/corpus/<target>/ (not cmp_*)
    .venv/bin/python -m tests.fuzz.make_seeds opcua clm  # only these groups (see GROUPS)

Seeds are what real peers and files look like: EST bodies in the encodings servers send (base64 with LF and
CRLF, PEM, raw DER, libest's csrattrs answer with its trailing NUL, RFC 7030's example csrattrs), a TEST-ONLY lab
CA's certificates, keys and PKCS#12 files, the shipped board profiles and a full agent.toml, datagrams of a CoAP
client (POST /csr with and without CBOR, /verify as one datagram and block-wise, GET/POST /status) together with
the device keystore they are meant for, and the board's frames, CBOR maps and certificates. Run it again only to
refresh the corpus.
"""
from __future__ import annotations

import asyncio
import base64
import datetime
import shutil
import sys
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7, pkcs12
from cryptography.x509.oid import NameOID

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
REPO = HERE.parent.parent
DER = serialization.Encoding.DER
PEM = serialization.Encoding.PEM
# RFC 7030 section 4.5.2's example CsrAttrs, and Cisco libest's built-in answer (it ends in a NUL byte).
RFC7030_CSRATTRS = b"MEEGCSqGSIb3DQEJBzASBgcqhkjOPQIBMQcTBXAxMzIxMBYGCSqGSIb3DQEJDjEJBgcrBgEBAQEWBggqhkjOPQQDAw=="
LIBEST_CSRATTRS = b"MCYGBysGAQEBARYGCSqGSIb3DQEJAQYFK4EEACIGCWCGSAFlAwQCAg==\x00"


def _dir(name: str) -> Path:
    d = CORPUS / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "devagent fuzz"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject, pub, issuer, issuer_key, ca=False, sans=()):
    now = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(pub)
         .serial_number(x509.random_serial_number()).not_valid_before(now)
         .not_valid_after(now + datetime.timedelta(days=36500))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                      data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                                      encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def b64(der: bytes, crlf=False) -> bytes:
    s = base64.b64encode(der)
    nl = b"\r\n" if crlf else b"\n"
    return b"".join(s[i:i + 64] + nl for i in range(0, len(s), 64))


def pki():
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _cert(_name("Fuzz Root CA"), root_key.public_key(), _name("Fuzz Root CA"), root_key, ca=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(_name("Fuzz Issuing CA"), ca_key.public_key(), root.subject, root_key, ca=True)
    dev_key = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert(_name("fuzz-device"), dev_key.public_key(), ca.subject, ca_key,
                 sans=[x509.DNSName("fuzz-device.plant.example"), x509.UniformResourceIdentifier("urn:fuzz:1")])
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_leaf = _cert(_name("fuzz-rsa"), rsa_key.public_key(), ca.subject, ca_key)
    return root_key, root, ca_key, ca, dev_key, leaf, rsa_key, rsa_leaf


def est(p):
    root_key, root, ca_key, ca, dev_key, leaf, rsa_key, rsa_leaf = p
    from enroll_clients.est.messages import encode_csrattrs, encode_serverkeygen, CsrAttrItem

    d = _dir("est_certs")
    p7 = pkcs7.serialize_certificates([leaf, ca, root], DER)
    (d / "pkcs7-b64-lf").write_bytes(b64(p7))
    (d / "pkcs7-b64-crlf").write_bytes(b64(p7, crlf=True))
    (d / "pkcs7-der").write_bytes(p7)
    (d / "pkcs7-pem").write_bytes(pkcs7.serialize_certificates([root], PEM))
    (d / "cert-pem-chain").write_bytes(b"".join(c.public_bytes(PEM) for c in (leaf, ca)))
    (d / "cert-der").write_bytes(rsa_leaf.public_bytes(DER))
    d = _dir("est_serverkeygen")
    for name, key, cert in (("p256", dev_key, leaf), ("rsa", rsa_key, rsa_leaf)):
        ct, body = encode_serverkeygen(key, [cert])
        (d / f"{name}-rfc7030").write_bytes(ct.encode() + b"\n" + body)
    key_der = dev_key.private_bytes(DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    body = (b"--B\r\nContent-Type: application/pkcs8\r\n\r\n" + b64(key_der) + b"--B\r\n"
            b"Content-Type: application/pkcs7-mime; smime-type=certs-only\r\n\r\n"
            + b64(pkcs7.serialize_certificates([leaf], DER)) + b"--B--\r\n")
    (d / "no-cte").write_bytes(b"multipart/mixed; boundary=B\n" + body)
    d = _dir("est_csrattrs")
    (d / "rfc7030-example").write_bytes(RFC7030_CSRATTRS)
    (d / "libest-builtin-nul").write_bytes(LIBEST_CSRATTRS)
    (d / "der-items").write_bytes(encode_csrattrs([
        CsrAttrItem("1.2.840.113549.1.9.7"), CsrAttrItem("1.2.840.10045.4.3.2"),
        CsrAttrItem("1.2.840.10045.2.1", (bytes.fromhex("06082a8648ce3d030107"),)),
        CsrAttrItem("1.2.840.113549.1.9.14", (bytes.fromhex("06032a0304"),))]))
    (d / "empty").write_bytes(b"")


def keystore_import(p):
    root_key, root, ca_key, ca, dev_key, leaf, rsa_key, rsa_leaf = p
    ctxd = _dir("keystore_import.context")
    idev_key = ec.generate_private_key(ec.SECP256R1())
    idev = _cert(_name("fuzz IDevID"), idev_key.public_key(), ca.subject, ca_key)
    (ctxd / "idevid_key.pem").write_bytes(idev_key.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                                                                 serialization.NoEncryption()))
    (ctxd / "idevid.pem").write_bytes(idev.public_bytes(PEM))
    (ctxd / "README").write_text("TEST-ONLY key and certificates for the keystore_import / cli_import fuzz targets\n")
    d = _dir("keystore_import")
    k8 = serialization.PrivateFormat.PKCS8
    seeds = {
        "cert-pem": (0, leaf.public_bytes(PEM)), "cert-der": (0, leaf.public_bytes(DER)),
        "chain-pem": (0, b"".join(c.public_bytes(PEM) for c in (leaf, ca, root))),
        "pkcs7-der": (0, pkcs7.serialize_certificates([leaf, ca], DER)),
        "pkcs7-pem": (0, pkcs7.serialize_certificates([leaf, ca], PEM)),
        "key-pkcs8-pem": (1, dev_key.private_bytes(PEM, k8, serialization.NoEncryption())),
        "key-pkcs8-der": (1, dev_key.private_bytes(DER, k8, serialization.NoEncryption())),
        "key-sec1-pem": (1, dev_key.private_bytes(PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                                  serialization.NoEncryption())),
        "key-rsa-der": (1, rsa_key.private_bytes(DER, k8, serialization.NoEncryption())),
        "p12": (2, pkcs12.serialize_key_and_certificates(b"fuzz", dev_key, leaf, [ca, root],
                                                         serialization.BestAvailableEncryption(b"fuzz"))),
        "idevid-chain": (3, b"".join(c.public_bytes(PEM) for c in (idev, ca, root))),
        "idevid-only": (3, idev.public_bytes(PEM)),
    }
    for name, (kind, data) in seeds.items():
        (d / name).write_bytes(bytes([kind]) + data)
    d = _dir("cli_import")
    for name, sel, data in (("cert-pem", 0, idev.public_bytes(PEM)), ("cert-der", 0, idev.public_bytes(DER)),
                            ("key-pem", 1, (ctxd / "idevid_key.pem").read_bytes()),
                            ("chain-pem", 2, ca.public_bytes(PEM) + root.public_bytes(PEM)),
                            ("trust-root", 3, root.public_bytes(PEM))):
        (d / name).write_bytes(bytes([sel]) + data)


AGENT_TOML = b"""# a full agent.toml (README "Configuration")
[keystore]
path = "/var/lib/devagent"

[enroll]
protocol = "cmp"
server = "http://ca.plant.example:8080/pkix/"
domain = "plant"

[renewal]
at_fraction = 0.66
"""


def toml_seeds():
    d = _dir("toml_config")
    (d / "agent-full").write_bytes(b"\x00" + AGENT_TOML)
    (d / "agent-empty").write_bytes(b"\x00")
    for f in sorted((REPO / "board_profiles").glob("*.toml")):
        data = f.read_bytes().replace(f'name = "{f.stem}"'.encode(), b'name = "fuzz"')
        (d / f"profile-{f.stem}").write_bytes(b"\x01" + data)


def coap(p):
    import aiocoap
    from aiocoap.optiontypes import BlockOption

    from coap_services import codec
    from coap_services.device import DeviceConfig, DeviceService
    from keystore.store import Keystore

    root_key, root, ca_key, ca, dev_key, leaf, rsa_key, rsa_leaf = p
    ctxd = _dir("coap_device.context")
    work = Path(tempfile.mkdtemp())
    ks = Keystore.init(work / "ks")
    ks.add_trust_anchors("fuzz", [root], source="fuzz corpus")
    svc = DeviceService(ks, DeviceConfig(device_id="fuzz-device", default_domain="fuzz", check_validity=False))
    res = asyncio.run(svc.csr(codec.CsrRequest(subject="CN=fuzz-device", name="ldevid", domain="fuzz")))
    csr = x509.load_der_x509_csr(res.csr_der)
    leaf = _cert(csr.subject, csr.public_key(), ca.subject, ca_key)
    shutil.copytree(work / "ks", ctxd / "keystore", ignore=shutil.ignore_patterns("*.lock"))
    shutil.rmtree(work)
    (ctxd / "leaf.pem").write_bytes(leaf.public_bytes(PEM))
    (ctxd / "README").write_text("TEST-ONLY device keystore (master key included) with one pending key, and the\n"
                                 "certificate the lab CA issued for it: the context of the coap_device fuzz target\n")

    def dgram(code, path, payload=b"", cf=None, mid=1, token=b"\x01\x02", block1=None, mtype=aiocoap.CON):
        m = aiocoap.Message(mtype=mtype, code=code, payload=payload, mid=mid, token=token)
        m.opt.uri_path = tuple(path)
        if cf is not None:
            m.opt.content_format = cf
        if block1 is not None:
            m.opt.block1 = BlockOption.BlockwiseTuple(*block1)
        return m.encode()

    def frames(*ds):
        return b"".join(len(x).to_bytes(2, "big") + x for x in ds)

    d = _dir("coap_device")
    full = codec.encode_csr_request(codec.CsrRequest(
        subject="CN=fuzz-device,O=Plant", san=("dns:fuzz-device.plant.example", "ip:10.0.0.5", "uri:urn:fuzz:1"),
        key_type="p256", name="ldevid", domain="fuzz", ca=(root.public_bytes(DER),)))
    p7 = pkcs7.serialize_certificates([leaf, ca], DER)
    blocks = [p7[i:i + 256] for i in range(0, len(p7), 256)]
    block_dgrams = [dgram(aiocoap.POST, ["verify"], b, 281, mid=10 + i, token=b"\x07",
                          block1=(i, i < len(blocks) - 1, 4)) for i, b in enumerate(blocks)]
    seeds = {
        "csr-default": frames(dgram(aiocoap.POST, ["csr"])),
        "csr-full": frames(dgram(aiocoap.POST, ["csr"], full, 60)),
        "csr-tagged-cbor": frames(dgram(aiocoap.POST, ["csr"], bytes.fromhex("a1646e616d65c16474657374"), 60)),
        "csr-text-plain": frames(dgram(aiocoap.POST, ["csr"], b"hello", 0)),
        "csr-non": frames(dgram(aiocoap.POST, ["csr"], full, 60, mtype=aiocoap.NON)),
        "verify-287": frames(dgram(aiocoap.POST, ["verify"], leaf.public_bytes(DER), 287)),
        "verify-281-blockwise": frames(*block_dgrams),
        "status-get": frames(dgram(aiocoap.GET, ["status"])),
        "status-post-payload": frames(dgram(aiocoap.POST, ["status"], b"\xa0", 60)),
        "wkc": frames(dgram(aiocoap.GET, [".well-known", "core"])),
    }
    for name, data in seeds.items():
        (d / name).write_bytes(data)


def mpy(p):
    root_key, root, ca_key, ca, dev_key, leaf, rsa_key, rsa_leaf = p
    sys.path.insert(0, str(REPO / "agent"))
    from mpy import cbor, coap, frame

    d = _dir("mpy_parsers")
    seeds = {
        "x509-leaf": (0, leaf.public_bytes(DER)), "x509-rsa": (0, rsa_leaf.public_bytes(DER)),
        "x509-root": (0, root.public_bytes(DER)),
        "pkcs7": (1, pkcs7.serialize_certificates([leaf, ca], DER)),
        "der-cert": (2, ca.public_bytes(DER)),
        "der-times": (2, bytes.fromhex("3020170d3234303130313030303030305a180f32303530303130313030303030305a")),
        "cbor-csr": (3, cbor.dumps({"subject": "CN=board", "san": ["dns:board.local"], "name": "ldevid",
                                    "ca": [root.public_bytes(DER)[:40]], "n": -5, "t": True, "z": None})),
        "frame-two": (4, frame.encode("CSR", 1, b"\xa1aab") + b"boot noise\r\n" + frame.encode("OK", 2, b"x" * 50)),
        "coap-post": (5, coap.encode(coap.Message(coap.CON, coap.POST, 7, b"\x01", [(11, b"csr"), (12, b"<"),
                                                                                   (65001, b"\x00" * 12)], b"\xa0"))),
    }
    for name, (sel, data) in seeds.items():
        (d / name).write_bytes(bytes([sel]) + data)


def opcua(p):
    """TrustListDataType streams (UA Binary) as a GDS writes them: every list with a CRL in each CRL list, trusted
    certificates only, issuers only, an empty list, a pinned application certificate."""
    root_key, root, ca_key, ca, dev_key, leaf, rsa_key, rsa_leaf = p
    from agent.opcua.trustlist import ALL, ISSUER_CERTIFICATES, ISSUER_CRLS, TRUSTED_CERTIFICATES, TrustList, encode

    def crl(issuer, key, serials=()):
        now = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
        b = (x509.CertificateRevocationListBuilder().issuer_name(issuer.subject).last_update(now)
             .next_update(now + datetime.timedelta(days=36500)))
        for n in serials:
            b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(n).revocation_date(now)
                                          .build())
        return b.sign(key, hashes.SHA256()).public_bytes(DER)

    d = _dir("opcua_trustlist")
    full = TrustList(trusted_certificates=(root.public_bytes(DER),), trusted_crls=(crl(root, root_key, (7,)),),
                     issuer_certificates=(ca.public_bytes(DER),), issuer_crls=(crl(ca, ca_key),))
    (d / "full").write_bytes(encode(full, ALL))
    (d / "trusted-only").write_bytes(encode(TrustList(trusted_certificates=(root.public_bytes(DER),
                                                                            leaf.public_bytes(DER))),
                                            TRUSTED_CERTIFICATES))
    (d / "issuers-only").write_bytes(encode(TrustList(issuer_certificates=(ca.public_bytes(DER),),
                                                      issuer_crls=(crl(ca, ca_key, (1, 2)),)),
                                            ISSUER_CERTIFICATES | ISSUER_CRLS))
    (d / "empty-all").write_bytes(encode(TrustList(), ALL))
    (d / "pinned-rsa").write_bytes(encode(TrustList(trusted_certificates=(rsa_leaf.public_bytes(DER),)),
                                          TRUSTED_CERTIFICATES))


def cmp_template():
    """genp certReqTemplate values (DER CertReqTemplateContent, RFC 9480 2.14): the Siemens MockCA's (RSA-2048 by
    keySpec), one fixing O and leaving CN to us with an EC P-256 key algorithm, one with extensions to fill and to
    keep, and the publicKey algorithm in the template itself."""
    from enroll_clients.cmp import asn1 as A
    from enroll_clients.cmp import messages as M
    from pyasn1.codec.der import encoder

    d = _dir("cmp_template")
    mock = CORPUS / "cmp_accept" / "mockca-genm-template-0.der"
    if mock.exists():
        msg = M.decode_message(mock.read_bytes()[1:])
        (d / "mockca-rsa2048").write_bytes(M.genp_values(msg["body"].getComponent())[str(A.id_it_certReqTemplate)])

    def content(tpl, key_spec=()):
        c = A.CertReqTemplateContent()
        c["certTemplate"] = tpl
        if key_spec:
            ks = c.setComponentByName("keySpec").getComponentByName("keySpec")
            for i, (oid, value) in enumerate(key_spec):
                atv = ks.componentType.clone()
                atv["type"] = oid
                atv["value"] = A.Any(encoder.encode(value))
                ks.setComponentByPosition(i, atv)
        return A.der_encode(c)

    ec_alg = A.AlgorithmIdentifier()
    ec_alg["algorithm"] = A.univ.ObjectIdentifier("1.2.840.10045.2.1")
    ec_alg["parameters"] = A.Any(encoder.encode(A.univ.ObjectIdentifier("1.2.840.10045.3.1.7")))
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "plant"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "to-be-filled")])
    from tests.fuzz.mutate import _all_nodes, encode_der, parse_der

    def emptied(tpl, old: bytes):
        """``tpl`` with the value whose content is ``old`` made empty (RFC 9483 4.3.3: "ours to fill in")."""
        tree = parse_der(A.der_encode(tpl))
        for node, _, _ in _all_nodes(tree, [], None):
            if node[1] != "c" and encode_der([node])[2 if len(old) < 126 else 4:] == old or node[2] == old:
                node[1], node[2] = "p", b""
        return A.der_decode(encode_der(tree), A.CertTemplate())

    tpl = emptied(M.cert_template(subject), b"to-be-filled")
    (d / "subject-o-fixed-cn-ours-ec").write_bytes(content(tpl, [(A.id_regCtrl_algId, ec_alg)]))
    ku = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                       encipher_only=False, decipher_only=False)
    san = x509.SubjectAlternativeName([x509.DNSName("placeholder")])
    exts = [x509.Extension(x509.oid.ExtensionOID.KEY_USAGE, True, ku),
            x509.Extension(x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME, False, san)]
    tpl = emptied(M.cert_template(None, extensions=exts), san.public_bytes())
    (d / "extensions-ku-fixed-san-ours").write_bytes(content(tpl, [(A.id_regCtrl_rsaKeyLen, A.Integer(2048))]))
    rsa_pub = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    tpl = M.cert_template(None, rsa_pub)
    (d / "publickey-alg-rsa").write_bytes(content(tpl))


def est_headers():
    """Header values EST servers send: Retry-After (delta-seconds, IMF-fixdate), Date (the three forms of RFC
    9110 5.6.7) and Content-Type (certs-only, multipart with a boundary, csrattrs, with parameters and quoting)."""
    d = _dir("est_headers")
    seeds = {"retry-after-seconds": (0, "120"), "retry-after-date": (0, "Wed, 21 Oct 2026 07:28:00 GMT"),
             "date-imf": (1, "Sun, 06 Nov 1994 08:49:37 GMT"), "date-rfc850": (1, "Sunday, 06-Nov-94 08:49:37 GMT"),
             "date-asctime": (1, "Sun Nov  6 08:49:37 1994"),
             "ct-certs-only": (2, "application/pkcs7-mime; smime-type=certs-only"),
             "ct-multipart": (2, 'multipart/mixed; boundary="estServerKeyGenBoundary"'),
             "ct-csrattrs": (2, "application/csrattrs"),
             "ct-rfc2231": (2, "application/pkcs8; name*=utf-8''k%C3%A9y.p8; charset=\"latin-1\"")}
    for name, (sel, value) in seeds.items():
        (d / name).write_bytes(bytes([sel]) + value.encode("latin-1"))


def clm():
    """CLM inventory inputs: ``clm import`` files (CSV with every column, JSON lines with lists and nulls) and an
    ``inventory.json`` as devagent <= 0.1 wrote it (its devices with ISO times)."""
    import json

    d = _dir("clm_import")
    csv_text = ("id,uri,security,subject,san,key_type,name,domain,profile\n"
                "line-1,coap://10.1.0.1:5683,none,CN=line-1,dns:line-1.plant ip:10.1.0.1,p256,ldevid,plant,\n"
                "line-2,coaps://10.1.0.2:5684,auto,\"CN=line-2,O=Plant\",,rsa2048,,plant,tls-client\n")
    (d / "csv-every-column").write_bytes(bytes([1]) + csv_text.encode())
    (d / "csv-auto-replace").write_bytes(bytes([3]) + b"id,uri\nplc-0,coap://10.0.0.9:5683\n")
    rows = [{"id": "robot-1", "uri": "coap://10.2.0.1:5683", "security": "none", "san": ["dns:robot-1.plant"],
             "subject": "CN=robot-1", "key_type": "p384", "domain": "plant"},
            {"id": "robot-2", "uri": "coap://[fd00::2]:5683", "security": "none", "name": None}]
    (d / "jsonl").write_bytes(bytes([2]) + "".join(json.dumps(r) + "\n" for r in rows).encode())
    (d / "jsonl-auto").write_bytes(bytes([0]) + (json.dumps(rows[0]) + "\n\n").encode())
    d = _dir("clm_migrate")
    devices = {}
    for i, op in enumerate((True, False)):
        dev = f"dev{i:04d}"
        devices[dev] = {"id": dev, "uri": f"coap://10.0.0.{i + 1}:5683", "security": "oscore",
                        "context": f"/var/lib/devagent/clm/contexts/{dev}",
                        "state": "operational" if op else "not operational",
                        "not_after": "2027-01-01T00:00:00+00:00" if op else None,
                        "last_error": None if op else "device unreachable", "subject": f"CN={dev}",
                        "san": [f"dns:{dev}.plant"], "key_type": "p256", "name": None, "domain": "plant",
                        "profile": None, "failures": 0 if op else 2, "enrolled_at": "2026-01-01T00:00:00+00:00",
                        "next_renewal": "2026-09-01T00:00:00+00:00" if op else None,
                        "next_attempt": None if op else "2026-01-01T01:00:00+00:00", "serial": "1a" if op else None,
                        "added": "2025-12-01T00:00:00+00:00"}
    (d / "inventory-v0.1").write_bytes(json.dumps({"devices": devices}, indent=1).encode())
    (d / "empty-devices").write_bytes(b'{"devices": {}}')
    (d / "empty-file").write_bytes(b"")


def keystore_index(p):
    """A keystore as devagent writes it (a lab CA's LDevID with its chain and an older version, an imported
    IDevID, trust anchors, a pending key) for the keystore_index target: its files are the context, its
    ``keystore.json`` the seed (and one from an empty keystore)."""
    from agent.lab.ca import LabCA
    from keystore.csr import build_csr, parse_san, parse_subject
    from keystore.store import Keystore

    work = Path(tempfile.mkdtemp(prefix="ks-index-seeds-"))
    try:
        lab = LabCA.create(work / "lab", domains=("plant",))
        ctxd = _dir("keystore_index.context")
        root = ctxd / "keystore"
        ks = Keystore.init(root)
        ks.add_trust_anchors("plant", [lab.domain("plant").root_cert], source="fuzz corpus")
        for _ in range(2):  # two versions of one credential
            uri = ks.generate_key("p256")
            csr = build_csr(ks.private_key(uri), parse_subject("CN=fuzz-device"), [parse_san("dns:fuzz.plant")])
            cert = lab.issue("plant", csr.public_key(), csr.subject)
            ks.store_certificate("ldevid-plant", cert, lab.domain("plant").chain, key_uri=uri, domain="plant")
        idev_key = ec.generate_private_key(ec.SECP256R1())
        idev = lab.issue("plant", idev_key.public_key(), parse_subject("CN=fuzz IDevID,serialNumber=SN1"))
        ks.import_idevid("idevid", idev, lab.domain("plant").chain, private_key=idev_key, source="fuzz corpus")
        ks.generate_key("p256")  # a pending key (no credential yet)
        ks.close()
        (ctxd / "README").write_text("TEST-ONLY keystore for the keystore_index fuzz target (its keystore.json is "
                                     "the input; corpus/keystore_index/ the seeds)\n")
        d = _dir("keystore_index")
        (d / "enrolled").write_bytes((root / "keystore.json").read_bytes())
        empty = work / "empty"
        Keystore.init(empty).close()
        (d / "empty-keystore").write_bytes((empty / "keystore.json").read_bytes())
        (root / "audit.log").write_bytes(b"")
        shutil.rmtree(root / "locks", ignore_errors=True)  # runtime state, made again on use
        (root / ".lock").unlink(missing_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


GROUPS = {"est": lambda p: est(p), "keystore_import": keystore_import, "toml": lambda p: toml_seeds(),
          "coap": coap, "mpy": mpy, "opcua": opcua, "cmp_template": lambda p: cmp_template(),
          "est_headers": lambda p: est_headers(), "clm": lambda p: clm(), "keystore_index": keystore_index}


def main(argv=None) -> int:
    names = list(argv if argv is not None else sys.argv[1:]) or list(GROUPS)
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        raise SystemExit(f"unknown seed group(s) {', '.join(unknown)}; groups: {', '.join(GROUPS)}")
    p = pki()
    for n in names:
        GROUPS[n](p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
