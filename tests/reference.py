"""Plain-numpy float64 reference implementations of every cyconv layer.

Everything here is written to be short and obviously right rather than fast:
forward passes use explicit loops over kernel offsets (or windows) plus
einsum, backward passes are written out by hand (scattering into a padded
gradient buffer) -- no autodiff.  All computations are done in float64.

Conventions follow PyTorch:
  conv2d        cross-correlation, weight (O, C, kh, kw), zero padding
  max_pool2d    -inf padding, floor mode, gradient to the FIRST maximum of a
                window in row-major order
  avg_pool2d    zero padding, count_include_pad=True by default
  batch_norm2d  biased variance to normalise, unbiased variance for running_var
  cross_entropy mean over the batch, label_smoothing like CrossEntropyLoss
  sgd/adam/adamw  torch.optim update rules
"""
import numpy as np


def pair(v):
    """int or (a, b) -> (a, b)."""
    if np.isscalar(v):
        return int(v), int(v)
    a, b = v
    return int(a), int(b)


def f64(a):
    return np.asarray(a, dtype=np.float64)


def conv_out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def pool_out_size(size, k, s, p):
    return (size + 2 * p - k) // s + 1


# ----------------------------------------------------------------------------
# Convolution
# ----------------------------------------------------------------------------
def _conv_window(xp, i, j, Ho, Wo, stride, dilation):
    """View of the padded input seen by kernel offset (i, j): (N, C, Ho, Wo)."""
    sh, sw = stride
    dh, dw = dilation
    return xp[:, :, i * dh: i * dh + sh * (Ho - 1) + 1: sh,
              j * dw: j * dw + sw * (Wo - 1) + 1: sw]


