"""The tiny guest that takes interrupts for the real-``/dev/kvm`` backend, and its KVM_RUN loop.

The guest is 16 KiB of memory at ``GUEST_BASE`` (a private memslot, far from where a VMM puts
RAM), run in flat 32-bit protected mode with a host-built GDT and IDT:

- ``IDLE``: ``sti; hlt; jmp IDLE``.  A vCPU blocked in ``hlt`` with an in-kernel LAPIC stays in
  KVM_RUN until an interrupt is deliverable (or a signal kicks it out).
- one stub per vector v: ``mov $v, %al; out %al, $PORT_INTR; hlt``.  The interrupt gate has
  cleared IF, so the vCPU exits to the host with the vector in the I/O data and takes nothing
  else.  The guest never returns from it: this machine's instruction emulator refuses a
  protected-mode ``iret``, so the host resets RIP/RSP/RFLAGS before the next run instead.
- ``EOI``: ``movl $0, 0xfee000b0; out %al, $PORT_EOI; hlt`` -- the guest writes the xAPIC EOI
  register, through KVM's LAPIC MMIO emulation: KVM's EOI path runs (IOAPIC broadcast, remote
  IRR, ack notifiers, irqfd resamplers), nothing is edited from the host.

:class:`GuestCpu` runs one vCPU: :meth:`GuestCpu.run_until` sets RIP/RSP/RFLAGS (through the
``kvm_run`` sync-regs area when KVM offers it, else ``KVM_SET_REGS``) and loops on KVM_RUN until
the guest reports on the wanted port, a deadline passes, or the vCPU is stopped.  Waits are bounded
with a per-thread POSIX timer that sends ``SIGURG`` to the running thread; ``SIGURG`` is blocked
in that thread and unblocked only inside KVM_RUN (``KVM_SET_SIGNAL_MASK``), so the signal either
interrupts KVM_RUN or stays pending until it is consumed -- never runs a handler, never lost.
Other threads that need the vCPU fd (``KVM_GET_LAPIC`` while a wait is blocked in ``hlt``) kick the
runner with the same signal and take the fd in between two KVM_RUNs (:meth:`GuestCpu.ioctl`).
"""

import ctypes
import ctypes.util
import fcntl
import mmap
import os
import signal
import struct
import threading
import time

from . import uapi

# -- uAPI this module needs beyond kvmirqfast.uapi ---------------------------------------------
MEMORY_REGION = struct.Struct("<IIQQQ")        # slot, flags, guest_phys_addr, size, userspace_addr
KVM_SET_USER_MEMORY_REGION = uapi._IOW(uapi.KVMIO, 0x46, MEMORY_REGION.size)
REGS_SIZE = 144                                # struct kvm_regs: 18 u64
SREGS_SIZE = 312                               # struct kvm_sregs
KVM_GET_REGS = uapi._IOR(uapi.KVMIO, 0x81, REGS_SIZE)
KVM_SET_REGS = uapi._IOW(uapi.KVMIO, 0x82, REGS_SIZE)
KVM_GET_SREGS = uapi._IOR(uapi.KVMIO, 0x83, SREGS_SIZE)
KVM_SET_SREGS = uapi._IOW(uapi.KVMIO, 0x84, SREGS_SIZE)
KVM_SET_SIGNAL_MASK = uapi._IOW(uapi.KVMIO, 0x8B, 4)   # kvm_signal_mask { u32 len; u8 set[]; }
KVM_CAP_SYNC_REGS = 74
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_HALT_POLL = 182
KVM_SYNC_X86_REGS = 1 << 0
# struct kvm_run offsets (x86-64)
RUN_IMMEDIATE_EXIT = 1
RUN_EXIT_REASON = 8
RUN_EXIT_UNION = 32                            # io: direction u8, size u8, port u16, count u32,
RUN_IO = struct.Struct("<BBHIQ")               #     data_offset u64
RUN_INTERNAL = struct.Struct("<II")            # internal: suberror, ndata (then u64 data[16])
RUN_KVM_VALID_REGS = 288
RUN_KVM_DIRTY_REGS = 296
RUN_SYNC_REGS = 304                            # struct kvm_sync_regs: kvm_regs first
REG_RSP, REG_RIP, REG_RFLAGS = 6 * 8, 16 * 8, 17 * 8
SEGMENT = struct.Struct("<QIH10B")             # kvm_segment: base, limit, selector, type, present,
#                                                dpl, db, s, l, g, avl, unusable, padding
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
EXIT_NAMES = {0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT",
              6: "MMIO", 7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR",
              17: "INTERNAL_ERROR", 24: "SYSTEM_EVENT"}

