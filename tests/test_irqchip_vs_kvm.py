"""Differential tests: kvmirqfast's IOAPIC and PIC models against the real /dev/kvm.

Each test drives one real VM (in-kernel irqchip, vCPU 0 with its LAPIC software-enabled, APIC ID 0)
and one model pair (Ioapic + Pic, with a deliver() that plays that single LAPIC) through the same
sequence, and compares after every step: the KVM_IRQ_LINE_STATUS status, the vectors pending in
the LAPIC IRR, and the KVM_GET_IRQCHIP bytes of chips 0, 1 and 2.

For GSIs 0-15 KVM's default routing drives both the PIC (IRQ n) and IOAPIC pin n; the status is
combined as kvm_set_irq does: the sum of the non-negative per-chip results, -1 if there are none.

EOIs and guest IOAPIC writes come from a real guest: a few bytes of flat 32-bit code.  Its
interrupt handler writes the xAPIC EOI register and then does an OUT, so KVM_RUN returns right after
one EOI; a second routine writes one redirection entry through IOREGSEL/IOWIN (high dword first,
so the entry changes in one step, as set_redirection does) and OUTs.  The guest only ever
runs in tests that leave GSIs 0-15 alone or mask the PIC, because vCPU 0's LVT0 accepts the PIC's
ExtINT (KVM's LINT0 quirk) and a PIC INTA is not modelled.
"""

import ctypes
import fcntl
import mmap
import os
import signal
import struct
import time

import pytest

from kvmirqfast import uapi
from kvmirqfast.ioapic import NUM_PINS, STATE_SIZE as IOAPIC_STATE_SIZE, Ioapic
from kvmirqfast.pic import STATE_SIZE as PIC_STATE_SIZE, Pic
from realkvm import RealVm, requires_kvm

pytestmark = requires_kvm

USER, RESAMPLER = 0, 1
MASKED, LEVEL, REMOTE_IRR = 1 << 16, 1 << 15, 1 << 14


# --- a guest that EOIs ----------------------------------------------------------------------------
_MEMREGION = struct.Struct("<IIQQQ")
_KVM_SET_USER_MEMORY_REGION = uapi._IOW(uapi.KVMIO, 0x46, _MEMREGION.size)
_KVM_SET_REGS = uapi._IOW(uapi.KVMIO, 0x82, 144)
_KVM_GET_SREGS = uapi._IOR(uapi.KVMIO, 0x83, 312)
_KVM_SET_SREGS = uapi._IOW(uapi.KVMIO, 0x84, 312)
_SEGMENT = struct.Struct("<QIH10B")   # base, limit, selector, type, present, dpl, db, s, l, g, ...
_KVM_EXIT_IO = 2
_GDT, _IDT, _HANDLER, _MAIN, _PROGRAM, _PARAMS, _STACK = (0x500, 0x600, 0x1000, 0x2000, 0x2100,
                                                             0x3000, 0x8000)
_EOI_PORT, _PROGRAM_PORT = 0x10, 0x11
# handler: movl $0, 0xfee000b0 (xAPIC EOI); outb %al, $0x10; addl $12, %esp; sti; jmp .
_HANDLER_CODE = bytes.fromhex("c705b000e0fe00000000" "e610" "83c40c" "fb" "ebfe")
# main: sti; jmp .
_MAIN_CODE = bytes.fromhex("fb" "ebfe")
# program: for each of params[0..3] as (IOREGSEL, IOWIN, IOREGSEL, IOWIN): movl params[i], %eax;
# movl %eax, 0xfec00000 / 0xfec00010; then outb %al, $0x11; jmp .
_PROGRAM_CODE = bytes.fromhex(
    "a100300000a30000c0fe" "a104300000a31000c0fe" "a108300000a30000c0fe" "a10c300000a31000c0fe"
    "e611" "ebfe")


