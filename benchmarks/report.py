"""Render pytest-benchmark JSON into a Markdown report with plots (``make bench`` / ``make bench-ci`` call this).

    python benchmarks/report.py benchmarks/results/latest.json --out benchmarks/REPORT.md

Sections, each present only when its suite ran:

- Host: CPU model, cores, Python, OpenSSL (``ssl`` and ``cryptography``), board profile (``conftest.host_facts``).
- Table 1: per stage, every configuration with n, mean, sd and the 95 % confidence interval (Student t, n-1 degrees
  of freedom) from the raw per-run samples in ``extra_info["stages"]``, and seed 003's Raspberry Pi 3 figures for
  the matching paper cell in adjacent columns. Plots like the paper's Fig. 5: means with 95 % CI bars per stage.
- Fleet, footprint, keystore: the figures the suites put in ``extra_info``, and plots of how they grow.
- serve under load: ``devagent serve`` RSS before / during / after a request flood and OSCORE requests.
- EST: simpleenroll / simplereenroll wall and client CPU, devagent next to curl + openssl in the same run, against
  libest and the lab EST server, with the ratios of the medians.
- Every other benchmark group (other suites' JSON entries): a generic table from pytest-benchmark's statistics.

Missing suites are left out; a malformed entry is reported in the "Notes" section, never fatal. Figures only:
nothing here judges a time as pass or fail. PNGs are written next to the report.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

# Seed 003 (Astorga et al. 2021, IEEE Access 9, Table 1): Raspberry Pi 3 Model B, 100 runs per cell, seconds.
# stage -> (auth, rsa bits, aes bits) -> (mean, sd, ci_low, ci_high). Same numbers as shared/data/astorga2021_table1.csv.
PAPER_CSV = """\
key_and_csr_creation,PSK,1024,128,0.575,0.265,0.523,0.628
key_and_csr_creation,PSK,1024,256,0.5731,0.368,0.500,0.646
key_and_csr_creation,PSK,2048,128,2.307,1.276,2.054,2.560
key_and_csr_creation,PSK,2048,256,2.317,1.509,2.017,2.616
key_and_csr_creation,RPK,1024,128,0.627,0.38,0.551,0.702
key_and_csr_creation,RPK,1024,256,0.591,0.317,0.528,0.654
key_and_csr_creation,RPK,2048,128,2.363,1.61,2.044,2.682
key_and_csr_creation,RPK,2048,256,2.244,1.387,1.968,2.519
delegated_enrolment,PSK,1024,128,2.333,0.146,2.304,2.362
delegated_enrolment,PSK,1024,256,2.257,0.112,2.235,2.280
delegated_enrolment,PSK,2048,128,2.26,0.118,2.236,2.283
delegated_enrolment,PSK,2048,256,2.394,0.156,2.363,2.425
delegated_enrolment,RPK,1024,128,2.285,0.169,2.252,2.319
delegated_enrolment,RPK,1024,256,2.212,0.092,2.194,2.231
delegated_enrolment,RPK,2048,128,2.343,0.127,2.317,2.368
delegated_enrolment,RPK,2048,256,2.364,0.174,2.330,2.390
process_certificate,PSK,1024,128,0.029211,0.002864,0.028643,0.029780
process_certificate,PSK,1024,256,0.030345,0.001841,0.029980,0.030710
process_certificate,PSK,2048,128,0.043706,0.004075,0.042897,0.044514
process_certificate,PSK,2048,256,0.043039,0.002154,0.042611,0.043466
process_certificate,RPK,1024,128,0.029304,0.003183,0.028673,0.029936
process_certificate,RPK,1024,256,0.029809,0.003775,0.029060,0.030558
process_certificate,RPK,2048,128,0.043197,0.005914,0.042024,0.044370
process_certificate,RPK,2048,256,0.044103,0.006829,0.042748,0.045458
coap_csr_request,PSK,1024,128,2.236,0.503,2.136,2.335
coap_csr_request,PSK,1024,256,2.203,0.446,2.115,2.292
coap_csr_request,PSK,2048,128,2.386,0.834,2.220,2.551
coap_csr_request,PSK,2048,256,2.312,0.493,2.214,2.410
coap_csr_request,RPK,1024,128,3.044,0.684,2.908,3.180
coap_csr_request,RPK,1024,256,2.949,0.573,2.835,3.063
coap_csr_request,RPK,2048,128,2.981,0.597,2.862,3.099
coap_csr_request,RPK,2048,256,3.06,0.747,2.912,3.208
coap_verify_certificate,PSK,1024,128,2.383,0.481,2.288,2.479
coap_verify_certificate,PSK,1024,256,2.399,0.488,2.303,2.496
coap_verify_certificate,PSK,2048,128,2.52,0.516,2.417,2.622
coap_verify_certificate,PSK,2048,256,2.605,0.673,2.471,2.738
coap_verify_certificate,RPK,1024,128,3.161,0.772,3.008,3.314
coap_verify_certificate,RPK,1024,256,3.18,0.684,3.044,3.315
coap_verify_certificate,RPK,2048,128,3.015,0.589,2.898,3.131
coap_verify_certificate,RPK,2048,256,3.248,0.648,3.119,3.376
total,PSK,1024,128,7.557,0.798,7.399,7.715
total,PSK,1024,256,7.463,0.735,7.317,7.609
total,PSK,2048,128,9.516,1.662,9.186,9.846
total,PSK,2048,256,9.67,1.644,9.344,9.996
total,RPK,1024,128,9.146,1.153,8.918,9.375
total,RPK,1024,256,8.962,0.907,8.782,9.142
total,RPK,2048,128,10.744,1.826,10.382,11.106
total,RPK,2048,256,10.96,1.705,10.622,11.299
"""

STAGES = [
    ("coap_csr_request", "(1) First CoAP exchange: CSR request"),
    ("key_and_csr_creation", "(2) Private key and CSR creation (device)"),
    ("delegated_enrolment", "(3) Delegated enrolment CLM <-> CA"),
    ("coap_verify_certificate", "(4) Second CoAP exchange: verify certificate"),
    ("process_certificate", "(5) Certificate verification (device)"),
    ("total", "Total"),
]


# Issue 19's "before" figures (make bench on the 2-core CI host at 539e5eb, means in ms at 1,000 credentials) and its
# goals, printed next to this run's figures.
KEYSTORE_BEFORE = {"add": "173 (≤ 10)", "load": "19 (≤ 1)", "list": "82 (≤ 20)"}


def paper_table() -> dict:
    out: dict = {}
    for line in PAPER_CSV.strip().splitlines():
        stage, auth, rsa, aes, *vals = line.split(",")
        out[(stage, auth, int(rsa), int(aes))] = tuple(float(v) for v in vals)
    return out


# ---- statistics -----------------------------------------------------------------------------------------------
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (Numerical Recipes, 6.4)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / (c if abs(c) > tiny else tiny)
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / (c if abs(c) > tiny else tiny)
        de = d * c
        h *= de
        if abs(de - 1.0) < 3e-14:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
    x = df / (df + t * t)
    p = 0.5 * _betainc(df / 2, 0.5, x)
    return 1 - p if t > 0 else p


def t_quantile(p: float, df: float) -> float:
    """Student-t quantile by bisection on the CDF (no SciPy on a Pi Zero)."""
    lo, hi = 0.0, 1000.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def summarize(samples) -> dict | None:
    xs = [float(x) for x in samples if x is not None and math.isfinite(float(x))]
    if not xs:
        return None
    n = len(xs)
    mean = statistics.fmean(xs)
    sd = statistics.stdev(xs) if n > 1 else 0.0
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    srt = sorted(xs)
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half, "min": srt[0], "max": srt[-1],
            "p50": _pct(srt, 50), "p99": _pct(srt, 99)}


def _pct(srt, q):
    if not srt:
        return float("nan")
    k = (len(srt) - 1) * q / 100
    f = math.floor(k)
    c = min(f + 1, len(srt) - 1)
    return srt[f] + (srt[c] - srt[f]) * (k - f)


# ---- formatting -----------------------------------------------------------------------------------------------
def ms(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    v = x * 1000
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.{digits}f}"


def auto_time(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if x >= 1:
        return f"{x:.3f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.3f} ms"
    return f"{x * 1e6:.1f} µs"


def table(headers, rows, align=None) -> list[str]:
    align = align or ["l"] + ["r"] * (len(headers) - 1)
    sep = ["---:" if a == "r" else ":---" for a in align]
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return out


# ---- loading --------------------------------------------------------------------------------------------------
def load(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def groups_of(data: dict) -> dict[str, list[dict]]:
    g: dict[str, list[dict]] = {}
    for b in data.get("benchmarks") or []:
        g.setdefault(b.get("group") or "(no group)", []).append(b)
    return g


def config_label(cfg: dict) -> str:
    if cfg.get("backend") == "micropython":
        return "P-256, MicroPython agent (unix port)"
    kt = {"rsa1024": "RSA-1024", "rsa2048": "RSA-2048", "p256": "P-256", "p384": "P-384",
          "ed25519": "Ed25519"}.get(cfg.get("key_type"), str(cfg.get("key_type")))
    ch = {"dtls-psk": "DTLS-PSK", "oscore": "OSCORE", "none": "plain CoAP"}.get(cfg.get("channel"), cfg.get("channel"))
    aes = f" AES-{cfg['aes_bits']}" if cfg.get("aes_bits") else ""
    extra = []
    if cfg.get("backend") not in (None, "soft"):
        extra.append({"tpm": "TPM (swtpm)", "pkcs11": "PKCS#11 (SoftHSM2)"}.get(cfg["backend"], cfg["backend"]))
    if cfg.get("upstream") not in (None, "lab"):
        extra.append(f"{cfg['upstream'].upper()} upstream")
    return f"{kt}, {ch}{aes}" + (f", {', '.join(extra)}" if extra else "")


def paper_cell(cfg: dict):
    """The paper's PSK cell a configuration corresponds to (RSA key length x AES length), or None."""
    if not cfg.get("paper"):
        return None
    kt = cfg.get("key_type", "")
    if kt not in ("rsa1024", "rsa2048") or cfg.get("aes_bits") not in (128, 256):
        return None
    return ("PSK", int(kt[3:]), int(cfg["aes_bits"]))


