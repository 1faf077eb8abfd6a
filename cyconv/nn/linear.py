"""Linear (fully connected) and Flatten."""
import numpy as np

from cyconv import _linear
from cyconv._checks import (
    as_float_array,
    as_grad_output,
    as_input,
    check_shape,
    float_dtype,
    positive_int,
)
from cyconv._random import generator
from cyconv._threads import blas_single_threaded, threads_for
from cyconv.nn._init import kaiming_uniform
from cyconv.nn.conv import empty
from cyconv.nn.module import Module, Parameter


class Linear(Module):
    """y = x @ weight^T + bias.  x (N, in_features) -> y (N, out_features);
    weight (out_features, in_features), bias (out_features,), as PyTorch stores them."""

    def __init__(self, in_features, out_features, bias=True, dtype=np.float32, seed=None):
        super().__init__()
        self.in_features = positive_int("in_features", in_features)
        self.out_features = positive_int("out_features", out_features)
        self.dtype = float_dtype(dtype)
        rng = generator(seed)
        self.weight = Parameter(kaiming_uniform((self.out_features, self.in_features),
                                                self.in_features, self.dtype, rng))
        self.bias = (Parameter(kaiming_uniform((self.out_features,), self.in_features,
                                               self.dtype, rng)) if bias else None)

    def output_shape(self, input_shape):
        check_shape(self, input_shape, ("N", self.in_features))
        return (input_shape[0], self.out_features)

    def forward(self, x):
        x = as_input(self, x, ("N", self.in_features), self.dtype)
        out = self._output_array((x.shape[0], self.out_features), self.dtype)
        bias = self.bias.data if self.bias is not None else empty(1, self.dtype)
        with blas_single_threaded():
            _linear.linear_forward(x, self.weight.data, bias, out,
                                   threads_for(x.shape[0] * self.weight.data.size))
        self._save_for_backward(x)
        return out

    def backward(self, grad_output, input_grad=True):
        (x,) = self._saved_for_backward()
        grad_output = as_grad_output(self, grad_output, (x.shape[0], self.out_features),
                                     self.dtype)
        grad_input = (self._grad_input_array(x.shape, x.dtype) if input_grad
                      else empty(2, self.dtype))
        grad_bias = self.bias.grad if self.bias is not None else empty(1, self.dtype)
        with blas_single_threaded():
            _linear.linear_backward(grad_output, x, self.weight.data, self.weight.grad,
                                    grad_bias, grad_input, input_grad,
                                    threads_for(x.shape[0] * self.weight.data.size))
        return grad_input if input_grad else None

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class Flatten(Module):
    """x (N, d1, d2, ...) -> (N, d1*d2*...): a reshape, no copy of contiguous data."""

    def output_shape(self, input_shape):
        if len(input_shape) < 1:
            raise ValueError(f"Flatten: expected an array with a batch dimension, got shape "
                             f"{tuple(input_shape)}")
        return (input_shape[0], int(np.prod(input_shape[1:], dtype=np.int64)))

    def forward(self, x):
        x = as_float_array(self, x)
        flat_shape = self.output_shape(x.shape)
        self._save_for_backward(x.shape, x.dtype)
        return x.reshape(flat_shape)  # N may be 0

    def backward(self, grad_output, input_grad=True):
        x_shape, dtype = self._saved_for_backward()
        grad_output = as_grad_output(self, grad_output, self.output_shape(x_shape), dtype)
        return grad_output.reshape(x_shape) if input_grad else None
