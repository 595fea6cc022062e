"""``kvmirqfast bench``: the figures that prove (or disprove) the design, each with its baselines.

Every ratio is taken between numbers measured in the same process run, as /work/shared/PERF.md
asks (the machine is shared and noisy).  The figures:

1. ``flood``     K eventfds written round-robin by one C producer thread; consumer CPU ns per
                 delivered interrupt for the engine vs a pure-Python epoll loop, an asyncio loop and
                 a naive C epoll loop (level-triggered, one read() per event).
2. ``pyload``    the K=1024 flood while a CPU-bound pure-Python thread runs: delivery rate vs idle.
3. ``pingpong``  device thread -> direct irqfd -> vCPU thread in ``wait_interrupt`` -> ack, EOI ->
                 answer eventfd -> device thread; blocking and halt-polling, vs C ping-pong.
4. ``retarget``  one MSI among 4096: ``irqfd_direct_modify`` vs a 4096-entry ``set_gsi_routing``
                 vs real KVM's ``KVM_SET_GSI_ROUTING`` (with 4096 irqfds assigned).
5. ``assign``    assign + deassign cost per irqfd as N grows, vs real KVM ``KVM_IRQFD``.
6. ``memory``    native bytes per irqfd and RSS growth per irqfd.
7. ``kernel``    ns per eventfd write: kvmirqfast direct irqfd vs real KVM irqfd vs unbound.

The C baselines (and the C producer / ping-pong device) are compiled at run time with the system
compiler (``$CC`` or ``cc``) into a shared object loaded with ctypes; ctypes drops the GIL during
each call, so the C threads never wait for Python.  Without a compiler the C baselines are
skipped with a message and the producer falls back to a Python writer.  Real-KVM figures are
skipped with the reason where ``/dev/kvm`` is not usable.

Use ``run(quick=..., only=[...])`` -> ``BenchResult``; then ``format_table(result)`` and
``to_json(result)``.
"""

from .clib import c_library
from .config import FIGURES, Config, _vector
from .driver import format_table, have_matplotlib, main, run, to_json, write_json
from .flood import _make_consumer
from .harness import _close_all, _eventfds, _Producer, kvm_usable
from .reference import memory_probe
from .results import BenchResult, Row

__all__ = ["run", "Config", "FIGURES", "BenchResult", "Row", "format_table", "to_json",
           "write_json", "have_matplotlib", "main", "c_library", "kvm_usable"]
