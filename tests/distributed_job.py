"""The jobs that tests/test_distributed.py runs under ``mpirun -n 2`` (or alone, --single).

    python tests/distributed_job.py average OUT.json     DataParallel's gradients vs the
                                                          ranks' own ones, gathered
    python tests/distributed_job.py syncbn OUT.npz       SyncBatchNorm on each rank's part of
                                                          one batch, gathered for comparison
    python tests/distributed_job.py shards OUT.json      each rank's indices over 3 epochs
    python tests/distributed_job.py train --out DIR ...  a small run of DistributedTrainer
                                                          (--single: Trainer in one process)

Rank 0 writes the outputs.  Faults for the tests: --die-at STEP --how exit|kill|error|stop
makes rank 1 end (os._exit, SIGKILL, sys.exit) or hang (SIGSTOP) at that step;
--signal-at STEP --signal TERM|INT makes rank 0 send the signal to the launcher (as
Ctrl-C or kill would; --signal-to rank1: rank 1 to itself).
"""
import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cyconv
from cyconv import distributed, models, nn, optim
from cyconv.data import ArrayDataset, Augment, DataLoader, make_shapes
from cyconv.train import LRSchedule, RunFolder, Trainer

SIZE = 16


def gather_to_root(comm, array):
    """(size, ...) on every rank: each rank's array (all of one shape)."""
    rows = comm.gather(np.asarray(array, np.float64).reshape(-1), "test gather", "control")
    return rows.reshape((comm.size,) + np.shape(array))


def small_model(seed, dropout=0.0):
    cyconv.manual_seed(seed)
    return models.small(3, SIZE, widths=(8, 16), dropout=dropout)


def average(comm, out):
    """Uneven batches (5 and 3 images): the averaged gradients against the mean of the
    ranks' own gradients weighted by their batch sizes, and the same bits on every rank."""
    images = np.random.default_rng(comm.rank).standard_normal((5 - 2 * comm.rank, 3, SIZE, SIZE))
    labels = np.arange(len(images)) % 3
    own, averaged = small_model(1), small_model(1)
    distributed.DataParallel(averaged, comm)
    grads = {}
    for name, model in (("own", own), ("averaged", averaged)):
        loss = nn.CrossEntropyLoss()
        loss(model(images.astype(np.float32)), labels)
        model.backward(loss.backward(), input_grad=False)
        grads[name] = np.concatenate([p.grad.reshape(-1) for p in model.parameters()])
    own_all = gather_to_root(comm, grads["own"])
    sizes = gather_to_root(comm, [len(images)])[:, 0]
    expected = (own_all * sizes[:, None]).sum(axis=0) / sizes.sum()
    averaged_all = gather_to_root(comm, grads["averaged"])
    if comm.is_root:
        scale = np.abs(expected).max()
        result = {"max_error": float(np.abs(averaged_all[0] - expected).max() / scale),
                  "ranks_equal": bool((averaged_all == averaged_all[0]).all()),
                  "ranks_differed_before": bool((own_all[0] != own_all[1]).any())}
        Path(out).write_text(json.dumps(result))


