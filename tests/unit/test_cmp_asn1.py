"""enroll_clients.cmp.asn1 (own types) against pyasn1-modules' (tests/unit/cmp_asn1_oracle.py, the definitions
used up to session 16): the same messages decode, re-encode byte for byte and name every part the same.

Messages: every CMP response in the fuzz corpus (OpenSSL's mock server and the Siemens MockCA, recorded by
tests/fuzz/record_*_seeds.py, and the regressions), every request our client sends while the cmp_client seeds
replay, and deterministic mutants of all of them (tests/fuzz/mutate.py). Where the two differ by design --
certificates, CRLs, CSRs and the bodies the client never reads are opaque here, so a mutant broken *inside* one
of them decodes here and is refused later by ``cryptography`` -- the test says so and checks that direction only.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pyasn1.type import univ

from enroll_clients.cmp import asn1 as A
from tests.fuzz import cmp_target, mutate
from tests.unit import cmp_asn1_oracle as O

CORPUS = Path(cmp_target.__file__).resolve().parent / "corpus"
REGRESSIONS = Path(cmp_target.__file__).resolve().parent / "regressions"
MUTANTS_PER_MESSAGE = 20


def _decode(mod, der: bytes):
    """The PKIMessage as ``messages.decode_message`` accepts it (DER that re-encodes to itself), or None."""
    try:
        value = mod.der_decode(der, mod.PKIMessage())
        return value if mod.der_encode(value) == der else None
    except Exception:  # noqa: BLE001 - ValueError from der_decode, PyAsn1Error from an encoding that fails
        return None


def _opaque(value) -> bool:
    return isinstance(value, (A._Opaque, A._Shallow)) or type(value) is univ.Any


def _same_parts(new, old, path: str = "PKIMessage") -> int:
    """Walk ``new`` (our types) next to ``old`` (the oracle's) down to our opaque leaves: the same DER at every
    node, the same component names, the same CHOICE alternatives. Returns the number of nodes compared."""
    assert A.der_encode(new) == O.der_encode(old), f"{path}: different DER"
    if _opaque(new):
        return 1
    n = 1
    if isinstance(new, univ.Choice):
        assert new.getName() == old.getName(), f"{path}: alternative {new.getName()!r} vs {old.getName()!r}"
        return n + _same_parts(new.getComponent(), old.getComponent(), f"{path}.{new.getName()}")
    if isinstance(new, (univ.Sequence, univ.Set)):
        for name in new.componentType:
            mine = new.getComponentByName(name, instantiate=False)
            theirs = old.getComponentByName(name, instantiate=False)
            has = mine is not univ.noValue and mine.isValue
            assert has == (theirs is not univ.noValue and theirs.isValue), f"{path}.{name}: present in one only"
            if has:
                n += _same_parts(mine, theirs, f"{path}.{name}")
        return n
    if isinstance(new, (univ.SequenceOf, univ.SetOf)):
        assert len(new) == len(old), f"{path}: {len(new)} vs {len(old)} elements"
        return n + sum(_same_parts(a, b, f"{path}[{i}]") for i, (a, b) in enumerate(zip(new, old, strict=True)))
    return n


def _responses() -> dict[str, bytes]:
    out = {}
    for f in sorted((CORPUS / "cmp_accept").iterdir()):
        out[f"cmp_accept/{f.name}"] = f.read_bytes()[1:]
    for f in sorted((CORPUS / "cmp_client").iterdir()):
        for i, frame in enumerate(cmp_target._frames(f.read_bytes()[1:])):
            out[f"cmp_client/{f.name}#{i}"] = frame
    for d in ("cmp_accept",):
        for f in sorted((REGRESSIONS / d).iterdir()) if (REGRESSIONS / d).is_dir() else ():
            out[f"regressions/{d}/{f.name}"] = f.read_bytes()[1:]
    return out


@pytest.fixture(scope="module")
def messages() -> dict[str, bytes]:
    """The recorded responses, plus each request the client sends (and the re-protected response it gets) while
    every cmp_client seed replays (``cmp_target.cmp_client``'s ``observe``)."""
    out = _responses()
    for f in sorted((CORPUS / "cmp_client").iterdir()):
        seen: list[tuple[bytes, bytes]] = []
        try:
            cmp_target.cmp_client(f.read_bytes(), observe=lambda req, ans, seen=seen: seen.append((req, ans)))
        except Exception:  # noqa: BLE001 - some seeds end in an error on purpose; their messages still count
            pass
        for i, (req, ans) in enumerate(seen):
            out[f"cmp_client/{f.name} request #{i}"] = req
            if ans:
                out[f"cmp_client/{f.name} reprotected #{i}"] = ans
    cmp_target.close()
    return out


def test_corpus_is_broad(messages):
    """The comparison covers requests and responses of every body type the client sends or reads."""
    bodies = set()
    for der in messages.values():
        v = _decode(A, der)
        if v is not None:
            bodies.add(v["body"].getName())
    missing = {"ir", "cr", "p10cr", "kur", "rr", "genm", "certConf", "ip", "cp", "kup", "rp", "genp", "pkiconf",
               "error"} - bodies
    assert not missing, f"no message with body {sorted(missing)} in the corpus: {len(messages)} messages"


def test_same_decoding_as_pyasn1_modules(messages):
    compared = 0
    for where, der in messages.items():
        new, old = _decode(A, der), _decode(O, der)
        assert (new is None) == (old is None), f"{where}: decodes with {'ours' if old is None else 'the oracle'} only"
        if new is not None:
            assert A.der_encode(new) == der, f"{where}: does not re-encode to the bytes received"
            compared += _same_parts(new, old)
    assert compared > 2_000, compared


def test_mutants_decode_at_least_as_the_oracle(messages):
    """A mutant the oracle decodes decodes here to the same parts. A mutant only we decode must differ from a
    message the oracle decodes only inside an opaque part (a certificate, CSR or unused body), which
    ``cryptography`` or the body-type check refuses later: that is checked by decoding it with the oracle after
    putting a valid certificate, CSR or CRL in place of every opaque one (the result must decode)."""
    pool = list(messages.values())
    both = ours_only = 0
    for n, (where, der) in enumerate(messages.items()):
        if _decode(A, der) is None:
            continue
        rng = mutate.Rng(n + 1)
        for k in range(MUTANTS_PER_MESSAGE):
            m = mutate.mutate(rng, der, pool[n % len(pool):n % len(pool) + 3])
            new, old = _decode(A, m), _decode(O, m)
            if old is not None:
                assert new is not None, f"{where} mutant {k}: the oracle decodes it, we do not: {m.hex()}"
                _same_parts(new, old)
                both += 1
            elif new is not None:
                ours_only += 1
                assert _only_opaque_differs(new), f"{where} mutant {k}: only we decode it: {m.hex()}"
    assert both > 100, (both, ours_only)


def _only_opaque_differs(new) -> bool:
    """True if what the oracle refuses in ``new`` lies inside our opaque parts: with every certificate, CSR and
    CRL replaced by a valid one, the oracle decodes the message. A message holding an opaque body or field
    (popdecc ... nested, encryptedCert, privateKey, publicationInfo, x400Address, ediPartyName) counts too: the
    client refuses those bodies by type and never reads those fields."""
    opaque_field = [False]

    def walk(v):
        if isinstance(v, (univ.Sequence, univ.Set, univ.Choice)):
            positions = range(len(v.componentType))
        elif isinstance(v, (univ.SequenceOf, univ.SetOf)):
            positions = range(len(v))
        else:
            return
        for i in positions:
            c = v.getComponentByPosition(i, instantiate=False)
            if c is None or c is univ.noValue or not c.isValue:
                continue
            if isinstance(c, A._Shallow):
                fresh = c.clone()
                for j, e in enumerate(_valid(type(c))):
                    fresh.setComponentByPosition(j, e)
                v.setComponentByPosition(i, fresh)
            elif isinstance(c, A._Opaque):
                opaque_field[0] = True
            else:
                walk(c)

    walk(new)
    return opaque_field[0] or _decode(O, A.der_encode(new)) is not None


_VALID: dict = {}


def _valid(kind):
    """A valid certificate, CSR or CRL (by our opaque type) as our shallow value."""
    if not _VALID:
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import Encoding

        root = x509.load_pem_x509_certificate((CORPUS / "cmp.context" / "root.pem").read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name.from_rfc4514_string("CN=oracle")
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        now = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
        crl = (x509.CertificateRevocationListBuilder().issuer_name(name).last_update(now)
               .next_update(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
        for t, obj in ((A.CMPCertificate, root), (A.CertificationRequest, csr), (A.CertificateList, crl)):
            _VALID[t] = A.der_decode(obj.public_bytes(Encoding.DER), t())
    return _VALID[kind]


def test_enrollment_imports_no_module_library():
    """Decoding responses and building requests (the enroll path's CMP codec) loads neither pyasn1-modules nor
    pyasn1-alt-modules: only pyasn1's type system and DER codec."""
    code = (
        "import sys; from pathlib import Path; import agent.cli, enroll_clients.cmp.client; "
        "from enroll_clients.cmp import messages as M; from cryptography import x509; "
        "from cryptography.hazmat.primitives.asymmetric import ec; "
        f"corpus = Path({str(CORPUS / 'cmp_accept')!r}); "
        "[M.decode_message(f.read_bytes()[1:]) for f in sorted(corpus.iterdir()) if f.suffix == '.der'"
        " and not f.name.startswith(('garbage', 'trunc'))]; "
        "k = ec.generate_private_key(ec.SECP256R1()); n = x509.Name.from_rfc4514_string('CN=x'); "
        "M.cert_req_messages(M.cert_template(n, k.public_key()), k); "
        "bad = sorted(m for m in sys.modules if m.startswith(('pyasn1_modules', 'pyasn1_alt_modules'))); "
        "print(bad); assert not bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
