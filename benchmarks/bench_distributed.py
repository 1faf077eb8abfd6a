"""Data-parallel training speed: 1 process on 2 threads against 2 ranks on 1 thread each.

The default recipe's network (models.small(3, 128): Conv + BN + ReLU + MaxPool
stages) on random 128x128 images, global batch 32: one process with 2 kernel
threads at batch 32, and ``mpirun -n 2`` ranks with 1 thread each at batch 16
(SyncBatchNorm, DataParallel, and the two small collectives per step that
DistributedTrainer adds: the step's loss sum and the agreement on stopping).
The two alternate, round by round, in this run (the machine is shared: only
ratios measured side by side count).  Per round: images/s of each, their ratio,
and for the ranks where a step's time goes:

    waiting      the rank's time in collectives per step: gradient sums at the end of
                 backward, SyncBatchNorm's statistics and gradient sums, the loss sum
                 and the stop agreement (it includes waiting for the other rank: on a
                 busy machine one rank often runs late)
    exposed      the wait for the gradient sums at the end of backward, on the rank
                 that finished its backward last (the others wait for it; it waits for
                 the network alone): the communication that backward did not hide
    allreduce    the same gradient sums alone, blocking, after a barrier (the fastest of
                 the repeats: the transfer without interference); hidden = 1 - exposed /
                 allreduce
    done         the share of the gradient bytes whose sums had completed when backward
                 ended (the rest is the last layers' messages, sent as it ends)

The load column is the machine's 1-minute load average as the round ended: more
than 2 (the cores here) means other processes took turns with the ranks, and waits
then measure the scheduler as much as the network.  --yield-when-idle makes ranks
that wait in MPI give their core away (Open MPI's mpi_yield_when_idle) instead of
spinning, which a busy machine rewards.

    python benchmarks/bench_distributed.py                 # 5 rounds of 20 steps
    python benchmarks/bench_distributed.py --rounds 3 --steps 10 --yield-when-idle
"""
import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GLOBAL_BATCH = 32


def mpirun(ranks, yield_when_idle):
    """The mpirun command for ``ranks`` local ranks over shared memory."""
    launcher = shutil.which("mpirun") or str(Path(sys.executable).with_name("mpirun"))
    command = [launcher, "-n", str(ranks), "--oversubscribe", "--bind-to", "none", "--mca",
               "btl", "self,sm", "--mca", "mpi_yield_when_idle", str(int(yield_when_idle))]
    return command + (["--allow-run-as-root"] if os.geteuid() == 0 else [])


def setup(batch, threads, seed=0):
    import cyconv
    from cyconv import models, nn, optim
    cyconv.set_num_threads(threads)
    cyconv.manual_seed(seed)
    model = models.small(3, 128)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 3, 128, 128)).astype(np.float32)
    y = rng.integers(0, 3, batch)
    return model, optim.SGD(model.parameters(), 0.01, momentum=0.9), nn.CrossEntropyLoss(), x, y


def timed_steps(step, warmup, steps):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def worker_single(args):
    model, opt, loss_fn, x, y = setup(GLOBAL_BATCH, 2)

    def step():
        opt.zero_grad()
        loss_fn(model(x), y)
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()

    times = timed_steps(step, args.warmup, args.steps)
    print(json.dumps({"images_per_s": GLOBAL_BATCH * len(times) / sum(times)}))


