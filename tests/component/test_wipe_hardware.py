"""Keystore.wipe with hardware keys (swtpm, SoftHSM2): keys devagent created are destroyed in the device (TPM
persistent handles evicted, blobs securely deleted, PKCS#11 objects destroyed); keys it only registered (a
manufacturer's key at a persistent handle or on a token) are forgotten and stay where they are."""
from __future__ import annotations

from keystore.store import Keystore
from tests.peers.pkcs11 import pkcs11_options, softhsm  # noqa: F401  (fixtures)
from tests.peers.tpm import swtpm, tpm_options  # noqa: F401  (fixtures)

MFG_HANDLE = 0x81010011


def test_wipe_destroys_what_devagent_created_and_forgets_the_rest(tmp_path, swtpm, softhsm):  # noqa: F811
    swtpm.flush_all()
    opts = {"tpm": dict(swtpm.options, persist="handle", handle_base="0x81100000"), "pkcs11": dict(softhsm.options)}
    ks = Keystore.init(tmp_path / "ks", backend_options=opts)
    blob_ks = Keystore.init(tmp_path / "blob", backend_options={"tpm": dict(swtpm.options)})
    swtpm.make_persistent_key(MFG_HANDLE, "p256")
    ext_p11 = None
    try:
        tpm_uri = ks.generate_key("p256", backend="tpm", label="ours-tpm")
        p11_uri = ks.generate_key("p256", backend="pkcs11", label="ours-p11")
        ext_p11 = ks.backend("pkcs11").generate("p256", "mfg-p11")  # made on the token by someone else
        ks.register_key(ext_p11, label="mfg-p11", state="active")
        ks.register_key(f"tpm:handle/0x{MFG_HANDLE:08x}", label="mfg-tpm", state="active")
        assert 0x81100000 in swtpm.persistent_handles()
        objects_before = softhsm.objects()

        report = ks.wipe(include_idevid=True, reason="test")
        assert sorted(report["keys_destroyed"]) == sorted([tpm_uri, p11_uri])
        assert sorted(report["keys_forgotten"]) == sorted([ext_p11, f"tpm:handle/0x{MFG_HANDLE:08x}"])
        assert 0x81100000 not in swtpm.persistent_handles()  # evicted
        assert MFG_HANDLE in swtpm.persistent_handles()  # not ours: kept
        gone = set(objects_before) - set(softhsm.objects())
        assert gone and all("ours-p11" in label or "ours" in label for _, label in gone), gone
        assert any("mfg-p11" in label for _, label in softhsm.objects())  # not ours: kept
        assert [p.name for p in (tmp_path / "ks").iterdir()] == ["audit.log"]

        blob_uri = blob_ks.generate_key("p256", backend="tpm")
        blob = tmp_path / "blob" / "tpm" / (blob_uri.split("/")[-1] + ".tss")
        assert blob.exists()
        blob_ks.wipe(include_idevid=True)
        assert not blob.exists() and [p.name for p in (tmp_path / "blob").iterdir()] == ["audit.log"]
    finally:
        ks.close()
        blob_ks.close()
        swtpm.evict_persistent(0x81100000)
        swtpm.evict_persistent(MFG_HANDLE)
        if ext_p11:
            cleanup = Keystore(tmp_path / "cleanup", backend_options=opts)
            cleanup.backend("pkcs11").delete(ext_p11)
            cleanup.close()
