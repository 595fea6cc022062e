"""Measured rows and results, with their statistics."""

import datetime
import statistics




# ================================================================================================
# Results
# ================================================================================================
class Row:
    """One line of the table: a kvmirqfast figure against one baseline (or a target alone)."""

    def __init__(self, figure, value, unit, baseline=None, baseline_value=None, target=None,
                 check=None, ratio=None, note=""):
        self.figure = figure
        self.value = value                 # kvmirqfast's number (None: not measured)
        self.unit = unit
        self.baseline = baseline           # baseline name, or None
        self.baseline_value = baseline_value
        if ratio is None and value is not None and baseline_value:
            ratio = value / baseline_value
        self.ratio = ratio                 # kvmirqfast / baseline
        self.target = target               # text, e.g. "<= 1.0x"
        self.check = check                 # callable(row) -> bool, or None (reference only)
        self.note = note

    @property
    def met(self):
        if self.check is None or self.value is None:
            return None
        if self.baseline is not None and self.baseline_value is None:
            return None
        return bool(self.check(self))

    def as_dict(self):
        return {"figure": self.figure, "kvmirqfast": self.value, "unit": self.unit,
                "baseline": self.baseline, "baseline_value": self.baseline_value,
                "ratio": self.ratio, "target": self.target, "met": self.met, "note": self.note}


class BenchResult:
    def __init__(self, config):
        self.config = config
        self.rows = []
        self.measurements = []             # pytest-benchmark-like entries
        self.notes = []                    # skips and placement notes
        self.started = datetime.datetime.now(datetime.timezone.utc)

    def row(self, *a, **kw):
        r = Row(*a, **kw)
        self.rows.append(r)
        return r

    def measure(self, name, group, samples_s, params=None, **extra):
        """Record a measurement; ``samples_s`` are seconds per operation (one or more rounds)."""
        samples = [float(s) for s in samples_s if s is not None]
        if not samples:
            return
        self.measurements.append({"name": name, "group": group, "params": params or {},
                                  "stats": _stats(samples), "extra_info": extra})

    def note(self, text):
        self.notes.append(text)


def _stats(samples):
    s = sorted(samples)
    n = len(s)
    q1 = s[n // 4]
    q3 = s[(3 * n) // 4] if n > 1 else s[0]
    mean = sum(s) / n
    return {"min": s[0], "max": s[-1], "mean": mean,
            "stddev": statistics.stdev(s) if n > 1 else 0.0,
            "median": statistics.median(s), "q1": q1, "q3": q3, "iqr": q3 - q1,
            "rounds": n, "iterations": 1, "total": sum(s),
            "ops": (1.0 / mean) if mean > 0 else 0.0}


def _pct(sorted_vals, p):
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, int(round(p / 100.0 * (len(sorted_vals) - 1)))))
    return sorted_vals[i]


def _progress(out, text):
    if out is not None:
        out.write(f"[bench] {text}\n")
        out.flush()


def _fmt_ns(ns):
    if ns is None:
        return "-"
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e4:
        return f"{ns / 1e3:.1f} us"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} us"
    return f"{ns:.0f} ns"


def _fmt_s(s):
    return _fmt_ns(None if s is None else s * 1e9)


def _fmt_num(x):
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.2f}" if abs(x) < 10 else f"{x:.1f}"


def _fmt_value(v, unit):
    if v is None:
        return "-"
    if unit == "ns":
        return _fmt_ns(v)
    if unit == "frac":
        return f"{v * 100:.1f}%" if v >= 0.01 or v == 0 else f"{v * 100:.2f}%"
    if unit == "/s":
        return f"{v / 1e3:,.0f}k/s" if v >= 1e4 else f"{v:,.0f}/s"
    if unit == "B":
        return f"{v:,.0f} B"
    return f"{_fmt_num(v)} {unit}".strip()


def _fmt_ratio(r):
    if r is None:
        return "-"
    if r >= 100:
        return f"{r:,.0f}x"
    if r < 0.1 and r > 0:
        return f"1/{1 / r:,.0f}x"
    return f"{r:.2f}x"
