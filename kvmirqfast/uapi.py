"""KVM's userspace ABI, as far as kvmirqfast speaks it: ioctl numbers and struct layouts.

Every number and layout here is the one in ``<linux/kvm.h>`` / ``<asm/kvm.h>`` (x86-64), so a
``vm.ioctl(request, arg)`` call is byte-for-byte the ``fcntl.ioctl`` call a VMM makes on a real VM
fd.  The one addition is ``KVM_IRQFD_DIRECT`` (see the bottom of this file).

Structs are described with :mod:`struct` formats; ``pack_*``/``unpack_*`` helpers turn them into
plain Python values.  Nothing here validates semantics: that is the job of ``routing`` and
``arch``.
"""

import struct

# --- ioctl number encoding (asm-generic/ioctl.h) -------------------------------------------------
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction, typ, nr, size):
    return (direction << 30) | (size << 16) | (typ << 8) | nr


def _IO(typ, nr):
    return _IOC(_IOC_NONE, typ, nr, 0)


def _IOW(typ, nr, size):
    return _IOC(_IOC_WRITE, typ, nr, size)


def _IOR(typ, nr, size):
    return _IOC(_IOC_READ, typ, nr, size)


def _IOWR(typ, nr, size):
    return _IOC(_IOC_READ | _IOC_WRITE, typ, nr, size)


def ioc_size(request):
    """The argument size encoded in an ioctl request number."""
    return (request >> 16) & 0x3FFF


KVMIO = 0xAE

# --- struct layouts (little-endian x86-64, no implicit padding) ----------------------------------
#: struct kvm_irq_routing_entry: gsi, type, flags, pad, then a 32-byte union.
ROUTING_ENTRY = struct.Struct("<IIII32s")
#: the irqchip and msi members of that union.
ROUTING_IRQCHIP = struct.Struct("<II24x")          # irqchip, pin
ROUTING_MSI = struct.Struct("<IIII16x")            # address_lo, address_hi, data, devid
#: struct kvm_irq_routing header: nr, flags; entries follow.
ROUTING_HEADER = struct.Struct("<II")
#: struct kvm_irqfd: fd, gsi, flags, resamplefd, pad[16].
IRQFD = struct.Struct("<IIII16x")
#: struct kvm_msi: address_lo, address_hi, data, flags, devid, pad[12].
MSI = struct.Struct("<IIIII12x")
#: struct kvm_irq_level: irq (or status on return), level.
IRQ_LEVEL = struct.Struct("<iI")
#: struct kvm_irqchip: chip_id, pad, then a 512-byte union (kvm_pic_state / kvm_ioapic_state).
IRQCHIP = struct.Struct("<II512s")
#: struct kvm_lapic_state: 1 KiB of APIC registers, each 32-bit register on a 16-byte stride.
LAPIC_STATE_SIZE = 1024
#: struct kvm_enable_cap: cap, flags, args[4], pad[64].
ENABLE_CAP = struct.Struct("<II4Q64x")
#: struct kvm_mp_state.
MP_STATE = struct.Struct("<I")

# --- system and VM ioctls ------------------------------------------------------------------------
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, IRQ_LEVEL.size)
KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, IRQCHIP.size)
KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, IRQCHIP.size)
KVM_IRQ_LINE_STATUS = _IOWR(KVMIO, 0x67, IRQ_LEVEL.size)
KVM_SET_GSI_ROUTING = _IOW(KVMIO, 0x6A, ROUTING_HEADER.size)
KVM_IRQFD = _IOW(KVMIO, 0x76, IRQFD.size)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, ENABLE_CAP.size)
KVM_SIGNAL_MSI = _IOW(KVMIO, 0xA5, MSI.size)

# --- vCPU ioctls ---------------------------------------------------------------------------------
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, LAPIC_STATE_SIZE)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, LAPIC_STATE_SIZE)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, MP_STATE.size)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, MP_STATE.size)

# --- capabilities (KVM_CHECK_EXTENSION) ----------------------------------------------------------
KVM_CAP_IRQCHIP = 0
KVM_CAP_NR_VCPUS = 9
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQ_INJECT_STATUS = 26
KVM_CAP_IRQFD = 32
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_IRQFD_RESAMPLE = 82
KVM_CAP_SPLIT_IRQCHIP = 121
KVM_CAP_MAX_VCPU_ID = 128
KVM_CAP_X2APIC_API = 129
KVM_CAP_MSI_DEVID = 131

# --- routing ---------------------------------------------------------------------------------------
KVM_MAX_IRQ_ROUTES = 4096
KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQ_ROUTING_S390_ADAPTER = 3
KVM_IRQ_ROUTING_HV_SINT = 4
KVM_IRQ_ROUTING_XEN_EVTCHN = 5
KVM_MSI_VALID_DEVID = 1 << 0

KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_IOAPIC_NUM_PINS = 24
PIC_NUM_PINS = 16

# --- irqfd -----------------------------------------------------------------------------------------
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1

