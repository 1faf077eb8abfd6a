"""Pooling layers: MaxPool2d, AvgPool2d and AdaptiveAvgPool2d(1) (global average)."""
import numpy as np

from cyconv import _pool
from cyconv._checks import as_grad_output, as_input, check_shape, positive_pair
from cyconv._grad_mode import is_grad_enabled
from cyconv._threads import threads_for
from cyconv.nn.activation import passed_on
from cyconv.nn.conv import empty, geometry
from cyconv.nn.module import Module


class _Pool2d(Module):
    """Window arguments shared by max and average pooling (PyTorch's rules)."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = positive_pair("kernel_size", kernel_size)
        self.stride = self.kernel_size if stride is None else positive_pair("stride", stride)
        self.padding = positive_pair("padding", padding, minimum=0)
        if any(p > k // 2 for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(f"{type(self).__name__}: padding should be at most half of the "
                             f"kernel size {self.kernel_size}, got {self.padding}")

    def _geometry(self, x_shape):
        return geometry(self, x_shape, self.kernel_size, self.stride, self.padding, (1, 1))

    def output_shape(self, input_shape):
        check_shape(self, input_shape, ("N", "C", "H", "W"))
        g = self._geometry(input_shape)
        return tuple(input_shape[:2]) + (g["out_height"], g["out_width"])

    def _prepare(self, x):
        """(x checked and contiguous, its geometry, the output array)."""
        x = as_input(self, x, ("N", "C", "H", "W"))
        g = self._geometry(x.shape)
        out = self._output_array(x.shape[:2] + (g["out_height"], g["out_width"]), x.dtype)
        return x, g, out

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MaxPool2d(_Pool2d):
    """y[n, c, h, w] = max of x over the window at (h*s - p, w*s - p) of size k.

    x (N, C, H, W) -> y (N, C, OH, OW), OH = (H + 2p - k) // s + 1 (likewise OW);
    padding never wins.  The gradient of each window goes to exactly one element,
    its first maximum in row-major order; overlapping windows add up.
    """

    def forward(self, x):
        out, argmax, g = self._pool(x)
        self._save_for_backward(x.shape, x.dtype, g, argmax)
        return out

    def _pool(self, x):
        """(y, where each window's maximum is, the geometry) for x, nothing saved (also for
        a Conv2d that absorbed this pool with the ReLU before it: Conv2d._forward)."""
        x, g, out = self._prepare(x)
        argmax = self._argmax_array(out.shape)
        _pool.max_pool2d_forward(x, out, argmax, g, threads_for(x.size))
        return out, argmax, g

    def _spread(self, grad_output, argmax, g, x_shape, dtype):
        """The input gradient: each window's gradient at its maximum (overlaps add up)."""
        grad_input = self._grad_input_array(x_shape, dtype)
        _pool.max_pool2d_backward(grad_output, argmax, grad_input, g,
                                  threads_for(grad_input.size))
        return grad_input

    def _tiles_2x2(self):
        """True when the windows are 2x2 with stride 2 and no padding (they tile the input)."""
        return self.kernel_size == (2, 2) and self.stride == (2, 2) and self.padding == (0, 0)

    def _argmax_array(self, out_shape):
        """The int32 array for where each window's maximum is (empty when no backward will
        come)."""
        return (self._workspace("argmax", out_shape, np.int32) if is_grad_enabled()
                else empty(4, np.int32))

    def _absorb(self, out):
        """Stand in for a forward that the layers before already applied: a BatchNorm2d or
        a Conv2d and a ReLU computed this pooling (see forward_chain), and the absorbing
        layer's backward routes the gradient through the windows, so backward passes it
        on."""
        self._save_for_backward(out.shape, out.dtype, None, None)
        return out

    def backward(self, grad_output, input_grad=True):
        x_shape, dtype, g, argmax = self._saved_for_backward()
        if argmax is None:   # absorbed: x_shape is the output's shape
            return passed_on(self, grad_output, x_shape, dtype, input_grad)
        grad_output = as_grad_output(self, grad_output, argmax.shape, dtype)
        if not input_grad:
            return None
        return self._spread(grad_output, argmax, g, x_shape, dtype)


class AvgPool2d(_Pool2d):
    """y[n, c, h, w] = mean of x over the window (zero padding counted when count_include_pad).

    x (N, C, H, W) -> y (N, C, OH, OW), OH = (H + 2p - k) // s + 1 (likewise OW).
    """

    def __init__(self, kernel_size, stride=None, padding=0, count_include_pad=True):
        super().__init__(kernel_size, stride, padding)
        self.count_include_pad = bool(count_include_pad)

    def forward(self, x):
        x, g, out = self._prepare(x)
        _pool.avg_pool2d_forward(x, out, g, self.count_include_pad, threads_for(x.size))
        self._save_for_backward(x.shape, x.dtype, g, out.shape)
        return out

    def backward(self, grad_output, input_grad=True):
        x_shape, dtype, g, out_shape = self._saved_for_backward()
        grad_output = as_grad_output(self, grad_output, out_shape, dtype)
        if not input_grad:
            return None
        grad_input = self._grad_input_array(x_shape, dtype)
        _pool.avg_pool2d_backward(grad_output, grad_input, g, self.count_include_pad,
                                  threads_for(grad_input.size))
        return grad_input

    def extra_repr(self):
        return super().extra_repr() + f", count_include_pad={self.count_include_pad}"


class AdaptiveAvgPool2d(Module):
    """Global average pooling: x (N, C, H, W) -> y (N, C, 1, 1), y = mean over H, W.

    Only output_size 1 (or (1, 1)) is supported.
    """

    def __init__(self, output_size=1):
        super().__init__()
        if not (isinstance(output_size, (int, np.integer, tuple, list))
                and output_size in (1, (1, 1), [1, 1])):
            raise ValueError("AdaptiveAvgPool2d: only output_size 1 (global average pooling) "
                             f"is supported, got {output_size!r}")
        self.output_size = (1, 1)

    def output_shape(self, input_shape):
        check_shape(self, input_shape, ("N", "C", "H", "W"))
        return tuple(input_shape[:2]) + (1, 1)

    def forward(self, x):
        x = as_input(self, x, ("N", "C", "H", "W"))
        n, c, h, w = x.shape
        out = self._output_array((n, c, 1, 1), x.dtype)
        _pool.global_avg_pool2d_forward(x.reshape(n, c, h * w), out.reshape(n, c),
                                        threads_for(x.size))
        self._save_for_backward(x.shape, x.dtype)
        return out

    def backward(self, grad_output, input_grad=True):
        x_shape, dtype = self._saved_for_backward()
        n, c, h, w = x_shape
        grad_output = as_grad_output(self, grad_output, (n, c, 1, 1), dtype)
        if not input_grad:
            return None
        grad_input = self._grad_input_array(x_shape, dtype)
        _pool.global_avg_pool2d_backward(grad_output.reshape(n, c),
                                         grad_input.reshape(n, c, h * w),
                                         threads_for(grad_input.size))
        return grad_input

    def extra_repr(self):
        return "output_size=1"
