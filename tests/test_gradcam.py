"""Grad-CAM and feature maps: against a plain-numpy Grad-CAM, thread invariance, no side effects."""
import numpy as np
import pytest

import cyconv
from cyconv import models, nn
from cyconv.explain import default_layer, feature_grid, features, gradcam, overlay

import reference as ref
from conftest import num_threads

F64 = np.float64


def tiny_net(rng, dtype=F64):
    """Conv-ReLU-MaxPool-Conv-BN-ReLU-Flatten-Linear for 3x8x8 images, 3 classes, random eval BN."""
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, dtype=dtype, seed=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, padding=1, bias=False, dtype=dtype, seed=2),
        nn.BatchNorm2d(5, dtype=dtype),
        nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 3, dtype=dtype, seed=3))
    bn = net[4]
    bn.weight.data[...] = rng.uniform(0.5, 1.5, 5)
    bn.bias.data[...] = rng.uniform(-0.2, 0.4, 5)
    bn.running_mean[...] = rng.uniform(-0.3, 0.3, 5)
    bn.running_var[...] = rng.uniform(0.5, 2.0, 5)
    return net.eval()


def bilinear(a, size):
    """Half-pixel-centre bilinear resize of a 2-D array (cv2.INTER_LINEAR's rule), in numpy."""
    def axis(n_out, n_in):
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), pos - lo
    y0, y1, wy = axis(size[0], a.shape[0])
    x0, x1, wx = axis(size[1], a.shape[1])
    top = a[y0][:, x0] * (1 - wx) + a[y0][:, x1] * wx
    bottom = a[y1][:, x0] * (1 - wx) + a[y1][:, x1] * wx
    return top * (1 - wy[:, None]) + bottom * wy[:, None]


def numpy_gradcam(net, x, layer, classes=None):
    """Grad-CAM of tiny_net written with tests/reference.py: (heatmaps, raw, weights, A, dA)."""
    c0, _, _, c3, bn, _, _, lin = list(net)
    a = {}
    a[0] = ref.conv2d_forward(x, c0.weight.data, c0.bias.data, padding=1)
    a[1] = ref.relu_forward(a[0])
    a[2], _ = ref.max_pool2d_forward(a[1], 2)
    a[3] = ref.conv2d_forward(a[2], c3.weight.data, None, padding=1)
    a[4] = ref.batch_norm2d_eval_forward(a[3], bn.weight.data, bn.bias.data, bn.running_mean,
                                         bn.running_var, bn.eps)
    a[5] = ref.relu_forward(a[4])
    logits = ref.linear_forward(a[5].reshape(len(x), -1), lin.weight.data, lin.bias.data)
    chosen = logits.argmax(1) if classes is None else np.asarray(classes)
    g = {6: np.eye(3)[chosen] @ ref.f64(lin.weight.data)}
    g[5] = g[6].reshape(a[5].shape)                                       # d/d out of layer 5
    g[4] = ref.relu_backward(a[4], g[5])
    g[3] = ref.batch_norm2d_eval_backward(a[3], bn.weight.data, bn.running_mean,
                                          bn.running_var, g[4], bn.eps)[0]
    g[2] = ref.conv2d_backward(a[2], c3.weight.data, g[3], padding=1, bias=False)[0]
    g[1] = ref.max_pool2d_backward(a[1], g[2], 2)
    g[0] = ref.relu_backward(a[0], g[1])
    A, dA = a[layer], g[layer]
    weights = dA.mean(axis=(2, 3))
    raw = np.maximum(np.einsum("nk,nkhw->nhw", weights, A), 0)
    maps = []
    for r in raw:
        big = bilinear(r, x.shape[2:])
        maps.append(big / big.max() if big.max() > 0 else big)
    return np.stack(maps), raw, weights, A, dA