# -- the guest image ---------------------------------------------------------------------------
GUEST_BASE = 0xFFFF0000          # guest-physical; flat segments make it the linear address too
GUEST_SIZE = 0x4000
GDT = 0x0000
IDT = 0x0800
STUBS = 0x1000                   # 256 x 8 bytes
STUB_SIZE = 8
IDLE = 0x1800
EOI = 0x1810
STACKS = 0x2000                  # 256 stacks of 32 bytes; an interrupt pushes 12 (16 with code)
STACK_SIZE = 32
MAX_STACKS = (GUEST_SIZE - STACKS) // STACK_SIZE
PORT_INTR = 0xE0
PORT_EOI = 0xE1
APIC_EOI_ADDRESS = 0xFEE000B0
RFLAGS_RESET = 0x2               # IF clear: the code sets it (sti) where it wants interrupts
CODE_SELECTOR, DATA_SELECTOR = 0x08, 0x10
LAPIC_ENABLE_SPIV = 0x1FF        # SPIV: software enable + spurious vector 0xff


def _stub(vector):
    # mov $vector, %al ; out %al, $PORT_INTR ; hlt ; jmp .-1 ; nop
    return bytes([0xB0, vector, 0xE6, PORT_INTR, 0xF4, 0xEB, 0xFD, 0x90])


_IDLE_CODE = bytes.fromhex("fb" "f4" "ebfc")                           # sti; hlt; jmp IDLE
_EOI_CODE = (b"\xc7\x05" + struct.pack("<II", APIC_EOI_ADDRESS, 0)     # movl $0, (EOI)
             + bytes([0xE6, PORT_EOI, 0xF4, 0xEB, 0xFD]))              # out; hlt; jmp .-1


class GuestImage:
    """The guest's memory: GDT, IDT, stubs, code and stacks.  One per VM, shared by its vCPUs."""

    def __init__(self):
        self.mem = mmap.mmap(-1, GUEST_SIZE)
        m = self.mem
        struct.pack_into("<3Q", m, GDT, 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)
        for v in range(256):
            stub = STUBS + STUB_SIZE * v
            m[stub:stub + STUB_SIZE] = _stub(v)
            addr = GUEST_BASE + stub
            gate = ((addr & 0xFFFF) | CODE_SELECTOR << 16 | 0x8E00 << 32   # present, DPL0, int gate
                    | (addr >> 16) << 48)
            struct.pack_into("<Q", m, IDT + 8 * v, gate)
        m[IDLE:IDLE + len(_IDLE_CODE)] = _IDLE_CODE
        m[EOI:EOI + len(_EOI_CODE)] = _EOI_CODE
        self.slot = None

    @property
    def address(self):
        """Host virtual address of the memory."""
        c = ctypes.c_char.from_buffer(self.mem)
        try:
            return ctypes.addressof(c)
        finally:
            del c

    def install(self, vm_fd, slot):
        """KVM_SET_USER_MEMORY_REGION: map the image at GUEST_BASE in memslot ``slot``."""
        fcntl.ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION,
                    MEMORY_REGION.pack(slot, 0, GUEST_BASE, GUEST_SIZE, self.address))
        self.slot = slot

    def setup_sregs(self, sregs):
        """Flat 32-bit protected mode, no paging, our GDT and IDT, in a kvm_sregs buffer."""
        SEGMENT.pack_into(sregs, 0, 0, 0xFFFFFFFF, CODE_SELECTOR, 11, 1, 0, 1, 1, 0, 1, 0, 0, 0)
        for seg in range(1, 6):                              # ds, es, fs, gs, ss
            SEGMENT.pack_into(sregs, 24 * seg, 0, 0xFFFFFFFF, DATA_SELECTOR, 3, 1, 0, 1, 1, 0, 1,
                              0, 0, 0)
        struct.pack_into("<QH", sregs, 192, GUEST_BASE + GDT, 23)
        struct.pack_into("<QH", sregs, 208, GUEST_BASE + IDT, 256 * 8 - 1)
        cr0 = struct.unpack_from("<Q", sregs, 224)[0]
        struct.pack_into("<Q", sregs, 224, (cr0 | 1) & ~(1 << 31))
        return sregs

    @staticmethod
    def stack_top(index):
        return GUEST_BASE + STACKS + STACK_SIZE * (index % MAX_STACKS + 1)

    def close(self):
        self.mem.close()


