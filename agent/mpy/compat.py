"""The one place where CPython and MicroPython differ.

Everything runtime-specific (randomness, clocks, heap figures, file syncing, CRC, base64, integer helpers
that MicroPython lacks) is detected here by feature, never by version number, so every other module is
plain portable code.
"""
import os
import time

try:
    from micropython import const  # noqa: F401
except ImportError:  # CPython

    def const(x):
        return x


try:
    import binascii
except ImportError:  # very small ports name it ubinascii
    import ubinascii as binascii  # noqa: F401

try:
    import gc
except ImportError:  # pragma: no cover
    gc = None

MICROPYTHON = hasattr(time, "ticks_ms")

_seed_source = None
_os_urandom = getattr(os, "urandom", None)  # None on boards without a CSPRNG (tests clear it too)


class NoRandomError(Exception):
    """No cryptographically secure random source is available and none was configured."""


def set_seed_source(fn):
    """Configure a random source for boards without ``os.urandom``.

    Args:
        fn: callable(n) -> n bytes from a CSPRNG (e.g. a hardware TRNG driver). ``None`` clears it.
    """
    global _seed_source
    _seed_source = fn


def urandom(n):
    """n bytes from the board's CSPRNG.

    Raises:
        NoRandomError: neither os.urandom nor a configured seed source exists. We refuse to make keys
            from a guessable source.
    """
    fn = _os_urandom or _seed_source
    if fn is None:
        raise NoRandomError("no CSPRNG: this board has no os.urandom; configure compat.set_seed_source()")
    b = fn(n)
    if not isinstance(b, (bytes, bytearray)) or len(b) != n:
        raise NoRandomError("random source returned the wrong amount of data")
    return bytes(b)


def ticks_ms():
    if MICROPYTHON:
        return time.ticks_ms()
    return int(time.monotonic() * 1000)


def ticks_us():
    if MICROPYTHON:
        return time.ticks_us()
    return int(time.monotonic() * 1000000)


def ticks_diff(a, b):
    if MICROPYTHON:
        return time.ticks_diff(a, b)
    return a - b


def utc_now():
    """(year, month, day, hour, minute, second) in UTC from the board clock."""
    return tuple(time.gmtime()[:6])


def mem_alloc():
    """Bytes allocated on the heap now (MicroPython), or None where the runtime cannot tell."""
    if gc is not None and hasattr(gc, "mem_alloc"):
        return gc.mem_alloc()
    return None


def collect():
    if gc is not None:
        gc.collect()


def int_from_bytes(b):
    return int.from_bytes(b, "big")


def int_to_bytes(x, n):
    return x.to_bytes(n, "big")


def bit_length(x):
    """MicroPython's int has no bit_length()."""
    n = 0
    if x < 0:
        x = -x
    # Skip whole bytes first: big ints have hundreds of bits.
    while x >> 64:
        x >>= 64
        n += 64
    while x:
        x >>= 1
        n += 1
    return n


def b64encode(b):
    return binascii.b2a_base64(b).rstrip(b"\n")


def b64decode(s):
    """Raises ValueError on malformed input (binascii.Error is a ValueError subclass on both runtimes)."""
    try:
        return binascii.a2b_base64(s)
    except Exception as e:  # noqa: BLE001 - normalise to ValueError for callers
        raise ValueError("bad base64: %s" % e) from None


def crc32(b):
    return binascii.crc32(b) & 0xFFFFFFFF


def hexlify(b):
    return binascii.hexlify(b).decode()


def unhexlify(s):
    try:
        return binascii.unhexlify(s)
    except Exception as e:  # noqa: BLE001
        raise ValueError("bad hex: %s" % e) from None


def sync_file(f):
    """Push a written file to the medium as far as the runtime allows."""
    try:
        f.flush()
    except OSError:  # MicroPython: flush() on some streams raises EINVAL
        pass
    fileno = getattr(f, "fileno", None)
    if fileno is not None and hasattr(os, "fsync"):
        os.fsync(fileno())
    elif hasattr(os, "sync"):
        os.sync()


def sync_dir(path):
    """fsync a directory so a rename in it is durable (POSIX only; a no-op elsewhere)."""
    if hasattr(os, "O_RDONLY") and hasattr(os, "fsync"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def open_secret_write(path):
    """Open ``path`` for binary writing, creating it 0600 where the runtime has permissions."""
    if hasattr(os, "O_CREAT") and hasattr(os, "fdopen"):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        return os.fdopen(fd, "wb")
    return open(path, "wb")


def listdir(path):
    return os.listdir(path)


def exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def makedirs(path):
    """Create ``path`` and its parents (mode 0700 where supported)."""
    parts = path.split("/")
    cur = ""
    for i, p in enumerate(parts):
        if not p:
            if i == 0:
                cur = "/"
            continue
        cur = cur + p if cur.endswith("/") or not cur else cur + "/" + p
        if not exists(cur):
            try:
                os.mkdir(cur, 0o700) if hasattr(os, "O_CREAT") else os.mkdir(cur)
            except OSError:
                if not exists(cur):
                    raise


def remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def rename(src, dst):
    os.rename(src, dst)


def consteq(a, b):
    """Compare MACs without an early exit."""
    if len(a) != len(b):
        return False
    r = 0
    for i in range(len(a)):
        r |= a[i] ^ b[i]
    return r == 0
