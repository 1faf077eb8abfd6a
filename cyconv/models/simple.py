"""The reference project's network and the default recipe's small network (Sequentials)."""
import numpy as np

from cyconv import nn
from cyconv.models.spec import ArchitectureError


def size_pair(image_size):
    """An int or an (H, W) pair as (H, W)."""
    return (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)


def reference(num_classes, image_size=224):
    """The reference C++ project's network: Conv 3->16 k3 s2, ReLU, MaxPool 2, Conv 16->32
    k3 s2, ReLU, Conv 32->64 k3 s2, ReLU, Conv 64->128 k3 s2, ReLU, Flatten, Linear
    (128 * s * s -> classes; 4608 for 224x224 images)."""
    features = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2), nn.ReLU(),
        nn.Conv2d(64, 128, 3, stride=2), nn.ReLU(), nn.Flatten())
    h, w = size_pair(image_size)
    try:
        (_, flat) = features.output_shape((1, 3, h, w))
    except ValueError:
        raise ArchitectureError(f"reference: image size {image_size} is too small "
                                "(at least 47 pixels)") from None
    return nn.Sequential(*features, nn.Linear(flat, num_classes))


def small(num_classes, image_size=128, widths=(24, 48, 96, 192), dropout=0.2):
    """Padded 3x3 Conv + BN + ReLU + MaxPool stages, global average pooling, Dropout, Linear.

    Images of 128 px or more first go through a 3x3 stride-2 stem (Conv + BN + ReLU).
    """
    h, w = size_pair(image_size)
    layers, channels = [], 3
    if min(h, w) >= 128:
        layers += [nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False),
                   nn.BatchNorm2d(widths[0]), nn.ReLU()]
        channels = widths[0]
    for width in widths:
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                   nn.ReLU(), nn.MaxPool2d(2)]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(channels, num_classes))
    return nn.Sequential(*layers)
