"""Conv2d's path for 3x3, stride-1 convolutions: Winograd F(4x4, 3x3) (cyconv/_winograd.pyx).

A tile covers 4x4 outputs; the kernels take the batch's tiles in ranges whose
length is fixed here from the shapes alone (never from the thread count), so
results are the same for any number of threads.
"""
import numpy as np

from cyconv import _winograd
from cyconv._threads import blas_single_threaded, get_num_threads

# Layers with fewer input or output channels than this keep im2col + GEMM: their
# products are too thin for the transforms to pay (see benchmarks/bench_conv3x3.py).
MIN_CHANNELS = 8

# Bytes of one forward task's transformed tiles (input and product, both (36,
# channels, range)): about half a core's L2 cache, so that they stay there
# between the transforms and the product.
FORWARD_BYTES = 1 << 20
# Bytes of the weight gradient's shared transformed tiles per range: large ranges
# mean few synchronisations of the threads (two per range) and long products.
GRAD_BYTES = 16 << 20
# Longest tile range: beyond it a range only costs memory.
MAX_RANGE = 4096
# Layers with at most this many weights per position (out x in channels) take
# cyconv's own weight-gradient product: a BLAS call per position and range is
# too thin to pay for them (benchmarks/bench_conv3x3.py).  Their ranges are
# shorter, so that the shared transformed tiles stay in the caches.
THIN_PRODUCT = 24 * 24
THIN_GRAD_BYTES = 4 << 20


def applies(layer):
    """True when layer (a Conv2d) runs on this path."""
    return (layer.kernel_size == (3, 3) and layer.stride == (1, 1) and layer.dilation == (1, 1)
            and layer.groups == 1
            and min(layer.in_channels, layer.out_channels) >= MIN_CHANNELS)


def round_up(value, multiple):
    return -(-value // multiple) * multiple


def tile_range(tiles, rows, itemsize, budget):
    """Tiles per range: the tiles cut into ranges of equal length, a multiple of
    TILE_BLOCK, each about (POSITIONS, rows, range) elements within budget bytes (at
    least TILE_BLOCK, at most MAX_RANGE tiles), so that the last range is not mostly
    padding."""
    fit = budget // (_winograd.POSITIONS * rows * itemsize)
    fit = max(_winograd.TILE_BLOCK, min(fit, MAX_RANGE))
    ranges = -(-tiles // fit)
    return round_up(-(-tiles // ranges), _winograd.TILE_BLOCK)


def tiles_across(size):
    """Tiles along an output side of size outputs."""
    return -(-size // _winograd.TILE)


def block_size(rows, span):
    """Elements of a (POSITIONS, rows, span) block of transformed tiles, its positions
    POSITION_PAD elements apart past their rows (see _winograd.position_stride)."""
    return _winograd.POSITIONS * (rows * span + _winograd.POSITION_PAD)


def tile_count(shape):
    """Output tiles of a batch whose output is shape (N, M, OH, OW)."""
    n, _, oh, ow = shape
    return n * tiles_across(oh) * tiles_across(ow)


def filter_scratch(layer, rows, channels):
    """A scratch array for transformed filters (or their gradients): position by position
    a (rows, channels) matrix, then POSITION_PAD elements (see _winograd.pyx)."""
    return layer._scratch((_winograd.POSITIONS, rows * channels + _winograd.POSITION_PAD),
                          layer.dtype)


def tap_scratch(layer, threads):
    """Each thread's gathered taps of a block of tiles (see _winograd.h)."""
    return layer._scratch((threads, _winograd.GATHER_SIZE), layer.dtype)


def convolve(layer, x, weight, bias, out, padding, transposed, activation, mask=None):
    """out = conv3x3(x, weight) (+ bias, then the activation of that code: see
    ACTIVATION_CODES); transposed: weight is used transposed and flipped, x read as 0
    where mask <= 0 (see winograd_forward).
    Its scratch arrays come from the pool, shared with every layer."""
    channels, outputs = x.shape[1], out.shape[1]
    packed_rows = round_up(outputs, _winograd.CHANNEL_BLOCK)
    tiles = tile_count(out.shape)
    span = tile_range(tiles, channels + packed_rows, layer.dtype.itemsize, FORWARD_BYTES)
    threads = min(get_num_threads(), -(-tiles // span))
    empty = np.empty((0, 0, 0, 0), layer.dtype)
    _winograd.winograd_forward(
        x, empty if mask is None else mask, weight, bias,
        filter_scratch(layer, packed_rows, channels),
        layer._scratch((threads, block_size(channels, span)), layer.dtype),
        layer._scratch((threads, block_size(packed_rows, span) + _winograd.ROW_SLACK),
                       layer.dtype),
        tap_scratch(layer, threads), out, padding[0], padding[1], transposed, span,
        activation, threads)


def forward(layer, x, weight, bias, out, activation):
    convolve(layer, x, weight, bias, out, layer.padding, False, activation)


def backward(layer, grad_output, x, out, grad_input):
    """Accumulate the weight (and bias) gradients; grad_input (or None) <- the input
    gradient.  out: the forward output when a ReLU was fused (its mask), else empty."""
    channels, outputs = x.shape[1], layer.out_channels
    tiles = tile_count(grad_output.shape)
    thin = outputs * channels <= THIN_PRODUCT
    span = tile_range(tiles, channels + outputs, layer.dtype.itemsize,
                      THIN_GRAD_BYTES if thin else GRAD_BYTES)
    threads = min(get_num_threads(), channels + outputs)
    grad_bias = (layer.bias.grad if layer.bias is not None
                 else np.empty(0, layer.dtype))
    lane_count = _winograd.POSITIONS * outputs * channels * (
        _winograd.GRAD_LANE_BYTES // layer.dtype.itemsize)
    lanes = layer._scratch((lane_count,), layer.dtype) if thin else np.empty(0, layer.dtype)
    with blas_single_threaded():
        _winograd.winograd_weight_grad(
            grad_output, x, out, layer.weight.grad, grad_bias,
            layer._scratch((block_size(channels, span),), layer.dtype),
            layer._scratch((block_size(outputs, span),), layer.dtype),
            filter_scratch(layer, outputs, channels), lanes,
            layer._scratch((outputs,), np.float64),
            tap_scratch(layer, threads), layer.padding[0],
            layer.padding[1], span, threads)
    if grad_input is not None:
        flipped_padding = (2 - layer.padding[0], 2 - layer.padding[1])
        convolve(layer, grad_output, layer.weight.data,
                 np.empty(0, layer.dtype), grad_input, flipped_padding, True, 0,
                 mask=out if out.shape[0] else None)
