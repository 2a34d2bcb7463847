"""CoAP over UDP (RFC 7252) with the /csr and /verify resources of ``devagent serve``, requests
authenticated by HMAC-SHA256.

Resources and payloads are the shared schema of docs/coap.md (one CLM drives both agents):
    POST /csr     CBOR {? subject, ? san, ? key_type, ? name, ? domain, ? profile, ? ca}
                  -> 2.04, content-format 286, DER PKCS#10 (``agent.Agent.csr_request`` checks the fields)
    POST /verify  DER certificate (287) or certs-only PKCS#7 (281)
                  -> 2.04 CBOR {"stored", "version", "not_after", "verify_us"}
    errors        4.xx/5.xx, content-format 60, CBOR {"error": reason, "message": text}
The board's own processing time travels in the elective response option TIMING_OPTION (65000, uint
microseconds), as with ``devagent serve``.
Authentication (see README.md "CoAP + HMAC"): option AUTH_OPTION (65003: critical, unsafe, experimental
range) = 0x01 || counter (8 bytes) || tag (32 bytes), where
    tag = HMAC-SHA256(K_req, "DA1q" || code || lp(device_id) || lp(path) || lp(cf) || counter || lp(payload))
with K_req = HMAC(secret, "devagent-coap-v1 request") and lp(x) = 4-byte length || x. The counter must
exceed the last accepted one, which is persisted before the request is processed (replay protection
across reboots). Responses carry 0x01 || counter || HMAC(K_rsp, "DA1r" || code || counter || request tag
|| lp(cf) || lp(payload)), binding each response to its request.
A request travels in one datagram of at most MAX_DATAGRAM bytes: the board does not do block-wise
transfer (a Block1/Block2 option gets 4.02, a larger datagram 4.13).
"""
from . import cbor, compat
from .errors import AgentError, BadInput, BadOption, TooLarge, Unauthorized, Unsupported
from .hmac256 import hmac_sha256

AUTH_OPTION = 65003
TIMING_OPTION = 65000
OPT_URI_PATH = 11
OPT_CONTENT_FORMAT = 12
CF_TEXT = 0
CF_CBOR = 60
CON, NON, ACK, RST = 0, 1, 2, 3
POST = 2
AUTH_VERSION = 1
MAX_DATAGRAM = 4096
# Options the board understands; any other critical (odd) option in a request is refused with 4.02.
KNOWN_OPTIONS = (3, 7, OPT_URI_PATH, OPT_CONTENT_FORMAT, 14, 17, 60, AUTH_OPTION)  # Uri-Host/Port, Max-Age, Accept, Size1


def code(s):
    c, d = s.split(".")
    return (int(c) << 5) | int(d)


def code_str(c):
    return "%d.%02d" % (c >> 5, c & 31)


class Message:
    def __init__(self, mtype=CON, code_=POST, mid=0, token=b"", options=None, payload=b""):
        self.type = mtype
        self.code = code_
        self.mid = mid
        self.token = token
        self.options = options or []  # list of (number, bytes), any order
        self.payload = payload

    def opt(self, number):
        return [v for n, v in self.options if n == number]

    def path(self):
        try:
            return "/".join(v.decode() for v in self.opt(OPT_URI_PATH))
        except UnicodeError:
            raise BadInput("Uri-Path is not UTF-8") from None

    def content_format(self):
        v = self.opt(OPT_CONTENT_FORMAT)
        return compat.int_from_bytes(v[0]) if v and v[0] else (0 if v else None)


