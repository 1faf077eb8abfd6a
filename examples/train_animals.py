"""Train an image classifier on a folder of images (e.g. dog / panda / bird photos).

    python examples/train_animals.py --data ../shared/datasets/animals --classes dog,panda,bird

The data folder holds one sub-folder per class (DIR/dog/*.jpg, DIR/panda/*.jpg ...).
The images are split 80/10/10 (stratified, seeded) into train/valid/test; the
model is trained on train, the best epoch is chosen by valid accuracy, and that
model is evaluated on test, once, at the end.  Everything goes under --out:

    best.safetensors, last.safetensors   checkpoints (cyconv.load(path) rebuilds the model;
                                          torch loads best.safetensors' state_dict)
    history.jsonl, history.csv, curves.png
    confusion_matrix.png                 the valid split's, at the best epoch
    split.json                           the split (file names per part)
    test_metrics.json                    test accuracy, confusion matrix, precision/recall
                                         and the prediction for every test image
    test_confusion_matrix.png            the test split's

Ctrl-C (or SIGTERM) saves a resumable checkpoint; run the same command with
--resume to continue exactly where it stopped (the run keeps its own settings).
A folder that holds a run is never overwritten unless --overwrite is given.
--model chooses the network and its recipe: small (the default), resnet, reference.

On several processes (MPI; pip install -e ".[mpi]"), each training on its share of
every batch, with SyncBatchNorm: the same recipe, the same results to float rounding
(docs/distributed.rst)::

    mpirun -n 2 python examples/train_animals.py --data DIR --classes dog,panda,bird --distributed

Each rank uses one kernel thread unless --threads; rank 0 prints and writes --out;
--resume needs the same number of ranks.
"""
import argparse
import json
import os
import shlex
import signal
import sys
import warnings
from pathlib import Path

import numpy as np

import cyconv
from cyconv import checkpoint, distributed, models, nn, optim
from cyconv.data import (
    LAYOUT,
    Augment,
    DataLoader,
    ImageFolder,
    ProgressiveSize,
    Subset,
    compute_mean_std,
    load_split,
    save_split,
    split_indices,
)
from cyconv.files import atomic_write
from cyconv.train import (
    LRSchedule,
    RunFolder,
    Trainer,
    TrainingDiverged,
    evaluate,
    format_confusion,
    plot_confusion,
)

from common import fail, float_range, int_range, run, threads
from recipes import RECIPES, RUN_SETTINGS, augment_settings, ema_decay, progressive_setting

OUTPUTS = ("split.json", "test_metrics.json", "test_confusion_matrix.png")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help=f"image folder, layout {LAYOUT}")
    p.add_argument("--classes", help="comma-separated class names (default: every sub-folder)")
    p.add_argument("--model", choices=sorted(RECIPES), help="network and its recipe "
                   "(default small)")
    p.add_argument("--epochs", type=int_range(1, 10000), help="epochs (recipe's default)")
    p.add_argument("--batch-size", type=int_range(1, 4096), help="default 32")
    p.add_argument("--lr", type=float_range(0, 10, low_open=True), help="peak learning rate")
    p.add_argument("--image-size", type=int_range(16, 1024), help="side in pixels")
    p.add_argument("--weight-decay", type=float_range(0, 1), help="default 5e-4")
    p.add_argument("--momentum", type=float_range(0, 1, high_open=True), help="default 0.9")
    p.add_argument("--warmup", type=float_range(0, 10000), help="warm-up epochs (default 1)")
    p.add_argument("--schedule", choices=LRSchedule.KINDS, help="default cosine")
    p.add_argument("--step-size", type=int_range(1, 10000),
                   help="epochs per x0.1 of --schedule step (default 10)")
    p.add_argument("--label-smoothing", type=float_range(0, 1, high_open=True),
                   help="default 0.1")
    p.add_argument("--ema", type=ema_decay, metavar="DECAY",
                   help="validate and save a moving average of the weights with this decay "
                        "per step; 0: off (default 0.998)")
    p.add_argument("--eval-flip", action=argparse.BooleanOptionalAction,
                   help="classify valid and test photos by the mean of the class probabilities "
                        "of each photo and its mirror image (recipe's default)")
    p.add_argument("--center-crop", type=float_range(0, 1, low_open=True), metavar="FRACTION",
                   help="valid and test photos (and the saved model's input) are cut to the "
                        "middle FRACTION of each side before resizing (recipe's default)")
    p.add_argument("--progressive", type=progressive_setting, metavar="START:BEGIN:END",
                   help="progressive resizing: training images of START px until the fraction "
                        "BEGIN of the epochs, growing by 16 px steps to --image-size at END; "
                        "off: --image-size throughout (recipe's default)")
    p.add_argument("--augment", type=augment_settings, metavar="KEY=VALUE,...",
                   help="change augmentation settings of the recipe, e.g. defocus=0.3,erase=0.5 "
                   "(keys: the arguments of cyconv.data.Augment)")
    p.add_argument("--seed", type=int_range(0, 2**31 - 1),
                   help="seed of the split, weights, order and augmentation (default 0)")
    p.add_argument("--limit", type=int_range(3),
                   help="use at most this many images per class (quick runs; at least 3)")
    p.add_argument("--out", type=Path, default=Path("runs/animals"),
                   help="output folder (default runs/animals)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run that --out holds (its files are deleted first)")
    p.add_argument("--workers", type=int_range(0, 64), default=2,
                   help="data-loading threads (default 2)")
    p.add_argument("--threads", type=threads, help="kernel threads (default: every core)")
    p.add_argument("--save-every", type=int_range(1),
                   help="also save last.safetensors every N steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--distributed", action="store_true",
                   help="one rank of an MPI job (mpirun -n N ... --distributed): each rank "
                        "trains on 1/N of every batch; 1 kernel thread per rank by default")
    args = p.parse_args(argv)
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite exclude each other")
    if args.classes is not None:
        args.classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        if not args.classes:
            p.error("argument --classes: expected comma-separated class names")
    return args


