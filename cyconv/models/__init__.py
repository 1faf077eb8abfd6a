"""Named networks, architecture specs and the PyTorch equivalent of a model.

Named networks (:func:`create` by name, see :data:`ARCHITECTURES`):

``reference``  the reference C++ project's network (224 px)
``small``      the default recipe's network: four Conv + BN + ReLU + MaxPool stages
``resnet``     a ResNet for ~128 px photos (:func:`resnet_small`)
``resnet18``, ``resnet34``, ``mobilenet_v2``   torchvision's networks, with its
               module names and state_dict keys

:func:`architecture` describes a model as JSON-able data and :func:`build` rebuilds
it (checkpoints store it); :func:`to_torch` builds the equivalent PyTorch model.
"""
from cyconv.models.mobilenet import InvertedResidual, mobilenet_v2
from cyconv.models.resnet import BasicBlock, resnet, resnet18, resnet34, resnet_small
from cyconv.models.simple import reference, small
from cyconv.models.spec import ArchitectureError, build, describe, difference, known_types, register
from cyconv.models.torch import to_torch

architecture = describe

ARCHITECTURES = {
    "reference": reference,
    "small": small,
    "resnet": resnet_small,
    "resnet18": lambda num_classes, image_size=224: resnet18(num_classes),
    "resnet34": lambda num_classes, image_size=224: resnet34(num_classes),
    "mobilenet_v2": lambda num_classes, image_size=224: mobilenet_v2(num_classes),
}


def create(name, num_classes, image_size, **kwargs):
    """The named network ``name`` (see :data:`ARCHITECTURES`) for this many classes."""
    if name not in ARCHITECTURES:
        raise ArchitectureError(f"unknown architecture {name!r}; choose one of "
                                f"{sorted(ARCHITECTURES)}")
    return ARCHITECTURES[name](num_classes, image_size, **kwargs)


__all__ = ["ARCHITECTURES", "ArchitectureError", "BasicBlock", "InvertedResidual",
           "architecture", "build", "create", "describe", "difference", "known_types",
           "mobilenet_v2", "reference", "register", "resnet", "resnet18", "resnet34",
           "resnet_small", "small", "to_torch"]
