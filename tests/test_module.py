"""The module tree: named sub-modules, hooks, the array pool, one forward / one backward,
errors that name the layer, and the fresh-output guarantee of containers."""
from collections import OrderedDict

import numpy as np
import pytest

import cyconv
from cyconv import models, nn
from cyconv.models.resnet import BasicBlock
from cyconv.nn import array_pool
from cyconv.nn.containers import add_into


class Block(nn.Module):
    """A block of one's own with attributes in a chosen order, and its own backward."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False, dtype=np.float64, seed=1)
        self.bn1 = nn.BatchNorm2d(4, dtype=np.float64)
        self.relu = nn.ReLU()
        self.extra = nn.Sequential(nn.Conv2d(4, 2, 1, dtype=np.float64, seed=2))

    def forward(self, x):
        return self.extra(self.relu(self.bn1(self.conv1(x))))

    def backward(self, grad_output, input_grad=True):
        grad = self.relu.backward(self.extra.backward(grad_output))
        return self.conv1.backward(self.bn1.backward(grad), input_grad)


def test_named_sub_modules_follow_pytorch_names_and_order():
    block = Block()
    assert [name for name, _ in block.named_children()] == ["conv1", "bn1", "relu", "extra"]
    assert [name for name, _ in block.named_modules()] == [
        "", "conv1", "bn1", "relu", "extra", "extra.0"]
    assert [name for name, _ in block.named_parameters()] == [
        "conv1.weight", "bn1.weight", "bn1.bias", "extra.0.weight", "extra.0.bias"]
    assert list(block.state_dict()) == [
        "conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
        "bn1.num_batches_tracked", "extra.0.weight", "extra.0.bias"]
    assert block.get_submodule("extra.0") is block.extra[0]
    block.eval()
    assert not any(m.training for m in block.modules())
    block.train()
    assert all(m.training for m in block.modules())
    for p in block.parameters():
        p.grad[...] = 1
    block.zero_grad()
    assert not any(p.grad.any() for p in block.parameters())
    block.extra = None   # removing a child unregisters it (PyTorch keeps None: no keys either)
    assert "extra.0.weight" not in block.state_dict()


def test_pytorch_module_names_and_keys_match(rng):
    torch = pytest.importorskip("torch")
    block = Block()
    T = torch.nn
    twin = T.Module()
    twin.conv1, twin.bn1, twin.relu = T.Conv2d(3, 4, 3, padding=1, bias=False), T.BatchNorm2d(4), T.ReLU()
    twin.extra = T.Sequential(T.Conv2d(4, 2, 1))
    assert [n for n, _ in block.named_modules()] == [n for n, _ in twin.named_modules()]
    assert list(block.state_dict()) == list(twin.state_dict())
    assert [n for n, _ in block.named_parameters()] == [n for n, _ in twin.named_parameters()]


def test_set_submodule_swaps_a_layer_in_place():
    model = models.small(3, 32, widths=(4, 4, 8, 8))
    replacement = nn.BatchNorm2d(4)
    model.set_submodule("1", replacement)
    assert model[1] is replacement
    net = models.resnet18(3).eval()
    new_fc = nn.Linear(512, 7)
    net.set_submodule("fc", new_fc)
    assert net.fc is new_fc and net(np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 7)
    with pytest.raises(KeyError, match="no sub-module"):
        net.set_submodule("layer9.fc", new_fc)


# ---------------------------------------------------------------------------
# Fresh outputs (review finding 1) and the array pool
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("tail", ["flatten", "dropout-eval", "dropout-p0", "identity"])
def test_a_sequential_ending_in_a_pass_through_layer_returns_arrays_that_stay(tail, rng):
    """A Sequential ending in Flatten / Dropout (eval or p=0) / Identity returns a view of
    (or) the previous layer's output: the next call must not overwrite what it returned."""
    last = {"flatten": nn.Flatten(), "dropout-eval": nn.Dropout(0.5),
            "dropout-p0": nn.Dropout(0.0), "identity": nn.Identity()}[tail]
    model = nn.Sequential(nn.Conv2d(3, 4, 3, dtype=np.float64, seed=0), nn.ReLU(), last)
    if tail == "dropout-eval":
        model.eval()
    xs = [rng.standard_normal((2, 3, 6, 6)) for _ in range(3)]
    outputs = [model(x) for x in xs]
    copies = [model(x).copy() for x in xs]
    for out, copy in zip(outputs, copies):
        np.testing.assert_array_equal(out, copy)


