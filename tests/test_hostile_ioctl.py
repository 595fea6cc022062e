"""Hostile input to the uAPI layer: property-based tests over every ioctl ``vm.ioctl`` and
``vcpu.ioctl`` accept, and a differential comparison with the real /dev/kvm.

Properties, for random bytes, wrong sizes and random field values:
* the result is a return value or ``OSError`` -- never another exception, never a crash;
* on ``OSError`` the VM is unchanged (routing table, irqfds, irqchips, LAPICs, vCPUs, caps);
* with /dev/kvm usable, random valid and invalid irqfd / routing / MSI / IRQ-line calls get the
  same accept/reject and errno from the model as from KVM.

The default run keeps the whole file under ~20 s; ``KVMIRQFAST_LONG=1`` (or the ``slow``
marker) selects a profile with 20x the examples.  Examples tried per ioctl are printed at the
end of the module (``-s``).
"""

import collections
import errno
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvmirqfast import Vm, uapi
from kvmirqfast.ioctl import lapic_image
from realkvm import RealVm, requires_kvm

LONG = os.environ.get("KVMIRQFAST_LONG", "") not in ("", "0")
N = 2000 if LONG else 80                # examples per ioctl property
N_DIFF = 3000 if LONG else 150          # random op sequences per differential property
SETTINGS = dict(deadline=None, derandomize=not LONG,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

TRIED = collections.Counter()           # ioctl name -> examples run


@pytest.fixture(scope="module", autouse=True)
def _report_examples():
    yield
    if TRIED:
        print("\nhypothesis examples per ioctl:",
              ", ".join(f"{k}={v}" for k, v in sorted(TRIED.items())))


# -- the fd pool the struct fd fields draw from ----------------------------------------------------
class FdPool:
    """Kinds of fd a hostile caller may name: eventfds, a dup, a pipe, a closed number, junk."""

    KINDS = ("eventfd0", "eventfd1", "eventfd2", "dup_of_0", "pipe", "closed", "devnull",
             "negative", "huge")

    def __init__(self):
        self.fds = {}
        for k in ("eventfd0", "eventfd1", "eventfd2"):
            self.fds[k] = os.eventfd(0, os.EFD_CLOEXEC)
        self.fds["dup_of_0"] = os.dup(self.fds["eventfd0"])
        r, w = os.pipe()
        self.fds["pipe"], self._pipe_w = r, w
        c = os.eventfd(0)
        os.close(c)
        self.fds["closed"] = c          # may be reused by the kernel later: still "some fd"
        self.fds["devnull"] = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        self.fds["negative"] = 0xFFFFFFFF
        self.fds["huge"] = 0x7FFFFFF0

    def __getitem__(self, kind):
        return self.fds[kind]

    def close(self):
        for k, fd in self.fds.items():
            if k not in ("closed", "negative", "huge"):
                os.close(fd)
        os.close(self._pipe_w)


fd_kinds = st.sampled_from(FdPool.KINDS)
u32 = st.one_of(st.integers(0, 0xFFFFFFFF), st.sampled_from([0, 1, 2, 3, 7, 23, 24, 0xFF, 4095,
                                                             4096, 0x7FFFFFFF, 0xFFFFFFFF]))


# -- VM state, for "unchanged on error" ----------------------------------------------------------
def snapshot(vm):
    s = {
        "irqchip": vm.has_irqchip,
        "routing": vm.gsi_routing.entries,
        "irqfds": sorted((repr(r.key), r.gsi, repr(r.entry), r.direct, r.route,
                          r.resamplefd is not None) for r in vm._index),
        "resamplers": sorted(repr(k) for k in vm._resamplers),
        "vcpus": sorted(vm.vcpus),
        "arch": repr(vm.arch),
        "x2apic_quirk": getattr(vm.arch, "x2apic_broadcast_quirk_disabled", None),
        "mp": dict(vm.__dict__.get("_mp_states", {})),
        "lapic_images": dict(vm._lapic_image),
    }
    if vm.ioapic is not None:
        s["ioapic"] = vm.ioapic.get_state()
    if vm.pic is not None:
        s["pic"] = (vm.pic.get_state(0), vm.pic.get_state(1))
    for vid, v in vm.vcpus.items():
        if v.lapic is not None:
            s[f"lapic{vid}"] = bytes(lapic_image(v))
            s[f"nmi{vid}"] = v.lapic.nmi_pending
    return s


def make_vm(irqchip, vcpus):
    vm = Vm(irqchip=irqchip)
    for i in range(vcpus):
        vm.create_vcpu(i)
    return vm


def call(target, request, arg):
    """Run one ioctl; return ("ok", result) or ("err", errno).  Anything else fails the test."""
    try:
        return "ok", target.ioctl(request, arg)
    except OSError as e:
        assert isinstance(e.errno, int) and e.errno > 0, f"OSError without an errno: {e!r}"
        return "err", e.errno


# -- arguments: random bytes, wrong sizes, random fields -----------------------------------------
def sized_bytes(size):
    """Random buffers around ``size``: short, exact, long; bytes (<= 1 KiB) or bytearray."""
    lengths = st.one_of(st.integers(0, max(size + 16, 64)),
                        st.sampled_from(sorted({0, 1, max(size - 1, 0), size, size + 1})))
    return lengths.flatmap(lambda n: st.tuples(st.binary(min_size=n, max_size=n),
                                               st.booleans())).map(
        lambda t: bytearray(t[0]) if (t[1] or len(t[0]) > 1024) else t[0])


def int_arg():
    return st.integers(-(2**63), 2**64 - 1)


IRQFD_FLAGS = st.one_of(u32, st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7]))


