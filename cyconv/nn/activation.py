"""Activations: ReLU, ReLU6 and LeakyReLU (elementwise kernels over the flattened array)."""

from cyconv import _activation
from cyconv._checks import as_float_array, as_grad_output, number_in
from cyconv._threads import threads_for
from cyconv.nn.module import Module


def passed_on(layer, grad_output, shape, dtype, input_grad):
    """The backward of a layer that another one absorbed (see forward_chain): grad_output,
    checked against the shape and dtype that the absorbed forward gave."""
    grad_output = as_grad_output(layer, grad_output, shape, dtype)
    return grad_output if input_grad else None


class _Elementwise(Module):
    """An activation whose gradient is a mask or a scale read from its output (ReLU,
    ReLU6) or its input (LeakyReLU): any shape in, the same shape out."""

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def _apply(self, kernel, x, *args):
        x = as_float_array(self, x)
        out = self._output_array(x.shape, x.dtype)
        kernel(x.reshape(-1), out.reshape(-1), *args, threads_for(x.size))
        return x, out

    def _backward_through(self, kernel, kept, grad_output, input_grad, *args):
        grad_output = as_grad_output(self, grad_output, kept.shape, kept.dtype)
        if not input_grad:
            return None
        grad_input = self._grad_input_array(kept.shape, kept.dtype)
        kernel(kept.reshape(-1), grad_output.reshape(-1), grad_input.reshape(-1), *args,
               threads_for(kept.size))
        return grad_input


class _Absorbable(_Elementwise):
    """An activation whose gradient is a mask read from its output, which the layer before
    it may apply in its own kernels (see forward_chain).  Subclasses name their
    (forward, backward) kernels."""

    _kernels = None

    def forward(self, x):
        _, out = self._apply(self._kernels[0], x)
        self._save_for_backward(out, False)
        return out

    def _absorb(self, out, preceding_masks=True):
        """Stand in for a forward that the preceding layer already applied (out: its
        output, or that of a max-pool it absorbed too).

        The preceding layer then also masks the gradient, so backward passes it on;
        preceding_masks=False: it does not, and backward masks it here, from out.
        """
        self._save_for_backward(out, preceding_masks)
        return out

    def backward(self, grad_output, input_grad=True):
        out, absorbed = self._saved_for_backward()
        if absorbed:
            return passed_on(self, grad_output, out.shape, out.dtype, input_grad)
        return self._backward_through(self._kernels[1], out, grad_output, input_grad)


class ReLU(_Absorbable):
    """y = max(x, 0), NaN kept; dx = dy where y > 0, else 0."""

    _kernels = (_activation.relu_forward, _activation.relu_backward)


class ReLU6(_Absorbable):
    """y = min(max(x, 0), 6), NaN kept (MobileNetV2); dx = dy where 0 < y < 6, else 0."""

    _kernels = (_activation.relu6_forward, _activation.relu6_backward)


class LeakyReLU(_Elementwise):
    """y = x where x > 0, else negative_slope * x."""

    def __init__(self, negative_slope=0.01):
        super().__init__()
        self.negative_slope = number_in("LeakyReLU", "negative_slope", negative_slope,
                                        -float("inf"), float("inf"))

    def forward(self, x):
        x, out = self._apply(_activation.leaky_relu_forward, x, self.negative_slope)
        self._save_for_backward(x)
        return out

    def backward(self, grad_output, input_grad=True):
        (x,) = self._saved_for_backward()
        return self._backward_through(_activation.leaky_relu_backward, x, grad_output,
                                      input_grad, self.negative_slope)

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}"


# The activations that can run inside batch norm's and the convolutions' kernels, by
# their codes there (cyconv/_elementwise.pxd; 0: none)
ACTIVATION_CODES = {ReLU: 1, ReLU6: 2}
