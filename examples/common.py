"""What the example programs share: checked argument types, loading a model, and ending
with one clear line (never a traceback) when the user asked for something impossible.

Every argument is checked by argparse as it is read (exit status 2 with
"error: argument --x: ..."); a problem found later (a file that cannot be read or
written, a checkpoint that does not fit) ends the program with "error: ..." and
exit status 1 or 2.
"""
import argparse
import math
import sys
from pathlib import Path

import cyconv
from cyconv.checkpoint import CheckpointError
from cyconv.data import CorruptImageError
from cyconv.files import OutputError
from cyconv.models import ArchitectureError

# Errors that are the user's (or the data's), not the program's: one line each.
USER_ERRORS = (CheckpointError, CorruptImageError, OutputError, ArchitectureError,
               FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class Failure(Exception):
    """Ends an example with ``error: <message>`` and ``code``."""

    def __init__(self, message, code=2):
        super().__init__(message)
        self.code = code


def fail(message, code=2):
    raise Failure(message, code)


def run(main):
    """sys.exit(main()), turning a Failure, a user error or Ctrl-C into one line on stderr."""
    try:
        code = main()
    except Failure as error:
        print(f"error: {error}", file=sys.stderr)
        code = error.code
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


# -- argument types (argparse calls them; their errors become "argument --x: ...") ----------

def int_range(low, high=None):
    """An argparse type: an int in [low, high] (no upper bound when high is None)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            allowed = f"from {low} to {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"expected a whole number {allowed}, got {text!r}")
        return value
    return parse


def float_range(low, high, low_open=False, high_open=False):
    """An argparse type: a finite float in the interval given (open at the ends asked)."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        inside = (value > low if low_open else value >= low) and \
                 (value < high if high_open else value <= high)
        if not (math.isfinite(value) and inside):
            interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {text!r}")
        return value
    return parse


def threads(text):
    """--threads: 1 to 4 per core."""
    return int_range(1, cyconv.max_num_threads())(text)


def png_path(text):
    """An output picture: a .png or .jpg name."""
    if Path(text).suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise argparse.ArgumentTypeError(f"expected a .png or .jpg file name, got {text!r}")
    return Path(text)


def layer_name(text):
    """--layer: a dotted name (layer4.1.conv2) or a top-level index (9, -1)."""
    return int(text) if text.lstrip("-").isdigit() else text


# -- loading ----------------------------------------------------------------------------------

def load_model(path, threads=None, require_image_size=False):
    """cyconv.load(path) (kernels on ``threads`` threads when given), or a Failure naming the
    problem; require_image_size: the checkpoint must say what size its images were."""
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


def write_picture(path, rgb, compression=3):
    """Write an RGB picture (PNG with a moderate compression level, or JPEG) atomically."""
    import cv2

    from cyconv.files import atomic_write

    extension = Path(path).suffix.lower()
    flags = [cv2.IMWRITE_PNG_COMPRESSION, compression] if extension == ".png" else []
    ok, encoded = cv2.imencode(extension, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), flags)
    if not ok:
        fail(f"cannot encode {path} (use a .png or .jpg name)")
    atomic_write(path, encoded.tobytes())
