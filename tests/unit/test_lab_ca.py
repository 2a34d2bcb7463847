"""The lab CA's rollover: each generation gets its own name, every earlier generation stays on disk, and the link
certificates chain the previous root to the new one (what the daemon's rollover scenarios rely on)."""
from __future__ import annotations

from cryptography import x509

from agent.lab.ca import LabCA


def _cn(cert):
    return cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value


def test_rollover_generations(tmp_path):
    lab = LabCA.create(tmp_path / "lab")
    g1 = lab.domain("plant")
    g2 = lab.rollover("plant")
    g3 = lab.rollover("plant")
    assert [_cn(g2.root_cert)[-2:], _cn(g3.root_cert)[-2:], _cn(g3.ca_cert)[-2:]] == ["G2", "G3", "G3"]
    assert len({g1.root_cert.subject, g2.root_cert.subject, g3.root_cert.subject}) == 3

    def load(rel):
        return x509.load_pem_x509_certificate((tmp_path / "lab/plant" / rel).read_bytes())

    assert load("generations/G1/root.pem") == g1.root_cert
    assert load("generations/G2/root.pem") == g2.root_cert
    assert load("old/root.pem") == g2.root_cert  # old/ is always the previous generation
    # newWithOld of the latest rollover: the G3 root key certified by the G2 root.
    g3.new_with_old.verify_directly_issued_by(g2.root_cert)
    assert g3.new_with_old.public_key() == g3.root_cert.public_key()
    g3.old_with_new.verify_directly_issued_by(g3.root_cert)  # oldWithNew: the other way round
    assert g3.old_with_new.public_key() == g2.root_cert.public_key()
    assert LabCA(tmp_path / "lab").rollover("plant").root_cert.subject != g3.root_cert.subject  # survives reopen
