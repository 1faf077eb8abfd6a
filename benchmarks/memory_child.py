"""One system's memory while training, alone in this process (bench_train.py starts it).

    python benchmarks/memory_child.py SYSTEM SPEC_JSON --classes 1000 --batch 32 \
        --image-size 224 --steps 10 --threads 2

SYSTEM is "cyconv", "torch NCHW" or "torch channels_last"; SPEC_JSON the network's
architecture spec (cyconv.models.describe), from which either library builds it, so
no process holds the other library's model.  Prints one JSON line: RSS (MB) after
the imports, after building the model, after the warm-up steps and after the timed
steps, and the peak RSS of the process.
"""
import argparse
import json
import resource
import sys
from pathlib import Path

import numpy as np

WARMUP_STEPS = 2


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb():
    """VmHWM, the peak RSS of this program (getrusage's ru_maxrss would also count the
    parent's RSS at the fork that started this process: it survives execve)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def build_system(args, spec, torch):
    """The system's train-step function, on a random batch."""
    # (imported after torch, as in bench_train.py: see there)
    from systems import CyconvSystem, TorchSystem

    import cyconv
    from cyconv import models
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 3, args.image_size, args.image_size), np.float32)
    y = rng.integers(0, args.classes, args.batch)
    if args.system == "cyconv":
        cyconv.set_num_threads(args.threads)
        return CyconvSystem(models.build(spec), x, y, train=True).train_step
    torch.set_num_threads(args.threads)
    model = models.to_torch(spec)
    channels_last = args.system == "torch channels_last"
    return TorchSystem(torch, model, x, y, train=True, channels_last=channels_last).train_step


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("system", choices=["cyconv", "torch NCHW", "torch channels_last"])
    p.add_argument("spec")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch = None
    if args.system != "cyconv":
        import torch
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import cyconv  # noqa: F401  (its kernels loaded before the baseline is taken)
    report = {"system": args.system, "after_imports": rss_mb()}
    step = build_system(args, json.loads(args.spec), torch)
    report["after_build"] = rss_mb()
    for _ in range(WARMUP_STEPS):
        step()
    report["after_warmup"] = rss_mb()
    for _ in range(args.steps):
        step()
    report.update(after_steps=rss_mb(), peak=peak_rss_mb(), steps=args.steps,
                  warmup=WARMUP_STEPS)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
