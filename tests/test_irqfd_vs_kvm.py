"""Differential tests: irqfd, KVM_SIGNAL_MSI, KVM_IRQ_LINE and friends on /dev/kvm vs kvmirqfast.

Each case is one function that drives a ``Side`` (a VM plus its vCPUs and eventfds) through raw
ioctls and eventfd writes and records observations: ioctl returns and errnos, the IRR/TMR of every
vCPU (KVM_GET_LAPIC), eventfd counters, the IOAPIC state (KVM_GET_IRQCHIP).  The case runs first
on a real VM, then on a ``kvmirqfast.Vm``; the two observation lists must be equal.

Real KVM delivers inside eventfd_write; the model delivers on its engine thread, so on the model
side an asynchronous observation waits (up to 2 s) until it equals the real one and then checks
that it stays so for a moment.  Where the brief lists a fact measured on real KVM, the case also
pins it (``FACTS``), so a change in the host kernel shows up as such.
"""

import errno
import os
import struct
import time

import pytest

from kvmirqfast import Vm, msi_address, msi_data, uapi
from helpers_irqfd import Fds, clear_irr, enable_lapic, fdinfo_count, lapic_get, set_ldr, stays, wait_until
from realkvm import RealVm, requires_kvm

pytestmark = requires_kvm

IOAPIC = uapi.KVM_IRQCHIP_IOAPIC
DEASSIGN = uapi.KVM_IRQFD_FLAG_DEASSIGN
RESAMPLE = uapi.KVM_IRQFD_FLAG_RESAMPLE
IOAPIC_REDIR = 8 + 24              # offset of redirtbl[0] in struct kvm_irqchip (chip 2)
IOAPIC_IRR = 8 + 16


def M(gsi, dest, vector, logical=False, level=False, dm=0):
    lo, hi = msi_address(dest, logical)
    return uapi.pack_msi_entry(gsi, lo, hi, msi_data(vector, dm, level))


def I(gsi, chip, pin):  # noqa: E743
    return uapi.pack_irqchip_entry(gsi, chip, pin)


def redir(vector, dest=0, level=False, masked=False, logical=False):
    return (vector | (1 << 11 if logical else 0) | (1 << 15 if level else 0)
            | (1 << 16 if masked else 0) | dest << 56)


