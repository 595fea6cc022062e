"""The real-``/dev/kvm`` backend: ``KvmVm`` / ``KvmVcpu``, the API of ``Vm`` / ``Vcpu`` on KVM.

``KvmVm(arch="x86")`` opens ``/dev/kvm`` and creates a real VM.  Where that is impossible it raises
:class:`KvmUnavailable` (an ``OSError``) naming the reason.

- **Legacy path**: ``irqfd``/``irqfd_deassign``/``signal_msi``/``irq_line``/``set_gsi_routing``
  are the real ioctls on the VM fd; errors are KVM's.  Argument checks that the model does before
  touching its state (types, closed fds, non-eventfds, EBUSY for an eventfd that already feeds an
  irqfd) are done the same way first, so bad input gets the same exception on both backends.
- **``KVM_IRQFD_DIRECT``** does not exist in this kernel, so it is emulated the way VMMs survive
  today: each direct irqfd gets a GSI of its own from :class:`~kvmirqfast.kvm_gsi.GsiAllocator`,
  routed to its entry, and the user's table merged with every direct route is pushed to KVM in
  one ``KVM_SET_GSI_ROUTING``; the eventfd is bound to that GSI with a legacy ``KVM_IRQFD``.
  User GSIs win: a new user table (or legacy irqfd) that claims a direct route's GSI moves the
  route (detach, push, re-attach: an event in between waits in the eventfd counter, none is lost
  or misdelivered).  Past 4096 routes an assign fails with ``RoutingTableFull`` (``EINVAL``, as
  KVM's ``nr > 4096``) and nothing is half-assigned.  A retarget is a whole-table push: O(routes
  + irqfds) in the kernel, which is what the proposal removes.
- **vCPUs** run a tiny real guest (:mod:`kvmirqfast.guest`): ``wait_interrupt`` runs it in
  ``sti; hlt`` until it takes an interrupt through its IDT (the LAPIC's own acknowledge: IRR ->
  ISR, done by KVM), ``ack`` returns the vector the guest took, ``eoi`` makes the guest write the
  xAPIC EOI register.  ``pending`` reads IRR with ``KVM_GET_LAPIC``.

Observed on this machine (``kvm_pvm``, Linux 6.18), and why ``in_service`` is bookkept here: when
the emulated 32-bit guest takes an interrupt, KVM acknowledges *and* EOIs it at once -- ISR stays
empty, a level-triggered IOAPIC pin's remote IRR is cleared and its resamplers fire at delivery,
and a same-class vector is delivered while the first handler runs (tests/test_kvm_backend.py pins
this down).  The guest's EOI write is therefore a no-op on this host (it is the real EOI on a host
that keeps ISR), and ``in_service`` reports the vectors ``ack``ed and not yet ``eoi``ed, like the
model.  Priority blocking by in-service vectors (PPR) is not observable here.
"""

import errno
import fcntl
import os
import struct
import threading
import time
from collections import deque
from typing import NamedTuple

from . import uapi
from .arch import get_arch
from .guest import (EOI, IDLE, KVM_CAP_HALT_POLL, KVM_CAP_NR_MEMSLOTS, LAPIC_ENABLE_SPIV,
                    PORT_EOI, PORT_INTR, GuestCpu, GuestError, GuestImage)
from .irqfd import CLAIMS, eventfd_key
from .kvm_gsi import GsiAllocator, RoutingTableFull  # noqa: F401 (re-exported)
from .lifecycle import Closing
from .routing import GsiRoutingTable, IrqchipEntry, MsiEntry

__all__ = ["KvmVm", "KvmVcpu", "KvmUnavailable", "RoutingTableFull", "GuestError", "kvm_usable",
           "measure_retarget"]

KVM_API_VERSION = 12
KVM_CAP_SPLIT_IRQCHIP = uapi.KVM_CAP_SPLIT_IRQCHIP
RTC_PIN = 8
_REQUIRED_CAPS = {uapi.KVM_CAP_IRQCHIP: "KVM_CAP_IRQCHIP", uapi.KVM_CAP_IRQ_ROUTING:
                  "KVM_CAP_IRQ_ROUTING", uapi.KVM_CAP_IRQFD: "KVM_CAP_IRQFD",
                  uapi.KVM_CAP_SIGNAL_MSI: "KVM_CAP_SIGNAL_MSI"}
ACK_TIMEOUT = 1.0          # ack() without a reported vector: how long the guest may take to take it


class KvmUnavailable(OSError):
    """``backend="kvm"`` cannot run here; ``str()`` names the reason (and ``errno`` is set)."""


def _unavailable(err, what, hint=""):
    return KvmUnavailable(err, f"kvm backend unavailable: {what}: {os.strerror(err)}"
                               f"{' (' + hint + ')' if hint else ''}")


