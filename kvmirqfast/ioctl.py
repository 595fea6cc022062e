"""The uAPI layer: ``vm.ioctl(request, arg)`` behaves like ``fcntl.ioctl`` on a real VM fd.

Arguments follow ``fcntl.ioctl``: an int is passed as the value (for struct ioctls it is a
pointer, and we cannot follow user pointers, so it gets EFAULT as a NULL pointer would); a
``bytes`` argument of at most 1 KiB is copied and the (possibly updated) copy returned; a
mutable buffer is updated in place and the int result returned.  Buffers of at most 1 KiB are
zero-padded to 1 KiB, as fcntl's stack copy pads them (with garbage there; zeros here).  A
mutable buffer over 1 KiB is used as is: reading past its end is EFAULT.

Every error is ``OSError`` with the errno real KVM returns for the same call, and leaves the
VM unchanged.
"""

import errno
import os
import struct

from . import uapi
from .routing import GsiRoutingTable, InvalidRouting, IrqchipEntry, MsiEntry, entry_from_uapi

_IOCTL_BUFSZ = 1024


def _err(code, what=""):
    return OSError(code, f"{os.strerror(code)}{': ' + what if what else ''}")


class _Arg:
    """The user's argument as fcntl.ioctl presents it to the kernel."""

    def __init__(self, arg, mutate_flag):
        if isinstance(arg, int):
            raise _err(errno.EFAULT, "struct argument passed as an int")
        if isinstance(arg, str):
            arg = arg.encode()
        try:
            self.view = memoryview(arg).cast("B")
        except TypeError:
            raise TypeError("ioctl argument must be an int, bytes or a writable buffer, not "
                            f"{type(arg).__name__}") from None
        self.mutable = mutate_flag and not self.view.readonly
        self.n = self.view.nbytes
        if not self.mutable and self.n > _IOCTL_BUFSZ:
            raise ValueError("ioctl string arg too long")
        self.buf = bytearray(max(self.n, _IOCTL_BUFSZ))
        self.buf[:self.n] = self.view
        if self.n > _IOCTL_BUFSZ:
            del self.buf[self.n:]

    def need(self, size):
        if len(self.buf) < size:
            raise _err(errno.EFAULT, f"argument is {self.n} bytes, {size} needed")
        return self.buf

    def result(self, ret):
        if self.mutable:
            self.view[:self.n] = self.buf[:self.n]
            return ret
        return bytes(self.buf[:self.n])


def _value(arg):
    if isinstance(arg, int) and not isinstance(arg, bool):
        return arg
    raise _err(errno.EINVAL, "value ioctl takes an int argument")


def _call(fn, *args):
    try:
        return fn(*args)
    except InvalidRouting as e:
        raise _err(e.errno, str(e)) from None


# -- VM ioctls -------------------------------------------------------------------------------------
def _check_extension(vm, cap):
    from .vm import MAX_VCPUS, MAX_VCPU_ID
    x86 = vm.arch.name == "x86"
    caps = {
        uapi.KVM_CAP_IRQCHIP: 1,
        uapi.KVM_CAP_IRQ_ROUTING: uapi.KVM_MAX_IRQ_ROUTES,
        uapi.KVM_CAP_IRQ_INJECT_STATUS: 1,
        uapi.KVM_CAP_IRQFD: 1,
        uapi.KVM_CAP_SIGNAL_MSI: 1,
        uapi.KVM_CAP_IRQFD_RESAMPLE: 1,
        uapi.KVM_CAP_NR_VCPUS: min(os.cpu_count() or 1, MAX_VCPUS),
        uapi.KVM_CAP_MAX_VCPUS: MAX_VCPUS,
        uapi.KVM_CAP_MAX_VCPU_ID: MAX_VCPU_ID,
        uapi.KVM_CAP_IRQFD_DIRECT: 1,
    }
    if x86:
        from .arch.x86 import X2APIC_API_VALID_FLAGS
        caps[uapi.KVM_CAP_X2APIC_API] = X2APIC_API_VALID_FLAGS
    else:
        caps[uapi.KVM_CAP_MSI_DEVID] = 1
    return caps.get(cap, 0)


