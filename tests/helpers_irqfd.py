"""Shared helpers for the irqfd tests: eventfd bookkeeping, polling, /proc counters.

No test here measures speed: waits poll a predicate with a short timeout and then the test
asserts the outcome.
"""

import os
import re
import threading
import time

import pytest

from kvmirqfast import uapi
from kvmirqfast.irqfd import eventfd_count
from kvmirqfast.testing import wait_for

WAIT = 2.0          # seconds: the most any asynchronous delivery may take in a test


def wait_until(pred, timeout=WAIT, interval=0.002):
    """Poll ``pred`` until it is truthy or ``timeout`` passes; return its last value."""
    return wait_for(pred, timeout, interval)


def stays(pred, duration=0.15, interval=0.005):
    """True if ``pred`` holds during the whole ``duration`` (a bounded observation window)."""
    end = time.monotonic() + duration
    while time.monotonic() < end:
        if not pred():
            return False
        time.sleep(interval)
    return bool(pred())


def count(fd):
    """The eventfd counter, as /proc/self/fdinfo shows it (not consumed)."""
    return eventfd_count(fd)


def fdinfo_count(fd):
    """``eventfd-count`` read straight from /proc/self/fdinfo (independent of the package)."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("eventfd-count:"):
                return int(line.split()[1], 16)
    raise AssertionError(f"fd {fd} is not an eventfd")


def ring_files(ring_fd):
    """Fixed-file slots in use in an io_uring (its fdinfo lists one line per file held)."""
    with open(f"/proc/self/fdinfo/{ring_fd}") as f:
        text = f.read()
    listing = text.split("UserFiles:")[1].splitlines()[1:]
    held = 0
    for line in listing:
        if not re.match(r"\s+\d+: ", line):
            break
        held += 1
    return held


def open_fds():
    return set(os.listdir("/proc/self/fd"))


def native_threads():
    return len(os.listdir("/proc/self/task"))


class Fds:
    """Eventfds (and other fds) a test opens; closes whatever is still open at teardown."""

    def __init__(self):
        self._fds = []

    def eventfd(self, initval=0, flags=0):
        fd = os.eventfd(initval, flags | os.EFD_CLOEXEC)
        self._fds.append(fd)
        return fd

    def track(self, fd):
        self._fds.append(fd)
        return fd

    def dup(self, fd):
        return self.track(os.dup(fd))

    def pipe(self):
        r, w = os.pipe()
        self._fds += [r, w]
        return r, w

    def closed_fd(self):
        """A fd number that is certainly closed now."""
        fd = os.eventfd(0)
        os.close(fd)
        return fd

    def close(self, fd):
        self._fds.remove(fd)
        os.close(fd)

    def close_all(self):
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []


@pytest.fixture
def fds():
    f = Fds()
    yield f
    f.close_all()


def lapic_get(vcpu):
    """KVM_GET_LAPIC through the vCPU's ioctl (model or real), as a bytearray."""
    return bytearray(vcpu.ioctl(uapi.KVM_GET_LAPIC, bytes(uapi.LAPIC_STATE_SIZE)))


def lapic_set(vcpu, state):
    vcpu.ioctl(uapi.KVM_SET_LAPIC, bytes(state))


def enable_lapic(vcpu):
    """Software-enable the LAPIC (SPIV |= 0x1FF) through GET/SET_LAPIC, as on real KVM."""
    st = lapic_get(vcpu)
    uapi.set_lapic_reg(st, uapi.APIC_SPIV, uapi.lapic_reg(st, uapi.APIC_SPIV) | 0x1FF)
    lapic_set(vcpu, st)


def set_ldr(vcpu, logical_id):
    """Program the xAPIC LDR (flat model: an 8-bit mask in bits 31:24)."""
    st = lapic_get(vcpu)
    uapi.set_lapic_reg(st, uapi.APIC_LDR, logical_id << 24)
    lapic_set(vcpu, st)


def lapic_irr(vcpu):
    return uapi.lapic_vectors(lapic_get(vcpu), uapi.APIC_IRR)


def lapic_tmr(vcpu):
    return uapi.lapic_vectors(lapic_get(vcpu), uapi.APIC_TMR)


def clear_irr(vcpu):
    """Forget every pending vector (KVM_SET_LAPIC with IRR zeroed)."""
    st = lapic_get(vcpu)
    for i in range(8):
        uapi.set_lapic_reg(st, uapi.APIC_IRR + 0x10 * i, 0)
    lapic_set(vcpu, st)


def drain_vcpu(vcpu):
    """Acknowledge and EOI everything pending; return the vectors taken, in order."""
    taken = []
    while True:
        v = vcpu.ack()
        if v is None:
            break
        taken.append(v)
        vcpu.eoi()
    return taken


def run_thread(target, *args):
    """Start a daemon thread running ``target``; returns (thread, result dict)."""
    out = {}

    def body():
        try:
            out["value"] = target(*args)
        except BaseException as e:       # reported by the test through out["error"]
            out["error"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, out
