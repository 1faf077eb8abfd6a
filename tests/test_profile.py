"""cyconv.profile: per-layer times and FLOPs, the model left as it was, the command line."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cyconv
from cyconv import models, nn
from cyconv.profile_cli import main
from cyconv.profiling import flop_counts, gemm_peak, layer_flops

ROOT = Path(__file__).resolve().parents[1]
FAST = {"steps": 2, "warmup": 1, "peak": 100.0, "print_table": False}   # peak given: not measured


def leaf_names(model):
    return [name or "(model)" for name, m in model.named_modules() if not m.named_children()]


def small_networks():
    cyconv.manual_seed(0)
    return {
        "sequential": (models.small(3, 32, widths=(4, 8, 8, 8)), (3, 3, 32, 32)),
        "resnet": (models.resnet([1, 1, 1, 1], 5, widths=(4, 8, 8, 8), stem="small"),
                   (2, 3, 24, 24)),
        "mobilenet_v2": (models.mobilenet_v2(4, width_mult=0.25), (2, 3, 32, 32)),
    }


@pytest.mark.parametrize("kind", ["sequential", "resnet", "mobilenet_v2"])
def test_every_leaf_layer_in_execution_order_with_positive_times(kind):
    model, shape = small_networks()[kind]
    result = cyconv.profile(model, shape, **FAST)
    # in these networks modules are registered in the order they run
    assert [layer.name for layer in result.layers] == leaf_names(model)
    assert result.not_run == []
    for layer in result.layers:
        assert layer.forward.ms > 0 and layer.backward.ms > 0, layer.name
    assert result.forward_ms > 0 and result.backward_ms > 0 and result.unhooked_ms > 0
    table = result.table()
    assert all(name in table for name in leaf_names(model))
    assert "not fused" in table


def test_flop_counts_match_hand_computed_ones():
    conv1 = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2)
    conv2 = nn.Conv2d(6, 5, (1, 3), stride=(1, 2))
    model = nn.Sequential(conv1, nn.ReLU(), conv2, nn.Flatten(), nn.Linear(5 * 4 * 2, 7))
    result = cyconv.profile(model, (3, 4, 9, 11), **FAST)
    by_name = {layer.name: layer for layer in result.layers}
    # conv1: out (3, 6, 4, 5) [H: (9 + 2 - 4 - 1) // 2 + 1, W: (11 + 2 - 4 - 1) // 2 + 1],
    # each output (4 / 2 groups) * 3 * 3 multiply-adds
    forward1 = 2 * (3 * 6 * 4 * 5) * (2 * 3 * 3)
    assert by_name["0"].output_shape == (3, 6, 4, 5)
    assert (by_name["0"].forward.flops, by_name["0"].backward.flops) == (forward1, forward1)
    # conv2: out (3, 5, 4, 2), 6 * 1 * 3 taps; backward: weight and input gradients
    forward2 = 2 * (3 * 5 * 4 * 2) * (6 * 3)
    assert (by_name["2"].forward.flops, by_name["2"].backward.flops) == (forward2, 2 * forward2)
    forward4 = 2 * 3 * 40 * 7
    assert (by_name["4"].forward.flops, by_name["4"].backward.flops) == (forward4, 2 * forward4)
    for name in ("1", "3"):   # memory-bound: bytes, no FLOPs
        assert by_name[name].forward.flops == 0 and by_name[name].backward.flops == 0
    assert by_name["1"].forward.bytes == 2 * 3 * 6 * 4 * 5 * 4
    assert by_name["3"].forward.bytes == 0   # Flatten returns a view
    assert flop_counts(model, (3, 4, 9, 11)) == (forward1 + forward2 + forward4,
                                                 forward1 + 2 * forward2 + 2 * forward4)
    assert layer_flops(nn.ReLU(), (1, 2), (1, 2)) is None


def test_the_reference_network_counts_as_the_old_benchmark_did():
    shapes = [(3, 16, 111), (16, 32, 27), (32, 64, 13), (64, 128, 6)]
    forward = sum(2 * cin * cout * 9 * size * size for cin, cout, size in shapes) + 2 * 4608 * 3
    first = 2 * 3 * 16 * 9 * 111 * 111
    assert flop_counts(models.reference(3), (1, 3, 224, 224)) == (forward, 2 * forward - first)


def test_the_model_is_left_as_it_was():
    model, shape = small_networks()["sequential"]
    model.eval()
    model[2].train()   # mixed modes come back as they were
    rng = np.random.default_rng(1)
    for param in model.parameters():
        param.grad[...] = rng.standard_normal(param.shape)
    dropout = next(m for m in model.modules() if isinstance(m, nn.Dropout))
    dropout.calls = 7
    state = model.state_dict()
    grads = [param.grad.copy() for param in model.parameters()]
    modes = [m.training for m in model.modules()]
    result = cyconv.profile(model, shape, **FAST)
    assert result.backward   # it ran training steps: statistics and dropout moved meanwhile
    after = model.state_dict()
    for key, value in state.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)
    for param, grad in zip(model.parameters(), grads):
        np.testing.assert_array_equal(param.grad, grad)
    assert dropout.calls == 7
    assert [m.training for m in model.modules()] == modes
    out = model(np.zeros(shape, np.float32))   # usable as before: forward, backward
    model.backward(np.ones_like(out))


def test_a_pending_forward_is_forgotten_not_an_error():
    model, shape = small_networks()["sequential"]
    model(np.zeros(shape, np.float32))
    cyconv.profile(model, shape, **FAST)
    with pytest.raises(RuntimeError, match="run forward again"):
        model.backward(np.ones((shape[0], 3), np.float32))


def test_inference_has_no_backward_and_restores_the_mode():
    model, shape = small_networks()["resnet"]
    result = cyconv.profile(model, shape, backward=False, **FAST)
    assert all(layer.backward is None for layer in result.layers)
    assert result.backward_ms == 0 and "bwd" not in result.table()
    assert model.training


def test_threads_are_set_for_the_call_and_restored():
    model, shape = small_networks()["sequential"]
    before = cyconv.get_num_threads()
    result = cyconv.profile(model, shape, threads=1, **FAST)
    assert result.threads == 1 and cyconv.get_num_threads() == before


def test_gemm_peak_is_measured_when_not_given(capsys):
    assert gemm_peak(1, size=128, repeats=1) > 0
    model = nn.Sequential(nn.Linear(3, 2))
    result = cyconv.profile(model, (4, 3), steps=1, warmup=0)
    assert result.peak_gflop_s > 0 and result.peak_measured
    assert "measured in this run" in capsys.readouterr().out
    given = cyconv.profile(model, (4, 3), steps=1, peak=123.0, print_table=False)
    assert given.peak_gflop_s == 123.0 and "given by the caller" in given.table()


@pytest.mark.parametrize("arguments, message", [
    ({"input_shape": (0, 3, 8, 8)}, "input_shape"),
    ({"input_shape": "32x3"}, "input_shape"),
    ({"steps": 0}, "steps"),
    ({"warmup": -1}, "warmup"),
    ({"peak": -5}, "peak"),
    ({"input_shape": (2, 4, 8, 8)}, r"Conv2d: expected input of shape \(N, 3, H, W\)"),
])
def test_bad_arguments_get_clear_errors(arguments, message):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    arguments = {"input_shape": (2, 3, 8, 8), "steps": 1, "print_table": False, **arguments}
    with pytest.raises(ValueError, match=message):
        cyconv.profile(model, **arguments)
    with pytest.raises(TypeError, match="expected a cyconv Module"):
        cyconv.profile(object(), (1, 3, 8, 8))


def test_command_line_named_network_and_checkpoint(tmp_path, capsys):
    small = ["--batch", "2", "--image-size", "32", "--steps", "1", "--warmup", "0",
             "--threads", "1"]
    assert main(["--model", "small"] + small) == 0
    assert "layer" in capsys.readouterr().out
    path = tmp_path / "model.safetensors"
    cyconv.save(models.small(3, 32), path, image_size=(32, 32))
    assert main(["--model", str(path), "--batch", "2", "--steps", "1", "--warmup", "0",
                 "--inference"]) == 0
    assert "inference" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "nonexistent"], "expected one of"),
    (["--batch", "0"], "--batch: expected an int >= 1"),
    (["--threads", "1000"], "--threads: expected an int from 1"),
    (["--model", "reference", "--image-size", "20"], "too small"),
])
def test_command_line_errors_fit_on_one_line(argv, message, capsys):
    try:
        code = main(argv + ["--steps", "1"])
    except SystemExit as stop:
        code = stop.code
    assert code != 0
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_python_dash_m_runs_without_warnings():
    done = subprocess.run([sys.executable, "-m", "cyconv.profile_cli", "--model", "reference",
                           "--batch", "1", "--image-size", "64", "--steps", "1", "--threads", "1"],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and "Conv2d" in done.stdout


def test_cyconv_profile_is_the_function_and_the_command_line_a_module_of_its_own():
    from cyconv.profiling import profile
    assert cyconv.profile is profile
    done = subprocess.run([sys.executable, "-W", "error", "-m", "cyconv.profile_cli", "--help"],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0 and "--model" in done.stdout, done.stderr
