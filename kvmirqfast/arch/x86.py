"""x86 routing rules (``kvm_set_routing_entry`` in ``arch/x86/kvm/irq.c``) and MSI decoding.

Entry rules, all EINVAL on failure:

- irqchip: PIC master (0) and PIC slave (1) pins 0..7, IOAPIC (2) pins 0..23, any other chip
  refused; with a split irqchip (``KVM_CAP_SPLIT_IRQCHIP``) irqchip entries are refused outright.
- MSI: any address/data; once ``KVM_X2APIC_API_USE_32BIT_IDS`` is enabled (``x2apic_format``)
  the low 8 bits of ``address_hi`` must be 0 (they would alias the reserved bits below the 24-bit
  destination extension).  ``KVM_MSI_VALID_DEVID`` is accepted and the devid ignored.
- Hyper-V SINT: accepted without range checks, but only where KVM is built with Hyper-V support
  (``hyperv=True``); Xen event channel: ``port`` below 1024 (4096 once the guest is in 64-bit Xen
  mode) and ``priority`` == 2-level, only with ``xen=True``.  The host this was checked on has
  neither (``KVM_CAP_HYPERV_SYNIC`` and ``KVM_CAP_XEN_HVM`` are 0), so both default to False.

MSI decoding follows ``kvm_set_msi_irq``: destination = address bits 19:12, plus
``address_hi`` bits 31:8 as destination bits 31:8 when ``x2apic_format`` is on.  Observed on 6.18:
KVM does *not* decode the 15-bit "extended destination ID" in address bits 11:5 (an MSI to APIC
ID 0 with those bits set still reaches APIC ID 0), without ``x2apic_format`` it ignores
``address_hi`` entirely, and it does not check the 0xFEE base address.
"""

import errno as _errno
from typing import NamedTuple

from .. import uapi
from ..routing import (HvSintEntry, InvalidRouting, IrqchipEntry, MsiEntry, XenEvtchnEntry,
                       XEN_EVTCHN_PRIO_2LEVEL)

# --- constants ------------------------------------------------------------------------------------
KVM_IRQCHIP_PIC_MASTER = uapi.KVM_IRQCHIP_PIC_MASTER     # 0
KVM_IRQCHIP_PIC_SLAVE = uapi.KVM_IRQCHIP_PIC_SLAVE       # 1
KVM_IRQCHIP_IOAPIC = uapi.KVM_IRQCHIP_IOAPIC             # 2
KVM_NR_IRQCHIPS = 3
PIC_NUM_PINS = uapi.PIC_NUM_PINS                         # 16, both PICs together
PIC_PINS_PER_CHIP = PIC_NUM_PINS // 2                    # 8
KVM_IOAPIC_NUM_PINS = uapi.KVM_IOAPIC_NUM_PINS           # 24
#: size of KVM's per-chip pin map (``KVM_IRQCHIP_NUM_PINS``).
KVM_IRQCHIP_NUM_PINS = KVM_IOAPIC_NUM_PINS
#: the pin count of each irqchip, as routing entries name them.
IRQCHIP_PINS = {KVM_IRQCHIP_PIC_MASTER: PIC_PINS_PER_CHIP,
                KVM_IRQCHIP_PIC_SLAVE: PIC_PINS_PER_CHIP,
                KVM_IRQCHIP_IOAPIC: KVM_IOAPIC_NUM_PINS}
IRQCHIP_NAMES = {KVM_IRQCHIP_PIC_MASTER: "PIC master", KVM_IRQCHIP_PIC_SLAVE: "PIC slave",
                 KVM_IRQCHIP_IOAPIC: "IOAPIC"}

#: Xen event channel limits (2-level ABI): 32-bit guests, and guests in 64-bit ("long") mode.
XEN_COMPAT_EVTCHN_2L_NR_CHANNELS = 1024
XEN_EVTCHN_2L_NR_CHANNELS = 4096

X2APIC_API_VALID_FLAGS = (uapi.KVM_X2APIC_API_USE_32BIT_IDS
                          | uapi.KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK)

# MSI address (low 32 bits) layout.
MSI_ADDR_BASE = 0xFEE00000
MSI_ADDR_DEST_MODE_LOGICAL = 1 << 2
MSI_ADDR_REDIRECTION_HINT = 1 << 3
MSI_ADDR_EXT_DEST_SHIFT = 5          # bits 11:5, the "virt_destid_8_14" field KVM ignores
MSI_ADDR_DEST_SHIFT = 12             # bits 19:12, destination id 7:0
# MSI data layout.
MSI_DATA_VECTOR_MASK = 0xFF
MSI_DATA_DELIVERY_SHIFT = 8          # bits 10:8
MSI_DATA_LEVEL_ASSERT = 1 << 14
MSI_DATA_TRIGGER_LEVEL = 1 << 15

