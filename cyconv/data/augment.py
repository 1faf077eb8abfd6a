"""Training augmentation of single images and the background swap between images."""
import numpy as np

from cyconv._opencv import cv2
from cyconv.data.io import as_size, resize
from cyconv.data.segment import blend, middle_ellipse


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
    ``cutmix`` works after them: with that probability the DataLoader pastes a box
    of another augmented training image into the image and mixes the two labels by
    area (:meth:`cut_mix`; Yun et al. 2019), the box's share of the area drawn from
    Beta(``cutmix_alpha``, ``cutmix_alpha``).

    Defocus is there because a shortcut is otherwise cheap: the bird photos
    (CUB) are close-ups with blurred backgrounds, the dog and panda photos
    mostly are not, and a network that learns "smooth background = bird" aims
    its Grad-CAM at the background.  Background swaps attack the same shortcut
    from both sides (birds in front of other classes' scenery, other animals in
    front of bird scenery), as Xiao et al. (2020) did for ImageNet.  Erasing
    makes a network that overfits look at more than one part of the animal.
    CutMix does too, and its mixed labels keep it from growing too sure of any
    one training photo.

    ``augment(image, rng)`` -> new image of the same shape and dtype; the
    input is never modified. The result depends only on ``image`` and the
    state of ``rng`` (a ``np.random.Generator``).  ``augment(image, rng, size)``
    gives an image of ``size`` (int or ``(H, W)``) instead, for progressive
    resizing (:class:`ProgressiveSize`): the crop is resized straight to it, an
    uncropped image first, and the other transforms work at that size.
    """

    def __init__(self, hflip=0.5, vflip=0.0, crop=0.5, rotate=0.5, color=0.5, defocus=0.0,
                 erase=0.0, background=0.0, crop_scale=(0.7, 1.0), max_angle=15.0,
                 brightness=0.2, contrast=0.2, defocus_sigma=(0.01, 0.03), cutmix=0.0,
                 cutmix_alpha=1.0):
        self.probabilities = np.array([crop, rotate, hflip, vflip, color, defocus, erase],
                                      dtype=float)
        self.background, self.cutmix = float(background), float(cutmix)
        chances = np.append(self.probabilities, [self.background, self.cutmix])
        if not np.all((chances >= 0) & (chances <= 1)):
            raise ValueError(f"augmentation probabilities must lie in [0, 1], got "
                             f"{chances.tolist()}")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
        if not 0 < defocus_sigma[0] <= defocus_sigma[1] <= 1:
            raise ValueError(f"defocus_sigma must satisfy 0 < low <= high <= 1 (times the "
                             f"shorter side), got {defocus_sigma}")
        for name, value, high in (("max_angle", max_angle, 180), ("brightness", brightness, 1),
                                  ("contrast", contrast, 1)):
            if not 0 <= value <= high:
                raise ValueError(f"{name} must lie in [0, {high}], got {value!r}")
        if not 0 < cutmix_alpha <= 100:
            raise ValueError(f"cutmix_alpha must lie in (0, 100], got {cutmix_alpha!r}")
        self.crop_scale, self.max_angle = tuple(crop_scale), float(max_angle)
        self.brightness, self.contrast = float(brightness), float(contrast)
        self.defocus_sigma, self.cutmix_alpha = tuple(defocus_sigma), float(cutmix_alpha)

    def __call__(self, image, rng, size=None):
        crop, rotate, hflip, vflip, color, defocus, erase = rng.random(7) < self.probabilities
        h, w = image.shape[:2]
        size = (h, w) if size is None else as_size(size)
        if crop:
            scale = rng.uniform(*self.crop_scale)
            ch, cw = max(1, round(scale * h)), max(1, round(scale * w))
            y0, x0 = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            image = resize(image[y0:y0 + ch, x0:x0 + cw], size)
        else:
            image = resize(image, size)
        h, w = size
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
            offset = (rng.uniform(-self.brightness, self.brightness) * 255
                      + (1 - gain) * image.mean())
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
        return blend(image, blurred, middle_ellipse(h, w, (0.2, 0.4), rng))

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
            images[i] = blend(sources[i], partner_plate, mask[..., None] / np.float32(255))

    def cut_mix(self, image, partner, rng):
        """Batch step, after the per-image transforms: a copy of ``image`` with a box of
        ``partner`` (same shape) pasted in, and the share of ``image`` kept (a float).

        The box covers 1 - lam of the area, lam ~ Beta(cutmix_alpha, cutmix_alpha),
        with the image's aspect ratio; its centre is uniform over the image and the
        part outside is cut off, so the share kept is counted after the cut.
        """
        h, w = image.shape[:2]
        side = np.sqrt(1 - rng.beta(self.cutmix_alpha, self.cutmix_alpha))
        bh, bw = round(side * h), round(side * w)
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        y0, y1 = max(cy - bh // 2, 0), min(cy - bh // 2 + bh, h)
        x0, x1 = max(cx - bw // 2, 0), min(cx - bw // 2 + bw, w)
        mixed = image.copy()
        mixed[y0:y1, x0:x1] = partner[y0:y1, x0:x1]
        return mixed, 1 - max(y1 - y0, 0) * max(x1 - x0, 0) / (h * w)

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
