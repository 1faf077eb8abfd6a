"""Evaluate a trained checkpoint: accuracy, per-class precision/recall, confusion matrix.

    python examples/evaluate.py runs/animals/best.safetensors --data ../shared/datasets/animals

By default the images are the test part of the split that the checkpoint's
run wrote (split.json next to the checkpoint, as examples/train_animals.py
writes it); --split FILE names another split file and --part another part
(train, valid, test); --all evaluates every image of the model's classes
in --data (also used, with a note, when there is no split file).  The model's
stored classes pick the sub-folders of --data.  Prints the accuracy, a table
of precision, recall and F1 per class and the confusion matrix, and writes
the matrix as a picture to --out (default: evaluation_<part>.png next to the
checkpoint, e.g. runs/animals/evaluation_test.png; the path is printed).

--blur SIGMA first blurs every image (Gaussian, SIGMA pixels at the model's
input size): a check of what a model relies on.  A model that took "blurred
background" as a sign of one class names blurred photos of every class so.
"""
import argparse
import sys
import warnings
from pathlib import Path

import cv2

from cyconv.data import LAYOUT, DataLoader, ImageFolder, Subset, load_split
from cyconv.train import evaluate, format_confusion, plot_confusion

from common import fail, float_range, int_range, load_model, png_path, run, threads


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a .safetensors file written by cyconv (best.safetensors)")
    p.add_argument("--data", required=True, help=f"image folder, layout {LAYOUT}")
    p.add_argument("--split", help="split file (default: split.json next to the checkpoint)")
    p.add_argument("--part", choices=("train", "valid", "test"), default="test",
                   help="part of the split to evaluate (default test)")
    p.add_argument("--all", action="store_true", help="every image in --data, no split")
    p.add_argument("--out", type=png_path, help="confusion-matrix picture (default: "
                   "evaluation_<part>.png next to the checkpoint)")
    p.add_argument("--blur", type=float_range(0, 1000), default=0.0, metavar="SIGMA",
                   help="Gaussian blur of this sigma in pixels (at the model's input size) "
                        "on every image first (default: none)")
    p.add_argument("--flip", action="store_true",
                   help="average the class probabilities of each image and its mirror image "
                        "(as a run trained with --eval-flip was validated and tested)")
    p.add_argument("--batch-size", type=int_range(1, 4096), default=64)
    p.add_argument("--workers", type=int_range(0, 64), default=2,
                   help="data-loading threads (default 2)")
    p.add_argument("--threads", type=threads, help="kernel threads (default: every core)")
    return p.parse_args(argv)


class Blurred:
    """The images of ``dataset`` blurred with a Gaussian of ``sigma`` pixels."""

    def __init__(self, dataset, sigma):
        self.dataset, self.sigma = dataset, sigma
        self.classes, self.image_size = dataset.classes, dataset.image_size

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return cv2.GaussianBlur(image, (0, 0), self.sigma), label


def main(argv=None):
    args = parse_args(argv)
    model = load_model(args.checkpoint, args.threads, require_image_size=True)
    root = Path(args.data)
    if not root.is_dir():
        fail(f"--data {root} does not exist or is not a folder; expected {LAYOUT}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            data = ImageFolder(root, model.classes, model.image_size, model.center_crop)
        except (FileNotFoundError, ValueError) as error:
            fail(f"--data {root}: {error}")
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    classes = data.classes

    split = None if args.all else Path(args.split or Path(args.checkpoint).parent / "split.json")
    if split is not None and not split.is_file():
        if args.split:
            fail(f"split file {split} does not exist")
        print(f"note: no split file {split}: evaluating every image in {root}", file=sys.stderr)
        split = None
    if split is None:
        what, dataset = f"all of {root}", data
    else:
        try:
            parts = dict(zip(("train", "valid", "test"), load_split(split, data)))
        except (FileNotFoundError, ValueError, KeyError) as error:
            fail(f"cannot use split {split}: {error}")
        what, dataset = f"the {args.part} part of {split}", Subset(data, parts[args.part])
        if len(dataset) == 0:
            fail(f"the {args.part} part of {split} is empty")

    if args.flip:
        what += ", each image averaged with its mirror image"
    if args.blur > 0:
        what += f", blurred (sigma {args.blur:g} px)"
        dataset = Blurred(dataset, args.blur)
    loader = DataLoader(dataset, args.batch_size, mean=model.mean, std=model.std,
                        num_workers=args.workers, cache=False)
    result = evaluate(model, loader, len(classes), flip=args.flip)
    print(f"{args.checkpoint} on {what}: {len(dataset)} images, {len(classes)} classes")
    print(f"accuracy: {result['accuracy']:.4f}   loss: {result['loss']:.4f}\n")
    width = max(len("class"), max(len(c) for c in classes)) + 2
    print("class".ljust(width) + "precision".rjust(10) + "recall".rjust(10) + "f1".rjust(10)
          + "images".rjust(8))
    for i, name in enumerate(classes):
        print(name.ljust(width) + f"{result['precision'][i]:10.3f}{result['recall'][i]:10.3f}"
              f"{result['f1'][i]:10.3f}" + str(sum(result["confusion"][i])).rjust(8))
    print("\nconfusion matrix (rows: true class, columns: predicted):")
    print(format_confusion(result["confusion"], classes))
    part = "all" if split is None else args.part
    out = args.out or Path(args.checkpoint).parent / (
        f"evaluation_{part}" + (f"_blur{args.blur:g}" if args.blur else "") + ".png")
    plot_confusion(result["confusion"], classes, out,
                   f"{Path(args.checkpoint).name}: accuracy {result['accuracy']:.3f}")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    run(main)