class Side:
    """One VM (real or model) and the observations a case makes on it."""

    def __init__(self, real, expected=None):
        self.real = real
        self.expected = expected
        self.obs = []
        self.fds = Fds()
        self._vms = []
        self.cpus = []
        self.vm = self.new_vm()

    # -- setup ------------------------------------------------------------------------------------
    def new_vm(self):
        vm = RealVm() if self.real else Vm()
        self._vms.append(vm)
        return vm

    def close(self):
        for vm in self._vms:
            vm.close()
        self.fds.close_all()

    def irqchip(self, vm=None):
        (vm or self.vm).ioctl(uapi.KVM_CREATE_IRQCHIP, 0)

    def vcpus(self, n, enable=True, vm=None):
        vm = vm or self.vm
        for i in range(n):
            if self.real:
                c = vm.create_vcpu(i, lapic_enabled=False)
            else:
                c = vm.ioctl(uapi.KVM_CREATE_VCPU, i)
            if enable:
                enable_lapic(c)
            self.cpus.append(c)
        return self.cpus

    def efd(self, flags=0):
        return self.fds.eventfd(flags=flags)

    def write(self, fd, n=1):
        os.eventfd_write(fd, n)

    # -- observations -----------------------------------------------------------------------------
    def record(self, label, value):
        self.obs.append((label, value))

    def observe(self, label, getter):
        """Record ``getter()``; on the model, first wait for the real side's value.

        On real KVM, irqchip routes are injected from a workqueue (irqfd_inject), so the real
        side records a value only once it has stopped changing.
        """
        if self.real:
            self.record(label, settle(getter))
            return
        if self.expected is not None:
            i = len(self.obs)
            if i < len(self.expected) and self.expected[i][0] == label:
                want = self.expected[i][1]
                wait_until(lambda: getter() == want)
                stays(lambda: getter() == want, 0.03)
        self.record(label, getter())

    def call(self, label, request, arg, vm=None):
        """Record an ioctl's int return (mutable buffer) or its errno."""
        vm = vm or self.vm
        if isinstance(arg, (bytes, bytearray)):
            arg = bytearray(arg)
        try:
            r = vm.ioctl(request, arg)
        except OSError as e:
            self.record(label, errno.errorcode.get(e.errno, e.errno))
            return None
        if not isinstance(r, int):          # a model Vcpu from KVM_CREATE_VCPU
            r = 0
        elif request == uapi.KVM_CREATE_VCPU and self.real:
            os.close(r)                       # a real vCPU fd made only to see the errno
            r = 0
        self.record(label, r)
        return arg

    def irqfd(self, label, fd, gsi, flags=0, resamplefd=0, vm=None):
        self.call(label, uapi.KVM_IRQFD, uapi.pack_irqfd(fd, gsi, flags, resamplefd), vm)

    def routing(self, label, *entries):
        self.call(label, uapi.KVM_SET_GSI_ROUTING, uapi.pack_routing(entries))

    def msi(self, label, dest, vector, flags=0, devid=0, logical=False, level=False, dm=0):
        lo, hi = msi_address(dest, logical)
        self.call(label, uapi.KVM_SIGNAL_MSI,
                  uapi.pack_msi(lo, hi, msi_data(vector, dm, level), flags, devid))

    def line_status(self, label, gsi, level):
        buf = self.call(label, uapi.KVM_IRQ_LINE_STATUS, uapi.pack_irq_level(gsi, level))
        if buf is not None:
            self.record(label + ".status", struct.unpack_from("<i", buf)[0])

    def set_redir(self, pin, bits):
        """Program one IOAPIC redirection entry through GET/SET_IRQCHIP (same on both)."""
        st = bytearray(struct.pack("<II", IOAPIC, 0) + bytes(512))
        self.vm.ioctl(uapi.KVM_GET_IRQCHIP, st)
        struct.pack_into("<Q", st, IOAPIC_REDIR + 8 * pin, bits)
        self.vm.ioctl(uapi.KVM_SET_IRQCHIP, st)

    def clear_irr(self):
        for c in self.cpus:
            clear_irr(c)

    def irr(self, label):
        self.observe(label + ".irr",
                     lambda: [uapi.lapic_vectors(lapic_get(c), uapi.APIC_IRR) for c in self.cpus])

    def tmr(self, label):
        self.observe(label + ".tmr",
                     lambda: [uapi.lapic_vectors(lapic_get(c), uapi.APIC_TMR) for c in self.cpus])

    def count(self, label, fd):
        self.observe(label + ".count", lambda: fdinfo_count(fd))

    def ioapic(self, label, pins):
        def get():
            st = bytearray(struct.pack("<II", IOAPIC, 0) + bytes(512))
            self.vm.ioctl(uapi.KVM_GET_IRQCHIP, st)
            irr = struct.unpack_from("<I", st, IOAPIC_IRR)[0]
            return irr, [struct.unpack_from("<Q", st, IOAPIC_REDIR + 8 * p)[0] for p in pins]
        self.observe(label + ".ioapic", get)


def settle(getter, window=0.03, timeout=2.0):
    """``getter()`` once two reads ``window`` apart agree (at most ``timeout`` seconds)."""
    value = getter()
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        time.sleep(window)
        again = getter()
        if again == value:
            break
        value = again
    return value


# === cases ========================================================================================
CASES = {}
FACTS = {}


def case(facts=None):
    def register(fn):
        CASES[fn.__name__] = fn
        if facts:
            FACTS[fn.__name__] = facts
        return fn
    return register


# --- before KVM_CREATE_IRQCHIP ------------------------------------------------------------------
@case({"assign": "EINVAL", "resample": "EINVAL", "closed": "EINVAL", "deassign": 0,
       "deassign_closed": "EBADF"})
