"""``kvmirqfast selftest --backend kvm``: the selftest's rounds on a real ``/dev/kvm`` VM.

Same job as :mod:`kvmirqfast.selftest` (irqfd i -> vCPU ``i % vcpus``, vector ``0x20 + (i //
vcpus) % 224``; rounds in which every interrupt is individually observable; a second pass after
retargeting every irqfd), run by :func:`kvmirqfast.selftest.run_rounds` on ``KvmVm``/``KvmVcpu``:
the device threads write real eventfds, KVM injects, and real vCPUs running the tiny guest take
the interrupts through their IDT and EOI them.

``KVM_IRQFD_DIRECT`` is emulated with one GSI route per irqfd (``kvmirqfast.kvm_gsi``).  The VMM
routes nothing itself (an empty user table), so all 4096 routes are available; above that the
run shows exactly where and why real KVM stops, then runs the rounds on the irqfds it accepted.
It also times a retarget on both backends at the size reached.
"""

import errno
import os
import sys
import time

from .arch.x86 import msi_address, msi_data
from .kvm_gsi import RoutingTableFull
from .routing import MsiEntry
from .selftest import Report, _progress, real_kvm_route_limit, run_rounds, target


def kvm_selftest(irqfds=8192, vcpus=4, device_threads=2, poll_ns=0, out=sys.stderr,
                 retarget_samples=64):
    """Run the selftest on real KVM; returns a Report with extra fields:

    ``requested``, ``assigned``, ``stopped`` (None, or a dict: ``at`` (1-based irqfd number),
    ``errno``, ``message``, ``kvm`` (what a raw 4097-route table gets from KVM)),
    ``retarget_kvm_s`` / ``retarget_model_s`` (mean seconds per retarget at the size reached),
    ``stats``.  ``report.ok`` is the delivery verdict for the irqfds KVM accepted;
    ``report.complete`` is whether all ``irqfds`` were assigned.
    """
    from .kvm import KvmVm, measure_retarget
    report = Report()
    report.requested = irqfds
    report.stopped = None
    eventfds = []
    try:
        with KvmVm("x86", irqchip=True, poll_ns=poll_ns) as vm:
            vm.set_gsi_routing([])          # this VMM routes nothing itself: 4096 routes for irqfds
            cpus = [vm.create_vcpu(i) for i in range(vcpus)]
            t0 = time.perf_counter()
            for i in range(irqfds):
                fd = os.eventfd(0, os.EFD_CLOEXEC)
                cpu, vec = target(i, vcpus)
                try:
                    vm.irqfd_direct(fd, MsiEntry(*msi_address(cpu), msi_data(vec)))
                except RoutingTableFull as e:
                    os.close(fd)
                    report.stopped = dict(at=i + 1, errno=e.errno, message=e.strerror,
                                          kvm=real_kvm_route_limit())
                    _progress(out, f"real KVM stops at irqfd {i + 1}: {e.strerror}")
                    break
                eventfds.append(fd)
                if i % 512 == 511 or i == irqfds - 1:
                    _progress(out, f"assigned {i + 1}/{irqfds} direct irqfds (one GSI route each)")
            report.assign_seconds = time.perf_counter() - t0
            report.assigned = len(eventfds)
            run_rounds(vm, cpus, eventfds, 0, report, device_threads, out=out, label="pass 1")
            t0 = time.perf_counter()
            for i, fd in enumerate(eventfds):
                cpu, vec = target(i, vcpus, shift=1)
                vm.irqfd_direct_modify(fd, MsiEntry(*msi_address(cpu), msi_data(vec)))
            report.retarget_all_seconds = time.perf_counter() - t0
            run_rounds(vm, cpus, eventfds, 1, report, device_threads, out=out,
                       label="pass 2 (retargeted)")
            leftover = sum(len(c.pending()) for c in cpus)
            if leftover:
                report.notes.append(f"{leftover} vectors left pending after the run")
                report.misdelivered += leftover
            report.stats = vm.stats()
    finally:
        for fd in eventfds:
            os.close(fd)
    n = max(1, report.assigned)
    report.retarget_kvm_s = report.retarget_all_seconds / n
    report.retarget_model_s = None
    if retarget_samples:
        try:
            report.retarget_model_s, _ = measure_retarget("model", routes=report.assigned,
                                                          samples=retarget_samples)
        except Exception as e:                      # the comparison is informative only
            report.notes.append(f"model retarget not measured: {e}")
    report.complete = report.assigned == irqfds
    if out is not None and out.isatty():
        out.write("\n")
    return report


def format_kvm_report(report, vcpus):
    st = report.stats
    lines = [
        "kvmirqfast selftest (kvm backend: real /dev/kvm, KVM_IRQFD_DIRECT emulated with GSI "
        "routes)",
        f"  direct irqfds      {report.assigned} of {report.requested} assigned on {vcpus} vCPUs; "
        "2 passes, all retargeted in between",
    ]
    if report.stopped:
        s = report.stopped
        lines += [
            f"  stopped at         irqfd {s['at']}: {errno.errorcode.get(s['errno'], s['errno'])}"
            f" -- {s['message']}",
        ]
        if s.get("kvm"):
            lines.append(f"                     ({s['kvm']})")
        lines.append(f"                     the model backend goes on: KVM_IRQFD_DIRECT needs no "
                     "GSI")
    lines += [
        f"  interrupts sent    {report.sent}",
        f"  delivered          {report.delivered}",
        f"  lost               {report.lost}",
        f"  misdelivered       {report.misdelivered}",
        f"  rate               {report.delivered / max(report.seconds, 1e-9):,.0f} interrupts/s "
        f"(device write to guest EOI; {report.seconds:.2f} s in rounds)",
        f"  routing pushes     {st['route_pushes']} KVM_SET_GSI_ROUTING, "
        f"{st['route_push_ns'] / 1e9:.2f} s in the kernel call",
    ]
    model = report.retarget_model_s
    kvm_us = report.retarget_kvm_s * 1e6
    lines.append(f"  retarget           {kvm_us:,.0f} us each on KVM "
                 f"(whole-table push at {st['routes']} routes)"
                 + (f" vs {model * 1e6:,.1f} us on the model ({kvm_us / (model * 1e6):,.0f}x)"
                    if model else ""))
    lines += [f"  note: {n}" for n in report.notes]
    if report.ok and report.complete:
        verdict = "PASS"
    elif report.ok:
        verdict = (f"PASS for the {report.assigned} irqfds real KVM accepted; "
                   f"KVM cannot hold {report.requested}")
    else:
        verdict = "FAIL"
    lines.append(f"  result             {verdict}")
    return "\n".join(lines)
