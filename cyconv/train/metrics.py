"""Metrics: the confusion matrix and what follows from it, and evaluating a model on a loader."""
import numpy as np

from cyconv._grad_mode import no_grad
from cyconv.inference import flip_averaged
from cyconv.nn import CrossEntropyLoss


def confusion_matrix(labels, predictions, num_classes):
    """(C, C) int64 counts: row = true class, column = predicted class."""
    labels, predictions = np.asarray(labels, np.int64), np.asarray(predictions, np.int64)
    return np.bincount(labels * num_classes + predictions,
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def metrics_from_confusion(matrix):
    """accuracy, per-class precision, recall and f1 (lists; 0 where undefined) of a
    confusion matrix."""
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


def evaluate(model, loader, num_classes=None, loss_fn=None, flip=False):
    """Loss, accuracy, confusion matrix, per-class precision/recall of ``model`` on ``loader``.

    ``loss_fn``: a loss called as ``loss_fn(logits, labels)`` (default: cross-entropy).
    ``flip``: classify each image by the mean of the class probabilities of the image
    and its mirror image (:func:`cyconv.inference.flip_averaged`).
    Runs in eval mode without gradients (the model's mode is restored).
    Returns a dict: ``loss``, ``accuracy``, ``confusion`` (list of lists),
    ``precision``, ``recall``, ``f1`` (lists), ``predictions`` (int64 array)
    and ``labels`` (int64 array), in the loader's order.
    """
    was_training = model.training
    model.eval()
    loss_fn = loss_fn or CrossEntropyLoss()
    total, count, preds, labels = 0.0, 0, [], []
    try:
        with no_grad():
            for x, y in loader:
                if np.ndim(y) != 1:
                    raise ValueError(f"evaluate: expected class labels (N,) from the loader, "
                                     f"got an array of shape {np.shape(y)} (class probabilities "
                                     "of mixed images?): evaluate on a loader without CutMix")
                logits = flip_averaged(model, x) if flip else model(x)
                total += loss_fn(logits, y) * len(y)
                count += len(y)
                preds.append(np.argmax(logits, axis=1))
                labels.append(np.asarray(y))
    finally:
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
