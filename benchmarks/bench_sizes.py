"""A training step of a named network at several image sizes, alternating in one process:
what progressive resizing (train_animals.py --progressive) saves on this machine.

    python benchmarks/bench_sizes.py                       # resnet, 96 112 128 px, batch 32
    python benchmarks/bench_sizes.py --model small --sizes 64 96 128 --threads 1

Each round runs warm-up + timed steps (forward, cross-entropy, backward without the
first layer's input gradient, SGD with momentum) at each size in turn; every number is
the median [min-max] over the rounds' timed steps.  With --progressive START:BEGIN:END
and --epochs it also prints that schedule's step time over the run as a share of the
last size's throughout (the sizes it uses must be among --sizes).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from speed import machine_info  # noqa: E402
from timing import median_range  # noqa: E402

import cyconv  # noqa: E402
from cyconv import models, nn, optim  # noqa: E402
from cyconv.data import ProgressiveSize  # noqa: E402
from cyconv.profiling import gemm_peak  # noqa: E402


def step_times(args):
    """{size: [seconds per timed step]}, the sizes alternating round by round."""
    rng = np.random.default_rng(0)
    model = models.create(args.model, args.classes, max(args.sizes))
    opt = optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    batches = {size: (rng.standard_normal((args.batch, 3, size, size)).astype(np.float32),
                      rng.integers(0, args.classes, args.batch)) for size in args.sizes}
    times = {size: [] for size in args.sizes}
    for _ in range(args.rounds):
        for size, (x, y) in batches.items():
            for step in range(args.warmup + args.steps):
                start = time.perf_counter()
                loss_fn(model(x), y)
                model.backward(loss_fn.backward(), input_grad=False)
                opt.step()
                opt.zero_grad()
                if step >= args.warmup:
                    times[size].append(time.perf_counter() - start)
    return times


def schedule_share(args, medians):
    """The --progressive schedule's summed step time over --epochs, as a share of the
    largest size's throughout."""
    start, begin, end = args.progressive
    final = max(args.sizes)
    sizes = ProgressiveSize(start, final, (round(begin * args.epochs), round(end * args.epochs)))
    used = [sizes(epoch) for epoch in range(args.epochs)]
    missing = sorted(set(used) - set(medians))
    if missing:
        sys.exit(f"--progressive uses sizes {missing} px: add them to --sizes")
    return sum(medians[size] for size in used) / (args.epochs * medians[final])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet", choices=sorted(models.ARCHITECTURES))
    p.add_argument("--sizes", type=int, nargs="+", default=[96, 112, 128])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=3, help="timed steps per size and round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per size and round")
    p.add_argument("--progressive", default="96:0.5:0.8", metavar="START:BEGIN:END")
    p.add_argument("--epochs", type=int, default=75)
    args = p.parse_args()
    start, begin, end = args.progressive.split(":")
    args.progressive = (int(start), float(begin), float(end))
    cyconv.set_num_threads(args.threads)
    info = machine_info(None)
    print(f"{info['date']}, {info['cpu']}, cyconv {info['cyconv']}; sgemm peak "
          f"{gemm_peak(args.threads):.0f} GFLOP/s on {args.threads} thread(s)")
    print(f"{args.model}, batch {args.batch}: training step ms, median [min-max] of "
          f"{args.rounds} x {args.steps} alternating")
    times = step_times(args)
    medians = {size: statistics.median(values) for size, values in times.items()}
    for size, values in times.items():
        print(f"  {size:4d} px  {median_range(values, width=7, digits=1)}  "
              f"({medians[size] / medians[max(args.sizes)]:.2f} of {max(args.sizes)} px)")
    print(f"--progressive {args.progressive[0]}:{args.progressive[1]:g}:{args.progressive[2]:g} "
          f"over {args.epochs} epochs: {schedule_share(args, medians):.2f} of the step time at "
          f"{max(args.sizes)} px throughout")


if __name__ == "__main__":
    main()
