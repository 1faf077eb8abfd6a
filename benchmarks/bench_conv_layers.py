"""Speed of single convolution layers: backward of whole networks' layers, forward of
their layers beside PyTorch, and the depthwise layers of MobileNetV2 beside PyTorch.

    python benchmarks/bench_conv_layers.py --backward resnet18     # ms per layer, batch 32
    python benchmarks/bench_conv_layers.py --backward reference    # the reference network's
    python benchmarks/bench_conv_layers.py --forward resnet_small  # beside im2col and PyTorch
    python benchmarks/bench_conv_layers.py --depthwise             # MobileNetV2's 3x3 depthwise

--backward times cyconv's Conv2d.backward (input and parameter gradients; the
first layer's input gradient is skipped, as in training) after an untimed
forward, and prints the layer's own scratch memory.  A first layer whose weight
gradient the direct kernel computes is also timed on im2col + GEMM, and a layer
whose im2col weight-gradient product runs transposed (few out channels, K
larger) also in the plain form, alternating step by step.  Before/after
comparisons of two builds: run this script from each tree in turn, several
times.

--forward times each layer's forward (the kernel cyconv picks for it: winograd,
direct, pointwise or im2col), the same layer forced onto im2col + GEMM, and
PyTorch in NCHW and channels_last, all in this process, alternating call by call.

--depthwise times forward and backward of each MobileNetV2 depthwise layer shape
(3x3, stride 1 or 2, batch 32) with cyconv's depthwise kernel, cyconv's grouped
im2col + GEMM path, and PyTorch in NCHW and channels_last, all in this process,
alternating call by call.  Every number: median [min-max] over the timed rounds.

--clock cpu (with --threads 1) times the CPU time of the calling thread, which
runs every kernel then, instead of the wall clock: on a shared machine it leaves
out the time the process waited for a core.
"""
import argparse
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

# PyTorch first, so that its OpenMP runtime starts with its own defaults
try:
    import torch
except ImportError:  # the benchmark runs without PyTorch, reporting cyconv alone
    torch = None

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from speed import machine_info  # noqa: E402
from timing import median_range, seconds  # noqa: E402

import cyconv  # noqa: E402
from cyconv import _conv, nn  # noqa: E402
from cyconv.nn import conv as conv_module  # noqa: E402
from cyconv.nn import winograd  # noqa: E402
from cyconv.profiling import gemm_peak  # noqa: E402

# (in, out, kernel, stride, padding, input size, fused ReLU)
NETWORKS = {
    "reference": [(3, 16, 3, 2, 0, 224, True), (16, 32, 3, 2, 0, 55, True),
                  (32, 64, 3, 2, 0, 27, True), (64, 128, 3, 2, 0, 13, True)],
    "resnet18": [(3, 64, 7, 2, 3, 224, False), (64, 64, 3, 1, 1, 56, False),
                 (64, 128, 3, 2, 1, 56, False), (64, 128, 1, 2, 0, 56, False),
                 (128, 128, 3, 1, 1, 28, False), (128, 256, 3, 2, 1, 28, False),
                 (128, 256, 1, 2, 0, 28, False), (256, 256, 3, 1, 1, 14, False),
                 (256, 512, 3, 2, 1, 14, False), (256, 512, 1, 2, 0, 14, False),
                 (512, 512, 3, 1, 1, 7, False)],
    "resnet_small": [(3, 16, 3, 2, 1, 128, False), (16, 16, 3, 1, 1, 64, False),
                     (16, 32, 3, 2, 1, 64, False), (16, 32, 1, 2, 0, 64, False),
                     (32, 64, 3, 2, 1, 32, False), (64, 128, 3, 2, 1, 16, False)],
}
DEFAULT_BATCH = {"reference": 16, "resnet18": 32, "resnet_small": 32}

# MobileNetV2's depthwise layers at 224 px: (channels, input size, stride)
MOBILENET_DEPTHWISE = [(32, 112, 1), (96, 112, 2), (144, 56, 1), (144, 56, 2), (192, 28, 1),
                       (192, 28, 2), (384, 14, 1), (576, 14, 1), (576, 14, 2), (960, 7, 1)]


clock = time.perf_counter



def scratch_bytes(layer):
    return sum(array.nbytes for array in layer._workspaces.values())


