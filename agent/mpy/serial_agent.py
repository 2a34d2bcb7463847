"""Board side of the serial protocol: answer the host's frames until end of input.

Requests (host -> board) and replies (board -> host); payloads are JSON unless noted:
    HELLO  {}                                   -> OK {agent, version, status...}
    STATUS {}                                   -> OK status
    CA     DER CA certificate                   -> OK {installed}   (only if none, or the same, is installed)
    CSR    {cn?, serial?, sans?, new_key?}      -> CSR  DER PKCS#10
    CERT   DER certificate or certs-only PKCS#7 -> OK {gen, cn, not_after}
Any failure -> ERR {code, error, message}: the CoAP code ("4.00" bad input, "4.03" untrusted or a
certificate for another key, "4.09" no pending key, ...), the reason code and the text of the CoAP
diagnostic (docs/coap.md), so both transports report a failure the same way. A corrupt frame is
answered with ERR seq 0 and skipped; nothing is stored.
"""
import json

from . import VERSION, frame
from .errors import AgentError, BadInput


def _json(payload):
    if not payload:
        return {}
    try:
        v = json.loads(payload)
    except (ValueError, UnicodeError):
        raise BadInput("payload is not JSON") from None
    if not isinstance(v, dict):
        raise BadInput("payload must be a JSON object")
    return v


def _str(v, field):
    if v is not None and not isinstance(v, str):
        raise BadInput("%s must be a string" % field)
    return v


def handle(agent, kind, payload):
    """One request -> (reply kind, reply payload bytes). Raises AgentError."""
    if kind == "HELLO" or kind == "STATUS":
        st = agent.status()
        if kind == "HELLO":
            st["agent"] = "devagent-mpy"
            st["version"] = VERSION
        return "OK", json.dumps(st).encode()
    if kind == "CA":
        return "OK", json.dumps({"installed": agent.set_trust_anchor(payload)}).encode()
    if kind == "CSR":
        req = _json(payload)
        sans = req.get("sans")
        if sans is not None and (not isinstance(sans, list) or not all(isinstance(s, str) for s in sans)):
            raise BadInput("sans must be a list of strings")
        return "CSR", agent.make_csr(cn=_str(req.get("cn"), "cn"), serial=_str(req.get("serial"), "serial"),
                                     sans=sans, new_key=bool(req.get("new_key")))
    if kind == "CERT":
        return "OK", json.dumps(agent.install(payload)).encode()
    raise BadInput("unknown request %s" % kind[:16])


def _err(code, reason, msg):
    return json.dumps({"code": code, "error": reason, "message": msg}).encode()


def serve(agent, read, write, max_requests=None):
    """Serve frames from read(n) and answer with write(bytes) until read returns b"" (end of input)."""
    reader = frame.FrameReader(read)
    done = 0
    while max_requests is None or done < max_requests:
        try:
            kind, seq, payload = reader.read()
        except frame.FrameTimeout:
            return
        except frame.FrameError as e:
            write(frame.encode("ERR", 0, _err("4.00", "malformed-frame", str(e))))
            continue
        try:
            rkind, rpayload = handle(agent, kind, payload)
        except AgentError as e:
            rkind, rpayload = "ERR", _err(e.code, e.reason, str(e))
        except MemoryError:
            rkind, rpayload = "ERR", _err("5.00", "out-of-memory", "the board ran out of memory")
        except Exception:  # noqa: BLE001 - keep serving; never echo internal text to the host
            rkind, rpayload = "ERR", _err("5.00", "internal", "internal error on the board")
        write(frame.encode(rkind, seq, rpayload))
        done += 1
