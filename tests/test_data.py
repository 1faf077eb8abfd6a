"""Tests of cyconv.data: image folders, splits, augmentation, loader, generated shapes.

Every test builds its own small images in tmp_path, except the last one,
which reads the shared animals folder (skipped when it is absent).
"""
import os
import threading
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from cyconv.data import (
    ArrayDataset,
    Augment,
    DataLoader,
    ImageFolder,
    ProgressiveSize,
    Subset,
    compute_mean_std,
    crop_center,
    load_split,
    make_shapes,
    normalize,
    read_image,
    resize,
    save_split,
    segment_foreground,
    split_indices,
)

DATASETS = Path(os.environ.get("CYCONV_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))


def write(path, image):
    """Encode ``image`` (OpenCV channel order) by the file's extension; works for non-ASCII paths."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buffer = cv2.imencode(path.suffix, image)
    assert ok
    buffer.tofile(str(path))


def make_folder(root, counts, size=(12, 16), seed=0):
    """``root/<class>/<i>.png`` random colour images, ``counts`` = {class: number of images}."""
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            write(root / name / f"{i}.png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    return root


def jpeg_bytes(seed=0):
    image = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", image)[1].tobytes()


# --- ImageFolder: layout ---------------------------------------------------

def test_missing_root_names_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"root/<class>/\*\.jpg"):
        ImageFolder(tmp_path / "nowhere")


def test_root_without_class_folders(tmp_path):
    (tmp_path / "loose.jpg").write_bytes(jpeg_bytes())
    with pytest.raises(ValueError, match="no class sub-folders.*root/<class>"):
        ImageFolder(tmp_path)


def test_class_folders_without_images(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images found.*root/<class>"):
        ImageFolder(tmp_path)


def test_empty_class_folder_is_named(tmp_path):
    make_folder(tmp_path, {"cat": 2})
    (tmp_path / "dog").mkdir()
    with pytest.raises(ValueError, match="dog"):
        ImageFolder(tmp_path)


def test_named_class_without_folder(tmp_path):
    make_folder(tmp_path, {"cat": 1, "dog": 1})
    with pytest.raises(FileNotFoundError, match="panda"):
        ImageFolder(tmp_path, classes=["cat", "panda"])


def test_classes_sorted_or_in_given_order(tmp_path):
    make_folder(tmp_path, {"dog": 2, "bird": 1, "cat": 3})
    (tmp_path / "cat" / "readme.txt").write_text("ignored")
    (tmp_path / "cat" / "UPPER.JPG").write_bytes(jpeg_bytes())
    data = ImageFolder(tmp_path, image_size=8)
    assert data.classes == ["bird", "cat", "dog"]
    assert [label for _, label in data.samples] == [0, 1, 1, 1, 1, 2, 2]
    assert len(data) == 7 and data.skipped == []

    data = ImageFolder(tmp_path, classes=["dog", "bird"], image_size=8)
    assert data.classes == ["dog", "bird"]
    assert [(p.parent.name, label) for p, label in data.samples] == [("dog", 0), ("dog", 0), ("bird", 1)]


# --- ImageFolder: reading --------------------------------------------------

def test_bad_files_are_skipped_with_one_warning_each(tmp_path):
    make_folder(tmp_path, {"cat": 2, "dog": 1})
    good = jpeg_bytes()
    bad = {"cat/truncated.jpg": good[:len(good) // 2],
           "cat/text.jpg": b"this is not an image\n",
           "dog/corrupt.jpeg": good[:3] + bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8)),
           "dog/empty.png": b""}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = ImageFolder(tmp_path, image_size=8)
    messages = [str(w.message) for w in caught]
    assert len(messages) == len(bad)
    for name in bad:
        assert sum(Path(name).name in m for m in messages) == 1
    assert sorted(p.relative_to(tmp_path).as_posix() for p in data.skipped) == sorted(bad)
    assert len(data) == 3


def test_image_failing_to_decode_at_load_time_is_replaced(tmp_path):
    make_folder(tmp_path, {"a": 3, "b": 3})
    # Passes the cheap header check (BMP signature) but cannot be decoded.
    (tmp_path / "a" / "1.png").unlink()
    (tmp_path / "a" / "1.bmp").write_bytes(b"BM" + bytes(100))
    data = ImageFolder(tmp_path, image_size=8)
    bad = [p.name for p, _ in data.samples].index("1.bmp")
    loader = DataLoader(data, batch_size=4, num_workers=2)
    with pytest.warns(UserWarning, match="1.bmp") as caught:
        epochs = [[(x.copy(), y.copy()) for x, y in loader] for _ in range(2)]
    assert len(caught) == 1 and data.skipped == [data.samples[bad][0]]
    for batches in epochs:
        assert [len(y) for _, y in batches] == [4, 2]
        x = np.concatenate([x for x, _ in batches])
        np.testing.assert_array_equal(x[bad], x[bad + 1])  # replaced by the next item
    np.testing.assert_array_equal(epochs[0][0][0], epochs[1][0][0])


def test_colour_conversions(tmp_path):
    bgr = np.zeros((6, 10, 3), np.uint8)
    bgr[..., 2] = 200  # red in OpenCV's BGR order
    write(tmp_path / "red.png", bgr)
    write(tmp_path / "gray.png", np.full((6, 10), 77, np.uint8))
    write(tmp_path / "rgba.png", np.dstack([bgr, np.zeros((6, 10), np.uint8)]))
    write(tmp_path / "deep.png", np.full((6, 10, 3), 65535, np.uint16))
    write(tmp_path / "deep_gray.png", np.full((6, 10), 257 * 40, np.uint16))
    expected = {"red": [200, 0, 0], "gray": [77, 77, 77], "rgba": [200, 0, 0],
                "deep": [255, 255, 255], "deep_gray": [40, 40, 40]}
    for name, rgb in expected.items():
        image = read_image(tmp_path / f"{name}.png")
        assert image.shape == (6, 10, 3) and image.dtype == np.uint8, name
        assert (image == rgb).all(), name


def test_exif_orientation_is_applied(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    Image.new("RGB", (40, 20), (0, 0, 255)).save(tmp_path / "rotated.jpg", exif=exif)
    assert read_image(tmp_path / "rotated.jpg").shape == (40, 20, 3)


def test_non_ascii_file_name_with_spaces(tmp_path):
    path = tmp_path / "ñandú 猫" / "my photo é 猫.jpg"
    write(path, np.full((30, 20, 3), 128, np.uint8))
    data = ImageFolder(tmp_path, image_size=(10, 7))
    image, label = data[0]
    assert data.classes == ["ñandú 猫"] and label == 0
    assert image.shape == (10, 7, 3) and image.dtype == np.uint8
    assert abs(int(image.mean()) - 128) <= 2


def test_resize_to_int_or_height_width(tmp_path):
    make_folder(tmp_path, {"a": 1}, size=(20, 30))
    assert ImageFolder(tmp_path, image_size=8)[0][0].shape == (8, 8, 3)
    assert ImageFolder(tmp_path, image_size=(40, 12))[0][0].shape == (40, 12, 3)


@pytest.mark.parametrize("shape,fraction,box", [
    ((10, 10), 0.8, (1, 1, 8, 8)),
    ((11, 7), 0.5, (2, 1, 6, 4)),      # 5.5 -> 6 rows, 3.5 -> 4 columns (round half to even)
    ((9, 13), 0.875, (0, 1, 8, 11)),   # odd margins: the extra pixel goes below and right
    ((3, 2), 0.1, (1, 0, 1, 1)),       # never less than one pixel
    ((6, 5), 1, (0, 0, 6, 5)),
])
def test_crop_center_keeps_the_middle_of_each_side(shape, fraction, box):
    image = np.arange(np.prod(shape) * 3, dtype=np.int64).reshape(shape + (3,))
    top, left, h, w = box
    assert np.array_equal(crop_center(image, fraction), image[top:top + h, left:left + w])


@pytest.mark.parametrize("fraction", [0, -0.5, 1.01, float("nan"), "0.8", True, None])
def test_crop_center_refuses_fractions_outside_0_1(fraction):
    with pytest.raises(ValueError, match=r"center_crop must be a number in \(0, 1\]"):
        crop_center(np.zeros((4, 4, 3), np.uint8), fraction)


def test_image_folder_center_crop_cuts_before_resizing(tmp_path):
    """The crop comes out of the decoded photo, at its full resolution, then is resized;
    with_center_crop is that view of the same files."""
    photo = np.random.default_rng(0).integers(0, 256, (41, 30, 3), np.uint8)
    write(tmp_path / "a" / "x.png", photo)
    whole = ImageFolder(tmp_path, image_size=(12, 9))
    expected = resize(crop_center(photo[:, :, ::-1], 0.7), (12, 9))
    for data in (ImageFolder(tmp_path, image_size=(12, 9), center_crop=0.7),
                 whole.with_center_crop(0.7)):
        assert data.center_crop == 0.7
        assert np.array_equal(data[0][0], expected)
    assert np.array_equal(read_image(tmp_path / "a" / "x.png", (12, 9), center_crop=0.7),
                          expected)
    assert whole.center_crop == 1.0 and whole.with_center_crop(0.7).samples is whole.samples
    with pytest.raises(ValueError, match="center_crop must be a number"):
        ImageFolder(tmp_path, center_crop=0)


# --- splits ----------------------------------------------------------------

def test_split_is_stratified_reproducible_disjoint_and_covering():
    labels = np.repeat([0, 1, 2, 3], [100, 30, 10, 3])
    train, valid, test = split_indices(labels, seed=5)
    everything = np.concatenate([train, valid, test])
    assert np.array_equal(np.sort(everything), np.arange(len(labels)))
    for part, counts in zip((train, valid, test), ([80, 24, 8, 1], [10, 3, 1, 1], [10, 3, 1, 1])):
        assert part.dtype == np.int64
        assert np.bincount(labels[part], minlength=4).tolist() == counts
    again = split_indices(labels, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip((train, valid, test), again))
    assert not np.array_equal(split_indices(labels, seed=6)[1], valid)


def test_split_rejects_bad_ratios():
    with pytest.raises(ValueError, match="ratios"):
        split_indices([0, 1], ratios=(0.8, 0.3, 0.1))


def test_save_and_load_split(tmp_path):
    root = make_folder(tmp_path / "images", {"cat": 10, "dog": 10})
    data = ImageFolder(root, image_size=8)
    split = split_indices([label for _, label in data.samples])
    save_split(tmp_path / "split.json", data, *split)
    loaded = load_split(tmp_path / "split.json", data)
    assert all(np.array_equal(a, b) for a, b in zip(split, loaded))

    data.samples[split[2][0]][0].unlink()
    with pytest.raises(FileNotFoundError, match="1 file"):
        load_split(tmp_path / "split.json", ImageFolder(root, image_size=8))


# --- augmentation and normalisation ----------------------------------------

def test_augment_is_seeded():
    image = make_shapes(1, image_size=(24, 32), seed=3)[0][0]
    original = image.copy()
    augment = Augment(hflip=0.5, vflip=0.5, crop=1.0, rotate=1.0, color=1.0, defocus=1.0,
                      erase=1.0)
    first = augment(image, np.random.default_rng(7))
    assert first.shape == image.shape and first.dtype == np.uint8
    assert np.array_equal(first, augment(image, np.random.default_rng(7)))
    assert not np.array_equal(first, augment(image, np.random.default_rng(8)))
    assert np.array_equal(image, original)  # input untouched


def test_augment_to_another_size_crops_or_resizes_straight_to_it():
    image = make_shapes(1, image_size=(24, 32), seed=3)[0][0]
    every = Augment(hflip=0.5, crop=1.0, rotate=1.0, color=1.0, defocus=1.0, erase=1.0)
    for size, shape in ((16, (16, 16)), ((12, 20), (12, 20)), ((24, 32), (24, 32))):
        out = every(image, np.random.default_rng(5), size)
        assert out.shape == shape + (3,) and out.dtype == np.uint8
        assert np.array_equal(out, every(image, np.random.default_rng(5), size))
    # the image's own size is the default, bit for bit
    assert np.array_equal(every(image, np.random.default_rng(5), (24, 32)),
                          every(image, np.random.default_rng(5)))
    # the crop is resized once, straight to the size; an uncropped image is resized first
    rng = np.random.default_rng(9)
    rng.random(7), rng.uniform(0.5, 0.5)     # Augment's draws: which transforms, crop scale
    y0, x0 = rng.integers(0, 13), rng.integers(0, 17)
    box = image[y0:y0 + 12, x0:x0 + 16]
    crop_only = Augment(hflip=0, crop=1.0, rotate=0, color=0, crop_scale=(0.5, 0.5))
    assert np.array_equal(crop_only(image, np.random.default_rng(9), (6, 8)), resize(box, (6, 8)))
    nothing = Augment(hflip=0, crop=0, rotate=0, color=0)
    assert np.array_equal(nothing(image, np.random.default_rng(0), 8), resize(image, 8))
    with pytest.raises(ValueError, match="image_size"):
        every(image, np.random.default_rng(0), 0)


def test_flips_with_probability_one_are_exact():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    rng = np.random.default_rng(0)
    plain = dict(crop=0.0, rotate=0.0, color=0.0)
    assert np.array_equal(Augment(hflip=1.0, **plain)(image, rng), image[:, ::-1])
    assert np.array_equal(Augment(hflip=0.0, vflip=1.0, **plain)(image, rng), image[::-1])
    assert np.array_equal(Augment(hflip=0.0, **plain)(image, rng), image)


def test_defocus_keeps_the_middle_and_blurs_the_corners():
    checkerboard = np.indices((64, 80)).sum(axis=0) % 2 * 255
    image = np.repeat(checkerboard[..., None], 3, axis=2).astype(np.uint8)
    plain = dict(hflip=0.0, crop=0.0, rotate=0.0, color=0.0)
    for seed in range(10):
        out = Augment(defocus=1.0, **plain)(image, np.random.default_rng(seed)).astype(int)
        # the sharp ellipse always holds the very middle: unchanged there
        assert np.array_equal(out[31:33, 39:41], image[31:33, 39:41])
        # the corners are mostly the blurred image, whose checkerboard is nearly flat grey
        for corner in (out[:2, :2], out[:2, -2:], out[-2:, :2], out[-2:, -2:]):
            assert np.abs(corner - 127.5).max() < 0.5 * 127.5


def test_erase_fills_one_rectangle_with_noise():
    image = np.full((40, 50, 3), 128, np.uint8)
    plain = dict(hflip=0.0, crop=0.0, rotate=0.0, color=0.0)
    for seed in range(20):
        changed = np.any(Augment(erase=1.0, **plain)(image, np.random.default_rng(seed)) != image,
                         axis=2)
        rows, cols = np.nonzero(changed)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert 0.02 * 0.9 <= box / image[..., 0].size <= 0.25 * 1.1  # 2-25% of the area
        assert changed.sum() > 0.95 * box  # noise fills the box (a few values may equal 128)


def disc_photo(seed, size=96):
    """A bright disc (the 'animal') off the centre of a textured dark background, and its
    true mask."""
    rng = np.random.default_rng(seed)
    image = rng.integers(20, 90, (size, size, 3), dtype=np.uint8)
    image = cv2.GaussianBlur(image, (0, 0), 2)
    truth = np.zeros((size, size), np.uint8)
    cv2.circle(truth, (int(size * 0.55), int(size * 0.45)), size // 4, 1, -1)
    image[truth == 1] = (230, 200, 40)
    return image, truth.astype(bool)


def test_segment_foreground_finds_the_object_and_paints_it_out():
    for seed in range(3):
        image, truth = disc_photo(seed)
        mask, plate = segment_foreground(image)
        assert mask.dtype == np.uint8 and mask.shape == truth.shape
        found = mask >= 128
        assert (found & truth).sum() / (found | truth).sum() > 0.9  # intersection over union
        assert plate.shape == image.shape and plate.dtype == np.uint8
        # the object is gone from the plate: its pixels now look like the dark background
        assert plate[truth].mean() < 100 < image[truth].mean()
        far = cv2.dilate((mask > 0).astype(np.uint8), np.ones((5, 5), np.uint8)) == 0
        assert far.mean() > 0.5 and np.array_equal(plate[far], image[far])  # scenery kept
        cv2.randu(np.zeros(10), 0, 1)  # deterministic, also after other OpenCV random use
        again = segment_foreground(image)
        assert np.array_equal(again[0], mask) and np.array_equal(again[1], plate)


def test_segment_foreground_falls_back_to_a_centred_ellipse():
    for image in (np.full((40, 60, 3), 128, np.uint8), np.zeros((5, 3, 3), np.uint8)):
        mask, plate = segment_foreground(image)
        h, w = image.shape[:2]
        assert mask.shape == (h, w) and mask[h // 2, w // 2] == 255
        assert mask[0, 0] == 0 or min(h, w) < 8
        assert plate.shape == image.shape


def test_swap_backgrounds_puts_each_foreground_on_another_class_plate():
    # flat images 10, 20, 200, 250 with labels 0, 0, 1, 2; foreground: the left half;
    # plates: the image value + 1, so that a swapped background names its source
    images = [np.full((6, 8, 3), value, np.uint8) for value in (10, 20, 200, 250)]
    labels = [0, 0, 1, 2]
    mask = np.zeros((6, 8), np.uint8)
    mask[:, :4] = 255
    segments = [(mask, image + 1) for image in images]
    for seed in range(10):
        out = list(images)
        Augment(background=1.0).swap_backgrounds(out, labels, segments.__getitem__,
                                                 np.random.default_rng(seed))
        for image, label, original in zip(out, labels, images):
            assert np.array_equal(image[:, :4], original[:, :4])  # the foreground stays
            plates = [int(v[0, 0, 0]) + 1 for v, lab in zip(images, labels) if lab != label]
            assert np.all(image[:, 4:] == image[0, 4]) and int(image[0, 4, 0]) in plates
    untouched = list(images)
    Augment(background=0.0).swap_backgrounds(untouched, labels, segments.__getitem__,
                                             np.random.default_rng(0))
    assert all(a is b for a, b in zip(untouched, images))


def test_loader_swaps_backgrounds_reproducibly():
    data = shapes_dataset(12)
    runs = [[x for x, _ in DataLoader(data, 4, shuffle=True, augment=Augment(background=1.0),
                                      seed=2, num_workers=workers)] for workers in (0, 2)]
    plain = [x for x, _ in DataLoader(data, 4, shuffle=True, seed=2, num_workers=0,
                                      augment=Augment(background=0.0))]
    assert all(np.array_equal(a, b) for a, b in zip(*runs))
    assert not all(np.array_equal(a, b) for a, b in zip(runs[0], plain))


def test_cut_mix_pastes_one_box_and_counts_the_share_kept():
    image = np.zeros((30, 41, 3), np.uint8)
    partner = np.full_like(image, 200)
    shares = []
    for seed in range(40):
        mixed, kept = Augment(cutmix=1.0).cut_mix(image, partner, np.random.default_rng(seed))
        pasted = np.all(mixed == 200, axis=2)
        assert np.all(pasted | np.all(mixed == 0, axis=2)) and not image.any()
        rows, cols = np.flatnonzero(pasted.any(axis=1)), np.flatnonzero(pasted.any(axis=0))
        if len(rows):   # one rectangle
            assert pasted.sum() == len(rows) * len(cols)
            assert np.all(np.diff(rows) == 1) and np.all(np.diff(cols) == 1)
        assert kept == pytest.approx(1 - pasted.mean(), abs=1e-12)
        shares.append(kept)
    assert 0.3 < np.mean(shares) < 0.8 and min(shares) < 0.3 and max(shares) > 0.9


def test_loader_cut_mix_gives_class_probabilities_reproducibly():
    data = shapes_dataset(12)
    mixing = Augment(hflip=0, crop=0, rotate=0, color=0, cutmix=0.6)
    runs = [list(DataLoader(data, 5, shuffle=True, augment=mixing, seed=3, num_workers=workers))
            for workers in (0, 2)]
    plain = list(DataLoader(data, 5, shuffle=True, seed=3, num_workers=0,
                            augment=Augment(hflip=0, crop=0, rotate=0, color=0)))
    for (x, y), (x2, y2), (x0, labels) in zip(*runs, plain):
        assert np.array_equal(x, x2) and np.array_equal(y, y2)
        assert y.dtype == np.float32 and y.shape == (len(labels), len(data.classes))
        np.testing.assert_allclose(y.sum(axis=1), 1, rtol=1e-6)
        own = y[np.arange(len(labels)), labels]
        mixed = ~np.all(x == x0, axis=(1, 2, 3))
        assert np.all(own[~mixed] == 1) and np.all((own > 0) & (own <= 1))
    labels_seen = np.concatenate([y for _, y in runs[0]])
    assert 0 < np.mean(labels_seen.max(axis=1) < 1) < 1   # some images mixed, some not


def test_evaluate_refuses_a_loader_of_class_probabilities():
    from cyconv import models
    from cyconv.train import evaluate
    data = shapes_dataset(6)
    loader = DataLoader(data, 3, augment=Augment(cutmix=1.0), num_workers=0)
    with pytest.raises(ValueError, match="without CutMix"):
        evaluate(models.small(len(data.classes), 8, widths=(4, 8)), loader)


def test_augment_rejects_bad_settings():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Augment(cutmix=1.5)
    with pytest.raises(ValueError, match="cutmix_alpha"):
        Augment(cutmix_alpha=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Augment(erase=1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Augment(background=-0.1)
    with pytest.raises(ValueError, match="defocus_sigma"):
        Augment(defocus_sigma=(0.05, 0.01))


def test_normalize_values():
    images = np.random.default_rng(0).integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    mean, std = np.array([0.2, 0.5, 0.7]), np.array([0.1, 0.3, 0.25])
    x = normalize(images, mean, std)
    expected = ((images / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    assert x.dtype == np.float32 and x.flags.c_contiguous and x.shape == (2, 3, 4, 5)
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)


def test_compute_mean_std_matches_numpy():
    images, labels, classes = make_shapes(10, image_size=8)
    indices = [1, 4, 5, 9]
    mean, std = compute_mean_std(ArrayDataset(images, labels, classes), indices, batch_size=3)
    pixels = images[indices].reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, pixels.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(std, pixels.std(axis=0), rtol=1e-4)


# --- loader ----------------------------------------------------------------

def shapes_dataset(n=10, size=8):
    return ArrayDataset(*make_shapes(n, image_size=size, seed=1))


def test_loader_batches_shapes_dtypes_and_values():
    data = shapes_dataset(10)
    mean, std = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]
    loader = DataLoader(data, batch_size=4, mean=mean, std=std)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert [x.shape for x, _ in batches] == [(4, 3, 8, 8), (4, 3, 8, 8), (2, 3, 8, 8)]
    for x, y in batches:
        assert x.dtype == np.float32 and x.flags.c_contiguous and y.dtype == np.int64
    x = np.concatenate([x for x, _ in batches])
    np.testing.assert_allclose(x, normalize(data.images, mean, std), rtol=1e-6)
    assert np.array_equal(np.concatenate([y for _, y in batches]), data.labels)


def test_drop_last():
    loader = DataLoader(shapes_dataset(10), batch_size=4, drop_last=True)
    assert len(loader) == 2 and [len(y) for _, y in loader] == [4, 4]
    assert len(DataLoader(shapes_dataset(8), batch_size=4, drop_last=True)) == 2


def epoch_batches(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def test_loader_is_deterministic_whatever_the_threads(tmp_path):
    make_folder(tmp_path, {"a": 7, "b": 6}, size=(10, 14))
    data = ImageFolder(tmp_path, image_size=(10, 14))
    runs = [epoch_batches(DataLoader(data, 3, shuffle=True, augment=Augment(vflip=0.5), seed=4,
                                     num_workers=workers, cache=cache), epoch=2)
            for workers, cache in ((1, True), (2, False), (2, True), (0, True))]
    for run in runs[1:]:
        assert len(run) == len(runs[0]) == 5
        for (x0, y0), (x1, y1) in zip(runs[0], run):
            assert np.array_equal(x0, x1) and np.array_equal(y0, y1)


def test_epochs_differ_and_state_round_trips():
    loader = DataLoader(shapes_dataset(12), 4, shuffle=True, augment=Augment(), seed=1)
    first, second = list(loader), list(loader)
    assert loader.state_dict() == {"epoch": 2, "seed": 1}
    assert not np.array_equal(first[0][0], second[0][0])

    resumed = DataLoader(shapes_dataset(12), 4, shuffle=True, augment=Augment())
    resumed.load_state_dict({"epoch": 1, "seed": 1})
    for (x0, y0), (x1, y1) in zip(second, resumed):
        assert np.array_equal(x0, x1) and np.array_equal(y0, y1)


def test_progressive_size_rises_by_steps_from_start_to_final():
    sizes = ProgressiveSize(96, 128, ramp=(10, 20))
    assert [sizes(e) for e in (0, 9, 10, 14, 15, 19, 20, 50)] == [96, 96, 96, 96, 112, 112, 128,
                                                                   128]
    assert [ProgressiveSize(40, 64, (0, 3), step=8)(e) for e in range(4)] == [40, 48, 56, 64]
    assert [ProgressiveSize(96, 128, (5, 5))(e) for e in (4, 5)] == [96, 128]
    assert [ProgressiveSize(30, 64, (0, 10))(e) for e in (0, 1)] == [30, 32]  # never under 30
    for args, match in (((128, 96, (0, 1)), "larger than"), ((96, 128, (5, 2)), "ramp"),
                        ((96, 128, (-1, 2)), "ramp"), ((0, 128, (0, 1)), "image_size"),
                        ((96, 128, (0, 1), 0), "step")):
        with pytest.raises(ValueError, match=match):
            ProgressiveSize(*args)


def test_loader_resizes_each_epoch_to_its_size_whatever_the_threads():
    data = shapes_dataset(10, size=16)
    sizes = ProgressiveSize(8, 16, ramp=(0, 2), step=4)
    shapes = {}
    for workers in (0, 2):
        loader = DataLoader(data, 4, shuffle=True, augment=Augment(cutmix=0.5), seed=2,
                            num_workers=workers, image_size=sizes)
        runs = [list(loader) for _ in range(3)]
        shapes[workers] = [{x.shape[2:] for x, _ in run} for run in runs]
        if workers == 0:
            first = runs
        else:
            for run, run0 in zip(runs, first):
                for (x, y), (x0, y0) in zip(run, run0):
                    assert np.array_equal(x, x0) and np.array_equal(y, y0)
    assert shapes[0] == shapes[2] == [{(8, 8)}, {(12, 12)}, {(16, 16)}]
    # a fixed size; without augmentation, the images are resized as they are
    plain = list(DataLoader(data, 5, image_size=(6, 10)))
    assert np.array_equal(plain[0][0], normalize(np.stack([resize(im, (6, 10))
                                                           for im in data.images[:5]])))
    with pytest.raises(ValueError, match="image_size"):
        DataLoader(data, 4, image_size=-3)


def test_subset_and_shuffle_cover_each_item_once():
    data = shapes_dataset(12)
    subset = Subset(data, [0, 3, 5, 7, 11])
    y = np.concatenate([y for _, y in DataLoader(subset, 2, shuffle=True)])
    assert sorted(y.tolist()) == sorted(data.labels[[0, 3, 5, 7, 11]].tolist())


# --- generated shapes ------------------------------------------------------

def test_make_shapes_balanced_and_deterministic():
    images, labels, classes = make_shapes(31, image_size=(16, 20), seed=2)
    assert classes == ["circle", "square", "triangle"]
    assert images.shape == (31, 16, 20, 3) and images.dtype == np.uint8
    assert labels.shape == (31,) and labels.dtype == np.int64
    assert sorted(np.bincount(labels).tolist()) == [10, 10, 11]
    again = make_shapes(31, image_size=(16, 20), seed=2)
    assert np.array_equal(images, again[0]) and np.array_equal(labels, again[1])
    assert not np.array_equal(images, make_shapes(31, image_size=(16, 20), seed=3)[0])


# --- real data ---------------------------------------------------------------

@pytest.mark.skipif(not (DATASETS / "animals").is_dir(),
                    reason=f"animals data set not found at {DATASETS / 'animals'} (set CYCONV_DATASETS)")
def test_animals_folder():
    data = ImageFolder(DATASETS / "animals", classes=["dog", "panda", "bird"], image_size=64)
    assert data.classes == ["dog", "panda", "bird"]
    assert len(data) + len(data.skipped) == 3000
    picked = np.random.default_rng(0).choice(len(data), 32, replace=False)
    loader = DataLoader(Subset(data, picked), 16, shuffle=True, augment=Augment())
    batches = list(loader)
    assert len(batches) == 2
    for x, y in batches:
        assert x.shape == (16, 3, 64, 64) and x.dtype == np.float32
        assert x.min() >= 0.0 and x.max() <= 1.0 and x.std() > 0.05
    labels = np.concatenate([y for _, y in batches])
    assert sorted(labels.tolist()) == sorted(data.samples[i][1] for i in picked)


@pytest.mark.skipif(not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"),
                    reason="per-thread priorities are a Linux feature")
def test_loader_threads_yield_to_the_kernels():
    # the loader's threads run at a lower priority (nice +10) than the training thread
    seen = []

    class Recording(ArrayDataset):
        def __getitem__(self, index):
            seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
            return super().__getitem__(index)

    images, labels, classes = make_shapes(8, image_size=8, seed=1)
    for _ in DataLoader(Recording(images, labels, classes), 4, num_workers=2):
        pass
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert seen and all(nice == min(mine + 10, 19) for nice in seen)


def test_loader_swaps_the_same_with_or_without_the_segmentation_cache():
    # without the cache (when memory is short) a partner that already holds a composite
    # must still be segmented from its decoded image, as the cached path does
    data = shapes_dataset(12, size=16)
    loaders = [DataLoader(data, 6, shuffle=True, augment=Augment(background=0.7), seed=seed,
                          num_workers=0) for seed in (3, 3)]
    loaders[1]._segments = None
    for seed in range(4):
        for loader in loaders:
            loader.seed = seed
        for (a, _), (b, _) in zip(*loaders):
            assert np.array_equal(a, b)
