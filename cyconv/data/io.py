"""Reading, bounding, resizing and normalising images.

Images travel as ``(H, W, 3)`` uint8 RGB arrays until :func:`normalize` turns a
batch into a float32 ``(B, 3, H, W)`` array.  What one image may cost is capped
before it is decoded, from its header, as Pillow's MAX_IMAGE_PIXELS does:
:func:`set_max_image_pixels` raises the cap.
"""
import os
import stat
from io import BytesIO

import numpy as np

from cyconv._opencv import cv2

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
# Images larger than this are refused before decoding (an 8000x8000 photo is 64 million).
_limits = {"pixels": 100_000_000}
# Bytes read from each end of a file to check that it is a complete image.
_PROBE_BYTES = 1 << 20
MAX_SIDE = 65_535   # no image format here stores more


class CorruptImageError(ValueError):
    """An image file that cannot be read or decoded."""


class ImageTooLargeError(CorruptImageError):
    """An image whose pixel count is over the cap (see :func:`set_max_image_pixels`)."""


def set_max_image_pixels(pixels):
    """Refuse images of more than ``pixels`` pixels (default 100 million) before decoding."""
    if isinstance(pixels, bool) or not isinstance(pixels, (int, np.integer)) or pixels < 1:
        raise ValueError(f"set_max_image_pixels: expected a positive int, got {pixels!r}")
    _limits["pixels"] = int(pixels)


def max_image_pixels():
    return _limits["pixels"]


def as_size(image_size):
    """``int`` or ``(h, w)`` -> ``(h, w)`` tuple of ints from 1 to MAX_SIDE."""
    try:
        h, w = (image_size, image_size) if np.isscalar(image_size) else image_size
        valid = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                    and 1 <= v <= MAX_SIDE for v in (h, w))
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"image_size must be an int or an (H, W) pair from 1 to {MAX_SIDE}, "
                         f"got {image_size!r}")
    return int(h), int(w)


def resize(image, image_size, interpolation="area"):
    """Resize an ``(h, w, 3)`` image to ``image_size`` (int or ``(H, W)``).

    ``interpolation="area"``: ``cv2.INTER_AREA`` when shrinking, ``cv2.INTER_LINEAR``
    when enlarging; ``"linear"``: ``cv2.INTER_LINEAR`` always (cv2.resize's default).
    Returns the input unchanged when it already has that size.
    """
    h, w = as_size(image_size)
    if image.shape[:2] == (h, w):
        return image
    shrinking = h <= image.shape[0] and w <= image.shape[1]
    flag = cv2.INTER_AREA if shrinking and interpolation == "area" else cv2.INTER_LINEAR
    return cv2.resize(image, (w, h), interpolation=flag)


def as_crop_fraction(fraction):
    """``fraction`` as a float in (0, 1] (the share of each side a centre crop keeps)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.integer,
                                                               np.floating)) \
            or not 0 < fraction <= 1:
        raise ValueError(f"center_crop must be a number in (0, 1], got {fraction!r}")
    return float(fraction)


def center_box(height, width, fraction):
    """``(top, left, h, w)`` of the middle ``fraction`` of each side of a ``height`` x
    ``width`` image (at least one pixel; an odd margin puts the extra pixel below and
    right)."""
    fraction = as_crop_fraction(fraction)
    h, w = max(1, round(height * fraction)), max(1, round(width * fraction))
    return (height - h) // 2, (width - w) // 2, h, w


def crop_center(image, fraction):
    """The middle ``fraction`` x ``fraction`` of an ``(H, W, 3)`` image (a view), as
    torchvision's resize-then-CenterCrop evaluation sees it, before the resize."""
    top, left, h, w = center_box(*image.shape[:2], fraction)
    return image[top:top + h, left:left + w]


def _read_regular_file(path):
    """The bytes of ``path``; CorruptImageError unless it is a regular file (a FIFO would
    block forever) of a size an image of the allowed pixel count can have."""
    try:
        info = os.stat(path)
    except OSError as error:
        raise CorruptImageError(f"cannot read image {path}: {error.strerror or error}") from None
    if not stat.S_ISREG(info.st_mode):
        raise CorruptImageError(f"cannot read image {path}: not a regular file")
    if info.st_size > 16 * max_image_pixels() + _PROBE_BYTES:
        raise ImageTooLargeError(f"image {path} is {info.st_size} bytes, more than an image of "
                                 f"{max_image_pixels()} pixels takes (see "
                                 "cyconv.data.set_max_image_pixels)")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as error:
        raise CorruptImageError(f"cannot read image {path}: {error.strerror or error}") from None


