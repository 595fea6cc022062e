"""Example: testing a device model's interrupt wiring with the kvmirqfast pytest plugin.

This is how a VMM project (here a toy virtio-pci device with MSI-X queues and a legacy INTx line)
tests that its interrupts reach the guest -- on the in-process model everywhere, and on the real
/dev/kvm where it is usable.  It uses only the plugin's fixtures (``kvm_backend``, ``kvm_vm``,
``kvm_vcpus``, ``kvm_eventfd``), ``vm.ioctl`` with the request numbers and struct layouts of
``<linux/kvm.h>`` (``kvmirqfast.uapi``), and the vCPU's guest side (``wait_interrupt``, ``ack``,
``eoi``).  The device code below would work unchanged on a real VM fd with ``fcntl.ioctl``.

Run:  pytest examples/            (with kvmirqfast pip-installed: the plugin loads itself)
      pytest -p kvmirqfast.pytest_plugin examples/        (from a source checkout)
      pytest --kvm-backend=model examples/                (one backend only)
"""

import errno
import os
import struct
import time

import pytest

from kvmirqfast import uapi

MSI_ADDRESS_BASE = 0xFEE00000


def msi_route(gsi, dest_apic_id, vector):
    """A ``struct kvm_irq_routing_entry`` for an edge, fixed, physical-destination MSI."""
    return uapi.pack_msi_entry(gsi, MSI_ADDRESS_BASE | dest_apic_id << 12, 0, vector)


# ================================================================================================
# The device model under test (what a VMM would ship).
# ================================================================================================
class VirtioDevice:
    """A virtio-pci device: one MSI-X vector per queue, each wired to the guest by an irqfd.

    ``mode="direct"`` binds each vector with KVM_IRQFD_DIRECT (no GSI; a retarget is one
    ioctl); ``mode="gsi"`` is the classic scheme: a GSI per vector, the whole routing table
    re-sent on every change, KVM_IRQFD per vector.  ``mode=None`` picks direct when
    KVM_CHECK_EXTENSION(KVM_CAP_IRQFD_DIRECT) says it exists.
    """

    FIRST_GSI = 64                       # clear of the IOAPIC/PIC GSIs of the default routing

    def __init__(self, vm, make_eventfd, queues, mode=None):
        self.vm = vm
        if mode is None:
            mode = "direct" if vm.ioctl(uapi.KVM_CHECK_EXTENSION,
                                        uapi.KVM_CAP_IRQFD_DIRECT) > 0 else "gsi"
        self.mode = mode
        self.callfds = [make_eventfd() for _ in range(queues)]
        self.msix = [None] * queues      # (dest, vector) per queue, as the driver programmed it
        self.masked = [True] * queues

    # -- the driver's MSI-X table writes -----------------------------------------------------
    def program_vector(self, queue, dest, vector):
        was_live = not self.masked[queue]
        self.msix[queue] = (dest, vector)
        if was_live and self.mode == "direct":
            self._direct(queue, uapi.KVM_IRQFD_DIRECT_FLAG_MODIFY)   # retarget in place
        elif was_live:
            self._push_routes()

    def unmask(self, queue):
        self.masked[queue] = False
        if self.mode == "direct":
            self._direct(queue)
        else:
            self._push_routes()
            self._irqfd(queue)
        # A notification raised while masked waits in the eventfd: KVM injects it at assign.

    def mask(self, queue):
        self.masked[queue] = True
        if self.mode == "direct":
            self._direct(queue, uapi.KVM_IRQFD_FLAG_DEASSIGN)
        else:
            self._irqfd(queue, uapi.KVM_IRQFD_FLAG_DEASSIGN)

    def reset(self):
        for q in range(len(self.callfds)):
            if not self.masked[q]:
                self.mask(q)

    # -- the device's side ---------------------------------------------------------------------
    def notify(self, queue):
        """The backend finished work on ``queue``: interrupt the driver."""
        os.eventfd_write(self.callfds[queue], 1)

    # -- the ioctls ------------------------------------------------------------------------------
    def _direct(self, queue, flags=0):
        dest, vector = self.msix[queue]
        arg = uapi.pack_irqfd_direct(self.callfds[queue], msi_route(0, dest, vector), flags)
        self.vm.ioctl(uapi.KVM_IRQFD_DIRECT, arg)

    def _irqfd(self, queue, flags=0):
        self.vm.ioctl(uapi.KVM_IRQFD, uapi.pack_irqfd(self.callfds[queue], self.FIRST_GSI + queue,
                                                      flags))

    def _push_routes(self):
        routes = [msi_route(self.FIRST_GSI + q, *self.msix[q])
                  for q in range(len(self.callfds)) if self.msix[q] is not None]
        self.vm.ioctl(uapi.KVM_SET_GSI_ROUTING, uapi.pack_routing(routes))