def irqfd_before_irqchip(s):
    e = s.efd()
    s.irqfd("assign", e, 1)
    s.irqfd("resample", e, 1, RESAMPLE, s.efd())
    s.irqfd("closed", s.fds.closed_fd(), 1)
    s.irqfd("deassign", e, 1, DEASSIGN)
    s.irqfd("deassign_closed", s.fds.closed_fd(), 1, DEASSIGN)


@case({"routing": "EINVAL", "msi": "EINVAL", "line": "ENXIO", "line_status": "ENXIO"})
def other_ioctls_before_irqchip(s):
    s.routing("routing", M(1, 0, 0x41))
    s.msi("msi", 0, 0x41)
    s.call("line", uapi.KVM_IRQ_LINE, uapi.pack_irq_level(4, 1))
    s.line_status("line_status", 4, 1)


@case({"first": 0, "second": "EEXIST"})
def create_irqchip_twice(s):
    s.call("first", uapi.KVM_CREATE_IRQCHIP, 0)
    s.call("second", uapi.KVM_CREATE_IRQCHIP, 0)


@case({"irqchip": "EINVAL"})
def create_irqchip_after_vcpu(s):
    s.call("vcpu", uapi.KVM_CREATE_VCPU, 0)
    s.call("irqchip", uapi.KVM_CREATE_IRQCHIP, 0)


@case({"dup": "EEXIST", "big": "EINVAL"})
def create_vcpu_errors(s):
    s.irqchip()
    s.call("first", uapi.KVM_CREATE_VCPU, 1)
    s.call("dup", uapi.KVM_CREATE_VCPU, 1)
    s.call("big", uapi.KVM_CREATE_VCPU, 5000)


# --- KVM_SIGNAL_MSI ------------------------------------------------------------------------------
@case({"phys": 1, "nodest": 0, "disabled": 0, "flags2": "EINVAL", "devid": 1, "bcast": 2})
def signal_msi_returns(s):
    s.irqchip()
    s.vcpus(2)
    if s.real:
        off = s.vm.create_vcpu(2, lapic_enabled=False)
    else:
        off = s.vm.ioctl(uapi.KVM_CREATE_VCPU, 2)
    s.msi("phys", 1, 0x41)
    s.msi("nodest", 9, 0x42)
    s.msi("disabled", 2, 0x43)
    s.msi("flags2", 0, 0x44, flags=2)
    s.msi("devid", 0, 0x45, flags=uapi.KVM_MSI_VALID_DEVID, devid=77)
    s.msi("bcast", 0xFF, 0x46)
    s.irr("after")
    s.observe("off.irr", lambda: uapi.lapic_vectors(lapic_get(off), uapi.APIC_IRR))


@case({"v5": 1, "v15": 1})
def signal_msi_low_vectors(s):
    s.irqchip()
    s.vcpus(1)
    s.msi("v5", 0, 5)
    s.msi("v15", 0, 15)
    s.irr("after")


@case()
def signal_msi_level_sets_tmr(s):
    s.irqchip()
    s.vcpus(2)
    s.msi("level", 1, 0x61, level=True)
    s.msi("edge", 1, 0x62)
    s.irr("after")
    s.tmr("after")


@case({"efault": "EFAULT"})
def signal_msi_int_arg(s):
    s.irqchip()
    s.call("efault", uapi.KVM_SIGNAL_MSI, 0)


@case()
def signal_msi_logical_flat(s):
    s.irqchip()
    cpus = s.vcpus(4)
    for i, c in enumerate(cpus):
        set_ldr(c, 1 << i)
    s.msi("m5", 0b0101, 0x51, logical=True)
    s.msi("m8", 0b1000, 0x52, logical=True)
    s.msi("m0", 0b0000, 0x53, logical=True)
    s.irr("after")


@case()
def lowest_priority_logical_follows_ldr_bits(s):
    # vCPU 0 has logical bit 1, vCPU 1 logical bit 0: lowest-priority arbitration (vector
    # hashing) indexes the destination bitmap, not the vCPU creation order.
    s.irqchip()
    a, b = s.vcpus(2)
    set_ldr(a, 0b10)
    set_ldr(b, 0b01)
    for v in (0x40, 0x41, 0x52, 0x63):
        s.msi(f"lp{v:#x}", 0b11, v, logical=True, dm=1)
    s.irr("after")


