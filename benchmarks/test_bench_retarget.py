"""Retarget one MSI among 4096: irqfd_direct_modify vs a whole 4096-entry set_gsi_routing."""
import pytest

from kvmirqfast import MsiEntry, Vm, msi_address, msi_data
from kvmirqfast.bench import _close_all, _eventfds, _vector

N = 4096


@pytest.fixture(scope="module")
def direct_vm():
    fds = _eventfds(N)
    vm = Vm(irqchip=True)
    vm.create_vcpu(0)
    vm.create_vcpu(1)
    for i, fd in enumerate(fds):
        vm.irqfd_direct(fd, MsiEntry(*msi_address(0), msi_data(_vector(i))))
    yield vm, fds
    vm.close()
    _close_all(fds)


@pytest.fixture(scope="module")
def legacy_vm():
    fds = _eventfds(N)
    vm = Vm(irqchip=True)
    vm.create_vcpu(0)
    vm.create_vcpu(1)
    vm.set_gsi_routing([(g, MsiEntry(*msi_address(0), msi_data(_vector(g)))) for g in range(N)])
    for g, fd in enumerate(fds):
        vm.irqfd(fd, g)
    yield vm, fds
    vm.close()
    _close_all(fds)


def test_retarget_direct_modify(benchmark, direct_vm):
    vm, fds = direct_vm
    mid = N // 2
    entries = [MsiEntry(*msi_address(c), msi_data(_vector(mid))) for c in (1, 0)]
    state = [0]

    def retarget():
        state[0] ^= 1
        vm.irqfd_direct_modify(fds[mid], entries[state[0]])

    benchmark(retarget)
    benchmark.extra_info.update({"n": N, "path": "KVM_IRQFD_DIRECT MODIFY"})


def test_retarget_table_rebuild(benchmark, legacy_vm):
    vm, fds = legacy_vm
    mid = N // 2
    state = [0]

    def retarget():
        state[0] ^= 1
        pairs = [(g, MsiEntry(*msi_address(0), msi_data(_vector(g)))) for g in range(N)]
        pairs[mid] = (mid, MsiEntry(*msi_address(state[0]), msi_data(_vector(mid))))
        vm.set_gsi_routing(pairs)

    benchmark.pedantic(retarget, rounds=5, iterations=1)
    benchmark.extra_info.update({"n": N, "path": "KVM_SET_GSI_ROUTING (whole table)"})
