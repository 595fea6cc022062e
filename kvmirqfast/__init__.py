"""kvmirqfast: KVM's irqfd machinery in-process, on real eventfds, with KVM_IRQFD_DIRECT.

    >>> import os, kvmirqfast
    >>> from kvmirqfast import MsiEntry, msi_address, msi_data
    >>> with kvmirqfast.Vm(irqchip=True) as vm:
    ...     cpu = vm.create_vcpu(0)
    ...     efd = os.eventfd(0)
    ...     _ = vm.irqfd_direct(efd, MsiEntry(*msi_address(0), msi_data(0x41)))
    ...     os.eventfd_write(efd, 1)
    ...     cpu.wait_interrupt(timeout=5), cpu.ack()
    (True, 65)
"""

# The native core is required: there is no pure-Python engine to fall back to.
try:
    from . import _engine, _lapic  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "kvmirqfast's compiled core is missing (kvmirqfast._engine / kvmirqfast._lapic): "
        "install the package with pip (it builds the Cython extensions) or run "
        "'python setup.py build_ext --inplace' in a source checkout") from exc

from . import uapi
from .arch.x86 import decode_msi, msi_address, msi_data
from .routing import GsiRoutingTable, InvalidRouting, IrqchipEntry, MsiEntry
from .vm import Vcpu, Vm

__all__ = ["Vm", "Vcpu", "IrqchipEntry", "MsiEntry", "GsiRoutingTable", "InvalidRouting",
           "msi_address", "msi_data", "decode_msi", "uapi"]
__version__ = "0.1.0"
