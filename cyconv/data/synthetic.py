"""A generated data set of circles, squares and triangles (nothing to download)."""
import numpy as np

from cyconv._opencv import cv2
from cyconv.data.io import as_size

SHAPE_CLASSES = ("circle", "square", "triangle")


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
        cv2.fillPoly(image, [np.rint(points * 2 ** shift).astype(np.int32)], colour, cv2.LINE_AA,
                     shift)
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
    h, w = as_size(image_size)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(SHAPE_CLASSES)).astype(np.int64)
    images = np.stack([_draw_shape(label, h, w, rng) for label in labels]) if n else \
        np.empty((0, h, w, 3), np.uint8)
    noise = rng.standard_normal(images.shape, dtype=np.float32) * 8
    images = np.clip(images + noise, 0, 255).round().astype(np.uint8)
    return images, labels, list(SHAPE_CLASSES)
