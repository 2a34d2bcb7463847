"""Flash storage: every object is written as a new generation file, never overwritten in place.

Layout under the root directory (default ``/devagent``):
    ca.<n>                       trust anchor (DER certificate)
    pending.<n>                  SEC1 key whose CSR is outstanding
    key.<n> + cert.<n>           live credential = the highest n for which both exist
    ctr.<n>                      last accepted CoAP request counter (8 bytes, big-endian)
    pendca.<n>                   SHA-256 fingerprints of the CA certificates announced with the pending CSR
    config.json                  written by `devagent mpy deploy`; read-only here
Each write goes to ``<name>.<n>.tmp``, is synced, then renamed to ``<name>.<n>``. The rename target never
exists, so the rename is atomic on POSIX, LittleFS and FAT alike (FAT cannot rename over an existing
file atomically), and a power cut at any instant leaves the previous generation intact and complete.
For a credential, ``cert.<n>`` is written last: its rename is the commit point. Older generations are
deleted only after the new one is complete; stray ``.tmp`` files are ignored and cleaned.
"""
from . import compat
from .errors import StorageError


class Store:
    def __init__(self, root):
        self.root = root.rstrip("/") or "/"
        self._rename = compat.rename  # replaced by fault-injection tests
        try:
            compat.makedirs(self.root)
        except OSError as e:
            raise StorageError("cannot create storage directory %s: %s" % (self.root, e)) from None

    def _path(self, fname):
        return self.root + "/" + fname

    def _gens(self, name):
        out = []
        try:
            entries = compat.listdir(self.root)
        except OSError:
            return out
        pre = name + "."
        for f in entries:
            if f.startswith(pre):
                rest = f[len(pre):]
                if rest.isdigit():
                    out.append(int(rest))
        out.sort()
        return out

    def latest(self, name):
        g = self._gens(name)
        return g[-1] if g else 0

    def _write(self, fname, data):
        tmp = self._path(fname + ".tmp")
        try:
            f = compat.open_secret_write(tmp)
            try:
                f.write(data)
                compat.sync_file(f)
            finally:
                f.close()
            self._rename(tmp, self._path(fname))
            compat.sync_dir(self.root)
        except OSError as e:
            compat.remove(tmp)
            raise StorageError("writing %s failed (previous version kept): %s" % (fname, e)) from None

    def read_gen(self, name, gen):
        try:
            with open(self._path("%s.%d" % (name, gen)), "rb") as f:
                return f.read()
        except OSError:
            return None

    def get(self, name):
        """Newest generation of name, or None."""
        g = self.latest(name)
        return self.read_gen(name, g) if g else None

    def put(self, name, data):
        """Write a new generation of name; older ones are removed afterwards. Returns the generation."""
        gen = max(self.latest(name), 0) + 1
        self._write("%s.%d" % (name, gen), data)
        self.prune(name, gen)
        return gen

    def prune(self, name, keep_from):
        for g in self._gens(name):
            if g < keep_from:
                compat.remove(self._path("%s.%d" % (name, g)))

    def delete(self, name):
        self.prune(name, 1 << 30)

    def credential(self):
        """(gen, key_der, cert_der) of the live credential, or None."""
        certs = self._gens("cert")
        keys = self._gens("key")
        for g in reversed(certs):
            if g in keys:
                k, c = self.read_gen("key", g), self.read_gen("cert", g)
                if k and c:
                    return g, k, c
        return None

    def put_credential(self, key_der, cert_der):
        """Commit a new credential generation: key first, certificate last (the commit point).

        The previous generation stays until the new one is complete, then is removed.
        """
        gen = max(self.latest("key"), self.latest("cert")) + 1
        self._write("key.%d" % gen, key_der)
        try:
            self._write("cert.%d" % gen, cert_der)
        except StorageError:
            compat.remove(self._path("key.%d" % gen))  # orphan: never live without its certificate
            raise
        self.prune("key", gen)
        self.prune("cert", gen)
        self.clean_tmp()
        return gen

    def clean_tmp(self):
        try:
            for f in compat.listdir(self.root):
                if f.endswith(".tmp"):
                    compat.remove(self._path(f))
        except OSError:
            pass
