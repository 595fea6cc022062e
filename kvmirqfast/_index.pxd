# The VM's irqfds by eventfd identity (see _index.pyx).

from libc.stdint cimport int64_t

from kvmirqfast._engine cimport irqfd_t

cdef class IrqfdIndex:
    cdef irqfd_t *root          # a treap threaded through irqfd_t.index_left/index_right
    cdef Py_ssize_t n
    cdef irqfd_t *find(self, int64_t key) noexcept
