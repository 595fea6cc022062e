"""GSI routing: the entry types of ``KVM_SET_GSI_ROUTING`` and the table KVM builds from them.

A routing table maps a GSI (0..4095) to one or more routing entries.  KVM replaces the whole table
on every ``KVM_SET_GSI_ROUTING``; so do we: a :class:`GsiRoutingTable` is immutable, and
:meth:`GsiRoutingTable.build` / :meth:`GsiRoutingTable.from_uapi` either return a complete new
table or raise :class:`InvalidRouting` with the errno real KVM returns, leaving every existing
table untouched.

Order of checks (``kvm_vm_ioctl`` then ``kvm_set_irq_routing``), mirrored by ``from_uapi``:

1. the 8-byte header cannot be read                               -> EFAULT
2. (x86: no in-kernel irqchip yet                                 -> EINVAL; the VM checks this)
3. ``nr > KVM_MAX_IRQ_ROUTES`` (4096)                              -> EINVAL
4. header ``flags != 0``                                          -> EINVAL
5. the ``nr`` entries cannot be read                              -> EFAULT
6. any entry's ``gsi >= 4096`` (a pre-pass over *all* entries)     -> EINVAL
7. then entry by entry, in order:
   a. entry flags: MSI may carry only ``KVM_MSI_VALID_DEVID``, other types none -> EINVAL
   b. sharing: a GSI may hold several irqchip entries only on different irqchips,
      and a non-irqchip entry only alone                          -> EINVAL
   c. the per-architecture rules (``kvm_set_routing_entry``)      -> EINVAL

Facts observed on real KVM (x86-64, Linux 6.18, checked by ``tests/test_routing_vs_kvm.py``):

- ``KVM_SET_GSI_ROUTING`` before ``KVM_CREATE_IRQCHIP``: EINVAL (even for ``nr == 0``), checked
  after the header is read (a header that cannot be read gives EFAULT first) and before ``nr``
  and ``flags``.
- ``nr == 0`` is accepted and installs an empty table.
- A buffer that ends inside the header or inside the entries: EFAULT (header checks come first).
- The entry ``pad`` field and the unused tail of the union are ignored.
- MSI with ``KVM_MSI_VALID_DEVID`` is accepted on x86 (the devid is ignored); any other MSI flag,
  and any flag on a non-MSI entry: EINVAL.
- ``KVM_IRQ_ROUTING_HV_SINT`` and ``KVM_IRQ_ROUTING_XEN_EVTCHN``: EINVAL on this host kernel
  (built without ``CONFIG_KVM_HYPERV``/``CONFIG_KVM_XEN``: ``KVM_CAP_HYPERV_SYNIC`` and
  ``KVM_CAP_XEN_HVM`` report 0); ``X86Arch`` rejects them by default and validates them as the
  kernel source does when constructed with ``hyperv=True`` / ``xen=True``.
- Types 0, 3 (s390 adapter), 6 and up: EINVAL.
- With ``KVM_CAP_SPLIT_IRQCHIP`` every irqchip entry is EINVAL; MSI entries are fine.
- After ``KVM_ENABLE_CAP(KVM_CAP_X2APIC_API, KVM_X2APIC_API_USE_32BIT_IDS)`` an MSI entry with
  ``address_hi & 0xff`` set is EINVAL; the setting cannot be turned off again.
- The table ``KVM_CREATE_IRQCHIP`` installs, observed through ``KVM_IRQ_LINE`` and the chips' IRR,
  is :func:`default_routing`: GSI 0..15 reach the PIC (master, or slave pin g-8) and IOAPIC pin
  g, GSI 16..23 the IOAPIC only, nothing else.

Divergences from KVM (deliberate, none visible as an errno):

- :func:`entry_from_uapi` (one entry, no table) rejects an unknown type by itself, where KVM would
  first run the sharing check; ``from_uapi`` keeps KVM's order.  Every step gives EINVAL anyway,
  so only the message can differ.
- ``ENOMEM`` is never raised.
- ``nr_rt_entries`` of an empty table is 0 here; KVM allocates one (empty) slot.
- The in-kernel-irqchip check (step 2) belongs to the VM, not to this module.
"""