def _set_gsi_routing(vm, a):
    if not vm.has_irqchip:
        raise _err(errno.EINVAL, "no in-kernel irqchip")
    table = _call(GsiRoutingTable.from_uapi, bytes(a.buf), vm.arch)
    vm.install_gsi_routing(table)
    return 0


def _irqfd(vm, a):
    fd, gsi, flags, resamplefd = uapi.IRQFD.unpack_from(a.need(uapi.IRQFD.size))
    if flags & ~(uapi.KVM_IRQFD_FLAG_DEASSIGN | uapi.KVM_IRQFD_FLAG_RESAMPLE):
        raise _err(errno.EINVAL, f"unknown irqfd flags {flags:#x}")
    fd = _as_fd(fd)
    if flags & uapi.KVM_IRQFD_FLAG_DEASSIGN:
        vm.irqfd_deassign(fd, gsi)
        return 0
    if not vm.has_irqchip:
        raise _err(errno.EINVAL, "irqfd needs an in-kernel irqchip")
    resample = _as_fd(resamplefd) if flags & uapi.KVM_IRQFD_FLAG_RESAMPLE else None
    vm.irqfd(fd, gsi, resample)
    return 0


_DIRECT_FLAGS = (uapi.KVM_IRQFD_FLAG_DEASSIGN | uapi.KVM_IRQFD_FLAG_RESAMPLE
                 | uapi.KVM_IRQFD_DIRECT_FLAG_MODIFY)


def _irqfd_direct(vm, a):
    fd, flags, resamplefd, pad, raw = uapi.IRQFD_DIRECT.unpack_from(a.need(uapi.IRQFD_DIRECT.size))
    if flags & ~_DIRECT_FLAGS or pad:
        raise _err(errno.EINVAL, f"bad flags {flags:#x} or non-zero pad")
    deassign = flags & uapi.KVM_IRQFD_FLAG_DEASSIGN
    modify = flags & uapi.KVM_IRQFD_DIRECT_FLAG_MODIFY
    if deassign and (modify or flags & uapi.KVM_IRQFD_FLAG_RESAMPLE):
        raise _err(errno.EINVAL, "DEASSIGN takes no other flag")
    fd = _as_fd(fd)
    if deassign:
        if not vm.irqfd_direct_deassign(fd):
            raise _err(errno.ENOENT, f"eventfd {fd} has no direct irqfd")
        return 0
    gsi, entry = _call(entry_from_uapi, raw)
    if gsi != 0:
        raise _err(errno.EINVAL, "the embedded entry's gsi must be 0")
    if not isinstance(entry, (IrqchipEntry, MsiEntry)):
        raise _err(errno.EINVAL, f"{type(entry).__name__} routes cannot be direct here")
    if not vm.has_irqchip:
        raise _err(errno.EINVAL, "irqfd needs an in-kernel irqchip")
    if modify:
        if flags & uapi.KVM_IRQFD_FLAG_RESAMPLE:
            raise _err(errno.EINVAL, "MODIFY keeps the irqfd's resampler")
        _call(vm.irqfd_direct_modify, fd, entry)
        return 0
    resample = _as_fd(resamplefd) if flags & uapi.KVM_IRQFD_FLAG_RESAMPLE else None
    _call(vm.irqfd_direct, fd, entry, resample)
    return 0


def _as_fd(u32):
    # The kernel takes the fd as an int; values above INT_MAX are negative there: EBADF.
    return u32 if u32 < 0x80000000 else -1


def _signal_msi(vm, a):
    lo, hi, data, flags, devid = uapi.MSI.unpack_from(a.need(uapi.MSI.size))
    if not vm.has_irqchip or flags & ~uapi.KVM_MSI_VALID_DEVID:
        raise _err(errno.EINVAL, "no irqchip, or unknown MSI flags")
    if not vm.vcpus:
        # KVM's delivery finds no LAPIC map at all and returns -1, which reaches us as EPERM.
        raise _err(errno.EPERM, "KVM_SIGNAL_MSI with no vCPU")
    return vm.signal_msi(lo, hi, data, devid if flags else None)


