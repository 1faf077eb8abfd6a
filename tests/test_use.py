"""Using a saved model: examples/predict.py, grad_cam.py, feature_maps.py and evaluate.py
run as programs on a tiny checkpoint."""
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import cyconv
from cyconv import checkpoint, models
from cyconv.data import ImageFolder, read_image, save_split
from cyconv.explain import overlay

from conftest import call_example as call

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
CLASSES = ["cat", "dog", "owl"]
SIZE = 24


def run(script, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=120)


def write_png(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny checkpoint with metadata, its run's split.json, a data folder and loose photos."""
    tmp = tmp_path_factory.mktemp("use")
    rng = np.random.default_rng(0)
    data = tmp / "data"
    for c, name in enumerate(CLASSES):
        for i in range(5):
            image = rng.integers(0, 80, (30 + i, 36, 3), dtype=np.uint8)
            image[..., c] += 150                        # each class has its own colour
            write_png(data / name / f"{name}_{i}.png", image)
    cyconv.manual_seed(0)
    model = models.small(3, SIZE, widths=(4, 4, 8, 8))
    run_dir = tmp / "run"
    run_dir.mkdir()
    ckpt = run_dir / "best.safetensors"
    checkpoint.save(model, ckpt, classes=CLASSES, mean=[0.3, 0.3, 0.3], std=[0.3, 0.3, 0.3],
                    image_size=(SIZE, SIZE))
    folder = ImageFolder(data, CLASSES, SIZE)
    idx = np.arange(len(folder.samples))
    save_split(run_dir / "split.json", folder, idx[idx % 5 >= 2], idx[idx % 5 == 1],
               idx[idx % 5 == 0])
    photos = tmp / "photos"
    write_png(photos / "a.png", rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    write_png(photos / "b.jpg", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (photos / "notes.txt").write_text("not an image")
    return dict(tmp=tmp, ckpt=ckpt, data=data, photos=photos, model=cyconv.load(ckpt))


def test_predict(setup, capsys):
    photos, ckpt = setup["photos"], setup["ckpt"]
    single = setup["data"] / "dog" / "dog_0.png"
    r = run("predict.py", ckpt, single, photos, photos / "missing.png", "--top", "2",
            "--batch-size", "2")
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(single), str(photos / "a.png"),
                                                       str(photos / "b.jpg")]
    assert "broken.jpg" in r.stderr and "missing.png" in r.stderr and "notes.txt" not in r.stderr
    # the printed probabilities are the model's softmax, with the stored normalisation
    logits = cyconv.predict(setup["model"], [read_image(single)])[0]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    best = np.argsort(-p)[:2]
    assert lines[0] == f"{single}: " + ", ".join(f"{CLASSES[i]} {100 * p[i]:.1f}%" for i in best)
    code, out, err = call(capsys, "predict.py", ckpt, photos / "a.png")
    assert code == 0 and out.count("%") == 3 and not err
    logits = cyconv.predict(setup["model"], [read_image(photos / "a.png")], flip=True)[0]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    code, out, err = call(capsys, "predict.py", ckpt, photos / "a.png", "--flip", "--top", "1")
    assert code == 0 and out.strip().endswith(f"{CLASSES[p.argmax()]} {100 * p.max():.1f}%")


def test_missing_or_broken_checkpoint(setup, capsys):
    r = run("predict.py", setup["tmp"] / "nope.safetensors", setup["photos"] / "a.png")
    assert r.returncode == 2 and "nope.safetensors does not exist" in r.stderr
    assert "Traceback" not in r.stderr
    broken = setup["tmp"] / "broken.safetensors"
    broken.write_bytes(setup["ckpt"].read_bytes()[:100])
    code, _, err = call(capsys, "grad_cam.py", broken, setup["photos"] / "a.png",
                        "--out", setup["tmp"] / "x.png")
    assert code == 2 and "cannot load checkpoint" in err and "truncated" in err


def test_grad_cam(setup, capsys):
    out = setup["tmp"] / "cams" / "cam.png"
    photo = setup["photos"] / "a.png"
    r = run("grad_cam.py", setup["ckpt"], photo, "--out", out, "--min-size", "0")
    assert r.returncode == 0, r.stderr
    picture = read_image(out)
    assert picture.shape == (40, 50, 3)
    assert any(f"{name} " in r.stdout for name in CLASSES) and "%" in r.stdout
    # the written picture is the overlay of cyconv.gradcam's map (plus the label at the top)
    heat = cyconv.gradcam(setup["model"], read_image(photo))
    expected = overlay(read_image(photo), heat, alpha=0.45)
    assert np.abs(picture[30:].astype(int) - expected[30:]).max() <= 1
    code, stdout, _ = call(capsys, "grad_cam.py", setup["ckpt"], photo, "--out", out,
                           "--class", "owl", "--side-by-side", "--min-size", "100",
                           "--caption", "auto")
    assert code == 0 and "owl" in stdout
    h, w, _ = read_image(out).shape
    assert w == 100 + 4 + 100 and 80 < h < 120     # enlarged x2, photo | overlay, caption strip
    code, _, err = call(capsys, "grad_cam.py", setup["ckpt"], photo, "--out", out,
                        "--layer", "17")
    assert code == 2 and "layer 17 (Flatten) outputs shape" in err and "not (N, C, H, W)" in err


def test_feature_maps(setup):
    out = setup["tmp"] / "maps.png"
    r = run("feature_maps.py", setup["ckpt"], setup["photos"] / "a.png", "--out", out,
            "--layer", "4", "--cell", "32")
    assert r.returncode == 0, r.stderr
    assert "layer 4: 4 channels of 12x12" in r.stdout
    picture = read_image(out)
    assert picture.shape[0] > 2 * 32 and picture.shape[1] >= 3 * 32


def test_evaluate(setup, capsys):
    out = setup["tmp"] / "cm" / "confusion_matrix.png"
    r = run("evaluate.py", setup["ckpt"], "--data", setup["data"], "--out", out,
            "--workers", "0")
    assert r.returncode == 0, r.stderr
    assert "test part" in r.stdout and "3 images" in r.stdout
    folder = ImageFolder(setup["data"], CLASSES, SIZE)
    test = [i for i in range(len(folder)) if i % 5 == 0]
    logits = cyconv.predict(setup["model"], np.stack([folder[i][0] for i in test]))
    accuracy = np.mean(logits.argmax(1) == [folder[i][1] for i in test])
    assert f"accuracy: {accuracy:.4f}" in r.stdout
    for name in CLASSES + ["precision", "recall", "true \\ predicted"]:
        assert name in r.stdout
    assert read_image(out).ndim == 3
    flipped = cyconv.predict(setup["model"], np.stack([folder[i][0] for i in test]), flip=True)
    r = run("evaluate.py", setup["ckpt"], "--data", setup["data"], "--out", out, "--flip")
    assert r.returncode == 0 and "mirror image" in r.stdout, r.stderr
    accuracy = np.mean(flipped.argmax(1) == [folder[i][1] for i in test])
    assert f"accuracy: {accuracy:.4f}" in r.stdout
    code, stdout, _ = call(capsys, "evaluate.py", setup["ckpt"], "--data", setup["data"],
                           "--all", "--out", out, "--workers", "0")
    assert code == 0 and "15 images" in stdout
    code, _, err = call(capsys, "evaluate.py", setup["ckpt"], "--data", setup["tmp"] / "nowhere")
    assert code == 2 and "does not exist" in err


def test_evaluate_gives_the_model_the_middle_of_each_photo(setup, capsys):
    """A checkpoint with center_crop is evaluated on the middles of the photos, as
    cyconv.predict sees them."""
    ckpt = setup["tmp"] / "cropped" / "best.safetensors"
    ckpt.parent.mkdir()
    checkpoint.save(setup["model"], ckpt, center_crop=0.5)
    model = cyconv.load(ckpt)
    folder = ImageFolder(setup["data"], CLASSES)
    photos = [read_image(path) for path, _ in folder.samples]
    labels = [label for _, label in folder.samples]
    accuracy = np.mean(cyconv.predict(model, photos).argmax(1) == labels)
    code, stdout, _ = call(capsys, "evaluate.py", ckpt, "--data", setup["data"], "--all",
                           "--out", setup["tmp"] / "cropped" / "cm.png", "--workers", "0")
    assert code == 0 and f"accuracy: {accuracy:.4f}" in stdout


def test_evaluate_blurred(setup, capsys):
    out = setup["tmp"] / "cm_blur.png"
    code, stdout, _ = call(capsys, "evaluate.py", setup["ckpt"], "--data", setup["data"],
                           "--blur", 1.5, "--out", out, "--workers", "0")
    assert code == 0 and "blurred (sigma 1.5 px)" in stdout
    folder = ImageFolder(setup["data"], CLASSES, SIZE)
    test = [i for i in range(len(folder)) if i % 5 == 0]
    blurred = np.stack([cv2.GaussianBlur(folder[i][0], (0, 0), 1.5) for i in test])
    logits = cyconv.predict(setup["model"], blurred)
    accuracy = np.mean(logits.argmax(1) == [folder[i][1] for i in test])
    assert f"accuracy: {accuracy:.4f}" in stdout
    for bad in ("-1", "nan"):
        code, _, err = call(capsys, "evaluate.py", setup["ckpt"], "--data", setup["data"],
                            "--blur", bad)
        assert code == 2 and "--blur" in err
