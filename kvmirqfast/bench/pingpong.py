"""Figure 3: device -> vCPU -> device round-trip latency, blocking and halt-polling."""

import ctypes
import functools
import os
import select
import threading
import time

from ..arch.x86 import msi_address, msi_data
from ..routing import MsiEntry
from ..vm import Vm
from .harness import _Pinned, _placements
from .results import _fmt_ns, _pct, _progress


# ================================================================================================
# Figure 3: ping-pong latency
# ================================================================================================
def _pp_kvmirqfast(lib, iters, poll_ns, budget_s, engine_poll_ns=None, harvest=True,
                   vcpu_cpu=None, settle_s=0.0):
    """Round trips (ns): C device -> direct irqfd -> Python vCPU thread -> answer eventfd.

    Shaped as the C ping-pong (kb_pp_c): the calling thread is the device, a new thread the
    vCPU (the responder); once the vCPU is halted the device rests ``settle_s`` (see
    fig_pingpong), then writes.  ``vcpu_cpu`` pins the vCPU thread (the caller's placement is
    the device's)."""
    spin = poll_ns > 0
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    ans = os.eventfd(0, os.EFD_CLOEXEC | (os.EFD_NONBLOCK if spin else 0))
    samples = (ctypes.c_uint64 * iters)()
    done = ctypes.c_int(0)
    errors = []
    try:
        engine_poll = poll_ns if engine_poll_ns is None else engine_poll_ns
        with Vm(irqchip=True, poll_ns=engine_poll) as vm:
            vm.vcpu_harvest = harvest
            cpu = vm.create_vcpu(0)
            vm.irqfd_direct(efd, MsiEntry(*msi_address(0), msi_data(0x41)))

            def vcpu_loop():
                try:
                    if vcpu_cpu is not None:
                        os.sched_setaffinity(0, {vcpu_cpu})   # this thread only
                    # As a Python VMM writes its hot loop: methods bound once.
                    wait, ack, eoi, answer = cpu.wait_interrupt, cpu.ack, cpu.eoi, os.eventfd_write
                    while not done.value:
                        if wait(0.1, poll_ns):
                            ack()
                            eoi()
                            answer(ans, 1)
                except BaseException as exc:     # noqa: BLE001 -- reported by the caller
                    errors.append(exc)
                    done.value = 1
                    os.eventfd_write(ans, 1)     # release the device from its read()

            vcpu = threading.Thread(target=vcpu_loop, name="bench-vcpu", daemon=True)
            vcpu.start()
            try:
                deadline = time.monotonic() + 5.0
                while not (vm._engine.halted() or errors) and time.monotonic() < deadline:
                    time.sleep(0.001)
                time.sleep(settle_s)
                n = lib.kb_pp_device(efd, ans, iters, poll_ns, int(budget_s * 1e9), samples,
                                     ctypes.byref(done))
            finally:
                done.value = 1
                vcpu.join()
            if errors:
                raise errors[0]
    finally:
        os.close(efd)
        os.close(ans)
    return list(samples[:n])


def _pp_work_kvmirqfast(iters):
    """ns per round trip with no wake-up: one thread writes the irqfd's eventfd, takes the
    interrupt (wait_interrupt harvests it: epoll_wait, the counter read, the LAPIC), acks, EOIs,
    writes the answer and reads it back, as the device would."""
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    ans = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        with Vm(irqchip=True) as vm:
            vm.vcpu_harvest = True
            cpu = vm.create_vcpu(0)
            vm.irqfd_direct(efd, MsiEntry(*msi_address(0), msi_data(0x41)))
            wait, ack, eoi = cpu.wait_interrupt, cpu.ack, cpu.eoi
            write, read = os.eventfd_write, os.eventfd_read
            t0 = time.perf_counter_ns()
            for _ in range(iters):
                write(efd, 1)
                if not wait(1.0, 0):
                    raise RuntimeError("ping-pong work: the interrupt did not arrive")
                ack()
                eoi()
                write(ans, 1)
                read(ans)
            return (time.perf_counter_ns() - t0) / iters
    finally:
        os.close(efd)
        os.close(ans)


def _pp_work_python(iters):
    """The same without an engine, in pure Python: epoll.poll(0) and a read for the vCPU side."""
    a = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    b = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    ep = select.epoll()
    try:
        ep.register(a, select.EPOLLIN)
        poll, write, read = ep.poll, os.eventfd_write, os.eventfd_read
        t0 = time.perf_counter_ns()
        for _ in range(iters):
            write(a, 1)
            if poll(0):
                read(a)
            write(b, 1)
            read(b)
        return (time.perf_counter_ns() - t0) / iters
    finally:
        ep.close()
        os.close(a)
        os.close(b)


def _pp_work_c(lib, iters, use_epoll):
    ns = lib.kb_pp_work(iters, 1 if use_epoll else 0)
    if ns < 0:
        raise OSError(-ns, os.strerror(-ns))
    return float(ns)


C_BLOCKING, C_SPINNING, C_EPOLL, C_EPOLL_SPINNING = 0, 1, 2, 3   # kb_pp_c responder modes