import errno as _errno
import struct
from dataclasses import dataclass
from typing import ClassVar, Optional

from . import uapi

__all__ = [
    "InvalidRouting",
    "IrqchipEntry",
    "MsiEntry",
    "HvSintEntry",
    "XenEvtchnEntry",
    "ENTRY_TYPES",
    "entry_from_uapi",
    "GsiRoutingTable",
    "default_routing",
]

_U32_MAX = 0xFFFF_FFFF
ENTRY_SIZE = uapi.ROUTING_ENTRY.size            # 48
HEADER_SIZE = uapi.ROUTING_HEADER.size          # 8


class InvalidRouting(ValueError):
    """A routing entry or table real KVM would refuse.

    ``errno`` is the errno KVM returns for that input (almost always ``errno.EINVAL``; ``EFAULT``
    for a buffer too short for its header or its ``nr`` entries).  ``str()`` is a readable message
    naming the offending field.
    """

    def __init__(self, errno, message):
        super().__init__(errno, message)
        self.errno = errno
        self.message = message

    def __str__(self):
        return self.message

    def __repr__(self):
        return f"InvalidRouting({_errno.errorcode.get(self.errno, self.errno)}, {self.message!r})"


def _einval(message):
    return InvalidRouting(_errno.EINVAL, message)


