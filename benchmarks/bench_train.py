"""Speed and memory of cyconv beside PyTorch, measured in one run; writes docs/benchmarks.rst.

Networks (benchmarks/systems.py): the default recipe's (models.small, 128 px), the
reference network, the --model resnet recipe's (models.resnet_small, 128 px),
ResNet-18 and MobileNetV2 (224 px).  Each is timed training
(forward + loss + backward + SGD with momentum) and in inference, on 1 and 2
threads, by cyconv and by PyTorch in both memory layouts, all with the same
weights.  A run = warm-up steps, then N timed steps with the three systems
alternating step by step in this process (in a rotating order).  Every run is
repeated (3 times by default; the repeats of all cases interleave, so they sample
the machine's load over the whole command) and the tables give the median and the
range of the repeats.  cyconv's ratio to PyTorch's faster layout is taken within
each run.  The sgemm peak (numpy float32 2048^3, per thread count) is measured at
the start and at the end.  Memory: peak RSS and its growth training ResNet-18 at
224 px, batch 32, each system alone in a child process (memory_child.py).

PyTorch and cyconv share one OpenMP runtime in a process: that of the library
imported first, with that library's settings.  By default PyTorch is imported
first (its defaults); --openmp-settings cyconv imports cyconv first (passive
waiting after a short spin, cyconv/_environment.py).

    python benchmarks/bench_train.py            # the full run; writes docs/benchmarks.rst
    python benchmarks/bench_train.py --quick    # smoke test: batches / 8, 2 steps, 1 repeat
    python benchmarks/bench_train.py --networks default reference --threads 2 --no-memory \\
        --output /tmp/benchmarks.rst
"""
import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# systems.NETWORKS' keys (systems imports cyconv, so it is imported later)
NETWORK_NAMES = ["default", "reference", "resnet", "resnet18", "mobilenet_v2"]


def parse_args(network_names):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--networks", nargs="+", choices=network_names, default=network_names)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3, help="runs per case (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: batches / 8, 1 warm-up + 2 steps, 1 repeat, 3 memory steps")
    p.add_argument("--no-memory", action="store_true", help="skip the memory children")
    p.add_argument("--openmp-settings", choices=["pytorch", "cyconv"], default="pytorch",
                   help="whose OpenMP settings the shared runtime takes (the library "
                        "imported first; default pytorch)")
    p.add_argument("--output", default=str(ROOT / "docs" / "benchmarks.rst"),
                   help="the reStructuredText file to write (default docs/benchmarks.rst)")
    args = p.parse_args()
    if args.quick:
        args.repeats = 1
    if args.repeats < 1 or any(t < 1 for t in args.threads):
        p.error("--repeats and --threads must be >= 1")
    return args


def import_libraries(openmp_settings):
    """torch (None when not installed), imported before or after cyconv as asked."""
    sys.path.insert(0, str(ROOT))
    if openmp_settings == "cyconv":
        import cyconv  # noqa: F401
    try:
        import torch
    except ImportError:
        return None
    return torch


def main():
    args = parse_args(NETWORK_NAMES)
    torch = import_libraries(args.openmp_settings)
    sys.path.insert(0, str(HERE))
    import speed  # (imports cyconv: after the choice above)
    from report import write_report

    started = time.perf_counter()
    info = speed.machine_info(torch)
    info.update(openmp=args.openmp_settings, repeats=args.repeats, quick=args.quick)
    networks = [speed.NETWORKS[name] for name in args.networks]
    peaks_start = speed.measure_peaks(args.threads)
    flops = speed.flops_per_image(networks)
    rates = speed.run_speed(torch, speed.make_cases(networks, args.quick), args.threads,
                            args.repeats)
    memory = None if args.no_memory else speed.run_memory(torch, args.quick, max(args.threads))
    peaks_end = speed.measure_peaks(args.threads)
    info.update(load_end=speed.load_average(), minutes=(time.perf_counter() - started) / 60)
    peaks = {t: (peaks_start[t], peaks_end[t]) for t in args.threads}
    text = write_report(Path(args.output), info, peaks, flops, rates, memory)
    print(text)
    print(f"wrote {args.output} ({info['minutes']:.1f} min)")


if __name__ == "__main__":
    main()