def _pp_c(lib, iters, mode, budget_s, responder_cpu=None, settle_s=0.0):
    """C round trips (ns); the caller's placement is the device's, ``responder_cpu`` the
    responder's (None: inherited).  The device rests ``settle_s`` once the responder waits."""
    samples = (ctypes.c_uint64 * iters)()
    n = lib.kb_pp_c(iters, mode, int(budget_s * 1e9), samples,
                    -1 if responder_cpu is None else responder_cpu, int(settle_s * 1e9))
    if n < 0:
        raise OSError(-n, os.strerror(-n))
    return list(samples[:n])


def _drop_warmup(samples):
    return samples[len(samples) // 20:] if len(samples) > 40 else samples   # drop warm-up


def _lat_summary(samples):
    s = sorted(samples)
    return {"median": _pct(s, 50), "p99": _pct(s, 99), "n": len(s)}


def fig_pingpong(res, cfg, lib, lib_reason, out):
    if lib is None:
        res.note(f"ping-pong: {lib_reason}; skipped (the device side is C)")
        return
    runs = {}
    # Each run starts from rest: once the responder (vCPU) waits, the device thread sleeps
    # pp_settle_s before its first write.  This kernel's scheduler puts a woken thread on its
    # waker's CPU only while the waker's recent CPU use is low, and the two threads then stay
    # where the first wake-ups put them: C's blocking ping-pong right after a busy second ran
    # on two CPUs 10 times in 10 (~70 us a round trip), after 0.2 s of rest on one CPU 10 in
    # 10 (~2 us); ours, started right after its own setup, 1 in 3 runs on two CPUs.  Without
    # the rest, whatever ran just before would pick the placement, and with it the row.
    pp = functools.partial(_pp_kvmirqfast, lib, settle_s=cfg.pp_settle_s)
    pc = functools.partial(_pp_c, lib, settle_s=cfg.pp_settle_s)
    blk, spn, secs, poll = cfg.pp_blocking_iters, cfg.pp_spin_iters, cfg.pp_seconds, cfg.pp_poll_ns
    plan = [("kvmirqfast blocking", lambda: pp(blk, 0, secs)),
            ("C blocking", lambda: pc(blk, C_BLOCKING, secs)),
            ("C blocking, epoll_wait + read", lambda: pc(blk, C_EPOLL, secs)),
            ("kvmirqfast blocking, engine delivers", lambda: pp(blk, 0, secs, harvest=False)),
            (f"kvmirqfast poll {poll // 1000}us", lambda: pp(spn, poll, secs)),
            ("C spinning", lambda: pc(spn, C_SPINNING, secs)),
            ("C spinning, epoll_wait(0) + read", lambda: pc(spn, C_EPOLL_SPINNING, secs)),
            (f"kvmirqfast vCPU poll {poll // 1000}us, engine blocking",
             lambda: pp(spn, poll, secs, engine_poll_ns=0))]
    # Blocking again with every thread on one CPU (threads inherit the creator's affinity): no
    # cross-CPU wake-ups, so what is left is the work done per round trip.
    one_cpu = _placements()[-1]
    if one_cpu is not None:
        def on_one_cpu(fn):
            def run():
                with _Pinned(one_cpu):
                    return fn()
            return run
        plan += [(f"{name}, CPU{one_cpu} only", on_one_cpu(fn)) for name, fn in plan
                 if name in ("kvmirqfast blocking", "C blocking", "C blocking, epoll_wait + read")]
    # And with the device on one CPU and the vCPU (responder) on the other, for every variant:
    # unpinned, where the scheduler puts the two threads decides much of the round trip.
    cpus = [c for c in _placements() if c is not None]
    apart = (cpus[0], cpus[1]) if len(cpus) >= 2 else None
    if apart is not None:
        dev, vcpu = apart

        def ours_apart():
            with _Pinned(dev):
                return pp(blk, 0, secs, vcpu_cpu=vcpu)

        def c_apart(mode):
            def run():
                with _Pinned(dev):
                    return pc(blk, mode, secs, responder_cpu=vcpu)
            return run
        plan += [("kvmirqfast blocking, apart", ours_apart),
                 ("C blocking, apart", c_apart(C_BLOCKING)),
                 ("C blocking, epoll_wait + read, apart", c_apart(C_EPOLL))]
    pooled = {name: [] for name, _ in plan}
    for rnd in range(cfg.pp_rounds):            # interleaved: a shift in the machine hits all
        for name, fn in plan:
            pooled[name] += _drop_warmup(fn())
    for name, _ in plan:
        samples = pooled[name]
        runs[name] = _lat_summary(samples)
        _progress(out, f"ping-pong {name}: median {_fmt_ns(runs[name]['median'])}, "
                       f"p99 {_fmt_ns(runs[name]['p99'])} ({runs[name]['n']} round trips)")
        res.measure(f"pingpong[{name}]", "pingpong", [x / 1e9 for x in samples],
                    params={"mode": name}, unit="s per round trip", p99_ns=runs[name]["p99"])
    # The work per round trip with no wake-up at all (one thread makes both sides' calls): what
    # is left of the blocking gap once no thread sleeps.  Median of interleaved rounds.
    work = {"kvmirqfast": [], "C read": [], "C epoll_wait(0) + read": [],
            "pure Python epoll.poll(0) + read": []}
    for rnd in range(max(3, cfg.pp_rounds)):
        work["kvmirqfast"].append(_pp_work_kvmirqfast(cfg.pp_spin_iters))
        work["C read"].append(_pp_work_c(lib, cfg.pp_spin_iters, False))
        work["C epoll_wait(0) + read"].append(_pp_work_c(lib, cfg.pp_spin_iters, True))
        work["pure Python epoll.poll(0) + read"].append(_pp_work_python(cfg.pp_spin_iters))
    work_med = {name: sorted(v)[len(v) // 2] for name, v in work.items()}
    for name, v in work.items():
        _progress(out, f"ping-pong work, one thread, {name}: {_fmt_ns(work_med[name])} "
                       "per round trip")
        res.measure(f"pingpong_work[{name}]", "pingpong", [x / 1e9 for x in v],
                    params={"mode": name}, unit="s per round trip, one thread")
    kb, cb = runs["kvmirqfast blocking"], runs["C blocking"]
    kp, cs = runs[f"kvmirqfast poll {cfg.pp_poll_ns // 1000}us"], runs["C spinning"]
    res.row("ping-pong blocking: median", kb["median"], "ns", "C blocking", cb["median"],
            "<= 1.1x", check=lambda r: r.ratio <= 1.1,
            note="the halted vCPU sleeps in epoll_wait and takes the write itself: one wake-up "
                 "per leg, as C; then a read of the counter and the Python vCPU loop")
    res.row("ping-pong blocking: median", kb["median"], "ns", "C blocking, epoll_wait + read",
            runs["C blocking, epoll_wait + read"]["median"], "(ref)",
            note="C responder with the harvesting vCPU's syscalls (epoll_wait, then read)")
    res.row("ping-pong blocking: median", kb["median"], "ns",
            "kvmirqfast, engine delivers", runs["kvmirqfast blocking, engine delivers"]["median"],
            "(ref)", note="vcpu_harvest=False: device -> engine thread -> vCPU, two wake-ups")
    res.row("ping-pong blocking: p99", kb["p99"], "ns", "C blocking", cb["p99"], "(ref)")
    if one_cpu is not None:
        k1 = runs[f"kvmirqfast blocking, CPU{one_cpu} only"]
        for base in ("C blocking", "C blocking, epoll_wait + read"):
            res.row(f"ping-pong blocking, all on CPU{one_cpu}: median", k1["median"], "ns",
                    base, runs[f"{base}, CPU{one_cpu} only"]["median"], "(ref)",
                    note="device, vCPU and engine threads on one CPU: no cross-CPU wake-ups, "
                         "the work per round trip" if base == "C blocking" else "")
    if apart is not None:
        ka = runs["kvmirqfast blocking, apart"]
        for base in ("C blocking", "C blocking, epoll_wait + read"):
            res.row(f"ping-pong blocking, device CPU{apart[0]} vCPU CPU{apart[1]}: median",
                    ka["median"], "ns", base, runs[f"{base}, apart"]["median"], "(ref)",
                    note="every variant with the same placement: a cross-CPU wake-up per leg"
                    if base == "C blocking" else "")
    for base in ("C read", "C epoll_wait(0) + read", "pure Python epoll.poll(0) + read"):
        res.row("ping-pong work, one thread, no wake-up", work_med["kvmirqfast"], "ns", base,
                work_med[base], "(ref)",
                note="each side's system calls and code, no thread sleeps: the engine's part "
                     "(io_uring read, LAPIC, bookkeeping) and the Python vCPU loop's"
                if base == "C read" else "")
    res.row(f"ping-pong poll {cfg.pp_poll_ns // 1000}us: median", kp["median"], "ns",
            "C spinning", cs["median"], "<= 1.25x", check=lambda r: r.ratio <= 1.25,
            note="the polling vCPU harvests the eventfds itself, the engine stands aside; "
                 "the rest is the Python vCPU loop (ack, EOI, reply write)")
    res.row(f"ping-pong poll {cfg.pp_poll_ns // 1000}us: median", kp["median"], "ns",
            "C spinning, epoll_wait(0) + read", runs["C spinning, epoll_wait(0) + read"]["median"],
            "(ref)", note="C responder with the polling vCPU's syscalls: the floor of "
                          "epoll-based readiness for many eventfds")
    res.row(f"ping-pong poll {cfg.pp_poll_ns // 1000}us: p99", kp["p99"], "ns", "C spinning",
            cs["p99"], "(ref)")
    kv = runs[f"kvmirqfast vCPU poll {cfg.pp_poll_ns // 1000}us, engine blocking"]
    res.row("ping-pong vCPU poll, engine blocks: median", kv["median"], "ns", "C spinning",
            cs["median"], "(ref)", note="vCPU halt-polls (and harvests); the engine does not poll")
    res.row("ping-pong vCPU poll, engine blocks: p99", kv["p99"], "ns", "C spinning", cs["p99"],
            "(ref)")
