"""Pictures of what a model computed: heat maps over photos, text bands, softmax."""
import numpy as np

from cyconv._opencv import cv2


def softmax(logits):
    """Row-wise softmax (N, classes) in float64, stable for large logits."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def overlay(image, heatmap, alpha=0.45, text=None, colormap=cv2.COLORMAP_JET):
    """The photo with the heat map blended over it: ``(H, W, 3)`` uint8 RGB.

    ``image``: (H, W, 3) uint8 RGB; ``heatmap``: values in [0, 1] of any size
    (resized to the image's).  The map is coloured with ``colormap`` (jet: red
    = high) and mixed as ``(1 - alpha) * image + alpha * colour``.  ``text``
    (optional) is written at the top left on a dark band.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"overlay: expected an (H, W, 3) uint8 RGB image, got {image.shape} "
                         f"{image.dtype}")
    h, w = image.shape[:2]
    heat = np.asarray(heatmap, np.float32)
    if heat.shape != (h, w):
        heat = cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR)
    colour = cv2.applyColorMap(np.round(np.clip(heat, 0, 1) * 255).astype(np.uint8), colormap)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB)
    blended = cv2.addWeighted(image, 1.0 - alpha, colour, alpha, 0.0)
    if text:
        put_label(blended, text)
    return blended


def put_label(image, text, scale=None, bottom=False):
    """Write ``text`` in white on a dark band at the top left (or bottom left) of
    ``image``, in place."""
    h, w = image.shape[:2]
    scale = scale or max(0.45, min(h, w) / 400)
    thickness = max(1, round(scale * 2))
    font = cv2.FONT_HERSHEY_SIMPLEX
    (tw, th), base = cv2.getTextSize(text, font, scale, thickness)
    margin = max(3, round(6 * scale))
    while tw + 2 * margin > w and scale > 0.2:        # shrink to fit the width
        scale *= max(0.5, min(0.97, (w - 2 * margin) / tw))
        thickness = max(1, round(scale * 2))
        (tw, th), base = cv2.getTextSize(text, font, scale, thickness)
    band_h = th + base + 2 * margin
    top = h - band_h if bottom else 0
    band = image[max(0, top):top + band_h, :min(w, tw + 2 * margin)]
    band[...] = (band * 0.35).astype(np.uint8)
    cv2.putText(image, text, (margin, top + margin + th), font, scale, (255, 255, 255),
                thickness, cv2.LINE_AA)
    return image
