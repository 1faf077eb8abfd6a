"""How fast a network's convolutions could be as plain matrix products: each Conv2d and
Linear timed as numpy's float32 GEMM of its own shape, nothing else.

    python benchmarks/bench_gemm_shapes.py reference --batch 16 --threads 1 2
    python benchmarks/bench_gemm_shapes.py default --batch 32

A layer of groups=1 as im2col + GEMM multiplies (out) x (in * kh * kw) by
(in * kh * kw) x (batch * OH * OW) forward; its weight gradient is the product
of the same sizes with batch * OH * OW as the inner dimension, its input gradient
(skipped for the first layer, as in training) the transposed one.  Here each of
those products runs as one numpy matmul over the whole batch (the most favourable
form: no im2col copies, no tiling), and its GFLOP/s is set against numpy's sgemm
peak of this run (2048 x 2048 matrices).  The sum over the layers is the time of a
training step whose only work were these products: a bound on what any im2col
implementation (cyconv's, or PyTorch's) can reach, and, with the share of the peak
that benchmarks/bench_train.py gives PyTorch's step, on how far ahead of PyTorch an
implementation of the direct computation can get.  Grouped layers are left out
(they are not one product).  It bounds nothing for 3x3 stride-1 layers, which
cyconv computes by Winograd F(4x4, 3x3) with a quarter of the multiplications.
Every number: the median over --repeats products.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from systems import NETWORKS  # noqa: E402

from cyconv import nn, profiling  # noqa: E402


def gemm_shapes(model, input_shape):
    """[(layer name, [(pass, M, K, N), ...])] of the Conv2d/Linear layers of groups 1,
    the products of a training step in the im2col form."""
    result = profiling.profile(model, input_shape, steps=1, warmup=0, peak=1.0,
                               print_table=False)
    modules = dict(model.named_modules())
    shapes = []
    for layer in result.layers:
        module = modules[layer.name]
        if isinstance(module, nn.Conv2d) and module.groups == 1:
            batch, out, oh, ow = layer.output_shape
            kh, kw = module.kernel_size
            taps, columns = module.in_channels * kh * kw, batch * oh * ow
        elif isinstance(module, nn.Linear):
            (columns, out), taps = layer.output_shape, module.in_features
        else:
            continue
        products = [("forward", out, taps, columns), ("weight grad", out, columns, taps)]
        if layer.backward.flops > layer.forward.flops:   # its input gradient was computed
            products.append(("input grad", taps, out, columns))
        shapes.append((layer.name, products))
    return shapes


def median_seconds(m, k, n, repeats):
    """Median seconds of numpy's (m x k) @ (k x n) in float32, after a warm-up."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    out = np.empty((m, n), np.float32)
    np.matmul(a, b, out=out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(name, shapes, threads, repeats, batch):
    """Print each product's ms and share of the peak, and their sum over the step."""
    peak = profiling.gemm_peak(threads)
    print(f"\n{name}, batch {batch}, {threads} thread(s): sgemm peak {peak:.0f} GFLOP/s")
    print(f"{'layer':<22}{'pass':<13}{'M x K x N':>24}{'ms':>9}{'GFLOP/s':>9}{'peak':>6}")
    total_seconds = total_flops = 0.0
    with threadpool_limits(limits=threads, user_api="blas"):
        for layer, products in shapes:
            for direction, m, k, n in products:
                seconds = median_seconds(m, k, n, repeats)
                gflops = 2 * m * k * n / seconds / 1e9
                total_seconds += seconds
                total_flops += 2 * m * k * n
                print(f"{layer:<22}{direction:<13}{f'{m} x {k} x {n}':>24}"
                      f"{1e3 * seconds:9.2f}{gflops:9.1f}{gflops / peak:6.0%}")
    rate = total_flops / total_seconds / 1e9
    print(f"all products: {1e3 * total_seconds:.2f} ms per step, {rate:.1f} GFLOP/s "
          f"({rate / peak:.0%} of the peak): at most {batch / total_seconds:.0f} img/s "
          "for a step of these products alone")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("network", choices=sorted(NETWORKS))
    p.add_argument("--batch", type=int, default=None, help="images per step (default: "
                   "bench_train.py's first training batch of the network)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)
    network = NETWORKS[args.network]
    batch = network.train_batches[0] if args.batch is None else args.batch
    for option, values in (("--batch", [batch]), ("--repeats", [args.repeats]),
                           ("--threads", args.threads)):
        if min(values) < 1:
            p.error(f"{option}: expected ints >= 1, got {min(values)}")
    shape = (batch, 3, network.image_size, network.image_size)
    shapes = gemm_shapes(network.build(), shape)
    for threads in args.threads:
        report(args.network, shapes, threads, args.repeats, batch)


if __name__ == "__main__":
    main()
