"""Optimizers: SGD (momentum, Nesterov, weight decay), Adam and AdamW; a moving
average of the weights (ExponentialMovingAverage).

Each works on the Parameters given (their .data and .grad arrays, updated in
place); the update rules are kernels in cyconv/_optim.pyx with PyTorch's
semantics.  ``lr`` is a plain attribute that schedules may change between steps.
"""
from contextlib import contextmanager

import numpy as np

from cyconv import _optim
from cyconv._checks import number_in
from cyconv._threads import threads_for
from cyconv.nn.module import Parameter


class Optimizer:
    """Shared bookkeeping: the parameters, zero_grad, and the state that a checkpoint keeps.

    ``check_finite=True``: ``step()`` first checks every gradient and raises
    FloatingPointError, with the weights unchanged, when one holds NaN or inf (one NaN
    pixel in a batch otherwise turns every weight into NaN).  It costs one pass over
    the gradients.
    """

    def __init__(self, params, lr, check_finite=False):
        where = type(self).__name__
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{where}: got an empty parameter list")
        seen = {}
        for i, p in enumerate(self.params):
            if not isinstance(p, Parameter):
                raise TypeError(f"{where}: expected Parameter objects, got "
                                f"{type(p).__name__} at position {i}")
            if id(p) in seen:
                raise ValueError(f"{where}: the parameter at position {i} is the one at "
                                 f"position {seen[id(p)]} again; it would be stepped twice")
            seen[id(p)] = i
        self.lr = number_in(where, "lr", lr, 0, float("inf"))
        self.check_finite = bool(check_finite)
        self.step_count = 0
        self.state = [{} for _ in self.params]   # per parameter: name -> ndarray

    def _check_gradients(self):
        if not self.check_finite:
            return
        for i, p in enumerate(self.params):
            if not np.isfinite(p.grad).all():
                raise FloatingPointError(
                    f"{type(self).__name__}.step: the gradient of parameter {i} (shape "
                    f"{p.grad.shape}) holds NaN or inf; no weight was changed")

    def zero_grad(self):
        for p in self.params:
            p.grad[...] = 0

    def _buffer(self, index, name):
        """The named per-parameter buffer, created as zeros on first use."""
        state = self.state[index]
        if name not in state:
            state[name] = np.zeros_like(self.params[index].data)
        return state[name]

    # Attributes that state_dict carries besides lr (set by each subclass).
    HYPERPARAMETERS = ()

    def state_dict(self):
        """{"lr", "step_count", "hyperparameters", "state": [{name: array copy}]}.

        Like torch.optim, every hyperparameter travels with the state, so an
        optimizer built with other settings continues exactly like the saved one.
        """
        return {"lr": self.lr, "step_count": self.step_count,
                "hyperparameters": {name: getattr(self, name) for name in self.HYPERPARAMETERS},
                "state": [{k: v.copy() for k, v in s.items()} for s in self.state]}

    def load_state_dict(self, state_dict):
        state = state_dict["state"]
        if len(state) != len(self.params):
            raise ValueError(f"{type(self).__name__}.load_state_dict: expected state for "
                             f"{len(self.params)} parameters, got {len(state)}")
        for i, (p, s) in enumerate(zip(self.params, state)):
            for name, value in s.items():
                if np.shape(value) != p.data.shape:
                    raise ValueError(f"{type(self).__name__}.load_state_dict: buffer '{name}' of "
                                     f"parameter {i} expected shape {p.data.shape}, "
                                     f"got {np.shape(value)}")
        unknown = set(state_dict.get("hyperparameters", {})) - set(self.HYPERPARAMETERS)
        if unknown:
            raise ValueError(f"{type(self).__name__}.load_state_dict: unexpected "
                             f"hyperparameters {sorted(unknown)} (a state of another optimizer?)")
        for name, value in state_dict.get("hyperparameters", {}).items():
            setattr(self, name, tuple(value) if isinstance(value, list) else value)
        self.lr = float(state_dict["lr"])
        self.step_count = int(state_dict["step_count"])
        self.state = [{k: np.array(v, dtype=p.data.dtype) for k, v in s.items()}
                      for p, s in zip(self.params, state)]


