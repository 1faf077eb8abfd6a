"""Classify images with a trained checkpoint.

    python examples/predict.py runs/animals/best.safetensors photo.jpg other.png pictures/

Loads the model with ``cyconv.load`` (which brings back its classes, input
size and normalisation), resizes and normalises each image the same way it
was trained, and prints the top classes with their probabilities.  A folder
argument predicts every image in it (sorted; add --recursive for sub-folders).
Images go through the model in batches of --batch-size.  An image that cannot
be read is reported by name on stderr and the others still run; the exit
status is then 1 (2 for a bad checkpoint or command line).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cyconv  # noqa: E402
from cyconv.checkpoint import CheckpointError  # noqa: E402
from cyconv.data import IMAGE_EXTENSIONS, CorruptImageError, read_image, resize  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a .safetensors file written by cyconv (best.safetensors)")
    p.add_argument("images", nargs="+", help="image files and/or folders of images")
    p.add_argument("--top", type=int, default=3, help="classes to print per image (default 3)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--recursive", action="store_true", help="also look in sub-folders")
    p.add_argument("--image-size", type=int,
                   help="input side in pixels, for a checkpoint that does not store one")
    p.add_argument("--threads", type=int, help="kernel threads (default: every core)")
    return p.parse_args(argv)


def fail(message, code=2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def load_model(path, threads=None, require_image_size=False):
    """cyconv.load(path) (kernels on `threads` threads when given), or exit with a clear
    message; require_image_size: the checkpoint must say what size its images were."""
    try:
        model = cyconv.load(path)
    except FileNotFoundError:
        fail(f"checkpoint {path} does not exist")
    except (CheckpointError, OSError) as error:
        fail(f"cannot load checkpoint {path}: {error}")
    if threads:
        cyconv.set_num_threads(threads)
    if require_image_size and model.image_size is None:
        fail(f"checkpoint {path} stores no image size")
    return model


def expand(paths, recursive=False):
    """Image files of the arguments, folders expanded (sorted); missing paths are kept
    (they are reported as unreadable later)."""
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


def softmax(logits):
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def read(path, size):
    """The image resized to the model's input, or the reason it cannot be read."""
    try:
        if not path.is_file():
            return None, "no such file" if not path.exists() else "not a file"
        image = read_image(path)
    except (CorruptImageError, OSError, ValueError) as error:
        return None, str(error)
    return (resize(image, size) if size else image), None


def main(argv=None):
    args = parse_args(argv)
    if args.top < 1 or args.batch_size < 1:
        fail("--top and --batch-size must be at least 1")
    model = load_model(args.checkpoint, args.threads)
    size = (args.image_size,) * 2 if args.image_size else model.image_size
    if size is None:
        fail(f"checkpoint {args.checkpoint} stores no image size: give --image-size")
    model.image_size = size
    classes = model.classes
    failed = 0
    files = expand(args.images, args.recursive)
    for start in range(0, len(files), args.batch_size):
        batch, names = [], []
        for path in files[start:start + args.batch_size]:
            image, problem = read(path, size)
            if problem:
                print(f"error: cannot read {path}: {problem}", file=sys.stderr)
                failed += 1
                continue
            batch.append(image)
            names.append(path)
        if not batch:
            continue
        probabilities = softmax(cyconv.predict(model, np.stack(batch), args.batch_size))
        for path, p in zip(names, probabilities):
            order = np.argsort(-p, kind="stable")[:args.top]
            text = ", ".join(f"{classes[i] if classes else i} {100 * p[i]:.1f}%" for i in order)
            print(f"{path}: {text}", flush=True)
    if failed:
        print(f"{failed} of {len(files)} image(s) could not be read", file=sys.stderr)
    return 1 if failed or not files else 0


if __name__ == "__main__":
    sys.exit(main())
