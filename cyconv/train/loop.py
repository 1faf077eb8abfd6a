"""The training loop: Trainer.

Typical use::

    model = cyconv.models.create("small", num_classes=3, image_size=96)
    opt = cyconv.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    run = RunFolder("runs/x", classes=classes, mean=mean, std=std, image_size=(96, 96))
    trainer = Trainer(model, opt, nn.CrossEntropyLoss(), train_loader, valid_loader,
                      epochs=30, schedule=LRSchedule(0.05, "cosine", warmup_epochs=1), run=run)
    history = trainer.fit()              # or trainer.fit(resume=True)

After every epoch the model is evaluated on the valid loader; the run folder
(cyconv.train.run_folder) gets best.safetensors (the best epoch by valid
accuracy, ties going to the lower valid loss), a resumable last.safetensors,
the history and the plots.  A NaN or inf loss raises :class:`TrainingDiverged`
naming the step and the last good checkpoint, which is left untouched; SIGINT
or SIGTERM make ``fit`` save a resumable checkpoint and return with
``trainer.interrupted`` set to the signal's name.  A resumed run is bitwise the
same as the run that was not interrupted (its history equal but for the seconds).
"""
import math
import sys
import time
from contextlib import nullcontext

import numpy as np

from cyconv.train import state
from cyconv.train.metrics import evaluate
from cyconv.train.schedules import LRSchedule
from cyconv.train.signals import SignalGuard


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is left as it was."""


class Trainer:
    """Trains ``model`` with ``optimizer`` and ``loss_fn`` on ``train_loader``.

    ``loss_fn``: ``loss_fn(logits, y)`` -> float and ``loss_fn.backward()`` -> the
    gradient of the logits (e.g. ``nn.CrossEntropyLoss(label_smoothing=0.1)``); ``y`` is
    what the train loader gives: labels, or class probabilities of mixed images (the
    train accuracy then counts the class with the larger share as the label).
    ``epochs``: total number of epochs.  ``schedule``: an :class:`LRSchedule` (its
    epochs and steps per epoch are filled in), any callable ``step -> lr``, or None
    (the optimizer's lr throughout).  ``valid_loader``: evaluated after every epoch
    (without one, the best epoch is chosen by the train accuracy).  ``average``: an
    :class:`cyconv.optim.ExponentialMovingAverage` of the model, updated after every
    step; validation and best.safetensors then use the averaged weights.  ``eval_flip``:
    validate on each image and its mirror image (``evaluate(..., flip=True)``).  ``run``: a
    :class:`RunFolder` (or None: nothing is written).  ``save_every``: also write
    last.safetensors every that many steps.  ``progress``: a tqdm bar per epoch;
    ``verbose``: one line per epoch.  ``handle_signals``: SIGINT/SIGTERM save and stop.
    ``resume_hint``: the text that tells how to resume (in messages).
    """

    def __init__(self, model, optimizer, loss_fn, train_loader, valid_loader=None, *, epochs,
                 schedule=None, average=None, eval_flip=False, run=None, save_every=None,
                 progress=True, verbose=True, handle_signals=True, resume_hint=None):
        if average is not None and average.model is not model:
            raise ValueError("Trainer: the average must be an ExponentialMovingAverage of "
                             "the model being trained")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"Trainer: epochs must be a positive int, got {epochs!r}")
        if not isinstance(eval_flip, (bool, np.bool_)):
            raise TypeError(f"Trainer: eval_flip must be True or False, got {eval_flip!r}")
        self.model, self.optimizer, self.loss_fn, self.average = model, optimizer, loss_fn, average
        self.train_loader, self.valid_loader = train_loader, valid_loader
        self.eval_flip = eval_flip
        self.epochs, self.steps_per_epoch = epochs, len(train_loader)
        if self.steps_per_epoch < 1:
            raise ValueError("Trainer: the train loader yields no batch")
        if isinstance(schedule, LRSchedule):
            schedule.epochs = schedule.epochs or self.epochs
            schedule.steps_per_epoch = schedule.steps_per_epoch or self.steps_per_epoch
        self.schedule, self.run, self.save_every = schedule, run, save_every
        self.progress, self.verbose, self.handle_signals = progress, verbose, handle_signals
        self.resume_hint = resume_hint or "Trainer.fit(resume=True) with the same settings"
        self.position = state.Position()
        self.interrupted = None
        self.last_good = None     # (path, description) of the last checkpoint written

    def lr_at(self, step):
        return self.optimizer.lr if self.schedule is None else float(self.schedule(step))

    # -- checkpoints --------------------------------------------------------------
    def save_last(self):
        """Write the resumable checkpoint last.safetensors (atomically)."""
        if self.run is None:
            return None
        self.run.save_last(self)
        p = self.position
        self.last_good = (self.run.last, f"epoch {p.epoch + 1}, step {p.step_in_epoch}"
                          if p.step_in_epoch else f"end of epoch {p.epoch}")
        return self.run.last

    def load_last(self, path=None):
        """Restore the whole training state from a resumable checkpoint (default: the run's
        last.safetensors)."""
        path = path if path is not None else (self.run.last if self.run else None)
        if path is None or not path.is_file():
            raise FileNotFoundError(f"cannot resume: no checkpoint {path}")
        saved = state.restore(self, path)
        self.last_good = (path, f"epoch {self.position.epoch}")
        return saved

    # -- the loop -------------------------------------------------------------------
    def fit(self, resume=False):
        """Train up to ``epochs``; ``resume``: True (the run's last.safetensors) or a path.

        Returns the history (list of dicts, one per epoch).  On SIGINT/SIGTERM returns
        early with ``self.interrupted`` set, after saving last.safetensors.
        """
        if resume:
            self.load_last(None if resume is True else resume)
            p = self.position
            self._log(f"resumed from {self.last_good[0]} at epoch {p.epoch + 1}, "
                      f"step {p.step_in_epoch}")
        self.interrupted = None
        with self._signal_guard() as guard:
            stop = None
            while self.position.epoch < self.epochs and stop is None:
                stop = self._train_epoch(guard)
                if stop is None or self.position.step_in_epoch == self.steps_per_epoch:
                    self._end_epoch()
                    stop = stop or self._signal(guard)
            if stop is not None:
                self._stop(stop)
            else:
                self._write_best_confusion()
        return self.position.history

    def _stop(self, signal_name):
        self.interrupted = signal_name
        path = self.save_last()
        where = (f"a resumable checkpoint was saved to {path}" if path
                 else "no run folder: nothing was saved")
        p = self.position
        print(f"\nInterrupted by {signal_name} at epoch {p.epoch + 1}, step "
              f"{p.step_in_epoch} of {self.steps_per_epoch}; {where}. "
              f"To resume: {self.resume_hint}", file=sys.stderr, flush=True)

    def _write_best_confusion(self):
        best = self.position.best
        if self.run is not None and best.get("metrics") and self.run.classes:
            self.run.write_confusion(best["metrics"]["confusion"], self.run.classes,
                                     f"valid, best epoch {best['epoch']}")

    def _step(self, x, y):
        """One optimisation step."""
        p = self.position
        lr = self.lr_at(p.global_step)
        self.optimizer.lr = lr
        self.optimizer.zero_grad()
        logits = self.model(x)
        loss = self.loss_fn(logits, y)
        labels = y if np.ndim(y) == 1 else np.argmax(y, axis=1)   # mixed images: larger part
        step = self._step_sums(loss * len(y), int((np.argmax(logits, axis=1) == labels).sum()),
                               len(y))
        if not math.isfinite(step["loss"]):
            self.model.discard_saved()
            where = (f"the last good checkpoint {self.last_good[0]} ({self.last_good[1]}) "
                     "is intact" if self.last_good else "no checkpoint was written yet")
            raise TrainingDiverged(
                f"loss is {step['loss'] / step['seen']} at epoch {p.epoch + 1}, step "
                f"{p.step_in_epoch + 1} of {self.steps_per_epoch} (global step "
                f"{p.global_step + 1}, lr {lr:g}); training stopped and {where}. Lower the "
                "learning rate or check the data.")
        self.model.backward(self.loss_fn.backward(), input_grad=False)
        with self._updating():
            self.optimizer.step()
            if self.average is not None:
                self.average.update()
            for key in ("loss", "correct", "seen"):
                p.sums[key] += step[key]
            p.sums["lr"] = lr
            p.step_in_epoch += 1
            p.global_step += 1

    def _train_epoch(self, guard):
        from tqdm.auto import tqdm

        p = self.position
        self.model.train()
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(p.epoch)
        skip = p.step_in_epoch
        bar = tqdm(total=self.steps_per_epoch, initial=skip, desc=f"epoch {p.epoch + 1}/"
                   f"{self.epochs}", disable=True if not self.progress else None,
                   leave=not self.verbose, dynamic_ncols=True)
        start = timer = time.perf_counter()
        images, stop = 0, None
        try:
            for i, (x, y) in enumerate(self.train_loader):
                if i < skip:
                    continue
                self._step(x, y)
                images += len(y)
                bar.update(1)
                bar.set_postfix({"loss": f"{p.sums['loss'] / p.sums['seen']:.4f}",
                                 "acc": f"{p.sums['correct'] / p.sums['seen']:.3f}",
                                 "img/s": f"{images / max(time.perf_counter() - timer, 1e-9):.0f}"},
                                refresh=False)
                stop = self._signal(guard)
                if stop is not None:
                    break
                if self.save_every and p.global_step % self.save_every == 0 \
                        and p.step_in_epoch < self.steps_per_epoch:
                    p.sums["seconds"] += time.perf_counter() - start
                    start = time.perf_counter()
                    self.save_last()
        finally:
            bar.close()
            p.sums["seconds"] += time.perf_counter() - start
        return stop

    def _end_epoch(self):
        p = self.position
        start = time.perf_counter()
        row = {"epoch": p.epoch + 1, "train_loss": p.sums["loss"] / max(p.sums["seen"], 1),
               "train_acc": p.sums["correct"] / max(p.sums["seen"], 1),
               "valid_loss": None, "valid_acc": None, "lr": p.sums["lr"]}
        with self.average.averaged() if self.average is not None else nullcontext():
            metrics = None
            if self.valid_loader is not None:
                classes = self.run.classes if self.run is not None else None
                metrics = self._evaluate(self.valid_loader, len(classes) if classes else None)
                row.update(valid_loss=metrics["loss"], valid_acc=metrics["accuracy"])
            improved = self._keep_if_best(row, metrics)
        row["seconds"] = p.sums["seconds"] + time.perf_counter() - start
        p.history.append(row)
        self._log(f"epoch {row['epoch']}/{self.epochs}: train loss {row['train_loss']:.4f} "
                  f"acc {row['train_acc']:.4f}"
                  + (f" | valid loss {row['valid_loss']:.4f} acc {row['valid_acc']:.4f}"
                     if metrics is not None else "")
                  + f" | lr {row['lr']:.4g} | {row['seconds']:.1f} s"
                  + (" * (best so far: saved)" if improved else ""))
        p.epoch, p.step_in_epoch, p.sums = p.epoch + 1, 0, state.new_sums()
        if self.run is not None:
            self.save_last()
            self.run.write_history(p.history)
            self.run.write_curves(p.history)

    def _keep_if_best(self, row, metrics):
        """Note the epoch (and save best.safetensors) when its valid accuracy is the best so
        far; equal accuracy (a few hundred valid images often tie) goes to the lower loss."""
        best = self.position.best
        score = row["valid_acc"] if metrics is not None else row["train_acc"]
        loss = row["valid_loss"] if metrics is not None else row["train_loss"]
        if not (score > best["accuracy"] or (score == best["accuracy"]
                                             and loss < best.get("loss", math.inf))):
            return False
        best.clear()
        best.update(accuracy=score, loss=loss, epoch=row["epoch"])
        clean = {k: v for k, v in (metrics or {"accuracy": score}).items()
                 if k not in ("predictions", "labels")}
        if metrics is not None:
            best["metrics"] = clean
        if self.run is not None:
            self.run.save_best(self.model, epoch=row["epoch"], metrics=clean)
        return True

    # -- hook points: a distributed run overrides these (cyconv.distributed.DistributedTrainer)
    def _signal_guard(self):
        return SignalGuard(self.handle_signals)

    def _signal(self, guard):
        """The name of the signal that stops the run, or None."""
        return guard.received

    def _step_sums(self, loss_sum, correct, seen):
        """The step's loss sum, correct predictions and images (of every rank)."""
        return {"loss": loss_sum, "correct": correct, "seen": seen}

    def _updating(self):
        """The context of the step's updates (weights, average, sums, position)."""
        return nullcontext()

    def _evaluate(self, loader, num_classes):
        return evaluate(self.model, loader, num_classes, self.loss_fn, flip=self.eval_flip)

    def _log(self, text):
        if self.verbose:
            from tqdm.auto import tqdm
            tqdm.write(text, file=sys.stdout)