def run_settings(args, folder):
    """The run's settings: the recipe under the command line, or the saved run's on --resume."""
    given = {k: v for k, v in vars(args).items() if k in RUN_SETTINGS and v is not None}
    if not args.resume:
        config = dict(RECIPES[given.get("model", "small")], model=given.get("model", "small"))
        config.update({k: v for k, v in given.items() if k != "augment"})
        config["augment"] = dict(config["augment"], **given.get("augment", {}))
        return config
    if not folder.last.is_file():
        fail(f"--resume: there is no checkpoint {folder.last} to resume")
    try:
        config = checkpoint.read(folder.last).metadata["config"]
    except (checkpoint.CheckpointError, KeyError) as error:
        fail(f"--resume: cannot read the run's settings from {folder.last}: {error}")
    changed = [f"--{k.replace('_', '-')} {v!r} (the run has {config.get(k)!r})"
               for k, v in given.items()
               if (dict(config.get(k, {}), **v) if k == "augment" else v) != config.get(k)]
    if changed:
        fail("--resume continues the run with its own settings; these differ: "
             + "; ".join(changed))
    return config


def prepare_folder(args, folder, writes=True):
    """Refuse to mix a new run with the files of another one (unless --overwrite: then they go,
    deleted by the process that ``writes``)."""
    existing = folder.existing_outputs(OUTPUTS)
    if args.resume or not existing:
        return
    if not args.overwrite:
        fail(f"{folder.path} already holds a run ({', '.join(existing)}): add --resume to continue "
             "it, --overwrite to replace it, or choose another --out")
    for name in existing if writes else ():
        (folder.path / name).unlink()


def open_data(args, config):
    if not args.data:
        fail(f"--data DIR is required: a folder with one sub-folder of images per class, "
             f"i.e. {LAYOUT}, e.g. DIR/dog/*.jpg, DIR/panda/*.jpg, DIR/bird/*.jpg")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data = ImageFolder(args.data, config.get("classes"), config["image_size"])
    except (FileNotFoundError, ValueError) as error:
        fail(f"--data {args.data}: {error}")
    for warning in caught[:5]:
        print(f"warning: {warning.message}", file=sys.stderr)
    if len(caught) > 5:
        print(f"warning: ... {len(caught) - 5} more unreadable files skipped", file=sys.stderr)
    if len(data.classes) < 2:
        fail(f"--data {args.data}: one class ({data.classes[0]}) cannot be told apart from "
             "anything: give at least two classes")
    return data


def choose_split(data, config, folder, resume, writes=True):
    split_path = folder.path / "split.json"
    if resume and split_path.is_file():
        try:
            return load_split(split_path, data)
        except (FileNotFoundError, ValueError) as error:
            fail(f"the run's split {split_path} does not match the data: {error}")
    labels = np.array([label for _, label in data.samples])
    indices = np.arange(len(labels))
    if config.get("limit"):
        rng = np.random.default_rng(config["seed"])
        indices = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))
                                          [:config["limit"]] for c in np.unique(labels)]))
    counts = np.bincount(labels[indices], minlength=len(data.classes))
    few = [f"{name} ({count})" for name, count in zip(data.classes, counts) if count < 3]
    if few:
        fail(f"class(es) with fewer than 3 readable images: {', '.join(few)}; an 8:1:1 split "
             "needs one each for train, valid and test")
    parts = split_indices(labels[indices], seed=config["seed"])
    train, valid, test = (indices[p] for p in parts)
    if writes:
        save_split(split_path, data, train, valid, test)
    return train, valid, test


