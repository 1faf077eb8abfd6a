"""cyconv: a convolutional-network library written from scratch.

Every layer's forward and backward pass is a Cython kernel over typed
memoryviews; numpy arrays go in and come out.
"""
import os

# Idle OpenMP threads sleep instead of spinning.  With GNU OpenMP's default
# (spin for a while), a kernel thread that finished early burns the core that a
# data-loading thread, or the team's own late thread, needs: measured with
# another job on the machine, training ran up to 30x slower.  Set before the
# kernels load the OpenMP runtime; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from cyconv._grad_mode import is_grad_enabled, no_grad  # noqa: E402
from cyconv._random import manual_seed  # noqa: E402
from cyconv._threads import get_num_threads, set_num_threads  # noqa: E402
from cyconv import models, nn, optim, train  # noqa: E402
from cyconv.checkpoint import load, predict, save  # noqa: E402
from cyconv.feature_maps import feature_grid, features  # noqa: E402
from cyconv.gradcam import gradcam  # noqa: E402

__version__ = "0.1.0"

__all__ = ["nn", "optim", "models", "train", "no_grad", "is_grad_enabled", "manual_seed",
           "get_num_threads", "set_num_threads", "load", "save", "predict", "gradcam",
           "features", "feature_grid"]
