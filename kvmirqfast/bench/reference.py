"""Figures 6 and 7: memory per irqfd, and the kernel's own cost per eventfd write."""

import json
import os
import subprocess
import sys

from .. import uapi
from ..arch.x86 import msi_address, msi_data
from ..routing import MsiEntry
from ..vm import Vm
from .config import _vector
from .clib import _int_array
from .results import _fmt_ns, _progress
from .harness import _RealKvm, _close_all, _eventfds


# ================================================================================================
# Figure 6: memory
# ================================================================================================
def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_probe(n):
    """In a fresh process: RSS and Python-heap growth for n direct irqfds.  Returns a dict."""
    import tracemalloc
    fds = _eventfds(n)
    try:
        with Vm(irqchip=True) as vm:
            vm.create_vcpu(0)
            entries = [MsiEntry(*msi_address(0), msi_data(_vector(i))) for i in range(n)]
            tracemalloc.start()
            rss0 = _rss_bytes()
            heap0 = tracemalloc.get_traced_memory()[0]
            for fd, e in zip(fds, entries):
                vm.irqfd_direct(fd, e)
            heap1 = tracemalloc.get_traced_memory()[0]
            tracemalloc.stop()
            rss1 = _rss_bytes()
    finally:
        _close_all(fds)
    return {"n": n, "rss_before": rss0, "rss_after": rss1, "rss_per": (rss1 - rss0) / n,
            "heap_per": (heap1 - heap0) / n}


def fig_memory(res, cfg, out):
    from .._engine import IrqfdRecord
    native = IrqfdRecord.native_size()
    n = cfg.memory_n
    # A fresh interpreter, so that free memory left by earlier figures does not hide the growth.
    code = (f"import json, kvmirqfast.bench as b; print(json.dumps(b.memory_probe({n})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                              [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
                              + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                 if p])))
    if proc.returncode != 0:
        res.note(f"memory probe failed: {proc.stderr.strip()[-300:]}")
        m = memory_probe(n)
    else:
        m = json.loads(proc.stdout.strip().splitlines()[-1])
    _progress(out, f"memory: native {native} B/irqfd; RSS +{m['rss_after'] - m['rss_before']:,} B "
                   f"for {n} irqfds = {m['rss_per']:.0f} B/irqfd (Python heap "
                   f"{m['heap_per']:.0f} B/irqfd)")
    res.measure("memory[native_size]", "memory", [native], unit="bytes per irqfd (native)")
    res.measure(f"memory[rss-N={n}]", "memory", [m["rss_per"]], params={"n": n},
                unit="bytes of RSS per irqfd", **m)
    res.row("memory: native bytes/irqfd", native, "B", None, None, "<= 256 B",
            check=lambda r: r.value <= 256)
    res.row(f"memory: RSS growth/irqfd (N={n})", m["rss_per"], "B", None, None, "(ref)",
            note="fresh process; the Python record, index and entry objects; the kernel's "
                 "eventfd/epoll memory is not in RSS")
    res.row(f"memory: Python heap/irqfd (N={n})", m["heap_per"], "B", None, None, "(ref)",
            note="tracemalloc")


# ================================================================================================
# Figure 7: kernel reference
# ================================================================================================
def fig_kernel(res, cfg, lib, lib_reason, kvm_ok, kvm_reason, out):
    if lib is None:
        res.note(f"kernel reference: {lib_reason}; skipped")
        return
    for k in cfg.kernel_ks:
        iters = cfg.kernel_writes
        # unbound eventfds
        fds = _eventfds(k)
        try:
            unbound = lib.kb_write_rr(_int_array(fds), k, iters) / iters
        finally:
            _close_all(fds)
        # kvmirqfast direct irqfds (the engine consumes concurrently)
        fds = _eventfds(k)
        try:
            with Vm(irqchip=True) as vm:
                vm.create_vcpu(0)
                for i, fd in enumerate(fds):
                    vm.irqfd_direct(fd, MsiEntry(*msi_address(0), msi_data(_vector(i))))
                mine = lib.kb_write_rr(_int_array(fds), k, iters) / iters
        finally:
            _close_all(fds)
        real = None
        if kvm_ok:
            fds = _eventfds(k)
            kvm = None
            try:
                kvm = _RealKvm(vcpu=True)
                kvm.set_routing(_RealKvm.routing(min(k, uapi.KVM_MAX_IRQ_ROUTES)))
                kvm.irqfd_loop(lib, fds)
                real = lib.kb_write_rr(_int_array(fds), k, iters) / iters
            finally:
                if kvm is not None:
                    kvm.close()
                _close_all(fds)
        _progress(out, f"eventfd write K={k}: kvmirqfast irqfd {_fmt_ns(mine)}, real KVM irqfd "
                       f"{_fmt_ns(real)}, unbound {_fmt_ns(unbound)}")
        res.measure(f"write[kvmirqfast-K={k}]", "kernel", [mine / 1e9], params={"k": k},
                    unit="s per eventfd write (writer side)")
        res.measure(f"write[unbound-K={k}]", "kernel", [unbound / 1e9], params={"k": k},
                    unit="s per eventfd write")
        if real is not None:
            res.measure(f"write[real_kvm-K={k}]", "kernel", [real / 1e9], params={"k": k},
                        unit="s per eventfd write (kernel delivers inside write)")
        res.row(f"eventfd write K={k} (writer side)", mine, "ns", "real KVM irqfd", real,
                "(ref)", note="" if kvm_ok else kvm_reason)
        res.row(f"eventfd write K={k} (writer side)", mine, "ns", "unbound eventfd", unbound,
                "(ref)")
    if not kvm_ok:
        res.note(f"kernel reference: {kvm_reason}; real KVM column empty")
