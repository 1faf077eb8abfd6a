"""Grad-CAM: draw where a trained model looks when it names the class of a photo.

    python examples/grad_cam.py runs/animals/best.safetensors dog.jpg --out gradcam_dog.png

Writes the photo with the Grad-CAM heat map (Selvaraju et al., 2017) blended
over it (jet colours: red = the regions that raise the class score most) and
the predicted class and its probability written on it.  By default the map
explains the predicted class at the rectified output of the last conv layer;
--class and --layer choose others.  --side-by-side puts the plain photo on
the left.  Small photos are enlarged to --min-size pixels (longer side) so that
the text stays readable.  Several images: --out names a folder, and each
picture is written there as gradcam_<image name>.png.
"""
import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cyconv.data import CorruptImageError, read_image  # noqa: E402
from cyconv.gradcam import default_layer, gradcam, overlay, put_label  # noqa: E402

from predict import fail, load_model  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a .safetensors file written by cyconv (best.safetensors)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="photo(s) to explain")
    p.add_argument("--out", required=True,
                   help="output PNG (one image) or folder (several images)")
    p.add_argument("--layer", type=int, help="top-level layer index (default: the ReLU after "
                   "the last Conv2d)")
    p.add_argument("--class", dest="class_name",
                   help="class name or index to explain (default: the predicted one)")
    p.add_argument("--alpha", type=float, default=0.45, help="heat map opacity (default 0.45)")
    p.add_argument("--min-size", type=int, default=448,
                   help="enlarge smaller photos to this longer side (default 448; 0: never)")
    p.add_argument("--side-by-side", action="store_true", help="the photo, then the overlay")
    p.add_argument("--caption", help="text for the bottom of the picture; 'auto': the model "
                   "(architecture, input size, epoch, valid accuracy) from the checkpoint")
    p.add_argument("--threads", type=int, help="kernel threads (default: every core)")
    return p.parse_args(argv)


def model_caption(model, path):
    """'cyconv small, 96x96 input, epoch 30, valid accuracy 0.953 (best.safetensors)'."""
    meta = model.metadata
    config = meta.get("config")
    name = config.get("model") if isinstance(config, dict) else None
    parts = [f"cyconv {name}" if name else f"cyconv, {len(model)} layers"]
    if model.image_size:
        parts.append(f"{model.image_size[0]}x{model.image_size[1]} input")
    if meta.get("epoch") is not None:
        parts.append(f"epoch {meta['epoch']}")
    metrics = meta.get("metrics")
    if isinstance(metrics, dict) and metrics.get("accuracy") is not None:
        parts.append(f"valid accuracy {metrics['accuracy']:.3f}")
    return ", ".join(parts) + f" ({Path(path).name})"


def picture(model, image, layer, class_index, alpha, min_size, side_by_side, caption=None):
    """The Grad-CAM picture of one RGB photo and the GradCAMResult."""
    result = gradcam(model, image, layer=layer, class_index=class_index, details=True)
    h, w = image.shape[:2]
    scale = min_size / max(h, w) if min_size and max(h, w) < min_size else 1.0
    heat = result.heatmap
    if scale != 1.0:
        size = (round(w * scale), round(h * scale))
        image = cv2.resize(image, size, interpolation=cv2.INTER_CUBIC)
        heat = cv2.resize(heat, size, interpolation=cv2.INTER_LINEAR)
    c = int(result.class_index[0])
    name = result.class_names[0] if result.class_names else f"class {c}"
    predicted = int(np.argmax(result.probabilities[0]))
    text = f"{name} {100 * result.probability[0]:.1f}%"
    if c != predicted:   # an explicitly chosen class that is not the prediction
        other = model.classes[predicted] if model.classes else f"class {predicted}"
        text += f" (predicted {other})"
    out = overlay(image, heat, alpha=alpha, text=text)
    if side_by_side:
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
    layer = default_layer(model) if args.layer is None else args.layer
    caption = model_caption(model, args.checkpoint) if args.caption == "auto" else args.caption
    out = Path(args.out)
    several = len(args.images) > 1
    if several:
        out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in map(Path, args.images):
        try:
            image = read_image(path)
        except (CorruptImageError, OSError) as error:
            print(f"error: cannot read {path}: {error}", file=sys.stderr)
            failed += 1
            continue
        try:
            pic, result = picture(model, image, layer, class_index, args.alpha, args.min_size,
                                  args.side_by_side, caption)
        except (ValueError, IndexError) as error:
            fail(str(error))
        target = out / f"gradcam_{path.stem}.png" if several else out
        target.parent.mkdir(parents=True, exist_ok=True)
        if not cv2.imwrite(str(target), cv2.cvtColor(pic, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_PNG_COMPRESSION, 9]):
            fail(f"cannot write {target} (use a .png or .jpg name)")
        name = result.class_names[0] if result.class_names else int(result.class_index[0])
        print(f"{path}: {name} {100 * result.probability[0]:.1f}% (Grad-CAM at layer "
              f"{result.layer}, {type(model[result.layer]).__name__}) -> {target}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
