"""Draw the feature maps of one layer of a trained model for one image.

    python examples/feature_maps.py runs/animals/best.safetensors \\
        ../shared/datasets/images/panda.jpg --layer 9 --out maps.png
    python examples/feature_maps.py runs/animals/best.safetensors --list

Writes a grid PNG with one tile per channel of the chosen layer's output (each
tile scaled to its own min..max, viridis colours: yellow = high), with the
input as the model sees it in the top-left tile.  --layer is a dotted name
(layer1.0.conv1) or a top-level index (default: the activation after the first
Conv2d); --list prints every layer and its output shape (no image needed).
"""
import argparse
from pathlib import Path

import cv2
import numpy as np

from cyconv.data import read_image
from cyconv.explain import feature_grid, features, put_label
from cyconv.explain.feature_maps import output_shapes
from cyconv.inference import model_view
from cyconv.nn import BatchNorm2d, Conv2d, LeakyReLU, ReLU, ReLU6

from common import fail, int_range, layer_name, load_model, png_path, run, write_picture


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a .safetensors file written by cyconv (best.safetensors)")
    p.add_argument("image", nargs="?", help="the photo (not needed with --list)")
    p.add_argument("--out", type=png_path, default=Path("feature_maps.png"),
                   help="output .png (default feature_maps.png)")
    p.add_argument("--layer", type=layer_name, help="layer name or top-level index (default: "
                   "the activation after the first Conv2d)")
    p.add_argument("--max-channels", type=int_range(1, 4096), default=64,
                   help="draw at most this many channels (default 64)")
    p.add_argument("--cell", type=int_range(8, 512), default=96,
                   help="tile size in pixels, 8 to 512 (default 96)")
    p.add_argument("--list", action="store_true", help="print the layers and their shapes")
    args = p.parse_args(argv)
    if not args.list and args.image is None:
        p.error("the image is required (unless --list)")
    return args


def first_conv_activation(order):
    """The name of the activation after the first Conv2d (through BatchNorm2d), or of that
    Conv2d, in execution order."""
    for i, (name, module, _) in enumerate(order):
        if isinstance(module, Conv2d):
            j = i + 1
            while j < len(order) and isinstance(order[j][1], BatchNorm2d):
                j += 1
            activation = j < len(order) and isinstance(order[j][1], (ReLU, ReLU6, LeakyReLU))
            return order[j][0] if activation else name
    fail("the model has no Conv2d layer")


def main(argv=None):
    args = parse_args(argv)
    model = load_model(args.checkpoint, require_image_size=True)
    order = output_shapes(model, (1, 3) + tuple(model.image_size))
    if args.list:
        for name, module, shape in order:
            print(f"{name:28s} {type(module).__name__:18s} {tuple(shape[1:])}")
        return 0
    image = read_image(args.image)
    layer = first_conv_activation(order) if args.layer is None else args.layer
    try:
        name, act = next(iter(features(model, image, layers=[layer]).items()))
    except (IndexError, ValueError, TypeError) as error:
        fail(str(error))
    if act.ndim != 4:
        fail(f"layer {name} outputs shape {tuple(act.shape[1:])}, not feature maps (C, H, W): "
             "choose a conv layer (or a BatchNorm2d, activation or pooling layer after one); "
             "--list shows them")
    channels = act.shape[1]
    shown = min(channels, args.max_channels)
    columns = int(np.ceil(np.sqrt(shown + 1)))
    # the first tile shows the photo as the model sees it (its input before normalising)
    blank = np.zeros((1,) + act.shape[2:])
    grid = feature_grid(np.concatenate([blank, act[0, :shown]]), columns=columns,
                        cell=args.cell, pad=3)
    h, w = act.shape[2:]
    th, tw = max(1, round(h * args.cell / max(h, w))), max(1, round(w * args.cell / max(h, w)))
    grid[3:3 + th, 3:3 + tw] = cv2.resize(model_view(model, image), (tw, th),
                                          interpolation=cv2.INTER_AREA)
    title = np.full((40, grid.shape[1], 3), 255, np.uint8)
    text = (f"layer {name}: {channels} channels of {act.shape[2]}x{act.shape[3]}"
            + (f" (first {shown})" if shown < channels else ""))
    put_label(title, text, scale=0.6)
    write_picture(args.out, np.concatenate([title, grid]))
    print(f"{text} -> {args.out}")
    return 0


if __name__ == "__main__":
    run(main)