class Guest:
    """vCPU 0 running flat 32-bit code that EOIs interrupts or writes IOAPIC registers."""

    def __init__(self, vm, vcpu):
        self.vcpu = vcpu
        self.mem = mmap.mmap(-1, 0x10000)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        vm.ioctl(_KVM_SET_USER_MEMORY_REGION, _MEMREGION.pack(0, 0, 0, len(self.mem), addr))
        self.mem[_HANDLER:_HANDLER + len(_HANDLER_CODE)] = _HANDLER_CODE
        self.mem[_MAIN:_MAIN + len(_MAIN_CODE)] = _MAIN_CODE
        self.mem[_PROGRAM:_PROGRAM + len(_PROGRAM_CODE)] = _PROGRAM_CODE
        struct.pack_into("<3Q", self.mem, _GDT, 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)
        gate = (_HANDLER & 0xFFFF) | 0x08 << 16 | 0x8E00 << 32 | (_HANDLER >> 16) << 48
        for vector in range(256):
            struct.pack_into("<Q", self.mem, _IDT + 8 * vector, gate)
        sregs = bytearray(vcpu.ioctl(_KVM_GET_SREGS, bytes(312)))
        _SEGMENT.pack_into(sregs, 0, 0, 0xFFFFFFFF, 0x08, 11, 1, 0, 1, 1, 0, 1, 0, 0, 0)
        for seg in range(1, 6):                      # ds, es, fs, gs, ss
            _SEGMENT.pack_into(sregs, 24 * seg, 0, 0xFFFFFFFF, 0x10, 3, 1, 0, 1, 1, 0, 1, 0, 0, 0)
        struct.pack_into("<QH", sregs, 192, _GDT, 23)
        struct.pack_into("<QH", sregs, 208, _IDT, 256 * 8 - 1)
        cr0 = struct.unpack_from("<Q", sregs, 224)[0]
        struct.pack_into("<Q", sregs, 224, (cr0 | 1) & ~(1 << 31))
        vcpu.ioctl(_KVM_SET_SREGS, bytes(sregs))
        size = fcntl.ioctl(vm.kvm, uapi.KVM_GET_VCPU_MMAP_SIZE, 0)
        self.run = mmap.mmap(vcpu.fd, size)

    def take_one_interrupt(self):
        """Run until the guest has EOIed one interrupt; TimeoutError if none arrives."""
        self._run(_MAIN, _EOI_PORT)

    def write_redirection(self, pin, word):
        """The guest writes ``word`` into redirection entry ``pin`` (IOWIN, high dword first)."""
        struct.pack_into("<4I", self.mem, _PARAMS, 0x11 + 2 * pin, word >> 32, 0x10 + 2 * pin,
                         word & 0xFFFFFFFF)
        self._run(_PROGRAM, _PROGRAM_PORT)

    def _run(self, rip, port, timeout=2.0):
        regs = bytearray(144)                        # fresh stack, IF clear until main's sti
        struct.pack_into("<Q", regs, 6 * 8, _STACK)
        struct.pack_into("<QQ", regs, 16 * 8, rip, 2)
        self.vcpu.ioctl(_KVM_SET_REGS, bytes(regs))

        def expire(*_):
            raise TimeoutError("the guest took no interrupt")
        old = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            self.vcpu.ioctl(uapi.KVM_RUN, 0)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        reason = struct.unpack_from("<I", self.run, 8)[0]
        exit_port = struct.unpack_from("<H", self.run, 34)[0]
        assert (reason, exit_port) == (_KVM_EXIT_IO, port)

    def close(self):
        self.run.close()


# --- the model side's single LAPIC ----------------------------------------------------------------
class ModelLapic:
    """Plays vCPU 0's enabled LAPIC (APIC ID 0) for deliver(): IRR, TMR, and the guest's EOIs."""

    def __init__(self):
        self.irr = set()
        self.tmr = set()
        self.messages = []

    def deliver(self, dest_id, dest_logical, delivery_mode, level_trigger, vector):
        self.messages.append((dest_id, dest_logical, delivery_mode, level_trigger, vector))
        if dest_logical or dest_id not in (0, 0xFF) or delivery_mode != 0:
            return 0                                 # KVM's APIC map: no match counts 0, not -1
        self.irr.add(vector)
        (self.tmr.add if level_trigger else self.tmr.discard)(vector)
        return 1

    def take_one_interrupt(self, ioapic):
        vector = max(self.irr)
        self.irr.discard(vector)
        ioapic.eoi(vector, level_trigger=vector in self.tmr)


