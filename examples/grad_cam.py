"""Grad-CAM: draw where a trained model looks when it names the class of a photo.

    python examples/grad_cam.py runs/animals/best.safetensors ../shared/datasets/images/dog.jpg \\
        --out gradcam_dog.png

Writes the photo with the Grad-CAM heat map (Selvaraju et al., 2017) blended
over it (jet colours: red = the regions that raise the class score most) and
the predicted class and its probability written on it.  By default the map
explains the predicted class at the rectified output of the last conv layer;
--class and --layer (a dotted name such as layer4.1.conv2, or a top-level
index) choose others.  --side-by-side puts the plain photo on the left.
Pictures are drawn with their longer side between --min-size and --max-size
pixels.  Several images: --out names a folder, and each picture is written
there as gradcam_<image name>.png.
"""
import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from cyconv.data import CorruptImageError, read_image
from cyconv.explain import gradcam, overlay, put_label

from common import (
    fail,
    float_range,
    int_range,
    layer_name,
    load_model,
    png_path,
    run,
    threads,
    write_picture,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a .safetensors file written by cyconv (best.safetensors)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="photo(s) to explain")
    p.add_argument("--out", required=True,
                   help="output .png/.jpg (one image) or folder (several images)")
    p.add_argument("--layer", type=layer_name, help="layer name (e.g. layer4.1.conv2) or "
                   "top-level index (default: the activation after the last Conv2d)")
    p.add_argument("--class", dest="class_name",
                   help="class name or index to explain (default: the predicted one)")
    p.add_argument("--alpha", type=float_range(0, 1), default=0.45,
                   help="heat map opacity, 0 to 1 (default 0.45)")
    p.add_argument("--min-size", type=int_range(0, 4096), default=448,
                   help="enlarge smaller photos to this longer side (default 448; 0: never)")
    p.add_argument("--max-size", type=int_range(64, 16384), default=1024,
                   help="shrink larger photos to this longer side (default 1024)")
    p.add_argument("--side-by-side", action="store_true", help="the photo, then the overlay")
    p.add_argument("--caption", help="text for the bottom of the picture; 'auto': the model "
                   "(architecture, input size, epoch, valid accuracy) from the checkpoint")
    p.add_argument("--threads", type=threads, help="kernel threads (default: every core)")
    args = p.parse_args(argv)
    if args.min_size > args.max_size:
        p.error(f"--min-size {args.min_size} is larger than --max-size {args.max_size}")
    if len(args.images) == 1:
        try:
            args.out = png_path(args.out)
        except argparse.ArgumentTypeError as error:
            p.error(f"argument --out: {error}")
    return args


def model_caption(model, path):
    """'cyconv small, 96x96 input, epoch 30, valid accuracy 0.953 (best.safetensors)'."""
    meta = model.metadata
    config = meta.get("config")
    name = config.get("model") if isinstance(config, dict) else None
    parts = [f"cyconv {name}" if isinstance(name, str) else f"cyconv {type(model).__name__}"]
    if model.image_size:
        parts.append(f"{model.image_size[0]}x{model.image_size[1]} input")
    if isinstance(meta.get("epoch"), int):
        parts.append(f"epoch {meta['epoch']}")
    metrics = meta.get("metrics")
    if isinstance(metrics, dict) and isinstance(metrics.get("accuracy"), float):
        parts.append(f"valid accuracy {metrics['accuracy']:.3f}")
    return ", ".join(parts) + f" ({Path(path).name})"


def drawn(image, min_size, max_size):
    """The photo with its longer side brought within [min_size, max_size]."""
    h, w = image.shape[:2]
    longer = max(h, w)
    scale = min_size / longer if min_size and longer < min_size else min(1.0, max_size / longer)
    if scale == 1.0:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)


def picture(model, image, args, class_index, caption=None):
    """The Grad-CAM picture of one RGB photo and the GradCAMResult (the model sees the
    photo itself; the map is drawn at the picture's size)."""
    shown = drawn(image, args.min_size, args.max_size)
    result = gradcam(model, image, layer=args.layer, class_index=class_index,
                     size=shown.shape[:2], details=True)
    image, heat = shown, result.heatmap
    c = int(result.class_index[0])
    name = result.class_names[0] if result.class_names else f"class {c}"
    predicted = int(np.argmax(result.probabilities[0]))
    text = f"{name} {100 * result.probability[0]:.1f}%"
    if c != predicted:   # an explicitly chosen class that is not the prediction
        other = model.classes[predicted] if model.classes else f"class {predicted}"
        text += f" (predicted {other})"
    out = overlay(image, heat, alpha=args.alpha, text=text)
    if args.side_by_side:
        gap = np.full((out.shape[0], max(4, out.shape[1] // 80), 3), 255, np.uint8)
        out = np.concatenate([image, gap, out], axis=1)
    if caption:   # a strip under the picture
        scale = max(0.4, min(0.7, out.shape[1] / 1100))
        strip = np.full((round(34 * scale) + 8, out.shape[1], 3), 70, np.uint8)
        put_label(strip, caption, scale=scale)
        out = np.concatenate([out, strip])
    return out, result


def main(argv=None):
    args = parse_args(argv)
    model = load_model(args.checkpoint, args.threads, require_image_size=True)
    class_index = args.class_name
    if class_index is not None and class_index.lstrip("-").isdigit():
        class_index = int(class_index)
    caption = model_caption(model, args.checkpoint) if args.caption == "auto" else args.caption
    out = Path(args.out)
    several = len(args.images) > 1
    if several and out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; with several images --out names a folder")
    failed = 0
    for path in map(Path, args.images):
        try:
            image = read_image(path)
        except CorruptImageError as error:
            print(f"error: {error}", file=sys.stderr)
            failed += 1
            continue
        try:
            pic, result = picture(model, image, args, class_index, caption)
        except (ValueError, IndexError, TypeError) as error:
            fail(str(error))
        target = out / f"gradcam_{path.stem}.png" if several else out
        write_picture(target, pic)
        name = result.class_names[0] if result.class_names else int(result.class_index[0])
        print(f"{path}: {name} {100 * result.probability[0]:.1f}% (Grad-CAM at layer "
              f"{result.layer}) -> {target}")
    return 1 if failed else 0


if __name__ == "__main__":
    run(main)