@pytest.mark.parametrize("head", [nn.Flatten, lambda: nn.Dropout(0.0), nn.Identity])
def test_a_sequential_starting_with_a_pass_through_layer_returns_gradients_that_stay(head, rng):
    model = nn.Sequential(head(), nn.Linear(12, 3, dtype=np.float64, seed=0))
    x = rng.standard_normal((2, 12)) if head is not nn.Flatten else rng.standard_normal((2, 3, 4))
    grads, kept = [], []
    for _ in range(3):
        model(x)
        grads.append(model.backward(rng.standard_normal((2, 3))))
        kept.append(grads[-1].copy())
    assert not np.array_equal(grads[0], grads[1])
    for g, k in zip(grads, kept):   # the later backward passes overwrote none of them
        np.testing.assert_array_equal(g, k)


def test_embeddings_of_the_small_network_without_its_classifier_stay_distinct(rng):
    """The review's example: models.small(3)[:-1].eval() as a feature extractor."""
    cyconv.manual_seed(0)
    encoder = models.small(3, 32, widths=(4, 4, 8, 8))[:-1].eval()
    batches = [rng.standard_normal((2, 3, 32, 32)).astype(np.float32) for _ in range(3)]
    embeddings = [encoder(x) for x in batches]
    for x, e in zip(batches, embeddings):
        np.testing.assert_array_equal(e, encoder(x))
    assert not np.array_equal(embeddings[0], embeddings[2])


def test_the_pool_reuses_only_arrays_nobody_holds(rng):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, dtype=np.float64, seed=0), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1, dtype=np.float64, seed=1))
    x = rng.standard_normal((2, 3, 8, 8))
    with cyconv.no_grad():
        first = model(x)
        keep = first.copy()
        array_pool.fill_free(np.nan)      # everything not held may be scribbled over
        np.testing.assert_array_equal(first, keep)
        second = model(x)                 # the same result from recycled arrays
    np.testing.assert_array_equal(second, keep)


def test_steps_after_the_first_allocate_no_new_arrays(rng):
    model = models.small(3, 32, widths=(4, 4, 8, 8))
    loss_fn = nn.CrossEntropyLoss()
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    labels = np.array([0, 1, 2, 0])

    def step():
        loss_fn(model(x), labels)
        model.backward(loss_fn.backward(), input_grad=False)

    step()
    step()
    before = sum(len(bucket) for bucket in array_pool._pool.buckets.values())
    for _ in range(3):
        step()
    assert sum(len(bucket) for bucket in array_pool._pool.buckets.values()) == before


def test_scratch_arrays_are_shared_between_layers():
    """Scratch for one kernel call comes from the pool in power-of-two lengths: a second
    layer reuses the first one's array once it is dropped, never one still held."""
    first, second = nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3)
    a = first._scratch((3, 100), np.float32)
    assert a.shape == (3, 100) and a.dtype == np.float32 and a.flags.c_contiguous
    held = second._scratch((5, 50), np.float32)            # 250 -> 256 elements, as a's 300 -> 512
    assert not np.shares_memory(a, held)
    address = a.base.__array_interface__["data"][0]
    del a
    b = second._scratch((20, 20), np.float32)             # 400 -> 512: a's array again
    assert b.base.__array_interface__["data"][0] == address
    assert not np.shares_memory(b, held)


# ---------------------------------------------------------------------------
# One forward, one backward (hostile-input finding) and errors that name the layer
# ---------------------------------------------------------------------------
def _model_and_data(rng):
    cyconv.manual_seed(1)
    model = models.small(3, 16, widths=(4, 8), dropout=0.0)
    x = rng.standard_normal((2, 3, 16, 16)).astype(np.float32)
    return model, x, rng.standard_normal((2, 3)).astype(np.float32)


def test_backward_twice_for_one_forward_raises_and_changes_nothing(rng):
    model, x, dy = _model_and_data(rng)
    model.zero_grad()
    model(x)
    model.backward(dy)
    grads = [p.grad.copy() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="called twice for one forward"):
        model.backward(dy)
    for p, g in zip(model.parameters(), grads):
        np.testing.assert_array_equal(p.grad, g)


