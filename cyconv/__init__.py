"""cyconv: a convolutional-network library written from scratch.

Every layer's forward and backward pass is a Cython kernel over typed
memoryviews; numpy arrays go in and come out.
"""
import os

# Idle OpenMP threads spin only briefly (GNU OpenMP: 10,000 rounds, a fraction
# of a millisecond), then sleep.  With GNU OpenMP's default (spin for about
# 3 ms), a kernel thread that finished early burns the core that a
# data-loading thread, or the team's own late thread, needs: measured with
# another job on the machine, training ran up to 30x slower.  Sleeping at once
# (no spin) costs a wake-up before every kernel instead: on 2 cores, training
# at batch 16 on 2 threads ran at 710-850 images/s against 800-960 with the
# short spin, and a real epoch through the DataLoader took 1.05-1.21x the
# compute time against 0.89-0.96x.  Set before the kernels load the OpenMP
# runtime; values the user set are kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

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
