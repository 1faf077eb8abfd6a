"""Bad data on disk, beyond tests/test_data.py: a real multi-worker epoch with bad
files in the middle, EXIF orientations, 16-bit / float / palette / CMYK images,
non-ASCII names through the loader, folders with no usable image.

Policy (the issue's): a missing folder, an empty class folder and a folder with
no images are clear errors; every other bad file is converted or skipped with
one warning each (``ImageFolder.skipped`` is the count); a bad image never
stops an epoch.
"""
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

from cyconv.data import (
    Augment,
    CorruptImageError,
    DataLoader,
    ImageFolder,
    ImageTooLargeError,
    Subset,
    read_image,
    set_max_image_pixels,
)
from cyconv.data.io import check_image_file


def _png(path):
    write(path, np.full((6, 6, 3), 90, np.uint8))


def write(path, image):
    """Encode ``image`` (OpenCV channel order) by the file's extension; non-ASCII paths work."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buffer = cv2.imencode(path.suffix, image)
    assert ok, path
    buffer.tofile(str(path))


def good_images(root, counts, size=(10, 12), seed=0):
    rng = np.random.default_rng(seed)
    for name, count in counts.items():
        for i in range(count):
            write(root / name / f"{i:02d}.png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def jpeg_bytes(seed=0, size=(24, 24)):
    image = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", image)[1].tobytes()


def undecodable_png():
    """A PNG with a valid signature and an IEND chunk (passes the cheap check), bad data."""
    data = cv2.imencode(".png", np.full((8, 8, 3), 50, np.uint8))[1].tobytes()
    start = data.index(b"IDAT") + 4
    return data[:start] + bytes(40) + data[start + 40:]


def recorded():
    ctx = warnings.catch_warnings(record=True)
    caught = ctx.__enter__()
    warnings.simplefilter("always")
    return ctx, caught


# --- bad files in the middle of a real epoch ---------------------------------

def test_bad_files_mid_epoch_with_several_workers(tmp_path):
    good_images(tmp_path, {"a": 7, "b": 6, "c": 7})
    # found at indexing time (cheap header check) ...
    header_bad = {"a/03 truncated.jpg": jpeg_bytes()[:300], "b/03 text.png": b"hello\n",
                  "c/00 empty.jpg": b""}
    # ... and only when decoded, in the workers (two of them next to each other)
    decode_bad = {"a/04 bad.bmp": b"BM" + bytes(64), "a/04 bad2.png": undecodable_png(),
                  "c/05 bad.png": undecodable_png()}
    for name, content in {**header_bad, **decode_bad}.items():
        (tmp_path / name).write_bytes(content)

    ctx, caught = recorded()
    try:
        data = ImageFolder(tmp_path, image_size=(8, 6))
        assert sorted(Path(str(w.message).split("skipping ")[1].split(":")[0]).name
                      for w in caught) == sorted(Path(n).name for n in header_bad)
        assert len(data) == 20 + len(decode_bad)
        loader = DataLoader(data, batch_size=4, shuffle=True, augment=Augment(), num_workers=3,
                            mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
        for epoch in range(3):
            batches = list(loader)
            assert len(batches) == len(loader) == 6
            assert sum(len(y) for _, y in batches) == len(data)
            for x, y in batches:
                assert x.dtype == np.float32 and x.shape[1:] == (3, 8, 6) and np.isfinite(x).all()
                assert y.dtype == np.int64 and set(y) <= {0, 1, 2}
    finally:
        ctx.__exit__(None, None, None)
    messages = [str(w.message) for w in caught]
    # one warning per bad file over the three epochs, none twice
    for name in list(header_bad) + list(decode_bad):
        assert sum(Path(name).name + ":" in m for m in messages) == 1, (name, messages)
    assert len(messages) == len(header_bad) + len(decode_bad)
    # the count: every bad file is in data.skipped exactly once
    assert sorted(p.relative_to(tmp_path).as_posix() for p in data.skipped) == \
        sorted(list(header_bad) + list(decode_bad))


def test_bad_images_in_a_subset(tmp_path):
    """A bad item of a Subset is replaced by the next readable item of that Subset;
    a Subset with no readable item is a clear error, not a hang."""
    good_images(tmp_path, {"a": 2, "b": 2})
    for i in range(3):
        (tmp_path / "a" / f"z{i}.png").write_bytes(undecodable_png())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = ImageFolder(tmp_path, image_size=4)
        bad = [i for i, (p, _) in enumerate(data.samples) if p.name.startswith("z")]
        good_b = [i for i, (_, label) in enumerate(data.samples) if label == 1]
        batches = list(DataLoader(Subset(data, bad + good_b[:1]), batch_size=2, num_workers=2))
        assert [y.tolist() for _, y in batches] == [[1, 1], [1, 1]]
        with pytest.raises(CorruptImageError, match="no image"):
            list(DataLoader(Subset(data, bad), batch_size=2, num_workers=2))


def test_no_decodable_image_at_all_is_a_clear_error(tmp_path):
    for name in ("a", "b"):
        for i in range(2):
            (tmp_path / name / f"{i}.png").parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / f"{i}.png").write_bytes(undecodable_png())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = ImageFolder(tmp_path, image_size=4)   # they pass the cheap check
        with pytest.raises(CorruptImageError, match="no image"):
            list(DataLoader(data, batch_size=2, num_workers=2))


def test_file_removed_after_indexing_does_not_stop_the_epoch(tmp_path):
    good_images(tmp_path, {"a": 3, "b": 3})
    data = ImageFolder(tmp_path, image_size=4)
    (tmp_path / "a" / "01.png").unlink()
    ctx, caught = recorded()
    try:
        batches = list(DataLoader(data, batch_size=4, num_workers=2))
    finally:
        ctx.__exit__(None, None, None)
    assert sum(len(y) for _, y in batches) == 6
    assert sum("01.png" in str(w.message) for w in caught) == 1


# --- formats that are converted ------------------------------------------------

def _marked(size=(40, 60)):
    """RGB image, dark, with a bright red block in the top-left corner."""
    image = np.full((*size, 3), 30, np.uint8)
    image[:size[0] // 3, :size[1] // 3] = (250, 20, 20)
    return image


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations_match_pillow(tmp_path, orientation):
    Image = pytest.importorskip("PIL.Image")
    ImageOps = pytest.importorskip("PIL.ImageOps")
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "cls" / f"o{orientation}.jpg"
    path.parent.mkdir()
    Image.fromarray(_marked()).save(path, exif=exif, quality=95)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    image = read_image(path)
    assert image.shape == expected.shape == ((40, 60, 3) if orientation < 5 else (60, 40, 3))
    # the red corner went where Pillow puts it (JPEG decoders may differ by a few levels)
    assert np.abs(image.astype(int) - expected).mean() < 4
    # through the data set too, resized to a non-square size
    item, label = ImageFolder(tmp_path, image_size=(12, 8))[0]
    assert item.shape == (12, 8, 3) and label == 0


def test_deep_and_float_images_are_scaled(tmp_path):
    write(tmp_path / "c" / "rgb16.png", np.full((5, 7, 3), 65535 // 5, np.uint16))
    write(tmp_path / "c" / "rgba16.png", np.full((5, 7, 4), 65535, np.uint16))
    write(tmp_path / "c" / "gray16.tif", np.full((5, 7), 65535 // 3, np.uint16))
    write(tmp_path / "c" / "rgb16.tiff", np.full((5, 7, 3), 65535, np.uint16))
    write(tmp_path / "c" / "float.tiff", np.full((5, 7, 3), 0.5, np.float32))
    expected = {"rgb16.png": 51, "rgba16.png": 255, "gray16.tif": 85, "rgb16.tiff": 255,
                "float.tiff": 128}
    for name, value in expected.items():
        image = read_image(tmp_path / "c" / name)
        assert image.shape == (5, 7, 3) and image.dtype == np.uint8, name
        assert np.all(np.abs(image.astype(int) - value) <= 1), (name, image[0, 0])
    data = ImageFolder(tmp_path, image_size=4)
    assert len(data) == len(expected) and data.skipped == []
    x, _ = next(iter(DataLoader(data, batch_size=len(expected), num_workers=2)))
    assert x.shape == (len(expected), 3, 4, 4) and x.dtype == np.float32


@pytest.mark.parametrize("mode,suffix", [("1", ".png"), ("L", ".png"), ("LA", ".png"),
                                         ("P", ".png"), ("RGBA", ".png"), ("CMYK", ".jpg"),
                                         ("RGB", ".webp"), ("L", ".bmp"), ("RGB", ".tiff")])
def test_pillow_modes_are_converted(tmp_path, mode, suffix):
    Image = pytest.importorskip("PIL.Image")
    path = tmp_path / f"image{suffix}"
    try:
        Image.fromarray(_marked()).convert(mode).save(path)
    except (OSError, KeyError, ValueError) as exc:
        pytest.skip(f"Pillow cannot write {mode} {suffix}: {exc}")
    image = read_image(path)
    assert image.shape == (40, 60, 3) and image.dtype == np.uint8
    # the marked corner is brighter than the rest, whatever the colour model
    assert image[:10, :15].mean() > image[-10:, -15:].mean()


def test_undecodable_formats_are_skipped_at_load_time(tmp_path):
    """32-bit integer TIFF: OpenCV cannot decode it; one warning, the epoch goes on."""
    Image = pytest.importorskip("PIL.Image")
    good_images(tmp_path, {"a": 3, "b": 3})
    Image.fromarray(np.full((6, 6), 70000, np.int32), mode="I").save(tmp_path / "a" / "deep32.tif")
    data = ImageFolder(tmp_path, image_size=4)
    with pytest.warns(UserWarning, match="deep32.tif") as caught:
        for _ in range(2):
            assert sum(len(y) for _, y in DataLoader(data, batch_size=3, num_workers=2)) == 7
    assert len([w for w in caught if "deep32" in str(w.message)]) == 1
    assert [p.name for p in data.skipped] == ["deep32.tif"]


# --- names ------------------------------------------------------------------------

def test_non_ascii_names_through_the_loader(tmp_path):
    names = {"chat noir": ["é à ü.png", " leading space.png", "-dash.png"],
             "狗 dog": ["猫 ねこ.png", "emoji 🐶.png", "comb\u0301ined.png"],
             "Ωmega": ["Ω 1.PNG", "two words.JPG"]}
    rng = np.random.default_rng(1)
    for cls, files in names.items():
        for file in files:
            write(tmp_path / cls / file, rng.integers(0, 256, (9, 11, 3), dtype=np.uint8))
    (tmp_path / "狗 dog" / "broken 壊れた.jpg").write_bytes(jpeg_bytes()[:200])
    with pytest.warns(UserWarning, match="broken 壊れた.jpg"):
        data = ImageFolder(tmp_path, image_size=5)
    assert data.classes == sorted(names)
    assert len(data) == 8 and [p.name for p in data.skipped] == ["broken 壊れた.jpg"]
    labels = np.concatenate([y for _, y in DataLoader(data, batch_size=3, num_workers=2)])
    assert sorted(labels.tolist()) == sorted(data.classes.index(c) for c, fs in names.items()
                                             for _ in fs)


# --- folders with nothing usable ------------------------------------------------

def test_folders_with_only_non_image_files(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "notes.txt").write_text("text")
        (tmp_path / cls / ".DS_Store").write_bytes(bytes(10))
        (tmp_path / cls / "Thumbs.db").write_bytes(bytes(10))
        (tmp_path / cls / "photo.jpg").mkdir()          # a folder named like an image
    with pytest.raises(ValueError, match="no images found"):
        ImageFolder(tmp_path)


def test_class_with_only_unreadable_images_is_named(tmp_path):
    good_images(tmp_path, {"good": 2})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "bad" / "y.png").write_bytes(b"\x89PNG\r\n\x1a\n")   # truncated
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="bad"):
            ImageFolder(tmp_path)


def test_root_that_is_a_file_or_missing(tmp_path):
    (tmp_path / "file.jpg").write_bytes(jpeg_bytes())
    for root in (tmp_path / "file.jpg", tmp_path / "missing", tmp_path / "missing" / "deeper"):
        with pytest.raises(FileNotFoundError, match="root/<class>"):
            ImageFolder(root)


def test_hidden_folders_are_not_classes(tmp_path):
    good_images(tmp_path, {"a": 1, ".cache": 1, "b": 1})
    assert ImageFolder(tmp_path, image_size=4).classes == ["a", "b"]


# ---------------------------------------------------------------------------
# Hostile files: pipes, huge images, sparse giants, unreadable files and folders
# ---------------------------------------------------------------------------
def test_a_fifo_named_jpg_is_refused_at_once(tmp_path):
    """A pipe would block a reader forever: only regular files are read."""
    import os
    fifo = tmp_path / "a" / "pipe.jpg"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    with pytest.raises(CorruptImageError, match="not a regular file"):
        read_image(fifo)
    _png(tmp_path / "a" / "ok.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = ImageFolder(tmp_path, image_size=8)
    assert [p.name for p, _ in folder.samples] == ["ok.png"]


def test_an_image_over_the_pixel_cap_is_refused_from_its_header(tmp_path):
    """A small PNG that decodes to 20000x20000 pixels is refused before decoding."""
    import zlib
    width = height = 20000
    row = b"\x00" + bytes(width)     # filter byte + one grey row
    raw = zlib.compress(row * height, 9)

    def chunk(kind, data):
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", width.to_bytes(4, "big") + height.to_bytes(4, "big")
                                       + bytes([8, 0, 0, 0, 0]))
           + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    path = tmp_path / "bomb.png"
    path.write_bytes(png)
    assert path.stat().st_size < 1_000_000
    with pytest.raises(ImageTooLargeError, match="20000x20000 pixels, over the limit of"):
        read_image(path)
    set_max_image_pixels(500_000_000)
    try:
        assert check_image_file(path) is None     # the cap can be raised
    finally:
        set_max_image_pixels(100_000_000)
    assert "over the limit" in check_image_file(path)


def test_the_folder_scan_reads_at_most_two_megabytes_per_file(tmp_path, monkeypatch):
    """A 4 GB sparse file named .jpg costs no memory: the scan reads its two ends only."""
    big = tmp_path / "a" / "big.jpg"
    big.parent.mkdir()
    with open(big, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0")
        f.truncate(4 * 1024**3)
    _png(tmp_path / "a" / "ok.png")
    reads = []
    real_open = open

    def counting_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if "b" in mode and str(path).endswith("big.jpg"):
            original = handle.read
            handle.read = lambda n=-1: reads.append(n) or original(n)
        return handle

    monkeypatch.setattr("builtins.open", counting_open)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder = ImageFolder(tmp_path, image_size=8)
    assert [p.name for p, _ in folder.samples] == ["ok.png"]
    assert reads and all(0 < n <= 1 << 20 for n in reads)
    assert any("big.jpg" in str(w.message) for w in caught)


def test_unreadable_images_are_skipped_and_an_unreadable_class_folder_is_named(tmp_path):
    import os
    if os.geteuid() == 0:
        pytest.skip("root reads files without read permission")
    _png(tmp_path / "a" / "ok.png")
    _png(tmp_path / "a" / "locked.png")
    _png(tmp_path / "b" / "ok.png")
    (tmp_path / "a" / "locked.png").chmod(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder = ImageFolder(tmp_path, image_size=8)
    assert sorted(p.name for p, _ in folder.samples) == ["ok.png", "ok.png"]
    assert any("locked.png" in str(w.message) for w in caught)
    (tmp_path / "b").chmod(0)
    try:
        with pytest.raises(FileNotFoundError, match="cannot list class folder"):
            ImageFolder(tmp_path, classes=["a", "b"], image_size=8)
    finally:
        (tmp_path / "b").chmod(0o755)


def test_header_dimensions_match_the_decoded_size(tmp_path):
    from cyconv.data.io import image_dimensions
    rng = np.random.default_rng(0)
    for suffix in (".png", ".jpg", ".bmp", ".webp", ".tif"):
        image = rng.integers(0, 256, (13, 21, 3), dtype=np.uint8)
        write(tmp_path / f"x{suffix}", image)
        assert image_dimensions((tmp_path / f"x{suffix}").read_bytes()) == (21, 13), suffix
    photos = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "images"
    for photo in sorted(photos.glob("*.jpg")):   # real camera JPEGs, EXIF and all
        assert image_dimensions(photo.read_bytes()) == cv2.imread(str(photo)).shape[1::-1]
