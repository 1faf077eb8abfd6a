"""cyconv: a convolutional-network library written from scratch.

Every layer's forward and backward pass is a Cython kernel over typed
memoryviews; numpy arrays go in and come out.  Importing cyconv changes nothing
in the process (no environment variable, no thread count).
"""
__version__ = "0.2.0"

# isort: off
# first, before any compiled kernel: loads OpenMP with cyconv's settings (_environment.py)
from cyconv import _environment  # noqa: F401
# isort: on
from cyconv import models, nn, onnx, optim
from cyconv._grad_mode import enable_grad, is_grad_enabled, no_grad
from cyconv._random import get_rng_state, manual_seed, set_rng_state
from cyconv._threads import get_num_threads, max_num_threads, set_num_threads
from cyconv.checkpoint import load, save
from cyconv.explain import feature_grid, features, gradcam
from cyconv.inference import predict
from cyconv.profiling import profile

__all__ = ["nn", "optim", "models", "onnx", "no_grad", "enable_grad", "is_grad_enabled",
           "manual_seed", "get_rng_state", "set_rng_state", "get_num_threads",
           "max_num_threads", "set_num_threads", "load", "save", "predict", "gradcam",
           "features", "feature_grid", "profile"]
