"""Dropout: inverted dropout in train mode, the identity in eval mode."""
import numpy as np

from cyconv import _dropout
from cyconv._checks import as_float_array, as_grad_output, number_in
from cyconv._random import generator
from cyconv._threads import threads_for
from cyconv.nn.module import Module


class Dropout(Module):
    """train(): y = x * mask / (1 - p), each mask element 1 with probability 1 - p;
    eval(): y = x (the same array).  Any shape.

    The mask of the k-th training call is a pure function of (seed, k): a run
    with the same seed draws the same masks, whatever the thread count.  `seed`
    defaults to a draw from cyconv's global generator (see cyconv.manual_seed);
    `calls` (the k) is part of the training state that a checkpoint keeps.
    """

    def __init__(self, p=0.5, seed=None):
        super().__init__()
        self.p = number_in("Dropout", "a probability p", p, 0, 1)
        self.seed = int(generator(seed).integers(0, 2**63)) if seed is None else int(seed)
        self.calls = 0

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def _call_seed(self):
        """The 64-bit seed of this call's mask, mixed from (seed, calls)."""
        return int(np.random.SeedSequence([self.seed, self.calls]).generate_state(1, np.uint64)[0])

    def forward(self, x):
        x = as_float_array(self, x)
        if not self.training or self.p == 0:
            self._save_for_backward(None, x.shape, x.dtype)
            return x
        out = self._output_array(x.shape, x.dtype)
        mask = self._workspace("mask", x.shape, np.uint8)
        if self.p == 1:
            out[...] = 0
            mask[...] = 0
        else:
            _dropout.dropout_forward(x.reshape(-1), out.reshape(-1), mask.reshape(-1), self.p,
                                     self._call_seed(), threads_for(x.size))
        self.calls += 1
        self._save_for_backward(mask, x.shape, x.dtype)
        return out

    def backward(self, grad_output, input_grad=True):
        mask, x_shape, dtype = self._saved_for_backward()
        grad_output = as_grad_output(self, grad_output, x_shape, dtype)
        if not input_grad:
            return None
        if mask is None:
            return grad_output
        grad_input = self._grad_input_array(grad_output.shape, grad_output.dtype)
        if self.p == 1:
            grad_input[...] = 0
        else:
            _dropout.dropout_backward(grad_output.reshape(-1), mask.reshape(-1),
                                      grad_input.reshape(-1), self.p,
                                      threads_for(grad_input.size))
        return grad_input

    def extra_repr(self):
        return f"p={self.p}"
