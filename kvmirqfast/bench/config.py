"""Benchmark configuration: which figures, how big, how long."""





FIGURES = ("flood", "pyload", "pingpong", "retarget", "assign", "memory", "kernel")
FIRST_VECTOR = 0x20


def _vector(i):
    return FIRST_VECTOR + i % (256 - FIRST_VECTOR)


# ================================================================================================
# Configuration
# ================================================================================================
class Config:
    """Sizes and durations of one run.  ``Config.full()``, ``.quick()``, ``.tiny()`` (tests)."""

    def __init__(self, **kw):
        self.name = "full"
        self.flood_ks = (16, 1024, 16384)
        self.flood_seconds = 1.0
        self.flood_warmup = 0.2
        self.flood_rounds = 3            # median of rounds, consumers interleaved
        self.flood_paced_rate = 200_000  # writes/s of the paced reference run (0: none)
        self.pyload_k = 1024
        self.pp_rounds = 3               # interleaved rounds, samples pooled
        self.pp_blocking_iters = 1500
        self.pp_spin_iters = 8000
        self.pp_seconds = 2.0            # time cap per ping-pong run
        self.pp_poll_ns = 200_000
        self.pp_settle_s = 0.2           # rest before each ping-pong run (see fig_pingpong)
        self.retarget_n = 4096
        self.retarget_direct_reps = 400
        self.retarget_table_reps = 7
        self.retarget_kvm_reps = 40
        self.assign_ns = (16, 256, 1024, 4096, 16384)
        self.assign_min_ops = 4096       # repeat small N until this many ops
        self.kvm_assign_ns = (16, 1024, 4096)
        self.kvm_pinned_n = 1024         # N for the pinned real-KVM deassign runs
        self.memory_n = 16000
        self.kernel_ks = (1, 1024)
        self.kernel_writes = 200_000
        self.__dict__.update(kw)

    @classmethod
    def full(cls):
        return cls()

    @classmethod
    def quick(cls):
        return cls(name="quick", flood_ks=(16, 1024, 4096), flood_seconds=0.3, flood_warmup=0.1,
                   flood_rounds=1, pp_rounds=1, pp_blocking_iters=800, pp_spin_iters=3000,
                   pp_seconds=0.7,
                   retarget_n=4096, retarget_direct_reps=100, retarget_table_reps=2,
                   retarget_kvm_reps=10, assign_ns=(16, 1024, 4096), assign_min_ops=1024,
                   kvm_assign_ns=(16, 1024), kvm_pinned_n=1024, memory_n=4000,
                   kernel_ks=(1, 256), kernel_writes=50_000)

    @classmethod
    def tiny(cls):
        """The smallest run that still exercises every code path (the smoke test)."""
        return cls(name="tiny", flood_ks=(16, 64), flood_seconds=0.1, flood_warmup=0.03,
                   flood_rounds=1, pyload_k=64, pp_rounds=1, pp_blocking_iters=100,
                   pp_spin_iters=300, pp_seconds=0.2, pp_settle_s=0.01, retarget_n=256,
                   retarget_direct_reps=20,
                   retarget_table_reps=1, retarget_kvm_reps=3, assign_ns=(16, 128),
                   assign_min_ops=64, kvm_assign_ns=(16,), kvm_pinned_n=16, memory_n=256,
                   kernel_ks=(1,), kernel_writes=5000)
