"""``kvmirqfast bench``: the figures that prove (or disprove) the design, each with its baselines.

Every ratio is taken between numbers measured in the same process run, as /work/shared/PERF.md
asks (the machine is shared and noisy).  The figures:

1. ``flood``     K eventfds written round-robin by one C producer thread; consumer CPU ns per
                 delivered interrupt for the engine vs a pure-Python epoll loop, an asyncio loop and
                 a naive C epoll loop (level-triggered, one read() per event).
2. ``pyload``    the K=1024 flood while a CPU-bound pure-Python thread runs: delivery rate vs idle.
3. ``pingpong``  device thread -> direct irqfd -> vCPU thread in ``wait_interrupt`` -> ack, EOI ->
                 answer eventfd -> device thread; blocking and halt-polling, vs C ping-pong.
4. ``retarget``  one MSI among 4096: ``irqfd_direct_modify`` vs a 4096-entry ``set_gsi_routing``
                 vs real KVM's ``KVM_SET_GSI_ROUTING`` (with 4096 irqfds assigned).
5. ``assign``    assign + deassign cost per irqfd as N grows, vs real KVM ``KVM_IRQFD``.
6. ``memory``    native bytes per irqfd and RSS growth per irqfd.
7. ``kernel``    ns per eventfd write: kvmirqfast direct irqfd vs real KVM irqfd vs unbound.

The C baselines (and the C producer / ping-pong device) are compiled at run time with the system
compiler (``$CC`` or ``cc``) into a shared object loaded with ctypes; ctypes drops the GIL during
each call, so the C threads never wait for Python.  Without a compiler the C baselines are
skipped with a message and the producer falls back to a Python writer.  Real-KVM figures are
skipped with the reason where ``/dev/kvm`` is not usable.

Use ``run(quick=..., only=[...])`` -> ``BenchResult``; then ``format_table(result)`` and
``to_json(result)``.
"""

import atexit
import ctypes
import datetime
import fcntl
import json
import os
import platform
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from . import uapi
from .arch.x86 import msi_address, msi_data
from .routing import MsiEntry
from .vm import Vm

FIGURES = ("flood", "pyload", "pingpong", "retarget", "assign", "memory", "kernel")
FIRST_VECTOR = 0x20


def _vector(i):
    return FIRST_VECTOR + i % (256 - FIRST_VECTOR)


# ================================================================================================
# Configuration
# ================================================================================================
class Config:
    """Sizes and durations of one run.  ``Config.full()``, ``.quick()``, ``.tiny()`` (tests)."""

    def __init__(self, **kw):
        self.name = "full"
        self.flood_ks = (16, 1024, 16384)
        self.flood_seconds = 1.0
        self.flood_warmup = 0.2
        self.flood_rounds = 3            # median of rounds, consumers interleaved
        self.pyload_k = 1024
        self.pp_blocking_iters = 3000
        self.pp_spin_iters = 20000
        self.pp_seconds = 2.0            # time cap per ping-pong run
        self.pp_poll_ns = 200_000
        self.retarget_n = 4096
        self.retarget_direct_reps = 400
        self.retarget_table_reps = 7
        self.retarget_kvm_reps = 40
        self.assign_ns = (16, 256, 1024, 4096, 16384)
        self.assign_min_ops = 4096       # repeat small N until this many ops
        self.kvm_assign_ns = (16, 1024, 4096)
        self.kvm_pinned_n = 1024         # N for the pinned real-KVM deassign runs
        self.memory_n = 16000
        self.kernel_ks = (1, 1024)
        self.kernel_writes = 200_000
        self.__dict__.update(kw)

    @classmethod
    def full(cls):
        return cls()

    @classmethod
    def quick(cls):
        return cls(name="quick", flood_ks=(16, 1024, 4096), flood_seconds=0.3, flood_warmup=0.1,
                   flood_rounds=1, pp_blocking_iters=800, pp_spin_iters=3000, pp_seconds=0.7,
                   retarget_n=4096, retarget_direct_reps=100, retarget_table_reps=2,
                   retarget_kvm_reps=10, assign_ns=(16, 1024, 4096), assign_min_ops=1024,
                   kvm_assign_ns=(16, 1024), kvm_pinned_n=1024, memory_n=4000,
                   kernel_ks=(1, 256), kernel_writes=50_000)

    @classmethod
    def tiny(cls):
        """The smallest run that still exercises every code path (the smoke test)."""
        return cls(name="tiny", flood_ks=(16, 64), flood_seconds=0.1, flood_warmup=0.03,
                   flood_rounds=1, pyload_k=64, pp_blocking_iters=100, pp_spin_iters=300,
                   pp_seconds=0.2, retarget_n=256, retarget_direct_reps=20,
                   retarget_table_reps=1, retarget_kvm_reps=3, assign_ns=(16, 128),
                   assign_min_ops=64, kvm_assign_ns=(16,), kvm_pinned_n=16, memory_n=256,
                   kernel_ks=(1,), kernel_writes=5000)


