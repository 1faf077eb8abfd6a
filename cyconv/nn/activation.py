"""Activations: ReLU and LeakyReLU (elementwise kernels over the flattened array)."""

from cyconv import _activation
from cyconv._checks import as_float_array, as_grad_output, number_in
from cyconv._threads import threads_for
from cyconv.nn.module import Module


class ReLU(Module):
    """y = max(x, 0); dx = dy where y > 0, else 0.  Any shape."""

    def forward(self, x):
        x = as_float_array(self, x)
        out = self._output_array(x.shape, x.dtype)
        _activation.relu_forward(x.reshape(-1), out.reshape(-1), threads_for(x.size))
        self._save_for_backward(out, False)
        return out

    def _absorb(self, out):
        """Stand in for a forward that the preceding layer already applied (out >= 0).

        The preceding layer then also masks the gradient, so backward passes it on.
        """
        self._save_for_backward(out, True)
        return out

    def backward(self, grad_output, input_grad=True):
        out, absorbed = self._saved_for_backward()
        grad_output = as_grad_output(self, grad_output, out.shape, out.dtype)
        if not input_grad:
            return None
        if absorbed:
            return grad_output
        grad_input = self._grad_input_array(out.shape, out.dtype)
        _activation.relu_backward(out.reshape(-1), grad_output.reshape(-1),
                                  grad_input.reshape(-1), threads_for(out.size))
        return grad_input


class LeakyReLU(Module):
    """y = x where x > 0, else negative_slope * x.  Any shape."""

    def __init__(self, negative_slope=0.01):
        super().__init__()
        self.negative_slope = number_in("LeakyReLU", "negative_slope", negative_slope,
                                        -float("inf"), float("inf"))

    def forward(self, x):
        x = as_float_array(self, x)
        out = self._output_array(x.shape, x.dtype)
        _activation.leaky_relu_forward(x.reshape(-1), out.reshape(-1), self.negative_slope,
                                       threads_for(x.size))
        self._save_for_backward(x)
        return out

    def backward(self, grad_output, input_grad=True):
        (x,) = self._saved_for_backward()
        grad_output = as_grad_output(self, grad_output, x.shape, x.dtype)
        if not input_grad:
            return None
        grad_input = self._grad_input_array(x.shape, x.dtype)
        _activation.leaky_relu_backward(x.reshape(-1), grad_output.reshape(-1),
                                        grad_input.reshape(-1), self.negative_slope,
                                        threads_for(x.size))
        return grad_input

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}"
