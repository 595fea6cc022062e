"""arm64 routing rules (``kvm_set_routing_entry`` in ``arch/arm64/kvm/vgic/vgic-irqfd.c``).

Read from the kernel source (no arm64 host to probe):

- One irqchip, the vGIC distributor: ``KVM_NR_IRQCHIPS`` is 1, so ``irqchip`` must be 0.
- Routing-time pin check is against ``KVM_IRQCHIP_NUM_PINS`` = 1020 - 32 = 988 (every possible SPI),
  *not* against the VM's configured SPI count: a route to an SPI the vGIC does not have is
  accepted, and fails with EINVAL only when it fires (``vgic_valid_spi`` in
  ``vgic_irqfd_set_irq``).  :meth:`Arm64Arch.injection_errno` models that second check.
- The SPI count: ``KVM_DEV_ARM_VGIC_GRP_NR_IRQS`` takes a total IRQ count that is a multiple of
  32 in 64..1023, so 32..960 SPIs (INTID = pin + 32); if userspace never sets it, vGIC init
  freezes it at ``VGIC_NR_IRQS_LEGACY`` (256) - 32 = 224 SPIs.  vGIC init also installs the
  default table: GSI i -> SPI i for every SPI.
- MSI: accepted with or without ``KVM_MSI_VALID_DEVID`` (the generic flags rule already allows
  only that flag).  The ITS needs the devid, but checks it at injection (``vgic_its_inject_msi``:
  no ITS -> ENODEV, no devid -> EINVAL), not at routing time.
- Every other type (Hyper-V, Xen, s390) is EINVAL.
"""

import errno as _errno

from ..routing import InvalidRouting, IrqchipEntry, MsiEntry

KVM_NR_IRQCHIPS = 1
VGIC_NR_SGIS = 16
VGIC_NR_PPIS = 16
VGIC_NR_PRIVATE_IRQS = VGIC_NR_SGIS + VGIC_NR_PPIS       # 32: SPIs start at INTID 32
VGIC_MAX_SPI = 1019
VGIC_MAX_RESERVED = 1023
VGIC_NR_IRQS_LEGACY = 256
#: routing-time pin limit: every SPI INTID 32..1019.
KVM_IRQCHIP_NUM_PINS = VGIC_MAX_SPI + 1 - VGIC_NR_PRIVATE_IRQS      # 988
#: SPIs a vGIC gets when userspace does not configure KVM_DEV_ARM_VGIC_GRP_NR_IRQS.
DEFAULT_NR_SPIS = VGIC_NR_IRQS_LEGACY - VGIC_NR_PRIVATE_IRQS        # 224
MIN_NR_SPIS = 32
#: KVM_DEV_ARM_VGIC_GRP_NR_IRQS takes at most 1023 IRQs in multiples of 32: 992, so 960 SPIs.
MAX_NR_SPIS = VGIC_MAX_RESERVED // 32 * 32 - VGIC_NR_PRIVATE_IRQS      # 960


def _einval(message):
    return InvalidRouting(_errno.EINVAL, message)


class Arm64Arch:
    """The arm64 routing rules of one VM with a vGIC of ``nr_spis`` SPIs (and maybe an ITS)."""

    name = "arm64"

    def __init__(self, nr_spis=DEFAULT_NR_SPIS, *, has_its=True):
        if not isinstance(nr_spis, int) or isinstance(nr_spis, bool):
            raise TypeError("nr_spis must be an int")
        if not MIN_NR_SPIS <= nr_spis <= MAX_NR_SPIS or nr_spis % 32:
            raise ValueError(f"nr_spis {nr_spis}: the vGIC takes a multiple of 32 in "
                             f"{MIN_NR_SPIS}..{MAX_NR_SPIS}")
        self.nr_spis = nr_spis
        self.has_its = bool(has_its)

    @property
    def nr_irqs(self):
        """Total INTIDs below the SPI limit (SGIs + PPIs + SPIs)."""
        return self.nr_spis + VGIC_NR_PRIVATE_IRQS

    def __repr__(self):
        return f"Arm64Arch(nr_spis={self.nr_spis}, has_its={self.has_its})"

    def validate_entry(self, entry):
        """Raise InvalidRouting(EINVAL) if arm64's ``kvm_set_routing_entry`` refuses ``entry``.

        Only routing-time rules: pin < 988 whatever ``nr_spis`` is; see :meth:`injection_errno`.
        O(1).
        """
        if isinstance(entry, IrqchipEntry):
            if entry.pin >= KVM_IRQCHIP_NUM_PINS or entry.irqchip >= KVM_NR_IRQCHIPS:
                raise _einval(f"vGIC irqchip {entry.irqchip} pin {entry.pin}: irqchip must be 0 "
                              f"and pin 0..{KVM_IRQCHIP_NUM_PINS - 1}")
        elif isinstance(entry, MsiEntry):
            return
        else:
            raise _einval(f"routing entry type {getattr(entry, 'type', '?')} is not supported "
                          "on arm64")

    def injection_errno(self, entry):
        """The errno KVM returns when a (valid) route fires, or None if it can be delivered.

        irqchip pin >= nr_spis -> EINVAL; MSI without an ITS -> ENODEV; MSI without a devid
        -> EINVAL.  (Whether the ITS then finds a translation is not modelled.)  O(1).
        """
        if isinstance(entry, IrqchipEntry):
            return None if entry.pin < self.nr_spis else _errno.EINVAL
        if isinstance(entry, MsiEntry):
            if not self.has_its:
                return _errno.ENODEV
            return None if entry.devid is not None else _errno.EINVAL
        return _errno.EINVAL

    def spi_intid(self, pin):
        """The GIC INTID of irqchip pin ``pin`` (SPI number)."""
        return pin + VGIC_NR_PRIVATE_IRQS

    def irqchip_map_key(self, entry):
        return entry.irqchip, entry.pin

    def default_routing_pairs(self):
        """GSI i -> SPI i for every configured SPI, as vGIC init installs."""
        return [(i, IrqchipEntry(0, i)) for i in range(self.nr_spis)]
