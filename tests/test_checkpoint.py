"""Checkpoints: safetensors layout, rebuild from metadata, atomic writes, clear errors, torch."""
import json
import os

import numpy as np
import pytest

import cyconv
from cyconv import checkpoint, models, nn
from cyconv.checkpoint import CheckpointError


def every_layer_net():
    cyconv.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0)),
        nn.BatchNorm2d(4), nn.LeakyReLU(0.1),
        nn.AvgPool2d(2, stride=1, padding=1),
        nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6, momentum=None),
                      nn.ReLU()),
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.Conv2d(6, 5, 1, fuse_relu=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.25), nn.Linear(5, 3))


def trained_bn(model, x):
    """One training forward so that BN running statistics differ from their defaults."""
    model.train()
    model(x)
    return model.eval()


@pytest.fixture
def saved(tmp_path):
    x = np.random.default_rng(0).standard_normal((4, 3, 11, 13)).astype(np.float32)
    model = trained_bn(every_layer_net(), x)
    path = tmp_path / "m.safetensors"
    checkpoint.save(model, path, {"note": "hello", "metrics": {"accuracy": 0.5}},
                    classes=["a", "b", "c"], mean=[0.1, 0.2, 0.3], std=[0.5, 0.5, 0.5],
                    image_size=(11, 13))
    return path, model, x


def test_roundtrip_rebuilds_any_sequential(saved):
    path, model, x = saved
    loaded = cyconv.load(path)
    assert repr(loaded) == repr(model)
    assert not loaded.training
    np.testing.assert_array_equal(loaded(x), model(x))
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[key], value)
    assert loaded.classes == ["a", "b", "c"]
    np.testing.assert_allclose(loaded.mean, [0.1, 0.2, 0.3])
    assert loaded.std.dtype == np.float32 and loaded.image_size == (11, 13)
    assert loaded.metadata["note"] == "hello" and loaded.metadata["metrics"]["accuracy"] == 0.5
    assert loaded[9].seed == model[9].seed    # the dropout stream's seed
    assert loaded[4][1].momentum is None


def test_file_is_plain_safetensors_with_pytorch_keys(saved):
    from safetensors import safe_open
    path, model, _ = saved
    with safe_open(str(path), "numpy") as f:
        assert sorted(f.keys()) == sorted(model.state_dict())
        meta = f.metadata()
        assert f.get_tensor("1.num_batches_tracked").shape == ()
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["format"] == "cyconv"
    assert json.loads(meta["architecture"])["children"][4] == [
        "4", models.describe(model[4])]
    assert "4.0.weight" in model.state_dict()


def test_named_architectures():
    ref = models.create("reference", 3, 224)
    assert ref[-1].in_features == 4608 and ref[-1].out_features == 3
    assert models.reference(2, 128)[-1].in_features == 128 * 3 * 3
    x = np.zeros((2, 3, 96, 96), np.float32)
    assert models.create("small", 4, 96)(x).shape == (2, 4)
    assert models.create("small", 4, 128)(np.zeros((1, 3, 128, 128), np.float32)).shape == (1, 4)
    with pytest.raises(models.ArchitectureError, match="unknown architecture"):
        models.create("vgg", 3, 96)
    with pytest.raises(models.ArchitectureError, match="too small"):
        models.reference(3, 32)
    spec = models.architecture(ref)
    assert models.build(json.dumps(spec)).state_dict().keys() == ref.state_dict().keys()
    with pytest.raises(models.ArchitectureError, match="^1: unknown type 'Foo'"):
        models.build([spec["children"][0][1], {"type": "Foo", "args": {}}])   # cyconv 0.1 form
    with pytest.raises(models.ArchitectureError, match=r"^0 \(Conv2d\)"):
        models.build([{"type": "Conv2d", "args": {"in_channels": 3}}])


# ---------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------
def test_failed_write_leaves_the_old_file(saved, monkeypatch):
    path, model, _ = saved
    before = path.read_bytes()

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        checkpoint.save(nn.Sequential(nn.Linear(2, 2)), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]   # no temporary left