# Delivery modes, as the 3-bit field of MSI data / IOAPIC redirection entries.
DM_FIXED = 0
DM_LOWEST = 1
DM_SMI = 2
DM_NMI = 4
DM_INIT = 5
DM_EXTINT = 7


class MsiMessage(NamedTuple):
    """A decoded x86 MSI.

    ``delivery_mode`` is the raw 3-bit field (``DM_*``; KVM's ``APIC_DM_*`` are these << 8).
    ``level_assert`` is decoded for completeness; KVM ignores it and always delivers with level 1.
    """

    dest_id: int
    dest_logical: bool
    delivery_mode: int
    level_trigger: bool
    level_assert: bool
    vector: int
    redirection_hint: bool


def decode_msi(address_lo, address_hi, data, *, x2apic_format=False):
    """Decode an MSI address/data pair as KVM's ``kvm_set_msi_irq`` does.  O(1).

    >>> decode_msi(0xFEE01000, 0, 0x4041).dest_id, decode_msi(0xFEE01000, 0, 0x4041).vector
    (1, 65)
    >>> decode_msi(0xFEE01000, 0x200, 0x41, x2apic_format=True).dest_id
    513
    """
    dest = (address_lo >> MSI_ADDR_DEST_SHIFT) & 0xFF
    if x2apic_format:
        dest |= (address_hi >> 8) << 8
    return MsiMessage(
        dest_id=dest,
        dest_logical=bool(address_lo & MSI_ADDR_DEST_MODE_LOGICAL),
        delivery_mode=(data >> MSI_DATA_DELIVERY_SHIFT) & 0x7,
        level_trigger=bool(data & MSI_DATA_TRIGGER_LEVEL),
        level_assert=bool(data & MSI_DATA_LEVEL_ASSERT),
        vector=data & MSI_DATA_VECTOR_MASK,
        redirection_hint=bool(address_lo & MSI_ADDR_REDIRECTION_HINT),
    )


def msi_address(dest_id, logical=False, redirection_hint=False, *, x2apic_format=False):
    """``(address_lo, address_hi)`` of an MSI to ``dest_id``.

    Destinations above 0xFF need ``x2apic_format`` (they go in ``address_hi`` bits 31:8);
    ValueError otherwise.

    >>> [hex(x) for x in msi_address(1)]
    ['0xfee01000', '0x0']
    """
    if not isinstance(dest_id, int) or not 0 <= dest_id <= 0xFFFF_FFFF:
        raise ValueError(f"dest_id {dest_id!r} is not a u32")
    if dest_id > 0xFF and not x2apic_format:
        raise ValueError(f"dest_id {dest_id:#x} needs x2apic_format (xAPIC MSIs carry 8 bits)")
    lo = MSI_ADDR_BASE | ((dest_id & 0xFF) << MSI_ADDR_DEST_SHIFT)
    if logical:
        lo |= MSI_ADDR_DEST_MODE_LOGICAL
    if redirection_hint:
        lo |= MSI_ADDR_REDIRECTION_HINT
    hi = (dest_id >> 8) << 8
    return lo, hi


def msi_data(vector, delivery_mode=DM_FIXED, level_trigger=False, assert_=True):
    """MSI data for ``vector`` (0..255) with a 3-bit ``delivery_mode``.

    >>> hex(msi_data(0x41, level_trigger=True))
    '0xc041'
    """
    if not isinstance(vector, int) or not 0 <= vector <= 0xFF:
        raise ValueError(f"vector {vector!r} out of range 0..255")
    if not isinstance(delivery_mode, int) or not 0 <= delivery_mode <= 7:
        raise ValueError(f"delivery_mode {delivery_mode!r} out of range 0..7")
    data = vector | (delivery_mode << MSI_DATA_DELIVERY_SHIFT)
    if level_trigger:
        data |= MSI_DATA_TRIGGER_LEVEL
    if assert_:
        data |= MSI_DATA_LEVEL_ASSERT
    return data


def _einval(message):
    return InvalidRouting(_errno.EINVAL, message)


