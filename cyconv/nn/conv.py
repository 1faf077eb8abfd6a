"""Conv2d: 2-D convolution (cross-correlation, as PyTorch computes it)."""
import numpy as np

from cyconv import _activation, _conv, _conv_direct, _depthwise
from cyconv._checks import (
    as_grad_output,
    as_input,
    check_shape,
    fits_int32,
    float_dtype,
    positive_int,
    positive_pair,
)
from cyconv._random import generator
from cyconv._threads import blas_single_threaded, get_num_threads, threads_for
from cyconv.nn import winograd
from cyconv.nn._init import kaiming_uniform
from cyconv.nn.activation import ACTIVATION_CODES, ReLU
from cyconv.nn.module import Module, Parameter, naming_errors


def output_size(size, kernel, stride, padding, dilation):
    """floor((size + 2*padding - dilation*(kernel - 1) - 1) / stride) + 1."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def geometry(layer, x_shape, kernel, stride, padding, dilation, groups=1):
    """The kernels' Geometry dict for an input of x_shape (channels: those of one group),
    or ValueError when the input is too small."""
    _, channels, height, width = x_shape
    channels //= groups
    out_h = output_size(height, kernel[0], stride[0], padding[0], dilation[0])
    out_w = output_size(width, kernel[1], stride[1], padding[1], dilation[1])
    span_h, span_w = (kernel[0] - 1) * dilation[0] + 1, (kernel[1] - 1) * dilation[1] + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"{type(layer).__name__}: input of size {height}x{width} (padded: "
            f"{height + 2 * padding[0]}x{width + 2 * padding[1]}) is smaller than the kernel "
            f"extent {span_h}x{span_w}")
    fits_int32(type(layer).__name__, {
        "H + 2*padding + stride + kernel extent": height + 2 * padding[0] + stride[0] + span_h,
        "W + 2*padding + stride + kernel extent": width + 2 * padding[1] + stride[1] + span_w,
        "OH*OW": out_h * out_w, "H*W": height * width,
        "C*kernel_h*kernel_w": channels * kernel[0] * kernel[1]})
    return dict(channels=channels, height=height, width=width,
                out_height=out_h, out_width=out_w,
                kernel_h=kernel[0], kernel_w=kernel[1], stride_h=stride[0], stride_w=stride[1],
                pad_h=padding[0], pad_w=padding[1], dilation_h=dilation[0], dilation_w=dilation[1])


# Bytes of im2col columns per tile: an eighth of a 1 MB L2 cache, leaving room
# for BLAS's packed panels and the output rows (CHANGELOG.rst, 0.1, has the
# measurement that chose it).
TILE_BYTES = 128 * 1024
# ... but at least this many columns (output pixels): a narrower product runs
# far below BLAS's peak, worst for the many-channel layers whose K alone fills
# TILE_BYTES with one or two output rows (benchmarks/bench_conv_layers.py).
MIN_TILE_COLUMNS = 256

# Forward passes of layers with at most DIRECT_MAX_TAPS taps K = C_in*kh*kw (e.g.
# 27 for a 3x3 kernel on RGB) run the direct kernel instead of im2col + GEMM,
# which copies more than it multiplies for them (CHANGELOG.rst, 0.1, has the
# measurement); so do layers of up to DIRECT_WIDE_MAX_TAPS taps whose output rows
# are at least DIRECT_MIN_COLUMNS wide: the kernel's register blocks (3 vectors of
# columns x 4 or 8 channels) then load each weight for many multiply-adds, and
# im2col's copies cost more than the product gains (docs/design.rst has the
# measurements).  Pointwise layers excepted: their GEMM copies nothing.
DIRECT_MAX_TAPS = 32 if _conv_direct.DIRECT_IS_VECTORIZED else 0
DIRECT_WIDE_MAX_TAPS = 288 if _conv_direct.DIRECT_IS_VECTORIZED else 0
DIRECT_MIN_COLUMNS = 24
assert DIRECT_MAX_TAPS <= DIRECT_WIDE_MAX_TAPS <= _conv_direct.MAX_DIRECT_TAPS
# The direct kernel keeps one copy of each input row per stride phase: only
# for small horizontal strides.
DIRECT_MAX_STRIDE = 4


# The weight gradient sum_n dY_n @ cols_n^T is split into work items that write
# disjoint outputs (see _conv.conv2d_backward): chunks of the batch, whose sums
# go to parts (copies of the weight, at most PARTS_BYTES in all, shared by all
# layers) added in order at the end, times blocks of the K = C*kh*kw columns,
# which cost a read of dY each.  The split depends on the shapes alone, never on
# the thread count, so the sums are the same for any thread count.
PARTS_BYTES = 8 << 20
WEIGHT_GRAD_ITEMS = 16      # blocks are added until there are this many items
MIN_BLOCK_COLUMNS = 32      # keeps each item's matrix product wide enough to run fast


def weight_grad_split(batch, groups, k, weight_bytes):
    """(blocks, chunks) for conv2d_backward: one chunk per image as far as PARTS_BYTES
    allows, then blocks of K until there are WEIGHT_GRAD_ITEMS items."""
    chunks = max(1, min(batch, PARTS_BYTES // weight_bytes))
    blocks = max(1, min(k // MIN_BLOCK_COLUMNS, -(-WEIGHT_GRAD_ITEMS // (groups * chunks))))
    return -(-k // -(-k // blocks)), chunks   # no empty block


# That product, dY (OC, T) @ cols^T (T, K) per tile, runs faster in scipy's OpenBLAS
# computed transposed, cols @ dY^T (K, OC), when there are few output channels (OC per
# group, at most TRANSPOSED_MAX_CHANNELS) and K > OC: the longer of the two then spans
# the product's rows.  With more channels both forms run alike (docs/design.rst has
# the measurements).  Tests and benchmarks switch it off to compare.
TRANSPOSED_WEIGHT_GRAD = True
TRANSPOSED_MAX_CHANNELS = 64


# A layer of few taps whose input gradient is not wanted (a network's RGB first layer)
# takes its weight gradient from _conv_direct's kernel instead of im2col + GEMM.  Tests
# and benchmarks switch it off to compare.
DIRECT_WEIGHT_GRAD = True


# Depthwise layers (groups == in_channels > 1) run the kernels of _depthwise.pyx,
# which read each input plane directly, instead of im2col + a GEMM per channel
# (a 1 x kh*kw by kh*kw x P product: all copying, no reuse).  Tests and
# benchmarks switch it off to compare.
DEPTHWISE_KERNEL = True
# Its forward deals planes out to the threads about this many input elements at
# a time; its backward takes blocks of channels whose planes (per image) span about
# DEPTHWISE_BLOCK_ELEMENTS: one small plane at a time, it would jump through memory.
DEPTHWISE_TASK_ELEMENTS = 4096
DEPTHWISE_BLOCK_ELEMENTS = 16384


def empty(ndim, dtype):
    """A 0-sized array that stands for an unused kernel argument."""
    return np.empty((0,) * ndim, dtype)


class Conv2d(Module):
    """y[n, o] = bias[o] + sum_{c,i,j} weight[o, c, i, j] * x_pad[n, g(o)*C/G + c, s*h+d*i, s*w+d*j]

    Shapes: x (N, C_in, H, W) -> y (N, C_out, OH, OW) with
    OH = floor((H + 2*padding - dilation*(kernel - 1) - 1) / stride) + 1 (likewise OW);
    weight (C_out, C_in/groups, kh, kw), bias (C_out,).  kernel_size, stride, padding
    and dilation take an int or an (h, w) pair.  groups G splits the channels: output
    channel o (in group g(o) = o // (C_out/G)) sees the C_in/G input channels of its
    group only; groups = C_in is a depthwise convolution (C_out = C_in * multiplier).

    fuse_relu=True applies max(., 0) inside the kernel (Conv2d + ReLU in one pass);
    its backward then masks the gradient by the output's sign.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, dtype=np.float32, seed=None, fuse_relu=False):
        super().__init__()
        self.in_channels = positive_int("in_channels", in_channels)
        self.out_channels = positive_int("out_channels", out_channels)
        self.kernel_size = positive_pair("kernel_size", kernel_size)
        self.stride = positive_pair("stride", stride)
        self.padding = positive_pair("padding", padding, minimum=0)
        self.dilation = positive_pair("dilation", dilation)
        self.groups = positive_int("groups", groups)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"Conv2d: groups must divide in_channels and out_channels, got "
                             f"groups={self.groups} for {self.in_channels} -> "
                             f"{self.out_channels} channels")
        self.dtype = float_dtype(dtype)
        self.fuse_relu = bool(fuse_relu)
        group_channels = self.in_channels // self.groups
        fan_in = group_channels * self.kernel_size[0] * self.kernel_size[1]
        rng = generator(seed)
        self.weight = Parameter(kaiming_uniform(
            (self.out_channels, group_channels) + self.kernel_size, fan_in, self.dtype, rng))
        self.bias = (Parameter(kaiming_uniform((self.out_channels,), fan_in, self.dtype, rng))
                     if bias else None)

    def _geometry(self, x_shape):
        return geometry(self, x_shape, self.kernel_size, self.stride, self.padding, self.dilation,
                        self.groups)

    def output_shape(self, input_shape):
        check_shape(self, input_shape, ("N", self.in_channels, "H", "W"))
        g = self._geometry(input_shape)
        return (input_shape[0], self.out_channels, g["out_height"], g["out_width"])

    def forward(self, x):
        return self._forward(x, ACTIVATION_CODES[ReLU] if self.fuse_relu else 0)

    def _can_absorb(self, next_layer):
        """A ReLU right after this conv can run inside its kernels (see Sequential), and in
        inference a BatchNorm2d folds into its weight and bias."""
        return not self.fuse_relu and (type(next_layer) is ReLU
                                       or next_layer._folds_into(self))

    def _can_absorb_second(self, first, second):
        """... and a ReLU or ReLU6 after a folded BatchNorm2d, and a MaxPool2d after a ReLU
        (see _gradient_through_pool)."""
        from cyconv.nn.pooling import MaxPool2d  # (pooling imports this module)

        if type(first) is ReLU:
            return type(second) is MaxPool2d
        return first._folds_into(self) and type(second) in ACTIVATION_CODES

    def _forward_absorbing(self, x, absorbed):
        if type(absorbed[0]) is ReLU:   # and perhaps a MaxPool2d
            pool = absorbed[1] if len(absorbed) == 2 else None
            return self._forward(x, ACTIVATION_CODES[ReLU], pool=pool)
        activation = ACTIVATION_CODES.get(type(absorbed[-1]), 0)
        bias = self.bias.data if self.bias is not None else np.zeros(self.out_channels)
        weight, bias = absorbed[0]._folded(self.weight.data, bias,
                                           self._scratch(self.weight.data.shape, self.dtype))
        return self._forward(x, activation, weight, bias)

    def _uses_depthwise_kernel(self):
        return DEPTHWISE_KERNEL and self.groups == self.in_channels > 1

    def _subsamples(self):
        """A 1x1 kernel of stride > 1 without padding (ResNet's downsample shortcuts) runs
        as a pointwise convolution of the pixels it reads, gathered first: im2col would
        copy them tile by tile, and the direct kernel row by row."""
        return (self.kernel_size == (1, 1) and self.stride != (1, 1)
                and self.padding == (0, 0) and self.groups == 1)

    def _uses_direct_kernel(self, g):
        taps = self.weight.data[0].size
        return (self.groups == 1 and not _conv.pointwise(g) and self.stride[1] <= DIRECT_MAX_STRIDE
                and (taps <= DIRECT_MAX_TAPS or (taps <= DIRECT_WIDE_MAX_TAPS
                                                 and g["out_width"] >= DIRECT_MIN_COLUMNS)))

    def _forward(self, x, activation, weight=None, bias=None, pool=None):
        """The forward, then the activation of that code (ACTIVATION_CODES; 0: none), with
        weight and bias in place of the parameters' when given (a folded BatchNorm2d's),
        then pool (a MaxPool2d after a ReLU, or None)."""
        x = as_input(self, x, ("N", self.in_channels, "H", "W"), self.dtype)
        g = self._geometry(x.shape)
        out = self._output_array((x.shape[0], self.out_channels, g["out_height"], g["out_width"]),
                                 self.dtype)
        input_shape = x.shape
        if self._subsamples():   # from here on, a pointwise layer of the pixels it reads
            x, g = self._subsample(x, g)
        if weight is None:
            weight = self.weight.data
            bias = self.bias.data if self.bias is not None else empty(1, self.dtype)
        flat_weight = weight.reshape(self.out_channels, -1)
        if winograd.applies(self):  # 3x3, stride 1: its own kernels (nn/winograd.py)
            winograd.forward(self, x, weight, bias, out, activation)
        elif self._uses_depthwise_kernel():
            self._depthwise_forward(x, flat_weight, bias, out, g, activation)
        elif self._uses_direct_kernel(g):
            self._direct_forward(x, flat_weight, bias, out, g, activation)
        else:
            self._im2col_forward(x, flat_weight, bias, out, g, activation)
        if pool is not None:
            with naming_errors(pool):
                pooled, argmax, pool_geometry = pool._pool(out)
            self._save_for_backward(x, g, False, empty(4, self.dtype), input_shape,
                                    (pool, pooled, argmax, pool_geometry, out.shape))
            return pooled
        # backward rebuilds what it needs from x; the output is kept only as a ReLU mask
        fuse_relu = activation == ACTIVATION_CODES[ReLU]   # (a ReLU6 only in inference)
        self._save_for_backward(x, g, fuse_relu, out if fuse_relu else empty(4, self.dtype),
                                input_shape, None)
        return out

    def _gradient_through_pool(self, grad_pooled, pool, pooled, argmax, pool_geometry,
                               out_shape):
        """The gradient of this layer's output, from that of a max-pool absorbed with a
        ReLU: 0 where the pooled output is <= 0, then spread to the windows' maxima.  A
        window's maximum is the ReLU's output there, so the ReLU passes the gradient
        that reaches it exactly where the pooled output is > 0: the full-size output
        need not be kept as the mask."""
        grad_pooled = as_grad_output(self, grad_pooled, pooled.shape, self.dtype)
        masked = self._scratch(pooled.shape, self.dtype)
        _activation.relu_backward(pooled.reshape(-1), grad_pooled.reshape(-1),
                                  masked.reshape(-1), threads_for(pooled.size))
        return pool._spread(masked, argmax, pool_geometry, out_shape, self.dtype)

    def _subsample(self, x, g):
        """(the pixels this 1x1 strided layer reads, (N, C, OH, OW); the geometry of a
        pointwise layer on them)."""
        pixels = self._output_array((x.shape[0], self.in_channels, g["out_height"],
                                     g["out_width"]), self.dtype)
        _conv.subsample_forward(x, pixels, *self.stride, threads_for(pixels.size))
        return pixels, geometry(self, pixels.shape, (1, 1), (1, 1), (0, 0), (1, 1))

    def _direct_forward(self, x, weight, bias, out, g, activation):
        band = _conv_direct.forward_band(g)
        threads = min(get_num_threads(), x.shape[0] * -(-g["out_height"] // band))
        prepared_rows = self._workspace("direct_rows",
                                        (threads, _conv_direct.band_elements(g, band)),
                                        self.dtype)
        _conv_direct.conv2d_forward_direct(x, weight, bias, prepared_rows, out, g, activation,
                                           threads)

    def _im2col_forward(self, x, weight, bias, out, g, activation):
        threads = min(get_num_threads(), x.shape[0])
        rows, cols = self._tile_workspace("cols", g, threads, self.weight.data[0].size)
        with blas_single_threaded():
            _conv.conv2d_forward(x, weight, bias, cols, out, g, self.groups, rows, activation,
                                 threads)

    def _depthwise_forward(self, x, weight, bias, out, g, activation):
        # small planes go to the threads several at a time: one at a time, the
        # scheduling would cost more than they do
        planes_per_task = max(1, DEPTHWISE_TASK_ELEMENTS // (x.shape[2] * x.shape[3]))
        threads = max(1, min(get_num_threads(),
                             -(-x.shape[0] * self.in_channels // planes_per_task)))
        _depthwise.depthwise_forward(x, weight, bias, *self._depthwise_layout(g),
                                     self._plane_workspace("planes", g, threads),
                                     self._runs_workspace("runs", g, threads), out, g,
                                     planes_per_task, activation, threads)

    def backward(self, grad_output, input_grad=True):
        x, g, fuse_relu, out, input_shape, pooling = self._saved_for_backward()
        if pooling is not None:
            grad_output = self._gradient_through_pool(grad_output, *pooling)
        grad_output = as_grad_output(self, grad_output, (x.shape[0], self.out_channels,
                                                         g["out_height"], g["out_width"]),
                                     self.dtype)
        grad_input = self._grad_input_array(x.shape, self.dtype) if input_grad else None
        if winograd.applies(self):
            winograd.backward(self, grad_output, x, out, grad_input)
            return grad_input
        grad_bias = self.bias.grad if self.bias is not None else empty(1, self.dtype)
        if not input_grad and self._uses_direct_weight_grad(g):   # a first layer
            self._direct_weight_grad(grad_output, x, out, grad_bias, g, fuse_relu)
            return grad_input
        backward = (self._depthwise_backward if self._uses_depthwise_kernel()
                    else self._im2col_backward)
        backward(grad_output, x, out, grad_bias,
                 grad_input if input_grad else empty(4, self.dtype), g, fuse_relu, input_grad)
        if input_grad and self._subsamples():   # the gradient of the pixels read, spread out
            grad_pixels, grad_input = grad_input, self._grad_input_array(input_shape, self.dtype)
            _conv.subsample_backward(grad_pixels, grad_input, *self.stride,
                                     threads_for(grad_input.size))
        return grad_input

    def _uses_direct_weight_grad(self, g):
        """Few taps (an RGB input layer): the weight gradient without im2col, when the
        input gradient is not wanted (_conv_direct.conv2d_weight_grad_direct)."""
        return (DIRECT_WEIGHT_GRAD and self._uses_direct_kernel(g)
                and self.weight.data[0].size <= DIRECT_MAX_TAPS)

    def _direct_weight_grad(self, grad_output, x, out, grad_bias, g, fuse_relu):
        chunks = min(x.shape[0], WEIGHT_GRAD_ITEMS)
        threads = max(1, min(get_num_threads(), chunks))
        oc, k = self.out_channels, self.weight.data[0].size
        lanes = _conv_direct.weight_grad_lanes(self.dtype.itemsize)
        band = _conv_direct.WEIGHT_GRAD_BAND
        _conv_direct.conv2d_weight_grad_direct(
            grad_output, x, out, self.weight.grad.reshape(oc, k), grad_bias,
            self._workspace("weight_grad_rows", (threads, _conv_direct.band_elements(g, band)),
                            self.dtype),
            self._workspace("weight_grad_dy", (threads, oc * band * -(-g["out_width"] // lanes)
                                               * lanes), self.dtype),
            self._workspace("weight_grad_lanes", (threads, oc * k * lanes), self.dtype),
            self._workspace("weight_grad_sums", (chunks, oc * (k + 1)), np.float64),
            g, fuse_relu, threads)

    def _im2col_backward(self, grad_output, x, out, grad_bias, grad_input, g, fuse_relu,
                         input_grad):
        n, oc, k = x.shape[0], self.out_channels, self.weight.data[0].size
        blocks, chunks = weight_grad_split(n, self.groups, k, self.weight.data.nbytes)
        transposed = self._transposes_weight_grad()
        threads = min(get_num_threads(), self.groups * chunks * blocks)
        weight_rows, cols = self._tile_workspace("weight_grad_cols", g, threads, -(-k // blocks))
        input_rows, grad_cols = (self._tile_workspace("grad_cols", g, threads, k) if input_grad
                                 else (1, empty(2, self.dtype)))
        masked = (self._workspace("masked_grad", (threads, oc // self.groups * g["out_height"]
                                                  * g["out_width"]), self.dtype)
                  if fuse_relu else empty(2, self.dtype))
        bias_parts = self._workspace("grad_bias_parts", (chunks if grad_bias.size else 0, oc),
                                     np.float64)
        with blas_single_threaded():
            _conv.conv2d_backward(grad_output, x, out, self._flat_weight(),
                                  self.weight.grad.reshape(oc, k), grad_bias,
                                  self._weight_grad_parts(chunks, transposed), bias_parts, cols,
                                  grad_cols, masked, grad_input, g, self.groups, weight_rows,
                                  input_rows, blocks, chunks, transposed, fuse_relu, input_grad,
                                  threads)

    def _depthwise_backward(self, grad_output, x, out, grad_bias, grad_input, g, fuse_relu,
                            input_grad):
        # blocks of channels whose planes lie side by side in memory, enough blocks to
        # share out evenly (each channel's sums are the same whatever the blocks)
        plane = x.shape[2] * x.shape[3]
        channels = min(max(1, DEPTHWISE_BLOCK_ELEMENTS // plane),
                       -(-self.in_channels // (4 * get_num_threads())))
        blocks = -(-self.in_channels // channels)
        threads = min(get_num_threads(), blocks)
        multiplier, taps = self.out_channels // self.in_channels, self.weight.data[0].size
        grad_planes = (self._plane_workspace("grad_planes", g, threads) if input_grad
                       else empty(2, self.dtype))
        lanes = self._workspace("grad_lanes", (threads, channels * multiplier * taps
                                               * _depthwise.LANES), self.dtype)
        sums = self._workspace("grad_sums", (threads, channels * multiplier * (taps + 1)),
                               np.float64)
        _depthwise.depthwise_backward(grad_output, x, out, self._flat_weight(),
                                      self.weight.grad.reshape(self.out_channels, taps),
                                      grad_bias, *self._depthwise_layout(g),
                                      self._plane_workspace("backward_planes", g, threads),
                                      grad_planes, self._runs_workspace("grad_runs", g, threads),
                                      lanes, sums, grad_input, g, channels, fuse_relu,
                                      input_grad, threads)

    def _transposes_weight_grad(self):
        """Whether the im2col weight-gradient product runs transposed (see
        TRANSPOSED_WEIGHT_GRAD)."""
        return (TRANSPOSED_WEIGHT_GRAD and self.weight.data[0].size
                > self.out_channels // self.groups <= TRANSPOSED_MAX_CHANNELS)

    def _weight_grad_parts(self, chunks, transposed):
        """The (chunks, out_channels, K) parts of the weight gradient (unused for one chunk),
        at most PARTS_BYTES (see weight_grad_split); transposed, (chunks, K, out_channels),
        also for one chunk."""
        if transposed:
            return self._scratch((chunks,) + self._flat_weight().shape[::-1], self.dtype)
        if chunks == 1:
            return empty(3, self.dtype)
        return self._scratch((chunks,) + self._flat_weight().shape, self.dtype)

    def _depthwise_layout(self, g):
        """Workspaces for the tap offsets and the copy plan (see _depthwise_layout.pxd)."""
        multiplier = self.out_channels // self.in_channels
        return (self._workspace("tap_offset", (self.weight.data[0].size * (1 + multiplier),),
                                np.intp),
                self._workspace("plane_copies", (_depthwise.copies_size(g), 4), np.intp))

    def _plane_workspace(self, name, g, threads):
        """(threads, plane_size): one prepared-layout plane per thread."""
        return self._workspace(name, (threads, _depthwise.plane_size(g)), self.dtype)

    def _runs_workspace(self, name, g, threads):
        """(threads, runs_size): the runs of a plane's out_channels / in_channels outputs."""
        return self._workspace(name, (threads, _depthwise.runs_size(
            g, self.out_channels // self.in_channels)), self.dtype)

    def _flat_weight(self):
        """The weight as the (out_channels, in_channels/groups*kh*kw) matrix the kernels use."""
        return self.weight.data.reshape(self.out_channels, -1)

    def _tile_workspace(self, name, g, threads, k_rows):
        """(output rows per tile, a (threads, k_rows * rows * OW) workspace) for im2col
        tiles of k_rows rows.

        A tile holds whole output rows, as many as keep its columns within
        TILE_BYTES, so that they stay in the core's cache between im2col and
        the matrix product, but at least MIN_TILE_COLUMNS columns.  A pointwise
        layer (1x1, stride 1, no padding) reads the image in place: one tile per
        image, and the workspace is a placeholder.
        """
        if _conv.pointwise(g):   # the image is its own columns: one tile, no workspace
            return g["out_height"], self._workspace(name, (threads, 1), self.dtype)
        row_bytes = k_rows * g["out_width"] * self.dtype.itemsize
        rows = min(g["out_height"], max(1, TILE_BYTES // row_bytes,
                                        -(-MIN_TILE_COLUMNS // g["out_width"])))
        return rows, self._workspace(name, (threads, k_rows * rows * g["out_width"]), self.dtype)

    def extra_repr(self):
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}")
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        if self.fuse_relu:
            text += ", fuse_relu=True"
        return text
