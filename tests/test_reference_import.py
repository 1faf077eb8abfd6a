"""Import of the reference C++ project's .model files (cyconv.models.reference_import).

The files are built here with numpy in that project's layout (raw little-endian
float32; each conv's weights [out][in][kh][kw] then biases; the Linear's weights
[in][out] then biases), from a random cyconv model.
"""
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import cyconv
from cyconv import nn
from cyconv.models import reference
from cyconv.models.reference_import import ReferenceFormatError, expected_bytes, load_reference

import reference as ref
from conftest import assert_close

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["dog", "panda", "bird"]


def file_arrays(model):
    """The model's arrays in the file's order and layout."""
    arrays = []
    for layer in model.modules():
        if isinstance(layer, nn.Conv2d):
            arrays += [layer.weight.data, layer.bias.data]
        elif isinstance(layer, nn.Linear):
            arrays += [layer.weight.data.T, layer.bias.data]   # stored [in][out]
    return arrays


def write_model_file(path, model):
    blob = np.concatenate([np.ascontiguousarray(a).reshape(-1) for a in file_arrays(model)])
    Path(path).write_bytes(blob.astype("<f4").tobytes())
    return path


@pytest.fixture
def source():
    cyconv.manual_seed(7)
    return reference(len(CLASSES)).eval()


@pytest.fixture
def model_file(tmp_path, source):
    return write_model_file(tmp_path / "animals.model", source)


def numpy_forward(path, bgr_image):
    """The reference project's prediction, in float64 numpy: the weights read straight
    from the file, the photo as cv2.imread gives it (BGR), cv2.resize to 224x224
    (INTER_LINEAR), / 255, the network."""
    data = np.fromfile(path, "<f4").astype(np.float64)
    x = cv2.resize(bgr_image, (224, 224)).astype(np.float64).transpose(2, 0, 1)[None] / 255
    start = 0

    def take(*shape):
        nonlocal start
        size = int(np.prod(shape))
        start += size
        return data[start - size:start].reshape(shape)

    for i, (cin, cout) in enumerate([(3, 16), (16, 32), (32, 64), (64, 128)]):
        w = take(cout, cin, 3, 3)
        x = ref.relu_forward(ref.conv2d_forward(x, w, take(cout), stride=2))
        if i == 0:
            x, _ = ref.max_pool2d_forward(x, 2)
    w = take(4608, len(CLASSES)).T
    return ref.linear_forward(x.reshape(1, -1), w, take(len(CLASSES)))


def test_expected_size():
    floats = (3 * 16 * 9 + 16) + (16 * 32 * 9 + 32) + (32 * 64 * 9 + 64) + \
        (64 * 128 * 9 + 128) + (4608 * 3 + 3)
    assert expected_bytes(3) == 4 * floats == 445068


def test_import_gives_the_same_weights_and_logits(model_file, source):
    model = load_reference(model_file, CLASSES)
    assert not model.training
    for (key, got), expected in zip(model.state_dict().items(), source.state_dict().values()):
        np.testing.assert_array_equal(got, expected, err_msg=key)
    x = np.random.default_rng(0).random((2, 3, 224, 224), np.float32)
    with cyconv.no_grad():
        np.testing.assert_array_equal(model(x), source(x))


def test_predict_reproduces_the_projects_preprocessing(model_file, tmp_path):
    """cyconv.predict on the photo file == the project's pipeline in numpy (OpenCV BGR,
    bilinear resize of a photo that is not 224 px, / 255, no mean or std)."""
    photo = np.random.default_rng(1).integers(0, 256, (301, 250, 3), np.uint8)
    photo[:150] //= 3   # some structure, so that the resize matters
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), photo)
    model = load_reference(model_file, CLASSES)
    expected = numpy_forward(model_file, cv2.imread(str(path)))
    assert_close(cyconv.predict(model, str(path)), expected)
    assert_close(cyconv.predict(model, cv2.cvtColor(photo, cv2.COLOR_BGR2RGB)), expected)


def test_checkpoint_keeps_the_preprocessing(model_file, tmp_path):
    model = load_reference(model_file, CLASSES)
    cyconv.save(model, tmp_path / "ref.safetensors")
    loaded = cyconv.load(tmp_path / "ref.safetensors")
    assert loaded.classes == CLASSES and loaded.image_size == (224, 224)
    assert loaded.channel_order == "BGR" and loaded.interpolation == "linear"
    assert loaded.mean is None and loaded.std is None
    photos = np.random.default_rng(2).integers(0, 256, (3, 180, 260, 3), np.uint8)
    np.testing.assert_array_equal(cyconv.predict(loaded, photos), cyconv.predict(model, photos))