# ================================================================================================
# The C side: baselines, producer, ping-pong device, real-KVM loops
# ================================================================================================
C_SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static inline void relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Producer: write 1 to fds[0..k) round-robin until *stop.  rate > 0 paces it (events/s). */
uint64_t kb_produce(const int *fds, int k, volatile int *stop, double rate,
                    volatile uint64_t *count)
{
    uint64_t one = 1, n = 0, t0 = now_ns();
    int i = 0, j;
    while (!*stop) {
        for (j = 0; j < 64; j++) {
            if (write(fds[i], &one, 8) == 8)
                n++;
            if (++i == k)
                i = 0;
        }
        *count = n;
        if (rate > 0) {
            uint64_t due = t0 + (uint64_t)((double)n * 1e9 / rate), t = now_ns();
            if (due > t) {
                struct timespec ts = { (time_t)((due - t) / 1000000000ull),
                                       (long)((due - t) % 1000000000ull) };
                nanosleep(&ts, NULL);
            }
        }
    }
    return n;
}

/* Naive C consumer: level-triggered epoll_wait + one read() per event, set an IRR bit.
   mode bits (for profiling the engine's choices): 1 = EPOLLET, 2 = preadv2(RWF_NOWAIT) instead
   of read(), 4 = batches of 512 events (the engine's MAX_EVENTS) instead of 1024. */
struct kb_consumer {
    volatile uint64_t events, delivered, batches;
    volatile int stop;
    int ready;
    uint32_t irr[8];
};

#define KB_MAX_EVENTS 1024
int kb_consume(const int *fds, int k, struct kb_consumer *st, int mode)
{
    struct epoll_event ev, evs[KB_MAX_EVENTS];
    uint64_t v;
    struct iovec iov = { &v, 8 };
    int epfd = epoll_create1(EPOLL_CLOEXEC), i, n, r;
    int maxev = (mode & 4) ? 512 : KB_MAX_EVENTS;
    if (epfd < 0)
        return -errno;
    for (i = 0; i < k; i++) {
        ev.events = EPOLLIN | ((mode & 1) ? EPOLLET : 0);
        ev.data.u64 = (uint64_t)i;
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, fds[i], &ev) < 0) {
            int e = errno;
            close(epfd);
            return -e;
        }
    }
    st->ready = 1;
    while (!st->stop) {
        n = epoll_wait(epfd, evs, maxev, 20);
        if (n <= 0)
            continue;
        for (i = 0; i < n; i++) {
            int idx = (int)evs[i].data.u64;
            if (mode & 2)
                r = (int)preadv2(fds[idx], &iov, 1, -1, RWF_NOWAIT);
            else
                r = (int)read(fds[idx], &v, 8);
            if (r == 8) {
                int vec = 0x20 + idx % 224;
                st->irr[vec >> 5] |= 1u << (vec & 31);
                st->delivered++;
            }
        }
        st->events += n;
        st->batches++;
    }
    close(epfd);
    return 0;
}

/* Wait for an eventfd: spin up to spin_ns with non-blocking reads, then block. */
static int wait_fd(int fd, uint64_t spin_ns, int nonblock)
{
    uint64_t v, t0;
    struct pollfd p;
    if (!nonblock)
        return read(fd, &v, 8) == 8 ? 0 : -1;
    t0 = spin_ns ? now_ns() : 0;
    for (;;) {
        if (read(fd, &v, 8) == 8)
            return 0;
        if (errno != EAGAIN)
            return -1;
        if (spin_ns && now_ns() - t0 < spin_ns) {
            relax();
            continue;
        }
        p.fd = fd;
        p.events = POLLIN;
        poll(&p, 1, -1);
    }
}

