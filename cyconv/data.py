"""Data pipeline: image folders, splits, augmentation and a threaded batch loader.

Images travel as ``(H, W, 3)`` uint8 RGB arrays until the loader turns a batch
into a float32 ``(B, 3, H, W)`` array. This module is standalone: it needs only
numpy and OpenCV, never the compiled part of cyconv.

Typical use::

    data = ImageFolder("animals", image_size=64)
    train, valid, test = split_indices([label for _, label in data.samples])
    mean, std = compute_mean_std(data, train)
    loader = DataLoader(Subset(data, train), 32, shuffle=True, augment=Augment(),
                        mean=mean, std=std)
    for epoch in range(10):
        for x, y in loader:      # x (32, 3, 64, 64) float32, y (32,) int64
            ...
"""
import json
import math
import os
import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
LAYOUT = "root/<class>/*.jpg (one sub-folder per class holding its images)"
SHAPE_CLASSES = ("circle", "square", "triangle")


class CorruptImageError(ValueError):
    """An image file that cannot be decoded."""


# ---------------------------------------------------------------------------
# Reading images
# ---------------------------------------------------------------------------

def _as_size(image_size):
    """``int`` or ``(h, w)`` -> ``(h, w)`` tuple of positive ints."""
    h, w = (image_size, image_size) if np.isscalar(image_size) else image_size
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return int(h), int(w)


def resize(image, image_size):
    """Resize an ``(h, w, 3)`` image to ``image_size`` (int or ``(H, W)``).

    Uses ``cv2.INTER_AREA`` when shrinking and ``cv2.INTER_LINEAR`` when
    enlarging; returns the input unchanged when it already has that size.
    """
    h, w = _as_size(image_size)
    if image.shape[:2] == (h, w):
        return image
    shrinking = h <= image.shape[0] and w <= image.shape[1]
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def read_image(path, image_size=None):
    """Read an image file as an ``(H, W, 3)`` uint8 RGB array.

    Works with non-ASCII paths (the bytes are read by numpy, decoded by
    OpenCV). EXIF orientation is applied, grayscale is expanded to 3 channels,
    an alpha channel is dropped (not composited: transparent pixels keep
    their stored colour) and 16-bit or float images are scaled to 8 bits.
    With ``image_size`` (int or ``(H, W)``) the result is resized, see
    :func:`resize`. Raises :class:`CorruptImageError` when decoding fails.
    """
    # IMREAD_COLOR (not IMREAD_UNCHANGED) makes OpenCV apply EXIF orientation,
    # convert gray to BGR and drop alpha; IMREAD_ANYDEPTH keeps 16-bit data.
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as error:  # deleted, moved or unreadable since the folder was scanned
        raise CorruptImageError(f"cannot read image {path}: {error}") from error
    image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH) if data.size else None
    if image is None:
        raise CorruptImageError(f"cannot decode image {path}")
    if image.dtype != np.uint8:
        scale = 255.0 if image.dtype.kind == "f" else 255.0 / np.iinfo(image.dtype).max
        image = cv2.convertScaleAbs(image, alpha=scale)
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return image if image_size is None else resize(image, image_size)


def _jpeg_is_complete(data):
    """True when a JPEG byte string has an end-of-image marker after its first scan.

    Walks the header segments to the first start-of-scan so that the EXIF
    thumbnail's own end marker is not mistaken for the image's.
    """
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:  # start of scan
            return data.find(b"\xff\xd9", pos) >= 0
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return False


