"""MobileNetV2 (Sandler et al. 2018) with torchvision's module names and state_dict keys.

``mobilenet_v2(num_classes, width_mult)`` loads ``torchvision.models.mobilenet_v2().state_dict()``
strictly (``features.1.conv.0.0.weight`` ...) and computes the same function.
"""
from collections import OrderedDict

from cyconv import nn
from cyconv._random import generator
from cyconv.models import spec
from cyconv.models.resnet import init_like_torchvision
from cyconv.nn.containers import add_into

# t (expansion), c (channels), n (blocks), s (stride of the first block): the paper's table 2
SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1],
           [6, 160, 3, 2], [6, 320, 1, 1]]


def make_divisible(value, divisor=8):
    """torchvision's _make_divisible: the nearest multiple of divisor, at least divisor and
    not below 90% of value."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn_relu6(inp, oup, kernel_size=3, stride=1, groups=1):
    """torchvision's Conv2dNormActivation with ReLU6: Conv2d (no bias, 'same' padding),
    BatchNorm2d, ReLU6, as a Sequential (keys "0.weight", "1.running_mean" ...)."""
    return nn.Sequential(nn.Conv2d(inp, oup, kernel_size, stride=stride,
                                   padding=(kernel_size - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(oup), nn.ReLU6())


class InvertedResidual(nn.Module):
    """x + conv(x) when the shape is kept (stride 1, inp == oup), else conv(x), where conv =
    [1x1 expansion + BN + ReLU6] (when expand_ratio != 1), 3x3 depthwise with ``stride`` +
    BN + ReLU6, 1x1 projection + BN (no activation: the linear bottleneck)."""

    def __init__(self, inp, oup, stride, expand_ratio):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"InvertedResidual: stride must be 1 or 2, got {stride!r}")
        self.inp, self.oup, self.stride, self.expand_ratio = inp, oup, stride, expand_ratio
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = [conv_bn_relu6(inp, hidden, 1)] if expand_ratio != 1 else []
        layers += [conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def output_shape(self, input_shape):
        return self.conv.output_shape(input_shape)

    def forward(self, x):
        out = self.conv(x)
        if not self.use_res_connect:
            return out
        return add_into(self._output_array(out.shape, out.dtype), x, out)

    def backward(self, grad_output, input_grad=True):
        grad = self.conv.backward(grad_output, input_grad)
        if not (self.use_res_connect and input_grad):
            return grad
        return add_into(self._grad_input_array(grad.shape, grad.dtype), grad, grad_output)


def mobilenet_v2(num_classes=1000, width_mult=1.0, dropout=0.2, seed=None):
    """torchvision's MobileNetV2 as a Sequential with its names: features (stem conv, 17
    inverted residual blocks, 1x1 conv to the last channels), avgpool and flatten
    (function calls in torchvision: layers without keys here), classifier (Dropout,
    Linear).  Channels scale by ``width_mult``, rounded to multiples of 8.  Initialised
    as torchvision: convolutions Kaiming normal (fan_out), Linear N(0, 0.01), bias 0."""
    if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) \
            or not width_mult > 0:
        raise ValueError(f"mobilenet_v2: width_mult must be > 0, got {width_mult!r}")
    channels = make_divisible(32 * width_mult)
    last_channel = make_divisible(1280 * max(1.0, width_mult))
    features = [conv_bn_relu6(3, channels, stride=2)]
    for t, c, n, s in SETTING:
        out = make_divisible(c * width_mult)
        for i in range(n):
            features.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
            channels = out
    features.append(conv_bn_relu6(channels, last_channel, 1))
    fc = nn.Linear(last_channel, num_classes)
    model = nn.Sequential(OrderedDict(
        features=nn.Sequential(*features), avgpool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(), classifier=nn.Sequential(nn.Dropout(dropout), fc)))
    rng = generator(seed)
    init_like_torchvision(model, rng)
    fc.weight.data[...] = rng.normal(0, 0.01, fc.weight.shape)
    fc.bias.data[...] = 0
    return model


spec.register(InvertedResidual, lambda m: dict(inp=m.inp, oup=m.oup, stride=m.stride,
                                               expand_ratio=m.expand_ratio))
