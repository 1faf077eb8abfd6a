"""Data-parallel training speed: 1 process on 2 threads against 2 ranks on 1 thread each.

The default recipe's network (models.small(3, 128): Conv + BN + ReLU + MaxPool
stages) on random 128x128 images, global batch 32: one process with 2 kernel
threads at batch 32, and ``mpirun -n 2`` ranks with 1 thread each at batch 16
(SyncBatchNorm, DataParallel, and the two small collectives per step that
DistributedTrainer adds: the step's loss sum and the agreement on stopping).
The two alternate, round by round, in this run (the machine is shared: only
ratios measured side by side count).  Per round: images/s of each, their ratio,
and for the ranks where a step's time goes:

    gradients    waiting for the gradient sums at the end of backward (the part of
                 the allreduce that backward did not hide)
    batch norm   the SyncBatchNorm statistics and gradient sums (blocking)
    control      the loss sum and the stop agreement
    allreduce    the same gradient sums run alone after a barrier (blocking): what
                 they would cost if nothing hid them; hidden = 1 - gradients / this

    python benchmarks/bench_distributed.py                 # 5 rounds of 20 steps
    python benchmarks/bench_distributed.py --rounds 3 --steps 10
"""
import argparse
import json
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


def mpirun(ranks):
    """The mpirun command for ``ranks`` local ranks over shared memory."""
    launcher = shutil.which("mpirun") or str(Path(sys.executable).with_name("mpirun"))
    command = [launcher, "-n", str(ranks), "--oversubscribe", "--bind-to", "none",
               "--mca", "btl", "self,sm"]
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


def worker_ranks(args):
    from cyconv import distributed
    comm = distributed.init()
    model, opt, loss_fn, x, y = setup(GLOBAL_BATCH // comm.size, 1, seed=comm.rank)
    model = distributed.convert_sync_batchnorm(model, comm)
    data_parallel = distributed.DataParallel(model, comm)
    control = comm.dup()

    def step():
        opt.zero_grad()
        logits = model(x)
        loss = loss_fn(logits, y)
        control.sum_rows([loss * len(y), 0, len(y)], "loss", "control")
        model.backward(loss_fn.backward(), input_grad=False)
        opt.step()
        control.max(0, "stop")

    comms = (data_parallel.comm, model[1].comm, control)   # gradients, batch norm, control
    times = timed_steps(step, args.warmup, 0)
    before = [dict(c.waited) for c in comms]
    times = timed_steps(step, 0, args.steps)
    waited = {kind: sum(c.waited[kind] - b.get(kind, 0.0) for c, b in zip(comms, before))
              / args.steps for kind in ("gradients", "batch_norm", "control")}
    alone = blocking_allreduce(data_parallel, args.steps)
    rows = comm.all_objects((sum(times), waited, alone), "results")
    if comm.is_root:
        seconds = max(r[0] for r in rows)
        print(json.dumps({"images_per_s": GLOBAL_BATCH * args.steps / seconds,
                          "step_ms": 1e3 * seconds / args.steps,
                          **{k: 1e3 * statistics.mean(r[1][k] for r in rows) for k in waited},
                          "allreduce_ms": 1e3 * statistics.mean(r[2] for r in rows),
                          "gradient_bytes": data_parallel.bytes_per_step}))


def blocking_allreduce(data_parallel, repeats):
    """Seconds per step of the gradient sums run alone, one blocking allreduce per bucket."""
    from cyconv.distributed.comm import mpi
    comm = data_parallel.comm.comm
    seconds = []
    for _ in range(repeats):
        comm.Barrier()
        start = time.perf_counter()
        for _, bucket in data_parallel.buckets:
            comm.Allreduce(mpi().IN_PLACE, bucket.buffer, op=mpi().SUM)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


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
    p.add_argument("--worker", choices=("single", "ranks"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return (worker_single if args.worker == "single" else worker_ranks)(args)
    me = [sys.executable, str(Path(__file__).resolve()), "--steps", str(args.steps),
          "--warmup", str(args.warmup), "--worker"]
    rows = []
    print(f"{'round':>5} {'1x2 img/s':>10} {'2x1 img/s':>10} {'ratio':>6} {'step ms':>8} "
          f"{'grad wait':>9} {'bn':>6} {'control':>7} {'allreduce':>9} {'hidden':>6}")
    for i in range(args.rounds):
        order = [("single", me + ["single"]), ("ranks", mpirun(2) + me + ["ranks"])]
        results = {name: run(command) for name, command in order[::1 - 2 * (i % 2)]}
        ranks = results["ranks"]
        ratio = ranks["images_per_s"] / results["single"]["images_per_s"]
        hidden = 1 - ranks["gradients"] / ranks["allreduce_ms"]
        rows.append((ratio, hidden, ranks))
        print(f"{i + 1:5d} {results['single']['images_per_s']:10.1f} "
              f"{ranks['images_per_s']:10.1f} {ratio:6.2f} {ranks['step_ms']:8.1f} "
              f"{ranks['gradients']:9.2f} {ranks['batch_norm']:6.2f} {ranks['control']:7.2f} "
              f"{ranks['allreduce_ms']:9.2f} {hidden:6.2f}", flush=True)
    ratios, hiddens = [r[0] for r in rows], [r[1] for r in rows]
    waits = [(r[2]["gradients"] + r[2]["batch_norm"] + r[2]["control"]) / r[2]["step_ms"]
             for r in rows]
    print(f"\nratio 2 ranks x 1 thread / 1 process x 2 threads: median {statistics.median(ratios):.2f} "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}; target >= 0.9)")
    print(f"allreduce hidden behind backward: median {statistics.median(hiddens):.2f} "
          f"(range {min(hiddens):.2f}-{max(hiddens):.2f}; target >= 0.5)")
    print(f"share of a step spent waiting on communication: median "
          f"{statistics.median(waits):.1%} (range {min(waits):.1%}-{max(waits):.1%})")
    print(f"gradient bytes per rank and step: {rows[0][2]['gradient_bytes']} (float64)")


if __name__ == "__main__":
    main()
