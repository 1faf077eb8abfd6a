"""Trainer: schedules, metrics, outputs, exact resume, determinism, NaN and signals."""
import json
import math
import signal

import numpy as np
import pytest

import cyconv
from cyconv import checkpoint, models, nn, optim
from cyconv.data import ArrayDataset, Augment, DataLoader, Subset, make_shapes, split_indices
from cyconv.train import (
    LRSchedule,
    RunFolder,
    Trainer,
    TrainingDiverged,
    confusion_matrix,
    evaluate,
    format_confusion,
    metrics_from_confusion,
)

SIZE = 16


@pytest.fixture(autouse=True)
def one_thread(threads):
    """Tiny runs: one kernel thread is fastest (and robust on a busy machine)."""
    threads(1)


@pytest.fixture(scope="module")
def shapes():
    images, labels, classes = make_shapes(192, SIZE, seed=3)
    data = ArrayDataset(images, labels, classes)
    train, valid, _ = split_indices(labels, seed=0)
    return data, train, valid


def make_trainer(shapes, out_dir, epochs=4, seed=7, trainer_class=Trainer, average_decay=None,
                 momentum=0.9, augment=None, **kwargs):
    """A small run with every kind of training state: BN, dropout, momentum, augmentation
    (and a moving average of the weights with ``average_decay``)."""
    data, train, valid = shapes
    cyconv.manual_seed(seed)
    model = models.small(3, SIZE, widths=(8, 16), dropout=0.3)
    if average_decay is not None:
        kwargs["average"] = optim.ExponentialMovingAverage(model, average_decay)
    opt = optim.SGD(model.parameters(), 0.05, momentum=momentum, weight_decay=5e-4,
                    nesterov=True)
    train_loader = DataLoader(Subset(data, train), 16, shuffle=True, seed=seed,
                              augment=augment or Augment(), drop_last=True, num_workers=2)
    valid_loader = DataLoader(Subset(data, valid), 32, num_workers=0)
    kwargs.setdefault("schedule", LRSchedule(0.05, "cosine", warmup_epochs=1))
    run = None if out_dir is None else RunFolder(out_dir, classes=data.classes)
    return trainer_class(model, opt, nn.CrossEntropyLoss(), train_loader, valid_loader,
                         epochs=epochs, run=run, progress=False, verbose=False, **kwargs)


def assert_same_run(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].tobytes() == sb[key].tobytes(), key
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["step_count"] == ob["step_count"] and oa["lr"] == ob["lr"]
    for x, y in zip(oa["state"], ob["state"]):
        assert sorted(x) == sorted(y)
        for name in x:
            assert x[name].tobytes() == y[name].tobytes()
    assert (a.average is None) == (b.average is None)
    if a.average is not None:
        assert a.average.updates == b.average.updates
        for key, value in a.average.averages.items():
            assert value.tobytes() == b.average.averages[key].tobytes(), key
    strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa
    assert strip(a.position.history) == strip(b.position.history)
    assert a.position.global_step == b.position.global_step