def _check_image_file(path):
    """Cheap test without decoding: None when ``path`` looks like a complete image, else why not."""
    data = path.read_bytes()
    if data.startswith(b"\xff\xd8\xff"):
        return None if _jpeg_is_complete(data) else "truncated or corrupt JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None if b"IEND" in data else "truncated PNG"
    if data[:2] == b"BM" or data[:4] in (b"II*\x00", b"MM\x00*") or \
            (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return None
    return "not an image (unknown file format)"


# ---------------------------------------------------------------------------
# Data sets: each has .classes, .image_size, len() and [i] -> (image, label)
# ---------------------------------------------------------------------------

class ImageFolder:
    """Images stored as ``root/<class>/<image file>``.

    ``classes``: the class names in label order; default: every sub-folder
    of ``root``, sorted alphabetically. ``image_size``: int or ``(H, W)``;
    every image is resized to it.

    Attributes: ``classes`` (list of str), ``samples`` (list of
    ``(Path, label)``), ``skipped`` (list of Path: files that were not
    readable images, each reported once with ``warnings.warn``).
    ``dataset[i]`` -> ``(image (H, W, 3) uint8 RGB, label int)``; an image
    that fails to decode then raises :class:`CorruptImageError` (the
    :class:`DataLoader` substitutes another one).
    """

    def __init__(self, root, classes=None, image_size=(224, 224)):
        self.root = Path(root)
        self.image_size = _as_size(image_size)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist; expected layout {LAYOUT}")
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if classes is None:
            if not folders:
                raise ValueError(f"{self.root} has no class sub-folders; expected layout {LAYOUT}")
            classes = folders
        self.classes = list(classes)
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be a non-empty list of distinct names, got {classes!r}")
        missing = [name for name in self.classes if name not in folders]
        if missing:
            raise FileNotFoundError(f"no folder for class(es) {missing} in {self.root}; expected layout {LAYOUT}")

        self.samples, self.skipped, self._bad = [], [], set()
        self._bad_lock = threading.Lock()
        empty = []
        for label, name in enumerate(self.classes):
            files = sorted(p for p in (self.root / name).iterdir()
                           if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            before = len(self.samples)
            for path in files:
                problem = _check_image_file(path)
                if problem:
                    self._skip(path, problem)
                else:
                    self.samples.append((path, label))
            if len(self.samples) == before:
                empty.append(str(self.root / name))
        if not self.samples:
            raise ValueError(f"no images found in {self.root}; expected layout {LAYOUT} "
                             f"with extensions {sorted(IMAGE_EXTENSIONS)}")
        if empty:
            raise ValueError(f"class folder(s) with no readable images: {empty}")

    def _skip(self, path, reason):
        self.skipped.append(path)
        warnings.warn(f"skipping {path}: {reason}", stacklevel=3)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        if index in self._bad:
            raise CorruptImageError(f"cannot decode image {path}")
        try:
            return read_image(path, self.image_size), label
        except CorruptImageError:
            with self._bad_lock:  # loader threads may meet the same bad file at once
                first_time = index not in self._bad
                self._bad.add(index)
            if first_time:
                self._skip(path, "cannot be read or decoded")
            raise


class ArrayDataset:
    """In-memory images: ``images`` (N, H, W, 3) uint8, ``labels`` (N,) ints, ``classes`` names.

    ``dataset[i]`` -> ``(images[i] (H, W, 3) uint8, label int)``, as :class:`ImageFolder`.
    """

    def __init__(self, images, labels, classes):
        images, labels = np.asarray(images), np.asarray(labels)
        if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
        if labels.shape != (len(images),):
            raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
        if len(labels) and not 0 <= labels.min() <= labels.max() < len(classes):
            raise ValueError(f"labels must lie in [0, {len(classes)})")
        self.images, self.labels, self.classes = images, labels.astype(np.int64), list(classes)
        self.image_size = images.shape[1:3]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], int(self.labels[index])


class Subset:
    """The items ``indices`` (1-D ints) of ``dataset``, renumbered 0..len-1."""

    def __init__(self, dataset, indices):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        self.classes, self.image_size = dataset.classes, dataset.image_size

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        return self.dataset[int(self.indices[index])]


# ---------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------

def split_indices(labels, ratios=(0.8, 0.1, 0.1), seed=0):
    """Stratified, reproducible train/valid/test split.

    ``labels``: (N,) class of each item. Each class is shuffled (seeded) and
    cut by ``ratios`` with rounding; a class with >= 3 items always gives at
    least one item to valid and to test (when their ratio is > 0).
    Returns ``(train_idx, valid_idx, test_idx)``: sorted int64 arrays that
    are disjoint and together cover ``range(N)``.
    """
    ratios = np.asarray(ratios, dtype=float)
    if ratios.shape != (3,) or ratios.min() < 0 or not math.isclose(ratios.sum(), 1.0):
        raise ValueError(f"ratios must be 3 non-negative numbers summing to 1, got {ratios.tolist()}")
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    parts = ([], [], [])
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n = len(members)
        n_valid, n_test = (int(round(n * r)) for r in ratios[1:])
        if n >= 3:
            n_valid, n_test = (max(count, 1) if r > 0 else count
                               for count, r in zip((n_valid, n_test), ratios[1:]))
        n_train = max(n - n_valid - n_test, 1 if ratios[0] > 0 else 0)
        n_valid = min(n_valid, n - n_train)
        for part, chunk in zip(parts, np.split(members, [n_train, n_train + n_valid])):
            part.append(chunk)
    return tuple(np.sort(np.concatenate(part)).astype(np.int64) for part in parts)


def save_split(path, dataset, train, valid, test):
    """Write a split of an :class:`ImageFolder` to a JSON file.

    Files are stored relative to ``dataset.root`` (as ``"<class>/<file>"``),
    so the split stays valid when the folder moves.
    """
    def relative(indices):
        return [dataset.samples[i][0].relative_to(dataset.root).as_posix() for i in np.asarray(indices)]

    split = {"classes": dataset.classes, "train": relative(train),
             "valid": relative(valid), "test": relative(test)}
    Path(path).write_text(json.dumps(split, indent=1, ensure_ascii=False), encoding="utf-8")


def load_split(path, dataset):
    """Read a split written by :func:`save_split` -> ``(train, valid, test)`` int64 index arrays.

    Raises ValueError when the classes differ and FileNotFoundError when a
    file of the split is not in ``dataset`` (deleted, or skipped as unreadable).
    """
    split = json.loads(Path(path).read_text(encoding="utf-8"))
    if split["classes"] != dataset.classes:
        raise ValueError(f"split {path} has classes {split['classes']}, the dataset {dataset.classes}")
    index = {p.relative_to(dataset.root).as_posix(): i for i, (p, _) in enumerate(dataset.samples)}
    missing = [f for name in ("train", "valid", "test") for f in split[name] if f not in index]
    if missing:
        raise FileNotFoundError(f"{len(missing)} file(s) of split {path} are not in {dataset.root}, "
                                f"e.g. {missing[:5]}")
    return tuple(np.array([index[f] for f in split[name]], dtype=np.int64)
                 for name in ("train", "valid", "test"))


# ---------------------------------------------------------------------------
# Augmentation and normalisation
# ---------------------------------------------------------------------------

class Augment:
    """Random training augmentation of one ``(H, W, 3)`` uint8 image.

    Each transform is applied with its probability, in this order:
    random resized crop (``crop``: a square-scaled crop of ``crop_scale``
    times each side, resized back), rotation (``rotate``: uniform angle in
    +-``max_angle`` degrees, reflected border), horizontal flip (``hflip``),
    vertical flip (``vflip``), brightness/contrast jitter (``color``: adds
    up to +-``brightness`` * 255 and scales the contrast around the image
    mean by a factor in 1 +- ``contrast``), background defocus (``defocus``:
    the image outside a random feathered ellipse covering the middle is
    replaced by a Gaussian blur of it, sigma ``defocus_sigma`` times the
    shorter side, as a shallow depth of field would render it), random erasing
    (``erase``: a rectangle of 2-25% of the area, aspect 1:3 to 3:1, filled
    with uniform noise; Zhong et al. 2017).  ``background`` works on a batch
    before these: see :meth:`swap_backgrounds` (the DataLoader calls it).

    Defocus is there because a shortcut is otherwise cheap: the bird photos
    (CUB) are close-ups with blurred backgrounds, the dog and panda photos
    mostly are not, and a network that learns "smooth background = bird" aims
    its Grad-CAM at the background.  Background swaps attack the same shortcut
    from both sides (birds in front of other classes' scenery, other animals in
    front of bird scenery), as Xiao et al. (2020) did for ImageNet.  Erasing
    makes a network that overfits look at more than one part of the animal.

    ``augment(image, rng)`` -> new image of the same shape and dtype; the
    input is never modified. The result depends only on ``image`` and the
    state of ``rng`` (a ``np.random.Generator``).
    """

    def __init__(self, hflip=0.5, vflip=0.0, crop=0.5, rotate=0.5, color=0.5, defocus=0.0,
                 erase=0.0, background=0.0, crop_scale=(0.7, 1.0), max_angle=15.0,
                 brightness=0.2, contrast=0.2, defocus_sigma=(0.01, 0.03)):
        self.probabilities = np.array([crop, rotate, hflip, vflip, color, defocus, erase],
                                      dtype=float)
        self.background = float(background)
        if min(self.probabilities.min(), self.background) < 0 or \
                max(self.probabilities.max(), self.background) > 1:
            raise ValueError("augmentation probabilities must lie in [0, 1]")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
        if not 0 < defocus_sigma[0] <= defocus_sigma[1]:
            raise ValueError(f"defocus_sigma must satisfy 0 < low <= high, got {defocus_sigma}")
        self.crop_scale, self.max_angle = crop_scale, max_angle
        self.brightness, self.contrast = brightness, contrast
        self.defocus_sigma = defocus_sigma

    def __call__(self, image, rng):
        crop, rotate, hflip, vflip, color, defocus, erase = rng.random(7) < self.probabilities
        h, w = image.shape[:2]
        if crop:
            scale = rng.uniform(*self.crop_scale)
            ch, cw = max(1, round(scale * h)), max(1, round(scale * w))
            y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            image = resize(image[y0:y0 + ch, x0:x0 + cw], (h, w))
        if rotate:
            angle = rng.uniform(-self.max_angle, self.max_angle)
            matrix = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), angle, 1.0)
            image = cv2.warpAffine(image, matrix, (w, h), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REFLECT)
        if hflip:
            image = cv2.flip(image, 1)
        if vflip:
            image = cv2.flip(image, 0)
        if color:
            gain = rng.uniform(1 - self.contrast, 1 + self.contrast)
            offset = rng.uniform(-self.brightness, self.brightness) * 255 + (1 - gain) * image.mean()
            table = np.clip(np.rint(np.arange(256) * gain + offset), 0, 255).astype(np.uint8)
            image = cv2.LUT(image, table)
        if defocus:
            image = self._defocus(image, rng)
        if erase:
            image = self._erase(image, rng)
        return image

    def _defocus(self, image, rng):
        """Blur the image outside a feathered ellipse around a point near its centre."""
        h, w = image.shape[:2]
        blurred = cv2.GaussianBlur(image, (0, 0), rng.uniform(*self.defocus_sigma) * min(h, w))
        return _blend(image, blurred, _middle_ellipse(h, w, (0.2, 0.4), rng))

    def swap_backgrounds(self, images, labels, segment, rng):
        """Batch step, before the per-image transforms: each image, with probability
        ``background``, keeps its foreground and takes the background of another
        image of the batch with a different label.

        ``segment(k)`` gives ``(mask, plate)`` of batch image ``k`` (see
        :func:`segment_foreground`); the swap is ``mask * image + (1 - mask) *
        plate of the partner``, so the animal of one photo stands in front of the
        scenery of another, whose own animal was painted out.  A background then
        tells nothing about the label.  ``images``: list of (H, W, 3) uint8
        (replaced in place, partners taken from the images before any swap);
        ``labels``: their labels.
        """
        labels = np.asarray(labels)
        sources = list(images)
        for i in np.nonzero(rng.random(len(images)) < self.background)[0]:
            others = np.nonzero(labels != labels[i])[0]
            if len(others) == 0:
                continue
            mask, _ = segment(i)
            _, partner_plate = segment(rng.choice(others))
            images[i] = _blend(sources[i], partner_plate, mask[..., None] / np.float32(255))

    @staticmethod
    def _erase(image, rng):
        """A copy with one random rectangle (2-25% of the area) filled with uniform noise."""
        h, w = image.shape[:2]
        area = rng.uniform(0.02, 0.25) * h * w
        aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3)))
        eh = min(h, max(1, round(np.sqrt(area * aspect))))
        ew = min(w, max(1, round(np.sqrt(area / aspect))))
        y0, x0 = rng.integers(0, h - eh + 1), rng.integers(0, w - ew + 1)
        image = image.copy()
        image[y0:y0 + eh, x0:x0 + ew] = rng.integers(0, 256, (eh, ew) + image.shape[2:],
                                                      dtype=np.uint8)
        return image


