"""Load and churn: no interrupt lost or misdelivered while irqfds are assigned, retargeted,
deassigned and the GSI routing table is replaced under a flood of eventfd writes.

Design (every wait is bounded, so a bug fails a test instead of hanging the suite):

* **Targets.**  A target is a (vCPU, vector) pair; every live route points at a target that no
  other route uses, so a vector landing on a vCPU names exactly one irqfd *epoch* (slot,
  eventfd generation, route).  A target an irqfd has left is put back in the free pool only by
  that vCPU's own thread, once it sees the vector clear in IRR; the pool hands it out again
  only after that.  So the vCPU thread's ``owner`` lookup at ack time is exact: an ack of a
  target before its release marker belongs to the old epoch, after it to the new one.  A new
  target differs from the old one in both vCPU and vector, so a torn route word (half old,
  half new) would land on a target owned by nobody or by someone else: misdelivered.
* **Writes.**  Each device thread owns a set of slots and keeps at most one write outstanding
  per (slot, generation) -- a device that raises its interrupt again only after the driver
  serviced it.  Coalescing (several writes, one pending vector) is KVM's behaviour and allowed,
  but one outstanding write per irqfd makes the accounting exact: every write is matched to at
  most one ack, so a lost write and a duplicated delivery are both visible.
* **Control.**  Threads assign, deassign and ``irqfd_direct_modify`` direct irqfds, and one
  thread replaces the whole GSI routing table (retargeting legacy irqfds) and assigns/deassigns
  legacy irqfds.  Each control call records its [start, end] time.  Eventfds are retired by
  closing them and opening a new one (whose fd number and ``eventfd-id`` the kernel reuses).
* **Invariants, checked offline.**  For the write ``w`` ([ws, we]) an ack matched (epoch E):
  w did not complete before the call that made E current started, and did not start after the
  call that ended E returned (this is the drain-on-retarget rule: before -> old, after -> new,
  overlap -> either; and after a deassign returns, nothing).  Every write that completed before
  its irqfd's deassign started must have an ack by the end (lost otherwise).  Every ack must be
  matched to an outstanding write of the target's owner (misdelivered otherwise).

The default run is short (a few seconds).  ``KVMIRQFAST_LONG=1`` (or ``-m slow``) selects the
long run; ``KVMIRQFAST_CHURN_SECONDS`` overrides its length.  The figures are printed (``-s``).
"""

import os
import random
import threading
import time
from dataclasses import dataclass, field

import pytest

from kvmirqfast import IrqchipEntry, MsiEntry, Vm, msi_address, msi_data

LONG = os.environ.get("KVMIRQFAST_LONG", "") not in ("", "0")

# Known bugs (each has a deterministic strict-xfail test in test_faults.py).  While True, the churn
# run steers around them and reports what it tolerated; set False once fixed to check them here.
#  * DEASSIGN_LOSES_PENDING: a write that completed before irqfd_deassign started, but that the
#    engine had not consumed yet, is never delivered (KVM delivers it inside write()).
#    Tolerated: such writes are counted as "lost_at_deassign", not as lost.
#  * STALE_ASSIGN_COUNT: an event pending at assign is delivered without consuming the counter,
#    so a later retarget drain (modify / table change) delivers it a second time.  Avoided: a
#    slot's new eventfd is assigned before any device can write it.
DEASSIGN_LOSES_PENDING = False
STALE_ASSIGN_COUNT = False
now = time.monotonic_ns


# -- bookkeeping --------------------------------------------------------------------------------
@dataclass
class Call:
    kind: str
    start: int
    end: int = 0


@dataclass
class Epoch:
    id: int
    slot: int
    gen: int
    target: tuple
    begin: Call                   # the call that made this target current for (slot, gen)
    finish: Call = None           # the call that ended it (modify, table, deassign)


@dataclass
class Write:
    slot: int
    gen: int
    ws: int
    we: int = 0
    ack: tuple = None             # (t_ack, vcpu, vector, epoch id)