def _check_u32(owner, name, value):
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{owner}.{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= _U32_MAX:
        raise ValueError(f"{owner}.{name}={value} out of u32 range")


# --- entry value types ----------------------------------------------------------------------------
@dataclass(frozen=True)
class IrqchipEntry:
    """``KVM_IRQ_ROUTING_IRQCHIP``: a pin of an in-kernel interrupt controller.

    x86: irqchip 0 = PIC master, 1 = PIC slave (pins 0..7 each), 2 = IOAPIC (pins 0..23).
    arm64: irqchip 0 = the vGIC distributor, pin = SPI number (INTID - 32).
    Range checks are the architecture's (``arch.validate_entry``); here only u32-ness.
    """

    irqchip: int
    pin: int
    type: ClassVar[int] = uapi.KVM_IRQ_ROUTING_IRQCHIP

    def __post_init__(self):
        _check_u32("IrqchipEntry", "irqchip", self.irqchip)
        _check_u32("IrqchipEntry", "pin", self.pin)

    @property
    def flags(self):
        return 0

    def to_uapi(self, gsi):
        """The 48-byte ``struct kvm_irq_routing_entry`` for this entry at ``gsi``."""
        return uapi.pack_irqchip_entry(gsi, self.irqchip, self.pin)


@dataclass(frozen=True)
class MsiEntry:
    """``KVM_IRQ_ROUTING_MSI``: an MSI address/data pair, optionally with a device id.

    ``devid`` not None means the entry carries ``KVM_MSI_VALID_DEVID`` (needed by the arm64 ITS;
    accepted and ignored on x86).
    """

    address_lo: int
    address_hi: int = 0
    data: int = 0
    devid: Optional[int] = None
    type: ClassVar[int] = uapi.KVM_IRQ_ROUTING_MSI

    def __post_init__(self):
        _check_u32("MsiEntry", "address_lo", self.address_lo)
        _check_u32("MsiEntry", "address_hi", self.address_hi)
        _check_u32("MsiEntry", "data", self.data)
        if self.devid is not None:
            _check_u32("MsiEntry", "devid", self.devid)

    @property
    def flags(self):
        return 0 if self.devid is None else uapi.KVM_MSI_VALID_DEVID

    @property
    def address(self):
        """The 64-bit MSI address."""
        return (self.address_hi << 32) | self.address_lo

    def to_uapi(self, gsi):
        return uapi.pack_msi_entry(gsi, self.address_lo, self.address_hi, self.data,
                                   self.flags, self.devid or 0)


@dataclass(frozen=True)
class HvSintEntry:
    """``KVM_IRQ_ROUTING_HV_SINT``: a Hyper-V synthetic interrupt (vCPU id, SINT index).

    KVM does not range-check either field when the route is installed (only when it fires).
    """

    vcpu: int
    sint: int
    type: ClassVar[int] = uapi.KVM_IRQ_ROUTING_HV_SINT

    def __post_init__(self):
        _check_u32("HvSintEntry", "vcpu", self.vcpu)
        _check_u32("HvSintEntry", "sint", self.sint)

    @property
    def flags(self):
        return 0

    def to_uapi(self, gsi):
        return uapi.pack_routing_entry(gsi, self.type, 0, struct.pack("<II", self.vcpu, self.sint))


#: ``KVM_IRQ_ROUTING_XEN_EVTCHN_PRIO_2LEVEL``: the only priority KVM supports.
XEN_EVTCHN_PRIO_2LEVEL = 0xFFFF_FFFF


@dataclass(frozen=True)
class XenEvtchnEntry:
    """``KVM_IRQ_ROUTING_XEN_EVTCHN``: a Xen event channel port delivered to a vCPU."""

    port: int
    vcpu: int = 0
    priority: int = XEN_EVTCHN_PRIO_2LEVEL
    type: ClassVar[int] = uapi.KVM_IRQ_ROUTING_XEN_EVTCHN

    def __post_init__(self):
        _check_u32("XenEvtchnEntry", "port", self.port)
        _check_u32("XenEvtchnEntry", "vcpu", self.vcpu)
        _check_u32("XenEvtchnEntry", "priority", self.priority)

    @property
    def flags(self):
        return 0

    def to_uapi(self, gsi):
        return uapi.pack_routing_entry(gsi, self.type, 0,
                                       struct.pack("<III", self.port, self.vcpu, self.priority))


#: routing type number -> entry class, for every type this model can represent.
ENTRY_TYPES = {cls.type: cls for cls in (IrqchipEntry, MsiEntry, HvSintEntry, XenEvtchnEntry)}
_ENTRY_CLASSES = tuple(ENTRY_TYPES.values())

_TYPE_NAMES = {
    uapi.KVM_IRQ_ROUTING_IRQCHIP: "irqchip",
    uapi.KVM_IRQ_ROUTING_MSI: "MSI",
    uapi.KVM_IRQ_ROUTING_S390_ADAPTER: "s390 adapter",
    uapi.KVM_IRQ_ROUTING_HV_SINT: "Hyper-V SINT",
    uapi.KVM_IRQ_ROUTING_XEN_EVTCHN: "Xen event channel",
}


def _type_name(type_):
    return _TYPE_NAMES.get(type_, f"unknown type {type_}")


def _check_entry_flags(type_, flags):
    """Step 7a: the generic flags rule of ``kvm_set_irq_routing``."""
    if type_ == uapi.KVM_IRQ_ROUTING_MSI:
        if flags & ~uapi.KVM_MSI_VALID_DEVID:
            raise _einval(f"MSI entry flags {flags:#x}: only KVM_MSI_VALID_DEVID (0x1) is allowed")
    elif flags:
        raise _einval(f"{_type_name(type_)} entry flags {flags:#x} must be 0")


def entry_from_uapi(buf):
    """Parse one 48-byte ``struct kvm_irq_routing_entry`` into ``(gsi, entry)``.

    Checks, in KVM's order: the entry flags (MSI may carry only ``KVM_MSI_VALID_DEVID``, other
    types none), then the type (unknown types, including s390 adapter, are refused).  Range checks
    of the fields are the architecture's.  ``pad`` and unused union bytes are ignored, as in KVM;
    an MSI ``devid`` without ``KVM_MSI_VALID_DEVID`` is dropped.

    Raises InvalidRouting(EINVAL) for a bad entry, ValueError if ``buf`` is not 48 bytes.  O(1).

    >>> entry_from_uapi(IrqchipEntry(2, 5).to_uapi(7))
    (7, IrqchipEntry(irqchip=2, pin=5))
    """
    if len(buf) != ENTRY_SIZE:
        raise ValueError(f"a routing entry is {ENTRY_SIZE} bytes, got {len(buf)}")
    gsi, type_, flags, _pad, u = uapi.ROUTING_ENTRY.unpack(bytes(buf))
    _check_entry_flags(type_, flags)
    return gsi, _entry_from_union(type_, flags, u)


def _entry_from_union(type_, flags, u):
    """The entry value for a (flags-checked) type and its 32-byte union; EINVAL if unknown."""
    if type_ == uapi.KVM_IRQ_ROUTING_IRQCHIP:
        irqchip, pin = uapi.ROUTING_IRQCHIP.unpack(u)
        return IrqchipEntry(irqchip, pin)
    if type_ == uapi.KVM_IRQ_ROUTING_MSI:
        lo, hi, data, devid = uapi.ROUTING_MSI.unpack(u)
        return MsiEntry(lo, hi, data, devid if flags & uapi.KVM_MSI_VALID_DEVID else None)
    if type_ == uapi.KVM_IRQ_ROUTING_HV_SINT:
        return HvSintEntry(*struct.unpack_from("<II", u))
    if type_ == uapi.KVM_IRQ_ROUTING_XEN_EVTCHN:
        return XenEvtchnEntry(*struct.unpack_from("<III", u))
    raise _einval(f"routing entry type {type_} is not supported")


# --- the table ------------------------------------------------------------------------------------
class GsiRoutingTable:
    """An immutable GSI routing table, as installed by ``KVM_SET_GSI_ROUTING``.

    Build one with :meth:`build` (from ``(gsi, entry)`` pairs) or :meth:`from_uapi` (from a
    ``struct kvm_irq_routing`` buffer); ``GsiRoutingTable()`` is the empty table.  Lookups are O(1).

    >>> from kvmirqfast.arch.x86 import X86Arch
    >>> t = GsiRoutingTable.build([(5, IrqchipEntry(2, 5)), (5, IrqchipEntry(0, 5))], X86Arch())
    >>> len(t), t.nr_rt_entries, t.irqchip_gsi(2, 5)
    (2, 6, 5)
    """

    __slots__ = ("_entries", "_by_gsi", "_chip_map", "_nr_rt_entries", "_arch_name")

    def __init__(self):
        self._init((), {}, {}, "")

    def _init(self, entries, by_gsi, chip_map, arch_name):
        setter = object.__setattr__
        setter(self, "_entries", entries)
        setter(self, "_by_gsi", by_gsi)
        setter(self, "_chip_map", chip_map)
        setter(self, "_nr_rt_entries", (max(by_gsi) + 1) if by_gsi else 0)
        setter(self, "_arch_name", arch_name)

    def __setattr__(self, name, value):
        raise AttributeError("GsiRoutingTable is immutable; build a new one")

    def __delattr__(self, name):
        raise AttributeError("GsiRoutingTable is immutable; build a new one")

    # -- construction --
    @classmethod
    def build(cls, pairs, arch):
        """Validate ``(gsi, entry)`` pairs as KVM would and return the new table.

        Checks: at most 4096 entries; every gsi < 4096 (all gsis first, as KVM does); then per
        entry in order the sharing rule and ``arch.validate_entry(entry)``.  Raises InvalidRouting
        (with KVM's errno; the message names the entry index and gsi), TypeError for a gsi that is
        not an int or an entry that is not a routing entry type.  Nothing existing is modified.
        O(n).
        """
        pairs = list(pairs)
        for gsi, entry in pairs:
            if not isinstance(gsi, int) or isinstance(gsi, bool):
                raise TypeError(f"gsi must be an int, not {type(gsi).__name__}")
            if not isinstance(entry, _ENTRY_CLASSES):
                raise TypeError(f"not a routing entry: {entry!r}")
        if len(pairs) > uapi.KVM_MAX_IRQ_ROUTES:
            raise _einval(f"{len(pairs)} routing entries, "
                          f"at most {uapi.KVM_MAX_IRQ_ROUTES} allowed")
        cls._check_gsis(pairs)
        return cls._assemble(pairs, arch)

    @classmethod
    def from_uapi(cls, buf, arch):
        """Parse and validate a whole ``struct kvm_irq_routing`` (header + ``nr`` entries).

        ``buf`` plays the user's memory: if it ends before the header or before the ``nr``-th
        entry, that is EFAULT, as ``copy_from_user`` gives.  Bytes after the last entry are
        ignored.  Checks follow KVM's order (module docstring); the in-kernel-irqchip check is the
        caller's.  Raises InvalidRouting.  O(len(buf)).
        """
        buf = memoryview(buf).cast("B")
        if len(buf) < HEADER_SIZE:
            raise InvalidRouting(_errno.EFAULT,
                                 f"routing header needs {HEADER_SIZE} bytes, buffer has {len(buf)}")
        nr, flags = uapi.ROUTING_HEADER.unpack_from(buf, 0)
        if nr > uapi.KVM_MAX_IRQ_ROUTES:
            raise _einval(f"nr={nr} routing entries, at most {uapi.KVM_MAX_IRQ_ROUTES} allowed")
        if flags:
            raise _einval(f"routing header flags {flags:#x} must be 0")
        need = HEADER_SIZE + nr * ENTRY_SIZE
        if len(buf) < need:
            raise InvalidRouting(_errno.EFAULT,
                                 f"nr={nr} entries need {need} bytes, buffer has {len(buf)}")
        raw = list(uapi.ROUTING_ENTRY.iter_unpack(buf[HEADER_SIZE:need]))
        cls._check_gsis([(gsi, None) for gsi, *_rest in raw])

        # Steps 7a-7c, entry by entry.  The sharing check runs on the raw type so that it comes
        # before the type check, as in KVM.
        pairs = []
        seen = {}                          # gsi -> [(type, irqchip or None) of accepted entries]
        for i, (gsi, type_, flags, _pad, u) in enumerate(raw):
            try:
                _check_entry_flags(type_, flags)
                chip = (uapi.ROUTING_IRQCHIP.unpack(u)[0]
                        if type_ == uapi.KVM_IRQ_ROUTING_IRQCHIP else None)
                cls._check_sharing(seen.get(gsi, ()), type_, chip)
                entry = _entry_from_union(type_, flags, u)
                arch.validate_entry(entry)
            except InvalidRouting as e:
                raise InvalidRouting(e.errno, f"entry {i} (gsi {gsi}): {e}") from None
            seen.setdefault(gsi, []).append((type_, chip))
            pairs.append((gsi, entry))
        return cls._assemble(pairs, arch, check=False)

    @staticmethod
    def _check_gsis(pairs):
        for i, (gsi, _entry) in enumerate(pairs):
            if not 0 <= gsi < uapi.KVM_MAX_IRQ_ROUTES:
                raise _einval(f"entry {i}: gsi {gsi} out of range 0..{uapi.KVM_MAX_IRQ_ROUTES - 1}")

    @staticmethod
    def _check_sharing(existing, type_, chip):
        """Step 7b: ``existing`` are the (type, irqchip) of entries already at this gsi."""
        for etype, echip in existing:
            if etype != uapi.KVM_IRQ_ROUTING_IRQCHIP or type_ != uapi.KVM_IRQ_ROUTING_IRQCHIP:
                raise _einval(f"{_type_name(type_)} entry cannot share its gsi with "
                              f"{'another' if etype == type_ else 'an'} {_type_name(etype)} "
                              "entry (only irqchip entries on different irqchips may)")
            if chip == echip:
                raise _einval(f"gsi already routed to irqchip {chip}")

    @classmethod
    def _check_entry(cls, i, gsi, existing, entry, arch):
        try:
            cls._check_sharing([(e.type, getattr(e, "irqchip", None)) for e in existing],
                               entry.type, getattr(entry, "irqchip", None))
            arch.validate_entry(entry)
        except InvalidRouting as e:
            raise InvalidRouting(e.errno, f"entry {i} (gsi {gsi}): {e}") from None

    @classmethod
    def _assemble(cls, pairs, arch, check=True):
        """Per-entry checks 7b-7c (unless done already), then build the lookup structures."""
        by_gsi = {}
        chip_map = {}
        for i, (gsi, entry) in enumerate(pairs):
            existing = by_gsi.get(gsi, ())
            if check:
                cls._check_entry(i, gsi, existing, entry, arch)
            by_gsi[gsi] = existing + (entry,)
            if entry.type == uapi.KVM_IRQ_ROUTING_IRQCHIP:
                # Like KVM's chip[][] array: the last entry naming a chip pin wins.
                chip_map[arch.irqchip_map_key(entry)] = gsi
        table = cls.__new__(cls)
        table._init(tuple(pairs), by_gsi, chip_map, arch.name)
        return table

    # -- queries --
    @property
    def entries(self):
        """All ``(gsi, entry)`` pairs, in the order they were given.  O(1)."""
        return self._entries

    def entries_for(self, gsi):
        """The entries routed from ``gsi`` (a tuple, possibly empty), in table order.

        This is also the order ``kvm_set_irq`` calls them in.  O(1).
        """
        return self._by_gsi.get(gsi, ())

    def gsis(self):
        """The GSIs that have at least one entry, ascending.  O(g log g)."""
        return sorted(self._by_gsi)

    def irqchip_gsi(self, irqchip, pin):
        """The GSI KVM's ``kvm_irq_map_chip_pin(irqchip, pin)`` returns, or None for none (-1).

        The key is KVM's: on x86 a PIC slave pin p is stored as pin ``p + 8`` (the absolute PIC
        irq that the i8259 ack notifier passes), so slave pin 3 is ``irqchip_gsi(1, 11)``.  When
        several entries name one chip pin, the last one wins.  O(1).
        """
        return self._chip_map.get((irqchip, pin))

    @property
    def nr_rt_entries(self):
        """Highest gsi + 1 (0 for an empty table; KVM allocates 1 there).  O(1)."""
        return self._nr_rt_entries

    @property
    def arch_name(self):
        return self._arch_name

    def __len__(self):
        return len(self._entries)

    def __iter__(self):
        return iter(self._entries)

    def __eq__(self, other):
        if not isinstance(other, GsiRoutingTable):
            return NotImplemented
        return self._entries == other._entries and self._chip_map == other._chip_map

    def __hash__(self):
        return hash(self._entries)

    def __repr__(self):
        return f"<GsiRoutingTable {len(self)} entries, {len(self._by_gsi)} gsis>"

    def to_uapi(self):
        """The table as a ``struct kvm_irq_routing`` ``bytearray`` (header + entries).  O(n)."""
        return uapi.pack_routing(entry.to_uapi(gsi) for gsi, entry in self._entries)


def default_routing(arch):
    """The table KVM installs by itself: at ``KVM_CREATE_IRQCHIP`` on x86, at vGIC init on arm64.

    x86 (``kvm_setup_default_ioapic_and_pic_routing``): GSI g < 16 -> IOAPIC pin g, then PIC master
    pin g (g < 8) or PIC slave pin g-8; GSI 16..23 -> IOAPIC pin g only.  arm64
    (``kvm_vgic_setup_default_irq_routing``): GSI i -> vGIC SPI i for every configured SPI.
    """
    return GsiRoutingTable.build(arch.default_routing_pairs(), arch)