# ---- sections -------------------------------------------------------------------------------------------------
class Report:
    def __init__(self, data: dict, out: Path, source: Path):
        self.data = data
        self.out = out
        self.source = source
        self.lines: list[str] = []
        self.notes: list[str] = []
        self.plots: list[str] = []
        self.headline: list[str] = []

    def w(self, *lines: str) -> None:
        self.lines.extend(lines)

    def header(self) -> None:
        mi = self.data.get("machine_info") or {}
        h = mi.get("devagent_host") or {}
        ci = h.get("ci_mode")
        self.w("# devagent benchmark report" + (" (CI smoke run: few samples, figures not representative)"
                                               if ci else ""), "")
        self.w(f"Generated from `{self.source.name}` by `benchmarks/report.py`; run "
               f"{self.data.get('datetime', '?')}; commit {h.get('devagent_commit') or (self.data.get('commit_info') or {}).get('id', '?')[:10]}.",
               "")
        rows = [
            ("CPU", h.get("cpu_model") or (mi.get("cpu") or {}).get("brand_raw", "?")),
            ("Cores", h.get("cores", "?")),
            ("Memory", f"{h['mem_total_mb']} MB" if "mem_total_mb" in h else "?"),
            ("Machine / kernel", f"{h.get('machine', mi.get('machine', '?'))} / {h.get('kernel', mi.get('release', '?'))}"),
            ("Python", f"{h.get('python_impl', mi.get('python_implementation', ''))} {h.get('python', mi.get('python_version', '?'))}"),
            ("OpenSSL (Python ssl)", h.get("ssl_openssl", "?")),
            ("OpenSSL (cryptography)", f"{h.get('cryptography_openssl', '?')} (cryptography {h.get('cryptography', '?')})"),
            ("aiocoap", h.get("aiocoap", "?")),
            ("Board profile", h.get("board_profile", "?")),
            ("fsync (4 KiB, median)", f"{h['fsync_ms']} ms" if h.get("fsync_ms") is not None else "?"),
        ]
        self.w(*table(["Host", ""], rows, ["l", "l"]), "")

    # -- Table 1 --
    def table1(self, benches: list[dict]) -> None:
        paper = paper_table()
        cfgs = []
        for b in benches:
            ei = b.get("extra_info") or {}
            if not isinstance(ei.get("stages"), dict) or not isinstance(ei.get("config"), dict):
                self.notes.append(f"table1 entry {b.get('name')} has no stage samples; left out")
                continue
            stats = {s: summarize(v) for s, v in ei["stages"].items()}
            cfgs.append((ei["config"], stats, b))
        if not cfgs:
            return
        self.w("## Table 1: delegated enrollment stages (seed 003) on this host", "")
        self.w("Each configuration ran n delegated enrollments through the production path: `agent.clm.Clm.enroll` "
               "(a fresh CoAP client context per enrollment) against a `coap_services` device server on loopback "
               "with its own keystore, key backend and security layer, and an upstream CA (lab CA in-process, or the "
               "lab EST server over TLS, or the lab CMP server over HTTP). Stages are measured by the CLM and the "
               "device as in the paper's §VII-B; stage (1) includes the DTLS handshake, stage (4) reuses the DTLS "
               "session. 95 % CI: Student t with "
               "n-1 degrees of freedom. All times in **milliseconds**; the paper's Raspberry Pi 3 figures "
               "(PSK column matching key length and AES length) are converted to ms.", "")
        self.w("What each stage measures: (1) and (4) are the CLM's round trip to the device **minus the time the "
               "device reports** for its own work (the TIMING_OPTION of the answer); (2) key pair + CSR creation and "
               "(5) certificate verification + store are **reported by the device itself**; (3) with the `lab` "
               "upstream is an **in-process call** of the lab CA (no protocol at all) plus the CLM's pre-verification, "
               "while the `EST upstream` and `CMP upstream` rows include a real enrollment protocol (HTTPS and HTTP "
               "on loopback) in stage (3).", "")
        self.w("Channels: aiocoap's tinydtls offers only `TLS_PSK_WITH_AES_128_CCM_8`, so the paper's AES-256 "
               "cells are compared with OSCORE using AES-CCM-16-64-256 (object security, no handshake). The paper's "
               "RPK (raw public key) DTLS is not available in aiocoap; its RPK columns are not compared.", "")
        # summary of means
        hdr = ["Configuration", "n"] + [s for s, _ in STAGES]
        rows = []
        for cfg, stats, _ in cfgs:
            n = max((st["n"] for st in stats.values() if st), default=0)
            rows.append([config_label(cfg), n] + [ms(stats[s]["mean"]) if stats.get(s) else "–" for s, _ in STAGES])
        self.w("### Means per stage (ms)", "", *table(hdr, rows), "")
        for stage, title in STAGES:
            hdr = ["Configuration", "n", "mean", "sd", "95 % CI", "Pi 3 mean", "Pi 3 sd", "Pi 3 95 % CI",
                   "Pi 3 / here"]
            rows = []
            for cfg, stats, _ in cfgs:
                st = stats.get(stage)
                if not st:
                    continue
                cell = paper_cell(cfg)
                p = paper.get((stage, *cell)) if cell else None
                r = p[0] / st["mean"] if p and st["mean"] > 0 else None
                ratio = "–" if r is None else (f"{r:,.0f}×" if r >= 10 else f"{r:.2f}×")
                rows.append([config_label(cfg), st["n"], ms(st["mean"]), ms(st["sd"]), f"{ms(st['lo'])} – {ms(st['hi'])}",
                             ms(p[0]) if p else "–", ms(p[1]) if p else "–",
                             f"{ms(p[2])} – {ms(p[3])}" if p else "–", ratio])
            if rows:
                self.w(f"### {title}", "", *table(hdr, rows), "")
        # headline
        for cfg, stats, _ in cfgs:
            cell = paper_cell(cfg)
            if cell and cfg.get("channel") == "dtls-psk" and stats.get("total"):
                p = paper.get(("total", *cell))
                self.headline.append(f"{config_label(cfg)}: total {ms(stats['total']['mean'])} ms here "
                                     f"(95 % CI {ms(stats['total']['lo'])}–{ms(stats['total']['hi'])}) vs "
                                     f"{p[0]:.3f} s on the paper's Pi 3")
            elif cfg.get("key_type") == "p256" and cfg.get("channel") == "dtls-psk" and \
                    cfg.get("backend") == "soft" and cfg.get("upstream") == "lab" and stats.get("total"):
                self.headline.append(f"{config_label(cfg)}: total {ms(stats['total']['mean'])} ms "
                                     f"(95 % CI {ms(stats['total']['lo'])}–{ms(stats['total']['hi'])})")
        self.plot_table1(cfgs, paper)

    # -- OPC UA push management, next to Table 1 --
    OPCUA_STAGES = [("connect", "connect"), ("csr", "CreateSigningRequest"), ("upstream", "upstream CA"),
                    ("update", "UpdateCertificate"), ("trustlist", "TrustList"), ("apply", "ApplyChanges"),
                    ("total", "total")]

    def opcua_push(self, benches: list[dict]) -> None:
        rows_in = []
        for b in benches:
            ei = b.get("extra_info") or {}
            if isinstance(ei.get("stages"), dict) and isinstance(ei.get("config"), dict):
                rows_in.append((ei["config"], {s: summarize(v) for s, v in ei["stages"].items()}))
        if not rows_in:
            return
        self.w("## OPC UA push management (Part 12) next to the CoAP delegated flow", "")
        self.w("Each row: n push enrollments through `agent.opcua.clm_push.enroll_once` (the CLM as push server) "
               "against `devagent opcua serve`'s server (asyncua, loopback, Basic256Sha256 SignAndEncrypt with an "
               "RSA-2048 channel certificate) and the lab CA in-process. The key type is that of the pushed "
               "certificate. CreateSigningRequest contains the device's key generation and CSR (Table 1 stages "
               "1 + 2); UpdateCertificate contains its verification (≈ stages 4 + 5); ApplyChanges is the fsynced "
               "commit, the PKI directory switch and the endpoint re-bind. Means in ms with the 95 % CI.", "")
        hdr = ["Key type", "n"] + [t for _, t in self.OPCUA_STAGES]
        rows = []
        for cfg, st in rows_in:
            n = max((x["n"] for x in st.values() if x), default=0)
            rows.append([config_label(dict(cfg, channel="OPC UA")).split(",")[0], n] + [
                f"{ms(st[s]['mean'])} ({ms(st[s]['lo'])}–{ms(st[s]['hi'])})" if st.get(s) else "–"
                for s, _ in self.OPCUA_STAGES])
        self.w(*table(hdr, rows), "")
        coap = {}
        for b in groups_of(self.data).get("table1", []):
            ei = b.get("extra_info") or {}
            c = ei.get("config") or {}
            if c.get("channel") == "dtls-psk" and c.get("backend") == "soft" and c.get("upstream") == "lab" and \
                    isinstance(ei.get("stages"), dict):
                coap[c.get("key_type")] = {s: summarize(v) for s, v in ei["stages"].items()}
        paper = paper_table()
        hdr = ["Key type", "OPC UA CSR", "CoAP (1)+(2)", "OPC UA Update", "CoAP (4)+(5)", "OPC UA total",
               "CoAP total", "Pi 3 total (paper, PSK AES-128)"]
        rows = []
        for cfg, st in rows_in:
            kt = cfg.get("key_type")
            c = coap.get(kt, {})

            def both(a, b2, c=c):
                return ms(c[a]["mean"] + c[b2]["mean"]) if c.get(a) and c.get(b2) else "–"
            p = paper.get(("total", "PSK", int(kt[3:]), 128)) if kt and kt.startswith("rsa") else None
            rows.append([kt, ms(st["csr"]["mean"]) if st.get("csr") else "–",
                         both("coap_csr_request", "key_and_csr_creation"),
                         ms(st["update"]["mean"]) if st.get("update") else "–",
                         both("coap_verify_certificate", "process_certificate"),
                         ms(st["total"]["mean"]) if st.get("total") else "–",
                         ms(c["total"]["mean"]) if c.get("total") else "–", ms(p[0]) if p else "–"])
        self.w("### Side by side with Table 1 (same run, DTLS-PSK AES-128, software keys, lab CA; ms)", "",
               *table(hdr, rows), "")
        for cfg, st in rows_in:
            if cfg.get("key_type") == "p256" and st.get("total"):
                self.headline.append(f"OPC UA push (P-256 certificate, RSA-2048 channel): total "
                                     f"{ms(st['total']['mean'])} ms (95 % CI {ms(st['total']['lo'])}–"
                                     f"{ms(st['total']['hi'])})")

    def plot_table1(self, cfgs, paper) -> None:
        plt = _pyplot()
        if plt is None:
            self.notes.append("matplotlib is not installed: no plots")
            return
        fig, axes = plt.subplots(2, 3, figsize=(16, 10))
        for ax, (stage, title) in zip(axes.flat, STAGES, strict=False):
            labels, means, errs = [], [], []
            for cfg, stats, _ in cfgs:
                st = stats.get(stage)
                if not st:
                    continue
                labels.append(config_label(cfg))
                means.append(st["mean"] * 1000)
                half = (st["hi"] - st["mean"]) * 1000 if math.isfinite(st["hi"]) else 0
                errs.append(half)
            y = list(range(len(labels)))
            ax.barh(y, means, xerr=errs, capsize=3, color="#4c72b0")
            ax.set_yticks(y)
            ax.set_yticklabels(labels, fontsize=7)
            ax.invert_yaxis()
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("ms (mean, 95 % CI)")
        fig.suptitle("Delegated enrollment stages on this host (cf. seed 003 Fig. 5)")
        fig.tight_layout()
        self._save(fig, "table1_stages.png", "Stages per configuration, means with 95 % CI (like the paper's Fig. 5)")
        # against the Pi 3
        pairs = [(cfg, stats) for cfg, stats, _ in cfgs if paper_cell(cfg)]
        if pairs:
            fig, axes = plt.subplots(2, 3, figsize=(16, 9))
            for ax, (stage, title) in zip(axes.flat, STAGES, strict=False):
                labels, here, herr, pi, pierr = [], [], [], [], []
                for cfg, stats in pairs:
                    st, p = stats.get(stage), paper.get((stage, *paper_cell(cfg)))
                    if not st or not p:
                        continue
                    labels.append(config_label(cfg).replace(", ", "\n").replace(" AES", "\nAES"))
                    here.append(st["mean"] * 1000)
                    herr.append((st["hi"] - st["mean"]) * 1000 if math.isfinite(st["hi"]) else 0)
                    pi.append(p[0] * 1000)
                    pierr.append((p[3] - p[0]) * 1000)
                x = list(range(len(labels)))
                ax.bar([i - 0.2 for i in x], pi, 0.4, yerr=pierr, capsize=3, label="paper, Raspberry Pi 3",
                       color="#dd8452")
                ax.bar([i + 0.2 for i in x], here, 0.4, yerr=herr, capsize=3, label="this host", color="#4c72b0")
                ax.set_yscale("log")
                ax.set_xticks(x)
                ax.set_xticklabels(labels, fontsize=7)
                ax.set_title(title, fontsize=10)
                ax.set_ylabel("ms (log scale)")
            axes.flat[0].legend(fontsize=8)
            fig.suptitle("Paper configurations: Raspberry Pi 3 (seed 003, Table 1) vs this host")
            fig.tight_layout()
            self._save(fig, "table1_vs_pi3.png", "The paper's configurations next to its Raspberry Pi 3 figures "
                       "(log scale)")

    # -- fleet --
    def fleet(self, benches: list[dict]) -> None:
        pts = []
        for b in benches:
            ei = b.get("extra_info") or {}
            if "devices" not in ei or "clm_cpu_ms_per_renewal" not in ei:
                self.notes.append(f"fleet entry {b.get('name')} has no figures (or an older format); left out")
                continue
            pts.append((ei, summarize(ei.get("latencies_s") or [])))
        if not pts:
            return
        pts.sort(key=lambda t: (t[0]["inventory"], t[0]["devices"], t[0]["workers"]))
        rows = []
        for ei, lat in pts:
            ca = ei.get("ca_cpu_ms") or 0.0
            rows.append([ei["inventory"], ei["workers"], f"{ei['devices']:,}", f"{ei['renewals']}/{ei['attempted']}",
                         f"{ei['wall_s']:.1f}", f"{ei['renewals_per_s']:.1f}", ms(lat["p50"]) if lat else "–",
                         ms(lat["p99"]) if lat else "–", f"{ei['clm_cpu_ms_per_renewal']:.2f}", f"{ca:.2f}",
                         f"{ei['clm_cpu_ms_per_renewal'] - ca:.2f}", f"{ei['device_cpu_ms_per_renewal']:.2f}",
                         f"{ei['clm_rss_peak_mb']:.0f}", f"{ei['device_rss_peak_mb']:.0f}"])
        self.w("## Fleet: `clm run` workers renewing N devices (the paper's open question)", "")
        self.w("The production CLM (`devagent clm run` worker processes, `--parallel "
               f"{pts[0][0].get('parallel', '?')}`, OSCORE, the lab CA inside each worker) renews a simulated fleet "
               "(`agent.lab.fleet`: every device its own keystore, OSCORE context and `coap_services` server on its "
               "own loopback address, many devices per simulator process). Every device is made due at once and "
               "renewed exactly once. Renewals/s over the pass from the first renewal's start to the last one's "
               "end; latency is one renewal as the worker runs it. CPU from /proc per process: the CLM workers "
               "(with the in-process lab CA, whose own cost per issuance is the CA column) and, separately, the "
               "simulated devices. RSS: the largest worker, and all simulator processes together.", "")
        self.w(*table(["inventory", "workers", "N", "ok/attempted", "wall s", "renewals/s", "p50 ms", "p99 ms",
                       "CLM CPU ms/renewal", "of it lab CA", "CLM without CA", "devices CPU ms/renewal",
                       "CLM RSS MB (peak, per worker)", "devices RSS MB"], rows), "")
        sq = [t for t in pts if t[0]["inventory"] == "sqlite"]
        if len(sq) > 1:
            a, b = sq[0][0], sq[-1][0]
            grow = b["clm_cpu_ms_per_renewal"] / max(a["clm_cpu_ms_per_renewal"], 1e-9)
            self.w(f"SQLite, N={a['devices']:,} → N={b['devices']:,}: CLM CPU per renewal ×{grow:.2f} (goal ≤ 1.2), "
                   f"throughput {a['renewals_per_s']:.1f} → {b['renewals_per_s']:.1f} renewals/s, CLM RSS "
                   f"{a['clm_rss_peak_mb']:.0f} → {b['clm_rss_peak_mb']:.0f} MB.", "")
            self.headline.append(f"fleet (SQLite): {b['renewals_per_s']:.1f} renewals/s at N={b['devices']:,} (goal ≥ "
                                 f"100), CLM CPU per renewal ×{grow:.2f} from N={a['devices']:,} (goal ≤ 1.2)")
        if sq:
            big = sq[-1][0]
            cap = big["renewals_per_s"]
            lines = []
            for life_h, label in ((1, "1-hour"), (24, "1-day")):
                per_dev_s = 0.66 * life_h * 3600  # renewal at 2/3 of the lifetime
                lines.append(f"- {label} certificates: each device renews every {per_dev_s / 3600:.2g} h; at "
                             f"{cap:.0f} renewals/s one worker keeps up with {cap * per_dev_s:,.0f} devices, "
                             f"{cap * per_dev_s / 2:,.0f} at half load (headroom to catch up after an outage)")
            self.w("Devices one worker serves, from the largest SQLite run (renewal at 2/3 of the lifetime):", "",
                   *lines, "")
        pgs = [t for t in pts if t[0]["inventory"] == "postgresql"]
        if pgs:
            self.headline.append("fleet (PostgreSQL): " + ", ".join(
                f"{t[0]['workers']} worker(s) {t[0]['renewals_per_s']:.1f}/s" for t in pgs)
                + f" at N={pgs[0][0]['devices']:,}")
        plt = _pyplot()
        if plt is None:
            return
        fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.2))
        if sq:
            ns = [t[0]["devices"] for t in sq]
            a1.plot(ns, [t[0]["renewals_per_s"] for t in sq], "o-", label="renewals/s")
            a1.plot(ns, [t[1]["p99"] * 1000 if t[1] else float("nan") for t in sq], "s--", label="p99 ms")
            a1.plot(ns, [t[1]["p50"] * 1000 if t[1] else float("nan") for t in sq], "^--", label="p50 ms")
            a1.set_xscale("log")
            a1.set_xlabel("devices N (SQLite, 1 worker)")
            a1.set_title("throughput and latency")
            a1.legend(fontsize=8)
            a2.plot(ns, [t[0]["clm_cpu_ms_per_renewal"] for t in sq], "o-", label="CLM (incl. lab CA)")
            a2.plot(ns, [t[0]["device_cpu_ms_per_renewal"] for t in sq], "s-", label="simulated devices")
            a2.plot(ns, [t[0]["clm_rss_peak_mb"] for t in sq], "^:", label="CLM RSS MB")
            a2.set_xscale("log")
            a2.set_xlabel("devices N (SQLite, 1 worker)")
            a2.set_title("CPU ms per renewal, CLM memory")
            a2.legend(fontsize=8)
        if pgs:
            ws = [t[0]["workers"] for t in pgs]
            a3.plot(ws, [t[0]["renewals_per_s"] for t in pgs], "o-", label="renewals/s")
            a3.plot(ws, [t[0]["clm_cpu_ms_per_renewal"] for t in pgs], "s-", label="CLM CPU ms/renewal")
            a3.set_xticks(ws)
            a3.set_xlabel(f"workers (PostgreSQL, N={pgs[0][0]['devices']:,})")
            a3.set_title("several workers")
            a3.legend(fontsize=8)
        fig.tight_layout()
        self._save(fig, "fleet.png", "Fleet renewal: throughput, latency, CPU per renewal and memory against N "
                   "(SQLite) and workers (PostgreSQL)")

    # -- footprint --
    def footprint(self, benches: list[dict]) -> None:
        rows = []
        for b in sorted(benches, key=lambda b: b.get("name", "")):
            ei = b.get("extra_info") or {}
            st = b.get("stats") or {}
            what = ei.get("what", b.get("name"))
            if "rss_mb" in ei:
                val = f"{ei['rss_mb']:.1f} MB RSS" + (f" (peak {ei['hwm_mb']:.1f} MB)" if "hwm_mb" in ei else "")
            else:
                s = summarize(ei.get("samples_s") or []) or {"mean": st.get("mean"), "sd": st.get("stddev"),
                                                             "lo": float("nan"), "hi": float("nan"),
                                                             "n": st.get("rounds")}
                val = f"{ms(s['mean'])} ms ± {ms(s['sd'])} (n={s['n']}, 95 % CI {ms(s['lo'])}–{ms(s['hi'])})"
            rows.append([what, val, ei.get("note", "")])
        if rows:
            self.w("## Footprint: `devagent` memory and start-up", "")
            self.w(*table(["measure", "value", "how"], rows, ["l", "l", "l"]), "")
            for r in rows:
                if "idle" in r[0] or "--help" in r[0]:
                    self.headline.append(f"{r[0]}: {r[1]}")

    # -- keystore --
    def keystore(self, benches: list[dict]) -> None:  # noqa: C901 - one table and one plot
        cells: dict = {}
        fsyncs: dict = {}
        for b in benches:
            ei = b.get("extra_info") or {}
            cfg = ei.get("config") or {}
            if "op" not in cfg:
                continue
            st = b.get("stats") or {}
            cells[(cfg["op"], cfg["size"])] = st
            if isinstance(ei.get("fsyncs"), int):
                fsyncs[cfg["op"]] = max(fsyncs.get(cfg["op"], 0), ei["fsyncs"])
        if not cells:
            return
        ops = [o for o in ("add", "keygen", "load", "list", "summary") if any(k[0] == o for k in cells)]
        sizes = sorted({k[1] for k in cells})
        rows = []
        for op in ops:
            row = [f"{op} ({fsyncs[op]} fsyncs)" if op in fsyncs else op]
            for n in sizes:
                st = cells.get((op, n))
                row.append(f"{ms(st['mean'])} ± {ms(st['stddev'])} (n={st['rounds']})" if st else "–")
            first, last = cells.get((op, sizes[0])), cells.get((op, sizes[-1]))
            row.append(f"×{last['median'] / first['median']:.1f}" if first and last and first.get("median") else "–")
            row.append(KEYSTORE_BEFORE.get(op, "–") if sizes[-1] == 1000 else "–")
            rows.append(row)
        # list and summary return N credentials: their whole call is O(N) by definition, so their growth is judged
        # per listed credential (median / N; docs/performance.md "Keystore growth").
        per_rows = []
        for op in ("list", "summary"):
            got = [(n, cells[(op, n)]) for n in sizes if (op, n) in cells and cells[(op, n)].get("median")]
            if len(got) < 2:
                continue
            per = dict((n, st["median"] / n) for n, st in got)
            first, last = got[0][0], got[-1][0]
            per_rows.append([op] + [f"{per[n] * 1e6:.2f}" if n in per else "–" for n in sizes]
                            + [f"×{per[last] / per[first]:.2f}", f"×{got[-1][1]['median'] / got[0][1]['median']:.0f}"])
        self.w("## Keystore operations against the number of credentials", "")
        self.w("add = `store_certificate` of a new credential (verify-before-store, fsynced files, atomic index "
               "replace); keygen = `generate_key` + CSR (stage (2) without CoAP); load = `get`; list = `list` of all "
               "credentials (certificates read when first used); "
               "summary = `list` + `summary()` of each (reads every chain). Mean ± sd in ms; growth = ratio of the "
               "medians (one garbage-collector pause in 20 rounds moves a mean, not a median); fsyncs per operation "
               "as counted by `keystore.fsutil` (docs/keystore.md explains each).", "")
        self.w(*table(["operation"] + [f"{n} credentials" for n in sizes] + [f"growth {sizes[0]}→{sizes[-1]}",
                                                                           "before: 1,000 credentials (goal)"], rows),
               "")
        if per_rows:
            self.w("`list` and `summary` return every credential, so their whole-call time grows with N by "
                   "definition; the growth that says whether they scale is that of the cost **per listed "
                   "credential** (median / N, µs; goal ≤ 3×):", "")
            self.w(*table(["operation"] + [f"{n} credentials" for n in sizes]
                          + [f"per-credential growth {sizes[0]}→{sizes[-1]}", "whole-call growth"], per_rows), "")
        plt = _pyplot()
        if plt is None:
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        for op in ops:
            xs = [n for n in sizes if (op, n) in cells]
            ax.errorbar(xs, [cells[(op, n)]["mean"] * 1000 for n in xs],
                        yerr=[cells[(op, n)]["stddev"] * 1000 for n in xs], marker="o", capsize=3, label=op)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("credentials in the keystore")
        ax.set_ylabel("ms per operation")
        ax.legend()
        fig.tight_layout()
        self._save(fig, "keystore.png", "Keystore operation time against the number of credentials")

    # -- serve under load (issue #20) --
    def serve_load(self, benches: list[dict]) -> None:
        rows, plotted = [], []
        for b in benches:
            ei = b.get("extra_info") or {}
            r = ei.get("rss_kib")
            if not isinstance(r, dict):
                self.notes.append(f"serve-load entry {b.get('name')} has no RSS figures; left out")
                continue
            def mb(k, r=r):
                return r[k] / 1024

            ans = ei.get("answers") or {}
            rows.append([f"{ei['flood_s']:.0f} s, {ei['in_flight']} in flight", f"{ei['answered']:,}",
                         f"{ei['answers_per_s']:.0f}", ", ".join(f"{k} {v:,}" for k, v in sorted(ans.items())),
                         f"{mb('before'):.1f}", f"{mb('max_during'):.1f}", f"{mb('after_flood'):.1f}",
                         f"{mb('after_flood') - mb('before'):+.1f}",
                         f"{ei['oscore_n']:,} in {ei['oscore_s']:.1f} s: {mb('after_oscore') - mb('before_oscore'):+.1f}",
                         ei.get("log_lines", "–")])
            plotted.append(ei)
            self.headline.append(f"`devagent serve` RSS under a {ei['flood_s']:.0f} s flood ({ei['answers_per_s']:.0f} "
                                 f"answers/s): {mb('before'):.1f} → {mb('after_flood'):.1f} MB after it "
                                 f"(max {mb('max_during'):.1f} MB during)")
        if not rows:
            return
        self.w("## serve under load: memory of `devagent serve` in a request flood", "")
        self.w("A real `devagent serve --insecure` on loopback, flooded with raw CoAP from `tests/peers/coap_flood.py`: "
               "50 confirmable requests in flight, mixed `/csr` (rate limited), `/status`, malformed CBOR, unknown "
               "paths, garbage datagrams, complete and abandoned Block1 uploads, a new source port every 100 "
               "requests; then sequential OSCORE `GET /status` from the CLM's client. RSS from /proc after a 2 s "
               "warm-up (before), sampled every second (max during), right after the flood, and around the OSCORE "
               "run. Bounds: docs/coap.md \"Bounds under load\".", "")
        self.w(*table(["flood", "answers", "answers/s", "by code", "RSS before MB", "max during MB",
                       "after MB", "growth MB", "OSCORE requests: growth MB", "log lines"], rows), "")
        plt = _pyplot()
        if plt is None:
            return
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for ei in plotted:
            ys = [v / 1024 for v in ei.get("rss_samples_kib") or []]
            ax.plot(range(1, len(ys) + 1), ys, marker=".", label=f"{ei['in_flight']} in flight")
        ax.set_xlabel("seconds into the flood")
        ax.set_ylabel("devagent serve RSS (MB)")
        ax.set_ylim(bottom=0)
        ax.legend()
        fig.tight_layout()
        self._save(fig, "serve_load.png", "devagent serve RSS during a request flood")

    # -- EST: devagent next to curl + openssl --
    def est(self, benches: list[dict]) -> None:
        rows = []
        order = {"libest": 0, "lab": 1, "simpleenroll": 0, "simplereenroll": 1, "p256": 0, "rsa2048": 1}
        for b in benches:
            ei = b.get("extra_info") or {}
            if "devagent_wall_s" not in ei:
                self.notes.append(f"est entry {b.get('name')} has no client figures; left out")
                continue
            rows.append(ei)
        if not rows:
            return
        rows.sort(key=lambda e: tuple(order.get(e.get(k), 9) for k in ("server", "operation", "key_type")))
        kt = {"p256": "P-256", "rsa2048": "RSA-2048"}

        def ratio(x):
            return "–" if x is None else f"{x:.2f}"

        out = [[{"libest": "Cisco libest estserver", "lab": "lab EST server"}.get(e["server"], e["server"]),
                e["operation"], kt.get(e["key_type"], e["key_type"]), ms(e["devagent_wall_s"]),
                ms(e["devagent_cpu_s"]), ms(e["curl_openssl_wall_s"]), ms(e["curl_openssl_cpu_s"]),
                ratio(e.get("wall_ratio")), ratio(e.get("cpu_ratio")), e.get("rounds", "–")] for e in rows]
        self.w("## EST: devagent next to curl + openssl (same requests, same run)", "")
        self.w("Medians per exchange on loopback, a new TLS connection each, CSR made beforehand. devagent: "
               "`EstClient.enroll`/`renew` (parse and chain check in process); curl + openssl: `curl | base64 -d | "
               "openssl pkcs7 -print_certs` then `openssl verify`. Client CPU: this process (devagent) or its child "
               "processes (the pipeline); neither server runs in the benchmark process. Ratio = devagent / "
               "(curl + openssl) of the medians; below 1 devagent is cheaper. Servers: libest's estserver (-o) in a "
               "network namespace, the lab EST server in its own process.", "")
        self.w(*table(["server", "operation", "request key", "devagent wall ms", "devagent CPU ms",
                       "curl+openssl wall ms", "curl+openssl CPU ms", "wall ratio", "CPU ratio", "rounds"], out), "")
        first = rows[0]
        self.headline.append(
            f"EST {first['operation']} ({kt.get(first['key_type'], first['key_type'])}) against "
            f"{first['server']}: devagent {ms(first['devagent_wall_s'])} ms wall, {ms(first['devagent_cpu_s'])} ms "
            f"CPU; curl + openssl {ms(first['curl_openssl_wall_s'])} ms, {ms(first['curl_openssl_cpu_s'])} ms "
            f"(ratios {ratio(first.get('wall_ratio'))} / {ratio(first.get('cpu_ratio'))})")

    # -- validator (issue #13) --
    def validator(self, benches: list[dict]) -> None:
        cells: dict[tuple, dict] = {}
        paired = False
        for b in benches:
            e = b.get("extra_info") or {}
            if "purpose" not in e:
                continue
            cell = cells.setdefault((e["purpose"], e["key_type"], e["depth"]), {})
            if e.get("mode") in ("first", "repeat"):  # paired: old and new timed alternately within the cell
                try:
                    old_s, new_s = [float(x) for x in e["old_s"]], [float(x) for x in e["new_s"]]
                except (KeyError, TypeError, ValueError):
                    self.notes.append(f"validator {b.get('name')}: no old_s / new_s samples")
                    continue
                if not old_s or not new_s:
                    continue
                paired = True
                sfx = "" if e["mode"] == "first" else "-repeat"
                cell["new" + sfx], cell["old" + sfx] = statistics.median(new_s), statistics.median(old_s)
            else:  # data from before the pairing: one pytest-benchmark cell per impl
                med = (b.get("stats") or {}).get("median")
                if med is not None:
                    cell[e["impl"]] = med
        kt = {"p256": "P-256", "rsa2048": "RSA-2048"}
        ratio = lambda o, n: f"{o / n:.2f}" if o and n else "–"  # noqa: E731
        out, slower = [], []
        for (purpose, key, depth), v in sorted(cells.items()):
            new, rep, old = v.get("new"), v.get("new-repeat"), v.get("old")
            old_rep = v.get("old-repeat", old)  # data from before old-repeat was measured: the one old figure
            out.append([purpose, kt.get(key, key), depth, auto_time(new), auto_time(old), ratio(old, new),
                        auto_time(rep), auto_time(old_rep), ratio(old_rep, rep)])
            if new and old and new > old:
                slower.append(f"{purpose} {kt.get(key, key)} depth {depth} ({old / new:.2f})")
        if not out:
            return
        pairing = ("Old and new are timed alternately within a cell (one old call, one new call, the order swapped "
                   "every round, each on its own chain objects; every call timed on its own, median of all "
                   "rounds), so both see the same host speed phase. ") if paired else ""
        self.w("## Validator: cost per purpose, next to the code it replaced", "")
        self.w("Median of one call as the callers make it (Policy construction included): new = "
               "`keystore.validator.validate` (pyca's path validator + devagent's per-purpose checks), old = the "
               "replaced path builders loaded from git (`keystore/verify.py`, `cmp/verify.py`, EST `build_chain`). "
               "*first* = a chain no one has validated (new leaf and intermediates, fresh certificate objects; the "
               "trust anchor is the domain's, already used once, as in a running agent); *repeat* = the same "
               "chain objects again, as a flow validates them (protocol check, then verify-before-store; each CMP "
               "response). " + pairing + "Depth 2 = root -> leaf, 3 = root -> intermediate -> leaf. Ratio = "
               "old / new: above 1 the validator is faster. The old code checked less (no name constraints, policies, CMP signer "
               "role, critical extensions on every certificate; EST `build_chain` checked signatures and the "
               "intermediates' validity only, not the leaf's extensions, key or validity).", "")
        self.w(*table(["purpose", "key", "depth", "first", "old, first", "old / new", "repeat", "old, repeat",
                       "old / new"], out), "")
        if slower:
            self.w("First validation slower than the old code: " + "; ".join(slower) + ".", "")

    # -- keystore under concurrency and kill -9 (issue 20) --
    def keystore_concurrency(self, benches: list[dict]) -> None:
        rows, kills = [], []
        for b in sorted(benches, key=lambda b: b.get("name", "")):
            ei = b.get("extra_info") or {}
            cfg = ei.get("config") or {}
            if ei.get("stage") == "concurrent":
                rows.append([cfg.get("backend"), cfg.get("n"), ei.get("commands"), f"{ei.get('wall_s', 0):.1f}",
                             f"{ei.get('commands_per_s', 0):.1f}", f"{ei.get('p50_ms', 0):.0f}",
                             f"{ei.get('p99_ms', 0):.0f}", ei.get("failed")])
            elif ei.get("stage") == "kill":
                kills.append(f"{ei.get('trials')} kill -9 trials (enroll, request, renew, serve, run in turn; "
                             f"{ei.get('killed')} killed mid-way), each followed by `keystore check`: "
                             f"**{ei.get('trials_per_min', 0):.0f} trials/min**, nothing left behind.")
        if not rows and not kills:
            return
        self.w("## Many devagent processes on one keystore", "")
        if rows:
            self.w("N processes, each running request / renew (the shared LDevID and its own credential) / status / "
                   "keystore check / revoke as separate `devagent` commands against the lab CMP server "
                   "(tests/peers/keystore_load.py). Every command succeeded; nothing was left after "
                   "`keystore check`.", "")
            self.w(*table(["key backend", "N", "commands", "wall s", "commands/s", "p50 ms", "p99 ms", "failed"],
                          rows), "")
        for k in kills:
            self.w(k, "")

    # -- anything else --
    # -- CMP client CPU next to openssl cmp --
    def cmp_vs_openssl(self, benches: list[dict]) -> None:
        rows = []
        for b in benches:
            ei = b.get("extra_info") or {}
            if "openssl_cpu_ms_median" not in ei:
                continue
            f = lambda v: f"{v:.1f} ms"  # noqa: E731 -- the samples are milliseconds already
            rows.append([ei.get("server", "?"), ei.get("op", "?"), len(ei.get("openssl_cpu_ms") or ()),
                         f(ei["openssl_cpu_ms_median"]), f(ei["ours_process_cpu_ms_median"]),
                         f"{ei['ratio_process']:.1f}", f(ei["ours_inproc_cpu_ms_median"]),
                         f"{ei['ratio_inproc']:.2f}", ei.get("note") or ""])
        if not rows:
            return
        order = {"ir": 0, "cr": 1, "kur": 2, "rr": 3}
        rows.sort(key=lambda r: (r[0], order.get(r[1], 9)))
        self.w("## CMP client CPU per operation next to `openssl cmp` (same server, same run)", "")
        self.w("Client CPU (user + system) per operation, median of n runs. `openssl cmp` and *devagent, process* "
               "are whole processes (getrusage of the child: start-up, imports, the exchange); *in-process* is "
               "`time.process_time()` around the call in a warm process (the server is another process). "
               "Ratios are of medians. Servers: the Siemens MockCA (`tests/peers/mockca.py`) and OpenSSL's "
               "mock server (`openssl cmp -port`, network namespace).", "")
        self.w(*table(["server", "op", "n", "openssl cmp", "devagent, process", "ratio", "devagent, in-process",
                       "ratio", "note"], rows, ["l", "l", "r", "r", "r", "r", "r", "r", "l"]), "")

    def generic(self, group: str, benches: list[dict]) -> None:
        rows = []
        for b in sorted(benches, key=lambda b: b.get("name", "")):
            st = b.get("stats") or {}
            n = st.get("rounds") or 0
            mean, sd = st.get("mean"), st.get("stddev") or 0.0
            if mean is None:
                self.notes.append(f"{group}: {b.get('name')} has no statistics")
                continue
            if n > 1:
                half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
                ci = f"{auto_time(mean - half)} – {auto_time(mean + half)}"
            else:
                ci = "–"
            extra = b.get("extra_info") or {}
            ex = ", ".join(f"{k}={v}" for k, v in extra.items() if isinstance(v, (int, float, str)) and len(str(v)) < 40)
            rows.append([b.get("name", "?"), n, auto_time(mean), auto_time(sd), ci, auto_time(st.get("min")),
                         auto_time(st.get("max")), ex[:120]])
        if rows:
            self.w(f"## {group}", "", *table(["benchmark", "rounds", "mean", "sd", "95 % CI", "min", "max",
                                              "extra"], rows), "")

    def _save(self, fig, name: str, caption: str) -> None:
        path = self.out.parent / name
        fig.savefig(path, dpi=90)
        _pyplot().close(fig)
        self.plots.append((name, caption))

    def render(self) -> str:
        self.header()
        ci = self.data.get("commit_info") or {}
        if ci.get("id"):
            self.w(f"Measured on commit `{ci['id'][:12]}`{' (with uncommitted changes)' if ci.get('dirty') else ''}; "
                   f"every figure and plot here is generated from the committed data file `{DATA_FILE}` "
                   f"(`python benchmarks/report.py {DATA_FILE} --out REPORT.md` reproduces this report).", "")
        groups = groups_of(self.data)
        known = {"table1": self.table1, "opcua-push": self.opcua_push, "fleet": self.fleet,
                 "footprint": self.footprint, "keystore": self.keystore, "serve-load": self.serve_load, "est": self.est,
                 "cmp-vs-openssl": self.cmp_vs_openssl, "validator": self.validator,
                 "keystore-concurrency": self.keystore_concurrency}
        body_start = len(self.lines)
        for g, fn in known.items():
            if g in groups:
                try:
                    fn(groups[g])
                except Exception as e:  # a broken entry must not hide the rest of the report
                    self.notes.append(f"section {g} could not be rendered: {type(e).__name__}: {e}")
        for g in sorted(groups):
            if g not in known:
                self.generic(g, groups[g])
        if not groups:
            self.notes.append("the JSON holds no benchmarks")
        body = self.lines[body_start:]
        self.lines = self.lines[:body_start]
        if self.headline:
            self.w("## Headline", "", *[f"- {h}" for h in self.headline], "")
        self.lines.extend(body)
        if self.plots:
            self.w("## Plots", "")
            for name, caption in self.plots:
                self.w(f"![{caption}]({name})", "", f"*{caption}*", "")
        if self.notes:
            self.w("## Notes", "", *[f"- {n}" for n in self.notes], "")
        return "\n".join(self.lines).rstrip() + "\n"


