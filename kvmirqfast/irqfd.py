"""irqfds as the control plane sees them: eventfd identity, route words, claims, resamplers.

(The index of a VM's irqfds by eventfd identity is native: ``_index.IrqfdIndex``.)

KVM identifies an irqfd by its eventfd (the ``struct eventfd_ctx``), not by the fd number: a
``dup()`` of an assigned eventfd is the same eventfd, and since KVM's wait entry became an
exclusive priority waiter an eventfd may feed only one irqfd in the whole system.  Userspace
sees that identity as ``eventfd-id`` in ``/proc/self/fdinfo/FD``; we key everything on it.
"""

import errno
import os
import threading
import weakref

from ._engine import IrqfdRecord
from ._engine import eventfd_info as _eventfd_info

# -- route words (the engine's view of a routing entry; layout in _lapic.pxd) ------------------
ROUTE_NONE = 0
ROUTE_MSI = 1
ROUTE_SLOW = 2


def msi_route_word(msg):
    """Pack a decoded MSI (``arch.x86.MsiMessage``) into the engine's 64-bit route word."""
    return (msg.vector & 0xFF
            | (msg.delivery_mode & 7) << 8
            | int(bool(msg.dest_logical)) << 11
            | int(bool(msg.level_trigger)) << 12
            | ROUTE_MSI << 13
            | (msg.dest_id & 0xFFFFFFFF) << 32)


SLOW_ROUTE_WORD = ROUTE_SLOW << 13
NO_ROUTE_WORD = ROUTE_NONE << 13


# -- eventfd identity ---------------------------------------------------------------------------
def eventfd_info(fd):
    """``(identity, counter)`` of the eventfd behind ``fd``, without consuming the counter.

    The identity (an int) is equal for dup()s and unique among open eventfds; on kernels
    without ``eventfd-id`` it is -1 - fd (negative: ids are not).  Raises TypeError for a
    non-int, OSError(EBADF) for a closed fd and OSError(EINVAL) for an fd that is not an
    eventfd (what KVM_IRQFD returns).  O(1): one read of /proc/self/fdinfo, in C (~5-9 us here).
    """
    if not isinstance(fd, int) or isinstance(fd, bool):
        raise TypeError(f"eventfd must be an int file descriptor, not {type(fd).__name__}")
    if not 0 <= fd < 2**31:
        raise OSError(errno.EBADF, f"fd {fd}: Bad file descriptor")
    key, count = _eventfd_info(fd)
    return (-1 - fd if key is None else key), count     # kernels before eventfd-id: fd number


def eventfd_key(fd):
    """The identity of the eventfd behind ``fd`` (see ``eventfd_info``)."""
    return eventfd_info(fd)[0]


def eventfd_count(fd):
    """The eventfd's counter, read without consuming it (see ``eventfd_info``)."""
    return eventfd_info(fd)[1]


class _Claims:
    """Process-wide: which eventfds feed an irqfd (any VM).  A second claim is EBUSY.

    Owners are held weakly, so a Vm dropped without close() can still be collected.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._owners = {}

    def claim(self, key, owner):
        with self._lock:
            ref = self._owners.get(key)
            if ref is not None and ref() is not None and not ref().closed:
                raise OSError(errno.EBUSY, "eventfd is already assigned to an irqfd")
            self._owners[key] = weakref.ref(owner)

    def release(self, key, owner):
        with self._lock:
            ref = self._owners.get(key)
            if ref is not None and ref() in (owner, None):
                del self._owners[key]

    def release_own(self, key, owner):
        """``release`` for an open owner, serialized by its own lock (a deassign): a claim
        replaces only a dead or closed owner's entry, so this one cannot change under us and
        the claims lock is not needed.  O(1), two dict operations."""
        ref = self._owners.get(key)
        if ref is not None and ref() is owner:
            del self._owners[key]

    def _after_fork_in_child(self):
        self._lock = threading.Lock()         # the parent's lock may have been held at fork


CLAIMS = _Claims()
os.register_at_fork(after_in_child=CLAIMS._after_fork_in_child)


class Resampler:
    """KVM's irqfd resampler: one per level line, shared by the irqfds that assert it.

    The line is asserted with the resampler's IRQ source id when an irqfd fires; when the guest
    EOIs the line's vector, ``acked()`` lowers it and signals every resamplefd so each device can
    re-assert if it still needs service.
    """

    def __init__(self, line):
        self.line = line                 # ("gsi", n) or ("pin", irqchip, pin)
        self.resamplefds = []            # our own dup()s, closed when the resampler goes

    def add(self, fd):
        self.resamplefds.append(os.dup(fd))

    def remove(self, fd_dup):
        self.resamplefds.remove(fd_dup)
        os.close(fd_dup)

    def signal(self):
        for fd in self.resamplefds:
            try:
                os.eventfd_write(fd, 1)
            except OSError:
                pass                     # a full counter or a closed peer: KVM ignores it too

    def close(self):
        for fd in self.resamplefds:
            os.close(fd)
        self.resamplefds = []


def new_record(fd, key, gsi=None, entry=None, direct=False):
    return IrqfdRecord(fd, key, gsi, entry, direct)
