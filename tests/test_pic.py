"""Model tests for kvmirqfast.pic.Pic (KVM's pair of 8259s).

Expected values are the ones a real 6.18 /dev/kvm gives for the same sequence (see
test_irqchip_vs_kvm.py for the differential versions).
"""

import pytest

from kvmirqfast.pic import FIELDS, STATE, STATE_SIZE, Pic

USER, RESAMPLER = 0, 1
MASTER, SLAVE = 0, 1


def field(pic, chip, name):
    return STATE.unpack(pic.get_state(chip))[FIELDS.index(name)]


def with_fields(pic, chip, **values):
    state = list(STATE.unpack(pic.get_state(chip)))
    for name, value in values.items():
        state[FIELDS.index(name)] = value
    pic.set_state(chip, STATE.pack(*state))


@pytest.fixture
def pic():
    return Pic()


def test_fresh_state_matches_kvm_create_irqchip(pic):
    assert pic.get_state(MASTER) == bytes(15) + b"\xf8"
    assert pic.get_state(SLAVE) == bytes(15) + b"\xde"
    assert STATE_SIZE == 16


def test_edge_irq_latches_once_and_stays_pending(pic):
    assert pic.set_irq(3, USER, 1) == 1
    assert pic.set_irq(3, USER, 1) == 1              # held: nothing new, still 1
    assert pic.set_irq(3, USER, 0) == 1
    assert (field(pic, MASTER, "irr"), field(pic, MASTER, "last_irr")) == (0x08, 0)
    assert pic.set_irq(3, USER, 1) == 0              # new edge onto a pending IRR bit
    assert field(pic, MASTER, "last_irr") == 0x08


def test_level_irq_follows_line(pic):
    with_fields(pic, SLAVE, elcr=0x08)               # IRQ 11 level-triggered
    assert pic.set_irq(11, USER, 1) == 1
    assert pic.set_irq(11, USER, 1) == 0
    assert field(pic, SLAVE, "irr") == 0x08
    assert pic.set_irq(11, USER, 0) == 1
    assert field(pic, SLAVE, "irr") == 0
    assert pic.set_irq(11, USER, 1) == 1


def test_masked_irq_returns_minus_one_but_latches(pic):
    with_fields(pic, MASTER, imr=0x20)
    assert pic.set_irq(5, USER, 1) == -1
    assert pic.set_irq(5, USER, 1) == -1
    assert pic.set_irq(5, USER, 0) == -1
    assert field(pic, MASTER, "irr") == 0x20
    assert not pic.output


def test_slave_request_pulses_master_cascade(pic):
    assert pic.set_irq(10, USER, 1) == 1
    assert field(pic, SLAVE, "irr") == 0x04
    assert (field(pic, MASTER, "irr"), field(pic, MASTER, "last_irr")) == (0x04, 0)
    assert pic.output


def test_masked_slave_request_does_not_cascade(pic):
    with_fields(pic, SLAVE, imr=0x04)
    assert pic.set_irq(10, USER, 1) == -1
    assert field(pic, MASTER, "irr") == 0


def test_slave_in_service_blocks_cascade(pic):
    with_fields(pic, SLAVE, isr=0x01)                # IRQ 8 in service outranks IRQ 10
    pic.set_irq(10, USER, 1)
    assert field(pic, MASTER, "irr") == 0
    with_fields(pic, SLAVE, isr=0)                   # set_state re-evaluates the cascade
    assert field(pic, MASTER, "irr") == 0x04


def test_set_state_is_verbatim(pic):
    raw = bytes(range(1, 17))
    pic.set_state(MASTER, raw)
    assert pic.get_state(MASTER) == raw              # elcr not clipped, elcr_mask overwritten
    pic.set_state(SLAVE, bytes(14) + b"\xff\xff")
    assert pic.get_state(SLAVE)[14:] == b"\xff\xff"
    pic.set_state(MASTER, raw + bytes(512 - 16))      # whole union accepted


def test_set_state_slave_pending_sets_master_irr2(pic):
    pic.set_state(SLAVE, bytes([0, 0x10]) + bytes(13) + b"\xde")
    assert pic.get_state(MASTER) == bytes([0, 0x04]) + bytes(13) + b"\xf8"


def test_line_is_or_of_sources(pic):
    with_fields(pic, SLAVE, elcr=0x08)
    pic.set_irq(11, RESAMPLER, 1)
    assert pic.set_irq(11, USER, 0) == 0             # still high: the level is re-asserted
    assert field(pic, SLAVE, "irr") == 0x08
    assert pic.set_irq(11, RESAMPLER, 0) == 1
    assert field(pic, SLAVE, "irr") == 0
    pic.set_irq(11, RESAMPLER, 1)
    pic.clear_source(RESAMPLER)
    assert not pic.line_level(11)


def test_priority_rotation_picks_next_irq(pic):
    with_fields(pic, MASTER, irr=0x11, priority_add=3)   # IRQ 3 ranks first, so 4 beats 0
    assert pic.output
    assert pic._chips[0].pending_irq(True) == 4


@pytest.mark.parametrize("call, field_name", [
    (lambda p: p.set_irq(16, 0, 1), "irq"),
    (lambda p: p.set_irq(-1, 0, 1), "irq"),
    (lambda p: p.set_irq(0, -1, 1), "irq_source_id"),
    (lambda p: p.get_state(2), "chip"),
    (lambda p: p.set_state(3, bytes(16)), "chip"),
    (lambda p: p.set_state(0, bytes(15)), "kvm_pic_state"),
    (lambda p: p.clear_source(64), "irq_source_id"),
])
def test_bad_arguments_raise_valueerror_naming_field(pic, call, field_name):
    with pytest.raises(ValueError, match=field_name):
        call(pic)
