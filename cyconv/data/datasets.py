"""Data sets: each has ``.classes``, ``.image_size``, ``len()`` and ``[i] -> (image, label)``
with the image an ``(H, W, 3)`` uint8 RGB array."""
import copy
import threading
import warnings
from pathlib import Path

import numpy as np

from cyconv.data.io import (
    IMAGE_EXTENSIONS,
    CorruptImageError,
    as_crop_fraction,
    as_size,
    check_image_file,
    read_image,
)

LAYOUT = "root/<class>/*.jpg (one sub-folder per class holding its images)"


class ImageFolder:
    """Images stored as ``root/<class>/<image file>``.

    ``classes``: the class names in label order; default: every sub-folder
    of ``root``, sorted alphabetically (a sub-folder that cannot be read is
    skipped with a warning). ``image_size``: int or ``(H, W)``; every image is
    resized to it.  ``center_crop`` < 1: each image is first cut to the middle
    ``center_crop`` of each side (the evaluation view of a model that carries
    that preprocessing; :meth:`with_center_crop` gives that view of the same files).

    Attributes: ``classes`` (list of str), ``samples`` (list of
    ``(Path, label)``), ``skipped`` (list of Path: files that were not
    readable images, each reported once with ``warnings.warn``: corrupt,
    truncated, unreadable, not regular files, or over the pixel cap).
    ``dataset[i]`` -> ``(image (H, W, 3) uint8 RGB, label int)``; an image
    that fails to decode then raises :class:`CorruptImageError` (the
    :class:`DataLoader` substitutes another one).
    """

    def __init__(self, root, classes=None, image_size=(224, 224), center_crop=1.0):
        self.root = Path(root)
        self.image_size = as_size(image_size)
        self.center_crop = as_crop_fraction(center_crop)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a folder; "
                                    f"expected layout {LAYOUT}")
        self.samples, self.skipped, self._bad = [], [], set()
        self._bad_lock = threading.Lock()
        self.classes = self._choose_classes(classes)
        empty = []
        for label, name in enumerate(self.classes):
            before = len(self.samples)
            for path in self._image_files(self.root / name, explicit=classes is not None):
                problem = check_image_file(path)
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

    def _choose_classes(self, classes):
        try:
            folders = sorted(p.name for p in self.root.iterdir()
                             if p.is_dir() and not p.name.startswith("."))
        except OSError as error:
            raise FileNotFoundError(f"cannot list {self.root}: {error.strerror or error}") from None
        if classes is None:
            if not folders:
                raise ValueError(f"{self.root} has no class sub-folders; expected layout {LAYOUT}")
            classes = folders
        classes = list(classes)
        if not classes or len(set(classes)) != len(classes) or not all(
                isinstance(c, str) and c and "/" not in c for c in classes):
            raise ValueError(f"classes must be a non-empty list of distinct folder names, "
                             f"got {classes!r}")
        missing = [name for name in classes if name not in folders]
        if missing:
            raise FileNotFoundError(f"no folder for class(es) {missing} in {self.root}; "
                                    f"expected layout {LAYOUT}")
        return classes

    def _image_files(self, folder, explicit):
        """The image files of a class folder, sorted; an unreadable folder is an error when
        the class was asked for, else skipped with a warning (its class then has none)."""
        try:
            return sorted(p for p in folder.iterdir()
                          if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        except OSError as error:
            if explicit:
                raise FileNotFoundError(f"cannot list class folder {folder}: "
                                        f"{error.strerror or error}") from None
            self._skip(folder, f"cannot list it ({error.strerror or error})")
            return []

    def _skip(self, path, reason):
        self.skipped.append(path)
        warnings.warn(f"skipping {path}: {reason}", stacklevel=3)

    def with_center_crop(self, fraction):
        """The same files (and record of unreadable ones) seen through a centre crop of
        ``fraction`` of each side, e.g. the valid and test view of a training folder."""
        view = copy.copy(self)
        view.center_crop = as_crop_fraction(fraction)
        return view

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        if index in self._bad:
            raise CorruptImageError(f"cannot decode image {path}")
        try:
            return read_image(path, self.image_size, center_crop=self.center_crop), label
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
            raise ValueError(f"images must be (N, H, W, 3) uint8, got {images.shape} "
                             f"{images.dtype}")
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