@pytest.mark.parametrize("layer", [None, 5, 4, 3, 2, 1, 0])
def test_matches_numpy_reference(rng, layer):
    net = tiny_net(rng)
    x = rng.standard_normal((3, 3, 8, 8))
    result = gradcam(net, x, layer=layer, details=True)
    expected, raw, weights, A, dA = numpy_gradcam(net, x, 5 if layer is None else layer)
    assert result.layer == str(5 if layer is None else layer)
    np.testing.assert_allclose(result.activations, A, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(result.gradients, dA, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(result.weights, weights, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(result.raw, raw, rtol=1e-10, atol=1e-12)
    assert result.heatmap.shape == (3, 8, 8) and result.heatmap.dtype == np.float32
    np.testing.assert_allclose(result.heatmap, expected, atol=1e-6)
    assert result.heatmap.min() >= 0 and result.heatmap.max() <= 1


def test_explicit_classes_and_names(rng):
    net = tiny_net(rng)
    net.classes = ["cat", "dog", "owl"]
    x = rng.standard_normal((2, 3, 8, 8))
    result = gradcam(net, x, class_index=[0, 2], details=True)
    expected = numpy_gradcam(net, x, 5, classes=[0, 2])[0]
    np.testing.assert_allclose(result.heatmap, expected, atol=1e-6)
    assert result.class_names == ["cat", "owl"]
    p = np.exp(result.logits - result.logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(result.probability, p[[0, 1], [0, 2]])
    by_name = gradcam(net, x[1], class_index="owl")
    np.testing.assert_allclose(by_name, result.heatmap[1], atol=1e-6)
    with pytest.raises(ValueError, match="unknown class 'emu'"):
        gradcam(net, x, class_index="emu")
    with pytest.raises(ValueError, match="class_index"):
        gradcam(net, x, class_index=7)


def test_float32_model_close_to_reference(rng):
    net = tiny_net(rng, np.float32)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    result = gradcam(net, x, details=True)
    expected, raw, *_ = numpy_gradcam(net, x, 5)
    np.testing.assert_allclose(result.raw, raw, rtol=1e-4, atol=1e-5 * raw.max())
    np.testing.assert_allclose(result.heatmap, expected, atol=1e-4)


def test_batch_equals_single_images(rng):
    net = tiny_net(rng)
    x = rng.standard_normal((3, 3, 8, 8))
    batch = gradcam(net, x)
    for i in range(3):
        np.testing.assert_allclose(gradcam(net, x[i]), batch[i], atol=1e-7)


def test_thread_invariant(rng):
    cyconv.manual_seed(5)
    net = models.small(3, 32, widths=(8, 8, 16, 16)).eval()
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    with num_threads(1):
        one = gradcam(net, x, details=True)
    with num_threads(2):
        two = gradcam(net, x, details=True)
    assert np.array_equal(one.heatmap, two.heatmap)
    assert np.array_equal(one.gradients, two.gradients)


def test_no_side_effects(rng):
    """Gradients, weights, BN statistics, dropout streams and the mode are left as they were."""
    cyconv.manual_seed(6)
    net = models.small(3, 32, widths=(8, 8, 16, 16))        # train mode, with Dropout
    for p in net.parameters():
        p.grad[...] = rng.standard_normal(p.grad.shape)
    before = {k: v.copy() for k, v in net.state_dict().items()}
    grads = [p.grad.copy() for p in net.parameters()]
    dropout = next(layer for layer in net if isinstance(layer, nn.Dropout))
    calls = dropout.calls
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    with cyconv.no_grad():                                   # works inside no_grad too
        first = gradcam(net, x)
        assert not cyconv.is_grad_enabled()
    assert net.training and dropout.calls == calls
    for p, g in zip(net.parameters(), grads):
        assert np.array_equal(p.grad, g)
    for k, v in net.state_dict().items():
        assert np.array_equal(v, before[k]), k
    net.eval()
    logits = net(x).copy()                                   # the model still runs as before
    np.testing.assert_array_equal(gradcam(net, x), first)
    np.testing.assert_array_equal(net(x), logits)


def test_default_layer():
    cyconv.manual_seed(0)
    small = models.small(3, 32)
    x32, x64, x8 = (np.zeros((1, 3, s, s), np.float32) for s in (32, 64, 8))
    assert default_layer(small, x32) == "14" and type(small[14]).__name__ == "ReLU"
    ref_net = models.reference(3, 64)
    assert default_layer(ref_net, x64) == "8"                 # ReLU after the last conv
    fused = nn.Sequential(nn.Conv2d(3, 4, 3, fuse_relu=True), nn.Flatten(), nn.Linear(4 * 36, 2))
    assert default_layer(fused, x8) == "0"
    bare = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 2))
    assert default_layer(bare, x8) == "0"
    assert default_layer(models.resnet18(3), x64) == "layer4.1.relu_out"   # the block's output
    assert default_layer(models.mobilenet_v2(3), x64) == "features.18.2"   # its ReLU6


def test_errors(rng):
    net = tiny_net(rng)
    x = rng.standard_normal((1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"layer 6 \(Flatten\) outputs shape \(1, 80\), not "
                                         r"\(N, C, H, W\) feature maps.*0, 1, 2, 3, 4, 5"):
        gradcam(net, x, layer=6)
    with pytest.raises(ValueError, match=r"7 \(Linear\) outputs shape \(1, 3\), not"):
        gradcam(net, x, layer=-1)
    with pytest.raises(ValueError, match="has no sub-module 'layer9'"):
        gradcam(net, x, layer="layer9")
    with pytest.raises(IndexError, match="out of range.*8 top-level layers"):
        gradcam(net, x, layer=8)
    with pytest.raises(ValueError, match="not a layer of this model"):
        gradcam(net, x, layer=nn.ReLU())
    with pytest.raises(ValueError, match="no Conv2d"):
        gradcam(nn.Sequential(nn.Flatten(), nn.Linear(192, 2)), x)
    assert np.array_equal(gradcam(net, x, layer=net[3]), gradcam(net, x, layer=3))


def test_localises_a_bright_square():
    """A network whose class-1 score counts bright pixels: the map sits on the bright square."""
    conv = nn.Conv2d(3, 2, 1, dtype=F64)
    conv.weight.data[...] = [[[[1.0]], [[1.0]], [[1.0]]], [[[-1.0]], [[-1.0]], [[-1.0]]]]
    conv.bias.data[...] = [-1.5, 1.5]
    lin = nn.Linear(2, 2, dtype=F64)
    lin.weight.data[...] = np.eye(2)
    lin.bias.data[...] = 0
    net = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin)
    image = np.zeros((40, 60, 3), np.uint8)
    image[5:15, 40:55] = 255
    heat = gradcam(net, image, class_index=0)
    assert heat.shape == (40, 60)
    assert heat[5:15, 40:55].min() > 0.99 and heat[20:, :30].max() == 0


def test_photo_input_uses_model_metadata(rng):
    net = tiny_net(rng)
    net.image_size = (8, 8)
    net.mean, net.std = np.float32([0.4, 0.5, 0.6]), np.float32([0.2, 0.25, 0.3])
    photo = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    result = gradcam(net, photo, details=True)
    assert result.heatmap.shape == (20, 30)
    x = cyconv.data.normalize(cyconv.data.resize(photo, 8)[None], net.mean, net.std)
    raw = gradcam(net, x.astype(F64), details=True).raw
    np.testing.assert_allclose(result.raw, raw, rtol=1e-6, atol=1e-9)
    two = gradcam(net, [photo, photo[:10]])
    assert isinstance(two, list) and two[0].shape == (20, 30) and two[1].shape == (10, 30)


def test_center_crop_map_covers_the_middle_the_model_saw(rng):
    """A model that sees the middle 0.6 of a photo: its map is that of the cropped photo,
    drawn over the crop's box of the photo, and 0 around it."""
    net = tiny_net(rng)
    net.image_size = (8, 8)
    photo = rng.integers(0, 256, (21, 30, 3), dtype=np.uint8)
    whole = gradcam(net, cyconv.data.crop_center(photo, 0.6), details=True)
    net.center_crop = 0.6
    result = gradcam(net, photo, details=True)
    np.testing.assert_array_equal(result.logits, whole.logits)
    top, left, h, w = 4, 6, 13, 18
    assert result.heatmap.shape == (21, 30) and whole.heatmap.shape == (h, w)
    np.testing.assert_array_equal(result.heatmap[top:top + h, left:left + w], whole.heatmap)
    outside = np.ones((21, 30), bool)
    outside[top:top + h, left:left + w] = False
    assert not result.heatmap[outside].any() and result.heatmap.max() == 1
    x = cyconv.data.normalize(cyconv.data.resize(photo, 8)[None]).astype(F64)
    assert gradcam(net, x[0]).shape == (8, 8)   # a normalised input is used whole


def test_overlay():
    image = np.full((30, 50, 3), 100, np.uint8)
    heat = np.zeros((5, 5), np.float32)
    heat[2, 2] = 1
    out = overlay(image, heat, alpha=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out[15, 25, 0] > out[15, 25, 2]          # hot centre: red in RGB
    assert out[0, 0, 2] > out[0, 0, 0]              # cold corner: blue
    labelled = overlay(image, heat, text="dog 97%")
    assert not np.array_equal(labelled[:12, :40], out[:12, :40])
    with pytest.raises(ValueError, match="uint8"):
        overlay(image.astype(np.float32), heat)


def test_features_match_layer_outputs(rng):
    net = tiny_net(rng)
    net.train()
    x = rng.standard_normal((2, 3, 8, 8))
    acts = features(net, x, layers=[1, 5, -1])
    assert list(acts) == ["1", "5", "7"] and net.training
    net.eval()
    np.testing.assert_allclose(acts["1"], net[:2](x))
    np.testing.assert_allclose(acts["5"], net[:6](x))
    np.testing.assert_allclose(acts["7"], net(x))
    logits, only = features(net, x, layers=net[3], output=True)
    assert list(only) == ["3"]
    np.testing.assert_allclose(logits, net(x))
    kept = acts["1"].copy()
    features(net, -x, layers=[1, 5])                   # copies: not overwritten by a later run
    net(-x)
    np.testing.assert_array_equal(acts["1"], kept)
    assert len(features(net, x)) == len(net)
    with pytest.raises(IndexError, match="out of range"):
        features(net, x, layers=[9])


def test_feature_grid():
    maps = np.arange(5 * 4 * 6, dtype=np.float32).reshape(5, 4, 6)
    maps[4] = 3                                      # constant channel: drawn black, no NaN
    grid = feature_grid(maps, cell=12, pad=1)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 9 + 1, 3 * 13 + 1, 3)
    assert feature_grid(maps, columns=5, max_channels=2).shape[1] < grid.shape[1] * 10
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        feature_grid(maps[0])


def torch_gradcam(torch, net, x, layer):
    """Grad-CAM of the PyTorch twin of ``net`` (same weights), with autograd."""
    twin = models.to_torch(net).double().eval()
    twin.load_state_dict({k: torch.from_numpy(np.asarray(v, F64))
                          for k, v in net.state_dict().items()})
    kept = {}
    twin.get_submodule(str(layer)).register_forward_hook(lambda m, i, o: kept.update(A=o))
    logits = twin(torch.from_numpy(np.asarray(x, F64)))
    A = kept["A"]
    (dA,) = torch.autograd.grad(logits.gather(1, logits.argmax(1, keepdim=True)).sum(), A)
    cam = torch.relu((dA.mean(dim=(2, 3), keepdim=True) * A).sum(1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=x.shape[2:], mode="bilinear",
                                          align_corners=False)[:, 0]
    cam = cam / cam.amax(dim=(1, 2), keepdim=True)
    return cam.detach().numpy()


def test_matches_pytorch_autograd(rng):
    torch = pytest.importorskip("torch")
    cyconv.manual_seed(3)
    net = models.small(3, 40, widths=(4, 6, 8, 8), dropout=0.2).eval()
    for layer in net:
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean[...] = rng.uniform(-0.2, 0.2, layer.num_features)
            layer.running_var[...] = rng.uniform(0.5, 2, layer.num_features)
    x = rng.standard_normal((2, 3, 40, 40)).astype(np.float32)
    for layer in (None, 7, 4):
        ours = gradcam(net, x, layer=layer)
        theirs = torch_gradcam(torch, net, x, default_layer(net, x) if layer is None else layer)
        np.testing.assert_allclose(ours, theirs, atol=2e-4)


@pytest.mark.parametrize("layer", [None, "layer4.1.conv2", "layer3", "layer2.0.bn1"])
def test_resnet_named_layers_match_pytorch_autograd(rng, layer):
    """Grad-CAM at any named layer of a ResNet (inside its blocks too), through hooks."""
    torch = pytest.importorskip("torch")
    cyconv.manual_seed(4)
    net = models.resnet18(3).eval()
    for name, module in net.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean[...] = rng.uniform(-0.2, 0.2, module.num_features)
            module.running_var[...] = rng.uniform(0.5, 2, module.num_features)
    x = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    ours = gradcam(net, x, layer=layer, details=True)
    assert ours.layer == (layer or "layer4.1.relu_out")
    theirs = torch_gradcam(torch, net, x, ours.layer)
    np.testing.assert_allclose(ours.heatmap, theirs, atol=2e-4)


def test_features_at_named_layers_of_a_resnet(rng):
    cyconv.manual_seed(4)
    net = models.resnet18(3)
    x = rng.standard_normal((1, 3, 64, 64)).astype(np.float32)
    acts = features(net, x, layers=["layer1.0.conv1", "layer4", "avgpool"])
    assert [a.shape for a in acts.values()] == [(1, 64, 16, 16), (1, 512, 2, 2), (1, 512, 1, 1)]
    with cyconv.no_grad():
        stem = net.maxpool(net.relu(net.bn1.eval()(net.conv1(x))))
        # (features folds bn1 into conv1, as inference does: the same to float32 rounding)
        np.testing.assert_allclose(acts["layer1.0.conv1"], net.layer1[0].conv1(stem),
                                   rtol=1e-5, atol=1e-5)


def test_photo_from_a_file_is_read_as_rgb(tmp_path, rng):
    """A file name gives the same map as the RGB array (cv2.imread's BGR is converted)."""
    import cv2
    net = tiny_net(rng)
    net.image_size = (8, 8)
    photo = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "photo.png"), cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    np.testing.assert_array_equal(gradcam(net, tmp_path / "photo.png"), gradcam(net, photo))
