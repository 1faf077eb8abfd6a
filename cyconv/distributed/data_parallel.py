"""DataParallel: gradients averaged over the ranks, each layer's sum started as soon as
that layer's gradients are final, so that communication overlaps the rest of backward."""
import numpy as np

from cyconv.distributed.comm import mpi


class _Bucket:
    """The parameters of one module, whose gradients travel as one float64 message:
    ``[count * gradients..., count]`` with count the rank's batch size, so that the sums
    over the ranks divide into the mean over the whole batch (ranks may hold one image
    more than others)."""

    def __init__(self, params):
        self.params = params
        self.buffer = np.zeros(sum(p.data.size for p in params) + 1, np.float64)
        self.request, self.started = None, False

    def _slices(self):
        offset = 0
        for p in self.params:
            yield p.grad.reshape(-1), self.buffer[offset:offset + p.grad.size]
            offset += p.grad.size

    def start(self, comm, count):
        for grad, part in self._slices():
            np.multiply(grad, count, out=part, dtype=np.float64)   # exact in float64
        self.buffer[-1] = count
        self.request, self.started = comm.start_sum(self.buffer), True

    def finish(self):
        for grad, part in self._slices():
            np.divide(part, self.buffer[-1], out=grad, casting="same_kind")
        self.request = None


class DataParallel:
    """Data-parallel training of ``model`` over the ranks of ``comm`` (a
    :class:`~cyconv.distributed.Communicator`).

    On creation every parameter and buffer takes rank 0's values.  From then on,
    each backward of ``model`` ends with every parameter's ``grad`` replaced by the
    mean over the ranks, weighted by their batch sizes: the gradient of the loss
    averaged over the whole batch, as one process would compute it (the loss must be
    the mean over the batch, as cyconv's losses are).  Then step the optimizer as
    usual: every rank makes the same update.

    Each module that owns parameters gets a backward hook for the duration of a
    backward (so forwards still fuse Conv2d/BatchNorm2d with ReLU): when it fires,
    that module's gradients are final and their sum over the ranks starts (MPI
    Iallreduce) while backward goes on through the layers before it; the sums are
    waited for when the model's backward ends.  Every rank starts them in the same
    order (the order of backward).  ``bytes_per_step``: the bytes each rank
    contributes per step.
    """

    def __init__(self, model, comm):
        self.model, self.comm = model, comm.dup()
        self.comm.broadcast(list(model.state_dict(keep_vars=True).values()),
                            "the model's initial parameters and buffers")
        self.buckets = []
        for module in model.modules():
            params = [p for p in module._parameters.values() if p is not None]
            if params:
                self.buckets.append((module, _Bucket(params)))
        self.bytes_per_step = sum(bucket.buffer.nbytes for _, bucket in self.buckets)
        self.batch_size, self._handles = None, []
        model.register_forward_pre_hook(self._note_batch_size)
        model.register_full_backward_pre_hook(self._attach)
        model.register_full_backward_hook(self._finish)

    def _note_batch_size(self, model, inputs):
        self.batch_size = len(inputs[0])

    def _attach(self, model, grad_output):
        if self.batch_size is None:
            raise RuntimeError("DataParallel: backward of a model that ran no forward")
        for _, bucket in self.buckets:
            bucket.started = False
        self._handles = [module.register_full_backward_hook(self._final(bucket))
                         for module, bucket in self.buckets]

    def _final(self, bucket):
        """The hook that starts ``bucket``'s sum once its module's gradients are final."""
        def hook(module, grad_input, grad_output):
            if not bucket.started:
                bucket.start(self.comm, self.batch_size)
                # let MPI move the sums under way along (it progresses only inside its calls)
                mpi().Request.Testall([b.request for _, b in self.buckets
                                       if b.request is not None])
        return hook

    def _finish(self, model, grad_input, grad_output):
        for handle in self._handles:
            handle.remove()
        for _, bucket in self.buckets:   # modules the forward did not use, in a fixed order
            if not bucket.started:
                bucket.start(self.comm, self.batch_size)
        self.comm.wait([bucket.request for _, bucket in self.buckets],
                       "the sum of the gradients over the ranks", "gradients")
        for _, bucket in self.buckets:
            bucket.finish()
        self.batch_size = None
