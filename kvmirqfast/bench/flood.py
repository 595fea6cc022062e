"""Figures 1 and 2: delivery under a flood of eventfd writes, idle and under Python load."""

import ctypes
import os
import select
import statistics
import threading
import time

from ..arch.x86 import msi_address, msi_data
from ..routing import MsiEntry
from ..vm import Vm
from .config import _vector
from .clib import _ConsumerState, _int_array
from .results import _fmt_ns, _fmt_num, _progress
from .harness import _BusyProcess, _BusyThread, _Producer, _close_all, _eventfds, _thread_cpu_ns


# ================================================================================================
# Figure 1 and 2: flood
# ================================================================================================
C_EDGE_ONLY = "C, EPOLLET without read"
C_MULTISHOT = "C, io_uring multishot reads"


class _EngineConsumer:
    name = "kvmirqfast"

    def __init__(self, fds):
        self.vm = Vm(irqchip=True, poll_ns=0)
        self.vm.create_vcpu(0)
        for i, fd in enumerate(fds):
            self.vm.irqfd_direct(fd, MsiEntry(*msi_address(0), msi_data(_vector(i))))

    def start(self):
        pass

    def snap(self):
        s = self.vm.stats()
        return s["events"], s["delivered"], s["batches"], s["cpu_ns"]

    def close(self):
        self.vm.close()


class _PythonConsumer:
    name = "pure Python"

    def __init__(self, fds):
        self.fds = fds
        self.events = self.delivered = self.batches = 0
        self._stop = False
        self.irr = bytearray(32)
        self.ep = select.epoll()
        self.vec = {fd: _vector(i) for i, fd in enumerate(fds)}
        for fd in fds:
            self.ep.register(fd, select.EPOLLIN)
        self.thread = threading.Thread(target=self._run, name="bench-pyconsumer", daemon=True)

    def _run(self):
        poll, read, vec, irr = self.ep.poll, os.eventfd_read, self.vec, self.irr
        while not self._stop:
            evs = poll(0.02)
            if not evs:
                continue
            d = 0
            for fd, _ in evs:
                try:
                    read(fd)
                except BlockingIOError:
                    continue
                v = vec[fd]
                irr[v >> 3] |= 1 << (v & 7)
                d += 1
            self.events += len(evs)
            self.delivered += d
            self.batches += 1

    def start(self):
        self.thread.start()

    def snap(self):
        return self.events, self.delivered, self.batches, _thread_cpu_ns(self.thread)

    def close(self):
        self._stop = True
        if self.thread.is_alive():
            self.thread.join()
        self.ep.close()


class _AsyncioConsumer:
    name = "asyncio"

    def __init__(self, fds):
        import asyncio
        self.fds = fds
        self.events = self.delivered = 0
        self.irr = bytearray(32)
        self.loop = asyncio.new_event_loop()
        self.vec = {fd: _vector(i) for i, fd in enumerate(fds)}
        for fd in fds:
            self.loop.add_reader(fd, self._ready, fd)
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-asyncio",
                                       daemon=True)

    def _ready(self, fd):
        self.events += 1
        try:
            os.eventfd_read(fd)
        except BlockingIOError:
            return
        v = self.vec[fd]
        self.irr[v >> 3] |= 1 << (v & 7)
        self.delivered += 1

    def start(self):
        self.thread.start()

    def snap(self):
        return self.events, self.delivered, None, _thread_cpu_ns(self.thread)

    def close(self):
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
        for fd in self.fds:
            self.loop.remove_reader(fd)
        self.loop.close()


class _CConsumer:
    name = "naive C"

    def __init__(self, fds, lib, mode=0):
        self.lib = lib
        self.mode = mode
        self.arr = _int_array(fds)
        self.k = len(fds)
        self.st = _ConsumerState()
        self.rc = None
        self.thread = threading.Thread(target=self._run, name="bench-cconsumer", daemon=True)

    def _run(self):
        if self.mode == "multishot":
            self.rc = self.lib.kb_consume_multishot(self.arr, self.k, ctypes.byref(self.st))
        else:
            self.rc = self.lib.kb_consume(self.arr, self.k, ctypes.byref(self.st), self.mode)

    def start(self):
        self.thread.start()
        while not self.st.ready and self.rc is None:
            time.sleep(0.001)
        if self.rc is not None and self.rc < 0:
            raise OSError(-self.rc, os.strerror(-self.rc))

    def snap(self):
        st = self.st
        return st.events, st.delivered, st.batches, _thread_cpu_ns(self.thread)

    def close(self):
        self.st.stop = 1
        self.thread.join()


