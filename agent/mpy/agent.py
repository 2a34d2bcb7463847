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
from .errors import BadInput, Conflict, Untrusted

CF_PKCS7_CERTS = 281
CF_PKCS10 = 286
CF_PKIX_CERT = 287
CLOCK_MIN_YEAR = 2024
DEFAULT_NAME = "ldevid"  # the board holds one credential; its name in /verify answers
# The /csr request schema shared with `devagent serve` (docs/coap.md); limits as there.
CSR_FIELDS = ("subject", "san", "key_type", "name", "domain", "profile", "ca")
MAX_TEXT = 512
MAX_SAN = 16
MAX_CA_CERTS = 4
MAX_CERT_BYTES = 4096
SAN_KINDS = ("dns", "ip", "uri", "email")
# RFC 4514 attribute types the board can put in a subject (and the OIDs it accepts for them).
SUBJECT_TYPES = {"cn": x509.OID_CN, "commonname": x509.OID_CN, "2.5.4.3": x509.OID_CN,
                 "serialnumber": csr.OID_SERIAL_NUMBER, "2.5.4.5": csr.OID_SERIAL_NUMBER}
_NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"


def _short(v, n=40):
    v = str(v)
    return v if len(v) <= n else v[:n] + "..."


def _rdn_value(s, i):
    """Read one RFC 4514 attribute value starting at s[i]; returns (value, index of the ',' / '+' / end)."""
    if s[i:i + 1] == "#":
        raise BadInput("subject: hex-encoded (#...) values are not supported", "bad-subject")
    out = bytearray()  # escapes \\XX spell UTF-8 bytes, so collect bytes and decode once
    while i < len(s):
        c = s[i]
        if c in ",+":
            break
        if c == "\\":
            nxt = s[i + 1:i + 2]
            if nxt and nxt in ',+"\\<>;= #':
                out += nxt.encode()
                i += 2
                continue
            h = s[i + 1:i + 3]
            try:
                if len(h) != 2:
                    raise ValueError
                out.append(int(h, 16))
            except ValueError:
                raise BadInput("subject: bad escape at position %d" % i, "bad-subject") from None
            i += 3
            continue
        if c in '"<>;':
            raise BadInput("subject: character %r must be escaped" % c, "bad-subject")
        out += c.encode()
        i += 1
    try:
        return bytes(out).decode().strip(), i
    except UnicodeError:
        raise BadInput("subject: escaped bytes are not UTF-8", "bad-subject") from None


def parse_subject(dn):
    """An RFC 4514 DN ("CN=pump-7,serialNumber=SN7") or a bare common name -> [(oid, value)] in ASN.1 order
    (RFC 4514 writes the last RDN first). Only CN and serialNumber: a board has no use for more, and
    refusing is better than silently dropping an attribute the CLM asked for.

    Raises:
        BadInput (reason ``bad-subject``) naming what is wrong.
    """
    dn = dn.strip()
    if not dn:
        raise BadInput("subject is empty", "bad-subject")
    if "=" not in dn:
        return [(x509.OID_CN, dn)]
    rdns = []
    i = 0
    while i <= len(dn):
        eq = dn.find("=", i)
        if eq < 0:
            raise BadInput("subject: expected TYPE=VALUE after position %d" % i, "bad-subject")
        typ = dn[i:eq].strip()
        oid = SUBJECT_TYPES.get(typ.lower())
        if oid is None:
            raise BadInput("subject attribute %s is not supported by this board (CN and serialNumber only)"
                           % _short(typ, 20), "bad-subject")
        val, i = _rdn_value(dn, eq + 1)
        if not val:
            raise BadInput("subject: empty value for %s" % typ, "bad-subject")
        if len(rdns) >= 4:
            raise BadInput("subject: too many attributes", "bad-subject")
        rdns.append((oid, val))
        if i >= len(dn):
            break
        if dn[i] == "+":
            raise BadInput("subject: multi-valued RDNs (+) are not supported by this board", "bad-subject")
        i += 1  # past ","
    rdns.reverse()
    return rdns


