"""Where Table 1 stage (5) goes on the device: perf_counter spans inside ``DeviceService._verify_and_store``.

A pytest plugin for the real benchmark (the one-process rig of ``bench_table1.py``), not a benchmark itself::

    PYTHONPATH=. python -m pytest benchmarks/bench_table1.py -q --timeout=0 --benchmark-only \\
        -k p256-dtls-psk-aes128-soft-lab -p no:cacheprovider -p benchmarks.spans_stage5

It wraps the calls of the /verify path (the device's checks, ``Keystore.store_certificate`` and the ``fsutil``
steps under it) with timers that count only while ``_verify_and_store`` runs, and at the end writes, per span, the
median and mean over the /verify calls of the time spent in it (inclusive: a span contains the spans it calls;
``name[k]``: the k-th call of the span in one /verify) and its calls per /verify, to ``$SPANS_OUT`` (default
``benchmarks/results/spans-stage5.txt``). Each wrapper costs ~1 µs per call; the totals are a little larger than
the benchmark's own stage (5) figures for that reason. Functions a tree does not have are skipped: to profile an
older commit, copy this file into its checkout.
"""
from __future__ import annotations

import collections
import functools
import os
import statistics
import time

_acc: dict[str, list[float]] = collections.defaultdict(list)
_cur: collections.Counter = collections.Counter()
_on = [False]
_BY_CALL = ("validate", "trust_anchors", "verification_policy", "_pending", "make_dirs", "write_new_files",
            "fsync_all")


def _span(name, fn):
    @functools.wraps(fn)
    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            if _on[0]:
                dt = time.perf_counter() - t
                _cur[name] += dt
                _cur["#" + name] += 1
                if name in _BY_CALL:
                    _cur[f"{name}[{_cur['#' + name]}]"] += dt
    return timed


def _wrap(obj, attr, name=None):
    if not hasattr(obj, attr):
        return
    v = vars(obj).get(attr)
    if isinstance(v, staticmethod):
        setattr(obj, attr, staticmethod(_span(name or attr, v.__func__)))
    else:
        setattr(obj, attr, _span(name or attr, getattr(obj, attr)))


def install() -> None:
    from coap_services.device import DeviceService
    from keystore import certs, fsutil, keytypes, storage, validator
    from keystore import store as store_mod
    from keystore.backends import soft
    from keystore.keylocks import KeyLocks
    from keystore.store import Keystore

    for a in ("_pending", "_authorize", "_public_key"):
        _wrap(DeviceService, a)
    validator.validate = _span("validate", validator.validate)
    store_mod.validate = validator.validate  # store.py binds it lazily; device.py imports it at each call
    _wrap(store_mod, "verification_policy")
    for a in ("store_certificate", "pending_keys", "lookup", "trust_anchors", "key_record", "_view", "_run_deferred",
              "_sweep_versions", "_reap_retired", "_commit_certificate", "_audit_with_commit", "_audit_line", "audit",
              "_record", "_credential", "_txn", "_find_cred", "_find_key", "_claim", "_next_id"):
        _wrap(Keystore, a)
    for a in ("make_dirs", "write_new_files", "atomic_write", "fsync_all", "sync_parent_with", "sync_parent",
              "append_line"):
        _wrap(fsutil, a)
    _wrap(storage.IndexStorage, "_encode")
    _wrap(storage.IndexStorage, "write", "storage.write")
    _wrap(storage.IndexStorage, "_read", "storage._read")
    storage.freeze = _span("freeze", storage.freeze)
    _wrap(KeyLocks, "create", "locks.create")
    for a in ("adopt", "key_path"):
        _wrap(soft.Backend, a, "soft." + a)
    for a in ("describe", "fingerprint", "pem", "same_public_key"):
        setattr(certs, a, _span(a, getattr(certs, a)))
        setattr(store_mod, a, getattr(certs, a))
    store_mod.key_type_of = _span("key_type_of", keytypes.key_type_of)
    inner = DeviceService._verify_and_store

    def verify_and_store(self, certs_, peer):
        _cur.clear()
        _on[0] = True
        t = time.perf_counter()
        try:
            return inner(self, certs_, peer)
        finally:
            _cur["_verify_and_store"] += time.perf_counter() - t
            _on[0] = False
            for k, v in _cur.items():
                _acc[k].append(v)

    DeviceService._verify_and_store = verify_and_store


def pytest_configure(config):
    install()


def pytest_unconfigure(config):
    n = len(_acc.get("_verify_and_store", ()))
    if not n:
        return
    out = os.environ.get("SPANS_OUT", "benchmarks/results/spans-stage5.txt")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        f.write(f"# /verify calls: {n}; ms per /verify (median, mean); calls per /verify\n")
        for k in sorted(k for k in _acc if not k.startswith("#")):
            v = _acc[k] + [0.0] * (n - len(_acc[k]))
            calls = sum(_acc.get("#" + k, ())) / n if "#" + k in _acc else 1.0
            f.write(f"{k:28s} {statistics.median(v) * 1e3:7.3f} {statistics.mean(v) * 1e3:7.3f}  {calls:5.2f}\n")
