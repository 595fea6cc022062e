"""The in-kernel IOAPIC, as KVM models it (24 pins), at the level of pin assertions and EOIs.

A pin assertion walks this path, as in KVM's ``kvm_ioapic_set_irq``:

1. The pin's line level is the OR over interrupt *sources* (source 0 is userspace's
   ``KVM_IRQ_LINE``, source 1 the irqfd resampler): each source sets or clears its own bit.
2. A low line clears the pin's IRR bit and returns 1.
3. A high line sets IRR.  On an edge-triggered pin a line that was already high is *coalesced*
   (returns 0, nothing delivered).  Otherwise the pin is *serviced*: a masked pin, or a
   level-triggered pin whose remote IRR is still set, returns -1; else the redirection entry is
   sent to the LAPICs through ``deliver`` and its result returned.  A level-triggered delivery that
   reached a destination (``deliver`` returned non-zero, -1 included, as KVM tests ``if (ret)``)
   sets remote IRR, which blocks re-delivery until the guest EOIs the vector.

Observed on a real 6.18 ``/dev/kvm`` (``KVM_IRQ_LINE_STATUS`` on GSI 16, routed only here):
masked pin -> -1, then 0 while the line stays high; edge pin -> 1 per rising edge, 0 while held;
level pin -> 1, then -1 while remote IRR is set; any deassertion -> 1; a destination APIC ID with
no vCPU, or a software-disabled LAPIC -> 0 (and no remote IRR).

The RTC pin (8) keeps KVM's coalescing quirk when the caller asks for a line status
(``line_status=True``, which KVM passes for ``KVM_IRQ_LINE_STATUS`` only): a new RTC edge while
LAPICs still owe an EOI for the last one returns 0 and does not even set IRR.

``eoi(vector)`` is KVM's broadcast EOI (``kvm_ioapic_update_eoi``): for every pin programmed with
that vector, the pin's ack notifiers run first, then (for a level-triggered EOI) remote IRR is
cleared and, if the line is still high and the pin unmasked, the pin is serviced again.  Running
the notifiers first is what lets an irqfd resampler lower the line before the re-delivery check.
After 10000 EOIs in a row that each re-deliver, KVM defers the next re-delivery by 10 ms (an
interrupt-storm brake); here that sets ``eoi_inject_pending`` and the owner calls
``eoi_inject_work()`` when it likes.

``get_state``/``set_state`` speak ``struct kvm_ioapic_state`` (216 bytes; the first part of the
512-byte ``KVM_GET_IRQCHIP`` union).  ``get_state`` reports IRR minus the edge pins already
delivered; ``set_state`` copies every byte as given (pad, id, ioregsel and reserved bits
included, as KVM does), clears IRR and re-asserts each IRR bit of the new state (the per-source
line levels are left alone), so a pending interrupt in the restored state is delivered.

Not modelled: MMIO register access (``set_redirection`` stands in for the guest's writes), mask
notifiers, directed EOI (KVM never offers it with an in-kernel IOAPIC), the APICv lazy-EOI path for
the RTC, and which vCPUs owe the RTC EOI: every EOI of the RTC vector counts, whoever sends it.
"""

import struct
import threading
from typing import NamedTuple

NUM_PINS = 24
RTC_PIN = 8
DEFAULT_BASE_ADDRESS = 0xFEC00000
#: sizeof(struct kvm_ioapic_state).
STATE = struct.Struct("<QIIII24Q")
STATE_SIZE = STATE.size
#: size of the union in struct kvm_irqchip; set_state also accepts a whole union.
IRQCHIP_UNION_SIZE = 512
MAX_IRQ_SOURCES = 64             # irq_states is one unsigned long per pin
SUCCESSIVE_IRQ_MAX_COUNT = 10000

# Redirection-entry bits (struct kvm_ioapic_state.redirtbl[].fields).
_VECTOR = 0xFF
_DELIVERY_MODE_SHIFT = 8
_DEST_MODE = 1 << 11
_DELIVERY_STATUS = 1 << 12
_POLARITY = 1 << 13
_REMOTE_IRR = 1 << 14
_TRIG_LEVEL = 1 << 15
_MASK = 1 << 16
_DEST_ID_SHIFT = 56