def conv2d_forward(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """groups G: the convolution of input channels [g*C/G, (g+1)*C/G) with output channels
    [g*O/G, (g+1)*O/G) for each g, side by side (w is (O, C/G, kh, kw))."""
    if groups > 1:
        b = np.zeros(len(w)) if b is None else b
        return np.concatenate([conv2d_forward(xg, wg, bg, stride, padding, dilation)
                               for xg, wg, bg in zip(np.split(f64(x), groups, axis=1),
                                                     np.split(f64(w), groups),
                                                     np.split(f64(b), groups))], axis=1)
    x, w = f64(x), f64(w)
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    N, C, H, W = x.shape
    O, C2, kh, kw = w.shape
    assert C == C2
    Ho = conv_out_size(H, kh, stride[0], padding[0], dilation[0])
    Wo = conv_out_size(W, kw, stride[1], padding[1], dilation[1])
    assert Ho >= 1 and Wo >= 1
    ph, pw = padding
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out = np.zeros((N, O, Ho, Wo))
    for i in range(kh):
        for j in range(kw):
            patch = _conv_window(xp, i, j, Ho, Wo, stride, dilation)
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    if b is not None:
        out += f64(b)[None, :, None, None]
    return out


def conv2d_backward(x, w, dy, stride=1, padding=0, dilation=1, bias=True, groups=1):
    """Returns (dx, dw, db); db is None when bias is False.  groups as in conv2d_forward."""
    if groups > 1:
        parts = [conv2d_backward(xg, wg, dyg, stride, padding, dilation)
                 for xg, wg, dyg in zip(np.split(f64(x), groups, axis=1),
                                        np.split(f64(w), groups), np.split(f64(dy), groups, axis=1))]
        return (np.concatenate([p[0] for p in parts], axis=1),
                np.concatenate([p[1] for p in parts]),
                f64(dy).sum(axis=(0, 2, 3)) if bias else None)
    x, w, dy = f64(x), f64(w), f64(dy)
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    N, C, H, W = x.shape
    O, _, kh, kw = w.shape
    _, _, Ho, Wo = dy.shape
    ph, pw = padding
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    for i in range(kh):
        for j in range(kw):
            patch = _conv_window(xp, i, j, Ho, Wo, stride, dilation)
            dw[:, :, i, j] = np.einsum("nohw,nchw->oc", dy, patch)
            # scatter: every output position (ho, wo) received x at this
            # offset with weight w[:, :, i, j]
            _conv_window(dxp, i, j, Ho, Wo, stride, dilation)[...] += \
                np.einsum("nohw,oc->nchw", dy, w[:, :, i, j])
    dx = dxp[:, :, ph: ph + H, pw: pw + W].copy()
    db = dy.sum(axis=(0, 2, 3)) if bias else None
    return dx, dw, db


# ----------------------------------------------------------------------------
# Pooling
# ----------------------------------------------------------------------------
def max_pool2d_forward(x, kernel_size, stride=None, padding=0):
    """Returns (out, argmax) with argmax[n, c, ho, wo] = (row, col) in x."""
    x = f64(x)
    kh, kw = pair(kernel_size)
    sh, sw = pair(kernel_size if stride is None else stride)
    ph, pw = pair(padding)
    N, C, H, W = x.shape
    Ho, Wo = pool_out_size(H, kh, sh, ph), pool_out_size(W, kw, sw, pw)
    out = np.empty((N, C, Ho, Wo))
    arg = np.empty((N, C, Ho, Wo, 2), dtype=np.int64)
    for n in range(N):
        for c in range(C):
            for ho in range(Ho):
                for wo in range(Wo):
                    # the window without its padding: padding never wins, even over -inf
                    r0, q0 = max(ho * sh - ph, 0), max(wo * sw - pw, 0)
                    win = x[n, c, r0:min(ho * sh - ph + kh, H), q0:min(wo * sw - pw + kw, W)]
                    k = int(np.argmax(win))  # first maximum (or NaN), row-major
                    r, q = divmod(k, win.shape[1])
                    out[n, c, ho, wo] = win[r, q]
                    arg[n, c, ho, wo] = (r0 + r, q0 + q)
    return out, arg


def max_pool2d_backward(x, dy, kernel_size, stride=None, padding=0):
    x, dy = f64(x), f64(dy)
    _, arg = max_pool2d_forward(x, kernel_size, stride, padding)
    dx = np.zeros_like(x)
    N, C, Ho, Wo = dy.shape
    for n in range(N):
        for c in range(C):
            for ho in range(Ho):
                for wo in range(Wo):
                    r, q = arg[n, c, ho, wo]
                    dx[n, c, r, q] += dy[n, c, ho, wo]
    return dx


def _avg_divisors(H, W, kh, kw, sh, sw, ph, pw, Ho, Wo, count_include_pad):
    div = np.empty((Ho, Wo))
    for ho in range(Ho):
        for wo in range(Wo):
            if count_include_pad:
                div[ho, wo] = kh * kw
            else:
                r0, q0 = ho * sh - ph, wo * sw - pw
                rows = min(r0 + kh, H) - max(r0, 0)
                cols = min(q0 + kw, W) - max(q0, 0)
                div[ho, wo] = rows * cols
    return div


def avg_pool2d_forward(x, kernel_size, stride=None, padding=0, count_include_pad=True):
    x = f64(x)
    kh, kw = pair(kernel_size)
    sh, sw = pair(kernel_size if stride is None else stride)
    ph, pw = pair(padding)
    N, C, H, W = x.shape
    Ho, Wo = pool_out_size(H, kh, sh, ph), pool_out_size(W, kw, sw, pw)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    div = _avg_divisors(H, W, kh, kw, sh, sw, ph, pw, Ho, Wo, count_include_pad)
    out = np.empty((N, C, Ho, Wo))
    for ho in range(Ho):
        for wo in range(Wo):
            win = xp[:, :, ho * sh: ho * sh + kh, wo * sw: wo * sw + kw]
            out[:, :, ho, wo] = win.sum(axis=(2, 3)) / div[ho, wo]
    return out


def avg_pool2d_backward(x, dy, kernel_size, stride=None, padding=0, count_include_pad=True):
    x, dy = f64(x), f64(dy)
    kh, kw = pair(kernel_size)
    sh, sw = pair(kernel_size if stride is None else stride)
    ph, pw = pair(padding)
    N, C, H, W = x.shape
    _, _, Ho, Wo = dy.shape
    div = _avg_divisors(H, W, kh, kw, sh, sw, ph, pw, Ho, Wo, count_include_pad)
    dxp = np.zeros((N, C, H + 2 * ph, W + 2 * pw))
    for ho in range(Ho):
        for wo in range(Wo):
            dxp[:, :, ho * sh: ho * sh + kh, wo * sw: wo * sw + kw] += \
                (dy[:, :, ho, wo] / div[ho, wo])[:, :, None, None]
    return dxp[:, :, ph: ph + H, pw: pw + W].copy()


def global_avg_pool_forward(x):
    return f64(x).mean(axis=(2, 3), keepdims=True)


def global_avg_pool_backward(x, dy):
    x, dy = f64(x), f64(dy)
    H, W = x.shape[2:]
    return np.broadcast_to(dy / (H * W), x.shape).copy()


# ----------------------------------------------------------------------------
# Activations, flatten, linear
# ----------------------------------------------------------------------------
def relu_forward(x):
    x = f64(x)
    return np.where(x > 0, x, 0.0)


def relu_backward(x, dy):
    return np.where(f64(x) > 0, f64(dy), 0.0)


def leaky_relu_forward(x, negative_slope=0.01):
    x = f64(x)
    return np.where(x > 0, x, negative_slope * x)


def leaky_relu_backward(x, dy, negative_slope=0.01):
    return np.where(f64(x) > 0, f64(dy), negative_slope * f64(dy))


def linear_forward(x, w, b=None):
    y = f64(x) @ f64(w).T
    if b is not None:
        y = y + f64(b)
    return y


def linear_backward(x, w, dy, bias=True):
    x, w, dy = f64(x), f64(w), f64(dy)
    dx = dy @ w
    dw = dy.T @ x
    db = dy.sum(axis=0) if bias else None
    return dx, dw, db


# ----------------------------------------------------------------------------
# Batch norm
# ----------------------------------------------------------------------------
def batch_norm2d_train_forward(x, weight, bias, running_mean, running_var,
                               eps=1e-5, momentum=0.1):
    """Returns (y, new_running_mean, new_running_var)."""
    x = f64(x)
    N, C, H, W = x.shape
    M = N * H * W
    mean = x.mean(axis=(0, 2, 3))
    var = ((x - mean[None, :, None, None]) ** 2).mean(axis=(0, 2, 3))  # biased
    xhat = (x - mean[None, :, None, None]) / np.sqrt(var + eps)[None, :, None, None]
    y = xhat * f64(weight)[None, :, None, None] + f64(bias)[None, :, None, None]
    unbiased = var * M / (M - 1)
    rm = (1 - momentum) * f64(running_mean) + momentum * mean
    rv = (1 - momentum) * f64(running_var) + momentum * unbiased
    return y, rm, rv


def batch_norm2d_train_backward(x, weight, dy, eps=1e-5):
    """Returns (dx, dweight, dbias) for the train-mode (batch statistics) forward."""
    x, dy = f64(x), f64(dy)
    N, C, H, W = x.shape
    M = N * H * W
    ax = (0, 2, 3)
    mean = x.mean(axis=ax)
    var = ((x - mean[None, :, None, None]) ** 2).mean(axis=ax)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean[None, :, None, None]) * invstd[None, :, None, None]
    dbias = dy.sum(axis=ax)
    dweight = (dy * xhat).sum(axis=ax)
    dxhat = dy * f64(weight)[None, :, None, None]
    dx = (invstd / M)[None, :, None, None] * (
        M * dxhat
        - dxhat.sum(axis=ax)[None, :, None, None]
        - xhat * (dxhat * xhat).sum(axis=ax)[None, :, None, None])
    return dx, dweight, dbias