def test_backward_after_a_second_forward_raises_and_changes_nothing(rng):
    model, x, dy = _model_and_data(rng)
    model.zero_grad()
    model(x)
    model(-x)
    with pytest.raises(RuntimeError, match="forward ran 2 times"):
        model.backward(dy)
    assert not any(p.grad.any() for p in model.parameters())
    model(x)   # a new pair works
    model.backward(dy)
    assert any(p.grad.any() for p in model.parameters())


def test_a_module_used_twice_in_one_forward_is_refused_at_backward(rng):
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(4, 4, dtype=np.float64, seed=0), relu,
                          nn.Linear(4, 4, dtype=np.float64, seed=1), relu)
    x = rng.standard_normal((2, 4))
    with cyconv.no_grad():
        model(x)          # inference through a shared module is fine
    out = model(x)
    with pytest.raises(RuntimeError, match="ran 2 times in one forward"):
        model.backward(np.ones_like(out))
    assert not any(p.grad.any() for p in model.parameters())


def test_errors_name_the_layer_path(rng):
    net = models.resnet18(3)
    with pytest.raises(ValueError, match=r"^conv1: Conv2d: expected input of shape \(N, 3, H, W\)"):
        net(np.zeros((1, 4, 32, 32), np.float32))
    net.layer3[1].conv2 = nn.Conv2d(256, 255, 3, padding=1, bias=False)   # breaks the block
    with pytest.raises(ValueError, match=r"^layer3\.1\.bn2: BatchNorm2d: expected input"):
        net(np.zeros((1, 3, 32, 32), np.float32))


# ---------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------
def test_hooks_see_every_call_in_order_and_can_be_removed(rng):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, dtype=np.float64, seed=0), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 2, dtype=np.float64, seed=1))
    events, handles = [], []
    for name, module in model.named_modules():
        if name:
            handles += [
                module.register_forward_pre_hook(lambda m, i, n=name: events.append(("pre", n))),
                module.register_forward_hook(lambda m, i, o, n=name: events.append(("out", n))),
                module.register_full_backward_pre_hook(
                    lambda m, g, n=name: events.append(("bpre", n))),
                module.register_full_backward_hook(
                    lambda m, gi, go, n=name: events.append(("bout", n)))]
    x = rng.standard_normal((2, 3, 6, 6))
    y = model(x)
    model.backward(np.ones_like(y))
    names = ["0", "1", "2", "3"]
    assert events == ([(kind, n) for n in names for kind in ("pre", "out")]
                      + [(kind, n) for n in reversed(names) for kind in ("bpre", "bout")])
    for handle in handles:
        handle.remove()
    events.clear()
    model(x)
    assert not events


def test_a_forward_hook_can_replace_the_output_and_hooks_disable_fusion(rng):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, dtype=np.float64, seed=0), nn.ReLU())
    x = rng.standard_normal((1, 3, 5, 5))
    seen = {}
    model[0].register_forward_hook(lambda m, i, o: seen.update(conv=o.copy()))
    y = model(x)
    assert seen["conv"].min() < 0          # the conv's own output, before the ReLU
    np.testing.assert_array_equal(y, np.maximum(seen["conv"], 0))
    model[1].register_forward_hook(lambda m, i, o: o * 2)
    np.testing.assert_array_equal(model(x), 2 * np.maximum(seen["conv"], 0))


def test_backward_hook_gives_the_gradient_at_a_layer_inside_a_block(rng):
    """Gradients at layer4.1.conv2 of a ResNet, against finite differences of the logit."""
    cyconv.manual_seed(2)
    net = models.resnet_small(2).eval()
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    seen = {}
    target = net.get_submodule("layer4.0.conv2")
    target.register_full_backward_hook(lambda m, gi, go: seen.update(grad=go[0].copy()))
    target.register_forward_hook(lambda m, i, o: seen.update(out=o.copy()))
    net(x)
    net.backward(np.array([[1.0, 0.0]], np.float32), input_grad=False)
    assert seen["grad"].shape == seen["out"].shape
    # the hooked gradient is dlogit0/d(conv2 output): check one entry by finite differences
    index = tuple(np.argwhere(np.abs(seen["grad"]) > 0.5 * np.abs(seen["grad"]).max())[0])
    eps = 1e-2

    def logit_with(delta):
        handle = target.register_forward_hook(
            lambda m, i, o: (o + delta * (np.arange(o.size).reshape(o.shape) ==
                                          np.ravel_multi_index(index, o.shape))).astype(o.dtype))
        with cyconv.no_grad():
            value = float(net(x)[0, 0])
        handle.remove()
        return value

    numeric = (logit_with(eps) - logit_with(-eps)) / (2 * eps)
    assert numeric == pytest.approx(float(seen["grad"][index]), rel=2e-2, abs=1e-3)