def kvm_usable(device="/dev/kvm"):
    """``(True, "")`` if ``device`` can create a VM with an in-kernel irqchip, else
    ``(False, reason)``.  The one probe the plugin, the benchmarks and the tests share."""
    try:
        kvm = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return False, f"{device} is not usable: {e.strerror}"
    try:
        vm = fcntl.ioctl(kvm, uapi.KVM_CREATE_VM, 0)
        try:
            fcntl.ioctl(vm, uapi.KVM_CREATE_IRQCHIP, 0)
        finally:
            os.close(vm)
    except OSError as e:
        return False, f"a VM with an irqchip cannot be created on {device}: {e.strerror}"
    finally:
        os.close(kvm)
    return True, ""


def _fd_arg(value, name):
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int file descriptor, not {type(value).__name__}")
    return value


def _err(code, what):
    return OSError(code, f"{os.strerror(code)}: {what}")


def _check_struct_arg(request, arg):
    # As the model (kvmirqfast.ioctl): an int for a struct ioctl is a user pointer we will not
    # follow; EFAULT, as a NULL pointer gets.
    if uapi.ioc_size(request) and isinstance(arg, int):
        raise _err(errno.EFAULT, "struct argument passed as an int")


class IrqfdInfo(NamedTuple):
    """What ``irqfd``/``irqfd_direct`` return on the kvm backend."""
    fd: int
    gsi: int              # the GSI KVM sees (for a direct irqfd: the one the allocator gave it)
    entry: object         # the direct irqfd's entry, None for a legacy one
    direct: bool


class _Direct:
    __slots__ = ("key", "fd", "resamplefd", "entry")

    def __init__(self, key, fd, resamplefd, entry):
        self.key, self.fd, self.resamplefd, self.entry = key, fd, resamplefd, entry

    def flags(self):
        return uapi.KVM_IRQFD_FLAG_RESAMPLE if self.resamplefd is not None else 0

    def close(self):
        for fd in (self.fd, self.resamplefd):
            if fd is not None:
                os.close(fd)
        self.fd = self.resamplefd = None


class _Legacy(NamedTuple):
    gsi: int


# ================================================================================================
class KvmVcpu:
    """A real vCPU running the tiny guest.  Same methods and meaning as ``Vcpu``."""

    def __init__(self, vm, vcpu_id, fd, cpu, has_lapic):
        self._vm = vm
        self.id = vcpu_id
        self.fd = fd
        self._cpu = cpu
        self._has_lapic = has_lapic
        self._lock = threading.Lock()
        self._taken = deque()        # vectors the guest took that ack() has not returned yet
        self._acked = []             # vectors ack()ed and not eoi()ed (this host keeps no ISR)
        self.interrupts = 0
        self.eois = 0
        cpu.on_vector = self._on_vector

    @property
    def lapic(self):
        """True-ish when the vCPU has an in-kernel LAPIC (the model has its LAPIC object here)."""
        return self if self._has_lapic else None

    def _on_vector(self, vector):
        with self._lock:
            self._taken.append(vector)
            self.interrupts += 1

    def _need_lapic(self):
        self._vm._check_open()
        if not self._has_lapic:
            raise RuntimeError(f"vCPU {self.id} has no in-kernel LAPIC: create the irqchip "
                               "before the vCPUs")

    def get_lapic(self):
        """``KVM_GET_LAPIC``: the 1 KiB ``kvm_lapic_state`` (a bytearray)."""
        buf = bytearray(uapi.LAPIC_STATE_SIZE)
        self._cpu.ioctl(uapi.KVM_GET_LAPIC, buf)
        return buf

    def pending(self):
        """Vectors pending (LAPIC IRR by KVM_GET_LAPIC, plus any taken but not yet ack()ed)."""
        self._need_lapic()
        irr = set(uapi.lapic_vectors(self.get_lapic(), uapi.APIC_IRR))
        with self._lock:
            irr.update(self._taken)
        return sorted(irr)

    def in_service(self):
        """Vectors in service: ack()ed and not eoi()ed (and any ISR bit KVM reports)."""
        self._need_lapic()
        isr = set(uapi.lapic_vectors(self.get_lapic(), uapi.APIC_ISR))
        with self._lock:
            isr.difference_update(self._taken)
            isr.update(self._acked)
        return sorted(isr)

    @staticmethod
    def _deliverable(state):
        irr = uapi.lapic_vectors(state, uapi.APIC_IRR)
        if not irr:
            return False
        ppr = uapi.lapic_reg(state, 0xA0) & 0xF0          # PPR as KVM computes it
        return (max(irr) & 0xF0) > ppr

    def wait_interrupt(self, timeout=None, poll_ns=None):
        """Run the guest in ``hlt`` until it takes an interrupt: True, or False on timeout.

        ``timeout`` in seconds (None: no limit).  ``poll_ns`` is accepted for the model's
        signature; KVM's own halt-polling (the VM's ``poll_ns``) applies.  False once the VM is
        closed.
        """
        self._need_lapic()
        with self._lock:
            if self._taken:
                return True
        if timeout is not None and timeout <= 0:
            if not self._deliverable(self.get_lapic()):
                return False
            timeout = ACK_TIMEOUT
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._cpu.run_until(IDLE, PORT_INTR, deadline):
            return False
        return True

    def ack(self):
        """The vector the guest took (highest first), now in service; None if none deliverable."""
        self._need_lapic()
        with self._lock:
            if not self._taken:
                v = None
            else:
                v = self._taken.popleft()
                self._acked.append(v)
                return v
        if not self._deliverable(self.get_lapic()):
            return None
        if not self.wait_interrupt(ACK_TIMEOUT):
            return None
        with self._lock:
            if not self._taken:
                return None
            v = self._taken.popleft()
            self._acked.append(v)
            return v

    def eoi(self):
        """The guest writes the LAPIC EOI register; returns the vector EOIed (None if none).

        KVM's EOI runs for real: the highest in-service vector is cleared and, for a vector the
        IOAPIC handles, the IOAPIC gets the EOI (remote IRR, ack notifiers, irqfd resamplers).
        """
        self._need_lapic()
        with self._lock:
            if not self._acked:
                return None
        if not self._cpu.run_until(EOI, PORT_EOI, time.monotonic() + ACK_TIMEOUT * 5):
            if self._vm.closed:
                return None
            raise GuestError(f"vCPU {self.id}: the guest did not complete its EOI")
        with self._lock:
            v = max(self._acked)
            self._acked.remove(v)
            self.eois += 1
        return v

    def ioctl(self, request, arg=0, mutate_flag=True):
        """``fcntl.ioctl`` on the real vCPU fd (shared safely with a running guest)."""
        from .ioctl import request_number
        request = request_number(request, self._vm.closed)
        _check_struct_arg(request, arg)
        return self._cpu.ioctl(request, arg, mutate_flag)

    def __repr__(self):
        return f"<KvmVcpu {self.id} fd={self.fd}>"


