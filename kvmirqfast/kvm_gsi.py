"""How VMMs survive today without ``KVM_IRQFD_DIRECT``: a GSI per direct irqfd, in one table.

The real-``/dev/kvm`` backend (``kvmirqfast.kvm``) emulates a direct irqfd with a legacy one: it
gives the irqfd a GSI of its own, routes that GSI to the irqfd's entry, and pushes the user's
routing table merged with every such route to KVM in one ``KVM_SET_GSI_ROUTING``.  This module is
the bookkeeping for that, and nothing else (no ioctls, no fds), so it is unit-testable anywhere.

Rules:

- **User GSIs win.**  A GSI is *reserved* when the user's own table routes it or a legacy irqfd of
  the user is bound to it (an irqfd on a GSI without a route is legal and must keep delivering
  nothing).  A direct route never sits on a reserved GSI: when the user's new table (or a new
  legacy irqfd) claims the GSI of a direct route, that route *moves* to a free GSI; the caller
  gets the list of moves and re-binds those irqfds.
- Direct routes take the highest free GSI (4095 downwards), far from where VMMs allocate theirs,
  so moves are rare.
- **Capacity** is KVM's: at most ``KVM_MAX_IRQ_ROUTES`` (4096) entries in the merged table, and
  every GSI below 4096.  An operation that would need more raises :class:`RoutingTableFull`
  (``OSError`` with ``errno.EINVAL``, what KVM returns for ``nr > 4096``) naming the numbers, and
  changes nothing.
- **Order in the merged table**: direct routes first, the user's entries after, in the user's
  order, and last the direct routes added with ``tail=True``.  KVM's chip/pin map keeps the *last*
  entry naming a pin, and reports a pin's EOIs (ack notifiers: irqfd resamplers) on that GSI
  only.  So a plain direct route never takes a pin's acks from the user's GSI, and a resampling
  direct irqchip route (``tail=True``) does get the acks of its pin -- which a resampling irqfd of
  the user on the same pin then loses (KVM has one GSI per pin for acks; that conflict is KVM's).

Costs: add/remove/modify O(log n); ``set_user_table`` and moves O(table + free GSIs);
``table_bytes`` O(n) (one copy of the packed entries).
"""

import errno
from collections import Counter
from typing import NamedTuple

from sortedcontainers import SortedSet

from . import uapi
from .routing import GsiRoutingTable

__all__ = ["RoutingTableFull", "DirectRoute", "Move", "GsiAllocator"]

_ENTRY = uapi.ROUTING_ENTRY.size          # 48


class RoutingTableFull(OSError):
    """The merged routing table would exceed KVM's limit; nothing was changed.

    An ``OSError`` whose ``errno`` is KVM's (``EINVAL``) and whose message says the table is full
    and why (user routes, direct routes, the limit).
    """

    def __init__(self, message, err=errno.EINVAL):
        super().__init__(err, message)


class DirectRoute(NamedTuple):
    gsi: int
    entry: object


class Move(NamedTuple):
    """A direct route that had to leave ``old_gsi`` (now the user's) for ``new_gsi``."""
    key: object
    old_gsi: int
    new_gsi: int


