"""3x3 stride-1 convolutions, layer by layer: cyconv beside PyTorch (NCHW and channels_last).

The layers: the 3x3 stride-1 convolutions of models.small(3, 128) (after its
stride-2 stem: 24->24 at 64x64, 24->48 at 32x32, 48->96 at 16x16, 96->192 at
8x8), models.resnet_small's (16 at 64x64 to 128 at 8x8: the --model resnet recipe)
and ResNet-18's (64 at 56x56, 128 at 28x28, 256 at 14x14, 512 at 7x7), all
padded, without bias, float32, batch 32.  Forward is one call in grad mode;
backward is the input and weight gradients of that forward.  cyconv and both
PyTorch layouts are timed one after the other, round after round, in this
process (the machine is shared and noisy: compare within a row).  GFLOP/s count
direct convolution, 2*N*OC*C*9*OH*OW per pass (backward: two passes), so that
any algorithm is judged by the same count; numpy's float32 GEMM peak (2048^3)
is measured in the same run, with the same threads.

    python benchmarks/bench_conv3x3.py                       # 2 threads, all layers
    python benchmarks/bench_conv3x3.py --threads 1 --repeats 9 --layers small
    python benchmarks/bench_conv3x3.py --im2col    # also cyconv's im2col + GEMM path
    python benchmarks/bench_conv3x3.py --blas-grad # also every weight gradient by BLAS
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
from timing import median_range, passes, rounds, seconds  # noqa: E402

import cyconv  # noqa: E402
from cyconv import nn  # noqa: E402
from cyconv.nn import winograd  # noqa: E402
from cyconv.profiling import gemm_peak  # noqa: E402

# (name, in channels, out channels, input size)
LAYERS = {
    "small": [("small 24->24", 24, 24, 64), ("small 24->48", 24, 48, 32),
              ("small 48->96", 48, 96, 16), ("small 96->192", 96, 192, 8)],
    "resnet_small": [("resnet_small 16", 16, 16, 64), ("resnet_small 32", 32, 32, 32),
                     ("resnet_small 64", 64, 64, 16), ("resnet_small 128", 128, 128, 8)],
    "resnet18": [("resnet18 64", 64, 64, 56), ("resnet18 128", 128, 128, 28),
                 ("resnet18 256", 256, 256, 14), ("resnet18 512", 512, 512, 7)],
}


# Other cyconv kernels to time beside the default ones: (label, option, help, the
# setting of cyconv.nn.winograd that selects them, its value).
VARIANTS = [
    ("im2col", "--im2col", "also time cyconv's im2col + GEMM kernels on these layers",
     "MIN_CHANNELS", float("inf")),
    ("BLAS grad", "--blas-grad", "also time the Winograd path with every weight gradient's "
     "product by BLAS (thin layers take cyconv's own by default)", "THIN_PRODUCT", 0),
]


def with_setting(task, name, value):
    """task run with cyconv.nn.winograd's setting name at value."""
    def run():
        saved = getattr(winograd, name)
        setattr(winograd, name, value)
        try:
            return task()
        finally:
            setattr(winograd, name, saved)
    return run


def cyconv_passes(c_in, c_out, x, dy):
    layer = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False, seed=0)
    tasks = passes(layer, x, dy)
    return tasks["forward"], tasks["backward"], layer


def torch_passes(layer, x, dy, channels_last):
    conv = torch.nn.Conv2d(layer.in_channels, layer.out_channels, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(layer.weight.data))
    tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        tx = tx.contiguous(memory_format=torch.channels_last)
        tdy = tdy.contiguous(memory_format=torch.channels_last)
    tx.requires_grad_(True)

    def forward():
        return seconds(lambda: conv(tx))

    def backward():
        y = conv(tx)
        return seconds(lambda: y.backward(tdy))
    return forward, backward


def measure_layer(c_in, c_out, size, batch, repeats, variants):
    """{(implementation, pass): [seconds]}, the implementations (cyconv, the VARIANTS
    given, PyTorch) taking turns."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, c_in, size, size)).astype(np.float32)
    dy = rng.standard_normal((batch, c_out, size, size)).astype(np.float32)
    forward, backward, layer = cyconv_passes(c_in, c_out, x, dy)
    tasks = {("cyconv", "forward"): forward, ("cyconv", "backward"): backward}
    for label, _, _, name, value in variants:
        forward, backward, _ = cyconv_passes(c_in, c_out, x, dy)
        tasks[(label, "forward")] = with_setting(forward, name, value)
        tasks[(label, "backward")] = with_setting(backward, name, value)
    if torch is not None:
        for label, channels_last in (("torch NCHW", False), ("torch NHWC", True)):
            fwd, bwd = torch_passes(layer, x, dy, channels_last)
            tasks[(label, "forward")], tasks[(label, "backward")] = fwd, bwd
    return rounds(tasks, repeats)


def report(name, flop, times, peak):
    """Markdown rows: median ms [range], GFLOP/s, share of the GEMM peak."""
    rows = []
    for pass_name, pass_count in (("forward", 1), ("backward", 2)):
        cells = {}
        for (impl, p), values in times.items():
            if p == pass_name:
                cells[impl] = values
        ours = statistics.median(cells["cyconv"])
        best_torch = min((statistics.median(v) for k, v in cells.items() if k.startswith("torch")),
                         default=None)
        text = " | ".join(median_range(v) for v in cells.values())
        gflops = pass_count * flop / ours / 1e9
        ratio = f"{best_torch / ours:.2f}" if best_torch else "-"
        rows.append(f"| {name} | {pass_name} | {text} | {gflops:.0f} | "
                    f"{100 * gflops / peak:.0f}% | {ratio} |")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layers", choices=["all", *LAYERS], default="all")
    for label, option, text, _, _ in VARIANTS:
        parser.add_argument(option, action="store_true", dest=label, help=text)
    args = parser.parse_args()
    variants = [v for v in VARIANTS if vars(args)[v[0]]]
    cyconv.set_num_threads(args.threads)
    if torch is not None:
        torch.set_num_threads(args.threads)
    peak = gemm_peak(args.threads)
    print(f"threads {args.threads}, batch {args.batch}, {args.repeats} repeats; "
          f"numpy sgemm 2048^3: {peak:.0f} GFLOP/s")
    impls = (["cyconv"] + [v[0] for v in variants]
             + (["torch NCHW", "torch NHWC"] if torch is not None else []))
    print("| layer | pass | " + " | ".join(f"{i} ms [range]" for i in impls)
          + " | cyconv GFLOP/s | of peak | faster torch / cyconv |")
    print("|---" * (len(impls) + 5) + "|")
    groups = LAYERS if args.layers == "all" else {args.layers: LAYERS[args.layers]}
    for layers in groups.values():
        for name, c_in, c_out, size in layers:
            times = measure_layer(c_in, c_out, size, args.batch, args.repeats, variants)
            flop = 2 * args.batch * c_out * c_in * 9 * size * size
            for row in report(name, flop, times, peak):
                print(row, flush=True)
    print(f"numpy sgemm 2048^3 after the layers: {gemm_peak(args.threads):.0f} GFLOP/s")


if __name__ == "__main__":
    main()