class Redirection(NamedTuple):
    """One decoded redirection-table entry."""
    vector: int
    delivery_mode: int
    dest_logical: bool
    delivery_status: bool
    polarity: bool
    remote_irr: bool
    level_trigger: bool
    masked: bool
    dest_id: int

    @classmethod
    def from_bits(cls, bits):
        return cls(bits & _VECTOR, (bits >> _DELIVERY_MODE_SHIFT) & 7, bool(bits & _DEST_MODE),
                   bool(bits & _DELIVERY_STATUS), bool(bits & _POLARITY),
                   bool(bits & _REMOTE_IRR), bool(bits & _TRIG_LEVEL), bool(bits & _MASK),
                   (bits >> _DEST_ID_SHIFT) & 0xFF)


def _check_pin(pin):
    if not isinstance(pin, int) or not 0 <= pin < NUM_PINS:
        raise ValueError(f"pin {pin!r} out of range 0..{NUM_PINS - 1}")


def check_source(irq_source_id):
    if not isinstance(irq_source_id, int) or not 0 <= irq_source_id < MAX_IRQ_SOURCES:
        raise ValueError(f"irq_source_id {irq_source_id!r} out of range 0..{MAX_IRQ_SOURCES - 1}")


def _check_vector(vector):
    if not isinstance(vector, int) or not 0 <= vector <= 0xFF:
        raise ValueError(f"vector {vector!r} out of range 0..255")


def check_state_size(buf, size, what):
    """Accept exactly the struct or the whole 512-byte kvm_irqchip union; return the struct part."""
    n = len(buf)
    if n not in (size, IRQCHIP_UNION_SIZE):
        raise ValueError(f"{what} buffer is {n} bytes, expected {size} or {IRQCHIP_UNION_SIZE}")
    return bytes(buf[:size])


