"""Classify images with a trained checkpoint.

    python examples/predict.py runs/animals/best.safetensors ../shared/datasets/images/dog.jpg
    python examples/predict.py runs/animals/best.safetensors ../shared/datasets/images/

Loads the model with ``cyconv.load`` (which brings back its classes, input
size and preprocessing), prepares each image the way the model was trained,
and prints the top classes with their probabilities.  A folder argument
predicts every image in it (sorted; --recursive for sub-folders).  Images go
through the model in batches of --batch-size.  An image that cannot be read
is named on stderr and the others still run; the exit status is then 1 (2 for
a bad checkpoint or command line).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

import cyconv
from cyconv.data import IMAGE_EXTENSIONS, CorruptImageError, read_image
from cyconv.explain import softmax

from common import fail, int_range, load_model, run, threads


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a .safetensors file written by cyconv (best.safetensors)")
    p.add_argument("images", nargs="+", help="image files and/or folders of images")
    p.add_argument("--top", type=int_range(1), default=3, help="classes per image (default 3)")
    p.add_argument("--batch-size", type=int_range(1, 4096), default=32,
                   help="images per forward pass (default 32)")
    p.add_argument("--recursive", action="store_true", help="also look in sub-folders")
    p.add_argument("--image-size", type=int_range(8, 4096),
                   help="input side in pixels, for a checkpoint that does not store one")
    p.add_argument("--flip", action="store_true",
                   help="average the class probabilities of each image and its mirror image "
                        "(as a run trained with --eval-flip was validated and tested)")
    p.add_argument("--threads", type=threads, help="kernel threads (default: every core)")
    return p.parse_args(argv)


def expand(paths, recursive=False):
    """Image files of the arguments, folders expanded (sorted); other paths are kept (they
    are reported as unreadable later)."""
    files = []
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            found = sorted(p for p in (path.rglob("*") if recursive else path.iterdir())
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                print(f"warning: no images in folder {path}", file=sys.stderr)
            files += found
        else:
            files.append(path)
    return files


def read(path):
    """(the image, None), or (None, why it cannot be read, naming the file)."""
    if not path.exists():
        return None, f"cannot read image {path}: no such file"
    try:
        return read_image(path), None
    except CorruptImageError as error:
        return None, str(error)


def main(argv=None):
    args = parse_args(argv)
    model = load_model(args.checkpoint, args.threads)
    if args.image_size:
        model.image_size = (args.image_size,) * 2
    if model.image_size is None:
        fail(f"checkpoint {args.checkpoint} stores no image size: give --image-size")
    classes = model.classes
    failed = 0
    files = expand(args.images, args.recursive)
    for start in range(0, len(files), args.batch_size):
        batch, names = [], []
        for path in files[start:start + args.batch_size]:
            image, problem = read(path)
            if problem:
                print(f"error: {problem}", file=sys.stderr)
                failed += 1
                continue
            batch.append(image)
            names.append(path)
        if not batch:
            continue
        probabilities = softmax(cyconv.predict(model, batch, args.batch_size, args.flip))
        for path, p in zip(names, probabilities):
            order = np.argsort(-p, kind="stable")[:args.top]
            text = ", ".join(f"{classes[i] if classes else i} {100 * p[i]:.1f}%" for i in order)
            print(f"{path}: {text}", flush=True)
    if failed:
        print(f"error: {failed} of {len(files)} image(s) could not be read", file=sys.stderr)
    return 1 if failed or not files else 0


if __name__ == "__main__":
    run(main)
