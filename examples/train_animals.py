"""Train an image classifier on a folder of images (e.g. dog / panda / bird photos).

    python examples/train_animals.py --data ../shared/datasets/animals --classes dog,panda,bird

The data folder holds one sub-folder per class (DIR/dog/*.jpg, DIR/panda/*.jpg ...).
The images are split 80/10/10 (stratified, seeded) into train/valid/test; the
model is trained on train, the best epoch is chosen by valid accuracy, and that
model is evaluated on test.  Everything goes under --out:

    best.safetensors, last.safetensors   checkpoints (cyconv.load(path) rebuilds the model;
                                          torch loads best.safetensors' state_dict)
    history.jsonl, history.csv, curves.png, confusion_matrix.png (valid, best epoch)
    split.json                           the split (file names per part)
    test_metrics.json                    test accuracy, confusion matrix, precision/recall
                                         and the prediction for every test image
    test_confusion_matrix.png

Ctrl-C (or SIGTERM) saves a resumable checkpoint; run the same command with
--resume to continue exactly where it stopped.  The defaults are the recipe
that gave the best result; --model reference trains the reference network.
"""
import argparse
import inspect
import json
import os
import shlex
import signal
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cyconv  # noqa: E402
from cyconv import checkpoint, models, optim  # noqa: E402
from cyconv.data import (LAYOUT, Augment, DataLoader, ImageFolder, Subset,  # noqa: E402
                         compute_mean_std, load_split, save_split, split_indices)
from cyconv.train import (LRSchedule, Trainer, TrainingDiverged, evaluate,  # noqa: E402
                          format_confusion, plot_confusion)

# The default recipe (see the module docstring); --model reference changes the defaults
# marked below.  Both validate and save a moving average of the weights (ema): the
# weights of single epochs jump around, and the epoch with the best valid accuracy
# (300 images) did worse on the test images than the last epoch (README.rst).
DEFAULTS = dict(model="small", epochs=70, batch_size=32, lr=0.05, image_size=128,
                weight_decay=5e-4, momentum=0.9, warmup=1.0, schedule="cosine",
                label_smoothing=0.1, ema=0.998, seed=0,
                augment=dict(hflip=0.5, crop=0.5, crop_scale=[0.75, 1.0], rotate=0.3,
                             max_angle=15.0, color=0.5))
# The reference network has no normalisation or dropout and overfits: every training
# image gets a random resized crop of 0.7-1.0 of the side, as the reference did, half
# of them a random erasing (README.rst: without erasing and the average, test
# accuracy 0.893).
REFERENCE_DEFAULTS = dict(image_size=224, lr=0.02, epochs=140,
                          augment=dict(hflip=0.5, crop=1.0, crop_scale=[0.7, 1.0], rotate=0.5,
                                       max_angle=15.0, color=0.5, erase=0.5))