def _make_consumer(name, fds, lib):
    if name == "kvmirqfast":
        return _EngineConsumer(fds)
    if name == "pure Python":
        return _PythonConsumer(fds)
    if name == "asyncio":
        return _AsyncioConsumer(fds)
    if name == "naive C":
        return _CConsumer(fds, lib)
    if name == "C, engine's syscalls":          # EPOLLET + preadv2(RWF_NOWAIT) + 512 events
        return _CConsumer(fds, lib, mode=7)
    if name == C_EDGE_ONLY:                      # EPOLLET, never read: KVM would consume
        return _CConsumer(fds, lib, mode=1 | 8)
    if name == C_MULTISHOT:                      # no epoll: a multishot read per eventfd
        return _CConsumer(fds, lib, mode="multishot")
    raise ValueError(name)


def flood_once(consumer_name, k, seconds, warmup, lib, busy=False, rate=0.0):
    """One flood run.  Returns a dict: cpu_ns_per (consumer CPU ns per delivered interrupt),
    rate (deliveries/s), batch (events per epoll_wait, None if unknown), delivered, produced."""
    fds = _eventfds(k)
    cons = prod = load = None
    try:
        cons = _make_consumer(consumer_name, fds, lib)
        cons.start()
        prod = _Producer(fds, lib, rate)
        prod.start()
        if busy:
            load = _BusyProcess() if busy == "process" else _BusyThread()
            load.start()
        time.sleep(warmup)
        s0, p0, t0 = cons.snap(), prod.count.value, time.perf_counter()
        time.sleep(seconds)
        s1, p1, t1 = cons.snap(), prod.count.value, time.perf_counter()
    finally:
        if load is not None:
            load.close()
        if prod is not None:
            prod.close()
        if cons is not None:
            cons.close()
        _close_all(fds)
    events, delivered = s1[0] - s0[0], s1[1] - s0[1]
    batches = None if s0[2] is None else s1[2] - s0[2]
    cpu = None if s0[3] is None or s1[3] is None else s1[3] - s0[3]
    return {"consumer": consumer_name, "k": k, "seconds": t1 - t0, "events": events,
            "delivered": delivered, "produced": p1 - p0,
            "rate": delivered / (t1 - t0),
            "cpu_ns_per": (cpu / delivered) if (cpu is not None and delivered) else None,
            "cpu_share": (cpu / 1e9 / (t1 - t0)) if cpu is not None else None,
            "batch": (events / batches) if batches else None}