def batch_norm2d_eval_forward(x, weight, bias, running_mean, running_var, eps=1e-5):
    s = lambda a: f64(a)[None, :, None, None]
    return (f64(x) - s(running_mean)) / np.sqrt(s(running_var) + eps) * s(weight) + s(bias)


def batch_norm2d_eval_backward(x, weight, running_mean, running_var, dy, eps=1e-5):
    s = lambda a: f64(a)[None, :, None, None]
    x, dy = f64(x), f64(dy)
    xhat = (x - s(running_mean)) / np.sqrt(s(running_var) + eps)
    dx = dy * s(weight) / np.sqrt(s(running_var) + eps)
    return dx, (dy * xhat).sum(axis=(0, 2, 3)), dy.sum(axis=(0, 2, 3))


# ----------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------
def log_softmax(z):
    z = f64(z)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _ce_target(target, C, label_smoothing):
    """The smoothed target of class labels (N,) or class probabilities (N, C)."""
    target = np.asarray(target)
    if target.ndim == 2:
        q = target.astype(np.float64)
    else:
        q = np.zeros((target.shape[0], C))
        q[np.arange(target.shape[0]), target] = 1.0
    return (1.0 - label_smoothing) * q + label_smoothing / C


def cross_entropy_forward(logits, labels, label_smoothing=0.0):
    """Mean over the batch of -sum_c q_c log softmax(z)_c (PyTorch semantics)."""
    lp = log_softmax(logits)
    q = _ce_target(labels, lp.shape[1], label_smoothing)
    return float(-(q * lp).sum() / lp.shape[0])


def cross_entropy_backward(logits, labels, label_smoothing=0.0):
    lp = log_softmax(logits)
    q = _ce_target(labels, lp.shape[1], label_smoothing)
    return (np.exp(lp) - q) / lp.shape[0]


# ----------------------------------------------------------------------------
# Optimizers (one step; state is a dict that is updated in place)
# ----------------------------------------------------------------------------
def sgd_step(p, g, state, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
             nesterov=False):
    p, d = f64(p).copy(), f64(g).copy()
    if weight_decay != 0:
        d = d + weight_decay * p
    if momentum != 0:
        if "buf" not in state:
            buf = d.copy()
        else:
            buf = momentum * state["buf"] + (1 - dampening) * d
        state["buf"] = buf
        d = d + momentum * buf if nesterov else buf
    return p - lr * d


def adam_step(p, g, state, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
              weight_decay=0.0, decoupled=False):
    """Adam (decoupled=False, L2 added to the gradient) or AdamW (decoupled)."""
    p, g = f64(p).copy(), f64(g).copy()
    b1, b2 = betas
    t = state.get("step", 0) + 1
    state["step"] = t
    if decoupled:
        p = p * (1 - lr * weight_decay)
    elif weight_decay != 0:
        g = g + weight_decay * p
    m = b1 * state.get("m", np.zeros_like(p)) + (1 - b1) * g
    v = b2 * state.get("v", np.zeros_like(p)) + (1 - b2) * g * g
    state["m"], state["v"] = m, v
    bc1 = 1 - b1 ** t
    bc2 = 1 - b2 ** t
    denom = np.sqrt(v) / np.sqrt(bc2) + eps
    return p - (lr / bc1) * m / denom


def adamw_step(p, g, state, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
    return adam_step(p, g, state, lr, betas, eps, weight_decay, decoupled=True)