@case()
def lowest_priority_broadcast(s):
    s.irqchip()
    s.vcpus(3)
    for v in (0x40, 0x41, 0x42, 0x43):
        s.msi(f"lp{v:#x}", 0xFF, v, dm=1)
    s.irr("after")


# --- KVM_IRQ_LINE(_STATUS) -----------------------------------------------------------------------
@case()
def irq_line_status_routes(s):
    s.irqchip()
    s.vcpus(2)
    s.routing("routing", M(40, 1, 0x70), I(41, IOAPIC, 17))
    s.line_status("msi_hi", 40, 1)
    s.line_status("msi_lo", 40, 0)
    s.line_status("noroute", 42, 1)
    s.line_status("beyond", 5000, 1)
    s.line_status("ioapic_masked", 41, 1)
    s.irr("after")


# --- KVM_IRQFD: assignment errors ----------------------------------------------------------------
@case({"again_same": "EBUSY", "again_other": "EBUSY", "dup": "EBUSY"})
def same_eventfd_twice(s):
    s.irqchip()
    e = s.efd()
    s.irqfd("first", e, 1)
    s.irqfd("again_same", e, 1)
    s.irqfd("again_other", e, 2)
    s.irqfd("dup", s.fds.dup(e), 3)


@case({"vm2": "EBUSY", "vm2_after_deassign": 0})
def same_eventfd_two_vms(s):
    s.irqchip()
    vm2 = s.new_vm()
    s.irqchip(vm2)
    e = s.efd()
    s.irqfd("vm1", e, 1)
    s.irqfd("vm2", e, 1, vm=vm2)
    s.irqfd("vm1_deassign", e, 1, DEASSIGN)
    s.irqfd("vm2_after_deassign", e, 1, vm=vm2)


@case({"unknown": 0, "wrong_gsi": 0, "pipe": "EINVAL", "closed": "EBADF", "flags4": "EINVAL",
       "deassign_resample": 0, "gsi5000": 0, "closed_deassign": "EBADF"})
def irqfd_argument_errors(s):
    s.irqchip()
    e = s.efd()
    r, _w = s.fds.pipe()
    s.irqfd("unknown", e, 7, DEASSIGN)
    s.irqfd("assign", e, 7)
    s.irqfd("wrong_gsi", e, 8, DEASSIGN)
    s.irqfd("pipe", r, 1)
    s.irqfd("pipe_deassign", r, 1, DEASSIGN)
    s.irqfd("closed", s.fds.closed_fd(), 1)
    s.irqfd("closed_deassign", s.fds.closed_fd(), 1, DEASSIGN)
    s.irqfd("flags4", s.efd(), 1, 4)
    s.irqfd("flags_high", s.efd(), 1, 1 << 31)
    s.irqfd("deassign_resample", e, 7, DEASSIGN | RESAMPLE)
    s.irqfd("reassign", e, 7)
    s.irqfd("gsi5000", s.efd(), 5000)
    s.irqfd("gsi_max", s.efd(), 0xFFFFFFFF)
    s.irqfd("fd_neg", 0xFFFFFFFF, 1)


@case({"closed": "EBADF", "pipe": "EINVAL"})
def resample_errors(s):
    s.irqchip()
    r, _w = s.fds.pipe()
    e = s.efd()
    s.irqfd("closed", e, 20, RESAMPLE, s.fds.closed_fd())
    s.irqfd("pipe", e, 20, RESAMPLE, r)
    s.irqfd("ok", e, 20, RESAMPLE, s.efd())
    s.irqfd("busy_after", e, 21)


@case({"irqfd": "EFAULT", "unknown": "ENOTTY"})
def bad_arguments(s):
    s.irqchip()
    s.call("irqfd", uapi.KVM_IRQFD, 0)
    s.call("unknown", uapi._IOW(uapi.KVMIO, 0xFE, 8), bytes(8))