def test_onnx_export_of_the_imported_model(model_file, tmp_path):
    pytest.importorskip("onnx", reason='needs onnx (pip install -e ".[onnx]")')
    ort = pytest.importorskip("onnxruntime", reason='needs onnxruntime (pip install -e ".[onnx]")')
    from cyconv.inference import prepare_input
    from cyconv.onnx import export

    model = load_reference(model_file, CLASSES)
    proto = export(model, tmp_path / "ref.onnx")
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["channel_order"] == '"BGR"' and props["interpolation"] == '"linear"'
    photos = np.random.default_rng(3).integers(0, 256, (2, 200, 230, 3), np.uint8)
    x, _, _ = prepare_input(model, photos)
    session = ort.InferenceSession(str(tmp_path / "ref.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x})[0]
    assert np.abs(got - cyconv.predict(model, photos)).max() <= 1e-4


def test_other_image_size(tmp_path):
    source = reference(2, 64)
    path = write_model_file(tmp_path / "small.model", source)
    assert path.stat().st_size == expected_bytes(2, 64)
    model = load_reference(path, ["a", "b"], image_size=64)
    assert model.image_size == (64, 64)
    np.testing.assert_array_equal(model.state_dict()["10.weight"], source.state_dict()["10.weight"])


@pytest.mark.parametrize("change, words", [
    (lambda blob: blob[:-4], ["expected 445068 bytes", "has 445064"]),
    (lambda blob: blob + b"\0" * 3, ["expected 445068 bytes", "has 445071"]),
    (lambda blob: b"", ["expected 445068 bytes", "has 0"]),
    (lambda blob: blob + b"\0" * 2 * 4609 * 4, ["3 classes", "has 481940",
                                               "the size of a model of 5 classes"]),
])
def test_wrong_size_gives_expected_and_actual_bytes(model_file, change, words):
    model_file.write_bytes(change(model_file.read_bytes()))
    with pytest.raises(ReferenceFormatError) as info:
        load_reference(model_file, CLASSES)
    assert all(word in str(info.value) for word in words), str(info.value)


def test_wrong_number_of_classes(model_file):
    with pytest.raises(ReferenceFormatError, match=r"expected 426632 bytes for a reference model "
                       r"of 2 classes \(224x224 images\), the file has 445068 \(the size of a "
                       r"model of 3 classes\)"):
        load_reference(model_file, ["dog", "panda"])


def test_not_finite_values_name_the_layer(model_file):
    data = np.fromfile(model_file, "<f4")
    data[448 + 5] = np.nan   # in the second conv's weights
    data.tofile(model_file)
    with pytest.raises(ReferenceFormatError, match=r"'3\.weight' contains NaN"):
        load_reference(model_file, CLASSES)


def test_bad_arguments(tmp_path, model_file):
    with pytest.raises(FileNotFoundError):
        load_reference(tmp_path / "missing.model", CLASSES)
    with pytest.raises(ReferenceFormatError, match="not a regular file"):
        load_reference(tmp_path, CLASSES)
    for classes in ["dog,panda,bird", [], ["dog", "dog", "bird"], ["dog", "", "bird"], None]:
        with pytest.raises(ValueError, match="classes"):
            load_reference(model_file, classes)


# -- examples/import_reference.py ---------------------------------------------------

def run_script(*args):
    return subprocess.run([sys.executable, str(ROOT / "examples" / "import_reference.py"),
                           *map(str, args)], check=False, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                            "PATH": "/usr/bin:/bin"})


def test_script_writes_a_checkpoint(model_file, tmp_path):
    result = run_script(model_file, "--classes", "dog,panda,bird", "--out",
                        tmp_path / "ref.safetensors")
    assert result.returncode == 0, result.stderr
    model = cyconv.load(tmp_path / "ref.safetensors")
    assert model.classes == CLASSES and model.channel_order == "BGR"
    assert model.metadata["imported_from"] == "animals.model"


@pytest.mark.parametrize("args, message", [
    (["--classes", "dog,panda"], "expected 426632 bytes"),
    (["--classes", "dog,,bird"], "--classes"),
    (["--classes", "dog,panda,bird", "--image-size", "20"], "--image-size"),
])
def test_script_user_mistakes_exit_2_with_one_line(model_file, tmp_path, args, message):
    out = tmp_path / "ref.safetensors"
    result = run_script(model_file, *args, "--out", out)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not out.exists()
    assert len([line for line in result.stderr.splitlines() if "error: " in line]) == 1


def test_script_missing_file(tmp_path):
    result = run_script(tmp_path / "nope.model", "--classes", "a,b", "--out", tmp_path / "x")
    assert result.returncode == 2 and "does not exist" in result.stderr
