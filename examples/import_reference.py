"""Turn a model trained by the reference C++ project into a cyconv checkpoint.

    python examples/import_reference.py animals.model --classes dog,panda,bird --out ref.safetensors
    python examples/predict.py ref.safetensors photo.jpg

The checkpoint stores that project's preprocessing (OpenCV's BGR channel order,
cv2.resize's bilinear interpolation to 224x224, pixels / 255, no mean or std),
so cyconv.predict, the example scripts and the ONNX export reproduce its
predictions.  --classes gives the class names in the project's label order.

Exit status: 0 when written, 2 for a bad command line or a file that is not a
reference model for these classes (the message says the expected and actual
sizes), 1 when the checkpoint cannot be written.
"""
import argparse
from pathlib import Path

import cyconv
from cyconv.files import OutputError
from cyconv.models.reference_import import ReferenceFormatError, load_reference

from common import fail, int_range, run


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_file", type=Path, help="the reference project's trained .model file")
    p.add_argument("--classes", required=True,
                   help="class names in the project's label order, comma-separated "
                        "(e.g. dog,panda,bird)")
    p.add_argument("--out", type=Path, required=True, help="the checkpoint to write "
                                                           "(.safetensors)")
    p.add_argument("--image-size", type=int_range(47, 4096), default=224,
                   help="the side the project resized photos to (default 224)")
    args = p.parse_args(argv)
    args.classes = [name.strip() for name in args.classes.split(",")]
    if not all(args.classes) or len(set(args.classes)) != len(args.classes):
        p.error(f"--classes must be distinct, non-empty names separated by commas, got "
                f"{','.join(args.classes)!r}")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        model = load_reference(args.model_file, args.classes, args.image_size)
    except FileNotFoundError:
        fail(f"{args.model_file} does not exist")
    except (ReferenceFormatError, OSError) as error:
        fail(str(error))
    try:
        cyconv.save(model, args.out, metadata={"imported_from": args.model_file.name})
    except (OutputError, OSError) as error:
        fail(str(error), 1)
    print(f"wrote {args.out}: the reference network for {len(args.classes)} classes "
          f"({', '.join(args.classes)}); preprocessing: BGR, resized to {args.image_size}x"
          f"{args.image_size} (bilinear), pixels / 255")
    return 0


if __name__ == "__main__":
    run(main)
