"""Mutation engine of the fuzz suite: byte, text and DER-structure mutations of seed inputs.

Written in the subset of Python that MicroPython runs (no typing, no dataclasses, no f-strings with nested
quotes), so the same engine drives the board parsers under CPython and under the MicroPython unix port
(``tests/fuzz/mpy_fuzz.py``) and a seed gives the same mutants on both.

``mutate(rng, data, pool)`` returns a mutant of ``data`` (``pool``: other seeds to splice from). Mutations are
stacked 1-4 deep. When ``data`` (or a base64 block inside it, as in PEM or an EST body) is DER, most mutations
act on its parsed TLV tree -- drop, duplicate, swap or re-tag an element, replace a primitive value with a
boundary value, splice a subtree from another seed -- and the tree is re-encoded with correct lengths, so a
mutant gets past the outer length checks into the parser being tested. DER inside OCTET STRING and BIT STRING
(extension values, public keys, encapsulated content) is parsed too.
"""
import binascii

MASK64 = (1 << 64) - 1
INTERESTING = (b"", b"\x00", b"\x01", b"\x7f", b"\x80", b"\xff", b"\x00\x00", b"\xff\xff", b"\x80\x00",
               b"\x00" * 8, b"\xff" * 9, b"\x7f\xff\xff\xff", b"\x80\x00\x00\x00\x00\x00\x00\x00\x00")
TEXT_BITS = (b"\x00", b"\xff", b"\xc3\x28", b"\xe2\x82", b"\r\n", b"\n\n", b"\"", b"'", b"=", b"[", b"]", b"{",
             b"}", b",", b";", b"\\", b"-", b"--", b"0", b"-1", b"1e999", b"nan", b"inf", b"99999999999999999999",
             b"true", b"\t", b" ", b"\xef\xbb\xbf", b"%", b"\xf0\x9f\x92\xa9", b"#", b"..", b"/")
TAGS = (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0C, 0x13, 0x16, 0x17, 0x18, 0x30, 0x31, 0x80, 0x81, 0x82, 0x86,
        0x87, 0x88, 0xA0, 0xA1, 0xA2, 0xA3, 0xA4)
TIMES = (b"-1", b"9913312359Z", b"991301000000Z", b"000000000000Z", b"20241301000000Z", b"20240230000000Z",
         b"20242431246060Z", b"-0010101000000Z", b"+1240101000000Z", b"2024010100000Z", b"240101000000",
         b"24010100000\xffZ", b"99999999999999Z", b"19500101000000Z", b"00000101000000Z")
B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
MAX_NODES = 2000


class Rng:
    """xorshift64*: deterministic and identical on CPython and MicroPython."""

    def __init__(self, seed):
        self.s = (seed * 0x9E3779B97F4A7C15 + 1) & MASK64 or 1

    def next(self):
        x = self.s
        x ^= (x >> 12)
        x ^= (x << 25) & MASK64
        x ^= (x >> 27)
        self.s = x
        return ((x * 0x2545F4914F6CDD1D) & MASK64) >> 32

    def below(self, n):
        return self.next() % n if n > 0 else 0

    def chance(self, pct):
        return self.below(100) < pct

    def choice(self, seq):
        return seq[self.below(len(seq))]

    def randbytes(self, n):
        return bytes(self.next() & 0xFF for _ in range(n))


# ---- DER tree --------------------------------------------------------------------------------------
# A node is a list [tag, kind, value]: kind "p" primitive (value bytes), "c" constructed (value list of nodes),
# "o" OCTET STRING wrapping DER (value list), "b" BIT STRING wrapping DER (value list, 0 unused bits).

def _read_tlv(buf, off, end):
    if off + 2 > end:
        return None
    tag = buf[off]
    if tag & 0x1F == 0x1F:
        return None
    ln = buf[off + 1]
    p = off + 2
    if ln & 0x80:
        nb = ln & 0x7F
        if nb == 0 or nb > 3 or p + nb > end:
            return None
        ln = 0
        for i in range(nb):
            ln = (ln << 8) | buf[p + i]
        p += nb
    if p + ln > end:
        return None
    return tag, p, p + ln


def _parse_seq(buf, start, end, depth, count):
    out = []
    off = start
    while off < end:
        r = _read_tlv(buf, off, end)
        if r is None:
            return None
        tag, vs, ve = r
        node = _parse_node(buf, tag, vs, ve, depth, count)
        if node is None:
            return None
        out.append(node)
        off = ve
    return out


def _parse_node(buf, tag, vs, ve, depth, count):
    count[0] += 1
    if count[0] > MAX_NODES or depth > 24:
        return None
    if tag & 0x20:
        kids = _parse_seq(buf, vs, ve, depth + 1, count)
        if kids is None:
            return None
        return [tag, "c", kids]
    if tag == 0x04 and ve - vs >= 2 and buf[vs] in (0x30, 0x31, 0x03, 0x04, 0x02, 0x06, 0x05):
        kids = _parse_seq(buf, vs, ve, depth + 1, count)
        if kids:
            return [tag, "o", kids]
    if tag == 0x03 and ve - vs >= 3 and buf[vs] == 0 and buf[vs + 1] == 0x30:
        kids = _parse_seq(buf, vs + 1, ve, depth + 1, count)
        if kids:
            return [tag, "b", kids]
    return [tag, "p", bytes(buf[vs:ve])]