# ---------------------------------------------------------------------------
# Containers: Residual, Concat, Identity against numpy and finite differences
# ---------------------------------------------------------------------------
def _residual_block(dtype=np.float64):
    body = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, dtype=dtype, seed=1),
                         nn.BatchNorm2d(4, dtype=dtype), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1, dtype=dtype, seed=2))
    shortcut = nn.Sequential(nn.Conv2d(3, 4, 1, stride=2, bias=False, dtype=dtype, seed=3))
    return nn.Residual(body, shortcut)


def test_residual_sums_body_and_shortcut_and_their_gradients(rng, finite_difference):
    block = _residual_block()
    x = rng.standard_normal((2, 3, 7, 5))
    with cyconv.no_grad():
        expected = block.body(x) + block.shortcut(x)
    y = block(x)
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    R = rng.standard_normal(y.shape)
    dx = block.backward(R)
    np.testing.assert_allclose(dx, finite_difference(lambda v: (block(v) * R).sum(), x),
                               rtol=1e-5, atol=1e-7)
    identity = nn.Residual(nn.Conv2d(3, 3, 3, padding=1, dtype=np.float64, seed=4))
    assert isinstance(identity.shortcut, nn.Identity)
    with cyconv.no_grad():
        expected = x + identity.body(x)
    y = identity(x)
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    R = rng.standard_normal(y.shape)
    dx = identity.backward(R)
    np.testing.assert_allclose(dx, finite_difference(lambda v: (identity(v) * R).sum(), x),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_residual_sums_are_numpys_for_any_thread_count(rng, threads, dtype):
    """add_into (the sum of Residual, BasicBlock and InvertedResidual) gives numpy's
    a + b bit for bit on 1, 2 and 3 threads, for an odd size above the parallel
    threshold, a strided view and an input of the other float type."""
    a = rng.standard_normal((3, 5, 67, 129)).astype(dtype)
    b = rng.standard_normal((3, 5, 129, 67)).astype(dtype).transpose(0, 1, 3, 2)
    other = b.astype(np.float64 if dtype == np.float32 else np.float32)
    for n in (1, 2, 3):
        threads(n)
        np.testing.assert_array_equal(add_into(np.empty_like(a), a, b), a + b)
        np.testing.assert_array_equal(add_into(np.empty_like(a), a, other),
                                      a + other.astype(dtype))


@pytest.mark.parametrize("activation", [1, 2])   # ReLU, ReLU6
def test_residual_sum_with_its_activation_is_numpys(rng, threads, activation):
    """add_into with an activation: max(a + b, 0) (and min(., 6)), NaN kept, bit for bit."""
    a = rng.standard_normal((3, 5, 67, 129)).astype(np.float32) * 5
    b = rng.standard_normal(a.shape).astype(np.float32) * 5
    a.flat[::997] = np.nan
    total = a + b
    expected = np.where(total > 0, total, np.where(np.isnan(total), total, 0))
    if activation == 2:
        expected = np.where(expected >= 6, 6, expected).astype(np.float32)
    for n in (1, 2, 3):
        threads(n)
        np.testing.assert_array_equal(add_into(np.empty_like(a), a, b, activation), expected)


@pytest.mark.parametrize("mode", ["train", "eval", "inference"])
@pytest.mark.parametrize("downsample", [False, True])
def test_basic_block_fuses_its_sum_with_the_same_results(mode, downsample):
    """Without hooks, a BasicBlock computes bn2, the sum of its paths and relu_out in one
    kernel pass (in inference: the sum and relu_out, bn2 being folded into conv2); a hook
    on relu_out makes them run as layers: outputs, gradients and running statistics are
    the same bits."""
    planes, stride = (16, 2) if downsample else (8, 1)
    x = np.random.default_rng(4).standard_normal((2, 8, 9, 11)).astype(np.float32)
    results, seen = [], []
    for hooked in (False, True):
        cyconv.manual_seed(3)
        block = BasicBlock(8, planes, stride=stride, downsample=nn.Sequential(
            nn.Conv2d(8, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
            if downsample else None)
        block.bn2.running_mean[:] = np.random.default_rng(7).standard_normal(planes)
        block.train(mode == "train")
        if hooked:
            block.relu_out.register_forward_hook(lambda m, i, o: seen.append(o.copy()))
        if mode == "inference":
            with cyconv.no_grad():
                y = block(x).copy()
            results.append([y])
            continue
        y = block(x).copy()
        dx = block.backward(np.random.default_rng(5).standard_normal(y.shape)
                            .astype(np.float32))
        results.append([y, dx, block.bn2.running_mean.copy()]
                       + [p.grad.copy() for p in block.parameters()])
    y = results[0][0]
    assert (y == 0).any() and (y > 0).any()
    for fused, plain in zip(*results):
        np.testing.assert_array_equal(fused, plain)
    np.testing.assert_array_equal(seen[0], results[1][0])


def test_concat_puts_branches_side_by_side(rng, finite_difference):
    branches = [nn.Conv2d(3, 2, 1, dtype=np.float64, seed=1),
                nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, dtype=np.float64, seed=2), nn.ReLU()),
                nn.MaxPool2d(3, stride=1, padding=1)]
    block = nn.Concat(*branches)
    x = rng.standard_normal((2, 3, 5, 6))
    with cyconv.no_grad():
        expected = np.concatenate([b(x) for b in branches], axis=1)
    y = block(x)
    assert y.shape == (2, 8, 5, 6)
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    R = rng.standard_normal(y.shape)
    dx = block.backward(R)
    np.testing.assert_allclose(dx, finite_difference(lambda v: (block(v) * R).sum(), x),
                               rtol=1e-5, atol=1e-7)
    assert list(block.state_dict())[:2] == ["0.weight", "0.bias"]


def test_container_shape_errors_leave_nothing_changed(rng):
    bad = nn.Residual(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)),
                      nn.Conv2d(3, 4, 1, stride=2))
    before = bad.state_dict()
    with pytest.raises(ValueError, match=r"Residual: the body gives \(1, 4, 8, 8\) but the "
                                         r"shortcut \(1, 4, 4, 4\)"):
        bad(np.zeros((1, 3, 8, 8), np.float32))
    for key, value in bad.state_dict().items():   # no running statistics moved
        np.testing.assert_array_equal(value, before[key])
    side = nn.Concat(nn.Conv2d(3, 2, 3), nn.Conv2d(3, 2, 1))
    with pytest.raises(ValueError, match=r"agree in every axis but the channels.*\(1, 2, 6, 6\)"
                                         r".*\(1, 2, 8, 8\)"):
        side(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="groups must divide"):
        nn.Conv2d(6, 4, 3, groups=4)


