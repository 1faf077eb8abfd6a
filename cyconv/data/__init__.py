"""Data pipeline: image folders, splits, augmentation and a threaded batch loader.

It needs only numpy and OpenCV, never the compiled part of cyconv.  Typical use::

    data = ImageFolder("animals", image_size=64)
    train, valid, test = split_indices([label for _, label in data.samples])
    mean, std = compute_mean_std(data, train)
    loader = DataLoader(Subset(data, train), 32, shuffle=True, augment=Augment(),
                        mean=mean, std=std)
    for epoch in range(10):
        for x, y in loader:      # x (32, 3, 64, 64) float32, y (32,) int64
            ...
"""
from cyconv.data.augment import Augment
from cyconv.data.datasets import LAYOUT, ArrayDataset, ImageFolder, Subset
from cyconv.data.io import (
                            IMAGE_EXTENSIONS,
                            CorruptImageError,
                            ImageTooLargeError,
                            crop_center,
                            max_image_pixels,
                            normalize,
                            read_image,
                            resize,
                            set_max_image_pixels,
)
from cyconv.data.loader import DataLoader, compute_mean_std
from cyconv.data.progressive import ProgressiveSize
from cyconv.data.segment import segment_foreground
from cyconv.data.split import load_split, save_split, split_indices
from cyconv.data.synthetic import SHAPE_CLASSES, make_shapes

__all__ = ["Augment", "LAYOUT", "ArrayDataset", "ImageFolder", "Subset", "IMAGE_EXTENSIONS",
           "CorruptImageError", "ImageTooLargeError", "crop_center", "max_image_pixels",
           "normalize", "read_image", "resize", "set_max_image_pixels", "DataLoader",
           "ProgressiveSize",
           "compute_mean_std", "segment_foreground", "load_split", "save_split",
           "split_indices", "SHAPE_CLASSES", "make_shapes"]
