"""``kvmirqfast selftest``: a KVM-selftest-style run of many direct irqfds, in-process.

Each irqfd i targets vCPU ``i % vcpus`` with vector ``0x20 + (i // vcpus) % 224``.  The irqfds are
fired in rounds of at most ``vcpus * 224`` so that no two irqfds of a round share a (vCPU, vector):
every interrupt is individually observable.  Device threads write the round's eventfds while vCPU
threads block in ``wait_interrupt``, ack and EOI; each vCPU checks what it received against what
the round sent it.  A second pass retargets every irqfd to the next vCPU with
``irqfd_direct_modify`` and runs the rounds again.
"""

import errno
import os
import sys
import threading
import time

from . import uapi
from .arch.x86 import msi_address, msi_data
from .routing import MsiEntry
from .vm import Vm

FIRST_VECTOR = 0x20
VECTORS = 256 - FIRST_VECTOR


def target(i, vcpus, shift=0):
    """(vcpu, vector) of irqfd ``i``; ``shift`` rotates the vCPU (the retarget pass)."""
    return (i + shift) % vcpus, FIRST_VECTOR + (i // vcpus) % VECTORS


class Report:
    def __init__(self):
        self.sent = self.delivered = self.lost = self.misdelivered = 0
        self.seconds = 0.0
        self.notes = []

    @property
    def ok(self):
        return self.lost == 0 and self.misdelivered == 0 and self.sent == self.delivered


def _progress(out, text):
    if out is None:
        return
    if out.isatty():
        out.write("\r" + text.ljust(78))
    else:
        out.write(text + "\n")
    out.flush()


def run_rounds(vm, vcpus, eventfds, shift, report, device_threads=2, timeout=10.0, out=None,
               label=""):
    """Fire every eventfd once, in rounds; tally delivered, lost and misdelivered."""
    n = len(eventfds)
    per_round = len(vcpus) * VECTORS
    rounds = [range(s, min(s + per_round, n)) for s in range(0, n, per_round)]
    nv = len(vcpus)
    for r_i, rnd in enumerate(rounds):
        expected = [set() for _ in vcpus]
        for i in rnd:
            cpu, vec = target(i, nv, shift)
            expected[cpu].add(vec)
        received = [[] for _ in vcpus]
        start = threading.Barrier(nv + device_threads + 1)

        def vcpu_thread(c):
            start.wait()
            want, got = expected[c], received[c]
            deadline = time.monotonic() + timeout
            cpu = vcpus[c]
            while len(got) < len(want):
                left = deadline - time.monotonic()
                if left <= 0 or not cpu.wait_interrupt(timeout=left):
                    break
                v = cpu.ack()
                if v is not None:
                    cpu.eoi()
                    got.append(v)

        def device_thread(d):
            start.wait()
            for i in rnd[d::device_threads]:
                os.eventfd_write(eventfds[i], 1)

        threads = [threading.Thread(target=vcpu_thread, args=(c,)) for c in range(nv)]
        threads += [threading.Thread(target=device_thread, args=(d,))
                    for d in range(device_threads)]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        report.seconds += time.perf_counter() - t0
        for c in range(nv):
            got = received[c]
            good = set(got) & expected[c]
            report.delivered += len(good)
            report.misdelivered += len(got) - len(good)
            report.lost += len(expected[c] - good)
        report.sent += len(rnd)
        _progress(out, f"{label} round {r_i + 1}/{len(rounds)}: sent {report.sent}, "
                       f"delivered {report.delivered}, lost {report.lost}, "
                       f"misdelivered {report.misdelivered}")


def real_kvm_route_limit():
    """Show that real KVM refuses the 4097th route.  Returns a line of text, or None."""
    try:
        import fcntl
        kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"real KVM: /dev/kvm not usable ({e.strerror}); skipped"
    try:
        vm = fcntl.ioctl(kvm, uapi.KVM_CREATE_VM, 0)
        try:
            fcntl.ioctl(vm, uapi.KVM_CREATE_IRQCHIP, 0)

            def table(n):
                return uapi.pack_routing(uapi.pack_msi_entry(g, *msi_address(0), msi_data(0x40))
                                         for g in range(n))
            fcntl.ioctl(vm, uapi.KVM_SET_GSI_ROUTING, table(4096))
            try:
                fcntl.ioctl(vm, uapi.KVM_SET_GSI_ROUTING, table(4097))
                return "real KVM: accepted 4097 routes (unexpected)"
            except OSError as e:
                return (f"real KVM: 4096 routes accepted, the 4097th refused with "
                        f"{errno.errorcode.get(e.errno, e.errno)}; the direct path has no such limit")
        finally:
            os.close(vm)
    except OSError as e:
        return f"real KVM: probe failed ({e.strerror})"
    finally:
        os.close(kvm)


def selftest(irqfds=8192, vcpus=4, device_threads=2, poll_ns=0, out=sys.stderr):
    """Run the selftest; returns a Report (report.ok is the verdict)."""
    report = Report()
    eventfds = []
    try:
        with Vm("x86", irqchip=True, poll_ns=poll_ns) as vm:
            cpus = [vm.create_vcpu(i) for i in range(vcpus)]
            for i in range(irqfds):
                fd = os.eventfd(0, os.EFD_CLOEXEC)
                eventfds.append(fd)
                cpu, vec = target(i, vcpus)
                vm.irqfd_direct(fd, MsiEntry(*msi_address(cpu), msi_data(vec)))
                if i % 1024 == 1023 or i == irqfds - 1:
                    _progress(out, f"assigned {i + 1}/{irqfds} direct irqfds")
            run_rounds(vm, cpus, eventfds, 0, report, device_threads, out=out, label="pass 1")
            for i, fd in enumerate(eventfds):                    # retarget every irqfd
                cpu, vec = target(i, vcpus, shift=1)
                vm.irqfd_direct_modify(fd, MsiEntry(*msi_address(cpu), msi_data(vec)))
            run_rounds(vm, cpus, eventfds, 1, report, device_threads, out=out,
                       label="pass 2 (retargeted)")
            stats = vm.stats()
            leftover = sum(len(c.pending()) for c in cpus)
            if leftover:
                report.notes.append(f"{leftover} vectors left pending after the run")
                report.misdelivered += leftover
    finally:
        for fd in eventfds:
            os.close(fd)
    report.stats = stats
    if out is not None and out.isatty():
        out.write("\n")
    return report


def format_report(report, irqfds, vcpus):
    st = report.stats
    batch = st["events"] / st["batches"] if st["batches"] else 0.0
    lines = [
        "kvmirqfast selftest (model backend)",
        f"  direct irqfds      {irqfds} on {vcpus} vCPUs; 2 passes, all retargeted in between",
        f"  interrupts sent    {report.sent}",
        f"  delivered          {report.delivered}",
        f"  lost               {report.lost}",
        f"  misdelivered       {report.misdelivered}",
        f"  rate               {report.delivered / max(report.seconds, 1e-9):,.0f} interrupts/s "
        f"(device write to vCPU EOI, Python vCPU threads; {report.seconds:.2f} s in rounds)",
        f"  engine             {st['events']} wakeups in {st['batches']} epoll batches "
        f"(avg {batch:.1f}), {st['delivered']} delivered inatomic, {st['deferred']} deferred",
    ]
    lines += [f"  note: {n}" for n in report.notes]
    lines.append(f"  result             {'PASS' if report.ok else 'FAIL'}")
    return "\n".join(lines)