# settings that a resumed run takes from its checkpoint (the others may change)
RESUMED = ("classes", "model", "augment", "epochs", "batch_size", "lr", "image_size",
           "weight_decay", "momentum", "warmup", "schedule", "step_size", "label_smoothing",
           "ema", "seed", "limit", "mean", "std")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help=f"image folder, layout {LAYOUT}")
    p.add_argument("--classes", help="comma-separated class names (default: every sub-folder)")
    p.add_argument("--model", choices=sorted(models.ARCHITECTURES),
                   help=f"architecture (default {DEFAULTS['model']})")
    p.add_argument("--epochs", type=int, help=f"default {DEFAULTS['epochs']} "
                   f"({REFERENCE_DEFAULTS['epochs']} for --model reference)")
    p.add_argument("--batch-size", type=int, help=f"default {DEFAULTS['batch_size']}")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {DEFAULTS['lr']}; "
                   f"{REFERENCE_DEFAULTS['lr']} for --model reference)")
    p.add_argument("--image-size", type=int, help=f"side in pixels (default "
                   f"{DEFAULTS['image_size']}; {REFERENCE_DEFAULTS['image_size']} for reference)")
    p.add_argument("--weight-decay", type=float, help=f"default {DEFAULTS['weight_decay']}")
    p.add_argument("--momentum", type=float, help=f"default {DEFAULTS['momentum']}")
    p.add_argument("--warmup", type=float, help=f"warm-up epochs (default {DEFAULTS['warmup']})")
    p.add_argument("--schedule", choices=LRSchedule.KINDS, help="default cosine")
    p.add_argument("--step-size", type=int, default=10, help="epochs per x0.1 of --schedule step")
    p.add_argument("--label-smoothing", type=float,
                   help=f"default {DEFAULTS['label_smoothing']}")
    p.add_argument("--ema", type=ema_decay, metavar="DECAY",
                   help="validate and save a moving average of the weights with this decay "
                        f"per step; 0: off (default {DEFAULTS['ema']})")
    p.add_argument("--augment", type=augment_settings, metavar="KEY=VALUE,...",
                   help="change augmentation settings of the recipe, e.g. defocus=0.3,erase=0.5 "
                   "(keys: the arguments of cyconv.data.Augment)")
    p.add_argument("--seed", type=int, help="seed of the split, weights, order and augmentation")
    p.add_argument("--limit", type=int, help="use at most this many images per class (quick runs)")
    p.add_argument("--out", default="runs/animals", help="output folder (default runs/animals)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--workers", type=int, default=2, help="data-loading threads (default 2)")
    p.add_argument("--threads", type=int, help="kernel threads (default: every core)")
    p.add_argument("--save-every", type=int, help="also save last.safetensors every N steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def augment_settings(text):
    """'defocus=0.3,crop_scale=0.6:1.0' -> {'defocus': 0.3, 'crop_scale': [0.6, 1.0]}."""
    known = inspect.signature(Augment).parameters
    settings = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        if key not in known:
            raise argparse.ArgumentTypeError(
                f"unknown augmentation setting {key!r}; known: {', '.join(known)}")
        is_range = isinstance(known[key].default, tuple)
        try:
            numbers = [float(v) for v in value.split(":")]
            if len(numbers) != (2 if is_range else 1):
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{key}: expected {'low:high' if is_range else 'a number'}, got {value!r}") from None
        settings[key] = numbers if is_range else numbers[0]
    return settings


def ema_decay(text):
    """A decay in [0, 1) for --ema (0: no moving average)."""
    try:
        decay = float(text)
    except ValueError:
        decay = None
    if decay is None or not 0 <= decay < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return decay


def fail(message, code=2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def settings(args, out):
    """The run's settings: the command line over the defaults, or the checkpoint's on --resume."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    if isinstance(given.get("classes"), str):
        given["classes"] = [c.strip() for c in given["classes"].split(",") if c.strip()]
    if args.resume:
        last = out / "last.safetensors"
        if not last.is_file():
            fail(f"--resume: there is no checkpoint {last} to resume")
        try:
            saved = checkpoint.read(last).metadata["config"]
        except (checkpoint.CheckpointError, KeyError) as error:
            fail(f"--resume: cannot read the run's settings from {last}: {error}")
        # a setting newer than the run keeps its default; runs from before --ema had none
        config = dict(DEFAULTS, **dict({"ema": 0.0}, **saved))
        for key in RESUMED:
            if key in given and key != "epochs" and given[key] != saved.get(key):
                print(f"note: --resume keeps the run's {key}={saved.get(key)!r} "
                      f"(ignoring {given[key]!r})", file=sys.stderr)
        if "epochs" in given:
            config["epochs"] = given["epochs"]
        return config
    config = dict(DEFAULTS)
    if given.get("model") == "reference":
        config.update(REFERENCE_DEFAULTS)
    config.update({k: v for k, v in given.items()
                   if k != "augment" and (k in RESUMED or k in DEFAULTS)})
    config["augment"] = dict(config["augment"], **given.get("augment", {}))
    return config


def open_data(args, config):
    if not args.data:
        fail(f"--data DIR is required: a folder with one sub-folder of images per class, "
             f"i.e. {LAYOUT}, e.g. DIR/dog/*.jpg, DIR/panda/*.jpg, DIR/bird/*.jpg")
    root = Path(args.data)
    if not root.is_dir():
        fail(f"--data {root} does not exist or is not a folder; expected {LAYOUT}, "
             "e.g. DIR/dog/*.jpg, DIR/panda/*.jpg, DIR/bird/*.jpg")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unreadable files are listed below instead
            data = ImageFolder(root, config.get("classes"), config["image_size"])
    except (FileNotFoundError, ValueError) as error:
        fail(f"--data {root}: {error}")
    if data.skipped:
        print(f"warning: skipped {len(data.skipped)} unreadable file(s), e.g. {data.skipped[0]}",
              file=sys.stderr)
    return data


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


def choose_split(data, config, out, resume):
    split_path = out / "split.json"
    if resume and split_path.is_file():
        return load_split(split_path, data)
    labels = np.array([label for _, label in data.samples])
    indices = np.arange(len(labels))
    if config.get("limit"):
        rng = np.random.default_rng(config["seed"])
        indices = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))
                                          [:config["limit"]] for c in np.unique(labels)]))
    parts = split_indices(labels[indices], seed=config["seed"])
    train, valid, test = (indices[p] for p in parts)
    save_split(split_path, data, train, valid, test)
    return train, valid, test


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    config = settings(args, out)
    if not args.resume and (out / "last.safetensors").exists():
        fail(f"{out} already holds a run: add --resume to continue it, or choose another --out")
    data = open_data(args, config)
    config["classes"] = data.classes
    if args.threads:
        cyconv.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    try:
        train_idx, valid_idx, test_idx = choose_split(data, config, out, args.resume)
    except (FileNotFoundError, ValueError) as error:
        fail(f"the run's split {out / 'split.json'} does not match --data {args.data}: {error}")
    print(f"{len(data.classes)} classes {data.classes}; train {len(train_idx)}, "
          f"valid {len(valid_idx)}, test {len(test_idx)} images of "
          f"{config['image_size']}x{config['image_size']}")

    decoded = Decoded(data)
    if "mean" not in config:
        mean, std = compute_mean_std(decoded, train_idx, num_workers=args.workers)
        config["mean"], config["std"] = mean.tolist(), std.tolist()
    mean, std = np.float32(config["mean"]), np.float32(config["std"])
    seed = config["seed"]
    augment = Augment(**{k: tuple(v) if isinstance(v, list) else v
                         for k, v in config["augment"].items()})
    train_loader = DataLoader(Subset(decoded, train_idx), config["batch_size"], shuffle=True,
                              augment=augment, seed=seed, drop_last=len(train_idx) >
                              config["batch_size"], mean=mean, std=std, num_workers=args.workers,
                              cache=False)
    eval_loaders = [DataLoader(Subset(decoded, idx), 64, mean=mean, std=std, cache=False,
                               num_workers=args.workers) for idx in (valid_idx, test_idx)]

    cyconv.manual_seed(seed)
    model = models.create(config["model"], len(data.classes), config["image_size"])
    opt = optim.SGD(model.parameters(), config["lr"], momentum=config["momentum"],
                    weight_decay=config["weight_decay"], nesterov=config["momentum"] > 0)
    schedule = LRSchedule(config["lr"], config["schedule"], warmup_epochs=config["warmup"],
                          step_size=config.get("step_size", 10))
    average = optim.ExponentialMovingAverage(model, config["ema"]) if config["ema"] else None
    argv_text = " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    hint = (f"python {shlex.quote(sys.argv[0])} {argv_text}"
            + ("" if args.resume else " --resume"))
    trainer = Trainer(model, opt, train_loader, eval_loaders[0], epochs=config["epochs"],
                      schedule=schedule, out_dir=out, classes=data.classes, mean=mean, std=std,
                      image_size=(config["image_size"],) * 2, metadata={"config": config},
                      label_smoothing=config["label_smoothing"], progress=not args.no_progress,
                      save_every=args.save_every, resume_hint=hint, average=average)
    try:
        trainer.fit(resume=args.resume)
    except TrainingDiverged as error:
        fail(str(error), code=1)
    except checkpoint.CheckpointError as error:
        fail(f"cannot resume: {error}")
    if trainer.interrupted:
        sys.exit(128 + signal.Signals[trainer.interrupted].value)

    best = cyconv.load(out / "best.safetensors")
    result = evaluate(best, eval_loaders[1], len(data.classes))
    files = [data.samples[i][0].relative_to(data.root).as_posix() for i in test_idx]
    report = {k: v for k, v in result.items() if k not in ("predictions", "labels")}
    report.update(best_epoch=trainer.best["epoch"], valid_accuracy=trainer.best["accuracy"],
                  classes=data.classes, predictions=[
                      {"file": f, "label": int(t), "predicted": int(p)}
                      for f, t, p in zip(files, result["labels"], result["predictions"])])
    checkpoint.atomic_write(out / "test_metrics.json", json.dumps(report, indent=1).encode())
    plot_confusion(result["confusion"], data.classes, out / "test_confusion_matrix.png",
                   f"test, epoch {trainer.best['epoch']}")
    print(f"\nbest epoch {trainer.best['epoch']} (valid accuracy {trainer.best['accuracy']:.4f})")
    print(f"test accuracy: {result['accuracy']:.4f} ({len(test_idx)} images)")
    print("test confusion matrix:")
    print(format_confusion(result["confusion"], data.classes))
    if data.skipped:  # found while scanning, or unreadable later (each warned once)
        print(f"skipped {len(data.skipped)} unreadable image file(s) in all", file=sys.stderr)
    print(f"outputs in {out}{os.sep}")
    return result


if __name__ == "__main__":
    main()
