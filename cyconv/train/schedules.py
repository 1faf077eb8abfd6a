"""Learning-rate schedules: the rate of each optimisation step, a pure function of the step."""
import math


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
        for name, value in (("lr", lr), ("warmup_epochs", warmup_epochs), ("gamma", gamma),
                            ("min_lr", min_lr)):
            if isinstance(value, (bool, str)) or not isinstance(value, (int, float)) \
                    or not 0 <= value < math.inf:
                raise ValueError(f"LRSchedule: expected a finite {name} >= 0, got {value!r}")
        if isinstance(step_size, bool) or not isinstance(step_size, int) or step_size < 1:
            raise ValueError(f"LRSchedule: expected an int step_size >= 1, got {step_size!r}")
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
