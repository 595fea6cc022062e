"""Figures 4 and 5: the control plane -- retargeting one MSI, assign + deassign as N grows."""

import statistics
import time

from ..arch.x86 import msi_address, msi_data
from ..routing import MsiEntry
from ..vm import Vm
from .config import _vector
from .results import _fmt_s, _progress
from .harness import _Pinned, _RealKvm, _close_all, _eventfds, _placement_name, _placements


# ================================================================================================
# Figure 4: retarget one MSI among N
# ================================================================================================
def _time_each(fn, reps):
    out = []
    for i in range(reps):
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
    return out


def fig_retarget(res, cfg, lib, kvm_ok, kvm_reason, out):
    n = cfg.retarget_n
    mid = n // 2
    # direct: irqfd_direct_modify of one irqfd among n
    fds = _eventfds(n)
    try:
        with Vm(irqchip=True) as vm:
            vm.create_vcpu(0)
            vm.create_vcpu(1)
            for i, fd in enumerate(fds):
                vm.irqfd_direct(fd, MsiEntry(*msi_address(0), msi_data(_vector(i))))
            entries = [MsiEntry(*msi_address(c), msi_data(_vector(mid))) for c in (1, 0)]
            direct = _time_each(lambda i: vm.irqfd_direct_modify(fds[mid], entries[i & 1]),
                                cfg.retarget_direct_reps)
    finally:
        _close_all(fds)
    d_med = statistics.median(direct)
    _progress(out, f"retarget direct among {n}: median {_fmt_s(d_med)}")
    res.measure(f"retarget[direct_modify-N={n}]", "retarget", direct, params={"n": n},
                unit="s per retarget")
    # legacy: the whole table, n legacy irqfds on GSIs 0..n-1
    fds = _eventfds(n)
    try:
        with Vm(irqchip=True) as vm:
            vm.create_vcpu(0)
            vm.create_vcpu(1)
            base = [(g, MsiEntry(*msi_address(0), msi_data(_vector(g)))) for g in range(n)]
            vm.set_gsi_routing(base)
            for g, fd in enumerate(fds):
                vm.irqfd(fd, g)

            def table(i):
                pairs = [(g, MsiEntry(*msi_address(0), msi_data(_vector(g)))) for g in range(n)]
                pairs[mid] = (mid, MsiEntry(*msi_address((i + 1) & 1), msi_data(_vector(mid))))
                vm.set_gsi_routing(pairs)
            legacy = _time_each(table, cfg.retarget_table_reps)
    finally:
        _close_all(fds)
    l_med = statistics.median(legacy)
    _progress(out, f"retarget legacy set_gsi_routing({n} entries): median {_fmt_s(l_med)}")
    res.measure(f"retarget[set_gsi_routing-N={n}]", "retarget", legacy, params={"n": n},
                unit="s per retarget (whole table, Python objects built each time)")
    res.row(f"retarget 1 of {n}: direct vs table", d_med * 1e9, "ns",
            f"set_gsi_routing({n})", l_med * 1e9, "<= 1/100x", check=lambda r: r.ratio <= 0.01)
    # real KVM: KVM_SET_GSI_ROUTING of n entries with n irqfds assigned
    if not kvm_ok:
        res.note(f"retarget vs real KVM: {kvm_reason}; skipped")
        res.row(f"retarget 1 of {n}: direct vs real KVM", d_med * 1e9, "ns",
                "KVM_SET_GSI_ROUTING", None, "<= 1/100x", note=kvm_reason)
        return
    fds = _eventfds(n)
    kvm = None
    try:
        kvm = _RealKvm()
        tables = [_RealKvm.routing(n, mid, _vector(mid) + 1), _RealKvm.routing(n)]
        kvm.set_routing(tables[1])
        kvm.irqfd_loop(lib, fds, gsi_mod=n)
        for cpu in _placements():
            with _Pinned(cpu):
                samples = _time_each(lambda i: kvm.set_routing(tables[i & 1]),
                                     cfg.retarget_kvm_reps)
            med = statistics.median(samples)
            where = _placement_name(cpu)
            _progress(out, f"retarget real KVM_SET_GSI_ROUTING({n}) {where}: median "
                           f"{_fmt_s(med)}")
            res.measure(f"retarget[real_kvm-N={n}-{where.replace(' ', '_')}]", "retarget",
                        samples, params={"n": n, "placement": where},
                        unit="s per KVM_SET_GSI_ROUTING", irqfds_assigned=n)
            res.row(f"retarget 1 of {n}: direct vs real KVM", d_med * 1e9, "ns",
                    f"KVM_SET_GSI_ROUTING {where}", med * 1e9, "<= 1/100x",
                    check=lambda r: r.ratio <= 0.01,
                    note="the target uses the unpinned row" if cpu is None else "placement (ref)")
    finally:
        if kvm is not None:
            kvm.close()
        _close_all(fds)