# ================================================================================================
class KvmVm(Closing):
    """A real KVM VM with the API of ``kvmirqfast.Vm`` (``backend="kvm"``).

    ``KvmVm(arch="x86", irqchip=False, poll_ns=0)``: ``poll_ns`` sets KVM's halt-polling window
    for the VM (``KVM_CAP_HALT_POLL``).  Use as a context manager; ``close()`` stops every vCPU
    run and closes every fd and mapping.
    """

    backend = "kvm"

    def __init__(self, arch="x86", *, irqchip=False, poll_ns=0, device="/dev/kvm"):
        self.arch = get_arch(arch)
        if self.arch.name != "x86" or os.uname().machine not in ("x86_64", "amd64"):
            raise KvmUnavailable(errno.ENODEV, f"kvm backend unavailable: a {self.arch.name} VM "
                                 f"cannot run on this {os.uname().machine} host's KVM; use "
                                 "backend='model'")
        self._lock = threading.RLock()
        self._closed = True
        self._pid = os.getpid()
        self._kvm = self._fd = -1
        try:
            self._kvm = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            hint = {errno.ENOENT: "no KVM device: KVM module not loaded or not a VM host",
                    errno.EACCES: "not allowed to open it: add the user to the kvm group",
                    errno.EPERM: "not allowed to open it"}.get(e.errno, "")
            raise _unavailable(e.errno, f"cannot open {device}", hint) from None
        try:
            try:
                version = fcntl.ioctl(self._kvm, uapi.KVM_GET_API_VERSION, 0)
            except OSError as e:
                raise _unavailable(e.errno, f"{device} is not a KVM device (KVM_GET_API_VERSION "
                                   "failed)") from None
            if version != KVM_API_VERSION:
                raise KvmUnavailable(errno.EINVAL, f"kvm backend unavailable: {device} speaks KVM "
                                     f"API {version}, not {KVM_API_VERSION}")
            try:
                self._fd = fcntl.ioctl(self._kvm, uapi.KVM_CREATE_VM, 0)
            except OSError as e:
                raise _unavailable(e.errno, "KVM_CREATE_VM failed",
                                   "virtualization disabled or in use?") from None
            for cap, name in _REQUIRED_CAPS.items():
                if fcntl.ioctl(self._fd, uapi.KVM_CHECK_EXTENSION, cap) <= 0:
                    raise KvmUnavailable(errno.ENOTSUP, f"kvm backend unavailable: this KVM lacks "
                                         f"{name}")
        except BaseException:
            self._close_fds()
            raise
        self._closed = False
        self._irqchip = False
        self._alloc = GsiAllocator()
        self._direct = {}               # eventfd key -> _Direct
        self._legacy = {}               # eventfd key -> _Legacy
        self._vcpus = {}
        self._image = None
        self._memslot = None
        self._poll_ns = 0
        self._errors = []
        self.on_error = None
        self._stats = dict(route_pushes=0, route_push_ns=0, direct_moves=0)
        self.halt_poll_supported = fcntl.ioctl(self._fd, uapi.KVM_CHECK_EXTENSION,
                                               KVM_CAP_HALT_POLL) > 0
        try:
            self.poll_ns = poll_ns
            if irqchip:
                self.create_irqchip()
        except BaseException:
            self.close()
            raise

    # -- lifetime ------------------------------------------------------------------------------
    def _close_fds(self):
        for fd in (self._fd, self._kvm):
            if fd >= 0:
                os.close(fd)
        self._fd = self._kvm = -1

    def close(self):
        """Stop every guest run, close every vCPU fd, the VM fd, /dev/kvm, and unmap memory.

        Idempotent.  Held eventfd duplicates are closed and their claims released.
        """
        if self._pid != os.getpid():
            self._closed = True
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            vcpus = list(self._vcpus.values())
            for v in vcpus:
                v._cpu.stop()
        for v in vcpus:
            v._cpu.close()
            os.close(v.fd)
        with self._lock:
            for key, d in self._direct.items():
                d.close()
                CLAIMS.release(key, self)
            for key in self._legacy:
                CLAIMS.release(key, self)
            self._direct = {}
            self._legacy = {}
            self._close_fds()
            if self._image is not None:
                self._image.close()
                self._image = None

    @property
    def fd(self):
        """The real VM fd (for ioctls this class does not wrap; prefer ``ioctl``)."""
        return self._fd

    def _check_open(self):
        if self._closed:
            raise ValueError("operation on a closed Vm")
        if self._pid != os.getpid():
            raise RuntimeError("this Vm was created before fork(); create a new Vm in the child")

    @property
    def poll_ns(self):
        """KVM's halt-polling window for this VM in ns (``KVM_CAP_HALT_POLL``; 0 = off)."""
        return self._poll_ns

    @poll_ns.setter
    def poll_ns(self, value):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError("poll_ns must be a non-negative int")
        if self.halt_poll_supported:
            fcntl.ioctl(self._fd, uapi.KVM_ENABLE_CAP,
                        uapi.ENABLE_CAP.pack(KVM_CAP_HALT_POLL, 0, value, 0, 0, 0))
        self._poll_ns = value

    @property
    def errors(self):
        return list(self._errors)

    def _report_error(self, exc):
        self._errors.append(exc)
        if self.on_error is not None:
            try:
                self.on_error(exc)
            except Exception:
                pass

    # -- irqchip and vCPUs ---------------------------------------------------------------------
    @property
    def has_irqchip(self):
        return self._irqchip

    def create_irqchip(self):
        """KVM_CREATE_IRQCHIP (PIC + IOAPIC + KVM's default routing).  KVM's errors."""
        with self._lock:
            self._check_open()
            fcntl.ioctl(self._fd, uapi.KVM_CREATE_IRQCHIP, 0)
            self._irqchip = True
            self._alloc.set_user_table(GsiRoutingTable.build(self.arch.default_routing_pairs(),
                                                             self.arch))

    def _ensure_image(self):
        if self._image is None:
            image = GuestImage()
            slot = fcntl.ioctl(self._fd, uapi.KVM_CHECK_EXTENSION, KVM_CAP_NR_MEMSLOTS) - 1
            try:
                image.install(self._fd, max(slot, 0))
            except BaseException:
                image.close()
                raise
            self._image = image
        return self._image

    def create_vcpu(self, vcpu_id, *, lapic_enabled=True):
        """KVM_CREATE_VCPU, set up to run the tiny guest.  Returns a ``KvmVcpu``.

        ``lapic_enabled`` (default True) software-enables the LAPIC (SPIV) as a guest OS does;
        vCPUs other than 0 are made runnable (KVM starts them UNINITIALIZED).  KVM's errors
        (EEXIST for a duplicate id, EINVAL for an id out of range).
        """
        if not isinstance(vcpu_id, int) or isinstance(vcpu_id, bool):
            raise TypeError(f"vcpu_id must be an int, not {type(vcpu_id).__name__}")
        with self._lock:
            self._check_open()
            if vcpu_id < 0:
                raise OSError(errno.EINVAL, f"vcpu id {vcpu_id} out of range")
            image = self._ensure_image()
            fd = fcntl.ioctl(self._fd, uapi.KVM_CREATE_VCPU, vcpu_id)
            cpu = None
            try:
                cpu = GuestCpu(self._kvm, fd, image, len(self._vcpus), None)
                vcpu = KvmVcpu(self, vcpu_id, fd, cpu, self._irqchip)
                if self._irqchip:
                    if lapic_enabled:
                        st = vcpu.get_lapic()
                        uapi.set_lapic_reg(st, uapi.APIC_SPIV,
                                           uapi.lapic_reg(st, uapi.APIC_SPIV) | LAPIC_ENABLE_SPIV)
                        cpu.ioctl(uapi.KVM_SET_LAPIC, st)
                    state = bytearray(4)
                    cpu.ioctl(uapi.KVM_GET_MP_STATE, state)
                    if uapi.MP_STATE.unpack(state)[0] == uapi.KVM_MP_STATE_UNINITIALIZED:
                        cpu.ioctl(uapi.KVM_SET_MP_STATE,
                                  uapi.MP_STATE.pack(uapi.KVM_MP_STATE_RUNNABLE))
            except BaseException:
                if cpu is not None:
                    cpu.run.close()
                os.close(fd)
                raise
            self._vcpus[vcpu_id] = vcpu
            return vcpu

    @property
    def vcpus(self):
        return dict(self._vcpus)

    # -- routing -------------------------------------------------------------------------------
    @property
    def gsi_routing(self):
        """The user's routing table in force (direct irqfds' routes are not part of it)."""
        return self._alloc.user_table

    def kernel_routing(self):
        """The merged table last pushed to KVM, as ``(gsi, entry)`` pairs (directs first)."""
        return self._alloc.merged_pairs()

    def direct_gsi(self, eventfd):
        """The GSI backing the direct irqfd of ``eventfd`` (None if it has none)."""
        r = self._alloc.get(eventfd_key(_fd_arg(eventfd, "eventfd")))
        return None if r is None else r.gsi

    def set_gsi_routing(self, entries):
        """KVM_SET_GSI_ROUTING of the user's ``(gsi, entry)`` pairs, merged with direct routes.

        Validation as the model (``InvalidRouting``); direct routes on GSIs the new table uses
        move out of the way; ``RoutingTableFull`` if table + direct routes exceed 4096.  A
        refused table leaves everything as it was.
        """
        self.install_gsi_routing(GsiRoutingTable.build(entries, self.arch))

    def install_gsi_routing(self, table):
        with self._lock:
            self._check_open()
            if not self._irqchip:
                raise OSError(errno.EINVAL, "KVM_SET_GSI_ROUTING needs an in-kernel irqchip")
            snap = self._alloc.snapshot()
            moves = self._alloc.set_user_table(table)
            try:
                self._push_with_moves(moves)
            except BaseException:
                self._alloc.restore(snap)
                raise

    def _push(self):
        buf = self._alloc.table_bytes()
        t0 = time.perf_counter_ns()
        fcntl.ioctl(self._fd, uapi.KVM_SET_GSI_ROUTING, buf)
        self._stats["route_pushes"] += 1
        self._stats["route_push_ns"] += time.perf_counter_ns() - t0

    def _kvm_irqfd(self, fd, gsi, flags=0, resamplefd=None):
        fcntl.ioctl(self._fd, uapi.KVM_IRQFD,
                    uapi.pack_irqfd(fd, gsi, flags, resamplefd if resamplefd is not None else 0))

    def _push_with_moves(self, moves):
        """Push the merged table; irqfds of moved direct routes are detached around the push."""
        moved = [(self._direct[m.key], m) for m in moves]
        for d, m in moved:                  # events now wait in the eventfd counter
            self._kvm_irqfd(d.fd, m.old_gsi, uapi.KVM_IRQFD_FLAG_DEASSIGN)
        try:
            self._push()
        except BaseException:
            for d, m in moved:
                self._kvm_irqfd(d.fd, m.old_gsi, d.flags(), d.resamplefd)
            raise
        for d, m in moved:                  # KVM injects a pending count at assign
            try:
                self._kvm_irqfd(d.fd, m.new_gsi, d.flags(), d.resamplefd)
            except OSError as e:             # cannot happen with our own fd dups; reported
                self._report_error(e)
        self._stats["direct_moves"] += len(moved)

    # -- legacy irqfd ----------------------------------------------------------------------------
    def _check_irqfd_allowed(self, resamplefd):
        if not self._irqchip:
            raise OSError(errno.EINVAL, "irqfds need an in-kernel irqchip")
        if resamplefd is not None:
            _fd_arg(resamplefd, "resamplefd")

    def _claim(self, eventfd, resamplefd):
        key = eventfd_key(eventfd)
        if resamplefd is not None:
            eventfd_key(resamplefd)
        if key in self._direct or key in self._legacy:
            raise OSError(errno.EBUSY, "eventfd is already assigned to an irqfd")
        CLAIMS.claim(key, self)
        return key

    def irqfd(self, eventfd, gsi, resamplefd=None):
        """KVM_IRQFD: the real one.  A direct route on ``gsi`` moves away first (user GSIs win)."""
        _fd_arg(eventfd, "eventfd")
        if not isinstance(gsi, int) or isinstance(gsi, bool):
            raise TypeError(f"gsi must be an int, not {type(gsi).__name__}")
        if not 0 <= gsi <= 0xFFFFFFFF:
            raise ValueError(f"gsi {gsi} out of u32 range")
        with self._lock:
            self._check_open()
            self._check_irqfd_allowed(resamplefd)
            key = self._claim(eventfd, resamplefd)
            snap = self._alloc.snapshot() if self._alloc.direct_key_at(gsi) is not None else None
            try:
                moves = self._alloc.reserve_legacy(gsi)
                if moves:
                    try:
                        self._push_with_moves(moves)
                    except BaseException:
                        self._alloc.restore(snap)
                        raise
                try:
                    flags = uapi.KVM_IRQFD_FLAG_RESAMPLE if resamplefd is not None else 0
                    self._kvm_irqfd(eventfd, gsi, flags, resamplefd)
                except BaseException:
                    self._alloc.release_legacy(gsi)
                    raise
            except BaseException:
                CLAIMS.release(key, self)
                raise
            self._legacy[key] = _Legacy(gsi)
            return IrqfdInfo(eventfd, gsi, None, False)

    def irqfd_deassign(self, eventfd, gsi):
        """KVM_IRQFD with DEASSIGN; True if an irqfd of ours was detached."""
        _fd_arg(eventfd, "eventfd")
        key = eventfd_key(eventfd)
        with self._lock:
            self._check_open()
            rec = self._legacy.get(key)
            if rec is None or rec.gsi != gsi:
                return False
            self._kvm_irqfd(eventfd, gsi, uapi.KVM_IRQFD_FLAG_DEASSIGN)
            del self._legacy[key]
            self._alloc.release_legacy(gsi)
            CLAIMS.release(key, self)
            return True

    # -- direct irqfd (emulated) ---------------------------------------------------------------
    def _check_entry(self, entry):
        if not isinstance(entry, (IrqchipEntry, MsiEntry)):
            raise TypeError("entry must be an IrqchipEntry or MsiEntry, not "
                            f"{type(entry).__name__}")
        self.arch.validate_entry(entry)

    def irqfd_direct(self, eventfd, entry, resamplefd=None):
        """Emulated KVM_IRQFD_DIRECT: a GSI of its own, routed to ``entry``, in the merged table.

        Same argument errors as the model; ``RoutingTableFull`` (EINVAL) once the merged table
        holds 4096 routes, with nothing assigned.  Holds a dup of the eventfd (as the model, the
        irqfd lives until deassigned or the VM closes).  Cost: one whole-table push.
        """
        _fd_arg(eventfd, "eventfd")
        self._check_entry(entry)
        with self._lock:
            self._check_open()
            self._check_irqfd_allowed(resamplefd)
            key = self._claim(eventfd, resamplefd)
            d = None
            try:
                d = _Direct(key, fcntl.fcntl(eventfd, fcntl.F_DUPFD_CLOEXEC, 0),
                            None if resamplefd is None
                            else fcntl.fcntl(resamplefd, fcntl.F_DUPFD_CLOEXEC, 0), entry)
                # A resampling irqchip route goes after the user's entries, so that KVM reports
                # its pin's EOIs on its GSI (KVM's chip map keeps the last entry for a pin).
                gsi = self._alloc.add(key, entry, tail=resamplefd is not None
                                      and isinstance(entry, IrqchipEntry))
                try:
                    self._push()
                except BaseException:
                    self._alloc.remove(key)
                    raise
                try:
                    self._kvm_irqfd(d.fd, gsi, d.flags(), d.resamplefd)
                except BaseException:
                    self._alloc.remove(key)
                    self._push()
                    raise
            except BaseException:
                if d is not None:
                    d.close()
                CLAIMS.release(key, self)
                raise
            self._direct[key] = d
            return IrqfdInfo(eventfd, gsi, entry, True)

    def irqfd_direct_modify(self, eventfd, entry):
        """Retarget a direct irqfd: its route changes in the merged table, one whole-table push."""
        _fd_arg(eventfd, "eventfd")
        self._check_entry(entry)
        key = eventfd_key(eventfd)
        with self._lock:
            self._check_open()
            d = self._direct.get(key)
            if d is None:
                raise OSError(errno.ENOENT, f"eventfd {eventfd} has no direct irqfd")
            if isinstance(entry, IrqchipEntry) != isinstance(d.entry, IrqchipEntry) and \
                    d.resamplefd is not None:
                raise OSError(errno.EINVAL, "a resampling irqfd keeps its irqchip line")
            old = self._alloc.modify(key, entry)
            try:
                self._push()
            except BaseException:
                self._alloc.modify(key, old)
                raise
            d.entry = entry

    def irqfd_direct_deassign(self, eventfd):
        """Detach the direct irqfd of ``eventfd`` and free its route; True if there was one."""
        _fd_arg(eventfd, "eventfd")
        key = eventfd_key(eventfd)
        with self._lock:
            self._check_open()
            d = self._direct.get(key)
            if d is None:
                return False
            gsi = self._alloc.get(key).gsi
            self._kvm_irqfd(d.fd, gsi, uapi.KVM_IRQFD_FLAG_DEASSIGN)
            del self._direct[key]
            self._alloc.remove(key)
            try:
                self._push()                 # the GSI may be the user's next: no stale route
            finally:
                d.close()
                CLAIMS.release(key, self)
            return True

    def irqfd_count(self):
        return len(self._direct) + len(self._legacy)

    # -- injection ---------------------------------------------------------------------------------
    def signal_msi(self, address_lo, address_hi=0, data=0, devid=None):
        """KVM_SIGNAL_MSI; returns how many LAPICs accepted it (0 if none).

        ``vm.ioctl(KVM_SIGNAL_MSI, ...)`` is the raw call: there KVM's -1 for a VM without vCPUs
        surfaces as EPERM.
        """
        entry = MsiEntry(address_lo, address_hi, data, devid)
        with self._lock:
            self._check_open()
            if not self._irqchip:
                raise OSError(errno.EINVAL, "KVM_SIGNAL_MSI needs an in-kernel irqchip")
            buf = bytearray(uapi.pack_msi(entry.address_lo, entry.address_hi, entry.data,
                                          entry.flags, entry.devid or 0))
            try:
                return max(0, fcntl.ioctl(self._fd, uapi.KVM_SIGNAL_MSI, buf))
            except PermissionError:
                # KVM returns -1 (seen as EPERM) when no LAPIC at all took part (a VM without
                # vCPUs); the method's contract, as the model's, is "0 if none".
                return 0

    def _routes_rtc(self, gsi):
        return any(isinstance(e, IrqchipEntry) and e.irqchip == uapi.KVM_IRQCHIP_IOAPIC
                   and e.pin == RTC_PIN for e in self._alloc.user_table.entries_for(gsi))

    def irq_line(self, gsi, level, *, line_status=False):
        """KVM_IRQ_LINE(_STATUS) on the user's GSIs; returns KVM's status (-1/0/>0).

        A GSI that only a direct irqfd's route uses is not the user's: -1 (no route), as on the
        model.  With ``line_status=False`` on a GSI routed to the RTC pin (8), KVM_IRQ_LINE is
        used (KVM's RTC coalescing depends on it) and the status is not known: None.
        """
        if not isinstance(gsi, int) or isinstance(gsi, bool):
            raise TypeError(f"gsi must be an int, not {type(gsi).__name__}")
        with self._lock:
            self._check_open()
            if not self._irqchip:
                raise OSError(errno.ENXIO, "KVM_IRQ_LINE needs an in-kernel irqchip")
            if self._alloc.direct_key_at(gsi) is not None:
                return -1
            if not line_status and self._routes_rtc(gsi):
                fcntl.ioctl(self._fd, uapi.KVM_IRQ_LINE, uapi.pack_irq_level(gsi, int(bool(level))))
                return None
            out = fcntl.ioctl(self._fd, uapi.KVM_IRQ_LINE_STATUS,
                              uapi.pack_irq_level(gsi, int(bool(level))))
            return uapi.IRQ_LEVEL.unpack(out)[0]

    @property
    def ioapic(self):
        return None                      # the IOAPIC is KVM's: KVM_GET/SET_IRQCHIP via ioctl

    @property
    def pic(self):
        return None

    # -- statistics ------------------------------------------------------------------------------
    def stats(self):
        """Counters: irqfds, direct/legacy, routes in KVM's table, pushes and their cost, moves."""
        s = dict(self._stats)
        s.update(irqfds=self.irqfd_count(), direct=len(self._direct), legacy=len(self._legacy),
                 routes=self._alloc.route_count, user_routes=len(self._alloc.user_table),
                 interrupts=sum(v.interrupts for v in self._vcpus.values()),
                 eois=sum(v.eois for v in self._vcpus.values()),
                 kvm_runs=sum(v._cpu.runs for v in self._vcpus.values()),
                 deferred_errors=len(self._errors))
        return s

    # -- uAPI --------------------------------------------------------------------------------------
    def ioctl(self, request, arg=0, mutate_flag=True):
        """``fcntl.ioctl`` on the real VM fd.

        Passed through unchanged, except what the emulation must see: KVM_SET_GSI_ROUTING and
        KVM_IRQFD (merged with / kept clear of direct routes), KVM_IRQFD_DIRECT (emulated),
        KVM_SIGNAL_MSI is the raw call (KVM's -1 without vCPUs is EPERM, on both backends),
        KVM_IRQ_LINE(_STATUS) (a direct route's GSI is not the user's), KVM_CREATE_IRQCHIP /
        KVM_CREATE_VCPU (return a ``KvmVcpu``, as the model), KVM_ENABLE_CAP (tracked) and
        KVM_CHECK_EXTENSION(KVM_CAP_IRQFD_DIRECT) (1).  Errors are the model's for bad input of
        the emulated requests, KVM's for everything else.
        """
        from . import ioctl as model_ioctl
        request = model_ioctl.request_number(request, self._closed)
        if request == uapi.KVM_CHECK_EXTENSION:
            if isinstance(arg, int) and arg == uapi.KVM_CAP_IRQFD_DIRECT:
                return 1
            return fcntl.ioctl(self._fd, request, arg, mutate_flag)
        if request == uapi.KVM_CREATE_IRQCHIP:
            self.create_irqchip()
            return 0
        if request == uapi.KVM_CREATE_VCPU:
            return self.create_vcpu(model_ioctl._value(arg), lapic_enabled=False)
        handler = _EMULATED.get(request)
        if handler is not None:
            a = model_ioctl._Arg(arg, mutate_flag)
            return a.result(handler(self, a))
        _check_struct_arg(request, arg)
        if request == uapi.KVM_ENABLE_CAP and not isinstance(arg, int):
            return self._enable_cap(arg, mutate_flag)
        with self._lock:
            return fcntl.ioctl(self._fd, request, arg, mutate_flag)

    def _enable_cap(self, arg, mutate_flag):
        with self._lock:
            ret = fcntl.ioctl(self._fd, uapi.KVM_ENABLE_CAP, arg, mutate_flag)
            raw = bytes(memoryview(arg).cast("B")[:uapi.ENABLE_CAP.size]).ljust(
                uapi.ENABLE_CAP.size, b"\0")
            cap, _flags, arg0, *_ = uapi.ENABLE_CAP.unpack(raw)
            if cap == uapi.KVM_CAP_X2APIC_API:
                self.arch.enable_x2apic_api(arg0)
            elif cap == KVM_CAP_SPLIT_IRQCHIP:
                self.arch.split_irqchip = True
                self._irqchip = True
                self._alloc.set_user_table(GsiRoutingTable())
            elif cap == KVM_CAP_HALT_POLL:
                self._poll_ns = arg0
            return ret

    def __repr__(self):
        if not hasattr(self, "_alloc"):
            return "<KvmVm (not created)>"
        return (f"<KvmVm fd={self._fd} vcpus={len(self._vcpus)} irqfds={self.irqfd_count()}"
                f" routes={self._alloc.route_count}{' closed' if self._closed else ''}>")


