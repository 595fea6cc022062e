"""Model tests for kvmirqfast.ioapic.Ioapic (KVM's in-kernel IOAPIC).

Expected values are the ones a real 6.18 /dev/kvm gives for the same sequence (see
test_irqchip_vs_kvm.py for the differential versions).
"""

import struct

import pytest

from kvmirqfast.ioapic import (DEFAULT_BASE_ADDRESS, NUM_PINS, STATE, STATE_SIZE,
                               SUCCESSIVE_IRQ_MAX_COUNT, Ioapic)

USER, RESAMPLER = 0, 1


class Lapics:
    """A deliver() stand-in: records messages; returns ``result`` (1 = one LAPIC accepted)."""

    def __init__(self, result=1):
        self.result = result
        self.calls = []

    def __call__(self, dest_id, dest_logical, delivery_mode, level_trigger, vector):
        self.calls.append((dest_id, dest_logical, delivery_mode, level_trigger, vector))
        return self.result

    @property
    def vectors(self):
        return [c[-1] for c in self.calls]


@pytest.fixture
def lapics():
    return Lapics()


@pytest.fixture
def ioapic(lapics):
    return Ioapic(lapics)


def irr_of(ioapic):
    return STATE.unpack(ioapic.get_state())[3]


# --- initial state ------------------------------------------------------------------------------
def test_fresh_state_matches_kvm_create_irqchip(ioapic):
    base, ioregsel, id_, irr, pad, *redir = STATE.unpack(ioapic.get_state())
    assert (base, ioregsel, id_, irr, pad) == (DEFAULT_BASE_ADDRESS, 0, 0, 0, 0)
    assert redir == [1 << 16] * NUM_PINS        # every pin masked, everything else zero
    assert len(ioapic.get_state()) == STATE_SIZE == 216


# --- edge-triggered pins ------------------------------------------------------------------------
def test_edge_pin_delivers_once_per_rising_edge(ioapic, lapics):
    ioapic.set_redirection(16, 0x40, dest_id=3, delivery_mode=1, dest_logical=True)
    assert ioapic.set_irq(16, USER, 1) == 1
    assert ioapic.set_irq(16, USER, 1) == 0          # held high: coalesced
    assert ioapic.set_irq(16, USER, 0) == 1
    assert ioapic.set_irq(16, USER, 1) == 1
    assert lapics.calls == [(3, True, 1, False, 0x40)] * 2


def test_edge_pin_delivered_irr_hidden_until_reasserted(ioapic):
    ioapic.set_redirection(16, 0x40)
    ioapic.set_irq(16, USER, 1)
    assert irr_of(ioapic) == 0                  # delivered edge: not reported
    ioapic.set_irq(16, USER, 1)                 # a coalesced assertion clears "delivered"
    assert irr_of(ioapic) == 1 << 16
    ioapic.set_irq(16, USER, 0)
    assert irr_of(ioapic) == 0


def test_edge_pin_returns_deliver_result(lapics, ioapic):
    ioapic.set_redirection(17, 0x41)
    lapics.result = 0                           # destination exists but did not accept
    assert ioapic.set_irq(17, USER, 1) == 0
    ioapic.set_irq(17, USER, 0)
    lapics.result = 2
    assert ioapic.set_irq(17, USER, 1) == 2


# --- level-triggered pins -----------------------------------------------------------------------
def test_level_pin_blocked_by_remote_irr_until_eoi(ioapic, lapics):
    ioapic.set_redirection(18, 0x50, level_trigger=True)
    assert ioapic.set_irq(18, USER, 1) == 1
    assert ioapic.redirection(18).remote_irr
    assert ioapic.set_irq(18, USER, 1) == -1         # remote IRR set: -1, not 0
    assert ioapic.set_irq(18, USER, 0) == 1
    assert ioapic.set_irq(18, USER, 1) == -1
    assert lapics.vectors == [0x50]
    ioapic.eoi(0x50)                                  # line still high: delivered again
    assert lapics.vectors == [0x50, 0x50]
    assert ioapic.redirection(18).remote_irr


