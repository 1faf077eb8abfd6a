"""CrossEntropyLoss: softmax + cross-entropy, fused and numerically stable."""
import numpy as np

from cyconv import _loss
from cyconv._checks import number_in, shape_text
from cyconv._threads import threads_for


class CrossEntropyLoss:
    """loss = mean_n [logsumexp(z_n) - sum_j t_nj z_nj], t = (1 - eps) q + eps / C.

    logits z (N, C) float32/float64.  The target is, as in PyTorch, either class labels
    y (N,) integers in [0, C) (q = onehot(y)) or class probabilities q (N, C) of the
    logits' dtype, each row in [0, 1] summing to 1 (mixed images, e.g. CutMix).
    ``loss_fn(logits, target)`` returns a Python float; ``loss_fn.backward()``
    returns dL/dz = (softmax(z) - t) / N, shape (N, C).
    """

    def __init__(self, label_smoothing=0.0):
        self.label_smoothing = number_in("CrossEntropyLoss", "label_smoothing", label_smoothing,
                                         0, 1)
        self._saved = None

    def __call__(self, logits, target):
        return self.forward(logits, target)

    def forward(self, logits, target):
        logits = self._check_logits(logits)
        soft = (isinstance(target, np.ndarray) and target.ndim == 2
                and target.dtype.kind == "f")
        target = self._check_probabilities(target, logits) if soft else \
            self._check_labels(target, logits)
        n, _ = logits.shape
        probs = np.empty_like(logits)
        losses = np.empty(n, np.float64)
        kernel = (_loss.softmax_cross_entropy_soft_forward if soft
                  else _loss.softmax_cross_entropy_forward)
        loss = kernel(logits, target, probs, losses, self.label_smoothing,
                      threads_for(logits.size))
        self._saved = (probs, target, soft)
        return float(loss)

    def backward(self):
        """dL/dlogits for the last forward call."""
        if self._saved is None:
            raise RuntimeError("CrossEntropyLoss.backward called before the loss was computed")
        probs, target, soft = self._saved
        grad = np.empty_like(probs)
        kernel = (_loss.softmax_cross_entropy_soft_backward if soft
                  else _loss.softmax_cross_entropy_backward)
        kernel(probs, target, grad, self.label_smoothing, threads_for(probs.size))
        return grad

    @staticmethod
    def _check_logits(logits):
        if not isinstance(logits, np.ndarray) or logits.dtype not in (np.float32, np.float64):
            raise TypeError("CrossEntropyLoss: expected float32 or float64 logits, got "
                            + (str(logits.dtype) if isinstance(logits, np.ndarray)
                               else type(logits).__name__))
        if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
            raise ValueError(f"CrossEntropyLoss: expected logits of shape (N, C), "
                             f"got {shape_text(logits.shape)}")
        return np.ascontiguousarray(logits)

    @staticmethod
    def _check_labels(labels, logits):
        labels = np.asarray(labels)
        if labels.dtype.kind not in "iu":
            raise TypeError(f"CrossEntropyLoss: expected integer labels (N,) or class "
                            f"probabilities (N, C), got {labels.dtype} of shape "
                            f"{shape_text(labels.shape)}")
        n, c = logits.shape
        if labels.shape != (n,):
            raise ValueError(f"CrossEntropyLoss: expected labels of shape ({n},) (or class "
                             f"probabilities ({n}, {c}) of the logits' dtype), "
                             f"got {shape_text(labels.shape)}")
        bad = (labels < 0) | (labels >= c)
        if bad.any():
            raise ValueError(f"CrossEntropyLoss: expected labels in [0, {c}), "
                             f"got {labels[bad][0]} at position {int(np.argmax(bad))}")
        return np.ascontiguousarray(labels, dtype=np.int64)

    @staticmethod
    def _check_probabilities(probabilities, logits):
        if probabilities.dtype != logits.dtype:
            raise TypeError(f"CrossEntropyLoss: expected class probabilities of the logits' "
                            f"dtype {logits.dtype}, got {probabilities.dtype}")
        if probabilities.shape != logits.shape:
            raise ValueError(f"CrossEntropyLoss: expected class probabilities of the logits' "
                             f"shape {shape_text(logits.shape)}, "
                             f"got {shape_text(probabilities.shape)}")
        outside = ~((probabilities >= 0) & (probabilities <= 1))
        if outside.any():
            row, col = np.argwhere(outside)[0]
            raise ValueError(f"CrossEntropyLoss: expected class probabilities in [0, 1], got "
                             f"{probabilities[row, col]} at row {row}, class {col}")
        sums = probabilities.sum(axis=1, dtype=np.float64)
        off = np.abs(sums - 1) > 1e-5 * probabilities.shape[1]
        if off.any():
            row = int(np.argmax(off))
            raise ValueError(f"CrossEntropyLoss: expected each row of class probabilities to "
                             f"sum to 1, got {sums[row]:.6g} in row {row}")
        return np.ascontiguousarray(probabilities)