/* Ping-pong device side: write out_fd, wait for in_fd; one round-trip sample (ns) per iteration.
   in_fd must be non-blocking iff spin_ns > 0.  Returns the number of samples taken. */
int kb_pp_device(int out_fd, int in_fd, int iters, uint64_t spin_ns, uint64_t budget_ns,
                 uint64_t *samples, volatile int *done)
{
    uint64_t one = 1, start = now_ns(), t0;
    int i;
    for (i = 0; i < iters; i++) {
        if (now_ns() - start > budget_ns)
            break;
        t0 = now_ns();
        if (write(out_fd, &one, 8) != 8)
            break;
        if (wait_fd(in_fd, spin_ns, spin_ns != 0) < 0)
            break;
        samples[i] = now_ns() - t0;
    }
    *done = 1;
    return i;
}

struct pp_resp { int a, b, iters; uint64_t spin; volatile int *done; };

static void *pp_responder(void *arg)
{
    struct pp_resp *r = arg;
    uint64_t one = 1, v;
    for (;;) {
        if (r->spin) {
            while (read(r->a, &v, 8) != 8) {
                if (*r->done)
                    return NULL;
                relax();
            }
        } else if (read(r->a, &v, 8) != 8) {
            return NULL;
        }
        if (*r->done)
            return NULL;
        write(r->b, &one, 8);
    }
}

/* C ping-pong between two threads: blocking reads (spin = 0) or both sides spinning. */
int kb_pp_c(int iters, int spin, uint64_t budget_ns, uint64_t *samples)
{
    volatile int done = 0;
    uint64_t big = 1;
    int flags = EFD_CLOEXEC | (spin ? EFD_NONBLOCK : 0), n;
    struct pp_resp r;
    pthread_t t;
    r.a = eventfd(0, flags);
    r.b = eventfd(0, flags);
    r.iters = iters;
    r.spin = spin;
    r.done = &done;
    if (r.a < 0 || r.b < 0)
        return -errno;
    pthread_create(&t, NULL, pp_responder, &r);
    n = kb_pp_device(r.a, r.b, iters, spin ? ~0ull : 0, budget_ns, samples, &done);
    write(r.a, &big, 8);              /* release a responder blocked in read() */
    pthread_join(t, NULL);
    close(r.a);
    close(r.b);
    return n;
}

/* ns for `iters` eventfd writes round-robin over fds[0..k). */
uint64_t kb_write_rr(const int *fds, int k, uint64_t iters)
{
    uint64_t one = 1, t0 = now_ns(), i;
    int j = 0;
    for (i = 0; i < iters; i++) {
        write(fds[j], &one, 8);
        if (++j == k)
            j = 0;
    }
    return now_ns() - t0;
}

