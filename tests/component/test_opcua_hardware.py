"""CreateSigningRequest with the key in hardware: SoftHSM2 (PKCS#11) and swtpm (TPM 2.0) as key backends of
``devagent opcua serve``. The key never leaves the token: the CSR is signed there, the pushed certificate is
stored for it, and the PKI directory gets the certificate but no key file."""
from __future__ import annotations

import asyncio

import pytest

from keystore.backends import scheme_of
from keystore.store import Keystore
from tests.component.test_opcua_push import openssl_verify
from tests.peers.opcua import DOMAIN, device, gds_client, make_world
from tests.peers.pkcs11 import softhsm  # noqa: F401  (session fixture)
from tests.peers.tpm import swtpm  # noqa: F401  (session fixture)


@pytest.mark.parametrize("backend", ["pkcs11", "tpm"])
def test_csr_key_in_hardware(tmp_path, lab, backend, request):
    if backend == "tpm":
        tpm = request.getfixturevalue("swtpm")
        tpm.flush_all()
        options = {"tpm": dict(tpm.options)}
    else:
        options = {"pkcs11": dict(request.getfixturevalue("softhsm").options)}
    w = make_world(tmp_path / "w", lab)

    async def scenario():
        async with device(w):  # first start with software keys: the channel's bootstrap RSA key
            pass
        w.ks = Keystore.open(w.state, backend_options=options)
        async with device(w, key_backend=backend) as srv:
            async with gds_client(w, srv) as c:
                csr = await c.create_signing_request("p256", "CN=dev1,O=Plant")
                cert = lab.issue_from_csr(DOMAIN, csr, "opcua")
                await c.update_certificate(cert, [lab.domain(DOMAIN).ca_cert], key_type="p256")
                await c.apply_changes()
            return cert

    cert = asyncio.run(asyncio.wait_for(scenario(), 120))
    cred = w.ks.get("opcua-p256")
    assert cred.certificate == cert and scheme_of(cred.key_uri) == {"pkcs11": "pkcs11", "tpm": "tpm"}[backend]
    assert (w.pki / "own/certs/opcua-p256.der").exists()
    assert not (w.pki / "own/private/opcua-p256.pem").exists()  # a hardware key is used in place
    openssl_verify(tmp_path, cert, [lab.domain(DOMAIN).root_cert], [lab.domain(DOMAIN).ca_cert])
    w.ks.delete("opcua-p256")  # the session token/TPM is shared: leave nothing behind
    for k in w.ks.pending_keys():
        if scheme_of(k["uri"]) != "file":
            w.ks.discard_key(k["uri"])
    w.ks.close()