class Decoded:
    """The data set with every decoded image kept after its first use (decoded once, shared
    by the mean/std pass and the loaders)."""

    def __init__(self, dataset):
        self.dataset, self.classes, self.image_size = dataset, dataset.classes, dataset.image_size
        self.cache = {}

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        item = self.cache.get(index)
        if item is None:
            item = self.cache[index] = self.dataset[index]
        return item


def loaders(data, config, split, workers, comm=None):
    """(train loader, valid loader, test loader) and (mean, std) of the train split; with
    ``comm``, the train and valid loaders give this rank's share of every batch."""
    train_idx, valid_idx, test_idx = split
    decoded = Decoded(data)
    crop = config.get("center_crop", 1.0)   # runs from before the setting saw whole photos
    seen = decoded if crop == 1 else Decoded(data.with_center_crop(crop))
    if "mean" not in config:
        mean, std = compute_mean_std(decoded, train_idx, num_workers=workers)
        config["mean"], config["std"] = mean.tolist(), std.tolist()
    mean, std = np.float32(config["mean"]), np.float32(config["std"])
    augment = Augment(**{k: tuple(v) if isinstance(v, list) else v
                         for k, v in config["augment"].items()})
    train, valid, test = Subset(decoded, train_idx), Subset(seen, valid_idx), Subset(seen, test_idx)
    plain = {"mean": mean, "std": std, "cache": False, "num_workers": workers}
    shuffled = dict(plain, shuffle=True, augment=augment, seed=config["seed"],
                    image_size=training_sizes(config))
    test = DataLoader(test, 64, **plain)
    if comm is not None:   # every image once per epoch (docs/distributed.rst)
        share = {"rank": comm.rank, "ranks": comm.size}
        train = distributed.ShardedLoader(train, config["batch_size"] // comm.size, **share,
                                          **shuffled)
        valid = distributed.ShardedLoader(valid, max(1, 64 // comm.size), **share, **plain)
        return (train, valid, test), (mean, std)
    train = DataLoader(train, config["batch_size"],
                       drop_last=len(train_idx) > config["batch_size"], **shuffled)
    return (train, DataLoader(valid, 64, **plain), test), (mean, std)


def training_sizes(config):
    """The training images' side per epoch (ProgressiveSize), or None: --image-size."""
    if not config.get("progressive"):   # runs from before the setting had none
        return None
    start, begin, end = config["progressive"]
    epochs = config["epochs"]
    return ProgressiveSize(min(start, config["image_size"]), config["image_size"],
                           (round(begin * epochs), round(end * epochs)))


def trainer_for(config, data, loaders_, folder, args, argv, comm=None):
    cyconv.manual_seed(config["seed"])
    sizes = training_sizes(config)
    try:
        model = models.create(config["model"], len(data.classes), config["image_size"])
        for size in {config["image_size"], sizes(0) if sizes else config["image_size"]}:
            model.output_shape((1, 3, size, size))
    except ValueError as error:
        given = f" (--progressive from {sizes(0)} px)" if sizes else ""
        fail(f"--image-size {config['image_size']}{given} does not suit --model "
             f"{config['model']}: {error}")
    if comm is not None:
        model = distributed.convert_sync_batchnorm(model, comm)
    opt = optim.SGD(model.parameters(), config["lr"], momentum=config["momentum"],
                    weight_decay=config["weight_decay"], nesterov=config["momentum"] > 0)
    schedule = LRSchedule(config["lr"], config["schedule"], warmup_epochs=config["warmup"],
                          step_size=config["step_size"])
    average = optim.ExponentialMovingAverage(model, config["ema"]) if config["ema"] else None
    argv_text = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    hint = (("" if comm is None else f"mpirun -n {comm.size} ")
            + f"python {shlex.quote(sys.argv[0])} {argv_text}"
            + ("" if args.resume else " --resume"))
    arguments = (model, opt, nn.CrossEntropyLoss(config["label_smoothing"]), loaders_[0],
                 loaders_[1])
    settings = {"epochs": config["epochs"], "schedule": schedule, "average": average,
                "eval_flip": config.get("eval_flip", False), "run": folder,
                "save_every": args.save_every,
                "progress": not args.no_progress, "resume_hint": hint}
    if comm is not None:
        return distributed.DistributedTrainer(comm, *arguments, **settings)
    return Trainer(*arguments, **settings)


def test_once(folder, data, test_loader, split, trainer):
    """Evaluate best.safetensors on the test split (once, at the end) and write the report."""
    best = cyconv.load(folder.best)
    result = evaluate(best, test_loader, len(data.classes), flip=trainer.eval_flip)
    files = [data.samples[i][0].relative_to(data.root).as_posix() for i in split[2]]
    report = {k: v for k, v in result.items() if k not in ("predictions", "labels")}
    report.update(eval_flip=trainer.eval_flip, best_epoch=trainer.position.best["epoch"],
                  valid_accuracy=trainer.position.best["accuracy"],
                  classes=data.classes, predictions=[
                      {"file": f, "label": int(t), "predicted": int(p)}
                      for f, t, p in zip(files, result["labels"], result["predictions"])])
    atomic_write(folder.path / "test_metrics.json", json.dumps(report, indent=1).encode())
    plot_confusion(result["confusion"], data.classes, folder.path / "test_confusion_matrix.png",
                   f"test, epoch {trainer.position.best['epoch']}")
    return result


def start_distributed(args):
    """This rank's communicator (only rank 0 prints: the others' stdout goes nowhere)."""
    comm = distributed.init()
    cyconv.set_num_threads(args.threads or 1)
    if not comm.is_root:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    return comm


def check_ranks_agree(comm, config, data, split):
    """Every rank must train on the same files, split and settings."""
    try:
        comm.check_same("the data and settings", config=config, split=[p.tolist() for p in split],
                        files=[path.relative_to(data.root).as_posix() for path, _ in data.samples])
    except distributed.RanksDisagree as error:
        fail(str(error))
    if config["batch_size"] % comm.size:
        fail(f"--batch-size {config['batch_size']} must be a multiple of the {comm.size} ranks "
             "(each takes an equal share of every batch)")


def main(argv=None):
    args = parse_args(argv)
    comm = start_distributed(args) if args.distributed else None
    writes = comm is None or comm.is_root
    folder = RunFolder(args.out)
    config = run_settings(args, folder)
    prepare_folder(args, folder, writes)
    data = open_data(args, config)
    config["classes"] = data.classes
    if args.threads:
        cyconv.set_num_threads(args.threads)
    split = choose_split(data, config, folder, args.resume, writes)
    print(f"{len(data.classes)} classes {data.classes}; train {len(split[0])}, valid "
          f"{len(split[1])}, test {len(split[2])} images of {config['image_size']}x"
          f"{config['image_size']}; model {config['model']}"
          + (f"; valid and test see the middle {config['center_crop']:g} of each photo"
             if config.get("center_crop", 1.0) != 1 else "")
          + (f"; training images grow from {training_sizes(config)(0)} px"
             if config.get("progressive") else ""))
    loaders_, (mean, std) = loaders(data, config, split, args.workers, comm)
    if comm is not None:
        check_ranks_agree(comm, config, data, split)
    folder.metadata = {"config": config}
    folder.preprocessing = dict(classes=data.classes, mean=mean, std=std,
                             image_size=(config["image_size"],) * 2,
                             center_crop=config.get("center_crop", 1.0))
    trainer = trainer_for(config, data, loaders_, folder, args, argv, comm)
    try:
        trainer.fit(resume=args.resume)
    except TrainingDiverged as error:
        fail(str(error), code=1)
    except checkpoint.CheckpointError as error:
        fail(f"cannot resume: {error}")
    if trainer.interrupted:
        return 128 + signal.Signals[trainer.interrupted].value
    if not writes:   # rank 0 tests the model alone
        return 0
    result = test_once(folder, data, loaders_[2], split, trainer)
    print(f"\nbest epoch {trainer.position.best['epoch']} (valid accuracy "
          f"{trainer.position.best['accuracy']:.4f})")
    print(f"test accuracy: {result['accuracy']:.4f} ({len(split[2])} images)")
    print("test confusion matrix:")
    print(format_confusion(result["confusion"], data.classes))
    if data.skipped:  # found while scanning, or unreadable later (each warned once)
        print(f"skipped {len(data.skipped)} unreadable image file(s) in all", file=sys.stderr)
    print(f"the model is in {folder.best} (cyconv.load rebuilds it); all outputs in {folder.path}/")
    return 0


if __name__ == "__main__":
    run(main)