def _irq_line(vm, a, status):
    irq, level = uapi.IRQ_LEVEL.unpack_from(a.need(uapi.IRQ_LEVEL.size))
    if not vm.has_irqchip:
        raise _err(errno.ENXIO, "no in-kernel irqchip")
    r = vm.irq_line(irq, level, line_status=status)
    if status:
        struct.pack_into("<i", a.buf, 0, r)
    return 0


def _irqchip_state(vm, a, set_):
    chip, _pad, union = uapi.IRQCHIP.unpack_from(a.need(uapi.IRQCHIP.size))
    if not vm.has_irqchip or vm.arch.name != "x86":
        raise _err(errno.ENXIO, "no in-kernel irqchip")
    if chip in (uapi.KVM_IRQCHIP_PIC_MASTER, uapi.KVM_IRQCHIP_PIC_SLAVE):
        if set_:
            vm.pic.set_state(chip, union)
        else:
            state = vm.pic.get_state(chip)
    elif chip == uapi.KVM_IRQCHIP_IOAPIC:
        if set_:
            vm.ioapic.set_state(union)
            vm.pic.update()                     # KVM re-checks the PIC after any chip
        else:
            state = vm.ioapic.get_state()
    else:
        raise _err(errno.EINVAL, f"unknown irqchip {chip}")
    if not set_:
        a.buf[8:8 + 512] = state.ljust(512, b"\0")
    return 0


def _enable_cap(vm, a):
    cap, flags, arg0, _a1, _a2, _a3 = uapi.ENABLE_CAP.unpack_from(a.need(uapi.ENABLE_CAP.size))
    if flags or cap != uapi.KVM_CAP_X2APIC_API or vm.arch.name != "x86":
        raise _err(errno.EINVAL, f"capability {cap} cannot be enabled")
    _call(vm.arch.enable_x2apic_api, arg0)
    return 0


def request_number(request, closed):
    """The 32-bit request number, as fcntl.ioctl passes it; EBADF on a closed VM (both backends)."""
    if not isinstance(request, int):
        raise TypeError("ioctl request must be an int")
    if closed:
        raise _err(errno.EBADF, "Vm is closed")
    return request & 0xFFFFFFFF


def vm_ioctl(vm, request, arg=0, mutate_flag=True):
    request = request_number(request, vm.closed)
    if request == uapi.KVM_CHECK_EXTENSION:
        # A buffer's address would reach KVM as a huge, unknown capability: 0.
        return _check_extension(vm, arg) if isinstance(arg, int) else 0
    if request == uapi.KVM_CREATE_IRQCHIP:
        vm.create_irqchip()
        return 0
    if request == uapi.KVM_CREATE_VCPU:
        return vm.create_vcpu(_value(arg), lapic_enabled=False)
    handler = _VM_STRUCT_IOCTLS.get(request)
    if handler is None:
        raise _err(errno.ENOTTY, f"unknown VM ioctl {request:#x}")
    a = _Arg(arg, mutate_flag)
    return a.result(handler(vm, a))


_VM_STRUCT_IOCTLS = {
    uapi.KVM_SET_GSI_ROUTING: _set_gsi_routing,
    uapi.KVM_IRQFD: _irqfd,
    uapi.KVM_IRQFD_DIRECT: _irqfd_direct,
    uapi.KVM_SIGNAL_MSI: _signal_msi,
    uapi.KVM_IRQ_LINE: lambda vm, a: _irq_line(vm, a, False),
    uapi.KVM_IRQ_LINE_STATUS: lambda vm, a: _irq_line(vm, a, True),
    uapi.KVM_GET_IRQCHIP: lambda vm, a: _irqchip_state(vm, a, False),
    uapi.KVM_SET_IRQCHIP: lambda vm, a: _irqchip_state(vm, a, True),
    uapi.KVM_ENABLE_CAP: _enable_cap,
}


# -- vCPU ioctls ----------------------------------------------------------------------------------
_LAPIC_RESET = {uapi.APIC_LVR: 0x50014, uapi.APIC_DFR: 0xFFFFFFFF, uapi.APIC_SPIV: 0xFF,
                0x320: 0x10000, 0x330: 0x10000, 0x340: 0x10000, 0x350: 0x10000, 0x360: 0x10000,
                0x370: 0x10000}