def test_level_pin_eoi_with_line_low_does_not_redeliver(ioapic, lapics):
    ioapic.set_redirection(18, 0x50, level_trigger=True)
    ioapic.set_irq(18, USER, 1)
    ioapic.set_irq(18, USER, 0)
    ioapic.eoi(0x50)
    assert lapics.vectors == [0x50]
    assert not ioapic.redirection(18).remote_irr
    assert ioapic.set_irq(18, USER, 1) == 1


def test_level_pin_not_accepted_leaves_remote_irr_clear(lapics, ioapic):
    ioapic.set_redirection(18, 0x50, level_trigger=True)
    lapics.result = 0
    assert ioapic.set_irq(18, USER, 1) == 0
    assert not ioapic.redirection(18).remote_irr
    assert ioapic.set_irq(18, USER, 1) == 0          # serviced again, not blocked


def test_level_pin_no_destination_sets_remote_irr(lapics, ioapic):
    # KVM tests "if (ret)": -1 from kvm_irq_delivery_to_apic also sets remote IRR.
    ioapic.set_redirection(18, 0x50, level_trigger=True)
    lapics.result = -1
    assert ioapic.set_irq(18, USER, 1) == -1
    assert ioapic.redirection(18).remote_irr


def test_edge_eoi_leaves_remote_irr(ioapic, lapics):
    ioapic.set_redirection(18, 0x50, level_trigger=True)
    ioapic.set_irq(18, USER, 1)
    ioapic.eoi(0x50, level_trigger=False)
    assert ioapic.redirection(18).remote_irr
    assert lapics.vectors == [0x50]


def test_eoi_of_other_vector_is_ignored(ioapic, lapics):
    seen = []
    ioapic.add_ack_notifier(18, lambda: seen.append(18))
    ioapic.set_redirection(18, 0x50, level_trigger=True)
    ioapic.set_irq(18, USER, 1)
    ioapic.set_irq(18, USER, 0)                      # line low: nothing would re-set remote IRR
    ioapic.eoi(0x51)
    assert ioapic.redirection(18).remote_irr
    assert seen == []


def test_eoi_storm_defers_redelivery(ioapic, lapics):
    ioapic.set_redirection(18, 0x50, level_trigger=True)
    ioapic.set_irq(18, USER, 1)
    for _ in range(SUCCESSIVE_IRQ_MAX_COUNT - 1):
        ioapic.eoi(0x50)
    assert len(lapics.calls) == SUCCESSIVE_IRQ_MAX_COUNT
    assert not ioapic.eoi_inject_pending
    ioapic.eoi(0x50)                                  # the 10000th: deferred
    assert ioapic.eoi_inject_pending
    assert len(lapics.calls) == SUCCESSIVE_IRQ_MAX_COUNT
    ioapic.eoi_inject_work()
    assert len(lapics.calls) == SUCCESSIVE_IRQ_MAX_COUNT + 1
    assert not ioapic.eoi_inject_pending


# --- masking ------------------------------------------------------------------------------------
def test_masked_pin_delivers_nothing(ioapic, lapics):
    assert ioapic.set_irq(16, USER, 1) == -1         # fresh pins are masked
    assert ioapic.set_irq(16, USER, 1) == 0          # edge held: coalesced before the mask check
    assert ioapic.set_irq(16, USER, 0) == 1
    ioapic.set_redirection(19, 0x60, level_trigger=True, masked=True)
    assert ioapic.set_irq(19, USER, 1) == -1
    assert ioapic.set_irq(19, USER, 1) == -1
    assert lapics.calls == []
    assert irr_of(ioapic) == 1 << 19


def test_unmasking_level_pin_with_line_high_delivers(ioapic, lapics):
    ioapic.set_redirection(19, 0x60, level_trigger=True, masked=True)
    ioapic.set_irq(19, USER, 1)
    ioapic.set_redirection(19, 0x60, level_trigger=True)
    assert lapics.vectors == [0x60]
    assert ioapic.redirection(19).remote_irr


def test_unmasking_edge_pin_with_line_high_does_not_deliver(ioapic, lapics):
    ioapic.set_redirection(19, 0x60, masked=True)
    ioapic.set_irq(19, USER, 1)
    ioapic.set_redirection(19, 0x60)
    assert lapics.calls == []
    assert ioapic.set_irq(19, USER, 1) == 0          # still coalesced: the edge was lost


