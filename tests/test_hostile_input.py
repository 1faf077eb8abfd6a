"""Hostile and careless input to the example programs and the library: the table of
probes and their verdicts.  It only grows: a new hole found gets a row here.

Every user mistake ends with a clear message naming the bad value (exit status 2,
argparse's, or 1 for a file that cannot be read or written), never a traceback, a
crash, a hang, a silent wrong answer or lost data.
"""
import os
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

import cyconv
from cyconv import models

from conftest import call_example as call

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def png(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def bomb(path, side=30000):
    """A small PNG that decodes to side x side grey pixels."""
    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    raw = zlib.compress((b"\x00" + bytes(side)) * side, 9)
    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw)
                     + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A data folder of 3 classes (5 images each), one with a single image, a checkpoint,
    a photo, a plain file and a FIFO."""
    tmp = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cat", "dog", "owl"]):
        for i in range(5):
            image = rng.integers(0, 80, (24, 24, 3), dtype=np.uint8)
            image[..., c] += 150
            png(tmp / "data" / name / f"{i}.png", image)
    png(tmp / "lonely" / "a" / "0.png", np.zeros((8, 8, 3), np.uint8))
    for i in range(4):
        png(tmp / "lonely" / "b" / f"{i}.png", np.full((8, 8, 3), 200, np.uint8))
    png(tmp / "one_class" / "cat" / "0.png", np.zeros((8, 8, 3), np.uint8))
    cyconv.manual_seed(0)
    model = models.small(3, 16, widths=(4, 4))
    cyconv.save(model, tmp / "run" / "best.safetensors", classes=["cat", "dog", "owl"],
                image_size=(16, 16))
    png(tmp / "photo.png", rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    (tmp / "a_file.txt").write_text("not a folder")
    os.mkfifo(tmp / "pipe.png")
    bomb(tmp / "bomb.png")
    return tmp


# (name, script, arguments ({tmp} is the fixture's folder), allowed exit codes, the
# message must contain).  Verdict for all: one clear line, no traceback.
PROBES = [
    ("batch-size 0", "train_animals.py", ["--data", "{tmp}/data", "--batch-size", "0"], {2},
     "--batch-size"),
    ("batch-size -1", "train_animals.py", ["--data", "{tmp}/data", "--batch-size", "-1"], {2},
     "--batch-size"),
    ("workers -1", "train_animals.py", ["--data", "{tmp}/data", "--workers", "-1"], {2},
     "--workers"),
    ("lr nan", "train_animals.py", ["--data", "{tmp}/data", "--lr", "nan"], {2}, "--lr"),
    ("lr word", "train_animals.py", ["--data", "{tmp}/data", "--lr", "fast"], {2}, "--lr"),
    ("epochs 0", "train_animals.py", ["--data", "{tmp}/data", "--epochs", "0"], {2}, "--epochs"),
    ("image-size 1", "train_animals.py", ["--data", "{tmp}/data", "--image-size", "1"], {2},
     "--image-size"),
    ("image-size 3", "train_animals.py", ["--data", "{tmp}/data", "--image-size", "3"], {2},
     "--image-size"),
    ("image-size 100000", "train_animals.py", ["--data", "{tmp}/data", "--image-size", "100000"],
     {2}, "--image-size"),
    ("limit -1", "train_animals.py", ["--data", "{tmp}/data", "--limit", "-1"], {2}, "--limit"),
    ("limit 0", "train_animals.py", ["--data", "{tmp}/data", "--limit", "0"], {2}, "--limit"),
    ("threads 0", "train_animals.py", ["--data", "{tmp}/data", "--threads", "0"], {2},
     "--threads"),
    ("threads 100000", "train_animals.py", ["--data", "{tmp}/data", "--threads", "100000"], {2},
     "--threads"),
    ("ema 1", "train_animals.py", ["--data", "{tmp}/data", "--ema", "1"], {2}, "--ema"),
    ("augment unknown", "train_animals.py", ["--data", "{tmp}/data", "--augment", "spin=1"], {2},
     "unknown augmentation setting 'spin'"),
    ("augment out of range", "train_animals.py", ["--data", "{tmp}/data", "--augment",
                                                  "hflip=2"], {2}, "probabilities"),
    ("classes empty", "train_animals.py", ["--data", "{tmp}/data", "--classes", ",,"], {2},
     "--classes"),
    ("model unknown", "train_animals.py", ["--data", "{tmp}/data", "--model", "vgg"], {2},
     "--model"),
    ("no data", "train_animals.py", ["--out", "{tmp}/o1"], {2}, "--data DIR is required"),
    ("data missing", "train_animals.py", ["--data", "{tmp}/nowhere", "--out", "{tmp}/o2"], {2},
     "does not exist"),
    ("data is a file", "train_animals.py", ["--data", "{tmp}/a_file.txt", "--out", "{tmp}/o3"],
     {2}, "not a folder"),
    ("one class", "train_animals.py", ["--data", "{tmp}/one_class", "--out", "{tmp}/o4"], {2},
     "at least two classes"),
    ("a class of one image", "train_animals.py", ["--data", "{tmp}/lonely", "--out", "{tmp}/o5"],
     {2}, "fewer than 3 readable images: a (1)"),
    ("out is a file", "train_animals.py", ["--data", "{tmp}/data", "--out", "{tmp}/a_file.txt"],
     {1, 2}, "a_file.txt"),
    ("out on a read-only file system", "train_animals.py", ["--data", "{tmp}/data", "--out",
                                                           "/proc/cyconv-run", "--epochs", "1"],
     {1, 2}, "/proc/cyconv-run"),
    ("resume without a run", "train_animals.py", ["--data", "{tmp}/data", "--out", "{tmp}/o6",
                                                  "--resume"], {2}, "no checkpoint"),
    ("resume and overwrite", "train_animals.py", ["--data", "{tmp}/data", "--resume",
                                                  "--overwrite"], {2}, "exclude each other"),
    ("predict: no checkpoint", "predict.py", ["{tmp}/none.safetensors", "{tmp}/photo.png"], {2},
     "does not exist"),
    ("predict: checkpoint is a folder", "predict.py", ["{tmp}/run", "{tmp}/photo.png"], {2},
     "is a folder"),
    ("predict: top 0", "predict.py", ["{tmp}/run/best.safetensors", "{tmp}/photo.png", "--top",
                                      "0"], {2}, "--top"),
    ("predict: batch-size 0", "predict.py", ["{tmp}/run/best.safetensors", "{tmp}/photo.png",
                                             "--batch-size", "0"], {2}, "--batch-size"),
    ("predict: threads 0", "predict.py", ["{tmp}/run/best.safetensors", "{tmp}/photo.png",
                                          "--threads", "0"], {2}, "--threads"),
    ("predict: decompression bomb", "predict.py", ["{tmp}/run/best.safetensors",
                                                   "{tmp}/bomb.png"], {1}, "over the limit"),
    ("predict: a pipe named .png", "predict.py", ["{tmp}/run/best.safetensors",
                                                  "{tmp}/pipe.png"], {1}, "not a regular file"),
    ("grad_cam: alpha nan", "grad_cam.py", ["{tmp}/run/best.safetensors", "{tmp}/photo.png",
                                            "--out", "{tmp}/c.png", "--alpha", "nan"], {2},
     "--alpha"),
    ("grad_cam: out x.txt", "grad_cam.py", ["{tmp}/run/best.safetensors", "{tmp}/photo.png",
                                            "--out", "{tmp}/x.txt"], {2}, ".png or .jpg"),
    ("grad_cam: layer 99", "grad_cam.py", ["{tmp}/run/best.safetensors", "{tmp}/photo.png",
                                           "--out", "{tmp}/c.png", "--layer", "99"], {2},
     "out of range"),
    ("grad_cam: unknown layer name", "grad_cam.py", ["{tmp}/run/best.safetensors",
                                                     "{tmp}/photo.png", "--out", "{tmp}/c.png",
                                                     "--layer", "layer9.conv"], {2},
     "no sub-module 'layer9.conv'"),
    ("grad_cam: unknown class", "grad_cam.py", ["{tmp}/run/best.safetensors", "{tmp}/photo.png",
                                                "--out", "{tmp}/c.png", "--class", "emu"], {2},
     "unknown class 'emu'"),
    ("grad_cam: min-size over max-size", "grad_cam.py", ["{tmp}/run/best.safetensors",
                                                         "{tmp}/photo.png", "--out",
                                                         "{tmp}/c.png", "--min-size", "900",
                                                         "--max-size", "500"], {2},
     "larger than --max-size"),
    ("feature_maps: max-channels -1", "feature_maps.py", ["{tmp}/run/best.safetensors",
                                                          "{tmp}/photo.png", "--max-channels",
                                                          "-1"], {2}, "--max-channels"),
    ("feature_maps: cell 0", "feature_maps.py", ["{tmp}/run/best.safetensors", "{tmp}/photo.png",
                                                 "--cell", "0"], {2}, "--cell"),
    ("feature_maps: no image", "feature_maps.py", ["{tmp}/run/best.safetensors"], {2},
     "the image is required"),
    ("evaluate: blur nan", "evaluate.py", ["{tmp}/run/best.safetensors", "--data", "{tmp}/data",
                                           "--blur", "nan"], {2}, "--blur"),
    ("evaluate: split missing", "evaluate.py", ["{tmp}/run/best.safetensors", "--data",
                                                "{tmp}/data", "--split", "{tmp}/none.json"], {2},
     "does not exist"),
    ("export_onnx: no checkpoint", "export_onnx.py", ["{tmp}/none.safetensors"], {2},
     "does not exist"),
    ("export_onnx: tolerance nan", "export_onnx.py", ["{tmp}/run/best.safetensors",
                                                      "--tolerance", "nan"], {2}, "--tolerance"),
    ("import_reference: wrong size", "import_reference.py", ["{tmp}/a_file.txt", "--classes",
                                                             "a,b", "--out", "{tmp}/r.st"], {2},
     "expected"),
]


@pytest.mark.parametrize("name,script,args,codes,message", PROBES, ids=[p[0] for p in PROBES])
def test_probe_ends_in_one_clear_line(world, capsys, name, script, args, codes, message):
    code, _, err = call(capsys, script, *[a.format(tmp=world) for a in args])
    assert code in codes, (code, err)
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") or ": error: " in last, err
    assert message in err, err


def test_a_pipe_named_jpg_never_blocks_a_program(world):
    """Run as a real process with a timeout: a blocking read would hang it."""
    result = subprocess.run([sys.executable, str(EXAMPLES / "grad_cam.py"),
                             str(world / "run" / "best.safetensors"), str(world / "pipe.png"),
                             "--out", str(world / "c.png")], capture_output=True, text=True,
                            timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 1 and "not a regular file" in result.stderr


def test_a_huge_photo_is_drawn_at_a_bounded_size(world, capsys):
    big = world / "big.png"
    png(big, np.random.default_rng(1).integers(0, 256, (3000, 2400, 3), dtype=np.uint8))
    code, _, err = call(capsys, "grad_cam.py", world / "run" / "best.safetensors", big,
                        "--out", world / "big_cam.png")
    assert code == 0, err
    assert max(cv2.imread(str(world / "big_cam.png")).shape[:2]) == 1024


def test_any_run_output_blocks_a_new_run(world, capsys):
    """Deleting last.safetensors to save space must not let a new run replace the rest."""
    out = world / "kept"
    out.mkdir()
    (out / "best.safetensors").write_bytes(b"the model I trained")
    (out / "split.json").write_text("{}")
    code, _, err = call(capsys, "train_animals.py", "--data", world / "data", "--out", out)
    assert code == 2 and "already holds a run" in err and "--overwrite" in err
    assert (out / "best.safetensors").read_bytes() == b"the model I trained"


def test_feature_maps_list_needs_no_image(world, capsys):
    code, out, err = call(capsys, "feature_maps.py", world / "run" / "best.safetensors",
                          "--list")
    assert code == 0, err
    assert "Conv2d" in out and "(4, 8, 8)" in out


def test_evaluate_writes_next_to_the_checkpoint_and_says_so(world, capsys):
    code, out, err = call(capsys, "evaluate.py", world / "run" / "best.safetensors", "--data",
                          world / "data", "--all", "--workers", "0")
    assert code == 0, err
    written = world / "run" / "evaluation_all.png"
    assert written.is_file() and f"wrote {written}" in out
