"""The main job: `kvmirqfast selftest` delivers every interrupt to the right vCPU and vector."""
import os

from kvmirqfast import cli
from kvmirqfast.arch.x86 import msi_address, msi_data
from kvmirqfast.routing import MsiEntry
from kvmirqfast.selftest import Report, format_report, run_rounds, selftest, target
from kvmirqfast.vm import Vm


def test_selftest_small_run_passes():
    report = selftest(irqfds=2000, vcpus=4, out=None)
    assert report.ok
    assert report.sent == report.delivered == 4000          # two passes
    assert report.lost == report.misdelivered == 0
    assert "PASS" in format_report(report, 2000, 4)


def test_selftest_detects_misdelivery():
    # Route every irqfd one vector above what the round expects: all are lost and misdelivered.
    with Vm(irqchip=True) as vm:
        cpus = [vm.create_vcpu(i) for i in range(2)]
        fds = [os.eventfd(0) for _ in range(10)]
        try:
            for i, fd in enumerate(fds):
                cpu, vec = target(i, 2)
                vm.irqfd_direct(fd, MsiEntry(*msi_address(cpu), msi_data(vec + 0x40)))
            report = Report()
            run_rounds(vm, cpus, fds, 0, report, timeout=0.5)
        finally:
            for fd in fds:
                os.close(fd)
    assert not report.ok
    assert report.lost == 10 and report.misdelivered == 10


def test_cli_selftest_exit_code_and_report(capsys):
    assert cli.main(["selftest", "--irqfds", "300", "--vcpus", "2", "-q", "--no-kvm"]) == 0
    out = capsys.readouterr().out
    assert "lost               0" in out and "PASS" in out


def test_cli_rejects_bad_arguments(capsys):
    assert cli.main(["selftest", "--vcpus", "0", "-q", "--no-kvm"]) == 2


def test_cli_selftest_on_real_kvm(capsys):
    from realkvm import KVM_REASON, KVM_USABLE
    import pytest
    if not KVM_USABLE:
        pytest.skip(KVM_REASON)
    assert cli.main(["selftest", "--backend", "kvm", "--irqfds", "64", "--vcpus", "2", "-q"]) == 0
    out = capsys.readouterr().out
    assert "kvm backend" in out and "lost               0" in out and "misdelivered       0" in out
