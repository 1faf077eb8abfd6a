"""PyTorch's default initialisation of Conv2d and Linear."""
import numpy as np


def kaiming_uniform(shape, fan_in, dtype, rng):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): kaiming_uniform_ with a = sqrt(5), as PyTorch.

    gain = sqrt(2 / (1 + a^2)) = sqrt(1/3); bound = sqrt(3) * gain / sqrt(fan_in).
    The same bound serves the bias.
    """
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def kaiming_normal_fan_out(shape, dtype, rng):
    """N(0, 2 / fan_out), fan_out = shape[0] * prod(shape[2:]): kaiming_normal_(mode="fan_out",
    nonlinearity="relu"), torchvision's initialisation of ResNet and MobileNetV2 convolutions."""
    fan_out = shape[0] * int(np.prod(shape[2:]))
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_out)).astype(dtype)