# ---------------------------------------------------------------------------
# Schedules and metrics
# ---------------------------------------------------------------------------
def test_cosine_schedule_with_warmup():
    s = LRSchedule(0.1, "cosine", warmup_epochs=1, epochs=10, steps_per_epoch=10)
    lrs = [s(i) for i in range(100)]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert lrs[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 1e-3
    assert s(55) == pytest.approx(0.05 * (1 + math.cos(math.pi * 45 / 90)))


def test_step_schedule():
    s = LRSchedule(0.1, "step", step_size=3, gamma=0.5, epochs=9, steps_per_epoch=4)
    assert [s(e * 4) for e in range(9)] == pytest.approx([0.1] * 3 + [0.05] * 3 + [0.025] * 3)
    with pytest.raises(ValueError, match="kind"):
        LRSchedule(0.1, "linear")


def test_metrics():
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 1, 1, 1, 0, 2])
    cm = confusion_matrix(labels, preds, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    m = metrics_from_confusion(cm)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx([0.5, 2 / 3, 1.0])
    assert m["recall"] == pytest.approx([0.5, 1.0, 0.5])
    text = format_confusion(cm, ["a", "b", "c"])
    assert "precision" in text and "recall" in text


def test_evaluate_with_flip_classifies_by_the_averaged_probabilities(shapes):
    data, _, valid = shapes
    model = models.small(3, SIZE, widths=(8, 16))
    loader = DataLoader(Subset(data, valid), 32, num_workers=0)
    result = evaluate(model, loader, 3, flip=True)
    logits = cyconv.predict(model, np.concatenate([x for x, _ in loader]), flip=True)
    assert result["predictions"].tolist() == logits.argmax(axis=1).tolist()
    assert result["loss"] == pytest.approx(nn.CrossEntropyLoss()(logits, result["labels"]))


def test_validation_with_flip(shapes):
    """Trainer(eval_flip=True) validates as evaluate(..., flip=True) does."""
    trainer = make_trainer(shapes, None, epochs=1, eval_flip=True)
    last = trainer.fit()[-1]
    again = evaluate(trainer.model, trainer.valid_loader, 3, flip=True)
    plain = evaluate(trainer.model, trainer.valid_loader, 3)
    assert (last["valid_acc"], last["valid_loss"]) == (again["accuracy"], again["loss"])
    assert last["valid_loss"] != plain["loss"]
    with pytest.raises(TypeError, match="eval_flip must be True or False, got 1"):
        make_trainer(shapes, None, epochs=1, eval_flip=1)


# ---------------------------------------------------------------------------
# A run and its outputs
# ---------------------------------------------------------------------------
def test_fit_writes_outputs(shapes, tmp_path):
    trainer = make_trainer(shapes, tmp_path, epochs=3)
    history = trainer.fit()
    assert [row["epoch"] for row in history] == [1, 2, 3]
    for name in ("best.safetensors", "last.safetensors", "history.jsonl", "history.csv",
                 "curves.png", "confusion_matrix.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "valid_loss", "valid_acc",
                            "lr", "seconds"}
    assert (tmp_path / "history.csv").read_text().splitlines()[0].startswith("epoch,train_loss")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # best.safetensors holds only the model's keys and the best epoch's valid model
    best = checkpoint.read(tmp_path / "best.safetensors")
    assert set(best.tensors) == set(trainer.model.state_dict())
    best_epoch = max(history, key=lambda r: r["valid_acc"])["epoch"]
    assert best.metadata["epoch"] == best_epoch == trainer.position.best["epoch"]
    assert best.metadata["metrics"]["accuracy"] == history[best_epoch - 1]["valid_acc"]
    model = cyconv.load(tmp_path / "best.safetensors")
    assert model.classes == ["circle", "square", "triangle"]
    result = evaluate(model, trainer.valid_loader)
    assert result["accuracy"] == history[best_epoch - 1]["valid_acc"]
    assert np.array(result["confusion"]).sum() == len(shapes[2])
    # last.safetensors: the end state, loadable as a model too
    last = checkpoint.read(tmp_path / "last.safetensors")
    assert any(k.startswith("optimizer.") for k in last.tensors)
    assert last.metadata["training_state"]["epoch"] == 3
    assert cyconv.load(tmp_path / "last.safetensors") is not None


def test_training_learns(shapes, tmp_path):
    history = make_trainer(shapes, None, epochs=6).fit()
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert max(r["valid_acc"] for r in history) > 0.6


# ---------------------------------------------------------------------------
# Exact resume and determinism
# ---------------------------------------------------------------------------
class StopAfterEpoch(Trainer):
    stop_epoch = 2

    def _end_epoch(self):
        super()._end_epoch()
        if self.position.epoch == self.stop_epoch:
            signal.raise_signal(signal.SIGINT)   # as if Ctrl-C came during the evaluation


class SignalAtStep(Trainer):
    stop_step = 12   # mid-epoch 2 (9 steps per epoch)

    def lr_at(self, step):
        if step == self.stop_step:
            signal.raise_signal(signal.SIGINT)
        return super().lr_at(step)


def test_exact_resume_after_epoch(shapes, tmp_path):
    straight = make_trainer(shapes, tmp_path / "a")
    straight.fit()
    first = make_trainer(shapes, tmp_path / "b", trainer_class=StopAfterEpoch)
    first.fit()
    assert first.interrupted == "SIGINT" and len(first.position.history) == 2
    resumed = make_trainer(shapes, tmp_path / "b", seed=99)   # another init: all is restored
    resumed.fit(resume=True)
    assert_same_run(straight, resumed)
    assert (tmp_path / "a" / "best.safetensors").exists()


@pytest.mark.parametrize("average_decay", [None, 0.9])
def test_exact_resume_mid_epoch_after_sigint(shapes, tmp_path, capsys, average_decay):
    handler_before = signal.getsignal(signal.SIGINT)   # SIG_IGN in a job started with &
    straight = make_trainer(shapes, tmp_path / "a", average_decay=average_decay)
    straight.fit()
    first = make_trainer(shapes, tmp_path / "b", trainer_class=SignalAtStep,
                         average_decay=average_decay)
    assert first.steps_per_epoch == 9
    first.fit()
    assert first.interrupted == "SIGINT"
    assert (first.position.epoch, first.position.step_in_epoch) == (1, 4)
    err = capsys.readouterr().err
    assert "Interrupted by SIGINT" in err and "resume" in err and "last.safetensors" in err
    assert signal.getsignal(signal.SIGINT) is handler_before  # handler restored
    resumed = make_trainer(shapes, tmp_path / "b", average_decay=average_decay)
    resumed.fit(resume=True)
    assert_same_run(straight, resumed)
    if average_decay is not None:   # the valid scores are the averaged weights'
        own = evaluate(straight.model, straight.valid_loader)
        with straight.average.averaged():
            averaged = evaluate(straight.model, straight.valid_loader)
        assert averaged["loss"] == straight.position.history[-1]["valid_loss"] != own["loss"]
        keys = checkpoint.read(tmp_path / "a" / "last.safetensors").tensors
        assert {f"average.{key}" for key in straight.average.averages} <= set(keys)


def test_cutmix_trains_and_resumes_exactly(shapes, tmp_path):
    """A loader with CutMix gives class probabilities; the loss takes them, the train
    accuracy counts the larger share, and a run stopped mid-epoch resumes bit for bit."""
    cutmix = Augment(cutmix=0.5)
    straight = make_trainer(shapes, tmp_path / "a", augment=cutmix)
    x, y = next(iter(straight.train_loader))
    assert y.shape == (16, 3) and y.dtype == np.float32
    straight.fit()
    history = straight.position.history
    assert all(np.isfinite(row["train_loss"]) and 0 <= row["train_acc"] <= 1 for row in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    first = make_trainer(shapes, tmp_path / "b", trainer_class=SignalAtStep, augment=cutmix)
    first.fit()
    assert first.interrupted == "SIGINT"
    resumed = make_trainer(shapes, tmp_path / "b", augment=cutmix)
    resumed.fit(resume=True)
    assert_same_run(straight, resumed)


def test_resume_needs_the_same_averaging(shapes, tmp_path):
    make_trainer(shapes, tmp_path, epochs=1, average_decay=0.9).fit()
    with pytest.raises(checkpoint.CheckpointError, match="average_decay: saved 0.9, now None"):
        make_trainer(shapes, tmp_path, epochs=1).fit(resume=True)
    with pytest.raises(ValueError, match="ExponentialMovingAverage of the model being trained"):
        data, train, _ = shapes
        model = models.small(3, SIZE, widths=(8, 16))
        Trainer(model, optim.SGD(model.parameters(), 0.1), nn.CrossEntropyLoss(),
                DataLoader(Subset(data, train), 16), epochs=1,
                average=optim.ExponentialMovingAverage(models.small(3, SIZE, widths=(8, 16))))


@pytest.mark.parametrize("change,message", [
    (dict(epochs=3), "epochs: saved 2, now 3"),
    (dict(momentum=0.5), "optimizer_settings: saved .*'momentum': 0.9.*now .*'momentum': 0.5"),
    (dict(schedule=LRSchedule(0.05, "step", warmup_epochs=1)), "schedule: saved .*'cosine'"),
])
def test_resume_refuses_other_settings_and_says_which(shapes, tmp_path, change, message):
    """A resumed run keeps its optimizer settings, schedule and length: another value would
    make another run, so the resume is refused with the differences named."""
    make_trainer(shapes, tmp_path, epochs=2).fit()
    other = make_trainer(shapes, tmp_path, **dict(dict(epochs=2), **change))
    with pytest.raises(checkpoint.CheckpointError, match="other settings.*" + message):
        other.fit(resume=True)
    assert other.position.epoch == 0 and not other.position.history


def test_same_seed_same_run_whatever_the_thread_count(shapes, threads):
    threads(1)
    one = make_trainer(shapes, None, epochs=2)
    one.fit()
    threads(2)
    two = make_trainer(shapes, None, epochs=2)
    two.fit()
    assert_same_run(one, two)


def test_resume_refuses_another_architecture(shapes, tmp_path):
    make_trainer(shapes, tmp_path, epochs=1).fit()
    data, train, valid = shapes
    model = models.small(3, SIZE, widths=(8, 32), dropout=0.3)
    opt = optim.SGD(model.parameters(), 0.05, momentum=0.9)
    other = Trainer(model, opt, nn.CrossEntropyLoss(),
                    DataLoader(Subset(data, train), 16, drop_last=True), epochs=2,
                    run=RunFolder(tmp_path), progress=False, verbose=False)
    with pytest.raises(checkpoint.CheckpointError, match=r"another architecture.*4 \(Conv2d\)"):
        other.fit(resume=True)
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        make_trainer(shapes, tmp_path / "nothing").fit(resume=True)


# ---------------------------------------------------------------------------
# NaN / inf loss
# ---------------------------------------------------------------------------
def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(shapes, tmp_path):
    def schedule(step):
        return 0.05 if step < 9 else float("nan")   # epoch 2 poisons the weights

    trainer = make_trainer(shapes, tmp_path, schedule=schedule)
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit()
    message = str(info.value)
    assert "epoch 2, step 2" in message and "global step 11" in message
    assert str(tmp_path / "last.safetensors") in message and "intact" in message
    last = checkpoint.read(tmp_path / "last.safetensors")
    assert last.metadata["training_state"]["epoch"] == 1
    model = cyconv.load(tmp_path / "last.safetensors")   # finite, loads
    assert all(np.isfinite(v).all() for v in model.state_dict().values())
    assert len(trainer.position.history) == 1


def test_best_epoch_ties_go_to_the_lower_valid_loss(shapes, tmp_path, monkeypatch):
    # scripted valid results: accuracy 0.5, 0.75, 0.75 (lower loss), 0.75 (higher loss)
    scripted = iter([(0.5, 1.0), (0.75, 0.9), (0.75, 0.6), (0.75, 0.8)])

    def fake_evaluate(model, loader, num_classes=None, loss_fn=None, flip=False):
        accuracy, loss = next(scripted)
        return {"accuracy": accuracy, "loss": loss, "confusion": np.eye(3, dtype=int).tolist(),
                "precision": [1.0] * 3, "recall": [1.0] * 3, "f1": [1.0] * 3}

    monkeypatch.setattr("cyconv.train.loop.evaluate", fake_evaluate)
    trainer = make_trainer(shapes, tmp_path, epochs=4)
    trainer.fit()
    assert trainer.position.best["epoch"] == 3 and trainer.position.best["loss"] == 0.6
    assert checkpoint.read(tmp_path / "best.safetensors").metadata["epoch"] == 3


def test_exact_resume_of_a_resnet_with_a_moving_average(shapes, tmp_path):
    """The trainer, its checkpoints and the moving average work on any container: a
    ResNet of BasicBlocks resumes bitwise."""
    def resnet_trainer(out, trainer_class=Trainer):
        data, train, valid = shapes
        cyconv.manual_seed(7)
        model = models.resnet([1, 1, 1, 1], 3, widths=(4, 8, 8, 8), stem="small")
        opt = optim.SGD(model.parameters(), 0.05, momentum=0.9, nesterov=True)
        loader = DataLoader(Subset(data, train), 16, shuffle=True, seed=7, augment=Augment(),
                            drop_last=True, num_workers=0)
        return trainer_class(model, opt, nn.CrossEntropyLoss(), loader,
                             DataLoader(Subset(data, valid), 32, num_workers=0), epochs=3,
                             average=optim.ExponentialMovingAverage(model, 0.9),
                             run=RunFolder(out, classes=data.classes), progress=False,
                             verbose=False)

    straight = resnet_trainer(tmp_path / "a")
    straight.fit()
    first = resnet_trainer(tmp_path / "b", StopAfterEpoch)
    first.fit()
    resumed = resnet_trainer(tmp_path / "b")
    resumed.fit(resume=True)
    assert_same_run(straight, resumed)
    loaded = cyconv.load(tmp_path / "a" / "best.safetensors")
    assert list(loaded.state_dict()) == list(straight.model.state_dict())
