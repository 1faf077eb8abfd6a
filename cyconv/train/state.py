"""The training state: everything a run needs to continue exactly where it stopped.

``last.safetensors`` holds the model's tensors, the optimizer's buffers
(``optimizer.<i>.<name>``), the moving average's (``average.<key>``), and in its
``training_state`` metadata field: the position (epoch, step), history, best
epoch, the sums of the epoch under way, the optimizer's settings and step count,
the schedule, the number of epochs, the data loader's position, the dropout
streams and cyconv's global random state.

A run resumes only with the settings it was saved with: a resume with another
optimizer, other optimizer settings, another schedule or number of epochs, or
another data set size or batch size is refused with an error that lists the
differences (it would be another run, not this one continued).
"""
from dataclasses import asdict, dataclass, field

import numpy as np

from cyconv import checkpoint
from cyconv._random import get_rng_state, set_rng_state
from cyconv.checkpoint import CheckpointError
from cyconv.models import describe, difference
from cyconv.nn import Dropout


@dataclass
class Position:
    """Where a run stands."""
    epoch: int = 0              # the epoch being (or next to be) trained, 0-based
    step_in_epoch: int = 0      # steps of that epoch already done
    global_step: int = 0
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"accuracy": -1.0, "epoch": None})
    sums: dict = field(default_factory=lambda: new_sums())


def new_sums():
    """The running sums of an epoch under way."""
    return {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0, "lr": None}


def dropout_layers(model):
    return {name or "model": module for name, module in model.named_modules()
            if isinstance(module, Dropout)}


def settings(trainer):
    """The settings a resumed run must share with the saved one."""
    opt = trainer.optimizer.state_dict()
    return {"optimizer": type(trainer.optimizer).__name__,
            "optimizer_settings": opt["hyperparameters"],
            "schedule": trainer.schedule.to_dict() if hasattr(trainer.schedule, "to_dict")
            else None,
            "epochs": trainer.epochs, "steps_per_epoch": trainer.steps_per_epoch,
            "average_decay": None if trainer.average is None else trainer.average.decay}


def save(trainer, path, metadata, **preprocessing):
    """Write the resumable checkpoint of ``trainer`` to ``path``."""
    opt = trainer.optimizer.state_dict()
    tensors = {f"optimizer.{i}.{name}": value
               for i, buffers in enumerate(opt["state"]) for name, value in buffers.items()}
    if trainer.average is not None:
        tensors.update({f"average.{key}": value
                        for key, value in trainer.average.averages.items()})
    state = dict(asdict(trainer.position), settings=settings(trainer),
                 optimizer={"lr": opt["lr"], "step_count": opt["step_count"],
                            "buffers": [sorted(buffers) for buffers in opt["state"]]},
                 loader=trainer.train_loader.state_dict()
                 if hasattr(trainer.train_loader, "state_dict") else None,
                 dropout={name: {"seed": m.seed, "calls": m.calls}
                          for name, m in dropout_layers(trainer.model).items()},
                 rng=get_rng_state(),
                 average=None if trainer.average is None else trainer.average.updates)
    checkpoint.save(trainer.model, path, dict(metadata, training_state=state),
                    extra_tensors=tensors, **preprocessing)


def restore(trainer, path):
    """Restore ``trainer`` from a resumable checkpoint; CheckpointError (naming the file and
    what is wrong) before anything changes when it does not fit."""
    ckpt = checkpoint.read(path)
    state = ckpt.metadata.get("training_state")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a resumable checkpoint (no 'training_state' field)")
    found = difference(describe(trainer.model), ckpt.metadata.get("architecture"))
    if found:
        raise CheckpointError(f"{path}: a checkpoint of another architecture ({found})")
    try:
        _check_settings(path, state["settings"], settings(trainer))
        optimizer_state = _optimizer_state(path, state, ckpt, trainer)
        averages = _averages(path, ckpt, trainer)
        dropouts = dropout_layers(trainer.model)
        if set(dropouts) != set(state["dropout"]):
            raise CheckpointError(f"{path}: its dropout layers are {sorted(state['dropout'])}, "
                                  f"the model's {sorted(dropouts)}")
        checkpoint.load_tensors(trainer.model, ckpt.model_tensors, path)
        trainer.optimizer.load_state_dict(optimizer_state)
        if averages is not None:
            trainer.average.load_state_dict({"decay": trainer.average.decay,
                                             "updates": state["average"], "averages": averages})
        for name, module in dropouts.items():
            module.seed, module.calls = (int(state["dropout"][name]["seed"]),
                                         int(state["dropout"][name]["calls"]))
        if state.get("loader") is not None and hasattr(trainer.train_loader, "load_state_dict"):
            trainer.train_loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        trainer.position = Position(
            epoch=int(state["epoch"]), step_in_epoch=int(state["step_in_epoch"]),
            global_step=int(state["global_step"]), history=list(state["history"]),
            best=dict(state["best"]), sums=dict(state["sums"]))
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{path}: field 'training_state' is incomplete or invalid "
                              f"({type(error).__name__}: {error})") from None
    return state


def _check_settings(path, saved, current):
    changed = [f"{key}: saved {saved.get(key)!r}, now {value!r}"
               for key, value in current.items() if saved.get(key) != _jsonable(value)]
    if changed:
        raise CheckpointError(f"{path}: the run was saved with other settings, and resuming with "
                              "these would make another run: " + "; ".join(changed))


def _jsonable(value):
    """value as it comes back from JSON (tuples become lists)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _optimizer_state(path, state, ckpt, trainer):
    saved = state["optimizer"]
    buffers = saved["buffers"]
    if len(buffers) != len(trainer.optimizer.params):
        raise CheckpointError(f"{path}: optimizer state for {len(buffers)} parameters, the "
                              f"optimizer has {len(trainer.optimizer.params)}")
    tensors = []
    for i, names in enumerate(buffers):
        entry = {}
        for name in names:
            key = f"optimizer.{i}.{name}"
            if key not in ckpt.tensors:
                raise CheckpointError(f"{path}: tensor {key!r} is missing")
            entry[name] = ckpt.tensors[key]
            if entry[name].shape != trainer.optimizer.params[i].data.shape:
                raise CheckpointError(f"{path}: tensor {key!r} has shape "
                                      f"{list(entry[name].shape)}, the parameter "
                                      f"{list(trainer.optimizer.params[i].data.shape)}")
        tensors.append(entry)
    return {"lr": saved["lr"], "step_count": saved["step_count"],
            "hyperparameters": state["settings"]["optimizer_settings"], "state": tensors}


def _averages(path, ckpt, trainer):
    if trainer.average is None:
        return None
    averages = {key: ckpt.tensors.get(f"average.{key}") for key in trainer.average.averages}
    missing = [f"average.{key}" for key, value in averages.items() if value is None]
    if missing:
        raise CheckpointError(f"{path}: tensor {missing[0]!r} is missing")
    for key, value in averages.items():
        if value.shape != trainer.average.averages[key].shape or not np.all(np.isfinite(value)):
            raise CheckpointError(f"{path}: tensor 'average.{key}' does not fit the model")
    return averages
