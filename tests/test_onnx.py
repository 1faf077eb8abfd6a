"""ONNX export (cyconv.onnx): every layer and container against onnxruntime, dynamic
batch, float64 models, metadata, un-exportable modules, and examples/export_onnx.py.

Tests that run the file need onnx and onnxruntime (pip install -e ".[onnx]"); they
skip, saying so, without them.
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cyconv
import cyconv.onnx
from cyconv import nn
from cyconv.inference import model_dtype
from cyconv.models import BasicBlock, InvertedResidual, mobilenet_v2, reference, resnet18

ROOT = Path(__file__).resolve().parent.parent
# the shared photos, seen from the main checkout or from a worktree under /work/wt
PHOTOS = next((p for p in (ROOT.parent / "shared" / "datasets" / "images",
                           ROOT.parent.parent / "shared" / "datasets" / "images") if p.is_dir()),
              None)
SKIP_REASON = 'needs onnx and onnxruntime (pip install -e ".[onnx]")'
SIZE = (11, 9)   # odd, not square


@pytest.fixture
def ort():
    pytest.importorskip("onnx", reason=SKIP_REASON)
    return pytest.importorskip("onnxruntime", reason=SKIP_REASON)


def calibrate(model, shape, seed=0):
    """Random BatchNorm weights, and running statistics from one batch of random input
    (so activations stay of order 1 through deep models); returns the model in eval mode."""
    rng = np.random.default_rng(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None   # running stats = the one batch's
            module.weight.data[...] = rng.uniform(0.5, 1.5, module.num_features)
            module.bias.data[...] = rng.normal(0, 0.2, module.num_features)
    model.train()
    with cyconv.no_grad():
        model(rng.standard_normal(shape).astype(model_dtype(model)))
    return model.eval()


def run_both(ort, model, path, x, **export_args):
    """(onnxruntime's output, cyconv's output as float64, the ONNX op types)."""
    proto = cyconv.onnx.export(model, path, **export_args)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.astype(np.float32)})[0]
    with cyconv.no_grad():
        expected = np.asarray(model(x), np.float64)
    return got, expected, [node.op_type for node in proto.graph.node]


def assert_matches(got, expected, tolerance=1e-4):
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= tolerance


def downsample(inp, out):
    return nn.Sequential(nn.Conv2d(inp, out, 1, stride=2, bias=False), nn.BatchNorm2d(out))


LAYERS = {   # name: (model factory, its ONNX op types, input scale)
    "conv": (lambda: nn.Conv2d(3, 4, 3), ["Conv"], 1),
    "conv_groups_stride_padding_dilation": (
        lambda: nn.Conv2d(3, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1),
                          groups=3), ["Conv"], 1),
    "conv_depthwise": (lambda: nn.Sequential(nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 3, padding=1,
                                                                         groups=6)),
                       ["Conv", "Conv"], 1),
    "conv_fuse_relu_no_bias": (lambda: nn.Conv2d(3, 5, 3, padding=1, bias=False,
                                                 fuse_relu=True), ["Conv", "Relu"], 1),
    "maxpool": (lambda: nn.MaxPool2d(3, stride=2, padding=1), ["MaxPool"], 1),
    "maxpool_rect": (lambda: nn.MaxPool2d((2, 3), stride=(1, 2)), ["MaxPool"], 1),
    "avgpool_include_pad": (lambda: nn.AvgPool2d(3, 2, 1, count_include_pad=True),
                            ["AveragePool"], 1),
    "avgpool_exclude_pad": (lambda: nn.AvgPool2d((3, 2), (2, 1), 1, count_include_pad=False),
                            ["AveragePool"], 1),
    "global_avgpool": (lambda: nn.AdaptiveAvgPool2d(1), ["GlobalAveragePool"], 1),
    "relu": (lambda: nn.ReLU(), ["Relu"], 1),
    "relu6": (lambda: nn.ReLU6(), ["Clip"], 10),
    "leaky_relu": (lambda: nn.LeakyReLU(0.2), ["LeakyRelu"], 1),
    "batchnorm": (lambda: nn.BatchNorm2d(3, eps=1e-3), ["BatchNormalization"], 1),
    "flatten_linear": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * 11 * 9, 4)),
                       ["Flatten", "Gemm"], 1),
    "linear_no_bias": (lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                             nn.Linear(3, 4, bias=False)),
                       ["GlobalAveragePool", "Flatten", "Gemm"], 1),
    "identity": (lambda: nn.Identity(), ["Identity"], 1),
    "dropout_left_out": (lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.Dropout(0.5)),
                         ["Conv"], 1),
    "sequential_nested": (lambda: nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()),
                                                nn.Sequential(nn.MaxPool2d(2))),
                          ["Conv", "Relu", "MaxPool"], 1),
    "residual_identity": (lambda: nn.Residual(nn.Sequential(
        nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU())),
        ["Conv", "BatchNormalization", "Relu", "Add"], 1),
    "residual_shortcut": (lambda: nn.Residual(nn.Conv2d(3, 4, 3, stride=2, padding=1),
                                              downsample(3, 4)),
                          ["Conv", "Conv", "BatchNormalization", "Add"], 1),
    "concat": (lambda: nn.Concat(nn.Conv2d(3, 2, 1), nn.Identity(),
                                 nn.Sequential(nn.MaxPool2d(3, 1, 1))),
               ["Conv", "MaxPool", "Concat"], 1),
    "basic_block": (lambda: BasicBlock(3, 3), ["Conv", "BatchNormalization", "Relu", "Conv",
                                               "BatchNormalization", "Add", "Relu"], 1),
    "basic_block_downsample": (lambda: BasicBlock(3, 4, 2, downsample(3, 4)),
                               ["Conv", "BatchNormalization", "Relu", "Conv",
                                "BatchNormalization", "Conv", "BatchNormalization", "Add",
                                "Relu"], 1),
    "inverted_residual": (lambda: InvertedResidual(3, 3, 1, 6), [
        "Conv", "BatchNormalization", "Clip", "Conv", "BatchNormalization", "Clip", "Conv",
        "BatchNormalization", "Add"], 1),
    "inverted_residual_stride2": (lambda: InvertedResidual(3, 8, 2, 1), [
        "Conv", "BatchNormalization", "Clip", "Conv", "BatchNormalization"], 1),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_matches_onnxruntime(ort, tmp_path, name):
    factory, ops, scale = LAYERS[name]
    model = calibrate(factory(), (4, 3) + SIZE)
    x = scale * np.random.default_rng(1).standard_normal((3, 3) + SIZE).astype(np.float32)
    got, expected, op_types = run_both(ort, model, tmp_path / "m.onnx", x, image_size=SIZE)
    assert op_types == ops
    assert_matches(got, expected)


@pytest.mark.parametrize("factory", [lambda: resnet18(10, seed=3),
                                     lambda: mobilenet_v2(10, seed=4)],
                         ids=["resnet18", "mobilenet_v2"])
def test_named_models_match_onnxruntime(ort, tmp_path, factory):
    model = calibrate(factory(), (4, 3, 224, 224))
    x = np.random.default_rng(2).standard_normal((2, 3, 224, 224)).astype(np.float32)
    got, expected, _ = run_both(ort, model, tmp_path / "m.onnx", x, image_size=224)
    assert np.abs(expected).max() > 0.1   # logits of a working network, not all ~0
    assert_matches(got, expected)


def test_dynamic_batch(ort, tmp_path):
    model = calibrate(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
                                    nn.Flatten(), nn.Linear(4 * 5 * 4, 3)), (4, 3) + SIZE)
    path = tmp_path / "m.onnx"
    proto = cyconv.onnx.export(model, path, image_size=SIZE)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        x = np.random.default_rng(n).standard_normal((n, 3) + SIZE).astype(np.float32)
        with cyconv.no_grad():
            assert_matches(session.run(None, {"input": x})[0], model(x))


def test_unknown_image_size_leaves_height_and_width_dynamic(ort, tmp_path):
    model = calibrate(resnet18(4, seed=0), (2, 3, 64, 64))
    path = tmp_path / "m.onnx"
    proto = cyconv.onnx.export(model, path)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 64, 64), (2, 3, 47, 71)]:
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        with cyconv.no_grad():
            assert_matches(session.run(None, {"input": x})[0], model(x))


def test_float64_model_is_exported_as_float32(ort, tmp_path):
    """A float64 model's weights become float32: ONNX runtimes run every operator here
    in float32; the logits then agree to float32 rounding."""
    f64 = np.float64
    model = calibrate(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, dtype=f64),
                                    nn.BatchNorm2d(8, dtype=f64), nn.ReLU6(),
                                    nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                    nn.Linear(8, 3, dtype=f64)), (4, 3) + SIZE)
    x = np.random.default_rng(0).standard_normal((3, 3) + SIZE)
    got, expected, _ = run_both(ort, model, tmp_path / "m.onnx", x, image_size=SIZE)
    assert got.dtype == np.float32
    assert_matches(got, expected)
    import onnx
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert {t.data_type for t in proto.graph.initializer} == {onnx.TensorProto.FLOAT}


def test_train_mode_model_exports_its_inference_function(ort, tmp_path):
    model = calibrate(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5),
                                    nn.ReLU()), (4, 3) + SIZE)
    x = np.random.default_rng(0).standard_normal((2, 3) + SIZE).astype(np.float32)
    with cyconv.no_grad():
        expected = model(x).copy()
    model.train()
    proto = cyconv.onnx.export(model, tmp_path / "m.onnx")
    assert model.training   # export does not change the model's mode
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert_matches(session.run(None, {"input": x})[0], expected)


def metadata(proto):
    return {p.key: json.loads(p.value) for p in proto.metadata_props}


def test_metadata_from_a_checkpoint(ort, tmp_path):
    classes = ["dog", "panda", "bird"]
    cyconv.save(reference(3), tmp_path / "ref.safetensors", classes=classes,
                mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3], image_size=[224, 224],
                channel_order="BGR", interpolation="linear", center_crop=0.875)
    model = cyconv.load(tmp_path / "ref.safetensors")
    proto = cyconv.onnx.export(model, tmp_path / "m.onnx")
    import onnx
    stored = metadata(onnx.load(str(tmp_path / "m.onnx")))
    assert stored == metadata(proto)
    assert stored == {"classes": classes, "mean": pytest.approx([0.5, 0.4, 0.3]),
                      "std": pytest.approx([0.2, 0.25, 0.3]), "image_size": [224, 224],
                      "channel_order": "BGR", "interpolation": "linear",
                      "center_crop": 0.875}
    dims = proto.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3]


def test_metadata_keywords_and_defaults(ort, tmp_path):
    model = reference(2)
    stored = metadata(cyconv.onnx.export(model, tmp_path / "a.onnx"))
    assert stored == {"classes": None, "mean": None, "std": None, "image_size": None,
                      "channel_order": "RGB", "interpolation": "area", "center_crop": 1.0}
    stored = metadata(cyconv.onnx.export(model, tmp_path / "b.onnx", classes=("a", "b"),
                                         image_size=224,
                                         mean=np.array([0.1, 0.2, 0.3], np.float32)))
    assert stored["classes"] == ["a", "b"] and stored["image_size"] == [224, 224]
    assert stored["mean"] == [0.1, 0.2, 0.3]   # float32 values, written as short as they read
    stored = metadata(cyconv.onnx.export(model, tmp_path / "c.onnx",
                                         center_crop=np.float64(0.875)))
    assert stored["center_crop"] == 0.875


@pytest.mark.parametrize("kwargs, words", [
    (dict(classes=["a", "b", "c"], image_size=224), ["3 class names", "outputs of shape [2]"]),
    (dict(image_size=20), ["does not take", "20"]),
    (dict(channel_order="RBG"), ["channel_order"]),
    (dict(center_crop=1.25), ["center_crop", "(0, 1]"]),
    (dict(std=[1, 0, 1]), ["std"]),
    (dict(mean=["a", "b", "c"]), ["mean must be 3 numbers"]),
    (dict(classes="abc"), ["classes"]),
])
def test_bad_preprocessing_is_refused_and_nothing_written(ort, tmp_path, kwargs, words):
    with pytest.raises(cyconv.onnx.ExportError) as info:
        cyconv.onnx.export(reference(2), tmp_path / "m.onnx", **kwargs)
    assert all(word in str(info.value) for word in words), str(info.value)
    assert list(tmp_path.iterdir()) == []


class Doubler(nn.Module):
    def forward(self, x):
        return 2 * x


class MyConv(nn.Conv2d):
    pass


@pytest.mark.parametrize("model, where", [
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Residual(nn.Sequential(nn.ReLU(), Doubler()))),
     "layer '1.body.1': a Doubler"),
    (nn.Sequential(MyConv(3, 4, 3)), "layer '0': a MyConv"),
    (Doubler(), "the model itself: a Doubler"),
])
def test_unexportable_module_names_its_path_and_writes_nothing(tmp_path, model, where):
    """No file, no temporary file, and a file already there stays as it was (the
    check needs no onnx: it runs before anything is built)."""
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    with pytest.raises(cyconv.onnx.ExportError, match="cannot export") as info:
        cyconv.onnx.export(model, target)
    assert where in str(info.value)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    assert target.read_bytes() == b"old"


def test_without_onnx_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)   # import onnx now raises ImportError
    with pytest.raises(ImportError, match=r"cyconv\[onnx\]"):
        cyconv.onnx.export(reference(2), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


# -- examples/export_onnx.py --------------------------------------------------------

def run_script(*args):
    return subprocess.run([sys.executable, str(ROOT / "examples" / "export_onnx.py"),
                           *map(str, args)], check=False, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                            "PATH": "/usr/bin:/bin"})


def test_script_writes_and_checks_on_photos(ort, tmp_path):
    model = calibrate(resnet18(4, seed=5), (4, 3, 96, 96))
    cyconv.save(model, tmp_path / "r.safetensors", classes=["bird", "cat", "dog", "panda"],
                image_size=[96, 96], mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    result = run_script(tmp_path / "r.safetensors", "--out", tmp_path / "r.onnx",
                        *(["--images", PHOTOS] if PHOTOS else []))
    assert result.returncode == 0, result.stderr
    assert "onnx.checker: ok" in result.stdout and (tmp_path / "r.onnx").is_file()
    assert "same top class" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["{tmp}/missing.safetensors"], "does not exist"),
    (["{tmp}/r.safetensors", "--images", "{tmp}/missing.jpg"], "missing.jpg does not exist"),
    (["{tmp}/r.safetensors", "--images", "{tmp}/r.safetensors"], "r.safetensors"),
    (["{tmp}/r.safetensors", "--out", "{tmp}"], "it is a folder"),
    (["{tmp}/r.safetensors", "--tolerance", "-1"], "--tolerance"),
    (["{tmp}/no_size.safetensors"], "--image-size"),
])
def test_script_user_mistakes_give_one_line_and_exit_2(ort, tmp_path, args, message):
    cyconv.save(reference(2, 64), tmp_path / "r.safetensors", image_size=[64, 64])
    cyconv.save(reference(2, 64), tmp_path / "no_size.safetensors")
    result = run_script(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    # one error line (argparse prints its usage above it)
    assert len([line for line in result.stderr.splitlines() if "error: " in line]) == 1


def test_script_exits_1_when_the_outputs_differ_more_than_the_tolerance(ort, tmp_path):
    cyconv.manual_seed(0)
    cyconv.save(reference(2, 64), tmp_path / "r.safetensors", image_size=[64, 64])
    result = run_script(tmp_path / "r.safetensors", "--tolerance", "0")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "more than 0" in result.stderr and "Traceback" not in result.stderr
