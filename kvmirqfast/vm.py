"""Vm: the Python control plane over the native engine (the vCPU side is in ``vcpu.py``, the
GSI -> irqchip injection layer in ``irq.py``).

Data flow: a device writes an eventfd -> the engine thread (``_engine``) takes the wakeup from
epoll, finds the irqfd record in the registration's data, and delivers its route into a LAPIC
(``_lapic``) -> a vCPU thread blocked in ``Vcpu.wait_interrupt`` wakes, ``ack``s and ``eoi``s.
Routes that need the interrupt controllers (PIC/IOAPIC, resamplers) go through the deferred
worker, a Python thread, to ``irq.Irqchip``, as KVM's ``irqfd_inject`` goes through a workqueue.

Locking: ``Vm._lock`` serialises the control plane (irqfd index, routing table, PIC/IOAPIC,
resamplers) and the deferred worker's injections.  The engine never takes it.
"""

import errno
import fcntl
import os
import sys
import threading
import traceback
import weakref

from . import uapi
from ._engine import Engine
from ._index import IrqfdIndex
from ._lapic import ApicBus, Lapic, x86_msi_route_word
from .arch import get_arch
from .irq import KVM_USERSPACE_IRQ_SOURCE_ID, Irqchip
from .irqfd import (CLAIMS, NO_ROUTE_WORD, ROUTE_MSI, SLOW_ROUTE_WORD, eventfd_info, eventfd_key,
                    new_record)
from .lifecycle import Closing
from .routing import GsiRoutingTable, IrqchipEntry, MsiEntry
from .vcpu import Vcpu

MAX_VCPUS = 256          # ApicBus capacity; reported as KVM_CAP_MAX_VCPUS
MAX_VCPU_ID = 4096       # KVM_MAX_VCPU_IDS on x86


_LIVE_VMS = weakref.WeakSet()


def _after_fork_in_child():
    # Another thread may have held a Vm's lock at fork(): give each Vm a fresh one, so that
    # using it in the child raises the documented RuntimeError instead of hanging.
    for vm in list(_LIVE_VMS):
        vm._lock = threading.RLock()
        vm._forked = True
        # vCPUs' native fast paths see a shut-down LAPIC and ask _check_open.  (A Vm whose
        # __init__ failed half-way has no _vcpus: skip it, and never stop the loop.)
        for v in getattr(vm, "_vcpus", {}).values():
            if v.lapic is not None:
                v.lapic.shutdown()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _deferred_worker(vm_ref, engine):
    """The deferred worker thread: KVM's irqfd_inject workqueue, one per Vm."""
    while True:
        records = engine.take_deferred()
        vm = vm_ref()
        if vm is None or vm.closed:
            return
        if records:
            vm._run_deferred(records)
        del vm


def _is_direct(r):
    return r.direct


def _fd_arg(value, name):
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int file descriptor, not {type(value).__name__}")
    return value