# --- the pair -------------------------------------------------------------------------------------
class Pair:
    def __init__(self):
        self.vm = RealVm(irqchip=True)
        self.vcpu = self.vm.create_vcpu(0)
        self.guest = None
        self.ioregsel_moved = False
        self.lapic = ModelLapic()
        self.ioapic = Ioapic(self.lapic.deliver)
        self.pic = Pic()

    def close(self):
        if self.guest:
            self.guest.close()
        self.vm.close()

    # chips
    def real_chip(self, chip):
        out = self.vm.ioctl(uapi.KVM_GET_IRQCHIP, uapi.IRQCHIP.pack(chip, 0, b""))
        return uapi.IRQCHIP.unpack(out)[2]

    def model_chip(self, chip):
        return self.pic.get_state(chip) if chip < 2 else self.ioapic.get_state()

    def set_chip(self, chip, state):
        """KVM_SET_IRQCHIP on the real VM and set_state on the model, same bytes."""
        self.vm.ioctl(uapi.KVM_SET_IRQCHIP, uapi.IRQCHIP.pack(chip, 0, bytes(state)))
        if chip < 2:
            self.pic.set_state(chip, state)
        else:
            self.ioapic.set_state(state)
        self.pic.update()                            # KVM re-evaluates the PIC after any chip

    def program(self, pin, vector, *, level=False, masked=False, dest=0):
        """Write one redirection entry through KVM_SET_IRQCHIP (read-modify-write of chip 2)."""
        state = bytearray(self.real_chip(2)[:IOAPIC_STATE_SIZE])
        word = vector | (LEVEL if level else 0) | (MASKED if masked else 0) | dest << 56
        struct.pack_into("<Q", state, 24 + 8 * pin, word)
        self.set_chip(2, state)

    def guest_program(self, pin, vector, *, level=False, masked=False, dest=0):
        """The guest writes the entry through MMIO; the model gets set_redirection."""
        word = vector | (LEVEL if level else 0) | (MASKED if masked else 0) | dest << 56
        self.real_guest().write_redirection(pin, word)
        self.ioregsel_moved = True                   # MMIO is not modelled: ioregsel stays put
        self.ioapic.set_redirection(pin, vector, dest_id=dest, level_trigger=level, masked=masked)
        self.check()

    def pic_fields(self, chip, **values):
        from kvmirqfast.pic import FIELDS
        state = bytearray(self.real_chip(chip)[:PIC_STATE_SIZE])
        for name, value in values.items():
            state[FIELDS.index(name)] = value
        self.set_chip(chip, state)

    # lines
    def line(self, gsi, level):
        """Assert/deassert on both; returns the (equal) status."""
        real = uapi.IRQ_LEVEL.unpack(
            self.vm.ioctl(uapi.KVM_IRQ_LINE_STATUS, uapi.pack_irq_level(gsi, level)))[0]
        results = []
        if gsi < 16:
            results.append(self.pic.set_irq(gsi, USER, level))
        if gsi < NUM_PINS:
            results.append(self.ioapic.set_irq(gsi, USER, level, line_status=True))
        accepted = [r for r in results if r >= 0]
        model = sum(accepted) if accepted else -1
        assert real == model, f"gsi {gsi} level {level}: KVM {real}, model {model} {results}"
        self.check()
        return real

    def real_guest(self):
        if self.guest is None:
            self.guest = Guest(self.vm, self.vcpu)
        return self.guest

    def take_one_interrupt(self):
        self.real_guest().take_one_interrupt()
        self.lapic.take_one_interrupt(self.ioapic)
        self.check()

    def check(self):
        assert sorted(self.vcpu.pending()) == sorted(self.lapic.irr)
        for chip, size in ((0, PIC_STATE_SIZE), (1, PIC_STATE_SIZE), (2, IOAPIC_STATE_SIZE)):
            real, model = bytearray(self.real_chip(chip)[:size]), bytearray(self.model_chip(chip))
            if chip == 2 and self.ioregsel_moved:
                real[8:12] = model[8:12] = bytes(4)
            assert real.hex() == model.hex(), f"chip {chip}"

    def remote_irr(self, pin):
        word = struct.unpack_from("<Q", self.real_chip(2), 24 + 8 * pin)[0]
        assert bool(word & REMOTE_IRR) == self.ioapic.redirection(pin).remote_irr
        return bool(word & REMOTE_IRR)


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


