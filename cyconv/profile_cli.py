"""``python -m cyconv.profile_cli``: the layer profile of a named network or a checkpoint."""
import argparse
import sys
from pathlib import Path

from cyconv import load, models
from cyconv._threads import max_num_threads

# torchvision's networks are built for ImageNet: 1000 classes at 224 px.
IMAGENET_NETWORKS = ("resnet18", "resnet34", "mobilenet_v2")
SMALL_IMAGE_NETWORKS = ("small", "resnet")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


def _int_in(low, high=None):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"expected an int {bound}, got {text!r}")
        return value
    return parse


def parser():
    p = _Parser(prog="python -m cyconv.profile_cli",
                description="Time every layer of a model, forward and backward: "
                            "milliseconds, GFLOP/s and the share of the GEMM peak.")
    p.add_argument("--model", default="small",
                   help=f"a named network ({', '.join(sorted(models.ARCHITECTURES))}) or a "
                        "cyconv checkpoint file (default: small)")
    p.add_argument("--batch", type=_int_in(1), default=32, help="images per step (default 32)")
    p.add_argument("--image-size", type=_int_in(1), default=None,
                   help="image side in pixels (default: the checkpoint's, else 128 for small "
                        "and resnet, 224 for the others)")
    p.add_argument("--classes", type=_int_in(1), default=None,
                   help="outputs of a named network (default 1000 for resnet18/34 and "
                        "mobilenet_v2, else 3)")
    p.add_argument("--threads", type=_int_in(1, max_num_threads()), default=None,
                   help="cyconv's threads (default: its current count)")
    p.add_argument("--steps", type=_int_in(1), default=5, help="timed steps (default 5)")
    p.add_argument("--warmup", type=_int_in(0), default=1, help="warm-up steps (default 1)")
    p.add_argument("--inference", action="store_true",
                   help="profile the forward pass in eval mode instead of a training step")
    return p


def build_model(args, p):
    """(the model, its input's (H, W)) from --model, --classes and --image-size."""
    if args.model in models.ARCHITECTURES:
        classes = args.classes or (1000 if args.model in IMAGENET_NETWORKS else 3)
        size = args.image_size or (128 if args.model in SMALL_IMAGE_NETWORKS else 224)
        return models.create(args.model, classes, size), (size, size)
    if not Path(args.model).is_file():
        p.error(f"--model: expected one of {sorted(models.ARCHITECTURES)} or a checkpoint "
                f"file, got {args.model!r} (no such file)")
    if args.classes is not None:
        p.error("--classes applies to named networks; a checkpoint has its own")
    model = load(args.model)
    if args.image_size:
        return model, (args.image_size, args.image_size)
    if model.image_size is None:
        p.error(f"--image-size: the checkpoint {args.model} records no image size; give one")
    return model, tuple(model.image_size)


def main(argv=None):
    from cyconv.profiling import profile

    p = parser()
    args = p.parse_args(argv)
    try:
        model, (height, width) = build_model(args, p)
        profile(model, (args.batch, 3, height, width), steps=args.steps, warmup=args.warmup,
                threads=args.threads, backward=not args.inference)
    except (ValueError, TypeError, KeyError, OSError) as error:
        print(f"{p.prog}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