@st.composite
def irqfd_struct(draw, pool):
    flags = draw(IRQFD_FLAGS)
    fd = pool[draw(fd_kinds)]
    rfd = pool[draw(fd_kinds)]
    gsi = draw(u32)
    pad = draw(st.one_of(st.just(bytes(16)), st.binary(min_size=16, max_size=16)))
    return uapi.IRQFD.pack(fd, gsi, flags, rfd)[:16] + pad


@st.composite
def routing_entry(draw):
    gsi = draw(st.one_of(st.integers(0, 30), u32))
    typ = draw(st.one_of(st.sampled_from([1, 2]), st.integers(0, 7), u32))
    flags = draw(st.one_of(st.just(0), st.just(1), u32))
    if typ == 1 and draw(st.booleans()):
        u = uapi.ROUTING_IRQCHIP.pack(draw(st.integers(0, 3)), draw(st.integers(0, 25)))
    elif typ == 2 and draw(st.booleans()):
        u = uapi.ROUTING_MSI.pack(0xFEE00000 | draw(st.integers(0, 0xFF)) << 12,
                                  draw(st.sampled_from([0, 0xFF, 0x100])),
                                  draw(st.integers(0, 0xFFFF)), draw(u32))
    else:
        u = draw(st.binary(min_size=32, max_size=32))
    return uapi.ROUTING_ENTRY.pack(gsi, typ, flags, draw(st.sampled_from([0, 0, 5])), u)


@st.composite
def routing_table(draw):
    entries = draw(st.lists(routing_entry(), max_size=12))
    nr = draw(st.one_of(st.just(len(entries)), st.integers(0, 20), u32))
    flags = draw(st.one_of(st.just(0), u32))
    buf = bytearray(uapi.ROUTING_HEADER.pack(nr, flags)) + b"".join(entries)
    cut = draw(st.one_of(st.just(len(buf)), st.integers(0, len(buf))))
    return buf[:cut]