class Ioapic:
    """KVM's in-kernel IOAPIC: 24 pins, redirection table, IRR, remote IRR, broadcast EOI.

    ``deliver(dest_id, dest_logical, delivery_mode, level_trigger, vector) -> int`` sends one
    interrupt message to the LAPICs and returns what ``kvm_irq_delivery_to_apic`` returns: the
    number of LAPICs that accepted it (0 if none did), or -1 if it had no destination.

    Locking: one lock guards all state, as KVM's ``ioapic->lock``; ``deliver`` runs under it and
    must not call back into this IOAPIC.  Ack notifiers run with it released (as KVM drops the lock
    around ``kvm_notify_acked_irq``), so they may call ``set_irq``.
    """

    def __init__(self, deliver):
        self._deliver = deliver
        self._lock = threading.Lock()
        self._notifiers = [[] for _ in range(NUM_PINS)]
        self._redirtbl = [0] * NUM_PINS      # kzalloc'ed, then masked by reset()
        self._irq_states = [0] * NUM_PINS    # per pin: bitmap of sources holding the line high
        self.reset()

    # --- lifecycle -------------------------------------------------------------------------
    def reset(self):
        """KVM's ``kvm_ioapic_reset``: mask every pin (other entry bits kept), base 0xfec00000,
        id/ioregsel/IRR cleared.  Source line levels and ack notifiers are kept.  O(pins)."""
        with self._lock:
            self._redirtbl = [bits | _MASK for bits in self._redirtbl]
            self._base_address = DEFAULT_BASE_ADDRESS
            self._ioregsel = 0
            self._id = 0
            self._pad = 0
            self._irr = 0
            self._irr_delivered = 0
            self._irq_eoi = [0] * NUM_PINS
            self._rtc_pending_eoi = 0
            self._rtc_vector = None
            self.eoi_inject_pending = False

    # --- pin assertion -----------------------------------------------------------------------
    def set_irq(self, pin, irq_source_id, level, line_status=False):
        """Drive ``pin`` from source ``irq_source_id``; return 1 delivered (or line lowered),
        0 coalesced / not accepted, -1 masked or blocked by remote IRR, else ``deliver``'s count.

        ``line_status`` is True for ``KVM_IRQ_LINE_STATUS`` (it only matters for the RTC pin).
        Raises ValueError for a bad pin or source.  O(1) plus one ``deliver`` call.
        """
        _check_pin(pin)
        check_source(irq_source_id)
        with self._lock:
            bit = 1 << irq_source_id
            if level:
                self._irq_states[pin] |= bit
            else:
                self._irq_states[pin] &= ~bit
            return self._set_irq(pin, self._irq_states[pin] != 0, line_status)

    def clear_source(self, irq_source_id):
        """Forget every line ``irq_source_id`` holds (KVM's ``kvm_ioapic_clear_all``); like KVM,
        IRR is not recomputed.  O(pins)."""
        check_source(irq_source_id)
        with self._lock:
            for pin in range(NUM_PINS):
                self._irq_states[pin] &= ~(1 << irq_source_id)

    def line_level(self, pin):
        """The OR over sources of ``pin``'s line.  O(1)."""
        _check_pin(pin)
        return self._irq_states[pin] != 0

    def _set_irq(self, pin, line_high, line_status):
        mask = 1 << pin
        if not line_high:
            self._irr &= ~mask
            return 1
        edge = not self._redirtbl[pin] & _TRIG_LEVEL
        # The RTC quirk: with a line status requested, an RTC edge that LAPICs have not EOIed yet
        # is reported coalesced before IRR is even touched.
        if pin == RTC_PIN and line_status and self._rtc_pending_eoi > 0:
            return 0
        old_irr = self._irr
        self._irr |= mask
        if edge:
            self._irr_delivered &= ~mask
            if old_irr == self._irr:
                return 0
        return self._service(pin, line_status)

    def _service(self, pin, line_status=False):
        bits = self._redirtbl[pin]
        level = bool(bits & _TRIG_LEVEL)
        if bits & _MASK or (level and bits & _REMOTE_IRR):
            return -1
        if not level:
            self._irr_delivered |= 1 << pin
        ret = self._deliver((bits >> _DEST_ID_SHIFT) & 0xFF, bool(bits & _DEST_MODE),
                            (bits >> _DELIVERY_MODE_SHIFT) & 7, level, bits & _VECTOR)
        if pin == RTC_PIN and line_status:
            self._rtc_pending_eoi = max(ret, 0)
            self._rtc_vector = bits & _VECTOR
        # KVM tests "if (ret)": -1 (no destination) sets remote IRR too; only 0 does not.
        if ret and level:
            self._redirtbl[pin] = bits | _REMOTE_IRR
        return ret

    # --- EOI and ack notifiers ---------------------------------------------------------------
    def add_ack_notifier(self, pin, callback):
        """Call ``callback()`` whenever a LAPIC EOIs ``pin``'s vector.  O(1)."""
        _check_pin(pin)
        with self._lock:
            self._notifiers[pin].append(callback)

    def remove_ack_notifier(self, pin, callback):
        """Undo one ``add_ack_notifier``; ValueError if ``callback`` is not registered.  O(n)."""
        _check_pin(pin)
        with self._lock:
            try:
                self._notifiers[pin].remove(callback)
            except ValueError:
                raise ValueError(f"callback is not an ack notifier of pin {pin}") from None

    def has_ack_notifier(self, pin):
        """Whether ``pin`` has an ack notifier (KVM then also forwards edge EOIs for it)."""
        _check_pin(pin)
        return bool(self._notifiers[pin])

    def eoi(self, vector, level_trigger=True):
        """A LAPIC EOIed ``vector``; ``level_trigger`` is that vector's TMR bit.

        For each pin whose entry holds ``vector``, in pin order: run its ack notifiers (lock
        released); then, for a level EOI, clear remote IRR and service the pin again if its line
        is high and it is unmasked.  An edge EOI only runs notifiers (and settles the RTC).
        Raises ValueError for a bad vector.  O(pins + notifiers).
        """
        _check_vector(vector)
        with self._lock:
            if self._rtc_pending_eoi > 0 and vector == self._rtc_vector:
                self._rtc_pending_eoi -= 1
            for pin in range(NUM_PINS):
                if self._redirtbl[pin] & _VECTOR != vector:
                    continue
                callbacks = list(self._notifiers[pin])
                if callbacks:
                    self._lock.release()
                    try:
                        for callback in callbacks:
                            callback()
                    finally:
                        self._lock.acquire()
                if not level_trigger:
                    continue
                bits = self._redirtbl[pin] & ~_REMOTE_IRR
                self._redirtbl[pin] = bits
                if not bits & _MASK and self._irr & (1 << pin):
                    self._irq_eoi[pin] += 1
                    if self._irq_eoi[pin] == SUCCESSIVE_IRQ_MAX_COUNT:
                        self._irq_eoi[pin] = 0
                        self.eoi_inject_pending = True
                    else:
                        self._service(pin)
                else:
                    self._irq_eoi[pin] = 0

    def eoi_inject_work(self):
        """KVM's delayed storm re-injection: service every level pin with IRR set and remote IRR
        clear.  The owner calls it about 10 ms after ``eoi_inject_pending`` became True."""
        with self._lock:
            self.eoi_inject_pending = False
            for pin in range(NUM_PINS):
                bits = self._redirtbl[pin]
                if bits & _TRIG_LEVEL and self._irr & (1 << pin) and not bits & _REMOTE_IRR:
                    self._service(pin)

    # --- redirection table -------------------------------------------------------------------
    def set_redirection(self, pin, vector, dest_id=0, dest_logical=False, delivery_mode=0,
                        level_trigger=False, masked=False):
        """Program ``pin``'s entry as a guest write would (KVM's ``ioapic_write_indirect``).

        Remote IRR and delivery status are read-only and kept, except that an edge-triggered entry
        clears remote IRR; a level-triggered entry whose IRR bit is set is serviced at once (so
        unmasking a level pin with its line high delivers).  Returns the new entry.  Raises
        ValueError naming a bad field.  O(1) plus at most one ``deliver``.
        """
        _check_pin(pin)
        _check_vector(vector)
        if not isinstance(dest_id, int) or not 0 <= dest_id <= 0xFF:
            raise ValueError(f"dest_id {dest_id!r} out of range 0..255")
        if not isinstance(delivery_mode, int) or not 0 <= delivery_mode <= 7:
            raise ValueError(f"delivery_mode {delivery_mode!r} out of range 0..7")
        with self._lock:
            old = self._redirtbl[pin]
            bits = (vector | delivery_mode << _DELIVERY_MODE_SHIFT
                    | (_DEST_MODE if dest_logical else 0) | (_TRIG_LEVEL if level_trigger else 0)
                    | (_MASK if masked else 0) | dest_id << _DEST_ID_SHIFT)
            bits |= old & (_REMOTE_IRR | _DELIVERY_STATUS)
            if not level_trigger:
                bits &= ~_REMOTE_IRR
            self._redirtbl[pin] = bits
            if level_trigger and self._irr & (1 << pin):
                self._service(pin)
            return Redirection.from_bits(self._redirtbl[pin])

    def redirection(self, pin):
        """``pin``'s entry, decoded.  O(1)."""
        _check_pin(pin)
        return Redirection.from_bits(self._redirtbl[pin])

    def redirection_bits(self, pin):
        """``pin``'s raw 64-bit entry, as in ``redirtbl[pin].bits``.  O(1)."""
        _check_pin(pin)
        return self._redirtbl[pin]

    @property
    def irr(self):
        """IRR as ``KVM_GET_IRQCHIP`` reports it (edge pins already delivered left out)."""
        return self._irr & ~self._irr_delivered

    # --- KVM_GET_IRQCHIP / KVM_SET_IRQCHIP ---------------------------------------------------
    def get_state(self):
        """``struct kvm_ioapic_state`` (216 bytes), as ``kvm_get_ioapic`` fills it.  O(pins)."""
        with self._lock:
            return STATE.pack(self._base_address, self._ioregsel, self._id,
                              self._irr & ~self._irr_delivered, self._pad, *self._redirtbl)

    def set_state(self, buf):
        """Load a ``struct kvm_ioapic_state`` (216 bytes, or the whole 512-byte union) as
        ``kvm_set_ioapic`` does: copy everything verbatim, clear IRR, then re-assert each IRR bit
        of ``buf`` (delivering what is deliverable).  Raises ValueError for a bad size.  O(pins).
        """
        fields = STATE.unpack(check_state_size(buf, STATE_SIZE, "kvm_ioapic_state"))
        with self._lock:
            self._base_address, self._ioregsel, self._id, irr, self._pad = fields[:5]
            self._redirtbl = list(fields[5:])
            self._irr = 0
            self._irr_delivered = 0
            # kvm_ioapic_inject_all: re-assert with line status.  KVM then recounts the RTC EOIs
            # owed by looking into the LAPICs; we cannot, so only an RTC delivery made right here
            # is counted.
            self._rtc_pending_eoi = 0
            for pin in range(NUM_PINS):
                if irr & (1 << pin):
                    self._set_irq(pin, True, True)