def _median_of(runs, key):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def fig_flood(res, cfg, lib, lib_reason, out):
    consumers = ["kvmirqfast", "pure Python", "asyncio"]
    consumers += ["naive C", "C, engine's syscalls", C_EDGE_ONLY, C_MULTISHOT] if lib else []
    if lib is None:
        res.note(f"flood: {lib_reason}; producer is a Python writer (it may be the bottleneck)")
    summary = {}
    for k in cfg.flood_ks:
        runs = {c: [] for c in consumers}
        for rnd in range(cfg.flood_rounds):
            for c in list(consumers):
                try:
                    r = flood_once(c, k, cfg.flood_seconds, cfg.flood_warmup, lib)
                except OSError as exc:
                    if c != C_MULTISHOT:
                        raise
                    res.note(f"flood: {C_MULTISHOT} skipped: {exc.strerror or exc} (the kernel "
                             "needs io_uring READ_MULTISHOT, Linux 6.7+)")
                    consumers.remove(c)
                    del runs[c]
                    continue
                runs[c].append(r)
                _progress(out, f"flood K={k} round {rnd + 1}/{cfg.flood_rounds} {c}: "
                               f"{_fmt_ns(r['cpu_ns_per'])}/delivery, {r['rate']:,.0f}/s, "
                               f"batch {_fmt_num(r['batch'])}")
        for c in consumers:
            med = {key: _median_of(runs[c], key) for key in ("cpu_ns_per", "rate", "batch",
                                                             "cpu_share")}
            summary[(c, k)] = med
            res.measure(f"flood[{c}-K={k}]", "flood",
                        [r["cpu_ns_per"] / 1e9 for r in runs[c] if r["cpu_ns_per"]],
                        params={"consumer": c, "k": k},
                        unit="s consumer CPU per delivered interrupt",
                        deliveries_per_s=med["rate"], avg_batch=med["batch"],
                        consumer_cpu_share=med["cpu_share"],
                        runs=[{kk: v for kk, v in r.items()} for r in runs[c]])
    for k in cfg.flood_ks:
        mine = summary[("kvmirqfast", k)]
        base = summary.get(("naive C", k))
        res.row(f"flood K={k}: CPU/delivery", mine["cpu_ns_per"], "ns", "naive C",
                base["cpu_ns_per"] if base else None, "<= 1.0x",
                check=lambda r: r.ratio <= 1.0,
                note="" if base else "no C compiler")
        notes = {"C, engine's syscalls": "EPOLLET + preadv2(RWF_NOWAIT), 512/batch: the "
                                         "engine's syscalls in a C loop",
                 C_EDGE_ONLY: "one delivery per edge, counter never read (not KVM's semantics): "
                              "what skipping the read would buy",
                 C_MULTISHOT: "no epoll: a multishot read per eventfd, run in the consumer's "
                              "io_uring_enter; KVM's semantics (the counter is consumed): the "
                              "path past epoll"}
        for c in ("pure Python", "asyncio", "C, engine's syscalls", C_EDGE_ONLY, C_MULTISHOT):
            b = summary.get((c, k))
            if b is not None:
                res.row(f"flood K={k}: CPU/delivery", mine["cpu_ns_per"], "ns", c,
                        b["cpu_ns_per"], "(ref)",
                        note=notes.get(c, "") if k == cfg.flood_ks[0] else "")
        res.row(f"flood K={k}: deliveries/s", mine["rate"], "/s", "naive C",
                base["rate"] if base else None, "(ref)")
        res.row(f"flood K={k}: avg batch", mine["batch"], "ev", "naive C",
                base["batch"] if base else None, "(ref)")
    kmin, kmax = min(cfg.flood_ks), max(cfg.flood_ks)
    res.row(f"flood flat in K: K={kmax} vs K={kmin}", summary[("kvmirqfast", kmax)]["cpu_ns_per"],
            "ns", f"kvmirqfast K={kmin}", summary[("kvmirqfast", kmin)]["cpu_ns_per"], "<= 1.2x",
            check=lambda r: r.ratio <= 1.2)

    def growth(c):
        lo, hi = summary.get((c, kmin)), summary.get((c, kmax))
        if lo and hi and lo["cpu_ns_per"] and hi["cpu_ns_per"]:
            return hi["cpu_ns_per"] / lo["cpu_ns_per"]
        return None
    mine_growth = growth("kvmirqfast")
    for c in ("naive C", "C, engine's syscalls", C_MULTISHOT):   # the kernel's growth in K
        if mine_growth and growth(c):
            res.row(f"flood growth K={kmin} -> {kmax}", mine_growth, "x", c, growth(c), "(ref)",
                    note=f"CPU/delivery at K={kmax} over K={kmin}, for kvmirqfast and for a C "
                         "consumer: growth C shows too is the kernel's (a cold eventfd, epitem "
                         "and file per event)" if c == "naive C" else "")
    # Saturated, a consumer's CPU per delivery depends on whether it keeps up (small batches,
    # a wake-up each) or falls behind (large batches).  Paced at a rate every consumer keeps up
    # with, all pay the same wake-ups: the like-for-like figure.
    if lib is not None and cfg.flood_paced_rate:
        k = cfg.pyload_k
        paced = {}
        for c in ("kvmirqfast", "naive C"):
            r = flood_once(c, k, cfg.flood_seconds, cfg.flood_warmup, lib,
                           rate=cfg.flood_paced_rate)
            paced[c] = r
            _progress(out, f"flood K={k} paced at {cfg.flood_paced_rate:,.0f} writes/s {c}: "
                           f"{_fmt_ns(r['cpu_ns_per'])}/delivery, batch {_fmt_num(r['batch'])}")
            res.measure(f"flood_paced[{c}-K={k}]", "flood_paced",
                        [r["cpu_ns_per"] / 1e9] if r["cpu_ns_per"] else [],
                        params={"consumer": c, "k": k, "paced_writes_per_s": cfg.flood_paced_rate},
                        unit="s consumer CPU per delivered interrupt", avg_batch=r["batch"])
        res.row(f"flood K={k} paced {cfg.flood_paced_rate / 1e3:,.0f}k/s: CPU/delivery",
                paced["kvmirqfast"]["cpu_ns_per"], "ns", "naive C", paced["naive C"]["cpu_ns_per"],
                "(ref)", note="below every consumer's capacity: each wakes per small batch")
    return summary


