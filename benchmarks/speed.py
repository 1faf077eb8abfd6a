"""The measurements of bench_train.py: timed runs, the sgemm peak, FLOP counts, memory
children and the facts of the machine.

bench_train.py imports this module after choosing which of torch and cyconv loads
first (the first one's OpenMP runtime and settings serve both).
"""
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from systems import NETWORKS, TORCH_LAYOUTS, build_systems

import cyconv
from cyconv import models
from cyconv.profiling import flop_counts, gemm_peak

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MEMORY_NETWORK, MEMORY_BATCH = "resnet18", 32


@dataclass(frozen=True)
class Case:
    network: object    # systems.Network
    kind: str          # "train" or "infer"
    batch: int
    steps: int
    warmup: int

    @property
    def label(self):
        return f"{self.network.name} {self.kind} b{self.batch}"


def make_cases(networks, quick):
    """Training at each of a network's batches, then inference; --quick: batches / 8."""
    cases = []
    for network in networks:
        steps, warmup = (2, 1) if quick else (network.steps, network.warmup)
        batches = [("train", b) for b in network.train_batches] + [("infer", network.infer_batch)]
        for kind, batch in batches:
            case = Case(network, kind, max(1, batch // 8) if quick else batch, steps, warmup)
            if case not in cases:
                cases.append(case)
    return cases


def time_run(torch, case, threads):
    """{system: images/s} of one run: warm-up, then case.steps steps, the systems
    alternating step by step (rotating order); images/s from each system's median step."""
    cyconv.set_num_threads(threads)
    if torch is not None:
        torch.set_num_threads(threads)
    tasks = build_systems(torch, case.network, case.batch, case.kind == "train")
    names = list(tasks)
    seconds = {name: [] for name in names}
    for step in range(case.warmup + case.steps):
        shift = step % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            tasks[name]()
            if step >= case.warmup:
                seconds[name].append(time.perf_counter() - start)
    return {name: case.batch / statistics.median(s) for name, s in seconds.items()}


def run_speed(torch, cases, thread_counts, repeats):
    """{(case, threads): [{system: images/s} of each repeat]}: the repeats of all cases
    interleave; a case's thread counts run one after the other."""
    results = {}
    for repeat in range(repeats):
        for case in cases:
            for threads in thread_counts:
                rates = time_run(torch, case, threads)
                results.setdefault((case, threads), []).append(rates)
                text = "  ".join(f"{name} {rate:7.1f}" for name, rate in rates.items())
                print(f"repeat {repeat + 1}/{repeats}  {threads} thr  {case.label:28s} "
                      f"img/s: {text}", flush=True)
    return results


def measure_peaks(thread_counts):
    peaks = {t: gemm_peak(t) for t in thread_counts}
    print("sgemm peak: " + ", ".join(f"{t} thr {p:.0f} GFLOP/s" for t, p in peaks.items()),
          flush=True)
    return peaks


def flops_per_image(networks):
    """{network name: {"train": FLOPs, "infer": FLOPs}} per image (counted at batch 1)."""
    counts = {}
    for network in networks:
        shape = (1, 3, network.image_size, network.image_size)
        forward, backward = flop_counts(network.build(), shape)
        counts[network.name] = {"train": forward + backward, "infer": forward}
    return counts


def run_memory(torch, quick, threads):
    """The memory children's reports (ResNet-18, 224 px, batch 32; --quick: batch 4)."""
    network = NETWORKS[MEMORY_NETWORK]
    spec = json.dumps(models.describe(network.build()))
    batch, steps = (4, 3) if quick else (MEMORY_BATCH, 10)
    reports = []
    for system in ("cyconv",) + (TORCH_LAYOUTS if torch is not None else ()):
        done = subprocess.run(
            [sys.executable, str(HERE / "memory_child.py"), system, spec,
             "--classes", str(network.classes), "--batch", str(batch),
             "--image-size", str(network.image_size), "--steps", str(steps),
             "--threads", str(threads)],
            capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory child {system!r} failed:\n{done.stderr}")
        reports.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"memory {system}: {reports[-1]}", flush=True)
    return {"network": network.name, "batch": batch, "image_size": network.image_size,
            "threads": threads, "reports": reports}


def machine_info(torch):
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), "unknown")
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                            capture_output=True, text=True, check=False).stdout.strip()
    return {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "cpu": cpu,
            "cores": len(os.sched_getaffinity(0)), "numpy": np.__version__,
            "torch": torch.__version__ if torch is not None else "not installed",
            "cyconv": f"{cyconv.__version__} ({commit or 'no git'})",
            "python": sys.version.split()[0], "load_start": load_average()}


def load_average():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