def test_containers_match_pytorch_through_to_torch(rng):
    torch = pytest.importorskip("torch")
    model = nn.Sequential(_residual_block(np.float32), nn.ReLU(),
                          nn.Concat(nn.Conv2d(4, 2, 1), nn.Identity()),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    twin = models.to_torch(model)
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in model.state_dict().items()})
    x = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
    tx = torch.from_numpy(x).requires_grad_(True)
    ty = twin(tx)
    ty.backward(torch.ones_like(ty))
    y = model(x)
    dx = model.backward(np.ones_like(y))
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-4, atol=1e-5)
    for (name, p), tp in zip(model.named_parameters(), twin.parameters()):
        np.testing.assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)


def test_any_container_model_round_trips_through_its_spec(tmp_path, rng):
    model = nn.Sequential(OrderedDict(stem=nn.Conv2d(3, 4, 3),
                                      block=nn.Residual(nn.Sequential(nn.ReLU())),
                                      branches=nn.Concat(nn.Identity(), nn.Conv2d(4, 2, 1)),
                                      pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(),
                                      fc=nn.Linear(6, 2)))
    cyconv.save(model, tmp_path / "m.safetensors")
    loaded = cyconv.load(tmp_path / "m.safetensors")
    assert list(loaded.state_dict()) == list(model.state_dict())
    x = rng.standard_normal((1, 3, 7, 7)).astype(np.float32)
    model.eval()
    np.testing.assert_array_equal(loaded(x), model(x))


def test_a_block_of_ones_own_is_saved_once_registered(tmp_path):
    block = Block()
    with pytest.raises(models.ArchitectureError, match="register it with"):
        cyconv.save(block, tmp_path / "b.safetensors")
    models.register(Block)
    cyconv.save(block, tmp_path / "b.safetensors")
    loaded = cyconv.load(tmp_path / "b.safetensors")
    assert isinstance(loaded, Block) and list(loaded.state_dict()) == list(block.state_dict())