# --- initial state --------------------------------------------------------------------------------
def test_fresh_irqchip_state_matches(pair):
    pair.check()
    assert pair.real_chip(2)[IOAPIC_STATE_SIZE:] == bytes(512 - IOAPIC_STATE_SIZE)


# --- GSIs 16-23: IOAPIC only ----------------------------------------------------------------
def test_masked_pin(pair):
    assert [pair.line(16, lv) for lv in (1, 1, 0, 0, 1)] == [-1, 0, 1, 1, -1]
    pair.program(17, 0x44, level=True, masked=True)
    assert [pair.line(17, lv) for lv in (1, 1, 0)] == [-1, -1, 1]
    assert pair.lapic.messages == []


def test_edge_pin(pair):
    pair.program(16, 0x40)
    assert [pair.line(16, lv) for lv in (1, 1, 0, 1, 0)] == [1, 0, 1, 1, 1]
    assert pair.lapic.irr == {0x40}


def test_edge_pin_with_guest_eoi(pair):
    pair.program(16, 0x40)
    assert pair.line(16, 1) == 1
    pair.take_one_interrupt()
    assert pair.line(16, 1) == 0                     # still high: no new edge
    assert pair.line(16, 0) == 1
    assert pair.line(16, 1) == 1


def test_level_pin_remote_irr_and_eoi(pair):
    pair.program(18, 0x41, level=True)
    assert [pair.line(18, lv) for lv in (1, 1)] == [1, -1]
    assert pair.remote_irr(18)
    pair.take_one_interrupt()                        # line still high: re-delivered at once
    assert pair.remote_irr(18) and pair.lapic.irr == {0x41}
    assert pair.line(18, 0) == 1
    pair.take_one_interrupt()                        # line low: remote IRR cleared, nothing new
    assert not pair.remote_irr(18) and pair.lapic.irr == set()
    assert pair.line(18, 1) == 1


def test_eoi_touches_only_pins_with_that_vector(pair):
    pair.program(18, 0x41, level=True)
    pair.program(19, 0x42, level=True)
    assert pair.line(18, 1) == 1
    assert pair.line(18, 0) == 1                     # remote IRR stays set with the line low
    assert pair.line(19, 1) == 1
    pair.take_one_interrupt()                        # the guest takes 0x42 first (higher)
    assert pair.remote_irr(18) and pair.remote_irr(19)
    assert pair.lapic.irr == {0x41, 0x42}
    pair.take_one_interrupt()                        # 0x42 again: line 19 is still high
    pair.line(19, 0)
    pair.take_one_interrupt()
    pair.take_one_interrupt()                        # 0x41
    assert not pair.remote_irr(18) and not pair.remote_irr(19)
    assert pair.lapic.irr == set()


def test_no_destination_counts_zero(pair):
    pair.program(19, 0x42, dest=5)
    assert [pair.line(19, lv) for lv in (1, 0, 1)] == [0, 1, 0]
    pair.program(20, 0x43, dest=5, level=True)
    assert [pair.line(20, lv) for lv in (1, 1, 0)] == [0, 0, 1]
    assert not pair.remote_irr(20)


