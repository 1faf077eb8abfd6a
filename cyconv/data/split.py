"""Stratified, reproducible train/valid/test splits, and their split.json files."""
import json
import math
import warnings
from pathlib import Path

import numpy as np

from cyconv.files import atomic_write


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
        raise ValueError(f"ratios must be 3 non-negative numbers summing to 1, "
                         f"got {ratios.tolist()}")
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
        short = [name for name, count, r in zip(("valid", "test"), (n_valid, n_test), ratios[1:])
                 if r > 0 and count == 0]
        if short:
            warnings.warn(f"split_indices: class {cls!r} has {n} item(s), too few to give one "
                          f"to {' and '.join(short)} (3 are needed): its accuracy there cannot "
                          "be measured", stacklevel=2)
    return tuple(np.sort(np.concatenate(part)).astype(np.int64) for part in parts)


def save_split(path, dataset, train, valid, test):
    """Write a split of an :class:`ImageFolder` to a JSON file.

    Files are stored relative to ``dataset.root`` (as ``"<class>/<file>"``),
    so the split stays valid when the folder moves.
    """
    def relative(indices):
        return [dataset.samples[i][0].relative_to(dataset.root).as_posix()
                for i in np.asarray(indices)]

    split = {"classes": dataset.classes, "train": relative(train),
             "valid": relative(valid), "test": relative(test)}
    atomic_write(path, json.dumps(split, indent=1, ensure_ascii=False).encode("utf-8"))


def load_split(path, dataset):
    """Read a split written by :func:`save_split` -> ``(train, valid, test)`` int64 index arrays.

    Raises ValueError when the classes differ and FileNotFoundError when a
    file of the split is not in ``dataset`` (deleted, or skipped as unreadable).
    """
    try:
        split = json.loads(Path(path).read_text(encoding="utf-8"))
        valid = isinstance(split, dict) and all(
            isinstance(split.get(k), list) for k in ("classes", "train", "valid", "test"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"split {path} cannot be read: {error}") from None
    if not valid:
        raise ValueError(f"split {path} is not a split file (expected the lists 'classes', "
                         "'train', 'valid' and 'test')")
    if split["classes"] != dataset.classes:
        raise ValueError(f"split {path} has classes {split['classes']}, the dataset "
                         f"{dataset.classes}")
    index = {p.relative_to(dataset.root).as_posix(): i for i, (p, _) in enumerate(dataset.samples)}
    missing = [f for name in ("train", "valid", "test") for f in split[name] if f not in index]
    if missing:
        raise FileNotFoundError(f"{len(missing)} file(s) of split {path} are not in "
                                f"{dataset.root}, e.g. {missing[:5]}")
    return tuple(np.array([index[f] for f in split[name]], dtype=np.int64)
                 for name in ("train", "valid", "test"))


# ---------------------------------------------------------------------------
# Augmentation and normalisation
# ---------------------------------------------------------------------------