def _middle_ellipse(h, w, half_axes, rng):
    """(h, w, 1) weights of a random ellipse centred within +-10% of the middle
    (half-axes ``half_axes`` times the sides): see :func:`_ellipse`."""
    cy, cx = h * rng.uniform(0.4, 0.6), w * rng.uniform(0.4, 0.6)
    ry, rx = h * rng.uniform(*half_axes), w * rng.uniform(*half_axes)
    return _ellipse(h, w, cy, cx, ry, rx)[..., None]


def _ellipse(h, w, cy, cx, ry, rx):
    """(h, w) weights: 1 inside the ellipse (centre cy, cx; half-axes ry, rx), fading
    linearly to 0 at 1.5 times its size."""
    yy, xx = np.ogrid[:h, :w]
    distance = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    return np.clip(3 - 2 * distance, 0.0, 1.0)


def _blend(inside, outside, weight):
    """weight * inside + (1 - weight) * outside, as uint8."""
    return np.rint(weight * inside + (1 - weight) * outside).astype(np.uint8)


def segment_foreground(image, margin=1 / 16, iterations=3):
    """``(mask, plate)`` of the object in the middle of a photo, for background swaps.

    ``mask``: (H, W) uint8, 255 on the object, 0 on the background, found by
    GrabCut (Rother et al. 2004) started from the rectangle ``margin`` of each
    side inside the border (everything outside it is background), on a copy of
    at most 128 px a side; scaled back with linear interpolation, so the edge is
    soft.  ``plate``: (H, W, 3) uint8, the photo with the object painted out
    (OpenCV's Telea inpainting from its surroundings).  When GrabCut finds no
    object (or only object), a centred ellipse of 70% of the sides stands in.
    Deterministic: OpenCV's random generator of the calling thread is reseeded.
    Costs about 50 ms for a 128 px image (GrabCut dominates).
    """
    h, w = image.shape[:2]
    scale = min(1.0, 128 / max(h, w))
    small = resize(image, (max(1, round(h * scale)), max(1, round(w * scale))))
    sh, sw = small.shape[:2]
    my, mx = max(1, round(sh * margin)), max(1, round(sw * margin))
    labels = np.zeros((sh, sw), np.uint8)
    found = 0.0
    if sh > 2 * my + 1 and sw > 2 * mx + 1:
        cv2.setRNGSeed(0)
        cv2.grabCut(small, labels, (mx, my, sw - 2 * mx, sh - 2 * my), np.zeros((1, 65)),
                    np.zeros((1, 65)), iterations, cv2.GC_INIT_WITH_RECT)
        labels = ((labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)).astype(np.uint8)
        found = labels.mean()
    if not 0.01 <= found <= 0.95:   # nothing or everything: no usable segmentation
        labels = (_ellipse(sh, sw, sh / 2, sw / 2, 0.35 * sh, 0.35 * sw) >= 0.5).astype(np.uint8)
    mask = cv2.resize(labels * np.float32(255), (w, h), interpolation=cv2.INTER_LINEAR)
    mask = np.rint(mask).astype(np.uint8)
    # paint out a little more than the object, so that no rim of it stays in the plate
    hole = cv2.dilate((mask > 0).astype(np.uint8), np.ones((5, 5), np.uint8))
    plate = cv2.inpaint(np.ascontiguousarray(image), hole, 3, cv2.INPAINT_TELEA)
    return mask, plate


