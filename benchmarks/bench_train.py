"""Training and inference speed of the reference network: cyconv beside PyTorch.

The reference network (Conv 3->16 k3 s2, ReLU, MaxPool 2, Conv 16->32 s2, ReLU,
Conv 32->64 s2, ReLU, Conv 64->128 s2, ReLU, Linear 4608->3) on 3x224x224
float32 images.  One training step = forward + loss + backward + SGD update
(momentum 0.9, weight decay 5e-4).  When torch is importable, the same network
with the same weights runs in PyTorch, timed alternately with cyconv in this
process (the machines here are shared and noisy: only ratios measured side by
side count).

    python benchmarks/bench_train.py                  # threads 1 and 2, the table
    python benchmarks/bench_train.py --threads 2 --steps 30
    python benchmarks/bench_train.py --layers         # ms per layer, forward/backward
    python benchmarks/bench_train.py --memory         # peak RSS, growth over 200 steps
    python benchmarks/bench_train.py --scaling --threads 2 1   # 2 vs 1 thread, alternating
"""
import argparse
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# PyTorch is imported first so that its OpenMP runtime starts with its own
# defaults: importing cyconv sets OMP_WAIT_POLICY=PASSIVE and GOMP_SPINCOUNT=10000
# for cyconv's runtime.
try:
    import torch
except ImportError:  # the benchmark runs without PyTorch, reporting cyconv alone
    torch = None

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cyconv  # noqa: E402
from cyconv import nn, optim  # noqa: E402

IMAGE = (3, 224, 224)
CLASSES = 3
# Multiply-adds per image of each conv / linear (forward), for the FLOP count.
REFERENCE_SHAPES = [  # (in, out, kernel, output size)
    (3, 16, 3, 111), (16, 32, 3, 27), (32, 64, 3, 13), (64, 128, 3, 6)]


def reference_model():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2), nn.ReLU(),
        nn.Conv2d(64, 128, 3, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(4608, CLASSES))


def torch_reference_model(state_dict):
    t = torch.nn
    model = t.Sequential(
        t.Conv2d(3, 16, 3, stride=2), t.ReLU(), t.MaxPool2d(2),
        t.Conv2d(16, 32, 3, stride=2), t.ReLU(),
        t.Conv2d(32, 64, 3, stride=2), t.ReLU(),
        t.Conv2d(64, 128, 3, stride=2), t.ReLU(),
        t.Flatten(), t.Linear(4608, CLASSES))
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()})
    return model


def flops_per_image(train):
    """Floating-point operations per image: 2 per multiply-add; backward = 2x forward
    (input and weight gradients; the first layer's input gradient is skipped)."""
    forward = sum(2 * cin * cout * k * k * size * size for cin, cout, k, size in REFERENCE_SHAPES)
    forward += 2 * 4608 * CLASSES
    if not train:
        return forward
    first = 2 * 3 * 16 * 9 * 111 * 111
    return forward + 2 * forward - first


class CyconvRunner:
    def __init__(self, model):
        self.model = model
        self.loss_fn = nn.CrossEntropyLoss()
        self.opt = optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

    def train_step(self, x, y):
        loss = self.loss_fn(self.model(x), y)
        self.model.backward(self.loss_fn.backward(), input_grad=False)
        self.opt.step()
        self.opt.zero_grad()
        return loss

    def infer(self, x):
        with cyconv.no_grad():
            return self.model(x)


class TorchRunner:
    def __init__(self, model):
        self.model = model
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

    def train_step(self, x, y):
        self.opt.zero_grad(set_to_none=False)
        loss = self.loss_fn(self.model(x), y)
        loss.backward()
        self.opt.step()
        return loss.item()

    def infer(self, x):
        with torch.no_grad():
            return self.model(x)


def set_threads(n):
    cyconv.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)


def time_alternately(tasks, steps, warmup):
    """{name: [seconds per call]} timing each task once per round, round after round."""
    for _ in range(warmup):
        for task in tasks.values():
            task()
    times = {name: [] for name in tasks}
    for _ in range(steps):
        for name, task in tasks.items():
            start = time.perf_counter()
            task()
            times[name].append(time.perf_counter() - start)
    return times


def gemm_peak(threads):
    """numpy's float32 GEMM GFLOP/s at a large square size (the compute ceiling)."""
    cyconv.set_num_threads(threads)  # limits numpy's BLAS too
    a = np.random.rand(1024, 1024).astype(np.float32)
    b = np.random.rand(1024, 1024).astype(np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(10))
    return 2 * 1024 ** 3 / best / 1e9


def _timed(task):
    start = time.perf_counter()
    task()
    return time.perf_counter() - start


def run_table(args, peaks):
    rng = np.random.default_rng(0)
    cyconv.manual_seed(0)
    model = reference_model()
    cy = CyconvRunner(model)
    th = TorchRunner(torch_reference_model(model.state_dict())) if torch is not None else None
    rows = []
    for threads in args.threads:
        set_threads(threads)
        for kind, batch in [("train", b) for b in args.train_batches] + \
                           [("infer", b) for b in args.infer_batches]:
            x = rng.standard_normal((batch,) + IMAGE).astype(np.float32)
            y = rng.integers(0, CLASSES, batch)
            tasks = {"cyconv": (lambda: cy.train_step(x, y)) if kind == "train"
                     else (lambda: cy.infer(x))}
            if th is not None:
                xt, yt = torch.from_numpy(x), torch.from_numpy(y)
                tasks["torch"] = ((lambda: th.train_step(xt, yt)) if kind == "train"
                                  else (lambda: th.infer(xt)))
            times = time_alternately(tasks, args.steps, args.warmup)
            row = {"threads": threads, "kind": kind, "batch": batch}
            for name, ts in times.items():
                row[name] = [batch / t for t in (statistics.median(ts), max(ts), min(ts))]
            rows.append(row)
            print(format_row(row, peaks[threads]), flush=True)
    return rows