def test_stale_temporary_files_are_removed(saved):
    path, model, _ = saved
    stale = path.parent / f".{path.name}.999999999.abc.tmp"   # a pid that does not exist
    stale.write_bytes(b"half a file")
    checkpoint.save(model, path)
    assert not stale.exists()


# ---------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------
def rewrite_header(path, change, checksum=True):
    """Rewrite a safetensors file with change(header dict) applied (data section unchanged);
    checksum: store the metadata checksum of the changed metadata (a consistent file whose
    content is wrong), else keep the old one (a corrupted file)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    change(header)
    if checksum:
        meta = header["__metadata__"]
        meta["metadata_checksum"] = str(checkpoint._metadata_crc(meta))
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])


def test_truncated_files_raise_clear_errors(saved, tmp_path):
    path, _, _ = saved
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    cut = tmp_path / "cut.safetensors"
    for length in sorted({0, 3, 8, 20, n + 8, n + 9, len(data) // 2, len(data) - 1}):
        cut.write_bytes(data[:length])
        with pytest.raises(CheckpointError, match="truncated|not a safetensors") as info:
            cyconv.load(cut)
        assert str(cut) in str(info.value)
    cut.write_bytes(data[:len(data) - 1])
    with pytest.raises(CheckpointError, match=r"truncated: tensor '[0-9.a-z_]+' needs bytes"):
        checkpoint.read(cut)


def test_corrupted_tensor_is_named(saved):
    path, model, _ = saved
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    offsets = json.loads(data[8:8 + n])["6.weight"]["data_offsets"]
    data[8 + n + offsets[0] + 5] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"tensor '6\.weight' is corrupted"):
        cyconv.load(path)


def test_corrupted_header_and_metadata(saved):
    path, _, _ = saved
    good = path.read_bytes()
    path.write_bytes(good[:8] + b"#" + good[9:])
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        cyconv.load(path)

    path.write_bytes(good)
    rewrite_header(path, lambda h: h["__metadata__"].update(note='"bye"'), checksum=False)
    with pytest.raises(CheckpointError, match="the metadata is corrupted"):
        cyconv.load(path)

    path.write_bytes(good)
    rewrite_header(path, lambda h: h["__metadata__"].update(architecture="[{oops"))
    with pytest.raises(CheckpointError, match="metadata field 'architecture'"):
        cyconv.load(path)

    path.write_bytes(good)
    def bad_layer(h):
        arch = json.loads(h["__metadata__"]["architecture"])
        arch["children"][10][1]["args"]["out_features"] = -1
        h["__metadata__"]["architecture"] = json.dumps(arch)
    rewrite_header(path, bad_layer)
    with pytest.raises(CheckpointError, match=r"'architecture'.*10 \(Linear\)"):
        cyconv.load(path)

    path.write_bytes(good)
    rewrite_header(path, lambda h: h["6.weight"].update(shape=[5, 6, 2, 1]))
    with pytest.raises(CheckpointError, match=r"tensor '6\.weight'.*data offsets"):
        cyconv.load(path)


def test_foreign_files(tmp_path):
    from safetensors.numpy import save_file
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    foreign = tmp_path / "foreign.safetensors"
    weights = {k: v * 2 for k, v in model.state_dict().items()}
    save_file(weights, str(foreign))
    with pytest.raises(CheckpointError, match="not a cyconv checkpoint"):
        cyconv.load(foreign)
    checkpoint.load_weights(foreign, model)      # the weights of a known architecture load
    np.testing.assert_array_equal(model[2].weight.data, weights["2.weight"])

    for name, content in [("random.bin", np.random.default_rng(1).bytes(300)),
                          ("empty.safetensors", b""),
                          ("image.png", b"\x89PNG\r\n\x1a\n" + bytes(100)),
                          ("text.json", b'{"a": 1}')]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError) as info:
            cyconv.load(tmp_path / name)
        assert name in str(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cyconv.load(tmp_path / "missing.safetensors")


def test_checkpoint_of_another_architecture(saved, tmp_path):
    path, _, _ = saved
    other = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(CheckpointError, match=r"tensor '0\.weight' has shape \[4, 3, 3, 2\], "
                                              r"the model expects \[3, 4\]"):
        checkpoint.load_weights(path, other)
    small = models.create("small", 3, 96)
    (tmp_path / "small.safetensors").write_bytes(b"")
    checkpoint.save(small, tmp_path / "small.safetensors")
    with pytest.raises(CheckpointError, match="missing|another architecture"):
        checkpoint.load_weights(tmp_path / "small.safetensors", models.create("reference", 3, 96))


def test_non_finite_weights_are_named(tmp_path):
    from safetensors.numpy import save_file
    model = nn.Sequential(nn.Linear(4, 3))
    weights = model.state_dict()
    weights["0.bias"][1] = np.nan
    save_file(weights, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match=r"'0\.bias' contains NaN"):
        checkpoint.load_weights(tmp_path / "nan.safetensors", model)


# ---------------------------------------------------------------------------
# PyTorch loads the checkpoint
# ---------------------------------------------------------------------------
def test_torch_loads_checkpoint_strictly_with_same_logits(tmp_path):
    torch = pytest.importorskip("torch")
    import safetensors.torch

    from cyconv.data import ArrayDataset, DataLoader, Subset, make_shapes
    from cyconv.train import RunFolder, Trainer

    images, labels, classes = make_shapes(48, 64, seed=1)
    data = ArrayDataset(images, labels, classes)
    cyconv.manual_seed(0)
    model = models.create("reference", 3, 64)
    opt = cyconv.optim.SGD(model.parameters(), 0.01, momentum=0.9)
    loader = DataLoader(Subset(data, np.arange(48)), 16, shuffle=True)
    Trainer(model, opt, nn.CrossEntropyLoss(), loader, loader, epochs=1,
            run=RunFolder(tmp_path, classes=classes), progress=False, verbose=False).fit()
    best = tmp_path / "best.safetensors"
    ours = cyconv.load(best)
    theirs = models.to_torch(ours.architecture)
    theirs.load_state_dict(safetensors.torch.load_file(str(best)))   # strict
    theirs.eval()
    x = next(iter(DataLoader(Subset(data, np.arange(8)), 8)))[0]
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(cyconv.predict(ours, x), expected, rtol=1e-4, atol=1e-4)

    # and the small network with BatchNorm and Dropout
    small = trained_bn(models.create("small", 3, 64), x)
    checkpoint.save(small, tmp_path / "small.safetensors")
    theirs = models.to_torch(small)
    theirs.load_state_dict(safetensors.torch.load_file(str(tmp_path / "small.safetensors")))
    with torch.no_grad():
        expected = theirs.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(cyconv.load(tmp_path / "small.safetensors")(x), expected,
                               rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# The argument order, file permissions, and every byte of the header checked
# ---------------------------------------------------------------------------
def test_save_takes_the_model_first_and_refuses_the_old_order(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"save\(model, path\): the model comes first"):
        cyconv.save(tmp_path / "m.safetensors", model)
    assert not (tmp_path / "m.safetensors").exists()
    cyconv.save(model, tmp_path / "m.safetensors")
    assert cyconv.load(tmp_path / "m.safetensors").state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_get_the_permissions_of_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = tmp_path / "m.safetensors"
        cyconv.save(nn.Sequential(nn.Linear(2, 2)), path)
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask
        os.chmod(path, 0o640)   # a file replaced keeps its permissions
        cyconv.save(nn.Sequential(nn.Linear(2, 2)), path)
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_a_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        cyconv.load(tmp_path)
    with pytest.raises(OSError, match="it is a folder"):
        cyconv.save(nn.Sequential(nn.Linear(2, 2)), tmp_path)


def _tiny_checkpoint(tmp_path):
    cyconv.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(2, 2))
    path = tmp_path / "tiny.safetensors"
    cyconv.save(model, path, {"epoch": 3}, classes=["cat", "dog"], mean=[0.5, 0.4, 0.3],
                std=[0.2, 0.2, 0.2], image_size=(8, 8))
    return path


def test_center_crop_is_kept_and_predict_classifies_the_middle(tmp_path):
    """center_crop goes into the checkpoint (1: the whole photo, for files without it) and
    predict gives a photo's middle to the model, cut before resizing."""
    whole = cyconv.load(_tiny_checkpoint(tmp_path))
    assert whole.center_crop == 1.0
    cyconv.save(whole, tmp_path / "cropped.safetensors", center_crop=0.6)
    cropped = cyconv.load(tmp_path / "cropped.safetensors")
    assert cropped.center_crop == 0.6 and cropped.classes == whole.classes
    photo = np.random.default_rng(0).integers(0, 256, (37, 50, 3), np.uint8)
    middle = photo[7:29, 10:40]   # 0.6 of 37 and 50 rows and columns, centred
    np.testing.assert_array_equal(cyconv.predict(cropped, photo),
                                  cyconv.predict(whole, middle))
    assert not np.array_equal(cyconv.predict(cropped, photo), cyconv.predict(whole, photo))