class SGD(Optimizer):
    """p -= lr * d, d = grad + weight_decay * p, through a momentum buffer when momentum > 0."""

    HYPERPARAMETERS = ("momentum", "dampening", "weight_decay", "nesterov")

    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, check_finite=False):
        super().__init__(params, lr, check_finite)
        self.momentum = number_in("SGD", "momentum", momentum, 0, float("inf"))
        self.dampening = number_in("SGD", "dampening", dampening, 0, 1)
        self.weight_decay = number_in("SGD", "weight_decay", weight_decay, 0, float("inf"))
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("SGD: Nesterov momentum requires momentum > 0 and zero dampening")

    def step(self):
        self._check_gradients()
        for i, p in enumerate(self.params):
            threads = threads_for(p.data.size)
            first_step = "momentum_buffer" not in self.state[i]
            buffer = (self._buffer(i, "momentum_buffer") if self.momentum
                      else np.empty(0, p.data.dtype))
            _optim.sgd_step(p.data.reshape(-1), p.grad.reshape(-1), buffer.reshape(-1), self.lr,
                            self.momentum, self.dampening, self.weight_decay, self.nesterov,
                            first_step, threads)
        self.step_count += 1


class Adam(Optimizer):
    """Adam (Kingma & Ba), bias-corrected; weight_decay is added to the gradient."""

    decoupled_weight_decay = False
    HYPERPARAMETERS = ("betas", "eps", "weight_decay")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 check_finite=False):
        super().__init__(params, lr, check_finite)
        where = type(self).__name__
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"{where}: expected betas to be a pair, got {betas!r}")
        self.betas = tuple(number_in(where, "betas", b, 0, 1 - 1e-12) for b in betas)
        self.eps = number_in(where, "eps", eps, 1e-300, float("inf"))
        self.weight_decay = number_in(where, "weight_decay", weight_decay, 0, float("inf"))

    def step(self):
        self._check_gradients()
        self.step_count += 1
        for i, p in enumerate(self.params):
            threads = threads_for(p.data.size)
            _optim.adam_step(p.data.reshape(-1), p.grad.reshape(-1),
                             self._buffer(i, "exp_avg").reshape(-1),
                             self._buffer(i, "exp_avg_sq").reshape(-1),
                             self.lr, self.betas[0], self.betas[1], self.eps, self.weight_decay,
                             self.decoupled_weight_decay, self.step_count, threads)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): p *= 1 - lr * weight_decay."""

    decoupled_weight_decay = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 check_finite=False):
        super().__init__(params, lr, betas, eps, weight_decay, check_finite)


class ExponentialMovingAverage:
    """An exponential moving average of a model's weights (Polyak averaging), to evaluate
    and save in place of the last weights.

    ``update()``, called after every optimizer step, sets
    ``average = d * average + (1 - d) * value`` for every parameter and floating
    buffer (BatchNorm's running statistics; integer buffers are copied), with
    ``d = min(decay, (1 + t) / (10 + t))`` at update ``t`` so that the first
    updates forget the initial weights quickly.  The average covers about the
    last ``1 / (1 - decay)`` steps.  Inside ``with ema.averaged():`` the model
    holds the averages; its own weights come back on exit.  ``averages`` has
    the model's state_dict keys.
    """

    def __init__(self, model, decay=0.999):
        decay = number_in("ExponentialMovingAverage", "decay", decay, 0.0, 1.0)
        if decay == 1.0:
            raise ValueError("ExponentialMovingAverage: decay must be below 1 (1 would never "
                             "move the average)")
        self.model, self.decay, self.updates = model, decay, 0
        self.averages = model.state_dict()

    def update(self):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for key, value in self.model.state_dict(keep_vars=True).items():
            average = self.averages[key]
            if value.dtype.kind == "f":
                _optim.moving_average_step(average.reshape(-1), value.reshape(-1), decay,
                                           threads_for(value.size))
            else:
                average[...] = value

    @contextmanager
    def averaged(self):
        """The model holds the averaged weights inside the ``with`` block."""
        own = self.model.state_dict()
        self.model.load_state_dict(self.averages)
        try:
            yield self.model
        finally:
            self.model.load_state_dict(own)

    def state_dict(self):
        return {"decay": self.decay, "updates": self.updates,
                "averages": {key: value.copy() for key, value in self.averages.items()}}

    def load_state_dict(self, state):
        averages = state["averages"]
        if set(averages) != set(self.averages):
            raise ValueError(f"ExponentialMovingAverage.load_state_dict: keys "
                             f"{sorted(averages)}, the model has {sorted(self.averages)}")
        for key, target in self.averages.items():
            value = np.asarray(averages[key])
            if value.shape != target.shape:
                raise ValueError(f"ExponentialMovingAverage.load_state_dict: '{key}' expected "
                                 f"shape {target.shape}, got {value.shape}")
        for key, target in self.averages.items():
            target[...] = averages[key]
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