def backward_paths(layer, x, first):
    """{label: nn.conv settings} of the weight-gradient paths to time for layer: the one
    cyconv picks, and the one it replaces where there is a choice (a first layer's
    direct kernel against im2col + GEMM; the transposed im2col product against the
    plain one)."""
    g = layer._geometry(x.shape)
    if first and layer._uses_direct_weight_grad(g):
        return {"(direct)": {}, "(im2col)": {"DIRECT_WEIGHT_GRAD": False}}
    if (not winograd.applies(layer) and not layer._uses_depthwise_kernel()
            and layer._transposes_weight_grad()):
        return {"(transp)": {}, "(plain)": {"TRANSPOSED_WEIGHT_GRAD": False}}
    return {"": {}}


def run_backward(args):
    batch = args.batch or DEFAULT_BATCH[args.backward]
    rng = np.random.default_rng(0)
    total = []
    print(f"{args.backward} conv layers, batch {batch}, {args.threads} thread(s), {args.clock} "
          f"clock: backward ms, median [min-max] of {args.rounds}")
    for i, (cin, cout, k, s, p, size, relu) in enumerate(NETWORKS[args.backward]):
        layer = nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=relu, seed=0, fuse_relu=relu)
        x = rng.standard_normal((batch, cin, size, size)).astype(np.float32)
        dy = rng.standard_normal(layer.output_shape(x.shape)).astype(np.float32)
        times = {path: [] for path in backward_paths(layer, x, first=i == 0)}
        for step in range(args.warmup + args.rounds):
            for path, settings in backward_paths(layer, x, first=i == 0).items():
                for name, value in settings.items():
                    setattr(conv_module, name, value)
                layer(x)
                start = clock()
                layer.backward(dy, input_grad=i > 0)
                if step >= args.warmup:
                    times[path].append(clock() - start)
                conv_module.DIRECT_WEIGHT_GRAD = conv_module.TRANSPOSED_WEIGHT_GRAD = True
        total.append(statistics.median(times[next(iter(times))]))
        for path, path_times in times.items():
            print(f"  {cin:4d}->{cout:<4d} k{k} s{s} {size:3d}px {path:8s} | "
                  f"{median_range(path_times, width=8)} | "
                  f"scratch {scratch_bytes(layer) / 2**20:7.2f} MB", flush=True)
    print(f"  sum of medians {sum(total) * 1e3:.1f} ms")


def forward_path(layer, x):
    """The kernel cyconv's Conv2d.forward picks for layer on x."""
    g = layer._geometry(x.shape)
    if winograd.applies(layer):
        return "winograd"
    if layer._subsamples() or _conv.pointwise(g):   # (a 1x1 strided layer: its pixels first)
        return "pointwise"
    return "direct" if layer._uses_direct_kernel(g) else "im2col"


def cyconv_forward(layer, x, im2col):
    """Times layer(x); im2col=True forces im2col + GEMM where the direct kernel would run."""
    saved = conv_module.DIRECT_MAX_TAPS, conv_module.DIRECT_WIDE_MAX_TAPS
    if im2col:
        conv_module.DIRECT_MAX_TAPS = conv_module.DIRECT_WIDE_MAX_TAPS = 0
    try:
        with cyconv.no_grad():
            return seconds(lambda: layer(x), clock)
    finally:
        conv_module.DIRECT_MAX_TAPS, conv_module.DIRECT_WIDE_MAX_TAPS = saved


def torch_forward(layer, x):
    with torch.no_grad():
        return seconds(lambda: layer(x), clock)


def run_forward(args):
    batch = args.batch or DEFAULT_BATCH[args.forward]
    rng = np.random.default_rng(0)
    print(f"{args.forward} conv layers, batch {batch}, {args.threads} thread(s), {args.clock} "
          f"clock: forward ms, median [min-max] of {args.rounds} alternating rounds")
    for cin, cout, k, s, p, size, relu in NETWORKS[args.forward]:
        layer = nn.Conv2d(cin, cout, k, stride=s, padding=p, seed=0, fuse_relu=relu)
        x = rng.standard_normal((batch, cin, size, size)).astype(np.float32)
        path = forward_path(layer, x)
        runners = {f"cyconv ({path})": partial(cyconv_forward, layer, x, im2col=False)}
        if path == "direct":
            runners["cyconv im2col"] = partial(cyconv_forward, layer, x, im2col=True)
        if torch is not None:
            ops = [torch.nn.Conv2d(cin, cout, k, stride=s, padding=p)]
            if relu:
                ops.append(torch.nn.ReLU())
            for name, fmt in (("torch nchw", torch.contiguous_format),
                              ("torch cl", torch.channels_last)):
                module = torch.nn.Sequential(*ops).to(memory_format=fmt)
                tx = torch.from_numpy(x).contiguous(memory_format=fmt)
                runners[name] = partial(torch_forward, module, tx)
        times = {name: [] for name in runners}
        for step in range(args.warmup + args.rounds):
            for name, run in runners.items():
                elapsed = run()
                if step >= args.warmup:
                    times[name].append(elapsed)
        print(f"  {cin:4d}->{cout:<4d} k{k} s{s} {size:3d}px")
        for name, elapsed in times.items():
            print(f"    {name:18s} {median_range(elapsed, width=8)}", flush=True)


