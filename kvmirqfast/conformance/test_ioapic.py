"""irqfds on IOAPIC pins through KVM's default routing (GSI n -> IOAPIC pin n): edge pins, and
level pins with a resampler (KVM_IRQFD_FLAG_RESAMPLE).

Pins are programmed with raw KVM_GET_IRQCHIP / KVM_SET_IRQCHIP bytes, as a VMM restoring state
would.  KVM injects irqchip routes from a worker (and the model from its deferred worker), so
every delivery is waited for, never read at once.

KVM's resample protocol: the irqfd raises the pin's line (a level-triggered pin latches remote
IRR when the vector is delivered); when the guest EOIs the vector, the IOAPIC's ack notifier
lowers the line and signals the resamplefd, so the device can re-check and write the irqfd again.
The assertions hold whether the EOI side effects happen at the guest's EOI (KVM with an ISR,
the model) or already at delivery (this host's kvm_pvm, see kvmirqfast.kvm): the resamplefd is
signalled by the time ``eoi()`` returns, the line is then low, and the next write is delivered.
"""

import os

from kvmirqfast import uapi
from kvmirqfast.testing import settle, wait_for

from ._util import (REDIR_REMOTE_IRR, eventfd_count, ioapic_irr, ioapic_redirection, irqfd,
                    program_ioapic_pin, take)

LEVEL_PIN, EDGE_PIN = 20, 21             # IOAPIC-only GSIs in the default routing


def test_edge_pin_irqfd_delivers_every_write(kvm_vm, kvm_vcpus, kvm_eventfd):
    (cpu,) = kvm_vcpus(1)
    program_ioapic_pin(kvm_vm, EDGE_PIN, 0x62)
    efd = kvm_eventfd()
    assert irqfd(kvm_vm, efd, EDGE_PIN) == 0
    for _ in range(3):                   # irqfd_inject pulses the line: one edge per write
        os.eventfd_write(efd, 1)
        assert take(cpu) == 0x62
        assert wait_for(lambda: eventfd_count(efd) == 0)
    assert not ioapic_redirection(kvm_vm, EDGE_PIN) & REDIR_REMOTE_IRR
    assert not ioapic_irr(kvm_vm) & 1 << EDGE_PIN     # the line went low again after each pulse
    assert cpu.wait_interrupt(timeout=0.1) is False


def test_masked_edge_pin_delivers_nothing(kvm_vm, kvm_vcpus, kvm_eventfd):
    (cpu,) = kvm_vcpus(1)
    program_ioapic_pin(kvm_vm, EDGE_PIN, 0x63, masked=True)
    efd = kvm_eventfd()
    irqfd(kvm_vm, efd, EDGE_PIN)
    os.eventfd_write(efd, 1)
    assert wait_for(lambda: eventfd_count(efd) == 0)   # consumed and injected, but masked
    settle()
    assert 0x63 not in cpu.pending()


def test_edge_pin_to_another_vcpu(kvm_vm, kvm_vcpus, kvm_eventfd):
    cpu0, cpu1 = kvm_vcpus(2)
    program_ioapic_pin(kvm_vm, EDGE_PIN, 0x64, dest=1)
    efd = kvm_eventfd()
    irqfd(kvm_vm, efd, EDGE_PIN)
    os.eventfd_write(efd, 1)
    assert take(cpu1) == 0x64
    assert 0x64 not in cpu0.pending()


def test_level_pin_resampler_signals_and_lowers_the_line(kvm_vm, kvm_vcpus, kvm_eventfd):
    (cpu,) = kvm_vcpus(1)
    program_ioapic_pin(kvm_vm, LEVEL_PIN, 0x61, level=True)
    efd, rfd = kvm_eventfd(), kvm_eventfd()
    assert irqfd(kvm_vm, efd, LEVEL_PIN, uapi.KVM_IRQFD_FLAG_RESAMPLE, rfd) == 0
    for round_ in (1, 2):                # the second write after the EOI is delivered again
        os.eventfd_write(efd, 1)
        assert cpu.wait_interrupt(timeout=2), f"round {round_}: nothing delivered"
        assert cpu.ack() == 0x61
        assert cpu.eoi() == 0x61
        assert eventfd_count(rfd) == 1, f"round {round_}: resamplefd not signalled by EOI"
        os.eventfd_read(rfd)
        assert not ioapic_redirection(kvm_vm, LEVEL_PIN) & REDIR_REMOTE_IRR
        assert not ioapic_irr(kvm_vm) & 1 << LEVEL_PIN      # the resampler lowered the line
        assert cpu.wait_interrupt(timeout=0.1) is False     # ... so the EOI re-delivers nothing
    assert eventfd_count(efd) == 0


def test_level_pin_resampler_deassign_stops_delivery(kvm_vm, kvm_vcpus, kvm_eventfd):
    (cpu,) = kvm_vcpus(1)
    program_ioapic_pin(kvm_vm, LEVEL_PIN, 0x65, level=True)
    efd, rfd = kvm_eventfd(), kvm_eventfd()
    irqfd(kvm_vm, efd, LEVEL_PIN, uapi.KVM_IRQFD_FLAG_RESAMPLE, rfd)
    os.eventfd_write(efd, 1)
    assert take(cpu) == 0x65
    assert irqfd(kvm_vm, efd, LEVEL_PIN, uapi.KVM_IRQFD_FLAG_DEASSIGN) == 0
    os.eventfd_write(efd, 1)
    settle()
    assert cpu.pending() == [] and eventfd_count(efd) == 1
    assert not ioapic_irr(kvm_vm) & 1 << LEVEL_PIN


def test_resample_on_a_gsi_without_irqchip_route_is_accepted(kvm_vm, kvm_vcpus, kvm_eventfd):
    # KVM checks only that resamplefd is an eventfd; an MSI-routed GSI just never resamples.
    kvm_vcpus(1)
    efd, rfd = kvm_eventfd(), kvm_eventfd()
    assert irqfd(kvm_vm, efd, 100, uapi.KVM_IRQFD_FLAG_RESAMPLE, rfd) == 0
    assert irqfd(kvm_vm, efd, 100, uapi.KVM_IRQFD_FLAG_DEASSIGN) == 0
