"""Running the figures, and the table, JSON and plot made of them."""

import json
import os
import platform
import sys
import time

from .config import Config, FIGURES
from .clib import c_library
from .results import BenchResult, _fmt_ratio, _fmt_value, _progress
from .harness import kvm_usable
from .flood import fig_flood, fig_pyload
from .pingpong import fig_pingpong
from .control import fig_assign, fig_retarget
from .reference import fig_kernel, fig_memory


# ================================================================================================
# Driver, table, JSON, plot
# ================================================================================================
def run(quick=False, only=None, out=None, config=None):
    """Run the figures (all, or those named in ``only``) and return a ``BenchResult``.

    ``config`` (a ``Config``) overrides ``quick``.  Progress lines go to ``out`` (None: silent).
    """
    cfg = config or (Config.quick() if quick else Config.full())
    only = list(FIGURES if not only else only)
    bad = [f for f in only if f not in FIGURES]
    if bad:
        raise ValueError(f"unknown figure(s) {bad}; choose from {', '.join(FIGURES)}")
    res = BenchResult(cfg)
    lib, lib_reason = c_library()
    if lib is None:
        res.note(lib_reason)
        _progress(out, lib_reason)
    kvm_ok, kvm_reason = kvm_usable()
    if not kvm_ok:
        res.note(f"real KVM: {kvm_reason}")
        _progress(out, f"real KVM figures skipped: {kvm_reason}")
    res.note("CPU placement: kvmirqfast and C baselines unpinned; real-KVM rows say their "
             "placement, and the target uses the unpinned row")
    t0 = time.perf_counter()
    for fig in FIGURES:
        if fig not in only:
            continue
        _progress(out, f"--- {fig} ---")
        if fig == "flood":
            fig_flood(res, cfg, lib, lib_reason, out)
        elif fig == "pyload":
            fig_pyload(res, cfg, lib, out)
        elif fig == "pingpong":
            fig_pingpong(res, cfg, lib, lib_reason, out)
        elif fig == "retarget":
            fig_retarget(res, cfg, lib, kvm_ok, kvm_reason, out)
        elif fig == "assign":
            fig_assign(res, cfg, lib, kvm_ok, kvm_reason, out)
        elif fig == "memory":
            fig_memory(res, cfg, out)
        elif fig == "kernel":
            fig_kernel(res, cfg, lib, lib_reason, kvm_ok, kvm_reason, out)
    res.seconds = time.perf_counter() - t0
    _progress(out, f"done in {res.seconds:.1f} s")
    return res












def format_table(res):
    """The table (figure, kvmirqfast, baseline, its value, ratio, target, met) as text."""
    head = ("figure", "kvmirqfast", "baseline", "baseline value", "ratio", "target", "met")
    lines = []
    for r in res.rows:
        met = r.met
        lines.append((r.figure, _fmt_value(r.value, r.unit), r.baseline or "-",
                      _fmt_value(r.baseline_value, r.unit) if r.baseline else "-",
                      _fmt_ratio(r.ratio) if r.baseline else "-", r.target or "-",
                      "-" if met is None else ("yes" if met else "NO")))
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h)
              for i, h in enumerate(head)]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = [f"kvmirqfast bench ({res.config.name}; ratio = kvmirqfast / baseline, same run; "
           f"{os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release()})",
           fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*x) for x in lines]
    targets = [r for r in res.rows if r.met is not None]
    out.append("")
    out.append(f"targets met: {sum(r.met for r in targets)}/{len(targets)}")
    notes = [f"{r.figure} vs {r.baseline or '-'}: {r.note}" for r in res.rows if r.note]
    for n in res.notes + notes:
        out.append(f"note: {n}")
    return "\n".join(out)


def machine_info():
    info = {"node": platform.node(), "processor": platform.processor(),
            "machine": platform.machine(),
            "python_implementation": platform.python_implementation(),
            "python_version": platform.python_version(), "system": platform.system(),
            "release": platform.release(), "cpu": {"count": os.cpu_count()}}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"]["brand_raw"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def to_json(res):
    """A pytest-benchmark-like document: machine_info, benchmarks (name, stats, extra_info)."""
    from .. import __version__
    benches = []
    for m in res.measurements:
        benches.append({"group": m["group"], "name": m["name"],
                        "fullname": f"kvmirqfast.bench::{m['name']}", "params": m["params"],
                        "param": None, "options": {"timer": "perf_counter"},
                        "stats": m["stats"], "extra_info": m["extra_info"]})
    return {"machine_info": machine_info(), "commit_info": {},
            "benchmarks": benches, "datetime": res.started.isoformat(),
            "version": f"kvmirqfast-bench {__version__}",
            "kvmirqfast": {"config": res.config.name, "seconds": getattr(res, "seconds", None),
                           "table": [r.as_dict() for r in res.rows], "notes": res.notes}}