def _uint(n):
    if n == 0:
        return b""
    return compat.int_to_bytes(n, (compat.bit_length(n) + 7) // 8)


def _ext(v):
    if v < 13:
        return v, b""
    if v < 269:
        return 13, bytes([v - 13])
    return 14, compat.int_to_bytes(v - 269, 2)


def encode(m):
    out = bytearray([0x40 | (m.type << 4) | len(m.token), m.code]) + compat.int_to_bytes(m.mid, 2) + m.token
    last = 0
    for num, val in sorted(m.options, key=lambda o: o[0]):
        dn, dx = _ext(num - last)
        ln, lx = _ext(len(val))
        out.append((dn << 4) | ln)
        out += dx + lx + val
        last = num
    if m.payload:
        out += b"\xff" + m.payload
    return bytes(out)


def decode(b):
    """Parse a datagram. Raises BadInput."""
    if len(b) < 4 or b[0] >> 6 != 1:
        raise BadInput("not a CoAP message")
    tkl = b[0] & 15
    if tkl > 8 or len(b) < 4 + tkl:
        raise BadInput("bad token length")
    m = Message((b[0] >> 4) & 3, b[1], (b[2] << 8) | b[3], bytes(b[4:4 + tkl]), [])
    i = 4 + tkl
    num = 0
    while i < len(b):
        if b[i] == 0xFF:
            if i + 1 == len(b):
                raise BadInput("payload marker without payload")
            m.payload = bytes(b[i + 1:])
            break
        d, ln = b[i] >> 4, b[i] & 15
        i += 1
        vals = []
        for x in (d, ln):
            if x == 13:
                if i >= len(b):
                    raise BadInput("truncated option")
                x = b[i] + 13
                i += 1
            elif x == 14:
                if i + 2 > len(b):
                    raise BadInput("truncated option")
                x = ((b[i] << 8) | b[i + 1]) + 269
                i += 2
            elif x == 15:
                raise BadInput("reserved option nibble")
            vals.append(x)
        num += vals[0]
        if i + vals[1] > len(b):
            raise BadInput("truncated option value")
        m.options.append((num, bytes(b[i:i + vals[1]])))
        i += vals[1]
    return m


def _lp(x):
    return compat.int_to_bytes(len(x), 4) + x


def keys(secret):
    return hmac_sha256(secret, b"devagent-coap-v1 request"), hmac_sha256(secret, b"devagent-coap-v1 response")


def request_tag(k_req, device_id, code_, path, cf, counter, payload):
    cfb = b"" if cf is None else _uint(cf)
    return hmac_sha256(k_req, b"DA1q", bytes([code_]), _lp(device_id.encode()), _lp(path.encode()), _lp(cfb),
                       compat.int_to_bytes(counter, 8), _lp(payload))


def response_tag(k_rsp, code_, counter, req_tag, cf, payload):
    cfb = b"" if cf is None else _uint(cf)
    return hmac_sha256(k_rsp, b"DA1r", bytes([code_]), compat.int_to_bytes(counter, 8), req_tag, _lp(cfb),
                       _lp(payload))


def auth_value(counter, tag):
    return bytes([AUTH_VERSION]) + compat.int_to_bytes(counter, 8) + tag


def parse_auth(v):
    if len(v) != 41 or v[0] != AUTH_VERSION:
        raise Unauthorized("bad authentication option")
    return compat.int_from_bytes(v[1:9]), v[9:]


def make_request(secret, device_id, path, payload, cf, counter, mid=1, token=b"\x01", mtype=CON):
    """Client side: an authenticated POST (used by hosts and tests). Returns (datagram, request tag)."""
    k_req, _ = keys(secret)
    tag = request_tag(k_req, device_id, POST, path, cf, counter, payload)
    opts = [(OPT_URI_PATH, p.encode()) for p in path.split("/") if p]
    if cf is not None:
        opts.append((OPT_CONTENT_FORMAT, _uint(cf)))
    opts.append((AUTH_OPTION, auth_value(counter, tag)))
    return encode(Message(mtype, POST, mid, token, opts, payload)), tag


def check_response(secret, datagram, req_tag):
    """Client side: decode and authenticate a response. Returns the Message; raises Unauthorized."""
    m = decode(datagram)
    _, k_rsp = keys(secret)
    a = m.opt(AUTH_OPTION)
    if not a:
        raise Unauthorized("response is not authenticated")
    counter, tag = parse_auth(a[0])
    if not compat.consteq(tag, response_tag(k_rsp, m.code, counter, req_tag, m.content_format(), m.payload)):
        raise Unauthorized("response authentication failed")
    return m


def _error(code_s, reason, message):
    """The shared diagnostic: CBOR {"error": reason, "message": text} with content-format 60."""
    return code(code_s), CF_CBOR, cbor.dumps({"error": reason, "message": message})


def diagnostic(m):
    """Client side: (reason, message) of an error response; tolerant of a peer that sends text."""
    try:
        d = cbor.loads(m.payload) if m.payload else {}
    except ValueError:
        d = None
    if isinstance(d, dict) and isinstance(d.get("error"), str):
        return d["error"], str(d.get("message", ""))
    try:
        return "unknown", bytes(m.payload[:200]).decode()
    except UnicodeError:
        return "unknown", ""


class Server:
    """Pure request handler (``handle``) plus a blocking UDP loop (``serve``).

    Args: agent (``agent.Agent``), secret (bytes, the per-device commissioning secret), device_id (str).
    """

    def __init__(self, agent, secret, device_id):
        if not secret or len(secret) < 16:
            raise ValueError("commissioning secret must be at least 16 bytes")
        self.agent = agent
        self.k_req, self.k_rsp = keys(secret)
        self.device_id = device_id
        self._last = None  # (peer, mid, response) for CON retransmissions
        self._mid = compat.int_from_bytes(compat.urandom(2))

    def _counter(self):
        b = self.agent.store.get("ctr")
        return compat.int_from_bytes(b) if b and len(b) == 8 else 0

    def _auth(self, m):
        a = m.opt(AUTH_OPTION)
        if len(a) != 1:
            raise Unauthorized("request is not authenticated")
        counter, tag = parse_auth(a[0])
        want = request_tag(self.k_req, self.device_id, m.code, m.path(), m.content_format(), counter, m.payload)
        if not compat.consteq(tag, want):
            raise Unauthorized("request authentication failed")
        if counter <= self._counter():
            raise Unauthorized("replayed or stale request counter")
        self.agent.store.put("ctr", compat.int_to_bytes(counter, 8))  # persist before acting
        return counter, tag

    def _route(self, m):
        path = m.path()
        if path not in ("csr", "verify"):
            raise AgentError("no such resource; the board serves /csr and /verify", "not-found")
        if m.code != POST:
            raise AgentError("use POST", "method-not-allowed")
        cf = m.content_format()
        if path == "csr":
            if cf not in (None, CF_CBOR):
                raise Unsupported("POST /csr: content-format %d is not accepted; use 60 (application/cbor)" % cf)
            try:
                req = cbor.loads(m.payload) if m.payload else {}
            except ValueError:
                raise BadInput("POST /csr: not well-formed CBOR", "malformed-cbor") from None
            return code("2.04"), 286, self.agent.csr_request(req)
        if cf not in (281, 287):
            raise Unsupported("POST /verify: content-format %s is not accepted; use 287 (application/pkix-cert) "
                              "or 281 (certs-only PKCS#7)" % cf)
        if not m.payload:
            raise BadInput("POST /verify: empty payload, expected a DER certificate", "malformed-certificate")
        info = self.agent.install(m.payload, cf)
        return code("2.04"), CF_CBOR, info

    def handle(self, datagram, peer=None):
        """One datagram -> response datagram or None (ignored)."""
        try:
            m = decode(datagram)
        except BadInput:
            return None  # not worth an answer (RFC 7252 4.2: silently ignore or RST)
        if m.code >> 5 != 0 or m.code == 0 or m.type in (ACK, RST):
            return None
        if m.type == CON and self._last and self._last[0] == (peer, m.mid):
            return self._last[1]
        counter, req_tag = 0, b""
        t0 = compat.ticks_us()
        opts = []
        try:
            if len(datagram) > MAX_DATAGRAM:
                raise TooLarge("request of %d bytes exceeds %d (one datagram; no block-wise transfer)"
                               % (len(datagram), MAX_DATAGRAM))
            for n, _ in m.options:
                if n & 1 and n not in KNOWN_OPTIONS:
                    raise BadOption("critical option %d is not supported by this board%s" % (
                        n, " (no block-wise transfer: send the request in one datagram)" if n in (23, 27) else ""))
            counter, req_tag = self._auth(m)
            rcode, cf, payload = self._route(m)
            if isinstance(payload, dict):  # /verify: the shared answer, with the board's time in it
                us = compat.ticks_diff(compat.ticks_us(), t0)
                payload = cbor.dumps({"stored": payload["name"], "version": payload["gen"],
                                      "not_after": payload["not_after_s"], "verify_us": us})
            opts.append((TIMING_OPTION, _uint(compat.ticks_diff(compat.ticks_us(), t0) & 0xFFFFFFFF)))
        except AgentError as e:
            rcode, cf, payload = _error(e.code, e.reason, str(e))
            if e.reason == "not-found":
                rcode = code("4.04")
            elif e.reason == "method-not-allowed":
                rcode = code("4.05")
        except MemoryError:
            rcode, cf, payload = _error("5.00", "out-of-memory", "the board ran out of memory")
        except Exception:  # noqa: BLE001 - keep serving; never echo internal text to a peer
            rcode, cf, payload = _error("5.00", "internal", "internal error on the board")
        opts.append((OPT_CONTENT_FORMAT, _uint(cf)))
        if req_tag:
            opts.append((AUTH_OPTION, auth_value(counter, response_tag(self.k_rsp, rcode, counter, req_tag, cf,
                                                                         payload))))
        if m.type == CON:
            rt, mid = ACK, m.mid
        else:
            self._mid = (self._mid + 1) & 0xFFFF
            rt, mid = NON, self._mid
        out = encode(Message(rt, rcode, mid, m.token, opts, payload))
        if m.type == CON:
            self._last = ((peer, m.mid), out)
        return out

    def serve(self, sock, max_requests=None):
        """Blocking loop on a bound UDP socket."""
        n = 0
        while max_requests is None or n < max_requests:
            data, peer = sock.recvfrom(MAX_DATAGRAM + 1)  # one byte more: a larger request gets 4.13
            out = self.handle(data, peer)
            if out is not None:
                sock.sendto(out, peer)
            n += 1
