"""Helpers shared by the figures: threads, CPU clocks, busy loads, real KVM, eventfds."""

import ctypes
import fcntl
import os
import subprocess
import sys
import threading
import time

from .. import uapi
from ..arch.x86 import msi_address, msi_data
from .config import _vector
from .clib import _int_array


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
    from ..kvm import kvm_usable as probe
    return probe()


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