def test_reprogramming_keeps_remote_irr_unless_edge(ioapic):
    ioapic.set_redirection(18, 0x50, level_trigger=True)
    ioapic.set_irq(18, USER, 1)
    ioapic.set_redirection(18, 0x51, level_trigger=True, masked=True)
    assert ioapic.redirection(18).remote_irr
    ioapic.set_redirection(18, 0x51, masked=True)
    assert not ioapic.redirection(18).remote_irr


# --- sources ------------------------------------------------------------------------------------
def test_line_is_or_of_sources(ioapic, lapics):
    ioapic.set_redirection(20, 0x70, level_trigger=True)
    assert ioapic.set_irq(20, RESAMPLER, 1) == 1
    assert ioapic.set_irq(20, USER, 0) == -1         # resampler still holds it: serviced, blocked
    assert irr_of(ioapic) == 1 << 20
    assert ioapic.line_level(20)
    assert ioapic.set_irq(20, RESAMPLER, 0) == 1
    assert irr_of(ioapic) == 0
    assert not ioapic.line_level(20)


def test_clear_source_forgets_lines_without_touching_irr(ioapic):
    ioapic.set_irq(20, RESAMPLER, 1)
    ioapic.clear_source(RESAMPLER)
    assert not ioapic.line_level(20)
    assert irr_of(ioapic) == 1 << 20


# --- ack notifiers ------------------------------------------------------------------------------
def test_ack_notifier_called_on_eoi(ioapic):
    seen = []
    cb = lambda: seen.append("ack")                  # noqa: E731
    ioapic.add_ack_notifier(18, cb)
    ioapic.set_redirection(18, 0x50, level_trigger=True)
    ioapic.set_irq(18, USER, 1)
    ioapic.eoi(0x50)
    assert seen == ["ack"]
    ioapic.remove_ack_notifier(18, cb)
    ioapic.eoi(0x50)
    assert seen == ["ack"]
    with pytest.raises(ValueError):
        ioapic.remove_ack_notifier(18, cb)


def test_ack_notifier_runs_before_redelivery_check(ioapic, lapics):
    # A resampler lowers its line from the notifier; remote IRR is still set while it runs, and
    # the line is low by the time the IOAPIC decides whether to deliver again.
    ioapic.set_redirection(18, 0x50, level_trigger=True)
    ioapic.set_irq(18, RESAMPLER, 1)
    seen = []

    def resample():
        seen.append(ioapic.redirection(18).remote_irr)
        ioapic.set_irq(18, RESAMPLER, 0)

    ioapic.add_ack_notifier(18, resample)
    ioapic.eoi(0x50)
    assert seen == [True]
    assert lapics.vectors == [0x50]
    assert not ioapic.redirection(18).remote_irr


def test_ack_notifier_reassert_during_eoi_is_delivered_after(ioapic, lapics):
    ioapic.set_redirection(18, 0x50, level_trigger=True)
    ioapic.set_irq(18, USER, 1)
    statuses = []
    ioapic.add_ack_notifier(18, lambda: statuses.append(ioapic.set_irq(18, USER, 1)))
    ioapic.eoi(0x50)
    assert statuses == [-1]                          # blocked by remote IRR inside the notifier
    assert lapics.vectors == [0x50, 0x50]            # delivered once remote IRR is cleared


def test_ack_notifier_called_for_edge_eoi(ioapic):
    seen = []
    ioapic.add_ack_notifier(16, lambda: seen.append(16))
    ioapic.set_redirection(16, 0x40)
    ioapic.eoi(0x40, level_trigger=False)
    assert seen == [16]
    assert ioapic.has_ack_notifier(16) and not ioapic.has_ack_notifier(15)


def test_eoi_visits_every_pin_with_the_vector(ioapic, lapics):
    seen = []
    for pin in (3, 18):
        ioapic.set_redirection(pin, 0x50, level_trigger=True)
        ioapic.set_irq(pin, USER, 1)
        ioapic.add_ack_notifier(pin, lambda pin=pin: seen.append(pin))
    ioapic.eoi(0x50)
    assert seen == [3, 18]
    assert lapics.vectors == [0x50] * 4


