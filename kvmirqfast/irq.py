"""KVM's ``kvm_set_irq`` layer: a GSI's routing entries, the in-kernel irqchips, resamplers.

The slow path of an irqfd ends here (the deferred worker, KVM_IRQ_LINE, KVM_SIGNAL_MSI): a GSI is
looked up in the routing table and each of its entries is driven -- an MSI straight into the
LAPICs through the engine, an irqchip pin into the PIC or the IOAPIC, whose messages go to the
LAPICs too.  When the guest EOIs a level-triggered IOAPIC vector, the pin's resampler lowers the
line and signals its resamplefds.  All of it runs under the Vm's lock.
"""

from . import uapi
from .irqfd import Resampler, msi_route_word
from .routing import IrqchipEntry, MsiEntry

KVM_USERSPACE_IRQ_SOURCE_ID = 0
KVM_IRQFD_RESAMPLE_IRQ_SOURCE_ID = 1


class Irqchip:
    """The in-kernel interrupt controllers of one VM and the routes into them.

    ``routing`` is a callable returning the table in force (KVM reads the table current at
    injection time).  On x86 it owns a ``Pic`` and an ``Ioapic``; elsewhere only MSIs route.
    """

    def __init__(self, arch, engine, routing):
        self.arch = arch
        self._engine = engine
        self._routing = routing
        self.resamplers = {}              # line -> Resampler; line is ("gsi", n) or ("entry", e)
        self.pic = self.ioapic = None
        if arch.name == "x86":
            from .ioapic import Ioapic
            from .pic import Pic
            self.pic = Pic()
            self.ioapic = Ioapic(self._ioapic_deliver)
            for pin in range(uapi.KVM_IOAPIC_NUM_PINS):
                self.ioapic.add_ack_notifier(pin, self._ack_notifier(pin))

    def close(self):
        for res in self.resamplers.values():
            res.close()
        self.resamplers = {}

    # -- kvm_set_irq ----------------------------------------------------------------------------
    def set_irq(self, table, gsi, source, level, line_status=False):
        """Drive every entry of ``gsi``; KVM's status: the sum of the non-negative results, -1
        if there are none.  O(entries of the GSI)."""
        ret = -1
        for entry in table.entries_for(gsi) if 0 <= gsi < uapi.KVM_MAX_IRQ_ROUTES else ():
            r = self.set_entry(entry, source, level, line_status)
            if r >= 0:
                ret = r + max(ret, 0)
        return ret

    def set_entry(self, entry, source, level, line_status=False):
        """Drive one routing entry (an MSI fires on a rising level only, as kvm_set_msi)."""
        if isinstance(entry, MsiEntry):
            if not level:
                return -1
            msg = self.arch.decode_msi(entry.address_lo, entry.address_hi, entry.data)
            return self._engine.deliver(msi_route_word(msg))
        if isinstance(entry, IrqchipEntry) and self.ioapic is not None:
            if entry.irqchip == uapi.KVM_IRQCHIP_IOAPIC:
                return self.ioapic.set_irq(entry.pin, source, level, line_status)
            irq = entry.pin + (8 if entry.irqchip == uapi.KVM_IRQCHIP_PIC_SLAVE else 0)
            return self.pic.set_irq(irq, source, level)
        return -1

    def set_line(self, line, source, level):
        if line[0] == "gsi":
            return self.set_irq(self._routing(), line[1], source, level)
        return self.set_entry(line[1], source, level)

    # -- irqfd_inject ---------------------------------------------------------------------------
    def inject_gsi(self, table, r):
        """One event of legacy irqfd ``r``: a pulse, or an assertion its resampler will lower."""
        if r.resampler is not None:
            self.set_irq(table, r.gsi, KVM_IRQFD_RESAMPLE_IRQ_SOURCE_ID, 1)
        else:
            self.set_irq(table, r.gsi, KVM_USERSPACE_IRQ_SOURCE_ID, 1)
            self.set_irq(table, r.gsi, KVM_USERSPACE_IRQ_SOURCE_ID, 0)

    def inject_entry(self, entry, r):
        """One event of direct irqfd ``r`` through ``entry`` (its embedded route)."""
        if r.resampler is not None:
            self.set_entry(entry, KVM_IRQFD_RESAMPLE_IRQ_SOURCE_ID, 1)
        else:
            self.set_entry(entry, KVM_USERSPACE_IRQ_SOURCE_ID, 1)
            self.set_entry(entry, KVM_USERSPACE_IRQ_SOURCE_ID, 0)

    # -- resamplers -----------------------------------------------------------------------------
    def attach_resampler(self, r, resamplefd):
        """Join the resampler of r's line (it keeps its own dup of ``resamplefd``)."""
        line = ("gsi", r.gsi) if not r.direct else ("entry", r.entry)
        res = self.resamplers.get(line)
        if res is None:
            res = Resampler(line)
        res.add(resamplefd)                     # may raise (EMFILE): nothing changed then
        self.resamplers[line] = res
        r.resampler = res
        r.resamplefd = res.resamplefds[-1]

    def drop_resampler(self, r, lower=True):
        res = r.resampler
        if res is None:
            return
        res.remove(r.resamplefd)
        r.resampler = r.resamplefd = None
        if not res.resamplefds:                 # last user: lower the line, as KVM does
            del self.resamplers[res.line]
            if lower:
                self.set_line(res.line, KVM_IRQFD_RESAMPLE_IRQ_SOURCE_ID, 0)

    # -- the IOAPIC's two ends: messages out, EOIs in --------------------------------------------
    def _ioapic_deliver(self, dest_id, dest_logical, delivery_mode, level_trigger, vector):
        word = (vector & 0xFF | (delivery_mode & 7) << 8 | int(dest_logical) << 11
                | int(level_trigger) << 12 | 1 << 13 | (dest_id & 0xFFFFFFFF) << 32)
        return self._engine.deliver(word)

    def eoi(self, vector, level):
        """A LAPIC EOI that KVM forwards to the IOAPIC (level vectors, or any with resamplers)."""
        if self.ioapic is not None:
            self.ioapic.eoi(vector, level)

    def _ack_notifier(self, pin):
        def acked():
            self._ioapic_acked(pin)
        return acked

    def _ioapic_acked(self, pin):
        # kvm_notify_acked_irq: resamplers on the GSI routed to this pin, and direct ones.
        lines = [("entry", IrqchipEntry(uapi.KVM_IRQCHIP_IOAPIC, pin))]
        gsi = self._routing().irqchip_gsi(uapi.KVM_IRQCHIP_IOAPIC, pin)
        if gsi is not None:
            lines.append(("gsi", gsi))
        for line in lines:
            res = self.resamplers.get(line)
            if res is not None:                 # irqfd_resampler_ack
                self.set_line(line, KVM_IRQFD_RESAMPLE_IRQ_SOURCE_ID, 0)
                res.signal()