/* KVM_IRQFD on fds[0..n) (gsi = i % gsi_mod): ns in total, or -errno. */
int64_t kb_irqfd_loop(int vmfd, unsigned long req, const int *fds, int n, uint32_t gsi_mod,
                      uint32_t flags)
{
    struct { uint32_t fd, gsi, flags, resamplefd; uint8_t pad[16]; } a;
    uint64_t t0 = now_ns();
    int i;
    for (i = 0; i < n; i++) {
        memset(&a, 0, sizeof(a));
        a.fd = (uint32_t)fds[i];
        a.gsi = (uint32_t)i % gsi_mod;
        a.flags = flags;
        if (ioctl(vmfd, req, &a) < 0)
            return -errno;
    }
    return (int64_t)(now_ns() - t0);
}
"""


class _ConsumerState(ctypes.Structure):
    _fields_ = [("events", ctypes.c_uint64), ("delivered", ctypes.c_uint64),
                ("batches", ctypes.c_uint64), ("stop", ctypes.c_int), ("ready", ctypes.c_int),
                ("irr", ctypes.c_uint32 * 8)]


_CLIB = None
_CLIB_REASON = None


def c_library():
    """Compile (once per process) and load the C helpers.  Returns (lib or None, reason)."""
    global _CLIB, _CLIB_REASON
    if _CLIB is not None or _CLIB_REASON is not None:
        return _CLIB, _CLIB_REASON
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        _CLIB_REASON = "no C compiler (set $CC or install cc): C baselines skipped"
        return None, _CLIB_REASON
    tmp = tempfile.mkdtemp(prefix="kvmirqfast-bench-")
    atexit.register(shutil.rmtree, tmp, True)
    src, so = os.path.join(tmp, "kb.c"), os.path.join(tmp, "kb.so")
    with open(src, "w") as f:
        f.write(C_SOURCE)
    proc = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-pthread", "-o", so, src],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        _CLIB_REASON = f"{cc} failed: {proc.stderr.strip()[:300]}; C baselines skipped"
        return None, _CLIB_REASON
    lib = ctypes.CDLL(so)                     # CDLL: every call releases the GIL
    P = ctypes.POINTER
    u64, i32 = ctypes.c_uint64, ctypes.c_int
    lib.kb_produce.argtypes = [P(i32), i32, P(i32), ctypes.c_double, P(u64)]
    lib.kb_produce.restype = u64
    lib.kb_consume.argtypes = [P(i32), i32, P(_ConsumerState), i32]
    lib.kb_consume.restype = i32
    lib.kb_pp_device.argtypes = [i32, i32, i32, u64, u64, P(u64), P(i32)]
    lib.kb_pp_device.restype = i32
    lib.kb_pp_c.argtypes = [i32, i32, u64, P(u64)]
    lib.kb_pp_c.restype = i32
    lib.kb_write_rr.argtypes = [P(i32), i32, u64]
    lib.kb_write_rr.restype = u64
    lib.kb_irqfd_loop.argtypes = [i32, ctypes.c_ulong, P(i32), i32, ctypes.c_uint32,
                                  ctypes.c_uint32]
    lib.kb_irqfd_loop.restype = ctypes.c_int64
    _CLIB = lib
    return lib, None


def _int_array(values):
    return (ctypes.c_int * len(values))(*values)


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


# ================================================================================================
# Helpers: threads, CPU clocks, real KVM
# ================================================================================================
def _thread_cpu_ns(thread):
    try:
        return time.clock_gettime_ns(time.pthread_getcpuclockid(thread.ident))
    except (OSError, AttributeError, TypeError):
        return None


class _Producer:
    """One writer thread, round-robin over the eventfds: C (GIL-free) or a Python fallback."""

    def __init__(self, fds, lib, rate=0.0):
        self.fds = fds
        self.lib = lib
        self.rate = rate
        self.stop = ctypes.c_int(0)
        self.count = ctypes.c_uint64(0)
        self._py_stop = False
        self.thread = threading.Thread(target=self._run, name="bench-producer", daemon=True)

    def _run(self):
        if self.lib is not None:
            arr = _int_array(self.fds)
            self.lib.kb_produce(arr, len(self.fds), ctypes.byref(self.stop), self.rate,
                                ctypes.byref(self.count))
            return
        fds, write, n = self.fds, os.eventfd_write, 0
        while not self._py_stop:
            for fd in fds:
                write(fd, 1)
            n += len(fds)
            self.count.value = n

    def start(self):
        self.thread.start()

    def close(self):
        self.stop.value = 1
        self._py_stop = True
        self.thread.join()


class _BusyProcess:
    """The same CPU-bound loop in another process: CPU contention without the GIL (a control)."""

    def __init__(self):
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])

    def close(self):
        self.proc.kill()
        self.proc.wait()


class _BusyThread:
    """A CPU-bound pure-Python thread (the 'Python VMM is busy' load)."""

    def __init__(self):
        self._stop = False
        self.iterations = 0
        self.thread = threading.Thread(target=self._run, name="bench-busy", daemon=True)

    def _run(self):
        n = 0
        while not self._stop:
            n += 1
        self.iterations = n

    def start(self):
        self.thread.start()

    def close(self):
        self._stop = True
        self.thread.join()


def kvm_usable():
    """(True, "") if /dev/kvm can create a VM with an irqchip, else (False, reason)."""
    try:
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, f"/dev/kvm not usable ({e.strerror})"
    try:
        vm = fcntl.ioctl(kvm, uapi.KVM_CREATE_VM, 0)
        try:
            fcntl.ioctl(vm, uapi.KVM_CREATE_IRQCHIP, 0)
        finally:
            os.close(vm)
    except OSError as e:
        return False, f"real KVM VM with irqchip failed ({e.strerror})"
    finally:
        os.close(kvm)
    return True, ""


class _RealKvm:
    """A real KVM VM fd with an in-kernel irqchip (and optionally vCPU 0 with an enabled LAPIC)."""

    def __init__(self, vcpu=False):
        self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        self.fd = fcntl.ioctl(self.kvm, uapi.KVM_CREATE_VM, 0)
        self.vcpu = None
        fcntl.ioctl(self.fd, uapi.KVM_CREATE_IRQCHIP, 0)
        if vcpu:
            self.vcpu = fcntl.ioctl(self.fd, uapi.KVM_CREATE_VCPU, 0)
            st = bytearray(fcntl.ioctl(self.vcpu, uapi.KVM_GET_LAPIC,
                                       bytes(uapi.LAPIC_STATE_SIZE)))
            uapi.set_lapic_reg(st, uapi.APIC_SPIV, uapi.lapic_reg(st, uapi.APIC_SPIV) | 0x1FF)
            fcntl.ioctl(self.vcpu, uapi.KVM_SET_LAPIC, bytes(st))

    @staticmethod
    def routing(n, changed=None, vector=None):
        entries = []
        for g in range(n):
            vec = vector if (changed is not None and g == changed) else _vector(g)
            entries.append(uapi.pack_msi_entry(g, *msi_address(0), msi_data(vec)))
        return uapi.pack_routing(entries)

    def set_routing(self, buf):
        fcntl.ioctl(self.fd, uapi.KVM_SET_GSI_ROUTING, buf)

    def irqfd_loop(self, lib, fds, deassign=False, gsi_mod=4096):
        """Assign (or deassign) every fd; seconds per irqfd.  In C when available."""
        flags = uapi.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        if lib is not None:
            ns = lib.kb_irqfd_loop(self.fd, uapi.KVM_IRQFD, _int_array(fds), len(fds), gsi_mod,
                                   flags)
            if ns < 0:
                raise OSError(-ns, os.strerror(-ns))
            return ns / 1e9 / len(fds)
        t0 = time.perf_counter()
        for i, fd in enumerate(fds):
            fcntl.ioctl(self.fd, uapi.KVM_IRQFD, uapi.pack_irqfd(fd, i % gsi_mod, flags))
        return (time.perf_counter() - t0) / len(fds)

    def close(self):
        if self.vcpu is not None:
            os.close(self.vcpu)
        os.close(self.fd)
        os.close(self.kvm)


class _Pinned:
    """Pin the calling thread to one CPU for the block (None: leave the placement alone)."""

    def __init__(self, cpu):
        self.cpu = cpu
        self.saved = None

    def __enter__(self):
        if self.cpu is not None:
            self.saved = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {self.cpu})
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            os.sched_setaffinity(0, self.saved)


def _placements():
    """Real-KVM placements to report: unpinned, then each of the first two CPUs we may use."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = []
    return [None] + allowed[:2]