# --- x2APIC API (KVM_ENABLE_CAP(KVM_CAP_X2APIC_API)) ---------------------------------------------
KVM_X2APIC_API_USE_32BIT_IDS = 1 << 0
KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK = 1 << 1

# --- vCPU state ------------------------------------------------------------------------------------
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1

# LAPIC register offsets inside struct kvm_lapic_state.
APIC_ID = 0x20
APIC_LVR = 0x30
APIC_TASKPRI = 0x80
APIC_EOI = 0xB0
APIC_LDR = 0xD0
APIC_DFR = 0xE0
APIC_SPIV = 0xF0
APIC_ISR = 0x100
APIC_TMR = 0x180
APIC_IRR = 0x200
APIC_SPIV_APIC_ENABLED = 1 << 8

# ==================================================================================================
# KVM_IRQFD_DIRECT: the proposal.
#
#   struct kvm_irqfd_direct {
#           __u32 fd;          /* the eventfd */
#           __u32 flags;       /* KVM_IRQFD_FLAG_DEASSIGN | _RESAMPLE | KVM_IRQFD_DIRECT_FLAG_MODIFY */
#           __u32 resamplefd;  /* with KVM_IRQFD_FLAG_RESAMPLE */
#           __u32 pad;         /* must be zero */
#           struct kvm_irq_routing_entry entry;   /* embedded route; entry.gsi must be zero */
#   };                         /* 64 bytes */
#
# Assign (flags 0 or RESAMPLE) binds the eventfd to the embedded entry, validated with the same
# per-arch rules as a KVM_SET_GSI_ROUTING entry; no GSI is consumed.  DEASSIGN and MODIFY name the
# irqfd by its eventfd alone (the entry is ignored for DEASSIGN; MODIFY replaces it atomically).
# The request number uses nr 0xf7, which no KVM ioctl uses (KVM stops at 0xe3 in 6.18 headers).
# ==================================================================================================
IRQFD_DIRECT = struct.Struct("<IIII48s")
KVM_IRQFD_DIRECT = _IOW(KVMIO, 0xF7, IRQFD_DIRECT.size)
KVM_IRQFD_DIRECT_FLAG_MODIFY = 1 << 2
#: KVM_CHECK_EXTENSION(KVM_CAP_IRQFD_DIRECT) > 0 where KVM_IRQFD_DIRECT exists; far above KVM's caps.
KVM_CAP_IRQFD_DIRECT = 0x10000


# --- pack / unpack helpers ------------------------------------------------------------------------
def pack_routing_entry(gsi, type_, flags=0, u=b""):
    """Pack one ``struct kvm_irq_routing_entry``; ``u`` is the raw union (padded to 32 bytes)."""
    return ROUTING_ENTRY.pack(gsi, type_, flags, 0, bytes(u))


def pack_irqchip_entry(gsi, irqchip, pin):
    return pack_routing_entry(gsi, KVM_IRQ_ROUTING_IRQCHIP, 0, ROUTING_IRQCHIP.pack(irqchip, pin))


def pack_msi_entry(gsi, address_lo, address_hi, data, flags=0, devid=0):
    return pack_routing_entry(gsi, KVM_IRQ_ROUTING_MSI, flags,
                              ROUTING_MSI.pack(address_lo, address_hi, data, devid))


def pack_routing(entries, flags=0):
    """A ``struct kvm_irq_routing`` as a ``bytearray`` (``fcntl.ioctl`` copies only 1 KiB of bytes)."""
    entries = list(entries)
    buf = bytearray(ROUTING_HEADER.pack(len(entries), flags))
    for e in entries:
        buf += e
    return buf


def pack_irqfd(fd, gsi, flags=0, resamplefd=0):
    return IRQFD.pack(fd, gsi, flags, resamplefd)


def pack_irqfd_direct(fd, entry, flags=0, resamplefd=0):
    """Pack ``struct kvm_irqfd_direct``; ``entry`` is a packed routing entry (48 bytes)."""
    return IRQFD_DIRECT.pack(fd, flags, resamplefd, 0, bytes(entry))


def pack_msi(address_lo, address_hi, data, flags=0, devid=0):
    return MSI.pack(address_lo, address_hi, data, flags, devid)


def pack_irq_level(irq, level):
    return IRQ_LEVEL.pack(irq, level)


def lapic_reg(state, offset):
    """Read the 32-bit LAPIC register at ``offset`` from a kvm_lapic_state buffer."""
    return struct.unpack_from("<I", state, offset)[0]


def set_lapic_reg(state, offset, value):
    struct.pack_into("<I", state, offset, value & 0xFFFFFFFF)


def lapic_vectors(state, base):
    """The set bits of the 256-bit register array at ``base`` (IRR, ISR or TMR) as vectors."""
    out = []
    for word in range(8):
        bits = lapic_reg(state, base + 0x10 * word)
        while bits:
            low = bits & -bits
            out.append(word * 32 + low.bit_length() - 1)
            bits ^= low
    return out