def _model_handler(name):
    def call(vm, a, _name=name):
        from . import ioctl as model_ioctl
        return getattr(model_ioctl, _name)(vm, a)
    return call


_EMULATED = {
    uapi.KVM_SET_GSI_ROUTING: _model_handler("_set_gsi_routing"),
    uapi.KVM_IRQFD: _model_handler("_irqfd"),
    uapi.KVM_IRQFD_DIRECT: _model_handler("_irqfd_direct"),
    uapi.KVM_IRQ_LINE: lambda vm, a: _irq_line(vm, a, False),
    uapi.KVM_IRQ_LINE_STATUS: lambda vm, a: _irq_line(vm, a, True),
}


def _irq_line(vm, a, status):
    irq, level = uapi.IRQ_LEVEL.unpack_from(a.need(uapi.IRQ_LEVEL.size))
    if not vm.has_irqchip:
        raise _err(errno.ENXIO, "no in-kernel irqchip")
    if vm._alloc.direct_key_at(irq) is None:       # the user's GSI: the real ioctl, same bytes
        request = uapi.KVM_IRQ_LINE_STATUS if status else uapi.KVM_IRQ_LINE
        view = memoryview(a.buf)[:uapi.IRQ_LEVEL.size]
        with vm._lock:
            fcntl.ioctl(vm._fd, request, view)
        return 0
    if status:
        struct.pack_into("<i", a.buf, 0, -1)
    return 0