# ================================================================================================
# Figure 5: assign + deassign as N grows
# ================================================================================================
def assign_cycle(vm, fds, entries):
    """Assign a direct irqfd on each of ``fds`` (with ``entries``), then deassign them all.
    Returns (assign s, deassign s) per irqfd."""
    t0 = time.perf_counter()
    for fd, e in zip(fds, entries):
        vm.irqfd_direct(fd, e)
    t1 = time.perf_counter()
    for fd in fds:
        vm.irqfd_direct_deassign(fd)
    t2 = time.perf_counter()
    return (t1 - t0) / len(fds), (t2 - t1) / len(fds)


def _kvmirqfast_assign(n, reps):
    """(assign s/irqfd, deassign s/irqfd) per round, reps rounds of n irqfds."""
    fds = _eventfds(n)
    try:
        with Vm(irqchip=True) as vm:
            vm.create_vcpu(0)
            entries = [MsiEntry(*msi_address(0), msi_data(_vector(i))) for i in range(n)]
            halves = [assign_cycle(vm, fds, entries) for _ in range(reps)]
    finally:
        _close_all(fds)
    return [a for a, _ in halves], [d for _, d in halves]


def fig_assign(res, cfg, lib, kvm_ok, kvm_reason, out):
    mine = {}
    for n in cfg.assign_ns:
        reps = max(1, min(64, cfg.assign_min_ops // n))
        a_s, d_s = _kvmirqfast_assign(n, reps)
        mine[n] = (statistics.median(a_s), statistics.median(d_s))
        _progress(out, f"assign/deassign kvmirqfast N={n} ({reps} rounds): assign "
                       f"{_fmt_s(mine[n][0])}, deassign {_fmt_s(mine[n][1])} per irqfd")
        res.measure(f"assign[direct-N={n}]", "assign", a_s, params={"n": n},
                    unit="s per irqfd_direct")
        res.measure(f"deassign[direct-N={n}]", "assign", d_s, params={"n": n},
                    unit="s per irqfd_direct_deassign")
    lo, hi = min(cfg.assign_ns), max(cfg.assign_ns)
    res.row(f"assign+deassign flat: N={hi} vs N={lo}", sum(mine[hi]) * 1e9, "ns",
            f"kvmirqfast N={lo}", sum(mine[lo]) * 1e9, "<= 2x", check=lambda r: r.ratio <= 2.0)
    if not kvm_ok:
        res.note(f"assign vs real KVM: {kvm_reason}; skipped")
        res.row("deassign vs real KVM", mine[hi][1] * 1e9, "ns", "KVM_IRQFD deassign", None,
                "<= 1/10x", note=kvm_reason)
        return
    if lib is None:
        res.note("real KVM KVM_IRQFD loops run from Python (no C compiler): KVM's cost "
                 "includes ~1 us of Python per call")
    plan = [(n, None) for n in cfg.kvm_assign_ns]
    plan += [(cfg.kvm_pinned_n, cpu) for cpu in _placements() if cpu is not None]
    for n, cpu in plan:
        fds = _eventfds(n)
        kvm = None
        where = _placement_name(cpu)
        try:
            kvm = _RealKvm()
            with _Pinned(cpu):
                a = kvm.irqfd_loop(lib, fds)
                d = kvm.irqfd_loop(lib, fds, deassign=True)
        finally:
            if kvm is not None:
                kvm.close()
            _close_all(fds)
        _progress(out, f"assign/deassign real KVM N={n} {where}: assign {_fmt_s(a)}, "
                       f"deassign {_fmt_s(d)} per irqfd")
        res.measure(f"assign[real_kvm-N={n}-{where.replace(' ', '_')}]", "assign", [a],
                    params={"n": n, "placement": where}, unit="s per KVM_IRQFD assign")
        res.measure(f"deassign[real_kvm-N={n}-{where.replace(' ', '_')}]", "assign", [d],
                    params={"n": n, "placement": where}, unit="s per KVM_IRQFD deassign")
        m = mine.get(n)
        if m is None:                     # compare with our nearest N
            m = mine[min(mine, key=lambda x: abs(x - n))]
        res.row(f"deassign N={n}: vs real KVM", m[1] * 1e9, "ns", f"KVM_IRQFD deassign {where}",
                d * 1e9, "<= 1/10x", check=lambda r: r.ratio <= 0.1,
                note="placement (ref)" if cpu is not None else "")
        res.row(f"assign N={n}: vs real KVM", m[0] * 1e9, "ns", f"KVM_IRQFD assign {where}",
                a * 1e9, "(ref)")