def normalize(images, mean=None, std=None):
    """``(B, H, W, 3)`` uint8 -> ``(B, 3, H, W)`` float32 C-contiguous ``(images/255 - mean)/std``.

    ``mean``/``std``: per-channel (3,) values in 0-1 scale; None means 0 and 1.
    """
    x = np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2), dtype=np.float32)
    mean = np.zeros(3) if mean is None else np.asarray(mean, dtype=float)
    std = np.ones(3) if std is None else np.asarray(std, dtype=float)
    x *= (1.0 / (255.0 * std)).astype(np.float32).reshape(1, 3, 1, 1)
    x -= (mean / std).astype(np.float32).reshape(1, 3, 1, 1)
    return x


def compute_mean_std(dataset, indices=None, batch_size=64, num_workers=2):
    """Per-channel mean and std, in 0-1 scale, of the images ``indices`` of ``dataset``.

    Use the train split only. Returns ``(mean, std)``, two (3,) float32 arrays.
    """
    subset = dataset if indices is None else Subset(dataset, indices)
    loader = DataLoader(subset, batch_size, num_workers=num_workers, cache=False)
    total, total_sq, count = np.zeros(3), np.zeros(3), 0
    for x, _ in loader:
        total += x.sum(axis=(0, 2, 3), dtype=np.float64)
        total_sq += np.square(x, dtype=np.float64).sum(axis=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
    return mean.astype(np.float32), std.astype(np.float32)


# ---------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------

def _available_memory():
    """Bytes of memory available (Linux ``MemAvailable``), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _yield_to_compute():
    """Lower the calling (loader) thread's scheduling priority (Linux: nice + 10).

    On a machine whose cores the kernels keep busy, a loader thread that takes a
    core from a kernel thread stalls the whole parallel loop at its next barrier;
    at a lower priority it runs in the gaps instead (a measured epoch: 1.11-1.24x
    the pure compute time at equal priority).  Elsewhere this does nothing.
    """
    try:
        thread = threading.get_native_id()
        nice = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, nice + 10))
    except (AttributeError, OSError):
        pass


class DataLoader:
    """Batches of a data set, decoded and augmented in background threads.

    Iterating yields ``(x, y)``: ``x`` (B, 3, H, W) float32 C-contiguous,
    normalised as :func:`normalize` with ``mean``/``std``; ``y`` (B,) int64.
    The last batch is smaller unless ``drop_last``.

    Determinism: epoch ``e`` uses the order
    ``default_rng([seed, e]).permutation(n)`` (when ``shuffle``) and augments
    item ``i`` with ``default_rng([seed, e, i])``, so batches are bitwise
    identical whatever ``num_workers`` and thread timing. Each iteration
    uses ``self.epoch`` and then advances it; ``set_epoch`` and
    ``state_dict``/``load_state_dict`` control it for an exact resume at an
    epoch boundary.

    ``num_workers`` threads build whole batches, ``num_workers + 2`` batches
    ahead of the consumer; 0 builds them in the calling thread. With
    ``cache`` the decoded, resized uint8 images are kept in memory after
    their first use; the foreground segmentations that background swaps
    need (about 50 ms each) always are; both when they fit in half the
    available memory.
    An image that cannot be decoded is replaced by the next readable item
    of the data set (warned once by the data set).
    """

    def __init__(self, dataset, batch_size, shuffle=False, augment=None, seed=0, drop_last=False,
                 mean=None, std=None, num_workers=2, cache=True):
        if batch_size < 1 or num_workers < 0:
            raise ValueError("batch_size must be >= 1 and num_workers >= 0")
        self.dataset, self.batch_size, self.shuffle = dataset, int(batch_size), shuffle
        self.augment, self.seed, self.drop_last = augment, int(seed), drop_last
        self.mean, self.std, self.num_workers = mean, std, num_workers
        self.epoch = 0
        h, w = dataset.image_size
        swaps = augment is not None and augment.background > 0
        # bytes per image: the decoded image (3 per pixel), its mask and plate (4 per pixel)
        needed = len(dataset) * h * w * ((3 if cache else 0) + (4 if swaps else 0))
        available = _available_memory()
        fits = available is None or needed <= available // 2
        self._cache = {} if cache and fits else None
        self._segments = {} if swaps and fits else None

    def __len__(self):
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch):
        """Make the next iteration produce epoch ``epoch``."""
        self.epoch = int(epoch)

    def state_dict(self):
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state):
        self.epoch, self.seed = int(state["epoch"]), int(state["seed"])

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        n = len(self.dataset)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        batches = [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(len(self))]
        if self.num_workers == 0:
            for batch in batches:
                yield self._make_batch(batch, epoch)
            return
        with ThreadPoolExecutor(self.num_workers, initializer=_yield_to_compute) as pool:
            pending = deque()
            try:
                for batch in batches:
                    pending.append(pool.submit(self._make_batch, batch, epoch))
                    if len(pending) > self.num_workers + 2:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()

    def _make_batch(self, indices, epoch):
        items = [self._load(int(index)) for index in indices]
        images, labels = [image for image, _ in items], [label for _, label in items]
        if self.augment is not None and self.augment.background > 0:
            # seeded per batch, apart from the per-item seeds (first index + data set size)
            rng = np.random.default_rng([self.seed, epoch, len(self.dataset) + int(indices[0])])
            # segmented from the decoded images: `images` fills with composites as it goes
            self.augment.swap_backgrounds(
                images, labels, lambda k: self._segmented(int(indices[k]), items[k][0]), rng)
        if self.augment is not None:
            images = [self.augment(image, np.random.default_rng([self.seed, epoch, int(index)]))
                      for image, index in zip(images, indices)]
        return normalize(np.stack(images), self.mean, self.std), np.array(labels, dtype=np.int64)

    def _segmented(self, index, image):
        """:func:`segment_foreground` of item ``index`` (its decoded ``image``), cached
        alongside the decoded images."""
        if self._segments is None:
            return segment_foreground(image)
        segmented = self._segments.get(index)
        if segmented is None:
            segmented = self._segments[index] = segment_foreground(image)
        return segmented

    def _load(self, index):
        """Item ``index``, or the next readable one when it cannot be decoded."""
        n = len(self.dataset)
        for k in range(n):
            try:
                return self._cached((index + k) % n)
            except CorruptImageError:
                continue
        raise CorruptImageError("no image of the data set can be decoded")

    def _cached(self, index):
        if self._cache is None:
            return self.dataset[index]
        item = self._cache.get(index)
        if item is None:
            item = self._cache[index] = self.dataset[index]
        return item


# ---------------------------------------------------------------------------
# Generated data set
# ---------------------------------------------------------------------------

def _draw_shape(label, h, w, rng):
    """One (h, w, 3) uint8 image: shape ``SHAPE_CLASSES[label]`` on a plain background."""
    background = rng.integers(0, 101, 3)  # dark background, bright shape: always visible
    colour = rng.integers(155, 256, 3)
    image = np.empty((h, w, 3), np.uint8)
    image[:] = background.astype(np.uint8)
    radius = rng.uniform(0.22, 0.4) * min(h, w)
    centre = rng.uniform([radius, radius], [w - radius, h - radius])
    colour = tuple(int(c) for c in colour)
    shift = 4  # OpenCV fixed-point bits: sub-pixel positions
    if SHAPE_CLASSES[label] == "circle":
        cv2.circle(image, tuple(np.rint(centre * 2 ** shift).astype(int).tolist()),
                   int(round(radius * 2 ** shift)), colour, -1, cv2.LINE_AA, shift)
    else:
        corners = 4 if SHAPE_CLASSES[label] == "square" else 3
        angles = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(corners) / corners
        points = centre + radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        cv2.fillPoly(image, [np.rint(points * 2 ** shift).astype(np.int32)], colour, cv2.LINE_AA, shift)
    return image


def make_shapes(n, image_size=32, seed=0):
    """Generated images of circles, squares and triangles.

    Each image has one bright shape of random colour, size, rotation and
    position on a random dark plain background, plus Gaussian noise (sigma 8). Classes are
    balanced (counts differ by at most one) and the result depends only on
    ``(n, image_size, seed)``.
    Returns ``(images (n, H, W, 3) uint8, labels (n,) int64, classes)`` with
    ``classes == ['circle', 'square', 'triangle']``.
    """
    h, w = _as_size(image_size)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(SHAPE_CLASSES)).astype(np.int64)
    images = np.stack([_draw_shape(label, h, w, rng) for label in labels]) if n else \
        np.empty((0, h, w, 3), np.uint8)
    noise = rng.standard_normal(images.shape, dtype=np.float32) * 8
    images = np.clip(images + noise, 0, 255).round().astype(np.uint8)
    return images, labels, list(SHAPE_CLASSES)
