"""cyconv.nn: layers and containers with PyTorch's names, arguments and weight layouts."""
from cyconv.nn.activation import LeakyReLU, ReLU, ReLU6
from cyconv.nn.containers import Concat, Identity, Residual, Sequential
from cyconv.nn.conv import Conv2d
from cyconv.nn.dropout import Dropout
from cyconv.nn.linear import Flatten, Linear
from cyconv.nn.loss import CrossEntropyLoss
from cyconv.nn.module import Module, Parameter, RemovableHandle
from cyconv.nn.normalization import BatchNorm2d
from cyconv.nn.pooling import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d

__all__ = ["Module", "Parameter", "RemovableHandle", "Sequential", "Residual", "Concat",
           "Identity", "Conv2d", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "ReLU", "ReLU6",
           "LeakyReLU", "Linear", "Flatten", "BatchNorm2d", "Dropout", "CrossEntropyLoss"]
