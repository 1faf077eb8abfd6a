"""Progressive resizing: smaller training images in the early epochs, which cost less."""
import numpy as np

from cyconv.data.io import as_size


class ProgressiveSize:
    """The side of the training images of each epoch, for ``DataLoader(image_size=)``.

    ``start_size`` until epoch ``ramp[0]``, then rising linearly to ``final_size`` at
    epoch ``ramp[1]`` and staying there, rounded down to a multiple of ``step``
    pixels (but never under ``start_size``), as FFCV's ResNet recipes do.  A step of
    16 keeps every size divisible by a network's total stride of 16, and gives few
    distinct sizes (each new size costs the layers new workspaces once).

    A training step costs less on fewer pixels, though not in proportion to them
    (fixed costs per layer and step remain; ``benchmarks/bench_sizes.py`` measures
    it).  The last epochs at ``final_size`` adapt the network, and its BatchNorm
    statistics, to the size it will see.
    ``size(epoch)`` -> int.
    """

    def __init__(self, start_size, final_size, ramp, step=16):
        start, final = as_size(start_size)[0], as_size(final_size)[0]
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 1:
            raise ValueError(f"ProgressiveSize: step must be an int >= 1, got {step!r}")
        if start > final:
            raise ValueError(f"ProgressiveSize: start_size {start} is larger than "
                             f"final_size {final}")
        begin, end = ramp
        if not 0 <= begin <= end:
            raise ValueError(f"ProgressiveSize: ramp must be (begin, end) epochs with "
                             f"0 <= begin <= end, got {ramp!r}")
        self.start_size, self.final_size, self.ramp, self.step = start, final, (begin, end), step

    def __call__(self, epoch):
        begin, end = self.ramp
        if epoch >= end:
            return self.final_size
        if epoch < begin:
            return self.start_size
        rise = (self.final_size - self.start_size) * (epoch - begin) / (end - begin)
        return max(self.start_size, int(self.start_size + rise) // self.step * self.step)

    def __repr__(self):
        return (f"ProgressiveSize({self.start_size}, {self.final_size}, ramp={self.ramp}, "
                f"step={self.step})")