class IntxLine:
    """The device's legacy INTx: a level-triggered IOAPIC pin driven by a resampling irqfd.

    The device raises the line by writing the irqfd; when the guest EOIs, KVM lowers the line
    and signals the resamplefd, and the device re-raises it if it still has work (the ISR-status
    protocol of virtio-pci).
    """

    def __init__(self, vm, make_eventfd, gsi):
        self.vm, self.gsi = vm, gsi
        self.irqfd = make_eventfd()
        self.resamplefd = make_eventfd(flags=os.EFD_NONBLOCK)
        self.work = 0
        vm.ioctl(uapi.KVM_IRQFD, uapi.pack_irqfd(self.irqfd, gsi, uapi.KVM_IRQFD_FLAG_RESAMPLE,
                                                 self.resamplefd))

    def raise_(self, work=1):
        self.work += work
        os.eventfd_write(self.irqfd, 1)

    def on_resample(self):
        """Poll the resamplefd (a VMM would epoll it); True if the guest EOIed the line."""
        try:
            os.eventfd_read(self.resamplefd)
        except BlockingIOError:
            return False
        self.work -= 1                    # the driver handled one unit of work
        if self.work > 0:
            os.eventfd_write(self.irqfd, 1)
        return True


def program_level_pin(vm, pin, vector, dest=0):
    """What firmware/the guest does to the IOAPIC, done from outside: KVM_SET_IRQCHIP."""
    state = bytearray(vm.ioctl(uapi.KVM_GET_IRQCHIP,
                               uapi.IRQCHIP.pack(uapi.KVM_IRQCHIP_IOAPIC, 0, b"")))
    redirtbl = 8 + 24                     # kvm_irqchip header, then kvm_ioapic_state's redirtbl
    struct.pack_into("<Q", state, redirtbl + 8 * pin, vector | 1 << 15 | dest << 56)
    vm.ioctl(uapi.KVM_SET_IRQCHIP, bytes(state))


# ================================================================================================
# The tests.
# ================================================================================================
def take(cpu, timeout=2.0):
    """The guest halts until interrupted, then acknowledges and EOIs; the vector or None."""
    if not cpu.wait_interrupt(timeout=timeout):
        return None
    vector = cpu.ack()
    cpu.eoi()
    return vector


def nothing_arrives(cpu, timeout=0.1):
    return cpu.wait_interrupt(timeout=timeout) is False


@pytest.fixture(params=["direct", "gsi"])
def device(request, kvm_vm, kvm_eventfd):
    dev = VirtioDevice(kvm_vm, kvm_eventfd, queues=3, mode=request.param)
    yield dev
    dev.reset()


def test_device_prefers_direct_irqfds_where_available(kvm_vm, kvm_eventfd):
    assert VirtioDevice(kvm_vm, kvm_eventfd, queues=1).mode == "direct"


def test_each_queue_interrupts_the_vcpu_its_vector_names(kvm_vcpus, device):
    cpu0, cpu1 = kvm_vcpus(2)
    for q, (dest, vector) in enumerate([(0, 0x41), (1, 0x42), (0, 0x43)]):
        device.program_vector(q, dest, vector)
        device.unmask(q)
    device.notify(1)
    assert take(cpu1) == 0x42
    device.notify(2)
    device.notify(0)
    assert sorted([take(cpu0), take(cpu0)]) == [0x41, 0x43]
    assert nothing_arrives(cpu0) and nothing_arrives(cpu1)


def test_retargeting_a_live_vector(kvm_vcpus, device):
    cpu0, cpu1 = kvm_vcpus(2)
    device.program_vector(0, 0, 0x51)
    device.unmask(0)
    device.notify(0)
    assert take(cpu0) == 0x51
    device.program_vector(0, 1, 0x52)         # the guest moves the queue's IRQ to vCPU 1
    device.notify(0)
    assert take(cpu1) == 0x52
    assert nothing_arrives(cpu0)


def test_a_notification_while_masked_arrives_on_unmask(kvm_vcpus, device):
    (cpu,) = kvm_vcpus(1)
    device.program_vector(0, 0, 0x61)
    device.unmask(0)
    device.mask(0)
    device.notify(0)                           # pending, like a set MSI-X PBA bit
    assert nothing_arrives(cpu)
    device.unmask(0)
    assert take(cpu) == 0x61


def test_an_eventfd_cannot_be_wired_twice(kvm_vcpus, device):
    kvm_vcpus(1)
    device.program_vector(0, 0, 0x71)
    device.unmask(0)
    with pytest.raises(OSError) as ei:
        device.unmask(0)                       # a VMM bug: the same call fd bound again
    assert ei.value.errno == errno.EBUSY


def test_intx_is_resampled_until_the_device_has_no_work(kvm_vm, kvm_vcpus, kvm_eventfd):
    (cpu,) = kvm_vcpus(1)
    program_level_pin(kvm_vm, 17, 0x81)
    intx = IntxLine(kvm_vm, kvm_eventfd, gsi=17)
    intx.raise_(work=2)
    for _ in range(2):                         # two units of work: the line is taken twice
        assert take(cpu) == 0x81
        deadline = time.monotonic() + 2
        while not intx.on_resample():
            assert time.monotonic() < deadline, "no resample after the guest's EOI"
            time.sleep(0.001)
    assert intx.work == 0
    assert nothing_arrives(cpu)                # the line stays low: no interrupt storm