# --- KVM_IRQFD: delivery -------------------------------------------------------------------------
@case()
def irqfd_msi_physical(s):
    s.irqchip()
    s.vcpus(2)
    s.routing("routing", M(30, 1, 0x41), M(31, 0, 0x42))
    a, b = s.efd(), s.efd()
    s.irqfd("a", a, 30)
    s.irqfd("b", b, 31)
    s.write(a)
    s.irr("a")
    s.count("a", a)
    s.write(b, 7)
    s.irr("b")
    s.count("b", b)


@case()
def irqfd_msi_logical_and_broadcast(s):
    s.irqchip()
    cpus = s.vcpus(3)
    for i, c in enumerate(cpus):
        set_ldr(c, 1 << i)
    s.routing("routing", M(30, 0b110, 0x55, logical=True), M(31, 0xFF, 0x66))
    a, b = s.efd(), s.efd()
    s.irqfd("a", a, 30)
    s.irqfd("b", b, 31)
    s.write(a)
    s.irr("logical")
    s.write(b)
    s.irr("broadcast")


@case()
def irqfd_level_msi_sets_tmr(s):
    s.irqchip()
    s.vcpus(1)
    s.routing("routing", M(30, 0, 0x91, level=True))
    e = s.efd()
    s.irqfd("assign", e, 30)
    s.write(e)
    s.irr("after")
    s.tmr("after")


@case()
def irqfd_to_disabled_lapic(s):
    s.irqchip()
    s.vcpus(1, enable=False)
    s.routing("routing", M(30, 0, 0x41))
    e = s.efd()
    s.irqfd("assign", e, 30)
    s.write(e)
    s.count("after", e)
    s.irr("after")


@case({"after.count": 1})
def pending_at_assign_delivered_not_consumed(s):
    s.irqchip()
    s.vcpus(2)
    s.routing("routing", M(30, 1, 0x41))
    e = s.efd()
    s.write(e)
    s.irqfd("assign", e, 30)
    s.irr("after")
    s.count("after", e)
    s.write(e)
    s.count("second", e)


@case()
def pending_at_assign_without_route(s):
    s.irqchip()
    s.vcpus(1)
    s.routing("routing")
    e = s.efd()
    s.write(e)
    s.irqfd("assign", e, 30)
    s.count("after", e)
    s.routing("routing2", M(30, 0, 0x41))
    s.irr("after_route")
    s.count("after_route", e)


@case()
def pending_at_assign_then_routing_change_delivers_nothing_more(s):
    # The event found at assign was delivered once; after the guest has taken it, a routing
    # change must not deliver it a second time (KVM never reads the counter on a table change).
    s.irqchip()
    s.vcpus(2)
    s.routing("r1", M(30, 0, 0x41))
    e = s.efd()
    s.write(e)
    s.irqfd("assign", e, 30)
    s.irr("assigned")
    s.clear_irr()
    s.irr("cleared")
    s.routing("r2", M(30, 1, 0x42))
    s.irr("after_change")
    s.count("after_change", e)
    s.write(e)
    s.irr("after_write")
    s.count("after_write", e)


@case()
def semaphore_eventfd(s):
    s.irqchip()
    s.vcpus(1)
    s.routing("routing", M(30, 0, 0x41))
    e = s.efd(os.EFD_SEMAPHORE)
    s.irqfd("assign", e, 30)
    s.write(e, 3)
    s.irr("after")
    s.count("after", e)


@case()
def gsi_without_route_until_route_appears(s):
    s.irqchip()
    s.vcpus(2)
    s.routing("routing")
    e = s.efd()
    s.irqfd("assign", e, 30)
    s.write(e)
    s.count("noroute", e)
    s.irr("noroute")
    s.routing("routing2", M(30, 1, 0x41))
    s.irr("route_appears")
    s.write(e)
    s.irr("write_again")


