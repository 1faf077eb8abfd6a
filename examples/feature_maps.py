"""Draw the feature maps of one conv layer of a trained model for one image.

    python examples/feature_maps.py runs/animals/best.safetensors dog.jpg --out maps.png

Writes a grid PNG with one tile per channel of the chosen layer's output
(each tile scaled to its own min..max, viridis colours: yellow = high), with
the input as the model sees it in the top-left tile.  --layer is a top-level
index into the model (default: the ReLU after the first Conv2d); --list
prints the layers and their output shapes for this image.
"""
import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cyconv.data import CorruptImageError, read_image, resize  # noqa: E402
from cyconv.feature_maps import feature_grid, features  # noqa: E402
from cyconv.gradcam import put_label  # noqa: E402
from cyconv.nn import BatchNorm2d, Conv2d, LeakyReLU, ReLU  # noqa: E402

from predict import fail, load_model  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a .safetensors file written by cyconv (best.safetensors)")
    p.add_argument("image", help="the photo")
    p.add_argument("--out", default="feature_maps.png", help="output PNG")
    p.add_argument("--layer", type=int, help="top-level layer index (default: the ReLU after "
                   "the first Conv2d)")
    p.add_argument("--max-channels", type=int, default=64, help="draw at most this many (64)")
    p.add_argument("--cell", type=int, default=96, help="tile size in pixels (default 96)")
    p.add_argument("--list", action="store_true", help="print the layers and their shapes")
    return p.parse_args(argv)


def first_conv_activation(model):
    """The ReLU after the first Conv2d (through BatchNorm2d), or that Conv2d."""
    layers = list(model)
    for i, layer in enumerate(layers):
        if isinstance(layer, Conv2d):
            j = i + 1
            while j < len(layers) and isinstance(layers[j], BatchNorm2d):
                j += 1
            return j if j < len(layers) and isinstance(layers[j], (ReLU, LeakyReLU)) else i
    fail("the model has no Conv2d layer")


def main(argv=None):
    args = parse_args(argv)
    model = load_model(args.checkpoint)
    try:
        image = read_image(args.image)
    except (CorruptImageError, OSError) as error:
        fail(f"cannot read {args.image}: {error}", 1)
    if args.list:
        for i, act in features(model, image).items():
            print(f"{i:3d}  {type(model[i]).__name__:18s} {tuple(act.shape[1:])}")
        return 0
    layer = first_conv_activation(model) if args.layer is None else args.layer
    try:
        maps = features(model, image, layers=[layer])
    except (IndexError, ValueError) as error:
        fail(str(error))
    index, act = next(iter(maps.items()))
    if act.ndim != 4:
        fail(f"layer {index} ({type(model[index]).__name__}) outputs shape "
             f"{tuple(act.shape[1:])}, not feature maps (C, H, W): choose a conv layer "
             "(or a BatchNorm2d, ReLU or pooling layer after one); --list shows them")
    channels = act.shape[1]
    shown = min(channels, args.max_channels)
    columns = int(np.ceil(np.sqrt(shown + 1)))
    # the first tile shows the photo as the model sees it (resized to its input)
    size = model.image_size or image.shape[:2]
    blank = np.zeros((1,) + act.shape[2:])
    grid = feature_grid(np.concatenate([blank, act[0, :shown]]), columns=columns,
                        cell=args.cell, pad=3)
    h, w = act.shape[2:]
    th, tw = max(1, round(h * args.cell / max(h, w))), max(1, round(w * args.cell / max(h, w)))
    grid[3:3 + th, 3:3 + tw] = cv2.resize(resize(image, size), (tw, th),
                                          interpolation=cv2.INTER_AREA)
    title = np.full((40, grid.shape[1], 3), 255, np.uint8)
    text = (f"layer {index} {type(model[index]).__name__}: {channels} channels of "
            f"{act.shape[2]}x{act.shape[3]}" + (f" (first {shown})" if shown < channels else ""))
    put_label(title, text, scale=0.6)
    picture = np.concatenate([title, grid])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR),
                       [cv2.IMWRITE_PNG_COMPRESSION, 9]):
        fail(f"cannot write {out} (use a .png name)")
    print(f"{text} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