def ranks_model(comm):
    """The ranks' model (SyncBatchNorm, DataParallel) and its data, with hooks that note per
    step when backward began and ended (before DataParallel's hook waits for the gradient
    sums), the share of the gradient bytes summed by then, and the seconds waited for the
    sums so far."""
    from cyconv import distributed
    model, opt, loss_fn, x, y = setup(GLOBAL_BATCH // comm.size, 1, seed=comm.rank)
    model = distributed.convert_sync_batchnorm(model, comm)
    marks = {"began": [], "ended": [], "done": [], "waited": []}
    model.register_full_backward_pre_hook(lambda *_: marks["began"].append(time.perf_counter()))

    def backward_ended(*_):
        marks["ended"].append(time.perf_counter())
        done = [b.buffer.nbytes for _, b in data_parallel.buckets
                if b.request is not None and b.request.Test()]
        marks["done"].append(sum(done) / data_parallel.bytes_per_step)

    model.register_full_backward_hook(backward_ended)
    data_parallel = distributed.DataParallel(model, comm)
    model.register_full_backward_hook(
        lambda *_: marks["waited"].append(data_parallel.comm.waited["gradients"]))
    return model, opt, loss_fn, x, y, data_parallel, marks


def worker_ranks(args):
    from cyconv import distributed
    comm = distributed.init()
    model, opt, loss_fn, x, y, data_parallel, marks = ranks_model(comm)
    control = comm.dup()
    comms = (data_parallel.comm, model[1].comm, control)   # gradients, batch norm, control

    def step():
        opt.zero_grad()
        logits = model(x)
        loss = loss_fn(logits, y)
        control.sum_rows([loss * len(y), 0, len(y)], "loss", "control")
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()
        control.max(0, "stop")

    timed_steps(step, max(args.warmup, 1), 0)
    for name in ("began", "ended", "done"):
        marks[name].clear()
    del marks["waited"][:-1]   # the total before the timed steps
    waited_before = sum(sum(c.waited.values()) for c in comms)
    seconds = sum(timed_steps(step, 0, args.steps))
    waited = (sum(sum(c.waited.values()) for c in comms) - waited_before) / args.steps
    rows = comm.all_objects((seconds, waited, marks, blocking_allreduce(data_parallel, 10)),
                            "results")
    if comm.is_root:
        print(json.dumps(summary(rows, args.steps, model, data_parallel)))


def summary(rows, steps, model, data_parallel):
    """What a round reports of the ranks (rows: each rank's seconds, seconds waited per step,
    marks, and the gradient sums alone)."""
    from cyconv.distributed import SyncBatchNorm
    exposed = []   # perf_counter is CLOCK_MONOTONIC: one clock for a machine's processes
    for i in range(steps):
        last = max(rows, key=lambda r: r[2]["ended"][i])[2]["waited"]
        exposed.append(last[i + 1] - last[i])
    channels = [m.num_features for m in model.modules() if isinstance(m, SyncBatchNorm)]
    seconds = max(r[0] for r in rows)
    return {"images_per_s": GLOBAL_BATCH * steps / seconds,
            "step_ms": 1e3 * seconds / steps,
            "waiting_ms": 1e3 * statistics.mean(r[1] for r in rows),
            "exposed_ms": 1e3 * statistics.median(exposed),
            "allreduce_ms": 1e3 * max(r[3] for r in rows),
            "done": statistics.median(d for r in rows for d in r[2]["done"]),
            "backward_ms": 1e3 * statistics.median(
                e - b for r in rows for b, e in zip(r[2]["began"], r[2]["ended"])),
            "gradient_bytes": data_parallel.bytes_per_step,
            "gradient_messages": len(data_parallel.buckets),
            # SyncBatchNorm: a row of 1 + 2C float64 forward and 2C backward per layer and
            # step; with the loss sum and the stop agreement, all blocking
            "blocking_collectives": 2 * len(channels) + 2,
            "blocking_bytes": sum(8 * (1 + 4 * c) for c in channels)}


def blocking_allreduce(data_parallel, repeats):
    """Seconds per step of the gradient sums run alone (one blocking allreduce per bucket,
    after a barrier): the fastest of ``repeats``."""
    from cyconv.distributed.comm import mpi
    comm = data_parallel.comm.comm
    seconds = []
    for _ in range(repeats):
        comm.Barrier()
        start = time.perf_counter()
        for _, bucket in data_parallel.buckets:
            comm.Allreduce(mpi().IN_PLACE, bucket.buffer, op=mpi().SUM)
        seconds.append(time.perf_counter() - start)
    return min(seconds)


# (name, bytes/s, seconds per message) of the networks in the scaling estimate
NETWORKS = (("10 Gb/s Ethernet, 30 us", 1.25e9, 30e-6), ("1 Gb/s Ethernet, 50 us", 0.125e9, 50e-6))


def scaling_estimate(ranks):
    """Images/s of N machines with one rank of 16 images each (the global batch grows with
    N) over the NETWORKS: a model whose inputs were measured here, the median over the
    rounds of the ranks' compute time (step minus waiting) and backward time, and the
    bytes and messages of a step.  Gradients: a ring allreduce's 2 (N-1)/N of the bytes,
    plus log2(N) latencies per message each way, hidden behind backward but for the last
    message; blocking collectives (SyncBatchNorm, loss, stop): log2(N) latencies each and
    every rank's rows."""
    compute = statistics.median(r["step_ms"] - r["waiting_ms"] for r in ranks) / 1e3
    backward = statistics.median(r["backward_ms"] for r in ranks) / 1e3
    first, sizes = ranks[0], (1, 2, 4, 8, 16, 32, 64)
    print(f"\nestimate, N machines x 1 rank x {GLOBAL_BATCH // 2} images (compute "
          f"{1e3 * compute:.1f} ms, backward {1e3 * backward:.1f} ms per step); images/s "
          "(efficiency):")
    print(f"{'N':>26}" + "".join(f"{n:>12}" for n in sizes))
    for name, bandwidth, latency in NETWORKS:
        cells = []
        for n in sizes:
            hops = math.ceil(math.log2(n))
            gradients = (2 * (n - 1) / n * first["gradient_bytes"] / bandwidth
                         + first["gradient_messages"] * 2 * hops * latency)
            exposed = max(2 * hops * latency, gradients - backward)
            blocking = (first["blocking_collectives"] * hops * latency
                        + (n - 1) * first["blocking_bytes"] / bandwidth)
            step = compute + exposed + blocking
            cells.append(f"{n * (GLOBAL_BATCH // 2) / step:.0f} ({compute / step:.0%})")
        print(f"{name:>26}" + "".join(f"{cell:>12}" for cell in cells))


def run(command):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900,
                          check=False)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--yield-when-idle", action="store_true",
                   help="ranks waiting in MPI yield their core (default: they spin)")
    p.add_argument("--worker", choices=("single", "ranks"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return (worker_single if args.worker == "single" else worker_ranks)(args)
    me = [sys.executable, str(Path(__file__).resolve()), "--steps", str(args.steps),
          "--warmup", str(args.warmup), "--worker"]
    rows = []
    print(f"{'round':>5} {'1x2 img/s':>10} {'2x1 img/s':>10} {'ratio':>6} {'step ms':>8} "
          f"{'waiting':>8} {'exposed':>8} {'allreduce':>9} {'hidden':>6} {'done':>6} "
          f"{'load':>5}")
    for i in range(args.rounds):
        order = [("single", me + ["single"]),
                 ("ranks", mpirun(2, args.yield_when_idle) + me + ["ranks"])]
        results = {name: run(command) for name, command in order[::1 - 2 * (i % 2)]}
        ranks = results["ranks"]
        ratio = ranks["images_per_s"] / results["single"]["images_per_s"]
        hidden = 1 - ranks["exposed_ms"] / ranks["allreduce_ms"]
        rows.append((ratio, hidden, ranks["done"], ranks["waiting_ms"] / ranks["step_ms"],
                     ranks))
        print(f"{i + 1:5d} {results['single']['images_per_s']:10.1f} "
              f"{ranks['images_per_s']:10.1f} {ratio:6.2f} {ranks['step_ms']:8.1f} "
              f"{ranks['waiting_ms']:8.2f} {ranks['exposed_ms']:8.2f} "
              f"{ranks['allreduce_ms']:9.2f} {hidden:6.2f} {ranks['done']:6.1%} "
              f"{os.getloadavg()[0]:5.1f}", flush=True)
    names = (("images/s, 2 ranks x 1 thread / 1 process x 2 threads", " (target >= 0.9)"),
             ("allreduce hidden behind backward", " (target >= 0.5)"),
             ("share of the gradient bytes summed when backward ended", ""),
             ("share of a step spent waiting in collectives", ""))
    for (name, target), values in zip(names, list(zip(*rows))[:4]):
        print(f"{name}: median {statistics.median(values):.3f} (range {min(values):.3f}-"
              f"{max(values):.3f}){target}")
    print(f"gradient bytes per rank and step: {ranks['gradient_bytes']} (float64, "
          f"{ranks['gradient_messages']} messages)")
    scaling_estimate([row[4] for row in rows])


if __name__ == "__main__":
    main()