@case()
def routing_change_retargets(s):
    s.irqchip()
    s.vcpus(2)
    s.routing("r1", M(30, 0, 0x41))
    e = s.efd()
    s.irqfd("assign", e, 30)
    s.write(e)
    s.irr("first")
    s.routing("r2", M(30, 1, 0x42))
    s.write(e)
    s.irr("second")
    s.routing("r3", M(31, 1, 0x43))
    s.write(e)
    s.irr("removed")
    s.count("removed", e)


@case()
def deassign_stops_delivery(s):
    s.irqchip()
    s.vcpus(1)
    s.routing("routing", M(30, 0, 0x41))
    e = s.efd()
    s.irqfd("assign", e, 30)
    s.irqfd("deassign_dup", s.fds.dup(e), 30, DEASSIGN)
    s.write(e)
    s.count("after", e)
    s.irr("after")


@case()
def two_irqfds_one_gsi(s):
    s.irqchip()
    s.vcpus(1)
    s.routing("routing", M(30, 0, 0x41))
    a, b = s.efd(), s.efd()
    s.irqfd("a", a, 30)
    s.irqfd("b", b, 30)
    s.write(b)
    s.irr("b")
    s.count("b", b)
    s.irqfd("a_off", a, 30, DEASSIGN)
    s.write(a)
    s.count("a", a)


@case()
def irqfd_survives_closing_the_assigned_fd_number(s):
    # The irqfd belongs to the eventfd: a dup() keeps it alive after the original fd is closed.
    s.irqchip()
    s.vcpus(2)
    s.routing("routing", M(30, 1, 0x41))
    e = s.efd()
    s.irqfd("assign", e, 30)
    keep = s.fds.dup(e)
    s.fds.close(e)
    s.write(keep)
    s.irr("after")
    s.count("after", keep)


@case()
def closed_eventfd_detaches(s):
    # Closing the last fd of an eventfd detaches its irqfd (hang-up): a new eventfd, even on
    # the same fd number, can be bound to the same GSI and works.
    s.irqchip()
    s.vcpus(1)
    s.routing("routing", M(30, 0, 0x41))
    e = s.efd()
    s.irqfd("assign", e, 30)
    s.fds.close(e)
    n = s.efd()
    s.record("same_number", n == e)
    s.irqfd("new", n, 30)
    s.write(n)
    s.irr("after")


@case()
def closed_eventfd_number_reused_then_routing_change(s):
    s.irqchip()
    s.vcpus(1)
    s.routing("routing", M(30, 0, 0x41))
    e = s.efd()
    s.irqfd("assign", e, 30)
    s.fds.close(e)
    other = s.efd()
    s.write(other)
    s.routing("routing2", M(30, 0, 0x42))
    s.count("other", other)
    s.irr("after")


# --- IOAPIC pins through irqfds ------------------------------------------------------------------
@case()
def irqfd_ioapic_edge_pin(s):
    s.irqchip()
    s.vcpus(2)
    s.set_redir(18, redir(0x58, dest=1))
    s.set_redir(19, redir(0x59, dest=0, masked=True))
    a, b = s.efd(), s.efd()
    s.irqfd("a", a, 18)
    s.irqfd("b", b, 19)
    s.write(a)
    s.irr("edge")
    s.write(b)
    s.count("masked", b)
    s.irr("masked")
    s.ioapic("after", [18, 19])


@case()
def irqfd_ioapic_level_pin_with_resample(s):
    s.irqchip()
    s.vcpus(1)
    s.set_redir(20, redir(0x60, dest=0, level=True))
    e, r = s.efd(), s.efd()
    s.irqfd("assign", e, 20, RESAMPLE, r)
    s.write(e)
    s.irr("first")
    s.tmr("first")
    s.ioapic("first", [20])
    s.write(e)
    s.count("second", e)
    s.count("resample", r)
    s.ioapic("second", [20])
    s.irqfd("deassign", e, 20, DEASSIGN)
    s.ioapic("deassigned", [20])


@case()
def irqfd_ioapic_level_pin_without_resample(s):
    s.irqchip()
    s.vcpus(1)
    s.set_redir(21, redir(0x61, dest=0, level=True))
    e = s.efd()
    s.irqfd("assign", e, 21)
    s.write(e)
    s.irr("first")
    s.ioapic("first", [21])


