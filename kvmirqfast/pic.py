"""The two cascaded 8259 PICs (master = chip 0, IRQs 0-7; slave = chip 1, IRQs 8-15), as KVM's
in-kernel i8259 model keeps them, at the level of line assertions and saved state.

A line assertion, as in KVM's ``kvm_pic_set_irq``:

1. The line level is the OR over interrupt sources (source 0 userspace, 1 the irqfd resampler).
2. Level-triggered inputs (ELCR bit set) follow the line: high sets IRR (returns 0 if IRR was
   already set, else 1), low clears it.  Edge-triggered inputs latch IRR on a rising edge
   (``last_irr`` remembers the line); holding or lowering the line returns 1, and a rising edge
   onto an IRR bit still set (the guest has not taken it) returns 0.
3. If the input is masked in IMR the result is -1 whatever happened to IRR.
4. Then the cascade is re-evaluated: if the slave has an unmasked request of higher priority
   than what it is servicing, it pulses the master's IRQ 2 input (high then low), which latches
   master IRR bit 2 unless master IRQ 2 is programmed level-triggered.

Fresh state (read from a real 6.18 ``/dev/kvm`` right after ``KVM_CREATE_IRQCHIP``): every field
zero (IMR 0, so nothing is masked; ELCR 0, so all edge) except ``elcr_mask``, 0xf8 on the master and
0xde on the slave.  ``KVM_SET_IRQCHIP`` copies the 16 bytes verbatim: ``elcr`` is not clipped by
``elcr_mask`` and ``elcr_mask`` itself is overwritten; then the cascade is re-evaluated.

Documented limitation: the PIC's output is not delivered anywhere.  On KVM the master's INTR line
reaches vCPU 0 as an ExtINT when its LAPIC accepts PIC interrupts, and the guest's INTA, EOI,
OCW and ICW port writes move IRR into ISR and back; our vCPUs take interrupts through their LAPIC
only, so none of that is modelled (``output`` shows the level KVM would drive, for information).
Consequently an edge IRR bit, once latched, stays set until ``set_state`` clears it, exactly as on
a real VM whose guest never runs.
"""

import struct
import threading

from .ioapic import check_source as _check_source, check_state_size

NUM_IRQS = 16
#: struct kvm_pic_state: sixteen u8 fields.
STATE = struct.Struct("<16B")
STATE_SIZE = STATE.size
FIELDS = ("last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select", "poll",
          "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi",
          "special_fully_nested_mode", "init4", "elcr", "elcr_mask")
#: ELCR bits each chip lets a guest set (IRQ 0, 1, 2, 8 and 13 are always edge-triggered).
ELCR_MASK = (0xF8, 0xDE)
CASCADE_IRQ = 2


class _Chip:
    """One 8259's kvm_pic_state fields."""
    __slots__ = FIELDS

    def __init__(self, elcr_mask):
        for name in FIELDS:
            setattr(self, name, 0)
        self.elcr_mask = elcr_mask

    def pack(self):
        return STATE.pack(*(getattr(self, name) for name in FIELDS))

    def load(self, buf):
        for name, value in zip(FIELDS, STATE.unpack(buf)):
            setattr(self, name, value)

    def set_irq1(self, irq, level):
        """Drive input ``irq`` (0..7) to ``level``; the status of kvm_pic_set_irq."""
        mask = 1 << irq
        ret = 1
        if self.elcr & mask:                 # level-triggered: IRR follows the line
            if level:
                ret = 0 if self.irr & mask else 1
                self.irr |= mask
                self.last_irr |= mask
            else:
                self.irr &= ~mask
                self.last_irr &= ~mask
        elif level:                          # edge-triggered: latch on a rising edge only
            if not self.last_irr & mask:
                ret = 0 if self.irr & mask else 1
                self.irr |= mask
            self.last_irr |= mask
        else:
            self.last_irr &= ~mask
        return -1 if self.imr & mask else ret

    def _priority(self, mask):
        """Distance from the current highest-priority input to the first set bit; 8 if none."""
        if not mask:
            return 8
        priority = 0
        while not mask & (1 << ((priority + self.priority_add) & 7)):
            priority += 1
        return priority

    def pending_irq(self, is_master):
        """The input this chip would present to the CPU (or master), or -1."""
        priority = self._priority(self.irr & ~self.imr)
        if priority == 8:
            return -1
        in_service = self.isr
        if is_master and self.special_fully_nested_mode:
            in_service &= ~(1 << CASCADE_IRQ)
        if priority < self._priority(in_service):
            return (priority + self.priority_add) & 7
        return -1


