"""DistributedTrainer: the Trainer of one rank of a data-parallel run, and evaluation
over the ranks."""
import signal
import sys
import zlib
from contextlib import contextmanager, nullcontext

from cyconv._random import get_rng_state, set_rng_state
from cyconv.distributed.data_parallel import DataParallel
from cyconv.models import describe
from cyconv.train import Trainer, state
from cyconv.train.metrics import confusion_matrix, metrics_from_confusion
from cyconv.train.metrics import evaluate as evaluate_here
from cyconv.train.signals import SignalGuard


def evaluate(comm, model, loader, num_classes=None, loss_fn=None, flip=False):
    """:func:`cyconv.train.evaluate` over every rank's part of the data (a
    :class:`ShardedLoader`): loss, accuracy, confusion matrix, precision, recall and f1
    of all the ranks' images together, the same on every rank (without the per-image
    predictions, which stay with each rank)."""
    here = evaluate_here(model, loader, num_classes, loss_fn, flip)
    classes = comm.max(len(here["confusion"]), "the number of classes of the evaluation")
    matrix = confusion_matrix(here["labels"], here["predictions"], classes)
    count = len(here["labels"])
    totals = comm.sum_rows([here["loss"] * count, count] + matrix.reshape(-1).tolist(),
                           "the sum of the evaluation over the ranks", "control")
    matrix = totals[2:].round().astype(int).reshape(classes, classes)
    return dict(loss=float(totals[0] / max(totals[1], 1)), **metrics_from_confusion(matrix),
                confusion=matrix.tolist())


class _ReadOnlyRun:
    """Rank 0's run folder as the other ranks see it: they read it (the checkpoint to
    resume, the classes) and write nothing."""

    WRITES = ("save_best", "save_last", "write_history", "write_curves", "write_confusion")

    def __init__(self, run):
        self._run = run

    def __getattr__(self, name):
        if name in self.WRITES:
            return lambda *args, **kwargs: None
        return getattr(self._run, name)


class _SavingGuard(SignalGuard):
    """A SignalGuard that also calls ``save()`` the moment a signal comes, or at the end
    of the ``deferring()`` block it comes in."""

    def __init__(self, enabled, save):
        super().__init__(enabled)
        self._save, self._deferred, self._pending = save, 0, False

    def _on_signal(self, signum, frame):
        super()._on_signal(signum, frame)
        if self._deferred:
            self._pending = True
        else:
            self._save()

    @contextmanager
    def deferring(self):
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1
            if not self._deferred and self._pending:
                self._pending = False
                self._save()


class DistributedTrainer(Trainer):
    """The :class:`~cyconv.train.Trainer` of one rank of a data-parallel run over the
    ranks of ``comm``; every rank runs it with the same arguments, and its own
    :class:`ShardedLoader` s.

    On creation the model gets a :class:`DataParallel` (rank 0's weights, gradients
    averaged over the ranks) and the moving average rank 0's averages; the ranks
    check that they hold the same architecture and settings.  Each step's loss and
    accuracy, and each evaluation, are summed over the ranks; the history is that
    of the whole batch.  Only rank 0 writes the run folder, prints and shows the
    progress bar.  A resume reads the run's last.safetensors on every rank (a folder
    that every rank sees, as the data).

    Signals.  The ranks stop together: after every step they agree on whether any of
    them received SIGINT or SIGTERM.  As a launcher may kill the ranks soon after
    passing a signal on (mpirun: SIGKILL 0.25 s after SIGTERM), rank 0 also writes
    last.safetensors the moment it receives one, with the state of the last finished
    step, then again when the ranks have stopped.
    """

    def __init__(self, comm, model, optimizer, loss_fn, train_loader, valid_loader=None, *,
                 run=None, progress=True, verbose=True, **kwargs):
        if run is not None and not comm.is_root:
            run = _ReadOnlyRun(run)
        super().__init__(model, optimizer, loss_fn, train_loader, valid_loader, run=run,
                         progress=progress and comm.is_root, verbose=verbose and comm.is_root,
                         **kwargs)
        self.comm = comm.dup()
        self.data_parallel = DataParallel(model, comm)
        if self.average is not None:
            self.comm.broadcast(list(self.average.averages.values()), "the moving average")
        self.comm.check_same("the model and the training settings",
                             architecture=describe(model), settings=state.settings(self),
                             data=[len(train_loader.dataset), getattr(train_loader, "seed", None)])
        self._guard = None
        self._committed = self._forward_state()

    # -- what a forward changes, for a save in the middle of a step -----------------------
    def _forward_state(self):
        """Buffers (BatchNorm's running statistics), dropout call counts, cyconv's random
        state: what a forward changes besides its output."""
        return ([buffer.copy() for _, buffer in self.model.named_buffers()],
                [m.calls for m in state.dropout_layers(self.model).values()], get_rng_state())

    def _set_forward_state(self, saved):
        buffers, calls, rng = saved
        for (_, buffer), value in zip(self.model.named_buffers(), buffers):
            buffer[...] = value
        for module, count in zip(state.dropout_layers(self.model).values(), calls):
            module.calls = count
        set_rng_state(rng)

    def _save_now(self):
        """Rank 0, on a signal: last.safetensors with the state of the last finished step."""
        if not self.comm.is_root or self.run is None:
            return
        current = self._forward_state()
        self._set_forward_state(self._committed)
        try:
            path = self.save_last()
            print(f"\n{self._guard.received}: saved {path} ({self.last_good[1]}) at once, as the "
                  "launcher may end the ranks any moment", file=sys.stderr, flush=True)
        except OSError as error:   # a full disk...: the run goes on, a later save may work
            print(f"warning: could not save on the signal: {error}", file=sys.stderr)
        finally:
            self._set_forward_state(current)

    def _deferring(self):
        return self._guard.deferring() if self._guard is not None else nullcontext()

    def _state_crc(self):
        return [zlib.crc32(array.tobytes()) for array in self.model.state_dict().values()]

    # -- the Trainer's hook points ---------------------------------------------------------
    def _signal_guard(self):
        self._committed = self._forward_state()
        self._guard = _SavingGuard(self.handle_signals, self._save_now)
        return self._guard

    def _signal(self, guard):
        number = signal.Signals[guard.received].value if guard.received else 0
        number = self.comm.max(number, "the agreement on stopping")
        return signal.Signals(number).name if number else None

    def _step_sums(self, loss_sum, correct, seen):
        total = self.comm.sum_rows([loss_sum, correct, seen], "the sum of the step's loss "
                                   "over the ranks", "control")
        return {"loss": float(total[0]), "correct": int(total[1]), "seen": int(total[2])}

    @contextmanager
    def _updating(self):
        with self._deferring():
            yield
            self._committed = self._forward_state()

    def _evaluate(self, loader, num_classes):
        return evaluate(self.comm, self.model, loader, num_classes, self.loss_fn,
                        flip=self.eval_flip)

    # -- the Trainer's methods, distributed -------------------------------------------------
    def save_last(self):
        with self._deferring():
            return super().save_last()

    def load_last(self, path=None):
        saved = super().load_last(path)
        self.comm.check_same("the resumed state", state=self._state_crc(),
                             step=self.position.global_step)
        return saved

    def _end_epoch(self):
        self.comm.check_same("the model after an epoch", state=self._state_crc())
        with self._deferring():
            super()._end_epoch()

    def _stop(self, signal_name):
        if self.comm.is_root:
            super()._stop(signal_name)
        else:
            self.interrupted = signal_name