def test_set_irqchip_reinjects_pending_irr(pair):
    pair.program(21, 0x45, level=True, masked=True)
    pair.program(22, 0x46, masked=True)
    assert pair.line(21, 1) == -1
    assert pair.line(22, 1) == -1
    pair.program(21, 0x45, level=True)               # unmask: the held level is delivered
    pair.program(22, 0x46)                           # unmask via SET_IRQCHIP: pending edge too
    assert pair.lapic.irr == {0x45, 0x46}
    assert pair.line(22, 1) == 0


def test_set_irqchip_copies_raw_fields(pair):
    state = bytearray(pair.real_chip(2)[:IOAPIC_STATE_SIZE])
    struct.pack_into("<QIII", state, 0, 0xFEC01000, 0x12, 0xFF, 0)
    struct.pack_into("<I", state, 20, 0xDEAD)        # pad
    struct.pack_into("<Q", state, 24 + 8 * 23, 0xFF00_0000_0001_3048)
    pair.set_chip(2, state)
    pair.check()


def test_set_redirection_equals_set_irqchip_word(pair):
    pair.program(23, 0x47, level=True, dest=0)
    model = Ioapic(lambda *a: 1)
    model.set_redirection(23, 0x47, level_trigger=True)
    assert model.get_state() == pair.ioapic.get_state()


def test_guest_write_unmasking_level_pin_with_line_high_delivers(pair):
    pair.guest_program(20, 0x49, level=True, masked=True)
    assert pair.line(20, 1) == -1
    pair.guest_program(20, 0x49, level=True)
    assert pair.lapic.irr == {0x49} and pair.remote_irr(20)


def test_guest_write_unmasking_edge_pin_with_line_high_does_not_deliver(pair):
    pair.guest_program(20, 0x4A, masked=True)
    assert pair.line(20, 1) == -1
    pair.guest_program(20, 0x4A)
    assert pair.lapic.irr == set()
    assert pair.line(20, 1) == 0                     # the edge is lost until the line drops


def test_guest_write_keeps_remote_irr_unless_edge(pair):
    pair.guest_program(21, 0x4B, level=True)
    assert pair.line(21, 1) == 1
    pair.guest_program(21, 0x4C, level=True, masked=True)   # vector change keeps remote IRR
    assert pair.remote_irr(21)
    pair.guest_program(21, 0x4C, masked=True)                # edge-triggered clears it
    assert not pair.remote_irr(21)


