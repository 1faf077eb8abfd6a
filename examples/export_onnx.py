"""Export a checkpoint to ONNX and check the file against cyconv.

    python examples/export_onnx.py runs/animals/best.safetensors --out model.onnx
    python examples/export_onnx.py best.safetensors --out model.onnx --images photos/ cat.jpg

Writes the model's inference function (see cyconv.onnx) with the checkpoint's
classes and preprocessing in the file's metadata, then checks it: onnx.checker
passes, and onnxruntime's outputs differ from cyconv's by at most --tolerance on
photos (--images: files and folders; without them, 4 random photos), prepared
with the checkpoint's preprocessing.  Needs ``pip install "cyconv[onnx]"``.

Exit status: 0 when the file is written and checked, 1 when a check fails (the
file is then written but not trustworthy), 2 for a bad command line, checkpoint
or image, a model that cannot be exported, or a missing package.
"""
import argparse
from pathlib import Path

import numpy as np

import cyconv
import cyconv.onnx
from cyconv.data import IMAGE_EXTENSIONS, CorruptImageError
from cyconv.inference import prepare_input

from common import fail, float_range, int_range, load_model, run

BATCH = 16


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a .safetensors file written by cyconv")
    p.add_argument("--out", type=Path, help="the ONNX file (default: the checkpoint's name "
                                            "with .onnx)")
    p.add_argument("--images", nargs="+", default=[], help="photos (files or folders) to compare "
                                                           "onnxruntime and cyconv on")
    p.add_argument("--image-size", type=int_range(8, 4096),
                   help="input side in pixels, for a checkpoint that does not store one")
    p.add_argument("--tolerance", type=float_range(0, 1e6), default=1e-4,
                   help="largest |output difference| allowed (default 1e-4)")
    p.add_argument("--no-check", action="store_true", help="write the file without checking it")
    return p.parse_args(argv)


def photo_files(paths):
    """The image files among ``paths``, folders expanded (sorted)."""
    files = []
    for arg in map(Path, paths):
        if arg.is_dir():
            found = sorted(p for p in arg.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                fail(f"no images in folder {arg}")
            files += found
        elif not arg.exists():
            fail(f"image {arg} does not exist")
        else:
            files.append(arg)
    return files


def inputs(model, paths):
    """(the (N, 3, H, W) model inputs of the photos (4 random ones without paths), in the
    model's dtype, and what they are)."""
    if model.image_size is None:
        fail("the checkpoint stores no image size: give --image-size")
    if paths:
        photos = photo_files(paths)
        where = f"{len(photos)} photo(s)"
    else:
        photos = np.random.default_rng(0).integers(0, 256, (4, *model.image_size, 3), np.uint8)
        where = "4 random photos"
    try:
        x, _, _ = prepare_input(model, photos)
    except (CorruptImageError, ValueError) as error:
        fail(str(error))
    return x, where


def check(model, out, x):
    """(max |difference|, top-1 agreements) of onnxruntime and cyconv on x; exits 1 when
    onnx.checker refuses the file."""
    import onnx
    import onnxruntime

    try:
        onnx.checker.check_model(str(out))
    except onnx.checker.ValidationError as error:
        fail(f"onnx.checker refuses {out}: {str(error).splitlines()[0]}", 1)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    worst, agree = 0.0, 0
    for start in range(0, len(x), BATCH):
        batch = x[start:start + BATCH]
        with cyconv.no_grad():
            expected = np.asarray(model(batch), np.float64)
        got = session.run(None, {"input": batch.astype(np.float32)})[0]
        worst = max(worst, float(np.abs(got - expected).max()))
        agree += int((got.argmax(axis=1) == expected.argmax(axis=1)).sum())
    return worst, agree


def main(argv=None):
    args = parse_args(argv)
    model = load_model(args.checkpoint)
    if args.image_size:
        model.image_size = (args.image_size, args.image_size)
    out = args.out or Path(args.checkpoint).with_suffix(".onnx")
    x, where = (None, None) if args.no_check else inputs(model, args.images)
    try:
        cyconv.onnx.export(model, out)
    except (ImportError, cyconv.onnx.ExportError, OSError) as error:
        fail(str(error))
    h, w = model.image_size or ("height", "width")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, ONNX opset {cyconv.onnx.OPSET}, "
          f"input (batch, 3, {h}, {w}))")
    if args.no_check:
        return 0
    try:
        worst, agree = check(model, out, x)
    except ImportError as error:
        fail(f"cannot check the file: {error} (pip install onnx onnxruntime, or --no-check)")
    print(f"onnx.checker: ok; onnxruntime vs cyconv on {where}: max |output difference| "
          f"{worst:.2e} (tolerance {args.tolerance:g}), same top class for {agree} of {len(x)}")
    if worst > args.tolerance:
        fail(f"onnxruntime's outputs differ from cyconv's by {worst:.2e}, more than "
             f"{args.tolerance:g}", 1)
    return 0


if __name__ == "__main__":
    run(main)