def write_json(res, path):
    with open(path, "w") as f:
        json.dump(to_json(res), f, indent=2, default=str)


def have_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def _series(res, group, key_of):
    """{series label: [(x, median seconds), ...] sorted by x} from the measurements of a group."""
    out = {}
    for m in res.measurements:
        if m["group"] != group:
            continue
        kx = key_of(m)
        if kx is not None:
            label, x = kx
            out.setdefault(label, []).append((x, m["stats"]["median"]))
    return {label: sorted(points) for label, points in out.items()}


def _flood_key(m):
    p = m["params"]
    return (p["consumer"], p["k"]) if "consumer" in p and "k" in p else None


def _assign_key(m):
    p = m["params"]
    if p.get("placement", "unpinned") != "unpinned":
        return None                            # the pinned real-KVM runs are one N only
    op = "deassign" if m["name"].startswith("deassign") else "assign"
    who = "real KVM_IRQFD" if "real_kvm" in m["name"] else "kvmirqfast"
    return f"{who} {op}", p["n"]


def _plot_lines(ax, series, xlabel, title):
    for label, points in series.items():
        xs, ys = zip(*points)
        style = "--" if label.startswith(("real", "C", "naive")) else "-"
        ax.plot(xs, [y * 1e9 for y in ys], style, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ns (median of rounds)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def write_plot(res, path):
    """The figure people look at (needs matplotlib): consumer CPU per delivered interrupt
    against K for kvmirqfast and each baseline; assign and deassign cost per irqfd against N,
    kvmirqfast and real KVM; and every targeted ratio against its target."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    flood = _series(res, "flood", _flood_key)
    assign = _series(res, "assign", _assign_key)
    rows = [r for r in res.rows if r.met is not None and r.ratio is not None]
    lines = [(flood, "K (eventfds written round-robin)",
              "flood: consumer CPU per delivered interrupt"),
             (assign, "N (irqfds assigned)", "assign / deassign, per irqfd")]
    lines = [x for x in lines if x[0]]
    height = (4.5 if lines else 0) + (0.4 * len(rows) + 1.5 if rows else 0)
    fig = plt.figure(figsize=(12, max(height, 3)))
    grid = fig.add_gridspec(2 if (lines and rows) else 1, max(1, len(lines)),
                            height_ratios=[4.5, 0.4 * len(rows) + 1.5] if (lines and rows)
                            else None)
    for col, (series, xlabel, title) in enumerate(lines):
        _plot_lines(fig.add_subplot(grid[0, col]), series, xlabel, title)
    if rows:
        ax = fig.add_subplot(grid[1 if lines else 0, :])
        labels = [f"{r.figure} vs {r.baseline}" if r.baseline else r.figure for r in rows]
        vals = [r.ratio if r.baseline else r.value for r in rows]
        ax.barh(range(len(rows)), vals, color=["tab:green" if r.met else "tab:red" for r in rows])
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.set_xscale("log")
        pos = [v for v in vals if v and v > 0]
        if pos:                                  # room for the value and target after each bar
            ax.set_xlim(min(pos) / 2, max(pos) * 8)
        ax.invert_yaxis()
        for i, r in enumerate(rows):
            shown = _fmt_ratio(vals[i]) if r.baseline else _fmt_value(r.value, r.unit)
            ax.text(vals[i], i, f"  {shown}  (target {r.target})", va="center", fontsize=7)
        ax.set_xlabel("ratio kvmirqfast / baseline (log); green = target met")
    fig.suptitle(f"kvmirqfast bench ({res.config.name}, same-run baselines)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args):
    """Entry point of ``kvmirqfast bench`` (args from cli.py)."""
    if args.plot and not have_matplotlib():
        print("kvmirqfast bench: --plot needs matplotlib, which is not installed "
              "(pip install 'kvmirqfast[plot]'); nothing was run", file=sys.stderr)
        return 2
    only = [x.strip() for x in args.only.split(",")] if args.only else None
    try:
        res = run(quick=args.quick, only=only, out=None if args.quiet else sys.stderr)
    except ValueError as e:
        print(f"kvmirqfast bench: {e}", file=sys.stderr)
        return 2
    print(format_table(res))
    if args.json:
        write_json(res, args.json)
        print(f"kvmirqfast bench: wrote {args.json}", file=sys.stderr)
    if args.plot:
        write_plot(res, args.plot)
        print(f"kvmirqfast bench: wrote {args.plot}", file=sys.stderr)
    return 0
