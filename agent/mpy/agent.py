"""The board's identity lifecycle, independent of transport.

Invariants:
- The private key never leaves the board; only CSRs (signed by it) do.
- Verify before store: a certificate is stored only after it chains to the trust anchor, carries our
  pending public key and (when the clock is known to be set) is within its validity. On any failure
  nothing is written and the live credential is unchanged.
- A CSR request reuses the pending key unless a new one is asked for, so a retried enrollment does not
  burn flash or orphan keys.
"""
from . import compat, csr, x509
from .ecdsa import PrivateKey
from .errors import BadInput, Untrusted, WrongKey

CF_PKCS7_CERTS = 281
CF_PKCS10 = 286
CF_PKIX_CERT = 287
CLOCK_MIN_YEAR = 2024


def load_config(path):
    """JSON config written by deploy; {} if absent."""
    import json

    try:
        with open(path) as f:
            cfg = json.load(f)
    except OSError:
        return {}
    except ValueError:
        raise BadInput("config %s is not valid JSON" % path) from None
    if not isinstance(cfg, dict):
        raise BadInput("config %s must be a JSON object" % path)
    return cfg


class Agent:
    """Args: store (``store.Store``), config dict (device_id, cn, serial, sans, clock: auto|set|unset)."""

    def __init__(self, store, config=None):
        self.store = store
        self.config = config or {}
        self._pending = None

    def clock_known(self):
        mode = self.config.get("clock", "auto")
        if mode == "set":
            return True
        if mode == "unset":
            return False
        return compat.utc_now()[0] >= CLOCK_MIN_YEAR

    def trust_anchor(self):
        b = self.store.get("ca")
        return x509.Certificate(b) if b else None

    def set_trust_anchor(self, data, replace=False):
        """Install the CA certificate (trust on first use unless replace, which deploy uses)."""
        cert = x509.Certificate(data)
        cur = self.store.get("ca")
        if cur == cert.der:
            return False
        if cur and not replace:
            raise Untrusted("a different trust anchor is already installed")
        if cert.is_ca is not True:
            raise Untrusted("trust anchor must be a CA certificate")
        self.store.put("ca", cert.der)
        return True

    def pending_key(self):
        if self._pending is None:
            b = self.store.get("pending")
            if b:
                try:
                    self._pending = csr.key_from_der(b)
                except ValueError:
                    self._pending = None  # unreadable: a new key will be made
        return self._pending

    def make_csr(self, cn=None, serial=None, sans=None, new_key=False):
        """DER PKCS#10 for the pending key (generated and stored first if needed)."""
        cfg = self.config
        cn = cn or cfg.get("cn") or cfg.get("device_id")
        serial = serial or cfg.get("serial")
        sans = sans if sans is not None else cfg.get("sans", ())
        if not cn and not serial:
            raise BadInput("CSR needs a subject CN or serialNumber")
        key = None if new_key else self.pending_key()
        if key is None:
            key = PrivateKey.generate()
            self.store.put("pending", csr.key_to_der(key))
            self._pending = key
        try:
            return csr.build(key, cn=cn, serial=serial, sans=sans)
        except ValueError as e:
            raise BadInput("CSR: %s" % e) from None

    def install(self, data, content_format=None):
        """Verify a DER certificate (287) or certs-only PKCS#7 (281) and make it live.

        Returns:
            dict with gen, cn, not_after.
        Raises:
            BadInput, Untrusted, WrongKey, Unsupported; nothing is stored on any of them.
        """
        data = bytes(data)
        if content_format is None:
            content_format = CF_PKCS7_CERTS if x509.is_pkcs7(data) else CF_PKIX_CERT
        if content_format == CF_PKCS7_CERTS:
            certs = x509.certs_from_pkcs7(data)
        elif content_format == CF_PKIX_CERT:
            certs = [data]
        else:
            from .errors import Unsupported

            raise Unsupported("content format %s is not a certificate" % content_format)
        anchor = self.trust_anchor()
        if anchor is None:
            raise Untrusted("no trust anchor installed")
        key = self.pending_key()
        if key is None:
            raise WrongKey("no pending key: request a CSR first")
        now = compat.utc_now() if self.clock_known() else None
        leaf = x509.verify_for_key(certs, anchor, key.public, now)
        gen = self.store.put_credential(csr.key_to_der(key), leaf.der)
        self.store.delete("pending")
        self._pending = None
        return {"gen": gen, "cn": leaf.common_name(), "not_after": "%04d-%02d-%02dT%02d:%02d:%02dZ" % leaf.not_after}

    def status(self):
        cred = self.store.credential()
        out = {"device_id": self.config.get("device_id", ""), "has_ca": self.store.latest("ca") > 0,
               "pending": self.store.latest("pending") > 0, "gen": cred[0] if cred else 0}
        if cred:
            try:
                c = x509.Certificate(cred[2])
                out["cn"] = c.common_name()
                out["not_after"] = "%04d-%02d-%02dT%02d:%02d:%02dZ" % c.not_after
            except BadInput:
                out["cn"] = ""
        return out

    def credential(self):
        """(PrivateKey, cert DER) of the live credential, or None."""
        cred = self.store.credential()
        if not cred:
            return None
        return csr.key_from_der(cred[1]), cred[2]