class X86Arch:
    """The x86 routing rules of one VM.

    ``x2apic_format``: ``KVM_X2APIC_API_USE_32BIT_IDS`` is enabled (sticky: KVM never turns it
    off again; see :meth:`enable_x2apic_api`).  ``split_irqchip``: the VM uses
    ``KVM_CAP_SPLIT_IRQCHIP`` (no in-kernel PIC/IOAPIC).  ``hyperv``/``xen``: whether the modelled
    kernel has Hyper-V / Xen support; ``xen_long_mode``: the Xen guest is 64-bit (more ports).
    """

    name = "x86"

    def __init__(self, *, x2apic_format=False, split_irqchip=False, hyperv=False, xen=False,
                 xen_long_mode=False):
        self.x2apic_format = bool(x2apic_format)
        self.x2apic_broadcast_quirk_disabled = False
        self.split_irqchip = bool(split_irqchip)
        self.hyperv = bool(hyperv)
        self.xen = bool(xen)
        self.xen_long_mode = bool(xen_long_mode)

    def __repr__(self):
        return (f"X86Arch(x2apic_format={self.x2apic_format}, split_irqchip={self.split_irqchip}, "
                f"hyperv={self.hyperv}, xen={self.xen})")

    def enable_x2apic_api(self, flags):
        """``KVM_ENABLE_CAP(KVM_CAP_X2APIC_API, flags)``: EINVAL for unknown flag bits.

        Observed: allowed before and after ``KVM_CREATE_IRQCHIP`` and after vCPUs exist, and
        one-way: enabling again with 0 leaves 32-bit ids on.
        """
        if flags & ~X2APIC_API_VALID_FLAGS:
            raise _einval(f"KVM_CAP_X2APIC_API flags {flags:#x} has unknown bits")
        if flags & uapi.KVM_X2APIC_API_USE_32BIT_IDS:
            self.x2apic_format = True
        if flags & uapi.KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK:
            self.x2apic_broadcast_quirk_disabled = True

    def validate_entry(self, entry, *, x2apic_format=None):
        """Raise InvalidRouting(EINVAL) if KVM's x86 ``kvm_set_routing_entry`` refuses ``entry``.

        ``x2apic_format`` overrides the VM's setting for this call.  O(1).
        """
        if x2apic_format is None:
            x2apic_format = self.x2apic_format
        if isinstance(entry, IrqchipEntry):
            if self.split_irqchip:
                raise _einval("irqchip entries are not allowed with a split irqchip")
            npins = IRQCHIP_PINS.get(entry.irqchip)
            if npins is None:
                raise _einval(f"unknown irqchip {entry.irqchip} (x86 has 0=PIC master, "
                              "1=PIC slave, 2=IOAPIC)")
            if entry.pin >= npins:
                raise _einval(f"{IRQCHIP_NAMES[entry.irqchip]} pin {entry.pin} out of range "
                              f"0..{npins - 1}")
        elif isinstance(entry, MsiEntry):
            if x2apic_format and entry.address_hi & 0xFF:
                raise _einval(f"MSI address_hi {entry.address_hi:#x}: bits 7:0 must be 0 with "
                              "KVM_X2APIC_API_USE_32BIT_IDS")
        elif isinstance(entry, HvSintEntry):
            if not self.hyperv:
                raise _einval("Hyper-V SINT routing is not supported by this kernel")
        elif isinstance(entry, XenEvtchnEntry):
            if not self.xen:
                raise _einval("Xen event channel routing is not supported by this kernel")
            limit = (XEN_EVTCHN_2L_NR_CHANNELS if self.xen_long_mode
                     else XEN_COMPAT_EVTCHN_2L_NR_CHANNELS)
            if entry.port >= limit:
                raise _einval(f"Xen event channel port {entry.port} out of range 0..{limit - 1}")
            if entry.priority != XEN_EVTCHN_PRIO_2LEVEL:
                raise _einval(f"Xen event channel priority {entry.priority:#x}: only 2-level "
                              f"({XEN_EVTCHN_PRIO_2LEVEL:#x}) is supported")
        else:
            raise _einval(f"routing entry type {getattr(entry, 'type', '?')} "
                          "is not supported on x86")

    def irqchip_map_key(self, entry):
        """The ``(irqchip, pin)`` under which KVM's chip/pin map stores an irqchip entry.

        KVM stores a PIC slave pin p as p + 8, the absolute i8259 irq.
        """
        if entry.irqchip == KVM_IRQCHIP_PIC_SLAVE:
            return entry.irqchip, entry.pin + PIC_PINS_PER_CHIP
        return entry.irqchip, entry.pin

    def default_routing_pairs(self):
        """``(gsi, entry)`` pairs of the table ``KVM_CREATE_IRQCHIP`` installs, in KVM's order.

        A split irqchip gets an empty table.
        """
        if self.split_irqchip:
            return []
        pairs = []
        for gsi in range(KVM_IOAPIC_NUM_PINS):
            pairs.append((gsi, IrqchipEntry(KVM_IRQCHIP_IOAPIC, gsi)))
            if gsi < PIC_NUM_PINS:
                chip = KVM_IRQCHIP_PIC_MASTER if gsi < PIC_PINS_PER_CHIP else KVM_IRQCHIP_PIC_SLAVE
                pairs.append((gsi, IrqchipEntry(chip, gsi % PIC_PINS_PER_CHIP)))
        return pairs

    def decode_msi(self, address_lo, address_hi, data, *, x2apic_format=None):
        """:func:`decode_msi` with this VM's ``x2apic_format`` unless overridden."""
        if x2apic_format is None:
            x2apic_format = self.x2apic_format
        return decode_msi(address_lo, address_hi, data, x2apic_format=x2apic_format)