# ================================================================================================
def measure_retarget(backend, routes=4096, samples=200, vcpus=2):
    """Mean seconds per ``irqfd_direct_modify`` with ``routes`` direct irqfds assigned.

    ``backend`` is "kvm" (each retarget pushes the whole merged table to KVM) or "model".
    Returns ``(mean_seconds, samples)``.
    """
    from .arch.x86 import msi_address, msi_data
    if backend == "kvm":
        vm = KvmVm(irqchip=True)
        vm.set_gsi_routing([])
    else:
        from .vm import Vm
        vm = Vm(irqchip=True)
    fds = []
    try:
        for i in range(vcpus):
            vm.create_vcpu(i)
        for i in range(routes):
            fd = os.eventfd(0, os.EFD_CLOEXEC)
            fds.append(fd)
            vm.irqfd_direct(fd, MsiEntry(*msi_address(i % vcpus), msi_data(0x20 + i % 200)))
        picks = [fds[(i * 7919) % len(fds)] for i in range(samples)]
        t0 = time.perf_counter()
        for n, fd in enumerate(picks):
            vm.irqfd_direct_modify(fd, MsiEntry(*msi_address(n % vcpus), msi_data(0x30 + n % 100)))
        return (time.perf_counter() - t0) / max(samples, 1), samples
    finally:
        vm.close()
        for fd in fds:
            os.close(fd)