def lapic_image(vcpu):
    """The KVM_GET_LAPIC image: modelled registers live, the others as last set (or reset)."""
    img = vcpu._vm._lapic_image.get(vcpu.id)
    if img is None:
        img = bytearray(uapi.LAPIC_STATE_SIZE)
        for off, val in _LAPIC_RESET.items():
            uapi.set_lapic_reg(img, off, val)
        if vcpu.id == 0:
            uapi.set_lapic_reg(img, 0x350, 0x700)      # LINT0 ExtINT on the BSP, as KVM
    img = bytearray(img)
    lapic = vcpu.lapic
    uapi.set_lapic_reg(img, uapi.APIC_ID, lapic.apic_id << 24)
    uapi.set_lapic_reg(img, uapi.APIC_LDR, lapic.ldr)
    uapi.set_lapic_reg(img, uapi.APIC_DFR, lapic.dfr)
    uapi.set_lapic_reg(img, uapi.APIC_SPIV, lapic.spiv)
    for base, vectors in ((uapi.APIC_ISR, lapic.isr()), (uapi.APIC_TMR, lapic.tmr()),
                          (uapi.APIC_IRR, lapic.irr())):
        words = [0] * 8
        for v in vectors:
            words[v >> 5] |= 1 << (v & 31)
        for i, w in enumerate(words):
            uapi.set_lapic_reg(img, base + 0x10 * i, w)
    return img


def set_lapic_image(vcpu, img):
    lapic = vcpu.lapic
    lapic.apic_id = uapi.lapic_reg(img, uapi.APIC_ID) >> 24
    lapic.ldr = uapi.lapic_reg(img, uapi.APIC_LDR)
    lapic.dfr = uapi.lapic_reg(img, uapi.APIC_DFR)
    lapic.spiv = uapi.lapic_reg(img, uapi.APIC_SPIV)
    lapic.set_registers(irr=uapi.lapic_vectors(img, uapi.APIC_IRR),
                        isr=uapi.lapic_vectors(img, uapi.APIC_ISR),
                        tmr=uapi.lapic_vectors(img, uapi.APIC_TMR))
    vcpu._vm._lapic_image[vcpu.id] = bytes(img)


def vcpu_ioctl(vcpu, request, arg=0, mutate_flag=True):
    request = request_number(request, vcpu._vm.closed)
    if request in (uapi.KVM_GET_LAPIC, uapi.KVM_SET_LAPIC):
        a = _Arg(arg, mutate_flag)
        buf = a.need(uapi.LAPIC_STATE_SIZE)
        if vcpu.lapic is None:
            raise _err(errno.EINVAL, "no in-kernel LAPIC")
        with vcpu._vm._lock:
            if request == uapi.KVM_GET_LAPIC:
                buf[:uapi.LAPIC_STATE_SIZE] = lapic_image(vcpu)
            else:
                set_lapic_image(vcpu, buf[:uapi.LAPIC_STATE_SIZE])
        return a.result(0)
    if request in (uapi.KVM_GET_MP_STATE, uapi.KVM_SET_MP_STATE):
        a = _Arg(arg, mutate_flag)
        buf = a.need(uapi.MP_STATE.size)
        states = vcpu._vm.__dict__.setdefault("_mp_states", {})
        if request == uapi.KVM_GET_MP_STATE:
            default = uapi.KVM_MP_STATE_RUNNABLE if vcpu.id == 0 else uapi.KVM_MP_STATE_UNINITIALIZED
            uapi.MP_STATE.pack_into(buf, 0, states.get(vcpu.id, default))
        else:
            (state,) = uapi.MP_STATE.unpack_from(buf)
            if state > 8:
                raise _err(errno.EINVAL, f"unknown mp_state {state}")
            states[vcpu.id] = state
        return a.result(0)
    raise _err(errno.EINVAL, f"unknown vCPU ioctl {request:#x}")   # kvm_arch_vcpu_ioctl's default