_PLT = None


def _pyplot():
    global _PLT
    if _PLT is None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            _PLT = plt
        except ImportError:
            _PLT = False
    return _PLT or None


DATA_FILE = "benchmarks/data/bench.json"


def write_data(data: dict, path: Path) -> None:
    """The benchmark data to commit next to REPORT.md: pytest-benchmark's JSON with every sample the report uses
    (``stats`` including raw ``data`` when run with --benchmark-save-data, and the suites' ``extra_info`` samples),
    the host facts and ``commit_info`` (the commit measured). report.py reads it back as it reads the original."""
    keep = {k: data[k] for k in ("machine_info", "commit_info", "benchmarks", "datetime", "version") if k in data}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(keep, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# README.md and docs/performance.md quote Table 1 between these markers; ``--readme FILE`` rewrites that block from
# the data (issue 19: "the figures in README's Performance section regenerated from the committed data").
README_BEGIN = "<!-- bench:table1 (generated by benchmarks/report.py --readme; do not edit by hand) -->"
README_END = "<!-- /bench:table1 -->"
# The configurations the README quotes, in its order: REPORT.md label -> README label (the others are in REPORT.md).
README_ROWS = {
    "RSA-1024, DTLS-PSK AES-128": "RSA-1024, DTLS-PSK, AES-128",
    "RSA-2048, DTLS-PSK AES-128": "RSA-2048, DTLS-PSK, AES-128",
    "RSA-1024, OSCORE AES-256": "RSA-1024, OSCORE, AES-256",
    "RSA-2048, OSCORE AES-256": "RSA-2048, OSCORE, AES-256",
    "P-256, DTLS-PSK AES-128": "P-256, DTLS-PSK, AES-128",
    "Ed25519, DTLS-PSK AES-128": "Ed25519, DTLS-PSK, AES-128",
    "P-256, OSCORE AES-128": "P-256, OSCORE, AES-128",
    "P-256, DTLS-PSK AES-128, TPM (swtpm)": "P-256, DTLS-PSK, TPM (swtpm)",
    "P-256, DTLS-PSK AES-128, PKCS#11 (SoftHSM2)": "P-256, DTLS-PSK, PKCS#11 (SoftHSM2)",
    "P-256, DTLS-PSK AES-128, EST upstream": "P-256, DTLS-PSK, EST upstream (HTTPS)",
    "P-256, DTLS-PSK AES-128, CMP upstream": "P-256, DTLS-PSK, CMP upstream (HTTP)",
    "P-256, MicroPython agent (unix port)": "P-256, MicroPython agent (unix port)",
}


def sig3(x: float | None) -> str:
    """Seconds as milliseconds with three significant digits (2.23, 11.6, 52.9), thousands separated."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    v = x * 1000
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def readme_block(data: dict) -> list[str]:
    """The Table 1 block README.md and docs/performance.md quote: the run's date, commit and host, then the means per
    stage of the configurations in README_ROWS with the paper's Pi 3 total next to them."""
    h = (data.get("machine_info") or {}).get("devagent_host") or {}
    commit = h.get("devagent_commit") or ((data.get("commit_info") or {}).get("id") or "?")[:7]
    paper = paper_table()
    by_label = {}
    for b in groups_of(data).get("table1", []):
        ei = b.get("extra_info") or {}
        if isinstance(ei.get("stages"), dict) and isinstance(ei.get("config"), dict):
            by_label[config_label(ei["config"])] = (ei["config"], {s: summarize(v) for s, v in ei["stages"].items()})
    crypto = str(h.get("cryptography_openssl", "?")).replace("OpenSSL ", "").split(" ")[0]
    ssl_v = str(h.get("ssl_openssl", "?")).replace("OpenSSL ", "").split(" ")[0]
    ns = sorted({max((st["n"] for st in stats.values() if st), default=0) for _, stats in by_label.values()})
    n_txt = f"n = {ns[0]} per cell" if len(ns) == 1 else f"n = {ns[0]}–{ns[-1]} per cell"
    out = [README_BEGIN,
           f"Last full run ({str(data.get('datetime', '?'))[:10]}, commit {commit}): {h.get('cores', '?')} cores, "
           f"{h.get('cpu_model', '?')}, {h.get('python_impl', 'CPython')} {h.get('python', '?')}, OpenSSL {ssl_v} "
           f"(`ssl`) / {crypto} (`cryptography` {str(h.get('cryptography', '?')).split('.')[0]}),",
           f"aiocoap {h.get('aiocoap', '?')}, board profile `{h.get('board_profile', '?')}`. Means in "
           f"**milliseconds**, {n_txt}; Pi 3 = the paper's",
           "PSK column for the same key and AES length (seconds in the paper).", "",
           "| configuration | (1) CoAP CSR request | (2) key + CSR (device) | (3) CLM ↔ CA | (4) CoAP verify | "
           "(5) verify + store (device) | total | Pi 3 total |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, shown in README_ROWS.items():
        if label not in by_label:
            continue
        cfg, stats = by_label[label]
        cells = [sig3(stats[s]["mean"]) if stats.get(s) else "–" for s, _ in STAGES[:-1]]
        total = f"**{sig3(stats['total']['mean'])}**" if stats.get("total") else "–"
        cell = paper_cell(cfg)
        p = paper.get(("total", *cell)) if cell else None
        out.append(f"| {shown} | " + " | ".join(cells) + f" | {total} | {ms(p[0]) if p else '–'} |")
    out.append(README_END)
    return out


def update_readme(path: Path, data: dict) -> None:
    """Replace the block between README_BEGIN and README_END in ``path`` with ``readme_block(data)``."""
    text = path.read_text()
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{path}: no {README_BEGIN!r} ... {README_END!r} block to regenerate")
    new = text[:start] + "\n".join(readme_block(data)) + text[end + len(README_END):]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", type=Path, help="pytest-benchmark JSON (--benchmark-json)")
    p.add_argument("--out", type=Path, default=None, help="Markdown output (default: REPORT.md next to the JSON)")
    p.add_argument("--data-out", type=Path, default=None,
                   help=f"also write the data the report is generated from, to commit (``make bench``: {DATA_FILE})")
    p.add_argument("--readme", type=Path, nargs="*", default=[],
                   help="also regenerate the Table 1 block of these Markdown files (README.md, docs/performance.md)")
    a = p.parse_args(argv)
    out = a.out or a.json.with_name("REPORT.md")
    try:
        data = load(a.json)
    except (OSError, ValueError) as e:
        print(f"report: cannot read {a.json}: {e}", file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.data_out is not None:
        write_data(data, a.data_out)
    rep = Report(data, out, a.json)
    text = rep.render()
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, out)
    for md in a.readme:
        try:
            update_readme(md, data)
        except (OSError, ValueError) as e:
            print(f"report: cannot update {md}: {e}", file=sys.stderr)
            return 1
    print(f"report: wrote {out}" + "".join(f", {out.parent / n}" for n, _ in rep.plots)
          + "".join(f", {md}" for md in a.readme))
    return 0


if __name__ == "__main__":
    sys.exit(main())
