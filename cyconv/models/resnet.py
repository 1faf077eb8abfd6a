"""ResNet (He et al. 2016) with torchvision's module names and state_dict keys.

``resnet18(num_classes)`` and ``resnet34`` load ``torchvision.models.resnet18().state_dict()``
strictly (keys such as ``layer1.0.conv1.weight``, ``layer2.0.downsample.0.weight``)
and compute the same function.  ``resnet_small`` is the same design scaled to
128 px photos and a CPU: a 3x3 stem without max-pool and narrower stages.
"""
from collections import OrderedDict

import numpy as np

from cyconv import nn
from cyconv._random import generator
from cyconv.models import spec
from cyconv.nn._init import kaiming_normal_fan_out
from cyconv.nn.activation import ACTIVATION_CODES
from cyconv.nn.containers import add_into, backward_chain, forward_chain
from cyconv.nn.module import naming_errors


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)): torchvision's BasicBlock.

    conv1 is 3x3 with ``stride``, conv2 3x3; the shortcut is ``downsample`` (a 1x1
    conv with ``stride`` and a BatchNorm2d, where the shape changes) or the identity.
    torchvision applies one ReLU module twice; here the second is ``relu_out`` (a
    module keeps the state of one call).  x (N, inplanes, H, W) -> (N, planes, H', W').
    """

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.inplanes, self.planes, self.stride = inplanes, planes, stride
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.relu_out = nn.ReLU()

    def _main(self):
        return [self.conv1, self.bn1, self.relu, self.conv2, self.bn2]

    def _shortcut_shape(self, input_shape):
        return (tuple(input_shape) if self.downsample is None
                else self.downsample.output_shape(input_shape))

    def output_shape(self, input_shape):
        main = nn.Sequential(*self._main()).output_shape(input_shape)
        side = self._shortcut_shape(input_shape)
        if main != side:
            raise ValueError(f"BasicBlock: the main path gives {main} but the shortcut {side}; "
                             "a block that changes the shape needs a downsample")
        return main

    def forward(self, x):
        """The sum and relu_out run in one pass, with bn2 too unless bn2 folds into conv2
        (inference) or is a subclass (SyncBatchNorm); relu_out's backward masks the
        gradient as usual.  A layer with hooks runs as a layer of its own (its hooks must
        see it)."""
        self.output_shape(np.shape(x))   # refuse a bad shape before any statistics move
        relu = ACTIVATION_CODES[nn.ReLU]
        if self.relu_out._hooked():
            main = forward_chain(self._main(), x)
            return self.relu_out(add_into(self._output_array(main.shape, main.dtype), main,
                                          self._shortcut(x)))
        if (self.bn2._hooked() or self.bn2._folds_into(self.conv2)
                or not self.bn2._takes_addend()):
            main = forward_chain(self._main(), x)
            out = add_into(self._output_array(main.shape, main.dtype), main, self._shortcut(x),
                           relu)
        else:
            hidden = forward_chain(self._main()[:-1], x)
            side = self._shortcut(x)
            with naming_errors(self.bn2):
                out = self.bn2._forward(hidden, relu, addend=np.ascontiguousarray(
                    side, dtype=self.bn2.dtype))
        return self.relu_out._absorb(out, preceding_masks=False)

    def _shortcut(self, x):
        return x if self.downsample is None else self.downsample(x)

    def backward(self, grad_output, input_grad=True):
        grad = self.relu_out.backward(grad_output)
        grad_main = backward_chain(self._main(), grad, input_grad)
        grad_side = grad if self.downsample is None else self.downsample.backward(grad, input_grad)
        if not input_grad:
            return None
        return add_into(self._grad_input_array(grad_main.shape, grad_main.dtype), grad_main,
                        grad_side)


def resnet(layers, num_classes=1000, widths=(64, 128, 256, 512), stem="imagenet", seed=None):
    """torchvision's ResNet of BasicBlocks as a Sequential with its names: conv1, bn1, relu,
    (maxpool,) layer1..layer4, avgpool, (flatten,) fc; x (N, 3, H, W) -> logits (N, classes).

    ``layers``: blocks per stage ([2, 2, 2, 2] is ResNet-18); ``widths``: channels of the
    stages; ``stem``: "imagenet" (a 7x7 stride-2 conv and a 3x3 stride-2 max-pool, as
    torchvision) or "small" (a 3x3 stride-2 conv and no max-pool, for ~128 px photos).
    Convolutions start as torchvision's (Kaiming normal, fan_out), BatchNorm as 1 and 0.
    torchvision flattens with a function call; here ``flatten`` is a layer (no keys).
    """
    if stem not in ("imagenet", "small"):
        raise ValueError(f"resnet: stem must be 'imagenet' or 'small', got {stem!r}")
    if len(layers) != 4 or len(widths) != 4:
        raise ValueError(f"resnet: expected 4 stages, got layers {layers} and widths {widths}")
    kernel = 7 if stem == "imagenet" else 3
    parts = [("conv1", nn.Conv2d(3, widths[0], kernel, stride=2, padding=kernel // 2,
                                 bias=False)),
             ("bn1", nn.BatchNorm2d(widths[0])), ("relu", nn.ReLU())]
    if stem == "imagenet":
        parts.append(("maxpool", nn.MaxPool2d(3, stride=2, padding=1)))
    inplanes = widths[0]
    for i, (blocks, width) in enumerate(zip(layers, widths)):
        stage, inplanes = _stage(inplanes, width, blocks, stride=1 if i == 0 else 2)
        parts.append((f"layer{i + 1}", stage))
    parts += [("avgpool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
              ("fc", nn.Linear(inplanes, num_classes))]
    model = nn.Sequential(OrderedDict(parts))
    init_like_torchvision(model, generator(seed))
    return model


def _stage(inplanes, planes, blocks, stride):
    """(a Sequential of BasicBlocks, its output channels); the first block downsamples
    with a 1x1 conv + BatchNorm2d where the shape changes."""
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(planes))
    stage = [BasicBlock(inplanes, planes, stride, downsample)]
    stage += [BasicBlock(planes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*stage), planes


def init_like_torchvision(model, rng):
    """Convolutions N(0, 2 / fan_out), their biases 0; BatchNorm weight 1, bias 0 (the
    layers' own defaults); Linear keeps PyTorch's default."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            module.weight.data[...] = kaiming_normal_fan_out(module.weight.shape,
                                                             module.weight.dtype, rng)
            if module.bias is not None:
                module.bias.data[...] = 0


def resnet18(num_classes=1000, seed=None):
    """ResNet-18: torchvision's resnet18 (BasicBlocks [2, 2, 2, 2], 224 px ImageNet design)."""
    return resnet([2, 2, 2, 2], num_classes, seed=seed)


def resnet34(num_classes=1000, seed=None):
    """ResNet-34: torchvision's resnet34 (BasicBlocks [3, 4, 6, 3])."""
    return resnet([3, 4, 6, 3], num_classes, seed=seed)


def resnet_small(num_classes, image_size=128, seed=None):
    """A ResNet for ~128 px photos on a CPU: a 3x3 stride-2 stem without max-pool, then
    BasicBlocks [1, 1, 1, 1] of 16, 32, 64, 128 channels at 64, 32, 16 and 8 px (the
    resolutions of the small network; image_size is accepted for create())."""
    return resnet([1, 1, 1, 1], num_classes, widths=(16, 32, 64, 128), stem="small", seed=seed)


spec.register(BasicBlock, lambda m: dict(inplanes=m.inplanes, planes=m.planes, stride=m.stride))