class GsiAllocator:
    """GSIs for direct irqfds, around the user's routing table; the merged table KVM gets.

    ``key`` identifies a direct irqfd (the backend uses the eventfd identity).  ``max_routes`` is
    ``KVM_MAX_IRQ_ROUTES``; smaller values make the limit testable.
    """

    def __init__(self, max_routes=uapi.KVM_MAX_IRQ_ROUTES):
        self.max_routes = max_routes
        self._user = GsiRoutingTable()
        self._user_bytes = b""
        self._user_gsis = frozenset()
        self._legacy = Counter()          # gsi -> legacy irqfds bound to it
        self._gsi = {}                    # key -> gsi
        self._entry = {}                  # key -> entry
        self._region = {}                 # key -> 0 (before the user's entries) or 1 (after)
        self._slot = {}                   # key -> slot index in its region
        self._slot_key = ([], [])         # per region: slot -> key
        self._packed = (bytearray(), bytearray())   # per region: packed entries in slot order
        self._by_gsi = {}                 # gsi -> key
        self._free = SortedSet(range(max_routes))

    # -- queries ---------------------------------------------------------------------------------
    @property
    def user_table(self):
        """The user's table (what ``gsi_routing`` shows): the merged table minus direct routes."""
        return self._user

    def __len__(self):
        """Number of direct routes."""
        return len(self._gsi)

    def __contains__(self, key):
        return key in self._gsi

    def get(self, key):
        """``DirectRoute(gsi, entry)`` of direct irqfd ``key``, or None."""
        gsi = self._gsi.get(key)
        return None if gsi is None else DirectRoute(gsi, self._entry[key])

    def direct_key_at(self, gsi):
        """The key of the direct route on ``gsi``, or None."""
        return self._by_gsi.get(gsi)

    def is_reserved(self, gsi):
        """True if ``gsi`` is the user's: routed by the user's table or bound by a legacy irqfd."""
        return gsi in self._user_gsis or self._legacy[gsi] > 0

    @property
    def route_count(self):
        """Entries in the merged table (user entries + direct routes)."""
        return len(self._user) + len(self._gsi)

    @property
    def free_gsis(self):
        return len(self._free)

    def merged_pairs(self):
        """The merged table as ``(gsi, entry)`` pairs, in the order KVM gets them."""
        head, tail = ([(self._gsi[k], self._entry[k]) for k in keys] for keys in self._slot_key)
        return head + list(self._user.entries) + tail

    def table_bytes(self):
        """The merged ``struct kvm_irq_routing`` as a ``bytearray`` (pass it to fcntl.ioctl)."""
        buf = bytearray(uapi.ROUTING_HEADER.pack(self.route_count, 0))
        buf += self._packed[0]
        buf += self._user_bytes
        buf += self._packed[1]
        return buf

    # -- capacity --------------------------------------------------------------------------------
    def _full(self, what, user_entries, directs):
        total = user_entries + directs
        return RoutingTableFull(
            f"GSI routing table full: {what} needs {total} routes ({user_entries} of the user's "
            f"table + {directs} for direct irqfds), KVM allows at most {self.max_routes} "
            f"(KVM_MAX_IRQ_ROUTES); nothing was changed")

    def _no_gsi(self, what, need):
        return RoutingTableFull(
            f"GSI routing table full: {what} needs {need} free GSI(s) below {self.max_routes}, "
            f"but every GSI is the user's or a direct irqfd's "
            f"({len(self._user_gsis)} routed by the user, "
            f"{sum(1 for g, n in self._legacy.items() if n and g not in self._user_gsis)} "
            f"bound by legacy irqfds only, {len(self._gsi)} direct); nothing was changed")

    # -- direct routes -------------------------------------------------------------------------
    def add(self, key, entry, gsi=None, tail=False):
        """Give direct irqfd ``key`` a GSI routed to ``entry``; return the GSI.

        ``tail`` puts the route after the user's entries (see the module doc: for resampling
        irqchip routes).  ``gsi`` (for undo) puts it back on a specific free GSI.
        RoutingTableFull if the merged table is full; KeyError if ``key`` already has a route.
        O(log n).
        """
        if key in self._gsi:
            raise KeyError(f"direct route {key!r} exists")
        if self.route_count + 1 > self.max_routes:
            raise self._full("one more direct irqfd", len(self._user), len(self._gsi) + 1)
        if gsi is None:
            if not self._free:
                raise self._no_gsi("one more direct irqfd", 1)
            gsi = self._free.pop(-1)
        else:
            self._free.remove(gsi)            # KeyError if not free
        self._gsi[key] = gsi
        self._entry[key] = entry
        self._by_gsi[gsi] = key
        region = int(bool(tail))
        self._region[key] = region
        self._slot[key] = len(self._slot_key[region])
        self._slot_key[region].append(key)
        self._packed[region].extend(entry.to_uapi(gsi))
        return gsi

    def remove(self, key):
        """Drop the route of ``key``; return its ``DirectRoute``.  KeyError if none.  O(log n)."""
        gsi = self._gsi.pop(key)
        entry = self._entry.pop(key)
        del self._by_gsi[gsi]
        slot = self._slot.pop(key)
        region = self._region.pop(key)
        keys, packed = self._slot_key[region], self._packed[region]
        last = len(keys) - 1
        if slot != last:                      # move the last slot into the hole
            moved = keys[last]
            keys[slot] = moved
            self._slot[moved] = slot
            packed[slot * _ENTRY:(slot + 1) * _ENTRY] = packed[last * _ENTRY:]
        keys.pop()
        del packed[last * _ENTRY:]
        if not self.is_reserved(gsi):
            self._free.add(gsi)
        return DirectRoute(gsi, entry)

    def modify(self, key, entry):
        """Route ``key``'s GSI to ``entry`` instead; return the old entry.  O(1)."""
        old = self._entry[key]
        self._entry[key] = entry
        self._write_slot(key)
        return old

    def _write_slot(self, key):
        slot = self._slot[key]
        self._packed[self._region[key]][slot * _ENTRY:(slot + 1) * _ENTRY] = \
            self._entry[key].to_uapi(self._gsi[key])

    def _move(self, key, new_gsi):
        old = self._gsi[key]
        del self._by_gsi[old]
        self._gsi[key] = new_gsi
        self._by_gsi[new_gsi] = key
        self._write_slot(key)
        return Move(key, old, new_gsi)

    # -- the user's side -----------------------------------------------------------------------
    def set_user_table(self, table):
        """Make ``table`` (a validated ``GsiRoutingTable``) the user's; return the moves.

        Direct routes on GSIs the new table routes move to free GSIs (highest first).
        RoutingTableFull, with nothing changed, if ``len(table)`` + direct routes exceed the
        limit or there are not enough free GSIs.  O(table + free GSIs).
        """
        if len(table) + len(self._gsi) > self.max_routes:
            raise self._full("the new routing table", len(table), len(self._gsi))
        new_user = frozenset(table.gsis())
        displaced = [self._by_gsi[g] for g in sorted(new_user) if g in self._by_gsi]
        taken = new_user | {g for g, n in self._legacy.items() if n} | \
            {g for g in self._by_gsi if g not in new_user}
        free = SortedSet(g for g in range(self.max_routes) if g not in taken)
        if len(free) < len(displaced):
            raise self._no_gsi("the new routing table", len(displaced))
        self._user = table
        self._user_gsis = new_user
        self._user_bytes = bytes(table.to_uapi()[uapi.ROUTING_HEADER.size:])
        moves = [self._move(key, free.pop(-1)) for key in displaced]
        self._free = free
        return moves

    def reserve_legacy(self, gsi):
        """A legacy irqfd is being bound to ``gsi``: reserve it; return the moves (0 or 1).

        RoutingTableFull, with nothing changed, if a direct route must move and no GSI is free.
        GSIs at or above the limit are never routed, so they reserve nothing.
        """
        if not 0 <= gsi < self.max_routes:
            return []
        moves = []
        key = self._by_gsi.get(gsi)
        if key is not None:
            if not self._free:
                raise self._no_gsi(f"a legacy irqfd on GSI {gsi}", 1)
            moves.append(self._move(key, self._free.pop(-1)))
        self._legacy[gsi] += 1
        self._free.discard(gsi)
        return moves

    def release_legacy(self, gsi):
        """A legacy irqfd on ``gsi`` was deassigned."""
        if not 0 <= gsi < self.max_routes or self._legacy[gsi] <= 0:
            return
        self._legacy[gsi] -= 1
        if self._legacy[gsi] == 0:
            del self._legacy[gsi]
            if gsi not in self._user_gsis and gsi not in self._by_gsi:
                self._free.add(gsi)

    # -- undo for the multi-step operations ------------------------------------------------------
    def snapshot(self):
        """An opaque copy of the state, for :meth:`restore` when pushing the table fails."""
        return (self._user, self._user_bytes, self._user_gsis, Counter(self._legacy),
                dict(self._gsi), dict(self._entry), dict(self._region), dict(self._slot),
                tuple(list(k) for k in self._slot_key), tuple(bytearray(p) for p in self._packed),
                dict(self._by_gsi), SortedSet(self._free))

    def restore(self, snap):
        (self._user, self._user_bytes, self._user_gsis, self._legacy, self._gsi, self._entry,
         self._region, self._slot, self._slot_key, self._packed, self._by_gsi, self._free) = snap

    def check(self):
        """Assert the internal invariants (for tests).  O(n)."""
        all_keys = self._slot_key[0] + self._slot_key[1]
        assert set(self._gsi) == set(self._entry) == set(self._slot) == set(self._region) \
            == set(all_keys) and len(all_keys) == len(self._gsi)
        for keys, packed in zip(self._slot_key, self._packed):
            assert len(packed) == _ENTRY * len(keys)
        for key, gsi in self._gsi.items():
            assert self._by_gsi[gsi] == key
            assert not self.is_reserved(gsi), f"direct route on reserved GSI {gsi}"
            assert 0 <= gsi < self.max_routes
            slot, region = self._slot[key], self._region[key]
            assert self._slot_key[region][slot] == key
            assert bytes(self._packed[region][slot * _ENTRY:(slot + 1) * _ENTRY]) == \
                self._entry[key].to_uapi(gsi)
        for g in range(self.max_routes):
            used = g in self._by_gsi or self.is_reserved(g)
            assert (g in self._free) == (not used), f"GSI {g} free={g in self._free} used={used}"
        assert self.route_count <= self.max_routes
