"""KVM irqfd/routing semantics, written once against the pytest plugin's fixtures.

Run on every usable backend with ``pytest --pyargs kvmirqfast.conformance`` (add
``--kvm-backend=model`` or ``=kvm`` to pick one).  Each test states KVM's behaviour and checks it
through the public API or raw ioctls only.  Deliberate divergences are marked where they occur.
"""
