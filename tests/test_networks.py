"""ResNet-18 and MobileNetV2 against torchvision's (tests/torchvision_mirror.py): its
state_dict loads strictly, with the same outputs in eval mode, the same gradients and
running statistics in train mode; and the small ResNet of the training recipe."""
import numpy as np
import pytest

import cyconv
from cyconv import models, nn

torch = pytest.importorskip("torch")
import torchvision_mirror as tv  # noqa: E402  (needs torch)

NETWORKS = {"resnet18": (models.resnet18, tv.resnet18),
            "mobilenet_v2": (models.mobilenet_v2, tv.mobilenet_v2)}


def twins(name, num_classes=5, dtype=torch.float64):
    """(cyconv model, torchvision model) with the torchvision model's random weights and
    randomised BatchNorm statistics loaded into the cyconv one."""
    ours_of, theirs_of = NETWORKS[name]
    torch.manual_seed(0)
    theirs = theirs_of(num_classes).to(dtype)
    with torch.no_grad():
        for module in theirs.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    ours = ours_of(num_classes)
    if dtype == torch.float64:
        ours = cyconv.models.build(_float64(models.describe(ours)))
    ours.load_state_dict(theirs.state_dict())        # strict: the same keys
    return ours, theirs


def _float64(spec):
    """A spec with every float32 dtype argument turned into float64."""
    if isinstance(spec, dict):
        return {k: ("float64" if k == "dtype" else _float64(v)) for k, v in spec.items()}
    if isinstance(spec, list):
        return [_float64(v) for v in spec]
    return spec


@pytest.mark.parametrize("name", list(NETWORKS))
def test_state_dict_keys_and_module_names_are_torchvisions(name):
    ours, theirs = twins(name, dtype=torch.float32)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [tuple(v.shape) for v in ours.state_dict().values()] == \
        [tuple(v.shape) for v in theirs.state_dict().values()]
    # every module torchvision names exists here under the same name
    ours_names = {n for n, _ in ours.named_modules()}
    assert {n for n, _ in theirs.named_modules()} <= ours_names
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})


@pytest.mark.parametrize("name", list(NETWORKS))
def test_eval_outputs_equal_torchvisions(name, rng):
    ours, theirs = twins(name)
    ours.eval()
    theirs.eval()
    x = rng.standard_normal((2, 3, 64, 72))
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(cyconv.predict(ours, x), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_train_gradients_and_statistics_equal_torchvisions(name, rng):
    ours, theirs = twins(name)
    ours.train()
    theirs.train()
    if name == "mobilenet_v2":   # dropout draws differ between the libraries
        ours.classifier[0].p = 0.0
        theirs.classifier[0].p = 0.0
    x = rng.standard_normal((3, 3, 48, 56))
    labels = np.array([0, 3, 4])
    tx = torch.from_numpy(x).requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(theirs(tx), torch.from_numpy(labels))
    loss.backward()
    loss_fn = nn.CrossEntropyLoss()
    ours.zero_grad()
    ours_loss = loss_fn(ours(x), labels)
    dx = ours.backward(loss_fn.backward())
    assert ours_loss == pytest.approx(loss.item(), rel=1e-9)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-7, atol=1e-10)
    grads = dict(theirs.named_parameters())
    for key, p in ours.named_parameters():
        scale = max(1.0, float(grads[key].grad.abs().max()))
        np.testing.assert_allclose(p.grad, grads[key].grad.numpy(), rtol=1e-7,
                                   atol=1e-10 * scale, err_msg=key)
    for key, value in theirs.state_dict().items():   # running statistics after the step
        np.testing.assert_allclose(ours.state_dict()[key], value.numpy(), rtol=1e-9,
                                   atol=1e-12, err_msg=key)


def test_finetuning_torchvision_weights_with_a_new_head(rng, tmp_path):
    """A user with torchvision weights loads them, swaps the head and trains: the model
    saves and loads back as it was."""
    ours, theirs = twins("resnet18", num_classes=1000, dtype=torch.float32)
    ours.fc = nn.Linear(512, 3)
    opt = cyconv.optim.SGD(ours.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    x = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    loss_fn(ours(x), np.array([0, 2]))
    ours.backward(loss_fn.backward(), input_grad=False)
    opt.step()
    cyconv.save(ours, tmp_path / "ft.safetensors")
    back = cyconv.load(tmp_path / "ft.safetensors")
    assert back.fc.out_features == 3 and list(back.state_dict())[-2:] == ["fc.weight", "fc.bias"]
    ours.eval()
    np.testing.assert_array_equal(back(x), ours(x))


def test_thread_count_does_not_change_a_resnet_step(rng, threads):
    results = []
    x = rng.standard_normal((4, 3, 40, 40)).astype(np.float32)
    for n in (1, 2, 3):
        threads(n)
        cyconv.manual_seed(2)
        model = models.resnet_small(3)
        loss_fn = nn.CrossEntropyLoss()
        loss_fn(model(x), np.array([0, 1, 2, 0]))
        model.backward(loss_fn.backward())
        results.append([p.grad.copy() for p in model.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.tobytes() == b.tobytes()


def test_small_resnet_works_at_the_small_networks_resolutions():
    """resnet_small: a stride-2 stem and no max-pool, so its stages see 128 px photos at
    64, 32, 16 and 8 px with 16, 32, 64 and 128 channels."""
    model = models.resnet_small(3)
    assert [name for name, _ in model.named_children()] == [
        "conv1", "bn1", "relu", "layer1", "layer2", "layer3", "layer4", "avgpool", "flatten",
        "fc"]
    shape, stages = (1, 3, 128, 128), []
    for name, module in model.named_children():
        shape = module.output_shape(shape)
        if name.startswith("layer"):
            stages.append(shape)
    assert stages == [(1, 16, 64, 64), (1, 32, 32, 32), (1, 64, 16, 16), (1, 128, 8, 8)]
    assert shape == (1, 3)