# -- per-thread timers (SIGEV_THREAD_ID) ---------------------------------------------------------
KICK_SIGNAL = signal.SIGURG     # default action: ignore; we only ever have it blocked or pending
_CLOCK_MONOTONIC = 1
_SIGEV_THREAD_ID = 4


class _Sigevent(ctypes.Structure):
    _fields_ = [("value", ctypes.c_void_p), ("signo", ctypes.c_int), ("notify", ctypes.c_int),
                ("tid", ctypes.c_int), ("_pad", ctypes.c_int * 11)]


class _Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("interval", _Timespec), ("value", _Timespec)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_timer_create = _libc.timer_create
_timer_create.argtypes = [ctypes.c_int, ctypes.POINTER(_Sigevent), ctypes.POINTER(ctypes.c_void_p)]
_timer_settime = _libc.timer_settime
_timer_settime.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_Itimerspec),
                           ctypes.c_void_p]
_timer_delete = _libc.timer_delete
_timer_delete.argtypes = [ctypes.c_void_p]


class ThreadTimer:
    """A one-shot POSIX timer that sends KICK_SIGNAL to the calling thread (and only to it)."""

    def __init__(self):
        ev = _Sigevent()
        ev.signo = KICK_SIGNAL
        ev.notify = _SIGEV_THREAD_ID
        ev.tid = threading.get_native_id()
        self._id = ctypes.c_void_p()
        if _timer_create(_CLOCK_MONOTONIC, ctypes.byref(ev), ctypes.byref(self._id)) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"timer_create: {os.strerror(e)}")

    def arm(self, seconds):
        seconds = max(seconds, 1e-6)
        spec = _Itimerspec()
        spec.value.sec = int(seconds)
        spec.value.nsec = int((seconds - int(seconds)) * 1e9)
        _timer_settime(self._id, 0, ctypes.byref(spec), None)

    def close(self):
        if self._id is not None:
            _timer_delete(self._id)
            self._id = None


def drain_kick():
    """Consume a pending KICK_SIGNAL of this thread (it is blocked here); True if there was one."""
    got = False
    while signal.sigtimedwait([KICK_SIGNAL], 0) is not None:
        got = True
    return got


class GuestError(RuntimeError):
    """The guest did something the protocol does not expect (exception, emulation failure)."""