@st.composite
def routing_table_defined(draw):
    """Tables whose every byte KVM reads is defined: fcntl.ioctl copies a short buffer onto a
    1 KiB stack buffer, so on real KVM the bytes past the end are stack garbage (the model reads
    zeros there, see ioctl.py); the differential sticks to nr <= entries or nr > 4096."""
    entries = draw(st.lists(routing_entry(), max_size=12))
    nr = draw(st.one_of(st.just(len(entries)), st.integers(0, len(entries)),
                        st.integers(4097, 0xFFFFFFFF)))
    flags = draw(st.one_of(st.just(0), u32))
    return bytearray(uapi.ROUTING_HEADER.pack(nr, flags)) + b"".join(entries)


@st.composite
def irqfd_direct_struct(draw, pool):
    flags = draw(st.one_of(st.sampled_from([0, 1, 2, 4, 5, 6]), u32))
    pad = draw(st.one_of(st.just(0), u32))
    return uapi.IRQFD_DIRECT.pack(pool[draw(fd_kinds)], flags, pool[draw(fd_kinds)], pad,
                                  draw(routing_entry()))


def any_arg(struct_strategy, size):
    return st.one_of(struct_strategy, sized_bytes(size), int_arg())


# Each entry: name -> (request, argument strategy factory(pool), vm kind)
def ioctl_cases():
    V = uapi
    return {
        "KVM_CHECK_EXTENSION": (V.KVM_CHECK_EXTENSION, lambda p: st.one_of(int_arg(), u32,
                                                                         sized_bytes(8))),
        "KVM_CREATE_IRQCHIP": (V.KVM_CREATE_IRQCHIP, lambda p: st.one_of(int_arg(),
                                                                       sized_bytes(8))),
        "KVM_CREATE_VCPU": (V.KVM_CREATE_VCPU, lambda p: st.one_of(
            st.integers(-5, 4100), int_arg(), sized_bytes(8))),
        "KVM_SET_GSI_ROUTING": (V.KVM_SET_GSI_ROUTING, lambda p: st.one_of(
            routing_table(), sized_bytes(56), int_arg())),
        "KVM_IRQFD": (V.KVM_IRQFD, lambda p: any_arg(irqfd_struct(p), V.IRQFD.size)),
        "KVM_IRQFD_DIRECT": (V.KVM_IRQFD_DIRECT,
                             lambda p: any_arg(irqfd_direct_struct(p), V.IRQFD_DIRECT.size)),
        "KVM_SIGNAL_MSI": (V.KVM_SIGNAL_MSI, lambda p: any_arg(
            st.builds(V.pack_msi, u32, u32, u32, st.one_of(st.just(0), st.just(1), u32), u32),
            V.MSI.size)),
        "KVM_IRQ_LINE": (V.KVM_IRQ_LINE, lambda p: any_arg(
            st.builds(lambda i, l: struct.pack("<II", i, l), u32, u32), V.IRQ_LEVEL.size)),
        "KVM_IRQ_LINE_STATUS": (V.KVM_IRQ_LINE_STATUS, lambda p: any_arg(
            st.builds(lambda i, l: struct.pack("<II", i, l), u32, u32), V.IRQ_LEVEL.size)),
        "KVM_GET_IRQCHIP": (V.KVM_GET_IRQCHIP, lambda p: any_arg(
            st.builds(lambda c, b: struct.pack("<II", c, 0) + b, u32,
                      st.binary(min_size=512, max_size=512)), V.IRQCHIP.size)),
        "KVM_SET_IRQCHIP": (V.KVM_SET_IRQCHIP, lambda p: any_arg(
            st.builds(lambda c, b: struct.pack("<II", c, 0) + b,
                      st.one_of(st.integers(0, 3), u32), st.binary(min_size=512, max_size=512)),
            V.IRQCHIP.size)),
        "KVM_ENABLE_CAP": (V.KVM_ENABLE_CAP, lambda p: any_arg(
            st.builds(lambda c, f, a0: V.ENABLE_CAP.pack(c, f, a0, 0, 0, 0),
                      st.one_of(st.just(V.KVM_CAP_X2APIC_API), u32),
                      st.one_of(st.just(0), u32), st.integers(0, 2**64 - 1)),
            V.ENABLE_CAP.size)),
    }


