"""The training recipes of examples/train_animals.py, one per --model, and the parsing of
the recipe options that are not plain numbers.

Every setting of a recipe was chosen on the valid split; docs/results.rst has the
runs that led to them and the test accuracy over split seeds 0, 1 and 2.
"""
import argparse
import inspect

from cyconv.data import Augment

# What identifies a run (saved in its checkpoints; --resume refuses other values).
RUN_SETTINGS = ("classes", "model", "augment", "epochs", "batch_size", "lr", "image_size",
                "weight_decay", "momentum", "warmup", "schedule", "step_size", "label_smoothing",
                "ema", "eval_flip", "center_crop", "progressive", "seed", "limit")

_COMMON = dict(batch_size=32, weight_decay=5e-4, momentum=0.9, warmup=1.0, schedule="cosine",
               step_size=10, label_smoothing=0.1, ema=0.998, eval_flip=False, center_crop=1.0,
               progressive=None, seed=0)

RECIPES = {
    # the default: four Conv + BN + ReLU + MaxPool stages on 128 px photos; the moving
    # average of the weights makes the choice of the best epoch by valid accuracy dependable
    "small": dict(_COMMON, epochs=70, lr=0.05, image_size=128,
                  augment=dict(hflip=0.5, crop=0.5, crop_scale=[0.75, 1.0], rotate=0.3,
                               max_angle=15.0, color=0.5)),
    # a ResNet of BasicBlocks sized for 128 px photos (cyconv.models.resnet_small: no
    # max-pool after the stem, so its stages work at the small network's 64-8 px); valid
    # and test on each photo and its mirror image, both cut to their middle 0.8 (training
    # crops keep 0.6-1.0 of the side, so the animals it learnt are larger than in a whole
    # photo); training images of 96 px for the first half of the epochs, growing to 128
    # px by 0.8 of them (progressive resizing: the same valid accuracy, to noise, for
    # about a quarter less step compute)
    "resnet": dict(_COMMON, epochs=75, lr=0.1, image_size=128, eval_flip=True, center_crop=0.8,
                   progressive=[96, 0.5, 0.8],
                   augment=dict(hflip=0.5, crop=0.7, crop_scale=[0.6, 1.0], rotate=0.3,
                                max_angle=15.0, color=0.5)),
    # the reference project's network: no normalisation or dropout, it overfits: every image
    # gets a random resized crop of 0.7-1.0 of the side (as the reference did), half of
    # them a random erasing
    "reference": dict(_COMMON, epochs=140, lr=0.02, image_size=224,
                      augment=dict(hflip=0.5, crop=1.0, crop_scale=[0.7, 1.0], rotate=0.5,
                                   max_angle=15.0, color=0.5, erase=0.5)),
}


def augment_settings(text):
    """'defocus=0.3,crop_scale=0.6:1.0' -> {'defocus': 0.3, 'crop_scale': [0.6, 1.0]},
    each value checked by Augment itself."""
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
            expected = "low:high" if is_range else "a number"
            raise argparse.ArgumentTypeError(f"{key}: expected {expected}, got {value!r}") from None
        settings[key] = numbers if is_range else numbers[0]
    try:
        Augment(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
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


def progressive_setting(text):
    """'96:0.5:0.8' -> [96, 0.5, 0.8] for --progressive (training images of 96 px until
    half of the epochs, growing to --image-size by 0.8 of them); 'off' -> False (given,
    unlike a setting left out: it overrides a recipe's)."""
    if text == "off":
        return False
    try:
        start, begin, end = text.split(":")
        setting = [int(start), float(begin), float(end)]
    except ValueError:
        setting = None
    if setting is None or not (setting[0] >= 16 and 0 <= setting[1] <= setting[2] <= 1):
        raise argparse.ArgumentTypeError(
            f"expected START:BEGIN:END (a side of at least 16 px, then two fractions of the "
            f"epochs with 0 <= BEGIN <= END <= 1) or off, got {text!r}")
    return setting