@case()
def irqfd_resample_on_msi_gsi(s):
    s.irqchip()
    s.vcpus(1)
    s.routing("routing", M(30, 0, 0x41))
    e, r = s.efd(), s.efd()
    s.irqfd("assign", e, 30, RESAMPLE, r)
    s.write(e)
    s.irr("after")
    s.count("resample", r)


@case()
def irqfd_routing_change_from_ioapic_to_msi(s):
    s.irqchip()
    s.vcpus(2)
    s.set_redir(16, redir(0x56, dest=0))
    s.routing("r1", I(16, IOAPIC, 16))
    e = s.efd()
    s.irqfd("assign", e, 16)
    s.write(e)
    s.irr("ioapic")
    s.routing("r2", M(16, 1, 0x57))
    s.write(e)
    s.irr("msi")


@case()
def irqfd_resample_and_irq_line_share_a_level_pin(s):
    # The IOAPIC ORs its sources: KVM_IRQ_LINE (source 0) and the resampler (source 1).
    s.irqchip()
    s.vcpus(1)
    s.set_redir(22, redir(0x62, dest=0, level=True, masked=True))
    e, r = s.efd(), s.efd()
    s.irqfd("assign", e, 22, RESAMPLE, r)
    s.line_status("line_hi", 22, 1)
    s.write(e)
    s.ioapic("both", [22])
    s.irqfd("deassign", e, 22, DEASSIGN)
    s.ioapic("line_only", [22])
    s.line_status("line_lo", 22, 0)
    s.ioapic("none", [22])


@case()
def two_resamplers_on_one_gsi(s):
    s.irqchip()
    s.vcpus(1)
    s.set_redir(23, redir(0x63, dest=0, level=True))
    e1, r1, e2, r2 = s.efd(), s.efd(), s.efd(), s.efd()
    s.irqfd("a1", e1, 23, RESAMPLE, r1)
    s.irqfd("a2", e2, 23, RESAMPLE, r2)
    s.write(e1)
    s.irr("fired")
    s.ioapic("fired", [23])
    s.irqfd("d1", e1, 23, DEASSIGN)
    s.ioapic("one_left", [23])
    s.irqfd("d2", e2, 23, DEASSIGN)
    s.ioapic("none_left", [23])


@case()
def irqfd_gsi_below_16_reaches_pic_and_ioapic(s):
    s.irqchip()
    s.vcpus(1)
    s.set_redir(3, redir(0x33, dest=0))
    e = s.efd()
    s.irqfd("assign", e, 3)
    s.write(e)
    s.irr("after")
    s.ioapic("after", [3])

    def pic():
        st = bytearray(struct.pack("<II", uapi.KVM_IRQCHIP_PIC_MASTER, 0) + bytes(512))
        s.vm.ioctl(uapi.KVM_GET_IRQCHIP, st)
        return bytes(st[8:8 + 4])               # last_irr, irr, imr, isr
    s.observe("after.pic", pic)


@case()
def table_of_4096_entries_and_irqfd_on_the_last(s):
    s.irqchip()
    s.vcpus(2)
    s.routing("full", *[M(g, g % 2, 0x20 + g % 0xE0) for g in range(4096)])
    e = s.efd()
    s.irqfd("assign", e, 4095)
    s.write(e)
    s.irr("after")
    s.routing("too_many", *[M(g % 4096, 0, 0x41) for g in range(4097)])
    s.clear_irr()
    s.write(e)
    s.irr("after_refused")


# === the test ====================================================================================
def run(fn, real, expected=None):
    side = Side(real, expected)
    try:
        fn(side)
    finally:
        side.close()
    return side.obs


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_as_kvm(name):
    fn = CASES[name]
    real = run(fn, True)
    for label, want in FACTS.get(name, {}).items():
        assert dict(real)[label] == want, f"real KVM changed: {label}"
    model = run(fn, False, real)
    assert model == real
