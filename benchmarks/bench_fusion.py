"""Fused layers against the same layers one by one, in one process, taking turns.

Parts (float32):
  stages  BatchNorm2d + ReLU + MaxPool2d(2) of models.small(3, 128)'s four stages at
          batch 32, fused (one pass each way), against BatchNorm2d + ReLU fused and a
          separate MaxPool2d (what containers ran before): forward and backward.
  relu6   BatchNorm2d + ReLU6 of a MobileNetV2 layer (144 channels, 56x56, batch 16),
          fused against separate.
  gap     AdaptiveAvgPool2d(1) forward and backward in GB/s of the array they read or
          write, beside numpy's sum of the same bytes (a read) and np.copyto (read +
          write, counted once each way).
  step    training steps of models.small(3, 128) at batch 32 (forward, loss, backward,
          SGD with momentum, as benchmarks/systems.py): fused against the pair fusion
          only (a do-nothing forward hook on each MaxPool2d turns the new fusion off),
          and PyTorch in both layouts when it is installed.
The layers without fusion are the fused ones with a do-nothing forward hook on the
layer that ends the fusion (hooks turn it off), so both run the same kernels
otherwise.  Each round times every variant once, in turn; the tables give the
median and the range over the rounds.

    python benchmarks/bench_fusion.py                        # 1 and 2 threads, all parts
    python benchmarks/bench_fusion.py --threads 1 --parts stages step --rounds 21
"""
import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

try:  # imported before cyconv so that its OpenMP runtime keeps its own defaults
    import torch
except ImportError:
    torch = None

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from systems import NETWORKS, TORCH_LAYOUTS, build_systems  # noqa: E402
from timing import median_range, passes, rounds, seconds  # noqa: E402

import cyconv  # noqa: E402
from cyconv import nn  # noqa: E402

STAGES = [(24, 64), (48, 32), (96, 16), (192, 8)]   # models.small(3, 128): channels, size
GAP_SHAPES = [(32, 192, 4, 4), (32, 512, 7, 7), (32, 1280, 7, 7)]


def unfused(model, index):
    """model with a do-nothing forward hook on its layer ``index`` (no fusion through it)."""
    model[index].register_forward_hook(lambda *args: None)
    return model


def stage_tasks(channels, size, batch=32):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, channels, size, size)).astype(np.float32)
    dy = rng.standard_normal((batch, channels, size // 2, size // 2)).astype(np.float32)
    tasks = {}
    for label, hooked in (("fused", False), ("one by one", True)):
        model = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2))
        for pass_name, task in passes(unfused(model, 2) if hooked else model,
                                            x, dy).items():
            tasks[(label, pass_name)] = task
    return tasks


def relu6_tasks(channels=144, size=56, batch=16):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, channels, size, size)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    tasks = {}
    for label, hooked in (("fused", False), ("one by one", True)):
        model = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU6())
        for pass_name, task in passes(unfused(model, 1) if hooked else model,
                                            x, dy).items():
            tasks[(label, pass_name)] = task
    return tasks


def print_passes(title, times):
    print(f"\n{title}: ms, median [range]")
    print("| pass | fused | one by one | saved |")
    print("|---|---|---|---|")
    for pass_name in ("forward", "backward"):
        fused, plain = times[("fused", pass_name)], times[("one by one", pass_name)]
        saving = 1 - statistics.median(fused) / statistics.median(plain)
        print(f"| {pass_name} | {median_range(fused)} | {median_range(plain)} | {saving:.0%} |")


def gap_speeds(shape, count):
    """{task: [GB/s of each round]} of global average pooling on an input of ``shape``, numpy's
    sum and np.copyto of the same bytes."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    copy = np.empty_like(x)
    tasks = dict(passes(nn.AdaptiveAvgPool2d(1), x, np.ones(shape[:2] + (1, 1), x.dtype)),
                 sum=lambda: seconds(x.sum), copy=lambda: seconds(lambda: np.copyto(copy, x)))
    return {name: [x.nbytes / 1e9 / s * (2 if name == "copy" else 1) for s in values]
            for name, values in rounds(tasks, count).items()}


def gap_part(count):
    print("\nglobal average pooling: GB/s of the array read (forward) or written (backward), "
          "median [range]")
    print("| input | forward | backward | numpy sum (read) | np.copyto (read + write) |")
    print("|---|---|---|---|---|")
    for shape in GAP_SHAPES:
        speeds = gap_speeds(shape, count * 10)
        print(f"| {'x'.join(map(str, shape))} ({np.prod(shape) * 4e-6:.1f} MB) | "
              + " | ".join(median_range(speeds[n], 1, 1)
                           for n in ("forward", "backward", "sum", "copy"))
              + " |")


def step_part(count):
    network = NETWORKS["default"]
    fused = build_systems(torch, network, 32, train=True)
    one_by_one = build_systems(None, network, 32, train=True)["cyconv"]
    model = one_by_one.__self__.model
    for layer in model:
        if isinstance(layer, nn.MaxPool2d):
            layer.register_forward_hook(lambda *args: None)
    tasks = {"cyconv fused": fused.pop("cyconv"), "cyconv pair fusion only": one_by_one}
    tasks.update(fused)
    times = rounds({name: (lambda t=task: seconds(t)) for name, task in tasks.items()}, count)
    print("\nmodels.small(3, 128) training step, batch 32: ms, median [range]; images/s")
    print("| system | step ms | images/s |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {median_range(values, digits=1)} | "
              f"{32 / statistics.median(values):.0f} |")
    best_torch = min((statistics.median(times[n]) for n in TORCH_LAYOUTS if n in times),
                     default=None)
    if best_torch:
        print(f"cyconv fused vs PyTorch's faster layout: "
              f"{best_torch / statistics.median(times['cyconv fused']):.2f}x")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--parts", nargs="+", choices=["stages", "relu6", "gap", "step"],
                   default=["stages", "relu6", "gap", "step"])
    args = p.parse_args()
    for threads in args.threads:
        cyconv.set_num_threads(threads)
        if torch is not None:
            torch.set_num_threads(threads)
        print(f"\n## {threads} thread(s)")
        if "stages" in args.parts:
            for channels, size in STAGES:
                print_passes(f"BatchNorm2d + ReLU + MaxPool2d(2), 32x{channels}x{size}x{size}",
                             rounds(stage_tasks(channels, size), args.rounds))
        if "relu6" in args.parts:
            print_passes("BatchNorm2d + ReLU6, 16x144x56x56", rounds(relu6_tasks(), args.rounds))
        if "gap" in args.parts:
            gap_part(args.rounds)
        if "step" in args.parts:
            step_part(args.rounds)


if __name__ == "__main__":
    main()