def check_san(s):
    """One SAN entry of the shared schema ("dns:NAME", "ip:A.B.C.D", "uri:URI", "email:ADDR")."""
    kind, sep, val = s.partition(":")
    if not sep or not val or kind.lower() not in SAN_KINDS:
        raise BadInput("SAN entry %r is malformed; use dns:NAME, ip:ADDR, uri:URI or email:ADDR" % _short(s),
                       "bad-san")
    if kind.lower() == "ip":
        parts = val.split(".")
        if len(parts) != 4 or not all(p.isdigit() and len(p) <= 3 and int(p) < 256 for p in parts):
            raise BadInput("SAN %r: this board supports IPv4 addresses only" % _short(s), "bad-san")
    try:
        val.encode().decode("ascii")
    except UnicodeError:
        raise BadInput("SAN entry %r is not ASCII" % _short(s), "bad-san") from None
    return kind.lower() + ":" + val


def epoch_seconds(t):
    """(Y, M, D, h, m, s) UTC -> seconds since 1970 (no dependency on the port's time epoch)."""
    y, m, d, hh, mm, ss = t
    y -= m <= 2
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    days = era * 146097 + doe - 719468
    return days * 86400 + hh * 3600 + mm * 60 + ss


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

    def credential_name(self):
        return self.config.get("name") or DEFAULT_NAME

    def csr_request(self, req):
        """The shared /csr request (a dict with the keys of ``CSR_FIELDS``, docs/coap.md) -> DER PKCS#10.

        Absent fields take the board's defaults (config.json). ``profile`` is for the CLM and ignored.
        ``ca``: the CA certificates the CLM expects; the verified path must later pass through one of them.

        Raises:
            BadInput 4.00 (schema, bad-subject, bad-san, unknown-key-type, bad-name, malformed-ca),
            Conflict 4.09 (no-trust-anchor). Nothing is stored on any of them.
        """
        if not isinstance(req, dict):
            raise BadInput("POST /csr: expected a CBOR map", "schema")
        unknown = [str(k) for k in req if k not in CSR_FIELDS]
        if unknown:
            unknown.sort()
            raise BadInput("POST /csr: unknown field(s) %s" % _short(", ".join(unknown), 100), "schema")
        for f in ("subject", "key_type", "name", "domain", "profile"):
            v = req.get(f)
            if f in req and (not isinstance(v, str) or not v or len(v) > MAX_TEXT):
                raise BadInput("POST /csr: %r must be a non-empty text string of at most %d characters"
                               % (f, MAX_TEXT), "schema")
        kt = req.get("key_type")
        if kt is not None and kt != "p256":
            raise BadInput("key type %r is not supported by this board (p256 only)" % _short(kt, 20),
                           "unknown-key-type")
        name = req.get("name")
        if name is not None and name != self.credential_name():
            raise BadInput("credential name %r: this board holds one credential, named %r"
                           % (_short(name, 20), self.credential_name()), "bad-name")
        domain = req.get("domain")
        if domain is not None:
            if len(domain) > 64 or [c for c in domain if c not in _NAME_CHARS]:
                raise BadInput("domain must be 1-64 letters, digits, '.', '_' or '-'", "bad-name")
            mine = self.config.get("domain")
            if mine and mine != domain:
                raise Conflict("the board has a trust anchor for domain %s only, not %s" % (mine, domain),
                               "no-trust-anchor")
        san = req.get("san")
        if san is not None:
            if not isinstance(san, list) or len(san) > MAX_SAN or not all(
                    isinstance(x, str) and 0 < len(x) <= MAX_TEXT for x in san):
                raise BadInput("POST /csr: 'san' must be an array of at most %d text strings like "
                               "\"dns:dev1.plant\" or \"ip:10.0.0.5\"" % MAX_SAN, "schema")
            san = [check_san(x) for x in san]
        ca = req.get("ca")
        fps = b""
        if ca is not None:
            if not isinstance(ca, list) or len(ca) > MAX_CA_CERTS or not all(
                    isinstance(c, (bytes, bytearray)) and 0 < len(c) <= MAX_CERT_BYTES for c in ca):
                raise BadInput("POST /csr: 'ca' must be an array of at most %d DER certificates (byte strings "
                               "of at most %d bytes)" % (MAX_CA_CERTS, MAX_CERT_BYTES), "schema")
            for i, c in enumerate(ca):
                try:
                    cert = x509.Certificate(bytes(c))
                except BadInput:
                    raise BadInput("'ca' entry %d is not a DER CA certificate" % i, "malformed-ca") from None
                if cert.is_ca is not True:
                    raise BadInput("'ca' entry %d is not a CA certificate" % i, "malformed-ca")
                fps += cert.fingerprint()
        rdns = parse_subject(req["subject"]) if "subject" in req else None
        if self.trust_anchor() is None:
            raise Conflict("the board has no trust anchor%s: install one (devagent mpy deploy --ca-cert)"
                           % (" for domain " + domain if domain else ""), "no-trust-anchor")
        der_csr = self.make_csr(sans=san, rdns=rdns)
        if fps:
            self.store.put("pendca", fps)
        elif self.store.latest("pendca"):
            self.store.delete("pendca")
        return der_csr

    def make_csr(self, cn=None, serial=None, sans=None, new_key=False, rdns=None):
        """DER PKCS#10 for the pending key (generated and stored first if needed)."""
        cfg = self.config
        if rdns is None:
            cn = cn or cfg.get("cn") or cfg.get("device_id")
            serial = serial or cfg.get("serial")
        sans = sans if sans is not None else cfg.get("sans", ())
        if rdns is None and not cn and not serial:
            raise BadInput("CSR needs a subject CN or serialNumber", "bad-subject")
        key = None if new_key else self.pending_key()
        if key is None:
            key = PrivateKey.generate()
            self.store.put("pending", csr.key_to_der(key))
            self._pending = key
        try:
            return csr.build(key, cn=cn, serial=serial, sans=sans, rdns=rdns)
        except ValueError as e:
            raise BadInput("CSR: %s" % e, "bad-subject") from None

    def install(self, data, content_format=None):
        """Verify a DER certificate (287) or certs-only PKCS#7 (281) and make it live.

        Returns:
            dict with gen, cn, not_after (ISO text), and name (credential name), not_after_s (Unix time).
        Raises:
            BadInput, Untrusted (incl. WrongKey), Conflict, Unsupported; nothing is stored on any of them.
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
            raise Conflict("no trust anchor installed", "no-trust-anchor")
        key = self.pending_key()
        if key is None:
            raise Conflict("no pending key: request a CSR first", "no-pending-key")
        now = compat.utc_now() if self.clock_known() else None
        path = []
        leaf = x509.verify_for_key(certs, anchor, key.public, now, path)
        fps = self.store.get("pendca")
        if fps:
            want = [fps[i:i + 32] for i in range(0, len(fps), 32)]
            if not [c for c in path[1:] if c.fingerprint() in want]:
                raise Untrusted("the certificate does not chain through the CA certificate(s) announced in the "
                                "CSR request", "unexpected-ca")
        gen = self.store.put_credential(csr.key_to_der(key), leaf.der)
        self.store.delete("pending")
        if fps:
            self.store.delete("pendca")
        self._pending = None
        return {"gen": gen, "cn": leaf.common_name(), "name": self.credential_name(),
                "not_after": "%04d-%02d-%02dT%02d:%02d:%02dZ" % leaf.not_after,
                "not_after_s": epoch_seconds(leaf.not_after)}

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