def test_every_single_bit_flip_of_the_header_is_caught(tmp_path):
    """A flipped bit anywhere in the header (tensor table or metadata) raises a
    CheckpointError; it never loads a changed model or preprocessing, and never raises
    anything else."""
    path = _tiny_checkpoint(tmp_path)
    good = path.read_bytes()
    header_end = 8 + int.from_bytes(good[:8], "little")
    image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8)
    expected = cyconv.predict(cyconv.load(path), image)
    flipped = tmp_path / "flipped.safetensors"
    silent = []
    for byte in range(header_end):
        for bit in range(8):
            data = bytearray(good)
            data[byte] ^= 1 << bit
            flipped.write_bytes(bytes(data))
            try:
                model = cyconv.load(flipped)
            except CheckpointError:
                continue
            same = (np.array_equal(cyconv.predict(model, image), expected)
                    and model.classes == ["cat", "dog"] and model.image_size == (8, 8))
            if not same:
                silent.append((byte, bit))
    assert not silent


@pytest.mark.parametrize("field,value,message", [
    ("std", [0.2, 0.0, 0.2], "'std' must be 3 numbers > 0"),
    ("std", [0.2, 0.2], "'std' must be 3 finite numbers"),
    ("mean", [0.5, None, 0.3], "'mean' must be 3 finite numbers"),
    ("mean", "abc", "'mean' must be 3 finite numbers"),
    ("image_size", [8, 100000], "'image_size' must be"),
    ("image_size", [8.5, 8], "'image_size' must be"),
    ("image_size", [2, 2], "does not take the stored image size"),
    ("classes", ["cat", "dog", "owl"], "3 class names but the model gives outputs of shape"),
    ("classes", ["cat", "cat"], "'classes' must be a list of distinct"),
    ("classes", ["cat", 7], "'classes' must be a list of distinct"),
    ("channel_order", "GRB", "'channel_order' must be"),
    ("interpolation", "cubic", "'interpolation' must be"),
    ("center_crop", 0, "'center_crop' must be a number in \\(0, 1\\]"),
    ("center_crop", 1.5, "'center_crop' must be a number in"),
    ("center_crop", "0.8", "'center_crop' must be a number in"),
    ("center_crop", True, "'center_crop' must be a number in"),
])
def test_every_metadata_field_is_checked_on_load(tmp_path, field, value, message):
    """Fields of the right checksum but of a wrong type or range (a file written by another
    program, or edited by hand) are refused by name."""
    path = _tiny_checkpoint(tmp_path)
    rewrite_header(path, lambda h: h["__metadata__"].update({field: json.dumps(value)}))
    with pytest.raises(CheckpointError, match=message):
        cyconv.load(path)