VCPU_CASES = {
    "KVM_GET_LAPIC": (uapi.KVM_GET_LAPIC, lambda p: st.one_of(sized_bytes(1024), int_arg())),
    "KVM_SET_LAPIC": (uapi.KVM_SET_LAPIC, lambda p: st.one_of(sized_bytes(1024), int_arg())),
    "KVM_GET_MP_STATE": (uapi.KVM_GET_MP_STATE, lambda p: st.one_of(sized_bytes(4), int_arg())),
    "KVM_SET_MP_STATE": (uapi.KVM_SET_MP_STATE, lambda p: st.one_of(
        st.builds(lambda s: struct.pack("<I", s), st.one_of(st.integers(0, 10), u32)),
        sized_bytes(4), int_arg())),
}

VM_KIND = st.sampled_from([(True, 2), (True, 0), (False, 0), (False, 1)])


@pytest.fixture(scope="module")
def pool():
    p = FdPool()
    yield p
    p.close()


def _check_one(vm, target, name, request, arg):
    before = snapshot(vm)
    kind, value = call(target, request, arg)
    TRIED[name] += 1
    if kind == "err":
        assert snapshot(vm) == before, f"{name} failed with errno {value} but changed the VM"
    return kind, value


@pytest.mark.parametrize("name", sorted(ioctl_cases()))
def test_vm_ioctl_hostile(name, pool):
    request, strategy = ioctl_cases()[name]

    @settings(max_examples=N, **SETTINGS)
    @given(arg=strategy(pool), vmkind=VM_KIND, pre=st.lists(irqfd_struct(pool), max_size=3))
    def run(arg, vmkind, pre):
        with make_vm(*vmkind) as vm:
            for p in pre:                                 # some state to disturb first
                call(vm, uapi.KVM_IRQFD, p)
            _check_one(vm, vm, name, request, arg)
    run()


@pytest.mark.parametrize("name", sorted(VCPU_CASES))
def test_vcpu_ioctl_hostile(name, pool):
    request, strategy = VCPU_CASES[name]

    @settings(max_examples=N, **SETTINGS)
    @given(arg=strategy(pool), irqchip=st.booleans())
    def run(arg, irqchip):
        with make_vm(irqchip, 1) as vm:
            _check_one(vm, vm.vcpus[0], name, request, arg)
    run()


def test_unknown_requests_are_enotty_on_a_vm_einval_on_a_vcpu(pool):
    known = {r for r, _ in ioctl_cases().values()} | {uapi.KVM_CHECK_EXTENSION}

    @settings(max_examples=N * 4, **SETTINGS)
    @given(request=st.one_of(u32, st.integers(0, 0xFF).map(lambda nr: (0xAE << 8) | nr),
                             st.integers(0, 0xFF).map(lambda nr: uapi._IOW(0xAE, nr, 32))),
           arg=st.one_of(int_arg(), sized_bytes(64)))
    def run(request, arg):
        with make_vm(True, 1) as vm:
            for target in (vm, vm.vcpus[0]):
                before = snapshot(vm)
                kind, value = call(target, request, arg)
                TRIED["unknown request"] += 1
                if request in known and target is vm or kind == "ok":
                    continue
                if target is not vm and request in (r for r, _ in VCPU_CASES.values()):
                    continue
                # KVM: ENOTTY for a VM, EINVAL for a vCPU (kvm_arch_vcpu_ioctl's default)
                assert (kind, value) == ("err", errno.ENOTTY if target is vm else errno.EINVAL)
                assert snapshot(vm) == before
    run()