def _check_chip(chip):
    if chip not in (0, 1) or isinstance(chip, bool):
        raise ValueError(f"chip {chip!r} is not a PIC (0 master, 1 slave)")


class Pic:
    """KVM's pair of 8259 PICs: ``set_irq`` statuses and ``kvm_pic_state`` save/restore.

    Locking: one lock guards both chips, as KVM's ``pic->lock``.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._chips = (_Chip(ELCR_MASK[0]), _Chip(ELCR_MASK[1]))
        self._irq_states = [0] * NUM_IRQS    # per IRQ: bitmap of sources holding the line high

    def set_irq(self, irq, irq_source_id, level):
        """Drive IRQ ``irq`` (0..15) from source ``irq_source_id``; return KVM's status:
        1 latched (or nothing to latch), 0 coalesced onto a pending IRR bit, -1 masked in IMR.
        Raises ValueError naming a bad ``irq`` or ``irq_source_id``.  O(1).
        """
        if not isinstance(irq, int) or not 0 <= irq < NUM_IRQS:
            raise ValueError(f"irq {irq!r} out of range 0..{NUM_IRQS - 1}")
        _check_source(irq_source_id)
        with self._lock:
            bit = 1 << irq_source_id
            if level:
                self._irq_states[irq] |= bit
            else:
                self._irq_states[irq] &= ~bit
            ret = self._chips[irq >> 3].set_irq1(irq & 7, self._irq_states[irq] != 0)
            self._update()
            return ret

    def clear_source(self, irq_source_id):
        """Forget every line ``irq_source_id`` holds (KVM's ``kvm_pic_clear_all``).  O(irqs)."""
        _check_source(irq_source_id)
        with self._lock:
            for irq in range(NUM_IRQS):
                self._irq_states[irq] &= ~(1 << irq_source_id)

    def line_level(self, irq):
        """The OR over sources of ``irq``'s line.  O(1)."""
        if not isinstance(irq, int) or not 0 <= irq < NUM_IRQS:
            raise ValueError(f"irq {irq!r} out of range 0..{NUM_IRQS - 1}")
        return self._irq_states[irq] != 0

    def _update(self):
        # KVM's pic_update_irq: a slave request pulses the master's cascade input.
        master, slave = self._chips
        if slave.pending_irq(False) >= 0:
            master.set_irq1(CASCADE_IRQ, 1)
            master.set_irq1(CASCADE_IRQ, 0)

    @property
    def output(self):
        """Whether KVM would drive the master's INTR output high now (informational only)."""
        with self._lock:
            return self._chips[0].pending_irq(True) >= 0

    def get_state(self, chip):
        """``struct kvm_pic_state`` (16 bytes) of ``chip`` (0 master, 1 slave).  O(1)."""
        _check_chip(chip)
        with self._lock:
            return self._chips[chip].pack()

    def set_state(self, chip, buf):
        """Load ``chip``'s ``struct kvm_pic_state`` (16 bytes, or the whole 512-byte union)
        verbatim, then re-evaluate the cascade, as ``KVM_SET_IRQCHIP`` does.  Per-source line levels are
        kept.  Raises ValueError for a bad chip or size.  O(1).
        """
        _check_chip(chip)
        data = check_state_size(buf, STATE_SIZE, "kvm_pic_state")
        with self._lock:
            self._chips[chip].load(data)
            self._update()

    def update(self):
        """Re-evaluate the cascade; KVM does this after every ``KVM_SET_IRQCHIP``, IOAPIC included
        (a no-op unless state changed behind the PIC's back).  O(1)."""
        with self._lock:
            self._update()
