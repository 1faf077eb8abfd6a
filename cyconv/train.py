"""Training: a Trainer with LR schedules, metrics, checkpoints, exact resume and plots.

Typical use::

    model = cyconv.models.create("small", num_classes=3, image_size=96)
    opt = cyconv.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    trainer = Trainer(model, opt, train_loader, valid_loader, epochs=30,
                      schedule=LRSchedule(0.05, "cosine", warmup_epochs=1),
                      out_dir="runs/x", classes=classes, mean=mean, std=std)
    history = trainer.fit()              # or trainer.fit(resume=True)

Every epoch the model is evaluated on the valid loader, and ``out_dir`` gets

``best.safetensors``
    the model of the best epoch by valid accuracy (only the model's tensors,
    so PyTorch loads it strictly; ``cyconv.load`` rebuilds it), with the
    valid metrics in its metadata;
``last.safetensors``
    the resumable state: model, optimizer buffers (``optimizer.<i>.<name>``
    tensors), and in the ``training_state`` metadata the epoch and step,
    history, optimizer settings, data-loader position, dropout streams and
    cyconv's global RNG state;
``history.jsonl`` / ``history.csv``
    one row per epoch: epoch, train_loss, train_acc, valid_loss, valid_acc,
    lr, seconds;
``curves.png`` and ``confusion_matrix.png``
    loss and accuracy per epoch; the best epoch's valid confusion matrix.

Reliability: checkpoints are written atomically; a NaN or inf loss raises
:class:`TrainingDiverged` (naming the step and the last good checkpoint,
which is left untouched); SIGINT or SIGTERM makes :meth:`Trainer.fit` save
a resumable checkpoint and return with ``trainer.interrupted`` set to the
signal's name.  A run resumed from ``last.safetensors`` is bitwise the same
as the uninterrupted run (history equal except its ``seconds``).
"""
import csv
import io
import json
import math
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from cyconv import _random, checkpoint
from cyconv._grad_mode import no_grad
from cyconv.models import architecture, architecture_difference
from cyconv.nn import CrossEntropyLoss, Dropout, Sequential