def test_closed_vm_ioctls_are_ebadf(pool):
    vm = make_vm(True, 1)
    cpu = vm.vcpus[0]
    vm.close()
    for name, (request, _) in ioctl_cases().items():
        assert call(vm, request, bytearray(64)) == ("err", errno.EBADF), name
    for name, (request, _) in VCPU_CASES.items():
        assert call(cpu, request, bytearray(1024)) == ("err", errno.EBADF), name


# -- differential: the same calls on real KVM and on the model -----------------------------------
class Side:
    """One side of the comparison: a VM (real or model) and its own fd pool."""

    def __init__(self, vm):
        self.vm = vm
        self.pool = FdPool()

    def close(self):
        self.vm.close()
        self.pool.close()


@st.composite
def op(draw):
    kind = draw(st.sampled_from(["irqfd", "irqfd", "irqfd", "routing", "msi", "line",
                                 "line_status"]))
    if kind == "irqfd":
        return kind, (draw(st.sampled_from(["eventfd0", "eventfd1", "eventfd2", "dup_of_0",
                                            "pipe", "closed", "devnull", "negative", "huge"])),
                      draw(st.one_of(st.integers(0, 30), u32)),
                      draw(st.one_of(st.sampled_from([0, 0, 1, 2, 3]), u32)),
                      draw(st.sampled_from(["eventfd1", "eventfd2", "pipe", "closed",
                                            "negative"])))
    if kind == "routing":
        return kind, bytes(draw(routing_table_defined()))
    if kind == "msi":
        return kind, uapi.pack_msi(draw(u32), draw(u32), draw(u32),
                                   draw(st.one_of(st.sampled_from([0, 1]), u32)), draw(u32))
    return kind, struct.pack("<II", draw(st.one_of(st.integers(0, 30), u32)),
                             draw(st.sampled_from([0, 1, 2])))


def apply(side, o):
    kind, a = o
    if kind == "irqfd":
        fdk, gsi, flags, rk = a
        arg = uapi.IRQFD.pack(side.pool[fdk], gsi, flags, side.pool[rk])
        return call(side.vm, uapi.KVM_IRQFD, arg)
    if kind == "routing":
        return call(side.vm, uapi.KVM_SET_GSI_ROUTING, bytearray(a))
    if kind == "msi":
        r = call(side.vm, uapi.KVM_SIGNAL_MSI, a)
        return ("ok", "delivered" if r[1] else "none") if r[0] == "ok" else r
    req = uapi.KVM_IRQ_LINE if kind == "line" else uapi.KVM_IRQ_LINE_STATUS
    r = call(side.vm, req, a)
    return ("ok", None) if r[0] == "ok" else r


@requires_kvm
@pytest.mark.parametrize("irqchip", [True, False])
def test_differential_with_real_kvm(irqchip):
    """Random sequences of KVM_IRQFD / KVM_SET_GSI_ROUTING / KVM_SIGNAL_MSI / KVM_IRQ_LINE(_STATUS)
    get the same accept/reject and errno from the model as from /dev/kvm."""

    @settings(max_examples=N_DIFF, **SETTINGS)
    @given(ops=st.lists(op(), min_size=1, max_size=8))
    def run(ops):
        TRIED["diff:sequences"] += 1
        real = Side(RealVm(irqchip=irqchip))
        model = Side(Vm(irqchip=irqchip))
        try:
            if irqchip:
                real.vm.create_vcpu(0)
                model.vm.create_vcpu(0)
            for i, o in enumerate(ops):
                r, m = apply(real, o), apply(model, o)
                TRIED[f"diff:{o[0]}"] += 1
                if o[0] == "msi" and r[0] == m[0] == "ok":
                    continue                   # delivery counts differ in LAPIC modelling details
                assert m[0] == r[0] and (m[0] == "ok" or m[1] == r[1]), \
                    f"step {i} {o}: kvm {r} model {m}; ops {ops}"
        finally:
            real.close()
            model.close()
    run()