class GuestCpu:
    """One vCPU running the tiny guest.  Thread-safe; one KVM_RUN at a time.

    ``run_until(start, port, deadline)`` runs from ``start`` until the guest OUTs to ``port``;
    every vector report on the way (``PORT_INTR``) is passed to ``on_vector``.  ``ioctl`` runs any
    other vCPU ioctl, kicking a blocked runner out of KVM_RUN for the moment it needs the fd.
    """

    def __init__(self, kvm_fd, vcpu_fd, image, stack_index, on_vector):
        self.fd = vcpu_fd
        self.image = image
        self.stack = image.stack_top(stack_index)
        self.on_vector = on_vector
        size = fcntl.ioctl(kvm_fd, uapi.KVM_GET_VCPU_MMAP_SIZE, 0)
        self.run = mmap.mmap(vcpu_fd, size)
        self.sync_regs = bool(fcntl.ioctl(kvm_fd, uapi.KVM_CHECK_EXTENSION, KVM_CAP_SYNC_REGS)
                              & KVM_SYNC_X86_REGS)
        self._fd_lock = threading.Lock()       # held by whoever uses the vCPU fd
        self._state = threading.Condition(threading.Lock())
        self._runner = None                    # ident of the thread inside KVM_RUN
        self._waiters = 0                      # threads waiting for the fd
        self.stopped = False
        self._maybe_halted = False
        self.runs = 0
        sregs = bytearray(fcntl.ioctl(vcpu_fd, KVM_GET_SREGS, bytes(SREGS_SIZE)))
        fcntl.ioctl(vcpu_fd, KVM_SET_SREGS, bytes(image.setup_sregs(sregs)))
        # Inside KVM_RUN no signal is blocked: the kick (blocked elsewhere in the runner) lands.
        fcntl.ioctl(vcpu_fd, KVM_SET_SIGNAL_MASK, struct.pack("<IQ", 8, 0))

    # -- fd sharing ---------------------------------------------------------------------------
    def ioctl(self, request, arg=0, mutate_flag=True):
        """``fcntl.ioctl`` on the vCPU fd, taking it from a runner blocked in the guest if need be.
        """
        if self._fd_lock.acquire(blocking=False):
            try:
                return fcntl.ioctl(self.fd, request, arg, mutate_flag)
            finally:
                self._fd_lock.release()
        with self._state:
            self._waiters += 1
            if self._runner is not None:
                signal.pthread_kill(self._runner, KICK_SIGNAL)
        try:
            self._fd_lock.acquire()
        finally:
            with self._state:
                self._waiters -= 1
                self._state.notify_all()
        try:
            return fcntl.ioctl(self.fd, request, arg, mutate_flag)
        finally:
            self._fd_lock.release()

    def stop(self):
        """Make every current and future run return at once (the VM is closing)."""
        self.stopped = True
        try:
            self.run[RUN_IMMEDIATE_EXIT] = 1
        except ValueError:                     # already unmapped
            pass
        with self._state:
            if self._runner is not None:
                signal.pthread_kill(self._runner, KICK_SIGNAL)

    def close(self, timeout=5.0):
        """Stop, wait for the runner to leave, unmap the run area.  The caller closes the fd."""
        self.stop()
        if self._fd_lock.acquire(timeout=timeout):
            self.run.close()
            self._fd_lock.release()

    # -- running ------------------------------------------------------------------------------
    def _set_start(self, offset):
        rip = GUEST_BASE + offset
        if self.sync_regs:
            r = self.run
            base = RUN_SYNC_REGS
            r[base:base + REGS_SIZE] = bytes(REGS_SIZE)
            struct.pack_into("<Q", r, base + REG_RSP, self.stack)
            struct.pack_into("<QQ", r, base + REG_RIP, rip, RFLAGS_RESET)
            struct.pack_into("<QQ", r, RUN_KVM_VALID_REGS, 0, KVM_SYNC_X86_REGS)
        else:
            regs = bytearray(REGS_SIZE)
            struct.pack_into("<Q", regs, REG_RSP, self.stack)
            struct.pack_into("<QQ", regs, REG_RIP, rip, RFLAGS_RESET)
            fcntl.ioctl(self.fd, KVM_SET_REGS, bytes(regs))

    def run_until(self, start, port, deadline=None, *, stop_on_vector=False):
        """Run the guest from ``start`` (an offset in the image) until it OUTs to ``port``.

        True then, False on timeout.
        ``deadline`` is a ``time.monotonic()`` value or None (no limit).  A vector report on the
        way goes to ``on_vector``; with ``stop_on_vector`` it also ends the run (True).  Returns
        False at once once the vCPU is stopped.  GuestError for an unexpected exit.
        """
        if self.stopped:
            return False
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [KICK_SIGNAL])
        timer = None
        try:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    left = 0.0
                timer = ThreadTimer()
                timer.arm(left)
            return self._run_loop(start, port, deadline, stop_on_vector)
        finally:
            if timer is not None:
                timer.close()
            drain_kick()
            if KICK_SIGNAL not in old_mask:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _enter(self):
        """Take the fd for a run; False if the vCPU was stopped meanwhile."""
        while True:
            self._fd_lock.acquire()
            with self._state:
                if self.stopped:
                    self._fd_lock.release()
                    return False
                if not self._waiters:
                    self._runner = threading.get_ident()
                    return True
            self._fd_lock.release()            # let the waiting ioctl() in first
            with self._state:
                self._state.wait_for(lambda: not self._waiters or self.stopped, timeout=1.0)

    def _leave(self):
        with self._state:
            self._runner = None
        self._fd_lock.release()

    def _run_loop(self, start, port, deadline, stop_on_vector):
        rip = start
        while True:
            if not self._enter():
                return False
            try:
                if rip is not None:
                    if self._maybe_halted:
                        # Interrupted in hlt, KVM keeps the vCPU HALTED; with IF clear at the
                        # new start it would never wake up.
                        fcntl.ioctl(self.fd, uapi.KVM_SET_MP_STATE,
                                    uapi.MP_STATE.pack(uapi.KVM_MP_STATE_RUNNABLE))
                        self._maybe_halted = False
                    self._set_start(rip)
                    rip = None
                interrupted = False
                try:
                    self.runs += 1
                    fcntl.ioctl(self.fd, uapi.KVM_RUN, 0)
                except InterruptedError:
                    interrupted = self._maybe_halted = True
                if not interrupted:
                    reason = struct.unpack_from("<I", self.run, RUN_EXIT_REASON)[0]
                    if reason != KVM_EXIT_IO:
                        raise self._unexpected(reason)
                    _dir, size, exit_port, count, offset = RUN_IO.unpack_from(self.run,
                                                                              RUN_EXIT_UNION)
                    value = self.run[offset]
            finally:
                self._leave()
            if interrupted:
                drain_kick()
                if self.stopped:
                    return False
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                continue                        # a kick for another ioctl, or a stale signal
            if exit_port == PORT_INTR:
                if value < 16:
                    raise GuestError(f"guest exception {value} (vector below 16 is not an "
                                     "interrupt)")
                self.on_vector(value)
                if port == PORT_INTR or stop_on_vector:
                    return True
                rip = start                     # an interrupt taken on the way: start again
                continue
            if exit_port == port:
                return True
            raise GuestError(f"guest wrote to unexpected port {exit_port:#x}")

    def _unexpected(self, reason):
        name = EXIT_NAMES.get(reason, str(reason))
        detail = ""
        if reason == KVM_EXIT_INTERNAL_ERROR:
            sub, nd = RUN_INTERNAL.unpack_from(self.run, RUN_EXIT_UNION)
            data = struct.unpack_from(f"<{min(nd, 16)}Q", self.run, RUN_EXIT_UNION + 8)
            detail = f" suberror {sub} data {[hex(d) for d in data]}"
        elif reason == KVM_EXIT_MMIO:
            detail = f" at {struct.unpack_from('<Q', self.run, RUN_EXIT_UNION)[0]:#x}"
        try:
            regs = fcntl.ioctl(self.fd, KVM_GET_REGS, bytes(REGS_SIZE))
            detail += f" rip={struct.unpack_from('<Q', regs, REG_RIP)[0]:#x}"
        except OSError:
            pass
        return GuestError(f"unexpected KVM exit {name}{detail}")