HISTORY_FIELDS = ("epoch", "train_loss", "train_acc", "valid_loss", "valid_acc", "lr", "seconds")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is left as it was."""


# ---------------------------------------------------------------------------
# Learning-rate schedules
# ---------------------------------------------------------------------------

class LRSchedule:
    """The learning rate of each optimisation step, a pure function of the step number.

    ``kind``: ``"constant"``, ``"step"`` (multiply by ``gamma`` every
    ``step_size`` epochs) or ``"cosine"`` (from ``lr`` down to ``min_lr`` at
    the end of training).  ``warmup_epochs`` (may be fractional): the rate
    rises linearly from ``lr / warmup_steps`` to ``lr`` first.  ``epochs`` and
    ``steps_per_epoch`` are filled in by the Trainer when left None.
    """

    KINDS = ("constant", "step", "cosine")

    def __init__(self, lr, kind="cosine", warmup_epochs=0.0, step_size=10, gamma=0.1,
                 min_lr=0.0, epochs=None, steps_per_epoch=None):
        if kind not in self.KINDS:
            raise ValueError(f"LRSchedule: kind must be one of {self.KINDS}, got {kind!r}")
        if not lr >= 0 or warmup_epochs < 0 or step_size < 1:
            raise ValueError("LRSchedule: expected lr >= 0, warmup_epochs >= 0, step_size >= 1")
        self.lr, self.kind, self.warmup_epochs = float(lr), kind, float(warmup_epochs)
        self.step_size, self.gamma, self.min_lr = int(step_size), float(gamma), float(min_lr)
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch

    def __call__(self, step):
        spe = self.steps_per_epoch or 1
        total = (self.epochs or 1) * spe
        warmup = int(round(self.warmup_epochs * spe))
        if step < warmup:
            return self.lr * (step + 1) / warmup
        if self.kind == "constant":
            return self.lr
        if self.kind == "step":
            return self.lr * self.gamma ** (step // spe // self.step_size)
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * t))

    def to_dict(self):
        return dict(lr=self.lr, kind=self.kind, warmup_epochs=self.warmup_epochs,
                    step_size=self.step_size, gamma=self.gamma, min_lr=self.min_lr,
                    epochs=self.epochs, steps_per_epoch=self.steps_per_epoch)


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------

def confusion_matrix(labels, predictions, num_classes):
    """(C, C) int64 counts: row = true class, column = predicted class."""
    labels, predictions = np.asarray(labels, np.int64), np.asarray(predictions, np.int64)
    return np.bincount(labels * num_classes + predictions,
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(matrix):
    """accuracy, per-class precision, recall and f1 (lists; 0 where undefined) of a confusion matrix."""
    m = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(m)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.nan_to_num(tp / m.sum(axis=0))
        recall = np.nan_to_num(tp / m.sum(axis=1))
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return dict(accuracy=float(tp.sum() / max(m.sum(), 1)), precision=precision.tolist(),
                recall=recall.tolist(), f1=f1.tolist())


def format_confusion(matrix, classes):
    """A text table of the confusion matrix with per-class precision and recall."""
    matrix = np.asarray(matrix)
    stats = metrics_from_confusion(matrix)
    names = [str(c) for c in classes]
    first = max(len("true \\ predicted"), max(len(n) for n in names)) + 2
    width = max(8, max(len(n) for n in names) + 2, len(str(matrix.max())) + 2)
    lines = ["true \\ predicted".ljust(first) + "".join(n.rjust(width) for n in names)
             + "recall".rjust(9)]
    for i, name in enumerate(names):
        lines.append(name.ljust(first) + "".join(str(v).rjust(width) for v in matrix[i])
                     + f"{stats['recall'][i]:9.3f}")
    lines.append("precision".ljust(first) + "".join(f"{p:.3f}".rjust(width)
                                                   for p in stats["precision"]))
    return "\n".join(lines)


def evaluate(model, loader, num_classes=None):
    """Loss, accuracy, confusion matrix, per-class precision/recall of ``model`` on ``loader``.

    Runs in eval mode without gradients (the model's mode is restored).
    Returns a dict: ``loss``, ``accuracy``, ``confusion`` (list of lists),
    ``precision``, ``recall``, ``f1`` (lists), ``predictions`` (int64 array)
    and ``labels`` (int64 array), in the loader's order.
    """
    was_training = model.training
    model.eval()
    loss_fn = CrossEntropyLoss()
    total, count, preds, labels = 0.0, 0, [], []
    with no_grad():
        for x, y in loader:
            logits = model(x)
            total += loss_fn(logits, y) * len(y)
            count += len(y)
            preds.append(np.argmax(logits, axis=1))
            labels.append(np.asarray(y))
    model.train(was_training)
    preds = np.concatenate(preds) if preds else np.empty(0, np.int64)
    labels = np.concatenate(labels) if labels else np.empty(0, np.int64)
    if num_classes is None:
        num_classes = len(getattr(loader.dataset, "classes", [])) or int(
            max(preds.max(initial=0), labels.max(initial=0)) + 1)
    matrix = confusion_matrix(labels, preds, num_classes)
    result = dict(loss=total / max(count, 1), **metrics_from_confusion(matrix),
                  confusion=matrix.tolist())
    result.update(predictions=preds.astype(np.int64), labels=labels.astype(np.int64))
    return result


# ---------------------------------------------------------------------------
# Plots and history files
# ---------------------------------------------------------------------------

def _png_bytes(figure):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def plot_curves(history, path):
    """curves.png: train/valid loss (left) and accuracy (right) per epoch."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    fig = Figure(figsize=(10, 4))
    epochs = [row["epoch"] for row in history]
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "acc")):
        for split in ("train", "valid"):
            values = [row.get(f"{split}_{metric}") for row in history]
            if any(v is not None for v in values):
                ax.plot(epochs, [np.nan if v is None else v for v in values], "o-", label=split)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("accuracy" if metric == "acc" else "loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    checkpoint.atomic_write(path, _png_bytes(fig))


def plot_confusion(matrix, classes, path, title="confusion matrix"):
    """confusion_matrix.png: counts, rows = true class, columns = predicted class."""
    from matplotlib.figure import Figure
    matrix = np.asarray(matrix)
    n = len(classes)
    fig = Figure(figsize=(1.2 * n + 2.5, 1.2 * n + 2))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), [str(c) for c in classes], rotation=45, ha="right")
    ax.set_yticks(range(n), [str(c) for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > threshold else "black")
    fig.tight_layout()
    checkpoint.atomic_write(path, _png_bytes(fig))


def write_history(history, out_dir):
    """history.jsonl and history.csv (atomically rewritten)."""
    out_dir = Path(out_dir)
    lines = "".join(json.dumps({k: row.get(k) for k in HISTORY_FIELDS}) + "\n" for row in history)
    checkpoint.atomic_write(out_dir / "history.jsonl", lines.encode())
    text = io.StringIO()
    writer = csv.DictWriter(text, HISTORY_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    checkpoint.atomic_write(out_dir / "history.csv", text.getvalue().encode())


# ---------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------

def _named_modules(module, prefix=""):
    yield prefix, module
    for name, child in module.children():
        yield from _named_modules(child, f"{prefix}{name}." if prefix or name else "")


def _dropouts(model):
    return {name.rstrip(".") or "model": m for name, m in _named_modules(model)
            if isinstance(m, Dropout)}


_OPTIMIZER_SETTINGS = ("momentum", "dampening", "weight_decay", "nesterov", "betas", "eps")


class Trainer:
    """Trains ``model`` (an nn.Sequential) with ``optimizer`` on ``train_loader``.

    ``epochs``: total number of epochs.  ``schedule``: an :class:`LRSchedule`
    (its epochs and steps per epoch are filled in), any callable
    ``step -> lr``, or None (the optimizer's lr throughout).
    ``valid_loader``: evaluated after every epoch (best.safetensors is chosen
    by its accuracy, ties by its loss; by the train accuracy and loss without one).
    ``out_dir``: where checkpoints, history and plots go (None: nowhere).
    ``classes``, ``mean``, ``std``, ``image_size``: stored in checkpoints.
    ``metadata``: JSON-able dict stored in every checkpoint (e.g. the config).
    ``label_smoothing``: of the training loss.  ``progress``: tqdm bar per
    epoch (shown on a terminal); ``verbose``: one summary line per epoch.
    ``save_every``: also write last.safetensors every that many steps.
    ``average``: an :class:`cyconv.optim.ExponentialMovingAverage` of the
    model, updated after every step; the valid evaluation and best.safetensors
    then use the averaged weights (last.safetensors keeps both).
    ``handle_signals``: SIGINT/SIGTERM save a resumable checkpoint and stop.
    ``resume_hint``: the text that tells how to resume (in messages).
    """

    def __init__(self, model, optimizer, train_loader, valid_loader=None, *, epochs,
                 schedule=None, out_dir=None, classes=None, mean=None, std=None,
                 image_size=None, metadata=None, label_smoothing=0.0, progress=True,
                 verbose=True, save_every=None, handle_signals=True, resume_hint=None,
                 average=None):
        if not isinstance(model, Sequential):
            raise TypeError(f"Trainer: expected an nn.Sequential model, got {type(model).__name__}")
        if average is not None and average.model is not model:
            raise ValueError("Trainer: the average must be an ExponentialMovingAverage of "
                             "the model being trained")
        self.model, self.optimizer, self.average = model, optimizer, average
        self.train_loader, self.valid_loader = train_loader, valid_loader
        self.epochs = int(epochs)
        self.steps_per_epoch = len(train_loader)
        if isinstance(schedule, LRSchedule):
            schedule.epochs = schedule.epochs or self.epochs
            schedule.steps_per_epoch = schedule.steps_per_epoch or self.steps_per_epoch
        self.schedule = schedule
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.classes = None if classes is None else list(classes)
        self.mean, self.std, self.image_size = mean, std, image_size
        self.metadata = dict(metadata or {})
        self.loss_fn = CrossEntropyLoss(label_smoothing)
        self.progress, self.verbose = progress, verbose
        self.save_every = save_every
        self.handle_signals = handle_signals
        self.resume_hint = resume_hint or "Trainer.fit(resume=True) with the same settings"
        # training state
        self.epoch = 0            # the epoch being (or next to be) trained, 0-based
        self.step_in_epoch = 0    # steps of that epoch already done
        self.global_step = 0
        self.history = []
        self.best = {"accuracy": -1.0, "epoch": None}
        self._sums = self._new_sums()
        self.interrupted = None
        self._signal = None
        self.last_good = None     # (path, description) of the last checkpoint written

    @staticmethod
    def _new_sums():
        return {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0, "lr": None}

    @property
    def best_path(self):
        return None if self.out_dir is None else self.out_dir / "best.safetensors"

    @property
    def last_path(self):
        return None if self.out_dir is None else self.out_dir / "last.safetensors"

    # -- the learning rate --------------------------------------------------------
    def lr_at(self, step):
        return self.optimizer.lr if self.schedule is None else float(self.schedule(step))

    # -- state ------------------------------------------------------------------
    def _checkpoint_info(self):
        return dict(classes=self.classes, mean=self.mean, std=self.std,
                    image_size=self.image_size)

    def training_state(self):
        """The JSON-able part of the resumable state (the tensors are the model's and optimizer's)."""
        opt = self.optimizer
        settings = {k: getattr(opt, k) for k in _OPTIMIZER_SETTINGS if hasattr(opt, k)}
        return {
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step, "epochs": self.epochs,
            "steps_per_epoch": self.steps_per_epoch,
            "epoch_sums": self._sums, "history": self.history, "best": self.best,
            "optimizer": {"type": type(opt).__name__, "lr": opt.lr,
                          "step_count": opt.step_count, "settings": settings,
                          "buffers": [sorted(s) for s in opt.state]},
            "loader": self.train_loader.state_dict() if hasattr(self.train_loader, "state_dict")
            else None,
            "dropout": {name: {"seed": m.seed, "calls": m.calls}
                        for name, m in _dropouts(self.model).items()},
            "rng": _random._generator.bit_generator.state,
            "schedule": self.schedule.to_dict() if isinstance(self.schedule, LRSchedule)
            else None,
            "average": None if self.average is None else
            {"decay": self.average.decay, "updates": self.average.updates},
        }

    def save_last(self):
        """Write the resumable checkpoint last.safetensors (atomically)."""
        if self.out_dir is None:
            return None
        tensors = {f"optimizer.{i}.{name}": value
                   for i, s in enumerate(self.optimizer.state) for name, value in s.items()}
        if self.average is not None:
            tensors.update({f"average.{key}": value
                            for key, value in self.average.averages.items()})
        checkpoint.save(self.last_path, self.model,
                        dict(self.metadata, training_state=self.training_state()),
                        extra_tensors=tensors, **self._checkpoint_info())
        self.last_good = (self.last_path, f"epoch {self.epoch + 1}, step {self.step_in_epoch}"
                          if self.step_in_epoch else f"end of epoch {self.epoch}")
        return self.last_path

    def load_last(self, path=None):
        """Restore the whole training state from a resumable checkpoint (default: last.safetensors)."""
        path = Path(path) if path is not None else self.last_path
        if path is None or not path.is_file():
            raise FileNotFoundError(f"cannot resume: no checkpoint {path}")
        ckpt = checkpoint.read(path)
        meta = ckpt.metadata
        state = meta.get("training_state")
        if not isinstance(state, dict):
            raise checkpoint.CheckpointError(f"{path}: not a resumable checkpoint (no "
                                             "'training_state' metadata field)")
        difference = architecture_difference(architecture(self.model), meta.get("architecture", []))
        if difference:
            raise checkpoint.CheckpointError(f"{path}: a checkpoint of another architecture "
                                             f"({difference})")
        try:
            opt_state = state["optimizer"]
            if opt_state["type"] != type(self.optimizer).__name__:
                raise checkpoint.CheckpointError(
                    f"{path}: field 'training_state.optimizer.type' is {opt_state['type']}, "
                    f"the trainer's optimizer is {type(self.optimizer).__name__}")
            buffers = opt_state["buffers"]
            if len(buffers) != len(self.optimizer.params):
                raise checkpoint.CheckpointError(
                    f"{path}: field 'training_state.optimizer.buffers' has {len(buffers)} "
                    f"entries, the optimizer {len(self.optimizer.params)} parameters")
            opt_tensors = []
            for i, names in enumerate(buffers):
                entry = {}
                for name in names:
                    key = f"optimizer.{i}.{name}"
                    if key not in ckpt.tensors:
                        raise checkpoint.CheckpointError(f"{path}: tensor {key!r} is missing")
                    entry[name] = ckpt.tensors[key]
                opt_tensors.append(entry)
            dropouts = _dropouts(self.model)
            if set(dropouts) != set(state["dropout"]):
                raise checkpoint.CheckpointError(
                    f"{path}: field 'training_state.dropout' names layers "
                    f"{sorted(state['dropout'])}, the model has {sorted(dropouts)}")
            if state["steps_per_epoch"] != self.steps_per_epoch:
                raise checkpoint.CheckpointError(
                    f"{path}: field 'training_state.steps_per_epoch' is "
                    f"{state['steps_per_epoch']}, this run has {self.steps_per_epoch} "
                    "(another data set or batch size?)")
            average = None
            if (state.get("average") is None) != (self.average is None):
                raise checkpoint.CheckpointError(
                    f"{path}: the run was saved {'without' if self.average else 'with'} a "
                    f"moving average of the weights, this trainer has "
                    f"{'one' if self.average else 'none'}")
            if self.average is not None:
                averages = {key: ckpt.tensors.get(f"average.{key}")
                            for key in self.average.averages}
                missing = [f"average.{key}" for key, value in averages.items() if value is None]
                if missing:
                    raise checkpoint.CheckpointError(f"{path}: tensor {missing[0]!r} is missing")
                average = dict(state["average"], averages=averages)
            # the model's load checks every tensor before changing anything
            checkpoint._check_against(path, self.model, ckpt.model_tensors)
            try:
                self.optimizer.load_state_dict({"lr": opt_state["lr"],
                                                "step_count": opt_state["step_count"],
                                                "state": opt_tensors})
            except ValueError as error:
                raise checkpoint.CheckpointError(f"{path}: optimizer state: {error}") from None
            if average is not None:
                try:
                    self.average.load_state_dict(average)
                except ValueError as error:
                    raise checkpoint.CheckpointError(f"{path}: {error}") from None
            for name, m in dropouts.items():
                m.seed, m.calls = int(state["dropout"][name]["seed"]), \
                    int(state["dropout"][name]["calls"])
            if state.get("loader") is not None and hasattr(self.train_loader, "load_state_dict"):
                self.train_loader.load_state_dict(state["loader"])
            _random._generator.bit_generator.state = state["rng"]
            self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
            self.global_step = int(state["global_step"])
            self.history, self.best = list(state["history"]), dict(state["best"])
            self._sums = dict(state["epoch_sums"])
        except (KeyError, TypeError) as error:
            raise checkpoint.CheckpointError(f"{path}: field 'training_state' is incomplete or "
                                             f"invalid ({type(error).__name__}: {error})") from None
        self.last_good = (path, f"epoch {self.epoch}")
        return state

    def _save_best(self, metrics):
        if self.out_dir is None:
            return
        clean = {k: v for k, v in metrics.items() if k not in ("predictions", "labels")}
        checkpoint.save(self.best_path, self.model,
                        dict(self.metadata, epoch=self.epoch + 1, metrics=clean),
                        **self._checkpoint_info())

    # -- signals ----------------------------------------------------------------
    def _on_signal(self, signum, frame):
        if self._signal is not None:   # a second Ctrl-C: stop now (files stay intact)
            raise KeyboardInterrupt
        self._signal = signal.Signals(signum).name

    def _install_signals(self):
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, self._on_signal)
        return previous

    # -- the loop ---------------------------------------------------------------
    def _log(self, text):
        if self.verbose:
            from tqdm.auto import tqdm
            tqdm.write(text, file=sys.stdout)

    def _train_epoch(self):
        from tqdm.auto import tqdm

        model, opt, loader = self.model, self.optimizer, self.train_loader
        model.train()
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.epoch)
        skip = self.step_in_epoch
        bar = tqdm(total=self.steps_per_epoch, initial=skip, desc=f"epoch {self.epoch + 1}/"
                   f"{self.epochs}", disable=True if not self.progress else None,
                   leave=not self.verbose,
                   dynamic_ncols=True)
        sums = self._sums
        start = time.perf_counter()
        images_timed, timer = 0, time.perf_counter()
        try:
            for i, (x, y) in enumerate(loader):
                if i < skip:
                    continue
                lr = self.lr_at(self.global_step)
                opt.lr = lr
                opt.zero_grad()
                logits = model(x)
                loss = self.loss_fn(logits, y)
                if not math.isfinite(loss):
                    where = (f"the last good checkpoint {self.last_good[0]} ({self.last_good[1]}) "
                             "is intact" if self.last_good else "no checkpoint was written yet")
                    raise TrainingDiverged(
                        f"loss is {loss} at epoch {self.epoch + 1}, step {i + 1} of "
                        f"{self.steps_per_epoch} (global step {self.global_step + 1}, lr {lr:g}); "
                        f"training stopped and {where}. Lower the learning rate or check the data.")
                model.backward(self.loss_fn.backward(), input_grad=False)
                opt.step()
                if self.average is not None:
                    self.average.update()
                sums["loss"] += loss * len(y)
                sums["correct"] += int((np.argmax(logits, axis=1) == y).sum())
                sums["seen"] += len(y)
                sums["lr"] = lr
                self.step_in_epoch += 1
                self.global_step += 1
                images_timed += len(y)
                elapsed = time.perf_counter() - timer
                bar.update(1)
                bar.set_postfix({"loss": f"{sums['loss'] / sums['seen']:.4f}",
                                 "acc": f"{sums['correct'] / sums['seen']:.3f}",
                                 "img/s": f"{images_timed / max(elapsed, 1e-9):.0f}"},
                                refresh=False)
                if self._signal is not None:
                    break
                if self.save_every and self.global_step % self.save_every == 0 \
                        and self.step_in_epoch < self.steps_per_epoch:
                    sums["seconds"] += time.perf_counter() - start
                    start = time.perf_counter()
                    self.save_last()
        finally:
            bar.close()
            sums["seconds"] += time.perf_counter() - start

    def fit(self, resume=False):
        """Train up to ``epochs``; ``resume``: True (out_dir/last.safetensors) or a path.

        Returns the history (list of dicts, one per epoch).  On SIGINT/SIGTERM
        returns early with ``self.interrupted`` set, after saving last.safetensors.
        """
        if resume:
            self.load_last(None if resume is True else resume)
            self._log(f"resumed from {self.last_good[0]} at epoch {self.epoch + 1}, "
                      f"step {self.step_in_epoch}")
        previous = self._install_signals()
        self._signal = self.interrupted = None
        try:
            while self.epoch < self.epochs and self._signal is None:
                self._train_epoch()
                if self._signal is not None and self.step_in_epoch < self.steps_per_epoch:
                    break
                self._end_epoch()
            if self._signal is not None:
                self.interrupted = self._signal
                path = self.save_last()
                where = (f"a resumable checkpoint was saved to {path}" if path
                         else "no out_dir: nothing was saved")
                print(f"\nInterrupted by {self._signal} at epoch {self.epoch + 1}, step "
                      f"{self.step_in_epoch} of {self.steps_per_epoch}; {where}. "
                      f"To resume: {self.resume_hint}", file=sys.stderr, flush=True)
            elif self.out_dir is not None and self.best["epoch"] is not None:
                best = self.best.get("metrics")
                if best and self.classes:
                    plot_confusion(best["confusion"], self.classes,
                                   self.out_dir / "confusion_matrix.png",
                                   f"valid, best epoch {self.best['epoch']}")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.history

    def _end_epoch(self):
        sums = self._sums
        start = time.perf_counter()
        row = {"epoch": self.epoch + 1,
               "train_loss": sums["loss"] / max(sums["seen"], 1),
               "train_acc": sums["correct"] / max(sums["seen"], 1),
               "valid_loss": None, "valid_acc": None, "lr": sums["lr"]}
        metrics = None
        with self.average.averaged() if self.average is not None else nullcontext():
            if self.valid_loader is not None:
                metrics = evaluate(self.model, self.valid_loader,
                                   len(self.classes) if self.classes else None)
                row.update(valid_loss=metrics["loss"], valid_acc=metrics["accuracy"])
            score = row["valid_acc"] if metrics is not None else row["train_acc"]
            loss = row["valid_loss"] if metrics is not None else row["train_loss"]
            # equal accuracy (a few hundred valid images often tie): the lower loss wins
            improved = score > self.best["accuracy"] or (
                score == self.best["accuracy"] and loss < self.best.get("loss", math.inf))
            if improved:
                self.best = {"accuracy": score, "loss": loss, "epoch": self.epoch + 1}
                if metrics is not None:
                    self.best["metrics"] = {k: v for k, v in metrics.items()
                                            if k not in ("predictions", "labels")}
                self._save_best(metrics or {"accuracy": score})
        row["seconds"] = sums["seconds"] + time.perf_counter() - start
        self.history.append(row)
        self._log(f"epoch {row['epoch']}/{self.epochs}: train loss {row['train_loss']:.4f} "
                  f"acc {row['train_acc']:.4f}"
                  + (f" | valid loss {row['valid_loss']:.4f} acc {row['valid_acc']:.4f}"
                     if metrics is not None else "")
                  + f" | lr {row['lr']:.4g} | {row['seconds']:.1f} s" + (" *" if improved else ""))
        self.epoch += 1
        self.step_in_epoch = 0
        self._sums = self._new_sums()
        if self.out_dir is not None:
            self.save_last()
            write_history(self.history, self.out_dir)
            plot_curves(self.history, self.out_dir / "curves.png")


def fit(model, optimizer, train_loader, valid_loader=None, **kwargs):
    """``Trainer(model, optimizer, train_loader, valid_loader, **kwargs).fit()`` -> the Trainer."""
    resume = kwargs.pop("resume", False)
    trainer = Trainer(model, optimizer, train_loader, valid_loader, **kwargs)
    trainer.fit(resume=resume)
    return trainer