class Vm(Closing):
    """An in-process VM with KVM's irqfd, GSI routing and the KVM_IRQFD_DIRECT proposal.

    ``Vm(arch="x86", backend="model", irqchip=False, poll_ns=0)``: ``backend="kvm"`` returns the
    same API over a real /dev/kvm VM instead.  Like ``KVM_CREATE_VM``, the VM starts without
    an interrupt controller; call ``create_irqchip()`` (or pass ``irqchip=True``) before vCPUs.
    Use as a context manager; ``close()`` stops the engine and releases every fd and thread.
    """

    def __new__(cls, arch="x86", *, backend="model", **kw):
        if backend == "model":
            return super().__new__(cls)
        if backend == "kvm":
            from .kvm import KvmVm              # real /dev/kvm behind the same API
            return KvmVm(arch, **kw)
        raise ValueError(f"unknown backend {backend!r}: 'model' or 'kvm'")

    def __init__(self, arch="x86", *, backend="model", irqchip=False, poll_ns=0):
        self.backend = backend
        self.arch = get_arch(arch)
        self._lock = threading.RLock()
        self._closed = False
        self._pid = os.getpid()               # fork(): the child gets no engine thread
        self._forked = False                  # set in a fork() child (cheaper than getpid())
        _LIVE_VMS.add(self)
        self._bus = ApicBus()
        # io_uring gives the engine its own eventfd references and batched reads; without it
        # (or with KVMIRQFAST_NO_IO_URING=1) it reads through the assigned fd numbers.
        self._engine = Engine(self._bus, os.environ.get("KVMIRQFAST_NO_IO_URING", "0") in ("", "0"))
        self._index = IrqfdIndex()
        self._by_fd = {}              # fd number -> the record last assigned under it
        self._tombstones = []         # dead records whose epoll registration is unreachable
        self._graveyard = set()       # deassigned records still on the deferred list
        self._vcpus = {}
        self._routing = GsiRoutingTable.build([], self.arch)
        self._irqchip = False
        self._irq = None              # the in-kernel irqchips and resamplers (irq.Irqchip)
        self._errors = []
        self.on_error = None          # callable(exc) for errors in deferred delivery
        self._lapic_image = {}        # vcpu id -> the KVM_SET_LAPIC image (unmodelled registers)
        self._engine.poll_ns = int(poll_ns)
        self._engine.start()
        # The worker holds the Vm weakly, so a Vm dropped without close() is still collected
        # (its __del__ closes the engine, which wakes the worker to exit).
        self._worker = threading.Thread(target=_deferred_worker,
                                        args=(weakref.ref(self), self._engine),
                                        name="kvmirqfast-deferred", daemon=True)
        self._worker.start()
        if irqchip:
            self.create_irqchip()

    # -- lifetime ------------------------------------------------------------------------------
    def close(self):
        """Stop the engine and the deferred worker, detach every irqfd, wake sleeping vCPUs.

        Idempotent.  After it returns no thread of this VM runs and no fd of it is open.
        In a child process after fork() it only marks the Vm closed (the threads are the
        parent's; its fds are the child's copies and close with the process).
        """
        if self._pid != os.getpid():
            self._closed = True
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for v in self._vcpus.values():    # halted vCPUs return (close() waits for them)
                if v.lapic is not None:
                    v.lapic.shutdown()
            self._engine.close()              # joins the engine thread: no record is in use
            # The worker may hold records it popped from the deferred list: keep them alive
            # until it has exited.
            keep = list(self._index) + list(self._graveyard) + self._tombstones
            for r in self._index:
                CLAIMS.release(r.key, self)
            self._index = IrqfdIndex()
            self._by_fd = {}
            self._graveyard = set()
            self._tombstones = []
            if self._irq is not None:
                self._irq.close()
        if self._worker is not threading.current_thread():
            self._worker.join()
        del keep

    def _check_open(self):
        if self._closed:
            raise ValueError("operation on a closed Vm")
        if self._forked:
            raise RuntimeError("this Vm was created before fork(); its engine thread does not "
                               "exist in the child: create a new Vm in the child")

    @property
    def poll_ns(self):
        """Halt-polling window in ns for the engine and for ``wait_interrupt`` (0 = off)."""
        return self._engine.poll_ns

    @poll_ns.setter
    def poll_ns(self, value):
        if not isinstance(value, int) or value < 0:
            raise ValueError("poll_ns must be a non-negative int")
        self._engine.poll_ns = value

    @property
    def vcpu_harvest(self):
        """May a halted vCPU sleep in epoll_wait on the engine's eventfds and take a device write
        itself (one thread wake-up per interrupt, as KVM's delivery in the writer's context),
        instead of on its futex behind the engine thread (two)?  Default True.  One vCPU at a
        time does; the engine delivers for the others."""
        return self._engine.vcpu_harvest

    @vcpu_harvest.setter
    def vcpu_harvest(self, value):
        if not isinstance(value, bool):
            raise TypeError("vcpu_harvest must be a bool")
        self._engine.vcpu_harvest = value

    # -- irqchip and vCPUs ---------------------------------------------------------------------
    @property
    def has_irqchip(self):
        return self._irqchip

    def create_irqchip(self):
        """KVM_CREATE_IRQCHIP: PIC + IOAPIC (x86) and the default routing table.

        OSError(EEXIST) if it exists, OSError(EINVAL) once vCPUs exist, as KVM.
        """
        with self._lock:
            self._check_open()
            if self._irqchip:
                raise OSError(errno.EEXIST, "irqchip already created")
            if self._vcpus:
                raise OSError(errno.EINVAL, "irqchip must be created before vCPUs")
            self._irq = Irqchip(self.arch, self._engine, lambda: self._routing)
            self._irqchip = True
            self._install_routing(GsiRoutingTable.build(self.arch.default_routing_pairs(),
                                                        self.arch))

    def create_vcpu(self, vcpu_id, *, lapic_enabled=True):
        """KVM_CREATE_VCPU.  Returns a ``Vcpu``.

        ``lapic_enabled`` (default True) software-enables the LAPIC (SPIV bit 8) as a guest OS
        does at boot; False leaves KVM's reset state, in which fixed interrupts are dropped.
        OSError(EEXIST) for a duplicate id, OSError(EINVAL) for an id >= 4096 or too many vCPUs.
        """
        if not isinstance(vcpu_id, int) or isinstance(vcpu_id, bool):
            raise TypeError(f"vcpu_id must be an int, not {type(vcpu_id).__name__}")
        with self._lock:
            self._check_open()
            if not 0 <= vcpu_id < MAX_VCPU_ID:
                raise OSError(errno.EINVAL, f"vcpu id {vcpu_id} out of range 0..{MAX_VCPU_ID - 1}")
            if vcpu_id in self._vcpus:
                raise OSError(errno.EEXIST, f"vcpu {vcpu_id} exists")
            if len(self._vcpus) >= MAX_VCPUS:
                raise OSError(errno.EINVAL, f"at most {MAX_VCPUS} vCPUs")
            lapic = None
            if self._irqchip and self.arch.name == "x86":
                lapic = Lapic(vcpu_id)
                if lapic_enabled:
                    lapic.spiv = 0x1FF
                self._bus.add(lapic)
            vcpu = Vcpu(self, vcpu_id, lapic)
            self._vcpus[vcpu_id] = vcpu
            return vcpu

    @property
    def vcpus(self):
        return dict(self._vcpus)

    # -- routing -------------------------------------------------------------------------------
    @property
    def gsi_routing(self):
        """The routing table in force (an immutable ``GsiRoutingTable``)."""
        return self._routing

    def set_gsi_routing(self, entries):
        """KVM_SET_GSI_ROUTING: replace the whole table with ``entries`` ((gsi, entry) pairs).

        Validation is the arch's (``InvalidRouting``, a ValueError with ``.errno``); a rejected
        table leaves the old one in force.  Legacy irqfds are retargeted before this returns:
        an event written before the call goes to the old route, one written after to the new.
        O(table + legacy irqfds).
        """
        table = GsiRoutingTable.build(entries, self.arch)
        self.install_gsi_routing(table)

    def install_gsi_routing(self, table):
        """Install an already-validated ``GsiRoutingTable`` (see ``set_gsi_routing``)."""
        with self._lock:
            self._check_open()
            if not self._irqchip:
                raise OSError(errno.EINVAL, "KVM_SET_GSI_ROUTING needs an in-kernel irqchip")
            self._install_routing(table)

    def _install_routing(self, table):
        old = self._routing
        for r in self._index.legacy():           # KVM's irqfd_update() for every irqfd
            word = self._gsi_route_word(table, r.gsi)
            if word == r.route:
                continue
            self._settle_deferred(r, lambda: self._irq.inject_gsi(old, r))
            fd = r.fd if (self._by_fd.get(r.fd) is r and
                          self._engine.is_registered(r, r.fd)) else -1
            self._retarget(r, word, fd, lambda: self._irq.inject_gsi(old, r))
        self._routing = table

    def _gsi_route_word(self, table, gsi):
        entries = table.entries_for(gsi) if gsi < uapi.KVM_MAX_IRQ_ROUTES else ()
        if not entries:
            return NO_ROUTE_WORD
        if len(entries) == 1 and isinstance(entries[0], MsiEntry) and self.arch.name == "x86":
            e = entries[0]
            return x86_msi_route_word(e.address_lo, e.address_hi, e.data, self.arch.x2apic_format)
        return SLOW_ROUTE_WORD                  # irqchip pins, or several entries: the worker

    def _entry_route_word(self, entry):
        if isinstance(entry, MsiEntry) and self.arch.name == "x86":
            return x86_msi_route_word(entry.address_lo, entry.address_hi, entry.data,
                                      self.arch.x2apic_format)
        return SLOW_ROUTE_WORD

    # -- legacy irqfd (KVM_IRQFD) --------------------------------------------------------------
    def irqfd(self, eventfd, gsi, resamplefd=None):
        """KVM_IRQFD: deliver GSI ``gsi`` whenever ``eventfd`` is written.

        The GSI's route is looked up in the routing table (now and after every table change);
        a GSI without a route delivers nothing until one appears.  With ``resamplefd`` the line
        is level-triggered: asserted until the guest EOIs it, then lowered and ``resamplefd``
        signalled.  Errors (OSError, KVM's errno): EINVAL without an irqchip or for an fd that
        is not an eventfd, EBADF for a closed fd, EBUSY if the eventfd already feeds an irqfd
        (in any Vm; a dup()ed fd is the same eventfd).  O(log n).
        """
        _fd_arg(eventfd, "eventfd")
        if not isinstance(gsi, int) or isinstance(gsi, bool):
            raise TypeError(f"gsi must be an int, not {type(gsi).__name__}")
        if not 0 <= gsi <= 0xFFFFFFFF:
            raise ValueError(f"gsi {gsi} out of u32 range")
        with self._lock:
            self._check_open()
            self._check_irqfd_allowed(resamplefd)
            return self._assign(eventfd, resamplefd, gsi=gsi,
                                word=self._gsi_route_word(self._routing, gsi))

    def irqfd_deassign(self, eventfd, gsi):
        """KVM_IRQFD with DEASSIGN: detach the irqfd bound to (``eventfd``, ``gsi``).

        Returns True if one was detached; an unknown pair is not an error (as KVM).  After it
        returns, the eventfd delivers nothing.  OSError(EBADF/EINVAL) for a bad fd.  O(log n).
        """
        _fd_arg(eventfd, "eventfd")
        with self._lock:
            self._check_open()
            return self._find_and_detach(eventfd, lambda r: not r.direct and r.gsi == gsi)

    # -- direct irqfd (KVM_IRQFD_DIRECT) -------------------------------------------------------
    def irqfd_direct(self, eventfd, entry, resamplefd=None):
        """KVM_IRQFD_DIRECT: bind ``eventfd`` straight to a routing ``entry``; no GSI, no table.

        ``entry`` (``MsiEntry`` or ``IrqchipEntry``) is validated by the arch's routing rules
        (``InvalidRouting`` otherwise) and embedded in the irqfd: an MSI is delivered by the
        engine thread with no table lookup.  Not limited by the 4096-entry routing table.
        Same fd errors as ``irqfd``.  O(log n).
        """
        _fd_arg(eventfd, "eventfd")
        self._check_entry(entry)
        with self._lock:
            self._check_open()
            self._check_irqfd_allowed(resamplefd)
            return self._assign(eventfd, resamplefd, entry=entry,
                                word=self._entry_route_word(entry))

    def irqfd_direct_modify(self, eventfd, entry):
        """Retarget a direct irqfd to ``entry``, named by its eventfd alone.

        Events written before the call go to the old target, events written after it to the
        new one; none is lost.  OSError(ENOENT) if ``eventfd`` has no direct irqfd.
        O(log n) + one engine grace period.
        """
        _fd_arg(eventfd, "eventfd")
        self._check_entry(entry)
        with self._lock:
            self._check_open()
            r = self._find(eventfd, lambda r: r.direct, verify=True)
            if r is None:
                raise OSError(errno.ENOENT, f"eventfd {eventfd} has no direct irqfd")
            old = r.entry
            self._settle_deferred(r, lambda: self._irq.inject_entry(old, r))
            self._retarget(r, self._entry_route_word(entry), eventfd,
                           lambda: self._irq.inject_entry(old, r))
            r.entry = entry
            if r.resampler is not None and entry != old:   # the resampler follows the line
                keep = os.dup(r.resamplefd)
                try:
                    self._irq.drop_resampler(r)
                    self._irq.attach_resampler(r, keep)
                finally:
                    os.close(keep)

    def irqfd_direct_deassign(self, eventfd):
        """Detach the direct irqfd of ``eventfd``; True if there was one.  O(log n)."""
        _fd_arg(eventfd, "eventfd")
        with self._lock:
            self._check_open()
            return self._find_and_detach(eventfd, _is_direct)

    def irqfd_count(self):
        """Assigned irqfds (legacy and direct).  O(1)."""
        return len(self._index)

    # -- assign / detach (shared) --------------------------------------------------------------
    def _check_irqfd_allowed(self, resamplefd):
        if not self._irqchip:
            raise OSError(errno.EINVAL, "irqfds need an in-kernel irqchip")
        if self.arch.name != "x86":
            raise NotImplementedError(f"{self.arch.name}: routing is validated, but the "
                                      "delivery model is x86 only for now")
        if resamplefd is not None:
            _fd_arg(resamplefd, "resamplefd")

    def _check_entry(self, entry):
        if not isinstance(entry, (IrqchipEntry, MsiEntry)):
            raise TypeError(f"entry must be an IrqchipEntry or MsiEntry, not {type(entry).__name__}")
        self.arch.validate_entry(entry)

    def _find(self, fd, match, verify=False):
        """The irqfd whose eventfd ``fd`` refers to and that ``match``es, or None.

        Fast path: the record last assigned under this fd number, confirmed by epoll itself
        (only with ``verify``; a DEL in _detach confirms it too).  Otherwise the eventfd's
        identity from /proc (EBADF/EINVAL for a bad fd).  O(log n).
        """
        r = self._by_fd.get(fd)
        if r is not None and match(r) and (not verify or self._engine.is_registered(r, fd)):
            return r
        r = self._index.get(eventfd_key(fd))
        return r if r is not None and match(r) else None

    def _assign(self, eventfd, resamplefd, *, word, gsi=None, entry=None):
        key, count = eventfd_info(eventfd)
        if resamplefd is not None:
            eventfd_key(resamplefd)             # EBADF / EINVAL as KVM
        if self._index.get(key) is not None:
            raise OSError(errno.EBUSY, "eventfd is already assigned to an irqfd")
        CLAIMS.claim(key, self)
        r = new_record(eventfd, key, gsi=gsi, entry=entry, direct=entry is not None)
        self._engine.set_route(r, word)
        if count:
            r.assign_count = count
            r.mark_pending_at_assign()
        try:                                    # nothing half-registered on any failure
            if resamplefd is not None:
                self._irq.attach_resampler(r, resamplefd)
            self._engine.pin(r, eventfd)        # our own reference, as KVM's eventfd_ctx
            self._engine.register(r)
        except BaseException:
            self._engine.unpin(r)
            self._irq.drop_resampler(r, lower=False)
            CLAIMS.release(key, self)
            raise
        self._index.add(r)
        self._by_fd[eventfd] = r
        if count:                               # KVM injects a count found at assign at once
            self._inject_now(r)
        return r

    def _inject_now(self, r):
        """Deliver one event of r from the calling thread (control plane, under the lock)."""
        if (r.route >> 13) & 7 == ROUTE_MSI:
            self._engine.deliver(r.route)
        elif r.direct:
            self._irq.inject_entry(r.entry, r)
        else:
            self._irq.inject_gsi(self._routing, r)

    def _find_and_detach(self, fd, match):
        # KVM delivers inside write(), and flushes a pending inject on deassign: what was
        # written before this call is delivered (the count the detach/drain takes).
        r = self._by_fd.get(fd)
        if r is not None and match(r):
            taken = self._engine.detach(r, fd)  # -1: fd is not r's registration number
        else:
            taken = -1
        if taken < 0:
            r = self._index.get(eventfd_key(fd))
            if r is None or not match(r):
                return False
            self._unregister_elsewhere(r, fd)
            taken = self._drain(r, fd)
        if taken:
            self._inject_now(r)
        self._forget(r)
        return True

    def _forget(self, r):
        # Under the lock, open: see CLAIMS.release_own.
        self._engine.unpin(r)                   # r is dead: the engine reads it no more
        self._index.pop(r.key)
        if self._by_fd.get(r.fd) is r:
            del self._by_fd[r.fd]
        CLAIMS.release_own(r.key, self)
        if r.inject_pending:
            self._graveyard.add(r)              # the worker drops it when it pops it
        self._irq.drop_resampler(r)

    def _unregister_elsewhere(self, r, fd):
        # ``fd`` refers to r's eventfd under another number than r's registration.  epoll can
        # only remove that registration through its own number: if r.fd still names the
        # eventfd, use it; if the number is free, borrow it for a moment (F_DUPFD allocates
        # exactly it); otherwise it is unreachable and r stays as a dead tombstone (the
        # engine ignores its wakeups and never reads its fd) until close().
        if Engine.same_file(fd, r.fd) and self._engine.unregister(r, r.fd):
            return
        tmp = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, r.fd)
        try:
            if tmp == r.fd and self._engine.unregister(r, tmp):
                return
        finally:
            os.close(tmp)
        self._engine.kill(r)
        self._tombstones.append(r)

    def _retarget(self, r, word, fd, inject_old):
        """Switch r to route ``word`` so that no write is lost or misdelivered across it.

        1. synchronize(): a batch in flight finishes with the old route;
        2. drain the eventfd through ``fd`` (verified to be r's eventfd; -1: none) into the
           old target: writes completed before this call belong there;
        3. store the new route and synchronize(): whatever the engine consumes from now on
           was written after step 2 began, and goes to the new target.
        The engine loads a route before it consumes the counter, which is what makes 3 safe.
        O(1) + two grace periods.
        """
        engine = self._engine
        engine.synchronize()
        old = r.route
        if fd >= 0 and self._drain(r, fd):
            if (old >> 13) & 7 == ROUTE_MSI:
                engine.deliver(old)
            else:
                inject_old()
        engine.set_route(r, word)
        engine.synchronize()

    def _drain(self, r, fd):
        """Consume writes pending on r's eventfd; True if there is something to deliver.

        A count that was delivered at assign without consuming (as KVM does) is not
        delivered again, and is left in the counter as KVM leaves it, unless writes came on
        top of it.
        """
        return self._engine.drain(r, fd) > 0

    def _settle_deferred(self, r, inject_old):
        # An event the engine already handed to the worker belongs to the old target: inject it
        # now; the worker skips what is already handled (defer_count), so nothing runs twice.
        if r.inject_pending and r.defer_count != r.handled:
            r.handled = r.defer_count
            inject_old()

    # -- injection (slow path and KVM_IRQ_LINE / KVM_SIGNAL_MSI) -------------------------------
    def _run_deferred(self, records):
        # irqfd_inject for the records the engine could not deliver in its own thread.
        with self._lock:
            for r in records:
                r.clear_inject_pending()
                if r.dead:
                    self._graveyard.discard(r)
                    continue
                count = r.defer_count
                if count == r.handled:                 # a retarget injected it already
                    continue
                r.handled = count
                try:
                    if r.direct:
                        self._irq.inject_entry(r.entry, r)
                    else:
                        self._irq.inject_gsi(self._routing, r)
                except Exception as exc:          # reported, and the engine carries on
                    self._report_error(exc)

    def _report_error(self, exc):
        self._errors.append(exc)
        handler = self.on_error
        if handler is not None:
            try:
                handler(exc)
                return
            except Exception:
                pass
        print("kvmirqfast: error in deferred interrupt delivery:", file=sys.stderr)
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)

    @property
    def errors(self):
        """Exceptions raised in deferred delivery so far (also passed to ``on_error``)."""
        return list(self._errors)

    def _lapic_eoi(self, vector, level):
        with self._lock:
            if self._irq is not None:
                self._irq.eoi(vector, level)

    @property
    def _resamplers(self):
        return self._irq.resamplers if self._irq is not None else {}

    def signal_msi(self, address_lo, address_hi=0, data=0, devid=None):
        """KVM_SIGNAL_MSI: deliver one MSI now.  Returns how many LAPICs accepted it (0 if none).

        OSError(EINVAL) without an irqchip.  O(vCPUs).
        """
        entry = MsiEntry(address_lo, address_hi, data, devid)
        with self._lock:
            self._check_open()
            if not self._irqchip:
                raise OSError(errno.EINVAL, "KVM_SIGNAL_MSI needs an in-kernel irqchip")
            return max(0, self._irq.set_entry(entry, KVM_USERSPACE_IRQ_SOURCE_ID, 1))

    def irq_line(self, gsi, level, *, line_status=False):
        """KVM_IRQ_LINE: drive GSI ``gsi`` to ``level`` through its routes; returns KVM's status.

        Status: -1 no route (or masked), 0 coalesced, > 0 delivered.  OSError(ENXIO) without an
        irqchip.
        """
        if not isinstance(gsi, int) or isinstance(gsi, bool):
            raise TypeError(f"gsi must be an int, not {type(gsi).__name__}")
        with self._lock:
            self._check_open()
            if not self._irqchip:
                raise OSError(errno.ENXIO, "KVM_IRQ_LINE needs an in-kernel irqchip")
            return self._irq.set_irq(self._routing, gsi, KVM_USERSPACE_IRQ_SOURCE_ID, int(bool(level)),
                                 line_status)

    @property
    def ioapic(self):
        """The IOAPIC model (x86, after create_irqchip), e.g. to program redirection entries."""
        return self._irq.ioapic if self._irq is not None else None

    @property
    def pic(self):
        return self._irq.pic if self._irq is not None else None

    # -- statistics ------------------------------------------------------------------------------
    def stats(self):
        """Engine counters (events, delivered, deferred, batches, cpu_ns, ...) and sizes."""
        s = self._engine.stats()
        s["irqfds"] = len(self._index)
        s["io_uring"] = self._engine.uses_ring   # own eventfd references + batched reads
        s["deferred_errors"] = len(self._errors)
        return s

    # -- uAPI --------------------------------------------------------------------------------------
    def ioctl(self, request, arg=0, mutate_flag=True):
        """``fcntl.ioctl`` on this VM fd: same request numbers, byte layouts, returns and errnos."""
        from .ioctl import vm_ioctl
        return vm_ioctl(self, request, arg, mutate_flag)

    def __repr__(self):
        return (f"<Vm arch={self.arch.name} vcpus={len(self._vcpus)} irqfds={len(self._index)}"
                f"{' closed' if self._closed else ''}>")