def _placement_name(cpu):
    return "unpinned" if cpu is None else f"pinned CPU{cpu}"


def _eventfds(n, nonblock=True):
    flags = os.EFD_CLOEXEC | (os.EFD_NONBLOCK if nonblock else 0)
    out = []
    try:
        for _ in range(n):
            out.append(os.eventfd(0, flags))
    except OSError:
        _close_all(out)
        raise
    return out


def _close_all(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# ================================================================================================
# Figure 1 and 2: flood
# ================================================================================================
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
    consumers += ["naive C", "C, engine's syscalls"] if lib else []
    if lib is None:
        res.note(f"flood: {lib_reason}; producer is a Python writer (it may be the bottleneck)")
    summary = {}
    for k in cfg.flood_ks:
        runs = {c: [] for c in consumers}
        for rnd in range(cfg.flood_rounds):
            for c in consumers:
                r = flood_once(c, k, cfg.flood_seconds, cfg.flood_warmup, lib)
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
        for c in ("pure Python", "asyncio", "C, engine's syscalls"):
            b = summary.get((c, k))
            if b is not None:
                res.row(f"flood K={k}: CPU/delivery", mine["cpu_ns_per"], "ns", c,
                        b["cpu_ns_per"], "(ref)",
                        note="EPOLLET + preadv2(RWF_NOWAIT), 512/batch: the engine's syscalls "
                             "in a C loop" if c.startswith("C,") and k == cfg.flood_ks[0] else "")
        res.row(f"flood K={k}: deliveries/s", mine["rate"], "/s", "naive C",
                base["rate"] if base else None, "(ref)")
        res.row(f"flood K={k}: avg batch", mine["batch"], "ev", "naive C",
                base["batch"] if base else None, "(ref)")
    kmin, kmax = min(cfg.flood_ks), max(cfg.flood_ks)
    res.row(f"flood flat in K: K={kmax} vs K={kmin}", summary[("kvmirqfast", kmax)]["cpu_ns_per"],
            "ns", f"kvmirqfast K={kmin}", summary[("kvmirqfast", kmin)]["cpu_ns_per"], "<= 1.2x",
            check=lambda r: r.ratio <= 1.2)
    return summary


def fig_pyload(res, cfg, lib, out):
    k = cfg.pyload_k
    out_rows = {}
    for c in ("kvmirqfast", "pure Python"):
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


# ================================================================================================
# Figure 3: ping-pong latency
# ================================================================================================
def _pp_kvmirqfast(lib, iters, poll_ns, budget_s, engine_poll_ns=None):
    """Round trips (ns): C device thread -> direct irqfd -> Python vCPU thread -> answer fd."""
    spin = poll_ns > 0
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    ans = os.eventfd(0, os.EFD_CLOEXEC | (os.EFD_NONBLOCK if spin else 0))
    samples = (ctypes.c_uint64 * iters)()
    done = ctypes.c_int(0)
    count = [0]
    try:
        engine_poll = poll_ns if engine_poll_ns is None else engine_poll_ns
        with Vm(irqchip=True, poll_ns=engine_poll) as vm:
            cpu = vm.create_vcpu(0)
            vm.irqfd_direct(efd, MsiEntry(*msi_address(0), msi_data(0x41)))

            def device():
                count[0] = lib.kb_pp_device(efd, ans, iters, poll_ns, int(budget_s * 1e9),
                                            samples, ctypes.byref(done))

            dev = threading.Thread(target=device, name="bench-device", daemon=True)
            dev.start()
            try:
                while not done.value:
                    if cpu.wait_interrupt(timeout=0.1, poll_ns=poll_ns):
                        cpu.ack()
                        cpu.eoi()
                        os.eventfd_write(ans, 1)
            finally:
                while dev.is_alive():            # never leave the device blocked in read()
                    os.eventfd_write(ans, 1)
                    dev.join(0.01)
    finally:
        os.close(efd)
        os.close(ans)
    return list(samples[:count[0]])


def _pp_c(lib, iters, spin, budget_s):
    samples = (ctypes.c_uint64 * iters)()
    n = lib.kb_pp_c(iters, int(spin), int(budget_s * 1e9), samples)
    if n < 0:
        raise OSError(-n, os.strerror(-n))
    return list(samples[:n])


def _lat_summary(samples):
    s = sorted(samples[len(samples) // 20:] if len(samples) > 40 else samples)  # drop warm-up
    return {"median": _pct(s, 50), "p99": _pct(s, 99), "n": len(s)}


def fig_pingpong(res, cfg, lib, lib_reason, out):
    if lib is None:
        res.note(f"ping-pong: {lib_reason}; skipped (the device side is C)")
        return
    runs = {}
    plan = [("kvmirqfast blocking", lambda: _pp_kvmirqfast(lib, cfg.pp_blocking_iters, 0,
                                                           cfg.pp_seconds)),
            ("C blocking", lambda: _pp_c(lib, cfg.pp_blocking_iters, False, cfg.pp_seconds)),
            (f"kvmirqfast poll {cfg.pp_poll_ns // 1000}us",
             lambda: _pp_kvmirqfast(lib, cfg.pp_spin_iters, cfg.pp_poll_ns, cfg.pp_seconds)),
            ("C spinning", lambda: _pp_c(lib, cfg.pp_spin_iters, True, cfg.pp_seconds)),
            (f"kvmirqfast vCPU poll {cfg.pp_poll_ns // 1000}us, engine blocking",
             lambda: _pp_kvmirqfast(lib, cfg.pp_spin_iters, cfg.pp_poll_ns, cfg.pp_seconds,
                                    engine_poll_ns=0))]
    for name, fn in plan:
        samples = fn()
        runs[name] = _lat_summary(samples)
        _progress(out, f"ping-pong {name}: median {_fmt_ns(runs[name]['median'])}, "
                       f"p99 {_fmt_ns(runs[name]['p99'])} ({runs[name]['n']} round trips)")
        res.measure(f"pingpong[{name}]", "pingpong", [x / 1e9 for x in samples],
                    params={"mode": name}, unit="s per round trip", p99_ns=runs[name]["p99"])
    kb, cb = runs["kvmirqfast blocking"], runs["C blocking"]
    kp, cs = runs[f"kvmirqfast poll {cfg.pp_poll_ns // 1000}us"], runs["C spinning"]
    res.row("ping-pong blocking: median", kb["median"], "ns", "C blocking", cb["median"],
            "<= 1.1x", check=lambda r: r.ratio <= 1.1,
            note="device -> engine -> vCPU: 2 wake-ups per leg to C's 1")
    res.row("ping-pong blocking: p99", kb["p99"], "ns", "C blocking", cb["p99"], "(ref)")
    res.row(f"ping-pong poll {cfg.pp_poll_ns // 1000}us: median", kp["median"], "ns",
            "C spinning", cs["median"], "<= 1.25x", check=lambda r: r.ratio <= 1.25,
            note="3 spinning threads (device, engine, vCPU) on "
                 f"{os.cpu_count()} CPUs vs C's 2")
    res.row(f"ping-pong poll {cfg.pp_poll_ns // 1000}us: p99", kp["p99"], "ns", "C spinning",
            cs["p99"], "(ref)")
    kv = runs[f"kvmirqfast vCPU poll {cfg.pp_poll_ns // 1000}us, engine blocking"]
    res.row("ping-pong vCPU poll, engine blocks: median", kv["median"], "ns", "C spinning",
            cs["median"], "(ref)", note="2 spinning threads, like C; the engine wakes per event")
    res.row("ping-pong vCPU poll, engine blocks: p99", kv["p99"], "ns", "C spinning", cs["p99"],
            "(ref)")


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
def _kvmirqfast_assign(n, reps):
    """(assign s/irqfd, deassign s/irqfd) medians over reps rounds of n irqfds."""
    fds = _eventfds(n)
    a_s, d_s = [], []
    try:
        with Vm(irqchip=True) as vm:
            vm.create_vcpu(0)
            entries = [MsiEntry(*msi_address(0), msi_data(_vector(i))) for i in range(n)]
            for _ in range(reps):
                t0 = time.perf_counter()
                for fd, e in zip(fds, entries):
                    vm.irqfd_direct(fd, e)
                t1 = time.perf_counter()
                for fd in fds:
                    vm.irqfd_direct_deassign(fd)
                t2 = time.perf_counter()
                a_s.append((t1 - t0) / n)
                d_s.append((t2 - t1) / n)
    finally:
        _close_all(fds)
    return a_s, d_s


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
    from ._engine import IrqfdRecord
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
    from . import __version__
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


def write_plot(res, path):
    """A bar chart of every targeted ratio against its target line (needs matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in res.rows if r.met is not None and r.ratio is not None]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
    labels = [f"{r.figure} vs {r.baseline}" if r.baseline else r.figure for r in rows]
    vals = [r.ratio if r.baseline else r.value for r in rows]
    colors = ["tab:green" if r.met else "tab:red" for r in rows]
    ax.barh(range(len(rows)), vals, color=colors)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xscale("log")
    ax.invert_yaxis()
    for i, r in enumerate(rows):
        shown = _fmt_ratio(vals[i]) if r.baseline else _fmt_value(r.value, r.unit)
        ax.text(vals[i], i, f"  {shown}  (target {r.target})", va="center", fontsize=7)
    ax.set_xlabel("ratio kvmirqfast / baseline (log); green = target met")
    ax.set_title(f"kvmirqfast bench ({res.config.name})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
