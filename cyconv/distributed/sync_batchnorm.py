"""SyncBatchNorm: batch normalisation over the whole batch, the parts of every rank
together, and the converter that puts it in place of a model's BatchNorm2d layers."""
import numpy as np

from cyconv import _norm
from cyconv._checks import as_grad_output, as_input
from cyconv._threads import threads_for
from cyconv.nn import BatchNorm2d
from cyconv.nn.conv import empty


class SyncBatchNorm(BatchNorm2d):
    """BatchNorm2d whose train-mode statistics are those of the batch of every rank of
    ``comm`` together, so that R ranks with B images each normalise (and train) as one
    process with R * B images.  eval() behaves as BatchNorm2d (the running statistics).

    Forward: each rank computes its per-channel count, mean and sum of squared
    deviations; all ranks gather them and combine them in rank order (Chan's
    formula, float64).  Backward: the sums of dy and dy * (x - mean) that the input
    gradient needs are summed the same way; weight and bias gradients stay those of
    this rank's images (DataParallel averages them with every other gradient).  The
    ranks may hold different numbers of images: the upstream gradient of each rank
    is that of its own mean loss, and the sums are weighted accordingly.

    It is described (checkpoints, :func:`cyconv.models.describe`) as a BatchNorm2d:
    a checkpoint of a distributed run loads in one process as an ordinary model.
    """

    spec_class = BatchNorm2d

    def __init__(self, num_features, eps=1e-5, momentum=0.1, dtype=np.float32, *, comm):
        super().__init__(num_features, eps, momentum, dtype)
        self.comm = comm

    def _forward(self, x, fuse_relu):
        if not self.training:
            return super()._forward(x, fuse_relu)
        x = as_input(self, x, ("N", self.num_features, "H", "W"), self.dtype)
        n, c, h, w = x.shape
        flat = x.reshape(n, c, h * w)
        threads = threads_for(x.size)
        moments = np.empty((2, c))
        _norm.batch_norm2d_moments(flat, moments[0], moments[1], threads)
        rows = self.comm.gather(np.concatenate([[n * h * w], moments.reshape(-1)]),
                                "the batch statistics of SyncBatchNorm", "batch_norm")
        counts, means, deviations = rows[:, :1], rows[:, 1:1 + c], rows[:, 1 + c:]
        total = counts.sum()
        if total < 2:
            raise ValueError("SyncBatchNorm: expected more than 1 value per channel when "
                             f"training, got {total:g} over all ranks (input of shape "
                             f"{x.shape} here)")
        mean = (counts * means).sum(axis=0) / total
        var = (deviations + counts * (means - mean) ** 2).sum(axis=0) / total
        invstd = 1.0 / np.sqrt(var + self.eps)
        self._update_running_statistics(mean, var, total)
        out = self._output_array(x.shape, x.dtype)
        _norm.batch_norm2d_normalize(flat, self.weight.data, self.bias.data, mean, invstd,
                                     out.reshape(n, c, h * w), fuse_relu, threads)
        self._save_for_backward("sync", x.shape, flat, mean.astype(self.dtype),
                                invstd.astype(self.dtype),
                                out.reshape(n, c, h * w) if fuse_relu else None, total)
        return out

    def _update_running_statistics(self, mean, var, total):
        """As BatchNorm2d: momentum (or a cumulative average), unbiased variance."""
        self.num_batches_tracked += 1
        momentum = (1.0 / int(self.num_batches_tracked) if self.momentum is None
                    else float(self.momentum))
        self.running_mean[...] = (1 - momentum) * self.running_mean + momentum * mean
        self.running_var[...] = ((1 - momentum) * self.running_var
                                 + momentum * var * total / max(total - 1, 1.0))

    def backward(self, grad_output, input_grad=True):
        saved = self._saved_for_backward()
        if saved[0] != "sync":   # eval mode: BatchNorm2d's forward ran
            return super().backward(grad_output, input_grad)
        _, x_shape, flat, mean, invstd, relu_out, total = saved
        n, c, hw = flat.shape
        grad_output = as_grad_output(self, grad_output, x_shape, self.dtype).reshape(n, c, hw)
        grad_input = self._grad_input_array(x_shape, self.dtype)
        dy = grad_input.reshape(n, c, hw) if relu_out is not None else grad_output
        threads = threads_for(flat.size)
        sums = np.empty((2, c))   # sum dy, sum dy * (x - mean) over this rank's images
        _norm.batch_norm2d_backward_sums(
            grad_output, flat, mean, relu_out if relu_out is not None else empty(3, self.dtype),
            grad_input.reshape(n, c, hw), sums[0], sums[1], relu_out is not None, threads)
        self.weight.grad += (sums[1] * invstd).astype(self.dtype)
        self.bias.grad += sums[0].astype(self.dtype)
        if not input_grad:
            return None
        # dy of each rank is the gradient of its own mean loss: weighted by the ranks' batch
        # sizes, the sums are those of one loss over every image, scaled back to this rank's
        summed = self.comm.sum_rows(sums.reshape(-1) * n, "the gradient sums of SyncBatchNorm",
                                    "batch_norm").reshape(2, c) / n
        k = self.weight.data.astype(np.float64) * invstd
        sum_dy_xhat = summed[1] * invstd
        b = -k * invstd * sum_dy_xhat / total
        c0 = -k * summed[0] / total - b * mean
        _norm.batch_norm2d_combine(dy, flat, k, b, c0, grad_input.reshape(n, c, hw), threads)
        return grad_input


def convert_sync_batchnorm(model, comm):
    """Put a :class:`SyncBatchNorm` over the ranks of ``comm`` in place of every
    BatchNorm2d of ``model`` (found with named_modules, replaced with set_submodule).

    Each new layer takes over its BatchNorm2d's Parameter objects and buffers, so an
    optimizer made before still trains them and state_dict keys stay the same.  Returns
    the model (the new layer when ``model`` itself is a BatchNorm2d).  Hooks registered
    on the old layers are not carried over.
    """
    comm = comm.dup()   # the batch norm collectives get a communicator of their own
    layers = [(name, m) for name, m in model.named_modules() if type(m) is BatchNorm2d]
    for name, old in layers:
        new = SyncBatchNorm(old.num_features, old.eps, old.momentum, old.dtype, comm=comm)
        new.weight, new.bias = old.weight, old.bias
        for buffer in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(new, buffer, getattr(old, buffer))
        new.train(old.training)
        if not name:
            return new
        model.set_submodule(name, new)
    return model
