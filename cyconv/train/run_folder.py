"""The run folder: where a training run keeps its checkpoints, history and plots.

    best.safetensors       the model of the best epoch (cyconv.load rebuilds it; PyTorch
                           loads its state_dict strictly)
    last.safetensors       the resumable training state (see cyconv.train.state)
    history.jsonl, .csv    one row per epoch
    curves.png             loss and accuracy per epoch
    confusion_matrix.png   the valid split's confusion matrix at the best epoch

Every file is written atomically (cyconv.files.atomic_write).
"""
import csv
import io
import json
from pathlib import Path

import numpy as np

from cyconv import checkpoint
from cyconv.files import OutputError, atomic_write
from cyconv.train import state

HISTORY_FIELDS = ("epoch", "train_loss", "train_acc", "valid_loss", "valid_acc", "lr", "seconds")
# the files a run writes; any of them in a folder means the folder holds a run
RUN_FILES = ("last.safetensors", "best.safetensors", "history.jsonl", "history.csv",
             "curves.png", "confusion_matrix.png")


class RunFolder:
    """The files of one run under ``path``.

    ``metadata`` (JSON-able dict, e.g. the run's settings) and ``preprocessing``
    (``classes``, ``mean``, ``std``, ``image_size``, ...: see cyconv.checkpoint.save)
    go into every checkpoint written here.
    """

    def __init__(self, path, metadata=None, **preprocessing):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"cannot write the run to {self.path}: it is a file, not a folder")
        self.metadata, self.preprocessing = dict(metadata or {}), preprocessing

    @property
    def classes(self):
        return self.preprocessing.get("classes")

    def save_best(self, model, **metadata):
        """best.safetensors: the model, with the run's metadata and ``metadata``."""
        checkpoint.save(model, self.best, dict(self.metadata, **metadata), **self.preprocessing)

    def save_last(self, trainer):
        """last.safetensors: the resumable state of ``trainer``."""
        state.save(trainer, self.last, self.metadata, **self.preprocessing)

    @property
    def best(self):
        return self.path / "best.safetensors"

    @property
    def last(self):
        return self.path / "last.safetensors"

    def existing_outputs(self, extra=()):
        """The run files (and ``extra`` names) already in the folder."""
        return [name for name in RUN_FILES + tuple(extra) if (self.path / name).exists()]

    def write_history(self, history):
        """history.jsonl and history.csv."""
        lines = "".join(json.dumps({k: row.get(k) for k in HISTORY_FIELDS}) + "\n"
                        for row in history)
        atomic_write(self.path / "history.jsonl", lines.encode())
        text = io.StringIO()
        writer = csv.DictWriter(text, HISTORY_FIELDS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)
        atomic_write(self.path / "history.csv", text.getvalue().encode())

    def write_curves(self, history):
        plot_curves(history, self.path / "curves.png")

    def write_confusion(self, matrix, classes, title, name="confusion_matrix.png"):
        plot_confusion(matrix, classes, self.path / name, title)


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
    atomic_write(path, _png_bytes(fig))


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
    atomic_write(path, _png_bytes(fig))