def fig_pyload(res, cfg, lib, out):
    k = cfg.pyload_k
    out_rows = {}
    for c in ("kvmirqfast", "pure Python") + (("naive C",) if lib is not None else ()):
        idle = flood_once(c, k, cfg.flood_seconds, cfg.flood_warmup, lib)
        loaded = flood_once(c, k, cfg.flood_seconds, cfg.flood_warmup, lib, busy=True)
        frac = loaded["rate"] / idle["rate"] if idle["rate"] else None
        out_rows[c] = (idle, loaded, frac)
        _progress(out, f"python load K={k} {c}: idle {idle['rate']:,.0f}/s, loaded "
                       f"{loaded['rate']:,.0f}/s ({_fmt_num(frac * 100 if frac else None)}%)")
        res.measure(f"pyload[{c}-K={k}]", "pyload",
                    [1.0 / loaded["rate"] if loaded["rate"] else None],
                    params={"consumer": c, "k": k}, unit="s per delivery under Python load",
                    idle_rate=idle["rate"], loaded_rate=loaded["rate"], fraction_of_idle=frac,
                    idle_cpu_ns_per=idle["cpu_ns_per"], loaded_cpu_ns_per=loaded["cpu_ns_per"],
                    loaded_cpu_share=loaded["cpu_share"], idle_cpu_share=idle["cpu_share"])
    # Control: the busy loop in another process (CPU contention, no GIL) for the engine.
    ctl = flood_once("kvmirqfast", k, cfg.flood_seconds, cfg.flood_warmup, lib, busy="process")
    idle_rate = out_rows["kvmirqfast"][0]["rate"]
    ctl_frac = ctl["rate"] / idle_rate if idle_rate else None
    _progress(out, f"python load K={k} kvmirqfast, busy loop in another process instead: "
                   f"{ctl['rate']:,.0f}/s ({_fmt_num(ctl_frac * 100 if ctl_frac else None)}%)")
    res.measure(f"pyload_process_control[kvmirqfast-K={k}]", "pyload",
                [1.0 / ctl["rate"] if ctl["rate"] else None], params={"k": k},
                unit="s per delivery, busy process", fraction_of_idle=ctl_frac,
                cpu_share=ctl["cpu_share"])
    mine, base = out_rows["kvmirqfast"][2], out_rows["pure Python"][2]
    res.row(f"python load K={k}: rate loaded/idle", mine, "frac", "pure Python", base,
            ">= 0.90 of idle", check=lambda r: r.value >= 0.90,
            note=f"{os.cpu_count()} CPUs: producer + consumer + busy thread = 3 runnable threads")
    res.row(f"python load K={k}: rate loaded/idle", mine, "frac",
            "kvmirqfast, busy *process*", ctl_frac, "(ref)",
            note="same CPU contention without any GIL: ratio ~1 means the loss is CPU, not GIL")
    if "naive C" in out_rows:
        res.row(f"python load K={k}: rate loaded/idle", mine, "frac", "naive C, same busy thread",
                out_rows["naive C"][2], "(ref)",
                note="a C consumer beside the same Python thread (no GIL in its way): what the "
                     "CPUs left to any consumer; the engine's CPU share loaded: "
                     f"{_fmt_num(out_rows['kvmirqfast'][1]['cpu_share'])}")
    # The same flood paced below capacity: does the engine keep up while Python is busy?
    idle = out_rows["kvmirqfast"][0]
    if lib is not None and idle["rate"]:
        rate = idle["rate"] * 0.25
        paced = {}
        for c in ("kvmirqfast", "pure Python"):
            r = flood_once(c, k, cfg.flood_seconds, cfg.flood_warmup, lib, busy=True, rate=rate)
            paced[c] = r["delivered"] / r["produced"] if r["produced"] else None
            _progress(out, f"python load, paced at {rate:,.0f} writes/s, {c}: "
                           f"{r['rate']:,.0f} deliveries/s (coalesced writes count once)")
            res.measure(f"pyload_paced[{c}-K={k}]", "pyload",
                        [1.0 / r["rate"] if r["rate"] else None],
                        params={"consumer": c, "k": k, "paced_writes_per_s": rate},
                        unit="s per delivery", deliveries_per_write=paced[c],
                        cpu_ns_per=r["cpu_ns_per"])
        res.row(f"python load, paced {rate / 1e3:,.0f}k writes/s: deliveries/write",
                paced["kvmirqfast"], "frac", "pure Python", paced["pure Python"], "(ref)",
                note="1.0 = every write delivered separately")