# --- RTC ----------------------------------------------------------------------------------------
def test_rtc_coalesces_with_line_status_until_eoi(ioapic, lapics):
    ioapic.set_redirection(8, 0x30)
    assert ioapic.set_irq(8, USER, 1, line_status=True) == 1
    ioapic.set_irq(8, USER, 0, line_status=True)
    assert ioapic.set_irq(8, USER, 1, line_status=True) == 0
    assert irr_of(ioapic) == 0                       # KVM leaves IRR alone for a coalesced RTC
    ioapic.set_irq(8, USER, 0, line_status=True)
    assert ioapic.set_irq(8, USER, 1, line_status=False) == 1   # KVM_IRQ_LINE: no tracking
    ioapic.set_irq(8, USER, 0)
    ioapic.eoi(0x30, level_trigger=False)
    assert ioapic.set_irq(8, USER, 1, line_status=True) == 1
    assert lapics.vectors == [0x30] * 3


# --- state --------------------------------------------------------------------------------------
def test_state_roundtrip(lapics):
    a = Ioapic(lapics)
    a.set_redirection(5, 0x35, dest_id=7, dest_logical=True, delivery_mode=1, level_trigger=True)
    a.set_redirection(6, 0x36, masked=True)
    a.set_irq(5, USER, 1)
    a.set_irq(6, USER, 1)
    state = a.get_state()
    b = Ioapic(Lapics())
    b.set_state(state)
    assert b.get_state() == state
    assert b.redirection(5) == a.redirection(5)
    assert b.redirection(5).remote_irr
    b.set_state(state + bytes(512 - STATE_SIZE))       # the whole kvm_irqchip union is accepted
    assert b.get_state() == state


def test_set_state_copies_every_byte(ioapic):
    raw = STATE.pack(0xFEC01000, 0x12, 0xFF, 0, 0xDEAD, *([0xFF00_0000_0001_1048] * NUM_PINS))
    ioapic.set_state(raw)
    assert ioapic.get_state() == raw


def test_set_state_reinjects_irr(ioapic, lapics):
    words = [1 << 16] * NUM_PINS
    words[17] = 0x44                                   # edge, unmasked: delivered, IRR hidden
    words[18] = 0x45 | 1 << 15                         # level, unmasked: delivered, remote IRR
    words[19] = 0x46 | 1 << 15 | 1 << 14               # level, remote IRR: kept pending
    words[20] = 0x47 | 1 << 16                         # edge, masked: kept pending
    irr = 0xF << 17
    ioapic.set_state(STATE.pack(DEFAULT_BASE_ADDRESS, 0, 0, irr, 0, *words))
    assert sorted(lapics.vectors) == [0x44, 0x45]
    assert irr_of(ioapic) == 0x7 << 18
    assert ioapic.redirection(18).remote_irr
    # Line levels are untouched: source 0 never raised pin 17, so raising it now is no edge.
    assert ioapic.set_irq(17, USER, 1) == 0


def test_get_state_layout(ioapic):
    ioapic.set_redirection(23, 0xAB, dest_id=0xCD, level_trigger=True, masked=True)
    state = ioapic.get_state()
    (word,) = struct.unpack_from("<Q", state, 24 + 8 * 23)
    assert word == 0xAB | 1 << 15 | 1 << 16 | 0xCD << 56
    assert ioapic.redirection_bits(23) == word


# --- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, field", [
    (lambda a: a.set_irq(24, 0, 1), "pin"),
    (lambda a: a.set_irq(-1, 0, 1), "pin"),
    (lambda a: a.set_irq(0, 64, 1), "irq_source_id"),
    (lambda a: a.set_redirection(24, 0x20), "pin"),
    (lambda a: a.set_redirection(0, 256), "vector"),
    (lambda a: a.set_redirection(0, 0x20, dest_id=256), "dest_id"),
    (lambda a: a.set_redirection(0, 0x20, delivery_mode=8), "delivery_mode"),
    (lambda a: a.redirection(24), "pin"),
    (lambda a: a.add_ack_notifier(24, print), "pin"),
    (lambda a: a.eoi(-1), "vector"),
    (lambda a: a.set_state(bytes(215)), "kvm_ioapic_state"),
    (lambda a: a.set_state(bytes(513)), "kvm_ioapic_state"),
])
def test_bad_arguments_raise_valueerror_naming_field(ioapic, call, field):
    with pytest.raises(ValueError, match=field):
        call(ioapic)