# --- ack notifiers vs the irqfd resampler ---------------------------------------------------------
def _wait_for(predicate, timeout=1.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


@pytest.mark.parametrize("userspace_also_high", [False, True])
def test_resampler_lowers_line_before_redelivery_check(pair, userspace_also_high):
    pin = 19
    pair.program(pin, 0x48, level=True)
    if userspace_also_high:
        pair.line(pin, 1)
    efd, rfd = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        pair.vm.ioctl(uapi.KVM_IRQFD, uapi.pack_irqfd(efd, pin, uapi.KVM_IRQFD_FLAG_RESAMPLE, rfd))
        resamples = []

        def resample():                              # what the lead's resampler will do
            pair.ioapic.set_irq(pin, RESAMPLER, 0)
            resamples.append(pin)

        pair.ioapic.add_ack_notifier(pin, resample)
        os.eventfd_write(efd, 1)                     # KVM injects from a workqueue
        _wait_for(lambda: 0x48 in pair.vcpu.pending())
        pair.ioapic.set_irq(pin, RESAMPLER, 1)
        pair.check()
        pair.take_one_interrupt()
        assert os.eventfd_read(rfd) == 1 and resamples == [pin]
        # Source 0 still holds the line in the second case, so the EOI re-delivers.
        assert pair.remote_irr(pin) == userspace_also_high
        assert pair.lapic.irr == ({0x48} if userspace_also_high else set())
        pair.vm.ioctl(uapi.KVM_IRQFD, uapi.pack_irqfd(efd, pin, uapi.KVM_IRQFD_FLAG_DEASSIGN))
    finally:
        os.close(efd)
        os.close(rfd)


# --- GSIs 0-15: PIC and IOAPIC both ---------------------------------------------------------------
def test_isa_gsi_default_both_masked_in_ioapic(pair):
    assert [pair.line(3, lv) for lv in (1, 1, 0, 0, 1)] == [1, 1, 2, 2, 0]


def test_isa_gsi_ioapic_edge_unmasked(pair):
    pair.program(3, 0x50)
    assert [pair.line(3, lv) for lv in (1, 1, 0, 1)] == [2, 1, 2, 1]


def test_isa_gsi_pic_imr_masked(pair):
    pair.pic_fields(0, imr=0x20)
    assert [pair.line(5, lv) for lv in (1, 1, 0, 0)] == [-1, 0, 1, 1]


def test_isa_gsi_slave_cascade(pair):
    assert [pair.line(10, lv) for lv in (1, 1, 0, 1)] == [1, 1, 2, 0]


def test_isa_gsi_slave_level_elcr(pair):
    pair.pic_fields(1, elcr=0x08)
    pair.program(11, 0x51, level=True)
    # PIC 1 + IOAPIC 1; PIC 0 + IOAPIC -1 (remote IRR); 1 + 1; PIC 1 + IOAPIC -1
    assert [pair.line(11, lv) for lv in (1, 1, 0, 1)] == [2, 0, 2, 1]


def test_isa_gsi_every_pin_default(pair):
    for gsi in range(16):
        pair.line(gsi, 1)
    for gsi in range(16):
        pair.line(gsi, 0)


def test_pic_set_irqchip_verbatim_and_cascade(pair):
    pair.pic_fields(1, irr=0x10, elcr=0xFF, elcr_mask=0xFF)
    pair.pic_fields(0, elcr=0xFF)
    pair.pic_fields(0, elcr=0, irr=0)                # master IRR 2 comes back from the slave


def test_rtc_gsi8_coalesces_until_guest_eoi(pair):
    pair.pic_fields(0, imr=0xFF)                     # keep the PIC's ExtINT away from the guest
    pair.pic_fields(1, imr=0xFF)
    pair.program(8, 0x60)
    assert [pair.line(8, lv) for lv in (1, 0, 1, 0)] == [1, 1, 0, 1]
    pair.take_one_interrupt()
    assert pair.line(8, 1) == 1


# --- errnos the ioctl layer must reproduce -------------------------------------------------------
def _errno(vm, request, arg):
    try:
        vm.ioctl(request, arg)
    except OSError as e:
        return e.errno
    return 0


def test_errnos():
    with RealVm(irqchip=False) as vm:
        assert _errno(vm, uapi.KVM_IRQ_LINE, uapi.pack_irq_level(0, 1)) == 6         # ENXIO
        assert _errno(vm, uapi.KVM_IRQ_LINE_STATUS, uapi.pack_irq_level(16, 1)) == 6
        assert _errno(vm, uapi.KVM_GET_IRQCHIP, uapi.IRQCHIP.pack(0, 0, b"")) == 6
    with RealVm(irqchip=True) as vm:
        for chip in (3, 255):
            assert _errno(vm, uapi.KVM_GET_IRQCHIP, uapi.IRQCHIP.pack(chip, 0, b"")) == 22  # EINVAL
            assert _errno(vm, uapi.KVM_SET_IRQCHIP, uapi.IRQCHIP.pack(chip, 0, b"")) == 22
        for gsi in (24, 4095, 4096, 0x7FFFFFFF):     # no route, or beyond the table: status -1
            out = vm.ioctl(uapi.KVM_IRQ_LINE_STATUS, uapi.pack_irq_level(gsi, 1))
            assert uapi.IRQ_LEVEL.unpack(out)[0] == -1
            assert _errno(vm, uapi.KVM_IRQ_LINE, uapi.pack_irq_level(gsi, 1)) == 0
