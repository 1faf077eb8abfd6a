"""CrossEntropyLoss: softmax + cross-entropy, fused and numerically stable."""
import numpy as np

from cyconv import _loss
from cyconv._checks import number_in, shape_text
from cyconv._threads import threads_for


class CrossEntropyLoss:
    """loss = mean_n [logsumexp(z_n) - sum_j t_nj z_nj], t = (1 - eps) onehot(y) + eps / C.

    logits z (N, C) float32/float64, labels y (N,) integers in [0, C).
    ``loss_fn(logits, labels)`` returns a Python float; ``loss_fn.backward()``
    returns dL/dz = (softmax(z) - t) / N, shape (N, C).
    """

    def __init__(self, label_smoothing=0.0):
        self.label_smoothing = number_in("CrossEntropyLoss", "label_smoothing", label_smoothing,
                                         0, 1)
        self._saved = None

    def __call__(self, logits, labels):
        return self.forward(logits, labels)

    def forward(self, logits, labels):
        logits, labels = self._check(logits, labels)
        n, _ = logits.shape
        probs = np.empty_like(logits)
        losses = np.empty(n, np.float64)
        loss = _loss.softmax_cross_entropy_forward(logits, labels, probs, losses,
                                                   self.label_smoothing, threads_for(logits.size))
        self._saved = (probs, labels)
        return float(loss)

    def backward(self):
        """dL/dlogits for the last forward call."""
        if self._saved is None:
            raise RuntimeError("CrossEntropyLoss.backward called before the loss was computed")
        probs, labels = self._saved
        grad = np.empty_like(probs)
        _loss.softmax_cross_entropy_backward(probs, labels, grad, self.label_smoothing,
                                             threads_for(probs.size))
        return grad

    @staticmethod
    def _check(logits, labels):
        if not isinstance(logits, np.ndarray) or logits.dtype not in (np.float32, np.float64):
            raise TypeError("CrossEntropyLoss: expected float32 or float64 logits, got "
                            + (str(logits.dtype) if isinstance(logits, np.ndarray)
                               else type(logits).__name__))
        if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
            raise ValueError(f"CrossEntropyLoss: expected logits of shape (N, C), "
                             f"got {shape_text(logits.shape)}")
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu":
            raise TypeError(f"CrossEntropyLoss: expected integer labels, got {labels.dtype}")
        n, c = logits.shape
        if labels.shape != (n,):
            raise ValueError(f"CrossEntropyLoss: expected labels of shape ({n},), "
                             f"got {shape_text(labels.shape)}")
        bad = (labels < 0) | (labels >= c)
        if bad.any():
            raise ValueError(f"CrossEntropyLoss: expected labels in [0, {c}), "
                             f"got {labels[bad][0]} at position {int(np.argmax(bad))}")
        return np.ascontiguousarray(logits), np.ascontiguousarray(labels, dtype=np.int64)
