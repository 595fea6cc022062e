"""pytest plugin: run a test on every usable backend (the in-process model and real /dev/kvm).

Registered through the ``pytest11`` entry point, so ``pip install kvmirqfast`` makes these
fixtures available to any test suite:

``kvm_backend``  the backend name, parametrized over ``--kvm-backend`` (model, kvm or all;
                 default all); the kvm one is skipped, with the reason, where /dev/kvm is unusable.
``kvm_vm``       a ``Vm`` on that backend with its in-kernel irqchip, closed after the test.
``kvm_vcpus``    factory: ``kvm_vcpus(n)`` creates vCPUs 0..n-1 with their LAPICs enabled.
``kvm_eventfd``  factory: ``kvm_eventfd(initval=0, flags=0)`` makes an eventfd closed after the test.

Tests see only the public API and raw ioctls (``vm.ioctl`` / ``vcpu.ioctl``).
"""

import os

import pytest

BACKENDS = ("model", "kvm")


def pytest_addoption(parser):
    group = parser.getgroup("kvmirqfast")
    group.addoption("--kvm-backend", choices=("model", "kvm", "all"), default="all",
                    help="backends for the kvm_backend fixture (default: all)")


def kvm_unusable_reason():
    """None if /dev/kvm can create a VM here, else why not."""
    from kvmirqfast.kvm import kvm_usable
    ok, reason = kvm_usable()
    return None if ok else reason


def pytest_generate_tests(metafunc):
    if "kvm_backend" in metafunc.fixturenames:
        choice = metafunc.config.getoption("--kvm-backend")
        names = BACKENDS if choice == "all" else (choice,)
        metafunc.parametrize("kvm_backend", names, indirect=True)


@pytest.fixture
def kvm_backend(request):
    name = request.param
    if name == "kvm":
        reason = kvm_unusable_reason()
        if reason:
            pytest.skip(f"kvm backend: {reason}")
        try:
            import kvmirqfast.kvm  # noqa: F401
        except ImportError as e:
            pytest.skip(f"kvm backend not available in this build: {e}")
    return name


@pytest.fixture
def kvm_vm(kvm_backend):
    from kvmirqfast import Vm
    vm = Vm("x86", backend=kvm_backend, irqchip=True)
    try:
        yield vm
    finally:
        vm.close()


@pytest.fixture
def kvm_vcpus(kvm_vm):
    made = []

    def create(n=1):
        vcpus = [kvm_vm.create_vcpu(len(made) + i) for i in range(n)]
        made.extend(vcpus)
        return vcpus
    return create


@pytest.fixture
def kvm_eventfd():
    fds = []

    def create(initval=0, flags=0):
        fd = os.eventfd(initval, flags | os.EFD_CLOEXEC)
        fds.append(fd)
        return fd
    yield create
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