def image_dimensions(data):
    """(width, height) from an image's header, without decoding it (None: unknown format).

    PNG and JPEG headers are read here (Pillow refuses to report the size of a very
    large image); the other formats through Pillow's lazy open.
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data.startswith(b"\xff\xd8"):
        return _jpeg_dimensions(data)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(BytesIO(data)) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def _jpeg_dimensions(data):
    """(width, height) from the first start-of-frame marker of a JPEG (None: none found)."""
    pos = 2
    while pos + 9 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):   # SOF0..SOF15
            return (int.from_bytes(data[pos + 7:pos + 9], "big"),
                    int.from_bytes(data[pos + 5:pos + 7], "big"))
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def decode_image(data, where="image"):
    """The ``(H, W, 3)`` uint8 RGB image encoded in ``data`` (bytes), its pixel count
    checked against the cap from the header before decoding."""
    size = image_dimensions(data)
    if size is not None and size[0] * size[1] > max_image_pixels():
        raise ImageTooLargeError(f"{where} is {size[0]}x{size[1]} pixels, over the limit of "
                                 f"{max_image_pixels()} (cyconv.data.set_max_image_pixels "
                                 "raises it)")
    # IMREAD_COLOR (not IMREAD_UNCHANGED) makes OpenCV apply EXIF orientation,
    # convert gray to BGR and drop alpha; IMREAD_ANYDEPTH keeps 16-bit data.
    array = np.frombuffer(data, np.uint8)
    image = cv2.imdecode(array, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH) if array.size else None
    if image is None:
        raise CorruptImageError(f"cannot decode {where}")
    if image.dtype != np.uint8:
        scale = 255.0 if image.dtype.kind == "f" else 255.0 / np.iinfo(image.dtype).max
        image = cv2.convertScaleAbs(image, alpha=scale)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_image(path, image_size=None, interpolation="area", center_crop=1.0):
    """Read an image file as an ``(H, W, 3)`` uint8 RGB array.

    Works with non-ASCII paths (the bytes are read by Python, decoded by
    OpenCV).  EXIF orientation is applied, grayscale is expanded to 3 channels,
    an alpha channel is dropped (not composited: transparent pixels keep their
    stored colour) and 16-bit or float images are scaled to 8 bits.  With
    ``image_size`` (int or ``(H, W)``) the result is resized, see :func:`resize`;
    ``center_crop`` < 1 keeps only the middle of the photo first (:func:`crop_center`).
    Raises :class:`CorruptImageError` when the path is not a regular file or
    cannot be read or decoded, :class:`ImageTooLargeError` over the pixel cap.
    """
    image = decode_image(_read_regular_file(path), f"image {path}")
    if center_crop != 1:
        image = crop_center(image, center_crop)
    return image if image_size is None else resize(image, image_size, interpolation)


def _jpeg_is_complete(head, tail):
    """True when a JPEG (its first and last bytes) has an end-of-image marker after its
    first scan.  Walks the header segments to the first start-of-scan so that the EXIF
    thumbnail's own end marker is not mistaken for the image's."""
    pos = 2
    while pos + 4 <= len(head) and head[pos] == 0xFF:
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:  # start of scan
            return head.find(b"\xff\xd9", pos) >= 0 or b"\xff\xd9" in tail
        pos += 2 + int.from_bytes(head[pos + 2:pos + 4], "big")
    return False


def check_image_file(path):
    """Cheap test without decoding: None when ``path`` looks like a complete image of an
    allowed size, else why not.  Reads at most the first and the last megabyte."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            return "not a regular file"
        with open(path, "rb") as f:
            head = f.read(_PROBE_BYTES)
            f.seek(max(len(head), info.st_size - _PROBE_BYTES))
            tail = f.read(_PROBE_BYTES)
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    size = image_dimensions(head)
    if size is not None and size[0] * size[1] > max_image_pixels():
        return (f"{size[0]}x{size[1]} pixels, over the limit of {max_image_pixels()} "
                "(cyconv.data.set_max_image_pixels raises it)")
    if head.startswith(b"\xff\xd8\xff"):
        return None if _jpeg_is_complete(head, tail) else "truncated or corrupt JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return None if b"IEND" in (tail or head) else "truncated PNG"
    if head[:2] == b"BM" or head[:4] in (b"II*\x00", b"MM\x00*") or \
            (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return None
    return "not an image (unknown file format)"


def normalize(images, mean=None, std=None, channel_order="RGB"):
    """``(B, H, W, 3)`` uint8 RGB -> ``(B, 3, H, W)`` float32 ``(images/255 - mean)/std``.

    ``mean``/``std``: per-channel (3,) values in 0-1 scale, in ``channel_order``; None
    means 0 and 1.  ``channel_order="BGR"`` reverses the channels first (a model
    trained on OpenCV's BGR order).
    """
    images = np.asarray(images)
    if channel_order == "BGR":
        images = images[..., ::-1]
    x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
    mean = np.zeros(3) if mean is None else np.asarray(mean, dtype=float)
    std = np.ones(3) if std is None else np.asarray(std, dtype=float)
    x *= (1.0 / (255.0 * std)).astype(np.float32).reshape(1, 3, 1, 1)
    x -= (mean / std).astype(np.float32).reshape(1, 3, 1, 1)
    return x