def parse_der(buf):
    """The TLV tree of ``buf`` (a list of top-level nodes), or None if it is not a sequence of DER TLVs."""
    if len(buf) < 2:
        return None
    return _parse_seq(buf, 0, len(buf), 0, [0])


def _len_bytes(n, rng=None):
    if rng is not None and rng.chance(3):  # now and then a non-minimal or indefinite length
        return rng.choice((b"\x81" + bytes([n & 0xFF]), b"\x80", b"\x84\x00\x00" + bytes([(n >> 8) & 0xFF, n & 0xFF])))
    if n < 0x80:
        return bytes([n])
    b = b""
    while n:
        b = bytes([n & 0xFF]) + b
        n >>= 8
    return bytes([0x80 | len(b)]) + b


def encode_node(node, rng=None):
    tag, kind, value = node
    if kind == "p":
        content = value
    else:
        content = b"".join(encode_node(k, rng) for k in value)
        if kind == "b":
            content = b"\x00" + content
    return bytes([tag]) + _len_bytes(len(content), rng if rng is not None and rng.chance(2) else None) + content


def encode_der(nodes, rng=None):
    return b"".join(encode_node(n, rng) for n in nodes)


def _all_nodes(nodes, out, parent):
    for i, n in enumerate(nodes):
        out.append((n, nodes, i))
        if n[1] != "p":
            _all_nodes(n[2], out, n)
    return out


def _primitive_value(rng, node):
    tag = node[0]
    old = node[2]
    r = rng.below(10)
    if tag in (0x17, 0x18) and r < 5:
        return rng.choice(TIMES)
    if tag == 0x06 and r < 4:
        return rng.choice((b"", b"\x80", b"\x2a\x86", b"\x2b\x06\x01\x05\x05\x07\x30\x01", b"\x88\x37",
                           b"\xff\xff\xff\xff\xff\xff\xff\xff\x7f", b"\x55\x1d\x13", b"\x55\x1d\x11", b"\x55\x1d\x0f",
                           b"\x2a\x86\x48\xce\x3d\x02\x01", b"\x2a\x86\x48\x86\xf7\x0d\x01\x01\x01", b"\x2b\x65\x70"))
    if r < 3:
        return rng.choice(INTERESTING)
    if r < 5 and old:
        i = rng.below(len(old))
        return old[:i] + bytes([old[i] ^ (1 << rng.below(8))]) + old[i + 1:]
    if r < 7 and old:
        return old[:rng.below(len(old))]
    if r < 8:
        return old + rng.randbytes(1 + rng.below(8))
    return rng.randbytes(rng.below(20))


