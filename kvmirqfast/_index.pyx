# cython: language_level=3, boundscheck=False, wraparound=False
"""The VM's irqfds by eventfd identity: a tree threaded through the records themselves.

KVM's proposal replaces the irqfd list walk with a tree.  Ours is a treap: a binary search tree
on the key that is also a heap on a hash of the key, so it is balanced in expectation in
whatever order identities arrive, with no rebalancing state to keep.  The links live in each
record's irqfd_t (as an rb_node lives in the struct it indexes), so indexing allocates nothing.

The control plane uses it under the Vm lock; the engine never looks at it.  The index holds a
reference to each record it contains.
"""

from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport int64_t, uint64_t

from kvmirqfast._engine cimport IrqfdRecord, irqfd_t


cdef inline uint64_t priority(int64_t key) noexcept nogil:
    # splitmix64's finalizer: a bijection, so distinct keys never tie, and consecutive keys
    # (eventfd ids are handed out in order) get unrelated priorities.
    cdef uint64_t z = <uint64_t>key + 0x9E3779B97F4A7C15ULL
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef void split(irqfd_t *t, int64_t key, irqfd_t **below, irqfd_t **above) noexcept nogil:
    """Cut t into the keys below ``key`` and the keys above it (``key`` is not in t)."""
    if t == NULL:
        below[0] = above[0] = NULL
    elif t.index_key < key:
        split(t.index_right, key, &t.index_right, above)
        below[0] = t
    else:
        split(t.index_left, key, below, &t.index_left)
        above[0] = t


cdef irqfd_t *insert(irqfd_t *t, irqfd_t *n) noexcept nogil:
    """Insert n into t (n's key is not in t); returns the new root.  n goes where its
    priority puts it on the search path, and what was there is split around its key."""
    if t == NULL:
        return n
    if priority(n.index_key) > priority(t.index_key):
        split(t, n.index_key, &n.index_left, &n.index_right)
        return n
    if n.index_key < t.index_key:
        t.index_left = insert(t.index_left, n)
    else:
        t.index_right = insert(t.index_right, n)
    return t


cdef irqfd_t *merge(irqfd_t *a, irqfd_t *b) noexcept nogil:
    """Join two treaps, every key of a below every key of b."""
    if a == NULL:
        return b
    if b == NULL:
        return a
    if priority(a.index_key) > priority(b.index_key):
        a.index_right = merge(a.index_right, b)
        return a
    b.index_left = merge(a, b.index_left)
    return b


cdef void in_order(irqfd_t *t, list out):
    while t != NULL:
        in_order(t.index_left, out)
        out.append(<IrqfdRecord>t.owner)
        t = t.index_right


cdef class IrqfdIndex:
    """Records by eventfd identity (an int64 key, ``IrqfdRecord.key``), in key order.

    ``get``, ``add`` and ``pop`` are O(log n) expected, with no allocation; iteration is O(n).
    """

    cdef irqfd_t *find(self, int64_t key) noexcept:
        cdef irqfd_t *t = self.root
        while t != NULL and t.index_key != key:
            t = t.index_left if key < t.index_key else t.index_right
        return t

    def get(self, int64_t key):
        """The record for ``key`` or None.  O(log n)."""
        cdef irqfd_t *t = self.find(key)
        return None if t == NULL else <IrqfdRecord>t.owner

    def add(self, IrqfdRecord record not None):
        """Insert ``record`` under ``record.key`` (KeyError if the key is taken).  O(log n)."""
        cdef int64_t key = record.key
        if self.find(key) != NULL:
            raise KeyError(key)
        record.rec.index_key = key
        record.rec.index_left = record.rec.index_right = NULL
        self.root = insert(self.root, &record.rec)
        Py_INCREF(record)
        self.n += 1

    def pop(self, int64_t key):
        """Remove and return the record for ``key`` (KeyError if none).  O(log n)."""
        cdef irqfd_t **link = &self.root
        cdef irqfd_t *t
        while link[0] != NULL and link[0].index_key != key:
            link = &link[0].index_left if key < link[0].index_key else &link[0].index_right
        t = link[0]
        if t == NULL:
            raise KeyError(key)
        link[0] = merge(t.index_left, t.index_right)
        t.index_left = t.index_right = NULL
        record = <IrqfdRecord>t.owner           # a new reference for the caller
        Py_DECREF(record)                       # the index's own
        self.n -= 1
        return record

    def legacy(self):
        """Records bound to a GSI, in key order.  O(n)."""
        return [r for r in self if not r.direct]

    def depth(self):
        """Height of the tree (for tests: O(log n) expected).  O(n)."""
        return _depth(self.root)

    def __len__(self):
        return self.n

    def __iter__(self):
        """Iterate over a snapshot, in key order (the index may change meanwhile)."""
        cdef list out = []
        in_order(self.root, out)
        return iter(out)

    def __dealloc__(self):
        cdef list held = []
        in_order(self.root, held)               # new references keep each record alive
        self.root = NULL
        for record in held:
            (<IrqfdRecord>record).rec.index_left = (<IrqfdRecord>record).rec.index_right = NULL
            Py_DECREF(record)                   # the index's own


cdef Py_ssize_t _depth(irqfd_t *t):
    if t == NULL:
        return 0
    return 1 + max(_depth(t.index_left), _depth(t.index_right))
