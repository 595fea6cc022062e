"""The ``kvmirqfast`` command: ``kvmirqfast selftest`` and ``kvmirqfast bench``."""

import argparse
import sys


def _selftest(args):
    from .selftest import format_report, real_kvm_route_limit, selftest
    if args.irqfds < 1 or args.vcpus < 1 or args.vcpus > 256:
        print("kvmirqfast selftest: --irqfds must be >= 1 and --vcpus in 1..256", file=sys.stderr)
        return 2
    if args.backend == "kvm":
        from .kvm import KvmUnavailable
        from .selftest_kvm import format_kvm_report, kvm_selftest
        try:
            report = kvm_selftest(irqfds=args.irqfds, vcpus=args.vcpus,
                                  device_threads=args.devices, poll_ns=args.poll_ns,
                                  out=None if args.quiet else sys.stderr)
        except KvmUnavailable as e:
            print(f"kvmirqfast selftest: {e}", file=sys.stderr)
            return 2
        print(format_kvm_report(report, args.vcpus))
        return 0 if report.ok else 1
    report = selftest(irqfds=args.irqfds, vcpus=args.vcpus, device_threads=args.devices,
                      poll_ns=args.poll_ns, out=None if args.quiet else sys.stderr)
    print(format_report(report, args.irqfds, args.vcpus))
    if not args.no_kvm:
        line = real_kvm_route_limit()
        if line:
            print("  " + line)
    return 0 if report.ok else 1


def _bench(args):
    from .bench import main as bench_main
    return bench_main(args)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="kvmirqfast",
                                     description="KVM irqfds in-process, with KVM_IRQFD_DIRECT")
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("selftest", help="fire many direct irqfds at 4 vCPUs and check every one")
    st.add_argument("--irqfds", type=int, default=8192, help="direct irqfds (default 8192)")
    st.add_argument("--vcpus", type=int, default=4, help="vCPUs (default 4)")
    st.add_argument("--devices", type=int, default=2, help="device (writer) threads (default 2)")
    st.add_argument("--poll-ns", type=int, default=0, help="halt-polling window in ns (default 0)")
    st.add_argument("--backend", choices=("model", "kvm"), default="model",
                    help="model: the in-process engine (default); kvm: real /dev/kvm with a tiny "
                         "guest per vCPU (direct irqfds emulated with GSIs: stops at 4096)")
    st.add_argument("--no-kvm", action="store_true", help="skip the real /dev/kvm comparison")
    st.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    st.set_defaults(func=_selftest)
    bn = sub.add_parser("bench", help="measure the design against its baselines (same run) and "
                                      "print a table of ratios and targets")
    bn.add_argument("--quick", action="store_true", help="smaller K and shorter runs (~30 s)")
    bn.add_argument("--json", metavar="FILE", help="write pytest-benchmark-style JSON to FILE")
    bn.add_argument("--plot", metavar="FILE.png",
                    help="cost per delivery against K and per irqfd against N, with the "
                         "baselines, and the ratios against their targets (needs matplotlib: "
                         "pip install 'kvmirqfast[plot]')")
    bn.add_argument("--only", metavar="FIGS", help="comma-separated subset of: flood, pyload, "
                                                   "pingpong, retarget, assign, memory, kernel")
    bn.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    bn.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
