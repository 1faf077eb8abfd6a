"""Naming the layers of any model, and the order in which a forward pass runs them.

A layer is chosen by its dotted name (``"layer4.1.conv2"``, as ``named_modules``
gives it), by an int (the position among the model's top-level children, negative
from the end, as in a list: ``9`` for the 10th layer of a Sequential), or by the
module object itself.
"""
import numpy as np

from cyconv._grad_mode import no_grad


def resolve(model, layer, what="layer"):
    """(dotted name, module) of ``layer`` in ``model`` (ValueError/IndexError/TypeError
    with the choices when it is not one of its layers)."""
    if isinstance(layer, (bool, np.bool_)):
        raise TypeError(f"{what} must be a layer name, index or module, got {layer!r}")
    if isinstance(layer, (int, np.integer)):
        children = model.named_children()
        if not -len(children) <= layer < len(children):
            raise IndexError(f"{what} {layer} is out of range: the model has {len(children)} "
                             f"top-level layers (0..{len(children) - 1})")
        return children[int(layer)]
    if isinstance(layer, str):
        if layer.lstrip("-").isdigit() and layer not in dict(model.named_modules()):
            return resolve(model, int(layer), what)
        try:
            return layer, model.get_submodule(layer)
        except KeyError as error:
            raise ValueError(f"{what}: {error.args[0]}") from None
    for name, module in model.named_modules():
        if module is layer and name:
            return name, module
    raise ValueError(f"{what} {layer!r} is not a layer of this model")


def describe(name, module):
    """'layer4.1.relu_out (ReLU)': a layer for messages."""
    return f"{name} ({type(module).__name__})"


def execution_order(model, x):
    """[(dotted name, module, output shape)] of the leaf layers (those without sub-layers)
    in the order a forward pass of ``x`` runs them (under no_grad, in eval mode; the
    model's mode is restored)."""
    order, handles = [], []
    for name, module in model.named_modules():
        if name and not module.named_children():
            handles.append(module.register_forward_hook(
                lambda m, inputs, out, name=name: order.append((name, m, np.shape(out)))))
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return order