class CyconvLayer:
    """One cyconv Conv2d; depthwise=False forces the grouped im2col + GEMM path."""

    def __init__(self, channels, stride, x, dy, depthwise):
        self.layer = nn.Conv2d(channels, channels, 3, stride=stride, padding=1,
                               groups=channels, bias=False, seed=0)
        self.x, self.dy, self.depthwise = x, dy, depthwise

    def step(self):
        conv_module.DEPTHWISE_KERNEL = self.depthwise
        forward = seconds(lambda: self.layer(self.x), clock)
        backward = seconds(lambda: self.layer.backward(self.dy), clock)
        self.layer.zero_grad()
        return forward, backward


class TorchLayer:
    def __init__(self, channels, stride, x, dy, channels_last):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.layer = torch.nn.Conv2d(channels, channels, 3, stride=stride, padding=1,
                                     groups=channels, bias=False).to(memory_format=fmt)
        self.x = torch.from_numpy(x).contiguous(memory_format=fmt).requires_grad_(True)
        self.dy = torch.from_numpy(dy).contiguous(memory_format=fmt)

    def step(self):
        out = []
        forward = seconds(lambda: out.append(self.layer(self.x)), clock)
        backward = seconds(lambda: out[0].backward(self.dy), clock)
        self.x.grad, self.layer.weight.grad = None, None
        return forward, backward


def run_depthwise(args):
    batch = args.batch or 32
    rng = np.random.default_rng(0)
    print(f"MobileNetV2 3x3 depthwise layers, batch {batch}, {args.threads} thread(s), "
          f"{args.clock} clock: ms, median [min-max] of {args.rounds} alternating rounds")
    for channels, size, stride in MOBILENET_DEPTHWISE:
        x = rng.standard_normal((batch, channels, size, size)).astype(np.float32)
        out = (size - 1) // stride + 1
        dy = rng.standard_normal((batch, channels, out, out)).astype(np.float32)
        runners = {"depthwise": CyconvLayer(channels, stride, x, dy, True),
                   "im2col": CyconvLayer(channels, stride, x, dy, False)}
        if torch is not None:
            runners["torch nchw"] = TorchLayer(channels, stride, x, dy, False)
            runners["torch cl"] = TorchLayer(channels, stride, x, dy, True)
        times = {name: ([], []) for name in runners}
        for step in range(args.warmup + args.rounds):
            for name, runner in runners.items():
                forward, backward = runner.step()
                if step >= args.warmup:
                    times[name][0].append(forward)
                    times[name][1].append(backward)
        print(f"{channels:4d} ch {size:3d}px s{stride}")
        for name, (forward, backward) in times.items():
            print(f"    {name:10s} fwd {median_range(forward, width=8)}  "
                  f"bwd {median_range(backward, width=8)}", flush=True)
    conv_module.DEPTHWISE_KERNEL = True


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backward", choices=sorted(NETWORKS))
    parser.add_argument("--forward", choices=sorted(NETWORKS))
    parser.add_argument("--depthwise", action="store_true")
    parser.add_argument("--batch", type=int, help="default: 16 (reference), 32 (others)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: the calling thread's CPU time (only with --threads 1)")
    args = parser.parse_args()
    if args.clock == "cpu":
        if args.threads != 1:
            parser.error("--clock cpu measures one thread: use it with --threads 1")
        global clock
        clock = time.thread_time
    cyconv.set_num_threads(args.threads)
    if torch is not None:
        torch.set_num_threads(args.threads)
    info = machine_info(torch)
    print(f"{info['date']}, {info['cpu']}, cyconv {info['cyconv']}, torch {info['torch']}; "
          f"numpy sgemm 2048^3 on {args.threads} thread(s): {gemm_peak(args.threads):.0f} "
          f"GFLOP/s", flush=True)
    if args.backward:
        run_backward(args)
    if args.forward:
        run_forward(args)
    if args.depthwise:
        run_depthwise(args)
    if not (args.backward or args.forward or args.depthwise):
        parser.error("choose --backward NETWORK, --forward NETWORK and/or --depthwise")


if __name__ == "__main__":
    main()
