"""The server's certReqTemplate (RFC 9483 4.3.3): decode, apply, and the errors a malformed one gets.

The malformed cases were found by the fuzz suite (tests/fuzz, target cmp_template): they raised a bare ValueError
(an "internal error" in the CLI) instead of a ProtocolError naming the field."""
from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pyasn1.codec.der import encoder

from enroll_clients.base import ProtocolError
from enroll_clients.cmp import asn1 as A
from enroll_clients.cmp import messages as M
from enroll_clients.cmp import template as T

P256 = ec.generate_private_key(ec.SECP256R1())
RSA2048 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
SUBJECT = x509.Name.from_rfc4514_string("CN=dev-1,O=plant")


def content(tpl, key_spec=()) -> bytes:
    c = A.CertReqTemplateContent()
    c["certTemplate"] = tpl
    if key_spec:
        ks = c.setComponentByName("keySpec").getComponentByName("keySpec")
        for i, (oid, value_der) in enumerate(key_spec):
            atv = ks.componentType.clone()
            atv["type"] = oid
            atv["value"] = A.Any(value_der)
            ks.setComponentByPosition(i, atv)
    return A.der_encode(c)


def test_rsa_key_length_template_is_applied_to_an_rsa_key_and_refuses_p256():
    t = T.decode_template(content(A.CertTemplate(), [(A.id_regCtrl_rsaKeyLen, encoder.encode(A.Integer(2048)))]))
    assert t.rsa_key_len == 2048 and T.describe_template(t)["key"] == "RSA-2048"
    assert T.apply_template(t, SUBJECT, (), (), RSA2048)[0] == SUBJECT
    with pytest.raises(T.TemplateMismatchError, match="RSA-2048"):
        T.apply_template(t, SUBJECT, (), (), P256)


@pytest.mark.parametrize("oid,value,match", [
    (A.id_regCtrl_rsaKeyLen, encoder.encode(A.univ.ObjectIdentifier("1.2.3")), r"keySpec\[0\].*malformed"),
    (A.id_regCtrl_algId, encoder.encode(A.Integer(5)), r"keySpec\[0\].*malformed"),
    (A.id_regCtrl_rsaKeyLen, encoder.encode(A.Integer(0)), "rsaKeyLen 0 is not a key length"),
])
def test_malformed_key_spec_is_a_protocol_error(oid, value, match):
    with pytest.raises(ProtocolError, match=match):
        T.decode_template(content(A.CertTemplate(), [(oid, value)]))


def test_fixed_subject_value_that_cannot_be_requested_is_a_protocol_error():
    """The template fixes CN to 69 characters (X.520 allows 64): named, not a ValueError from cryptography."""
    t = T.Template(subject=(("2.5.4.3", "z" * 69),), extensions=(), key_alg=None, rsa_key_len=None)
    with pytest.raises(ProtocolError, match="subject attribute 2.5.4.3"):
        T.apply_template(t, SUBJECT, (), (), P256)
