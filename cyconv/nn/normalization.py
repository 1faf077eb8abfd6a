"""BatchNorm2d: per-channel normalisation with batch (train) or running (eval) statistics."""
import numpy as np

from cyconv import _norm, _norm_pool
from cyconv._checks import (
    as_grad_output,
    as_input,
    check_shape,
    float_dtype,
    number_in,
    positive_int,
)
from cyconv._grad_mode import is_grad_enabled
from cyconv._threads import threads_for
from cyconv.nn.activation import ACTIVATION_CODES, ReLU, ReLU6
from cyconv.nn.conv import empty
from cyconv.nn.module import Module, Parameter, naming_errors
from cyconv.nn.pooling import MaxPool2d


class BatchNorm2d(Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, per channel, x (N, C, H, W).

    train(): mean and var are the batch's (biased var), and the running
    statistics move towards them by `momentum` (the running variance takes the
    unbiased batch variance, as PyTorch does; momentum=None: a cumulative
    average).  eval(): the running statistics are used, so the layer is a fixed
    affine map and one image gives the same answer alone or in a batch.
    Parameters weight (C,) = 1, bias (C,) = 0; buffers running_mean (C,) = 0,
    running_var (C,) = 1, num_batches_tracked () int64.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, dtype=np.float32):
        super().__init__()
        self.num_features = positive_int("num_features", num_features)
        if not number_in("BatchNorm2d", "eps", eps, 0, float("inf")) > 0:
            raise ValueError(f"BatchNorm2d: expected eps > 0, got {eps!r}")
        number_in("BatchNorm2d", "momentum", momentum, 0, 1, none_ok=True)
        self.eps = float(eps)
        self.momentum = momentum
        self.dtype = float_dtype(dtype)
        c = self.num_features
        self.weight = Parameter(np.ones(c, self.dtype))
        self.bias = Parameter(np.zeros(c, self.dtype))
        self.register_buffer("running_mean", np.zeros(c, self.dtype))
        self.register_buffer("running_var", np.ones(c, self.dtype))
        self.register_buffer("num_batches_tracked", np.zeros((), np.int64))

    def output_shape(self, input_shape):
        return check_shape(self, input_shape, ("N", self.num_features, "H", "W"))

    def _state_problem(self, name, value):
        if name == "running_var" and value.size and value.min() < 0:
            return f"has a negative variance ({value.min()!r})"
        return None

    def forward(self, x):
        return self._forward(x, False)

    def _can_absorb(self, next_layer):
        """A ReLU right after this layer can run inside its kernels (see Sequential), and so
        can a ReLU6 (not in subclasses: SyncBatchNorm's backward masks as a ReLU's)."""
        return type(next_layer) is ReLU or (type(next_layer) is ReLU6
                                            and type(self) is BatchNorm2d)

    def _can_absorb_second(self, activation, pool):
        """A MaxPool2d after an absorbed ReLU can run inside them too when its 2x2 windows
        tile the input (not in subclasses: SyncBatchNorm takes its statistics otherwise)."""
        return (type(self) is BatchNorm2d and type(activation) is ReLU
                and type(pool) is MaxPool2d and pool._tiles_2x2())

    def _takes_addend(self):
        """True when its forward can add another array in its own pass (see _forward; not
        in subclasses: SyncBatchNorm normalises in a forward of its own)."""
        return type(self) is BatchNorm2d

    def _folds_into(self, conv):
        """True when conv (a Conv2d) can apply this layer through its weight and bias: in
        inference (eval mode, no gradient wanted), on conv's channels and dtype."""
        return (type(self) is BatchNorm2d and not self.training and not is_grad_enabled()
                and self.num_features == conv.out_channels and self.dtype == conv.dtype)

    def _folded(self, weight, bias, out):
        """(weight, bias) of a convolution followed by this layer in eval mode:
        weight * s (written into out, weight's shape) and (bias - running_mean) * s +
        self.bias, s = self.weight / sqrt(running_var + eps) per output channel, computed
        in float64."""
        scale = self.weight.data / np.sqrt(self.running_var.astype(np.float64) + self.eps)
        shift = self.bias.data + (bias - self.running_mean) * scale
        rows = (weight.shape[0], -1)
        _norm.batch_norm2d_fold_weight(weight.reshape(rows), scale, out.reshape(rows),
                                       threads_for(weight.size))
        return out, shift.astype(weight.dtype)

    def _absorb(self, out):
        """Stand in for a forward that the Conv2d before folded into its own (inference
        only: no backward follows)."""
        self._save_for_backward()
        return out

    def _forward_absorbing(self, x, absorbed):
        if len(absorbed) == 2:
            return self._forward_pooled(x, absorbed[1])
        return self._forward(x, ACTIVATION_CODES[type(absorbed[0])])

    def _forward(self, x, activation, addend=None):
        """The forward, then the activation of that code (ACTIVATION_CODES; 0 for none) in
        the same pass.  addend (an array of x's shape and dtype, or None) is added before
        the activation: the other path of a residual sum, whose activation layer then
        masks the gradient itself (this layer's backward does not)."""
        x = as_input(self, x, ("N", self.num_features, "H", "W"), self.dtype)
        n, c, h, w = x.shape
        flat = x.reshape(n, c, h * w)
        out = self._output_array(x.shape, x.dtype)
        flat_out = out.reshape(n, c, h * w)
        flat_addend = (np.empty((0, 0, 0), self.dtype) if addend is None
                       else addend.reshape(n, c, h * w))
        momentum, mean, invstd = self._statistics(x.shape)
        if self.training:
            _norm.batch_norm2d_forward_train(flat, self.weight.data, self.bias.data,
                                             self.running_mean, self.running_var, mean, invstd,
                                             flat_addend, flat_out, self.eps, momentum, True,
                                             activation, threads_for(x.size))
        else:
            _norm.batch_norm2d_forward_eval(flat, self.weight.data, self.bias.data,
                                            self.running_mean, self.running_var, flat_addend,
                                            flat_out, self.eps, activation, threads_for(x.size))
        masked = activation if addend is None else 0
        self._save_for_backward(self.training, int(masked), x, mean, invstd,
                                out if masked else None, None)
        return out

    def _forward_pooled(self, x, pool):
        """pool(max(self(x), 0)) in one kernel pass (cyconv/_norm_pool.pyx), where pool is a
        MaxPool2d that _can_absorb_second; only the pooled output is written."""
        x = as_input(self, x, ("N", self.num_features, "H", "W"), self.dtype)
        with naming_errors(pool):
            out_shape = pool.output_shape(x.shape)
        out = self._output_array(out_shape, x.dtype)
        argmax = pool._argmax_array(out_shape)
        momentum, mean, invstd = self._statistics(x.shape)
        _norm_pool.batch_norm2d_relu_max_pool_forward(
            x, self.weight.data, self.bias.data, self.running_mean, self.running_var, mean,
            invstd, out, argmax, self.eps, momentum, self.training, threads_for(x.size))
        self._save_for_backward(self.training, ACTIVATION_CODES[ReLU], x, mean, invstd, out,
                                argmax)
        return out

    def _statistics(self, x_shape):
        """(momentum, mean, invstd) for a forward on x_shape.  Train mode: this step counted
        in num_batches_tracked, its momentum, and arrays for the kernel to fill with the
        batch's mean and 1 / sqrt(var + eps); eval mode: the running statistics as such."""
        n, c, h, w = x_shape
        if not self.training:
            invstd = 1.0 / np.sqrt(self.running_var.astype(np.float64) + self.eps)
            return 0.0, self.running_mean.copy(), invstd.astype(self.dtype)
        if n * h * w < 2:
            raise ValueError("BatchNorm2d: expected more than 1 value per channel when "
                             f"training, got input of shape {tuple(x_shape)}")
        self.num_batches_tracked += 1
        momentum = (1.0 / int(self.num_batches_tracked) if self.momentum is None
                    else float(self.momentum))
        return momentum, np.empty(c, self.dtype), np.empty(c, self.dtype)

    def backward(self, grad_output, input_grad=True):
        # (SyncBatchNorm tells its own state by a first entry "sync")
        batch_stats, activation, x, mean, invstd, out, argmax = self._saved_for_backward()
        if argmax is not None:   # a ReLU and a max-pool were fused: out is pooled
            grad_output = as_grad_output(self, grad_output, out.shape, self.dtype)
            grad_input = self._grad_input_array(x.shape, self.dtype)
            _norm_pool.batch_norm2d_relu_max_pool_backward(
                grad_output, out, argmax, x, mean, invstd, self.weight.data,
                self.weight.grad, self.bias.grad, grad_input, batch_stats, threads_for(x.size))
            return grad_input if input_grad else None
        n, c, h, w = x.shape
        grad_output = as_grad_output(self, grad_output, x.shape, self.dtype)
        grad_input = self._grad_input_array(grad_output.shape, self.dtype)
        _norm.batch_norm2d_backward(grad_output.reshape(n, c, h * w), x.reshape(n, c, h * w),
                                    mean, invstd, self.weight.data, self.weight.grad,
                                    self.bias.grad,
                                    empty(3, self.dtype) if out is None
                                    else out.reshape(n, c, h * w),
                                    grad_input.reshape(n, c, h * w), batch_stats, activation,
                                    threads_for(x.size))
        return grad_input if input_grad else None

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"
