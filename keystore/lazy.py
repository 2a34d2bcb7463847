"""Names bound now, modules imported on first use: what keeps ``devagent status`` from importing ``cryptography``.

``store.py`` writes ``x509 = lazy.module("cryptography.x509")`` and ``validate = lazy.attr("keystore.validator",
"validate")`` instead of the import statements; the code using those names stays as it is. The first attribute
access, call, ``in`` or iteration imports the module (Python caches it), so a command that never touches a
certificate never pays for ``cryptography`` (~30 ms on the CI host, more on a Pi Zero).
"""
from __future__ import annotations

import importlib


class _Lazy:
    __slots__ = ("_module", "_name", "_target")

    def __init__(self, module: str, name: str | None = None):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_target", None)

    def _get(self):
        t = object.__getattribute__(self, "_target")
        if t is None:
            t = importlib.import_module(object.__getattribute__(self, "_module"))
            name = object.__getattribute__(self, "_name")
            if name is not None:
                t = getattr(t, name)
            object.__setattr__(self, "_target", t)
        return t

    def __getattr__(self, item):
        return getattr(self._get(), item)

    def __call__(self, *args, **kwargs):
        return self._get()(*args, **kwargs)

    def __contains__(self, item):
        return item in self._get()

    def __iter__(self):
        return iter(self._get())

    def __repr__(self):
        return f"<lazy {object.__getattribute__(self, '_module')}.{object.__getattribute__(self, '_name') or ''}>"


def module(name: str):
    """A module imported when first used."""
    return _Lazy(name)


def attr(module_name: str, name: str):
    """``from module_name import name``, done when first used (call, attribute, ``in``, iteration)."""
    return _Lazy(module_name, name)