def format_row(row, peak):
    """One table line; peak: the GEMM GFLOP/s measured with the same thread count."""
    cy_med, cy_lo, cy_hi = row["cyconv"]
    text = (f"{row['kind']:5s} b{row['batch']:<3d} {row['threads']} thr | cyconv "
            f"{cy_med:7.1f} img/s [{cy_lo:6.1f}-{cy_hi:6.1f}]")
    flops = flops_per_image(row["kind"] == "train") * cy_med / 1e9
    text += f" {flops:5.1f} GFLOP/s ({flops / peak:4.0%} of GEMM peak)"
    if "torch" in row:
        t_med, t_lo, t_hi = row["torch"]
        text += f" | torch {t_med:7.1f} [{t_lo:6.1f}-{t_hi:6.1f}] | ratio {cy_med / t_med:5.2f}x"
    return text


def run_layers(args):
    """Milliseconds per layer, forward and backward, at each training batch size."""
    rng = np.random.default_rng(0)
    cyconv.manual_seed(0)
    model = reference_model()
    loss_fn = nn.CrossEntropyLoss()
    for threads in args.threads:
        set_threads(threads)
        for batch in args.train_batches:
            x = rng.standard_normal((batch,) + IMAGE).astype(np.float32)
            y = rng.integers(0, CLASSES, batch)
            forward = np.zeros(len(model))
            backward = np.zeros(len(model))
            for step in range(args.warmup + args.steps):
                out = x
                record = step >= args.warmup
                for i, layer in enumerate(model):
                    start = time.perf_counter()
                    out = layer(out)
                    forward[i] += (time.perf_counter() - start) * record
                loss_fn(out, y)
                grad = loss_fn.backward()
                for i in reversed(range(len(model))):
                    start = time.perf_counter()
                    grad = model[i].backward(grad, input_grad=i > 0)
                    backward[i] += (time.perf_counter() - start) * record
                model.zero_grad()
            print(f"\nbatch {batch}, {threads} thread(s): ms per step")
            for i, layer in enumerate(model):
                print(f"  {i:2d} {layer!r:60.60s} fwd {forward[i] / args.steps * 1e3:7.2f}"
                      f"  bwd {backward[i] / args.steps * 1e3:7.2f}")
            print(f"  total fwd {forward.sum() / args.steps * 1e3:.2f}  "
                  f"bwd {backward.sum() / args.steps * 1e3:.2f}")


def run_scaling(args):
    """cyconv training at each batch size with the first and the last of --threads
    (e.g. 2 and 1), the thread count alternating step by step: their ratio."""
    rng = np.random.default_rng(0)
    cyconv.manual_seed(0)
    many, few = args.threads[0], args.threads[-1]
    runners = {many: CyconvRunner(reference_model()), few: CyconvRunner(reference_model())}
    for batch in args.train_batches:
        x = rng.standard_normal((batch,) + IMAGE).astype(np.float32)
        y = rng.integers(0, CLASSES, batch)

        def step_with(threads, x=x, y=y):
            cyconv.set_num_threads(threads)
            runners[threads].train_step(x, y)

        times = time_alternately({n: (lambda n=n: step_with(n)) for n in (many, few)},
                                 args.steps, args.warmup)
        rate = {n: batch / statistics.median(ts) for n, ts in times.items()}
        print(f"train b{batch:<3d} | {many} thr {rate[many]:7.1f} img/s | {few} thr "
              f"{rate[few]:7.1f} img/s | {many} vs {few} threads: {rate[many] / rate[few]:.2f}x")


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_memory(args):
    """Peak RSS while training at batch 64, and RSS growth over 200 steps."""
    rng = np.random.default_rng(0)
    cyconv.manual_seed(0)
    cy = CyconvRunner(reference_model())
    x = rng.standard_normal((64,) + IMAGE).astype(np.float32)
    y = rng.integers(0, CLASSES, 64)
    for _ in range(5):
        cy.train_step(x, y)
    before = current_rss_mb()
    for _ in range(200):
        cy.train_step(x, y)
    after = current_rss_mb()
    print(f"training b64: peak RSS {peak_rss_mb():.0f} MB; RSS after 5 steps {before:.0f} MB, "
          f"after 205 steps {after:.0f} MB (growth {after - before:+.1f} MB)")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--train-batches", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--infer-batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per system (>= 20)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layers", action="store_true", help="ms per layer instead of the table")
    parser.add_argument("--memory", action="store_true", help="peak RSS and growth at batch 64")
    parser.add_argument("--scaling", action="store_true",
                        help="training with the first vs the last --threads, alternating")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{len(__import__('os').sched_getaffinity(0))} cores; numpy {np.__version__}; "
          f"torch {torch.__version__ if torch else 'not installed'}; cyconv {cyconv.__version__}")
    if args.layers:
        run_layers(args)
        return
    if args.memory:
        run_memory(args)
        return
    if args.scaling:
        run_scaling(args)
        return
    peaks = {}
    for threads in args.threads:
        peaks[threads] = gemm_peak(threads)
        print(f"numpy float32 GEMM peak, {threads} thread(s): {peaks[threads]:.0f} GFLOP/s")
    print(f"train step: {flops_per_image(True) / 1e6:.0f} MFLOP/image; "
          f"inference {flops_per_image(False) / 1e6:.0f} MFLOP/image")
    run_table(args, peaks)


if __name__ == "__main__":
    main()
