"""DataLoader: batches decoded and augmented in background threads, deterministic."""
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cyconv.data.datasets import Subset
from cyconv.data.io import CorruptImageError, as_size, normalize, resize
from cyconv.data.segment import segment_foreground


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
    normalised as :func:`normalize` with ``mean``/``std``; ``y`` (B,) int64
    labels, or with an ``augment`` whose ``cutmix`` is above 0 (B, C) float32
    class probabilities (what :class:`cyconv.nn.CrossEntropyLoss` takes), C =
    ``len(dataset.classes)``.  The last batch is smaller unless ``drop_last``.

    Determinism: epoch ``e`` uses the order
    ``default_rng([seed, e]).permutation(n)`` (when ``shuffle``) and augments
    item ``i`` with ``default_rng([seed, e, i])`` (its CutMix with
    ``default_rng([seed, e, i, 1])``), so batches are bitwise
    identical whatever ``num_workers`` and thread timing. Each iteration
    uses ``self.epoch`` and then advances it; ``set_epoch`` and
    ``state_dict``/``load_state_dict`` control it for an exact resume at an
    epoch boundary.

    ``image_size``: ``None`` (the data set's), an int or ``(H, W)``, or a function of
    the epoch giving one (e.g. :class:`ProgressiveSize`): the size of that epoch's
    images, each resized (with an ``augment``, by it: see :class:`Augment`).

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
                 mean=None, std=None, num_workers=2, cache=True, image_size=None):
        for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"DataLoader: {name} must be an int >= {low}, got {value!r}")
        self.dataset, self.batch_size, self.shuffle = dataset, int(batch_size), shuffle
        self.augment, self.seed, self.drop_last = augment, int(seed), drop_last
        self.mean, self.std, self.num_workers = mean, std, num_workers
        self.epoch = 0
        if image_size is not None and not callable(image_size):
            as_size(image_size)   # refused here rather than in a worker thread
        self.image_size = image_size
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

    def _order(self, epoch):
        """The data set's indices in the order of epoch ``epoch``."""
        n = len(self.dataset)
        return (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                else np.arange(n))

    def _batches(self, epoch):
        """The indices of each batch of epoch ``epoch`` (cyconv.distributed.ShardedLoader
        takes its rank's part of each batch instead)."""
        order = self._order(epoch)
        return [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(len(self))]

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        batches = self._batches(epoch)
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
        labels = np.array(labels, dtype=np.int64)
        size = self._image_size(epoch)
        if self.augment is not None:
            images = [self.augment(image, np.random.default_rng([self.seed, epoch, int(index)]),
                                   size)
                      for image, index in zip(images, indices)]
            if self.augment.cutmix > 0:
                labels = self._cut_mix(images, labels, indices, epoch, size)
        elif size is not None:
            images = [resize(image, size) for image in images]
        return normalize(np.stack(images), self.mean, self.std), labels

    def _image_size(self, epoch):
        """(H, W) of epoch ``epoch``'s images, or None for the data set's own."""
        size = self.image_size(epoch) if callable(self.image_size) else self.image_size
        return None if size is None else as_size(size)

    def _cut_mix(self, images, labels, indices, epoch, size):
        """Each augmented image of the batch, with probability ``augment.cutmix``, gets a
        box of another training image, augmented (:meth:`Augment.cut_mix`; ``images``
        change in place).  Returns the (B, C) float32 class probabilities, mixed by area.

        The partner is drawn from the whole data set, not the batch, so that an image's
        mix does not depend on the batch it is in (nor on a rank's part of it).
        """
        targets = np.zeros((len(labels), len(self.dataset.classes)), np.float32)
        targets[np.arange(len(labels)), labels] = 1
        for k, index in enumerate(indices):
            rng = np.random.default_rng([self.seed, epoch, int(index), 1])
            if rng.random() >= self.augment.cutmix:
                continue
            partner, partner_label = self._load(int(rng.integers(len(self.dataset))))
            images[k], kept = self.augment.cut_mix(images[k], self.augment(partner, rng, size),
                                                   rng)
            targets[k] *= np.float32(kept)
            targets[k, partner_label] += np.float32(1 - kept)
        return targets

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