def syncbn(comm, out):
    """One batch of 7 images (4 on rank 0, 3 on rank 1): outputs, input gradients and the
    batch-weighted mean of the parameter gradients, for a plain and a ReLU-fused layer."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((7, 4, 5, 3)) * 2 + 1
    dy = rng.standard_normal(x.shape)
    part = np.array_split(np.arange(7), comm.size)[comm.rank]
    n = len(part)
    result = {"x": x, "dy": dy}
    for name, fuse in (("plain", False), ("relu", True)):
        layer = nn.BatchNorm2d(4, momentum=0.3, dtype=np.float64)
        layer.weight.data[:] = [1.5, -0.5, 2.0, 0.7]
        layer.bias.data[:] = [0.1, 0.2, -0.3, 0.0]
        model = distributed.convert_sync_batchnorm(
            nn.Sequential(layer, nn.ReLU()) if fuse else nn.Sequential(layer), comm)
        for _ in range(2):   # twice: running statistics after two updates
            model.zero_grad()
            y = model(x[part])
            # the upstream gradient of this rank's mean loss: 7 / n times its part of dy
            dx = model.backward(dy[part] * 7 / n) * n / 7
        result[f"{name}_y"] = np.concatenate(list(_gather_parts(comm, y, 7)))
        result[f"{name}_dx"] = np.concatenate(list(_gather_parts(comm, dx, 7)))
        bn = model[0]
        for key in ("weight", "bias"):
            grad = getattr(bn, key).grad * n / 7
            result[f"{name}_d{key}"] = gather_to_root(comm, grad).sum(axis=0)
        for key in ("running_mean", "running_var"):
            result[f"{name}_{key}"] = getattr(bn, key).copy()
    if comm.is_root:
        np.savez(out, **result)


def _gather_parts(comm, array, total):
    """Every rank's rows of an array split as np.array_split(range(total))."""
    largest = -(-total // comm.size)
    padded = np.zeros((largest,) + array.shape[1:])
    padded[:len(array)] = array
    rows = gather_to_root(comm, padded)
    for rank, part in enumerate(np.array_split(np.arange(total), comm.size)):
        yield rows[rank, :len(part)]


def shards(comm, out):
    data = ArrayDataset(np.zeros((23, 2, 2, 3), np.uint8), np.arange(23) % 3, ["a", "b", "c"])
    loader = distributed.ShardedLoader(data, 4, comm.rank, comm.size, shuffle=True, seed=3,
                                       num_workers=0)
    seen = [[int(i) for batch in loader._batches(epoch) for i in batch] for epoch in range(3)]
    every = comm.all_objects(seen, "test shards")
    if comm.is_root:
        Path(out).write_text(json.dumps({"ranks": every, "steps": len(loader)}))


def parse_train(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--single", action="store_true", help="Trainer alone, no MPI")
    p.add_argument("--batch", type=int, default=16, help="per rank")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--images", type=int, default=320)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seed-per-rank", action="store_true", help="a fault: ranks differ")
    p.add_argument("--data-per-rank", action="store_true", help="a fault: ranks differ")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--die-at", type=int)
    p.add_argument("--how", choices=("exit", "kill", "stop", "error"), default="exit")
    p.add_argument("--signal-at", type=int)
    p.add_argument("--signal", choices=("TERM", "INT"), default="TERM")
    p.add_argument("--signal-to", choices=("launcher", "rank1"), default="launcher")
    p.add_argument("--pause", type=float, default=0.0, help="seconds, after that step's forward")
    p.add_argument("--heartbeat-timeout", type=float, default=30.0)
    return p.parse_args(argv)


def train(args):
    cyconv.set_num_threads(1)
    comm = None if args.single else distributed.init(heartbeat_timeout=args.heartbeat_timeout)
    rank = 0 if comm is None else comm.rank
    seed = args.seed + (rank if args.seed_per_rank else 0)
    images, labels, classes = make_shapes(args.images, SIZE,
                                          seed=rank + 1 if args.data_per_rank else 1)
    valid = make_shapes(50, SIZE, seed=2)
    if comm is not None:
        comm.check_same("the data and settings", seed=seed, classes=classes,
                        data=[int(np.sum(images, dtype=np.int64)), labels.tolist()])
    train_data, valid_data = ArrayDataset(images, labels, classes), ArrayDataset(*valid)
    loaders = {"shuffle": True, "augment": Augment(), "seed": seed, "num_workers": 1}
    if comm is None:
        train_loader = DataLoader(train_data, args.batch, **loaders)
        valid_loader = DataLoader(valid_data, 20, num_workers=0)
    else:
        train_loader = distributed.ShardedLoader(train_data, args.batch, rank, comm.size,
                                                 **loaders)
        valid_loader = distributed.ShardedLoader(valid_data, 10, rank, comm.size, num_workers=0)
    model = small_model(seed, args.dropout)
    if comm is not None:
        model = distributed.convert_sync_batchnorm(model, comm)
    faults = Faults(args, rank, model)
    model.register_forward_pre_hook(faults.before_forward)
    model.register_full_backward_pre_hook(faults.before_backward)
    opt = optim.SGD(model.parameters(), 0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    common = {"epochs": args.epochs, "schedule": LRSchedule(0.05, "cosine", warmup_epochs=0.5),
              "average": optim.ExponentialMovingAverage(model, 0.9), "eval_flip": True,
              "progress": False,
              "verbose": False, "run": RunFolder(args.out, classes=classes)}
    trainer = (Trainer(model, opt, nn.CrossEntropyLoss(), train_loader, valid_loader, **common)
               if comm is None else
               distributed.DistributedTrainer(comm, model, opt, nn.CrossEntropyLoss(),
                                              train_loader, valid_loader, **common))
    trainer.fit(resume=args.resume)
    if trainer.interrupted:
        sys.exit(128 + signal.Signals[trainer.interrupted].value)


class Faults:
    """Hooks that count the training steps and make the faults of the tests; at the step of
    --signal-at, a --pause between forward and backward (where a signal finds the running
    statistics already moved by the step under way)."""

    def __init__(self, args, rank, model):
        self.args, self.rank, self.model, self.steps = args, rank, model, 0

    def before_backward(self, module, grad_output):
        if self.steps == self.args.signal_at:
            time.sleep(self.args.pause)

    def before_forward(self, module, inputs):
        if not self.model.training:
            return
        self.steps += 1
        if self.rank == 1 and self.steps == self.args.die_at:
            if self.args.how == "exit":
                os._exit(1)
            if self.args.how == "error":   # a clean exit with an error: MPI finalizes
                sys.exit("rank 1 gives up")
            os.kill(os.getpid(), signal.SIGKILL if self.args.how == "kill" else signal.SIGSTOP)
        if self.steps == self.args.signal_at:
            number = getattr(signal, f"SIG{self.args.signal}")
            if self.rank == 0 and self.args.signal_to == "launcher":
                os.kill(os.getppid(), number)
            elif self.rank == 1 and self.args.signal_to == "rank1":
                os.kill(os.getpid(), number)


def main():
    job, rest = sys.argv[1], sys.argv[2:]
    if job == "train":
        return train(parse_train(rest))
    cyconv.set_num_threads(1)
    comm = distributed.init()
    {"average": average, "syncbn": syncbn, "shards": shards}[job](comm, rest[0])


if __name__ == "__main__":
    main()