def mutate_tree(rng, nodes, pool_nodes):
    """Mutate the tree in place (one structural or value change)."""
    flat = _all_nodes(nodes, [], None)
    if not flat:
        return
    node, siblings, idx = rng.choice(flat)
    op = rng.below(12)
    if op <= 2 and node[1] == "p":
        node[2] = _primitive_value(rng, node)
    elif op == 3:
        del siblings[idx]
    elif op == 4:
        siblings.insert(idx, _copy(node))  # duplicate (e.g. a duplicate extension)
    elif op == 5 and len(siblings) > 1:
        j = rng.below(len(siblings))
        siblings[idx], siblings[j] = siblings[j], siblings[idx]
    elif op == 6:
        new_tag = rng.choice(TAGS)
        if (new_tag & 0x20) != (node[0] & 0x20):
            if node[1] == "p" and new_tag & 0x20:
                return
            if node[1] != "p" and not new_tag & 0x20:
                node[2] = encode_der(node[2])
                node[1] = "p"
        node[0] = new_tag
    elif op == 7 and pool_nodes:
        donor = rng.choice(pool_nodes)
        siblings[idx] = _copy(donor)
    elif op == 8:
        siblings[idx] = [0x30, "c", [node]]  # wrap in an extra SEQUENCE
    elif op == 9 and node[1] != "p" and node[2]:
        node[2] = node[2][:rng.below(len(node[2]))]  # drop the tail of a constructed value
    elif op == 10 and node[1] == "p":
        node[2] = node[2] * (2 + rng.below(3)) if len(node[2]) < 256 else node[2][: len(node[2]) // 2]
    else:
        if node[1] == "p":
            node[2] = _primitive_value(rng, node)
        else:
            del siblings[idx]


def _copy(node):
    if node[1] == "p":
        return [node[0], "p", node[2]]
    return [node[0], node[1], [_copy(k) for k in node[2]]]


def _pool_nodes(pool, rng):
    out = []
    for _ in range(2):
        if not pool:
            break
        t = parse_der(rng.choice(pool))
        if t:
            flat = _all_nodes(t, [], None)
            for _ in range(8):
                out.append(rng.choice(flat)[0])
    return out


# ---- bytes and text --------------------------------------------------------------------------------
def mutate_bytes(rng, data, pool):
    # bytes slicing and concatenation only: MicroPython's bytearray has no item deletion or resizing slices
    b = bytes(data)
    op = rng.below(13)
    n = len(b)
    if op == 0 and n:
        i = rng.below(n)
        b = b[:i] + bytes([b[i] ^ (1 << rng.below(8))]) + b[i + 1:]
    elif op == 1 and n:
        i = rng.below(n)
        b = b[:i] + bytes([rng.choice((0, 0xFF, 0x7F, 0x80, 0x20, 0x0A, 0x30, rng.below(256)))]) + b[i + 1:]
    elif op == 2:
        i = rng.below(n + 1)
        b = b[:i] + rng.randbytes(1 + rng.below(4)) + b[i:]
    elif op == 3 and n:
        i = rng.below(n)
        b = b[:i] + b[i + 1 + rng.below(min(16, n - i)):]
    elif op == 4 and n:
        i = rng.below(n)
        j = min(n, i + 1 + rng.below(32))
        k = rng.below(n + 1)
        b = b[:k] + b[i:j] + b[k:]
    elif op == 5 and n:
        b = b[:rng.below(n)]
    elif op == 6:
        i = rng.below(n + 1)
        b = b[:i] + rng.choice(TEXT_BITS) + b[i:]
    elif op == 7 and n:  # a non-ASCII byte where text is expected
        i = rng.below(n)
        b = b[:i] + bytes([0x80 + rng.below(128)]) + b[i + 1:]
    elif op == 8 and pool:  # splice with another seed
        other = rng.choice(pool)
        b = b[:rng.below(n + 1)] + other[rng.below(len(other) + 1):]
    elif op == 9 and n:  # line-level: drop, duplicate or swap lines
        lines = b.split(b"\n")
        if len(lines) > 1:
            i = rng.below(len(lines))
            j = rng.below(len(lines))
            r = rng.below(3)
            if r == 0:
                lines.pop(i)
            elif r == 1:
                lines.insert(i, lines[j])
            else:
                lines[i], lines[j] = lines[j], lines[i]
            b = b"\n".join(lines)
    elif op == 10 and n:  # replace a token (text value) with a boundary value
        i = rng.below(n)
        j = i
        while j < n and b[j] not in b" \t\r\n=,;:\"'[]{}":
            j += 1
        b = b[:i] + rng.choice(TEXT_BITS) + b[j:]
    elif op == 11 and n >= 4:  # overwrite a run with one byte value
        i = rng.below(n)
        k = 1 + rng.below(8)
        b = b[:i] + bytes([rng.below(256)]) * k + b[i + k:]
    elif n:
        i = rng.below(n)
        b = b[:i] + bytes([(b[i] + rng.choice((1, -1, 0x10, -0x10))) & 0xFF]) + b[i + 1:]
    return b


def _b64_block(data):
    """(start, end) of the longest run of base64 lines in data, or None."""
    best = None
    i = 0
    n = len(data)
    while i < n:
        if data[i] in B64:
            j = i
            while j < n and (data[j] in B64 or data[j] in b"\r\n"):
                j += 1
            if best is None or j - i > best[1] - best[0]:
                best = (i, j)
            i = j
        else:
            i += 1
    if best is None or best[1] - best[0] < 40:
        return None
    return best


def _wrap64(b):
    return b"\n".join(b[i:i + 64] for i in range(0, len(b), 64)) + b"\n"


def mutate(rng, data, pool=(), prefix=0):
    """A mutant of ``data``; ``prefix`` bytes at the front are a target's selector and only rarely mutated."""
    head = data[:prefix]
    body = data[prefix:]
    if prefix and rng.chance(3):
        head = bytes([rng.below(256)]) + head[1:]
    rounds = 1 + (rng.below(4) if rng.chance(40) else 0)
    tree = parse_der(body) if rng.chance(75) else None
    if tree is not None:
        pool_nodes = _pool_nodes(pool, rng)
        for _ in range(rounds):
            mutate_tree(rng, tree, pool_nodes)
        body = encode_der(tree, rng if rng.chance(10) else None)
        if rng.chance(15):
            body = mutate_bytes(rng, body, pool)
        return head + body
    blk = _b64_block(body) if rng.chance(60) else None
    if blk is not None:
        s, e = blk
        try:
            der = binascii.a2b_base64(body[s:e].replace(b"\n", b"").replace(b"\r", b""))
        except Exception:  # noqa: BLE001 - not base64 after all: fall back to byte mutations
            der = None
        inner = parse_der(der) if der else None
        if inner is not None:
            for _ in range(rounds):
                mutate_tree(rng, inner, _pool_nodes(pool, rng))
            enc = binascii.b2a_base64(encode_der(inner)).replace(b"\n", b"")
            return head + body[:s] + _wrap64(enc) + body[e:]
    for _ in range(rounds):
        body = mutate_bytes(rng, body, [p[prefix:] for p in pool] if prefix else pool)
    return head + body
