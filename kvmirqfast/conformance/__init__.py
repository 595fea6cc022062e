"""KVM irqfd/routing semantics, written once against the pytest plugin's fixtures.

Run on every usable backend with ``pytest --pyargs kvmirqfast.conformance`` (add
``--kvm-backend=model`` or ``=kvm`` to pick one).  Each test states KVM's behaviour and checks it
through the public API or raw ioctls only.

- ``test_irqfd``         KVM_IRQFD and KVM_SET_GSI_ROUTING with MSI routes, KVM_SIGNAL_MSI,
                         KVM_IRQ_LINE_STATUS, ack/EOI order.
- ``test_ioapic``        irqfds on IOAPIC pins through the default routing: edge pins, level pins
                         with a resampler (KVM_IRQFD_FLAG_RESAMPLE).
- ``test_irqfd_direct``  KVM_IRQFD_DIRECT: assign, MODIFY, DEASSIGN, their errors, the capability,
                         more direct irqfds than KVM has GSIs.
- ``test_lapic``         KVM_GET_LAPIC / KVM_SET_LAPIC of ID, LDR, DFR, SPIV, and their effect.
- ``test_uapi_errors``   malformed and hostile ioctls: the same errno as KVM.

Divergences are strict xfails on the backend that diverges (``request.applymarker``), so a fix
shows up as XPASS and fails the run until the marker is removed.
"""