@dataclass
class Slot:
    idx: int
    legacy: bool
    gsi: int = None
    fd: int = -1
    gen: int = 0
    assigned: bool = False
    epoch: Epoch = None           # current epoch while assigned
    deassign: Call = None         # deassign of the current generation, if any
    lock: threading.Lock = field(default_factory=threading.Lock)   # fd/gen vs device writes
    ctl: threading.Lock = field(default_factory=threading.Lock)    # one control op at a time


class Churn:
    VEC_LO, VEC_HI = 0x20, 0xFE

    def __init__(self, *, seconds, n_vcpus=8, n_direct=640, n_legacy=64, n_devices=4,
                 n_direct_ctl=2, seed=None, poll_ns=0):
        self.seconds = seconds
        self.rng_seed = random.randrange(1 << 30) if seed is None else seed
        self.n_vcpus = n_vcpus
        self.n_devices = n_devices
        self.n_direct_ctl = n_direct_ctl
        self.vm = Vm(irqchip=True, poll_ns=poll_ns)
        self.cpus = [self.vm.create_vcpu(c) for c in range(n_vcpus)]
        self.slots = [Slot(i, False) for i in range(n_direct)]
        self.slots += [Slot(n_direct + j, True, gsi=100 + j) for j in range(n_legacy)]
        self.free = {c: [(c, v) for v in range(self.VEC_LO, self.VEC_HI + 1)]
                     for c in range(n_vcpus)}
        self.pool_lock = threading.Lock()
        self.owner = {}                       # target -> Epoch (until the vCPU frees it)
        self.history = {}                     # target -> [("epoch", id) | ("free", t)]
        self.release_q = {c: [] for c in range(n_vcpus)}
        self.outstanding = {}                 # (slot, gen) -> Write
        self.writes = []
        self.epochs = []
        self.epochs_lock = threading.Lock()     # an epoch's id is its index in self.epochs
        self.misdelivered = []                # (t, vcpu, vector, why)
        self.acks = [0] * n_vcpus
        self.gsi_target = {}                  # gsi -> target, the table in force
        self.table_lock = threading.Lock()    # routing table + legacy assign/deassign
        self.stop_devices = threading.Event()
        self.stop_ctl = threading.Event()
        self.stop_vcpus = threading.Event()
        self.errors = []
        self.counts = {"modify": 0, "assign": 0, "deassign": 0, "table": 0, "retire": 0}

    # -- targets -------------------------------------------------------------------------------
    def alloc(self, rng, avoid=None):
        with self.pool_lock:
            cpus = [c for c in range(self.n_vcpus) if self.free[c]
                    and (avoid is None or c != avoid[0])]
            c = rng.choice(cpus)
            pool = self.free[c]
            for _ in range(8):
                i = rng.randrange(len(pool))
                if avoid is None or pool[i][1] != avoid[1]:
                    break
            pool[i], pool[-1] = pool[-1], pool[i]
            return pool.pop()

    def new_epoch(self, slot, target, begin):
        with self.epochs_lock:                # two control threads must not share an id
            e = Epoch(len(self.epochs), slot.idx, slot.gen, target, begin)
            self.epochs.append(e)
        self.owner[target] = e                # before the call that makes it live
        self.history.setdefault(target, []).append(("epoch", e.id))
        return e

    def release(self, target):
        self.release_q[target[0]].append(target)

    # -- threads -------------------------------------------------------------------------------
    def vcpu_thread(self, c):
        cpu = self.cpus[c]
        lapic = cpu.lapic
        rq = self.release_q[c]
        try:
            while not self.stop_vcpus.is_set():
                if cpu.wait_interrupt(timeout=0.01):
                    while True:
                        v = cpu.ack()
                        if v is None:
                            break
                        t = now()
                        cpu.eoi()
                        self.acks[c] += 1
                        self.on_ack(t, c, v)
                if rq:
                    irr = set(lapic.irr())
                    keep = []
                    for target in rq[:]:
                        rq.remove(target)
                        if target[1] in irr:
                            keep.append(target)
                            continue
                        del self.owner[target]
                        self.history[target].append(("free", now()))
                        with self.pool_lock:
                            self.free[c].append(target)
                    rq.extend(keep)
        except BaseException as e:
            self.errors.append(("vcpu", c, e))

    def on_ack(self, t, c, v):
        e = self.owner.get((c, v))
        if e is None:
            self.misdelivered.append((t, c, v, "target owned by no irqfd"))
            return
        w = self.outstanding.pop((e.slot, e.gen), None)
        if w is None:
            self.misdelivered.append((t, c, v, f"no outstanding write for slot {e.slot} "
                                               f"gen {e.gen} (epoch {e.id})"))
            return
        w.ack = (t, c, v, e.id)

    def device_thread(self, d):
        rng = random.Random(self.rng_seed + 1000 + d)
        mine = [s for s in self.slots if s.idx % self.n_devices == d]
        try:
            while not self.stop_devices.is_set():
                for _ in range(64):
                    s = rng.choice(mine)
                    with s.lock:
                        key = (s.idx, s.gen)
                        if key in self.outstanding:
                            continue
                        w = Write(s.idx, s.gen, now())
                        self.outstanding[key] = w
                        os.eventfd_write(s.fd, rng.randrange(1, 4))
                        w.we = now()
                    self.writes.append(w)
                time.sleep(0)
        except BaseException as e:
            self.errors.append(("device", d, e))

    def retire(self, s, then=None):
        """Close the slot's eventfd and open a new one (a new generation), then call ``then``
        (the assign): with the device lock held if STALE_ASSIGN_COUNT, so nothing is pending."""
        s.lock.acquire()
        try:
            os.close(s.fd)
            s.fd = os.eventfd(0, os.EFD_CLOEXEC)
            s.gen += 1
            s.deassign = None
            self.counts["retire"] += 1
            if STALE_ASSIGN_COUNT:
                then()
                return
        finally:
            s.lock.release()
        then()

    def direct_ctl_thread(self, k):
        rng = random.Random(self.rng_seed + 2000 + k)
        direct = [s for s in self.slots if not s.legacy]
        try:
            while not self.stop_ctl.is_set():
                s = rng.choice(direct)
                if not s.ctl.acquire(blocking=False):
                    continue
                try:
                    if s.assigned:
                        if rng.random() < 0.8:
                            self.modify(s, rng)
                        else:
                            self.deassign(s)
                    else:
                        self.retire(s, lambda: self.assign(s, rng))
                finally:
                    s.ctl.release()
                if rng.random() < 0.1:
                    time.sleep(0.0005)
        except BaseException as e:
            self.errors.append(("direct-ctl", k, e))

    def entry(self, target):
        c, v = target
        return MsiEntry(*msi_address(c), msi_data(v))

    def assign(self, s, rng):
        target = self.alloc(rng)
        call = Call("assign", now())
        s.epoch = self.new_epoch(s, target, call)
        if s.legacy:
            self.vm.irqfd(s.fd, s.gsi)
        else:
            self.vm.irqfd_direct(s.fd, self.entry(target))
        call.end = now()
        s.assigned = True
        self.counts["assign"] += 1

    def modify(self, s, rng):
        old = s.epoch
        target = self.alloc(rng, avoid=old.target)
        call = Call("modify", now())
        e = self.new_epoch(s, target, call)
        self.vm.irqfd_direct_modify(s.fd, self.entry(target))
        call.end = now()
        old.finish = call
        s.epoch = e
        self.release(old.target)
        self.counts["modify"] += 1

    def deassign(self, s):
        call = Call("deassign", now())
        if s.legacy:
            ok = self.vm.irqfd_deassign(s.fd, s.gsi)
        else:
            ok = self.vm.irqfd_direct_deassign(s.fd)
        call.end = now()
        assert ok, f"slot {s.idx}: deassign found no irqfd"
        s.epoch.finish = call
        s.deassign = call
        s.assigned = False
        self.release(s.epoch.target)
        if s.legacy:
            del self.gsi_target[s.gsi]            # next table drops it; a reassign re-adds it
        s.epoch = None
        self.counts["deassign"] += 1

    def install_table(self, changes, rng):
        """Replace the whole table; ``changes``: gsi -> new target.  Records epoch bounds."""
        table = dict(self.gsi_target)
        table.update(changes)
        call = Call("table", now())
        moved = []
        for s in self.slots:
            if s.legacy and s.assigned and s.gsi in changes:
                moved.append((s, s.epoch, self.new_epoch(s, changes[s.gsi], call)))
        self.vm.set_gsi_routing([(g, self.entry(t)) for g, t in sorted(table.items())])
        call.end = now()
        self.gsi_target = table
        for s, old, new in moved:
            old.finish = call
            s.epoch = new
            self.release(old.target)
        self.counts["table"] += 1

    def legacy_ctl_thread(self):
        rng = random.Random(self.rng_seed + 3000)
        legacy = [s for s in self.slots if s.legacy]
        try:
            while not self.stop_ctl.is_set():
                with self.table_lock:
                    r = rng.random()
                    if r < 0.6:                     # retarget a random subset via a new table
                        changes = {}
                        for s in rng.sample(legacy, rng.randrange(1, len(legacy) // 2)):
                            if s.assigned:
                                changes[s.gsi] = self.alloc(rng, avoid=s.epoch.target)
                        if changes:
                            self.install_table(changes, rng)
                    else:
                        s = rng.choice(legacy)
                        with s.ctl:
                            if s.assigned:
                                self.deassign(s)
                            else:
                                self.retire(s, lambda: self.legacy_assign(s, rng))
                time.sleep(0.0002)
        except BaseException as e:
            self.errors.append(("legacy-ctl", 0, e))

    def legacy_assign(self, s, rng):
        """A legacy irqfd comes back with a fresh target: install its route, then assign."""
        target = self.alloc(rng)
        table = dict(self.gsi_target)
        table[s.gsi] = target
        self.vm.set_gsi_routing([(g, self.entry(t)) for g, t in sorted(table.items())])
        self.gsi_target = table
        self.counts["table"] += 1
        call = Call("assign", now())
        s.epoch = self.new_epoch(s, target, call)
        self.vm.irqfd(s.fd, s.gsi)
        call.end = now()
        s.assigned = True
        self.counts["assign"] += 1

    # -- run -----------------------------------------------------------------------------------
    def setup(self):
        rng = random.Random(self.rng_seed)
        for s in self.slots:
            s.fd = os.eventfd(0, os.EFD_CLOEXEC)
        legacy = [s for s in self.slots if s.legacy]
        for s in legacy:
            self.gsi_target[s.gsi] = self.alloc(rng)
        self.vm.set_gsi_routing([(g, self.entry(t)) for g, t in sorted(self.gsi_target.items())])
        for s in self.slots:
            if s.legacy:
                call = Call("assign", now())
                s.epoch = self.new_epoch(s, self.gsi_target[s.gsi], call)
                self.vm.irqfd(s.fd, s.gsi)
                call.end = now()
                s.assigned = True
            else:
                self.assign(s, rng)

    def run(self):
        self.setup()
        vcpus = [threading.Thread(target=self.vcpu_thread, args=(c,), daemon=True)
                 for c in range(self.n_vcpus)]
        devs = [threading.Thread(target=self.device_thread, args=(d,), daemon=True)
                for d in range(self.n_devices)]
        ctls = [threading.Thread(target=self.direct_ctl_thread, args=(k,), daemon=True)
                for k in range(self.n_direct_ctl)]
        ctls.append(threading.Thread(target=self.legacy_ctl_thread, daemon=True))
        for t in vcpus + devs + ctls:
            t.start()
        end = time.monotonic() + self.seconds
        while time.monotonic() < end and not self.errors:
            time.sleep(0.05)
        self.stop_ctl.set()
        for t in ctls:
            t.join(10)
        self.stop_devices.set()
        for t in devs:
            t.join(10)
        # Quiesce: wait (bounded) until every write that must be delivered has been.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and self.pending_required():
            time.sleep(0.01)
        time.sleep(0.05)                       # let a late (wrong) delivery show up
        self.stop_vcpus.set()
        for t in vcpus:
            t.join(10)
        alive = [t.name for t in vcpus + devs + ctls if t.is_alive()]
        stats = self.vm.stats()
        self.vm.close()
        for s in self.slots:
            os.close(s.fd)
        return alive, stats

    def required(self, w, strict=True):
        """Must ``w`` be delivered?  Yes unless it overlapped or followed its irqfd's deassign.

        ``strict=False`` also excuses writes that completed before the deassign started (the
        known bug DEASSIGN_LOSES_PENDING): those count as "lost_at_deassign".
        """
        s = self.slots[w.slot]
        d = s.deassign if s.gen == w.gen else self.deassign_of(w.slot, w.gen)
        if d is None:
            return True
        return w.we < d.start and strict

    def deassign_of(self, slot, gen):
        for e in self.epochs_by_slot_gen.get((slot, gen), ()):
            if e.finish is not None and e.finish.kind == "deassign":
                return e.finish
        return None

    def pending_required(self):
        self.index_epochs()
        return [w for w in list(self.outstanding.values())
                if self.required(w, not DEASSIGN_LOSES_PENDING)]

    def index_epochs(self):
        by = {}
        for e in self.epochs:
            by.setdefault((e.slot, e.gen), []).append(e)
        self.epochs_by_slot_gen = by

    def check(self):
        """Offline invariants; returns (figures, problems)."""
        self.index_epochs()
        problems = []
        lost = []
        lost_at_deassign = 0
        wrong_epoch = []
        for w in self.writes:
            if w.ack is None:
                if self.required(w, not DEASSIGN_LOSES_PENDING):
                    lost.append(w)
                elif self.required(w):
                    lost_at_deassign += 1
                continue
            t, c, v, eid = w.ack
            e = self.epochs[eid]
            if (e.slot, e.gen) != (w.slot, w.gen):
                wrong_epoch.append((w, e, "ack attributed to another irqfd"))
                continue
            first = self.epochs_by_slot_gen[(w.slot, w.gen)][0] is e
            if not first and w.we < e.begin.start:
                wrong_epoch.append((w, e, f"write completed before the {e.begin.kind} that made "
                                          f"{e.target} current"))
            if e.finish is not None and e.finish.end and w.ws > e.finish.end:
                wrong_epoch.append((w, e, f"write started after the {e.finish.kind} that ended "
                                          f"{e.target} returned"))
            if t < w.ws:
                wrong_epoch.append((w, e, "acked before it was written"))
        delivered = sum(1 for w in self.writes if w.ack is not None)
        figures = {
            "seed": self.rng_seed,
            "writes": len(self.writes),
            "delivered": delivered,
            "acks": sum(self.acks),
            "lost": len(lost),
            "lost_at_deassign": lost_at_deassign,
            "misdelivered": len(self.misdelivered) + len(wrong_epoch),
            "undelivered_overlapping_or_after_deassign": sum(
                1 for w in self.writes if w.ack is None and not self.required(w)),
            "epochs": len(self.epochs),
            **self.counts,
        }
        for w in lost[:5]:
            problems.append(f"lost: {w} epochs={self.epochs_by_slot_gen.get((w.slot, w.gen))}")
        for m in self.misdelivered[:5]:
            hist = [(k, self.epochs[x] if k == "epoch" else x)
                    for k, x in self.history.get((m[1], m[2]), [])[-3:]]
            problems.append(f"misdelivered: {m}; last owners of the target: {hist}")
        for w, e, why in wrong_epoch[:5]:
            problems.append(f"misdelivered: {why}: {w} {e}")
        return figures, problems


def run_churn(**kw):
    ch = Churn(**kw)
    alive, stats = ch.run()
    figures, problems = ch.check()
    figures["engine_events"] = stats["events"]
    figures["vcpu_harvested"] = stats.get("vcpu_harvested", 0)
    print(f"\nchurn figures: {figures}")
    assert not ch.errors, ch.errors
    assert not alive, f"threads did not stop: {alive}"
    assert not problems, "\n".join(problems)
    assert figures["writes"] > 1000 and figures["delivered"] > 1000
    assert figures["modify"] > 50 and figures["table"] > 10 and figures["deassign"] > 10
    return figures


def test_churn_short():
    """A few seconds of flood + churn: lost = 0, misdelivered = 0."""
    run_churn(seconds=3.0)


def test_churn_short_with_halt_polling_vcpus():
    """The same with vCPUs that halt-poll: they harvest the eventfds themselves, concurrently
    with each other and the engine, while irqfds are retargeted and deassigned."""
    figures = run_churn(seconds=3.0, poll_ns=200_000)
    assert figures["delivered"] > 0 and figures["vcpu_harvested"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="long churn run: set KVMIRQFAST_LONG=1")
def test_churn_long():
    """The long run: minutes of churn (KVMIRQFAST_CHURN_SECONDS, default 120)."""
    run_churn(seconds=float(os.environ.get("KVMIRQFAST_CHURN_SECONDS", "120")))


# -- the churn invariants, one at a time and deterministically -------------------------------------
# These pin down the known bugs the churn run steers around (see the top of this file).

def _E(cpu, vector):
    return MsiEntry(*msi_address(cpu), msi_data(vector))


def _wait(pred, timeout=2.0):
    end = time.monotonic() + timeout
    while not pred() and time.monotonic() < end:
        time.sleep(0.001)
    return pred()


def test_write_completed_before_deassign_is_delivered():
    with Vm(irqchip=True) as vm:
        cpus = [vm.create_vcpu(c) for c in range(2)]
        lost = 0
        for _ in range(20):                                   # 20 rounds of 256 irqfds
            fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(256)]
            for i, fd in enumerate(fds):
                vm.irqfd_direct(fd, _E(i % 2, 0x20 + i // 2))
            for fd in fds:
                os.eventfd_write(fd, 1)                       # completed...
            for fd in fds:
                vm.irqfd_direct_deassign(fd)                  # ...before its deassign started
            _wait(lambda: sum(len(c.pending()) for c in cpus) == 256, 0.2)
            lost += 256 - sum(len(c.pending()) for c in cpus)
            for c in cpus:
                while c.ack() is not None:
                    c.eoi()
            for fd in fds:
                os.close(fd)
        assert lost == 0, f"{lost} of {20 * 256} writes lost at deassign"


@pytest.mark.parametrize("retarget", ["modify", "table"])
def test_event_pending_at_assign_is_delivered_once(retarget):
    with Vm(irqchip=True) as vm:
        cpu = vm.create_vcpu(0)
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            os.eventfd_write(fd, 1)                           # one write, before assign
            if retarget == "modify":
                vm.irqfd_direct(fd, _E(0, 0x41))
            else:
                vm.set_gsi_routing([(7, _E(0, 0x41))])
                vm.irqfd(fd, 7)
            assert _wait(lambda: cpu.pending() == [0x41])
            assert cpu.ack() == 0x41 and cpu.eoi() == 0x41
            if retarget == "modify":                          # no write since
                vm.irqfd_direct_modify(fd, _E(0, 0x42))
            else:
                vm.set_gsi_routing([(7, _E(0, 0x42))])
            time.sleep(0.05)
            assert cpu.pending() == [], "the write was delivered twice"
        finally:
            os.close(fd)


def test_direct_modify_of_a_deferred_route_keeps_earlier_writes_on_the_old_line():
    with Vm(irqchip=True) as vm:
        cpu = vm.create_vcpu(0)
        vm.ioapic.set_redirection(3, 0x53)
        vm.ioapic.set_redirection(4, 0x54)
        fd = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            r = vm.irqfd_direct(fd, IrqchipEntry(2, 3))
            with vm._lock:                                    # the deferred worker is slow...
                os.eventfd_write(fd, 1)
                assert _wait(lambda: r.inject_pending)         # ...the event is queued for it
                vm.irqfd_direct_modify(fd, IrqchipEntry(2, 4))
            assert _wait(lambda: cpu.pending())
            time.sleep(0.02)
            assert cpu.pending() == [0x53]
        finally:
            os.close(fd)
