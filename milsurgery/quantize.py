"""Blockwise symmetric linear quantization, computed as coremltools' ``linear_quantize_weights`` does.

A weight is cut into blocks (``block_sizes[axis]`` elements along each axis, 0 = the whole axis);
each block gets one scale ``max|w| / q_max`` in the weight's dtype and every element the integer
``clip(round(w / scale), -q_max, q_max)`` (int8: q_max 127, int4: 7). What Core ML materializes
is ``data * scale`` (``constexpr_blockwise_shift_scale``, iOS 18, no offset). The arithmetic runs
in the weight's own dtype, like coremltools', so data and scales match it byte for byte.
Everything here works on arrays already in memory: a weight, or a window of whole blocks of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import UsageError
from .palettize import ErrorSums

if TYPE_CHECKING:
    import numpy as np

__all__ = ["QUANT_DTYPES", "quantize"]

#: Supported integer types: bits of each (signed, symmetric range -(2**(b-1) - 1) .. 2**(b-1) - 1).
QUANT_DTYPES = {"int8": 8, "int4": 4}


def quantize(
    weight: np.ndarray, dtype: str, block_sizes: list[int], errors: ErrorSums | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(data, scale)``: int8 data of ``weight``'s shape (int4 values stay in -7..7) and the
    scales, one per block, with ``weight``'s rank (each axis: its number of blocks).

    Every axis's size must be a multiple of its block size. A block of zeros gets scale 1 (not
    the 0 coremltools would divide by). ``errors``, if given, accumulates the difference between
    ``weight`` and ``data * scale`` (computed in the weight's dtype, as Core ML does).
    """
    import numpy as np

    bits = QUANT_DTYPES.get(dtype)
    if bits is None:
        raise UsageError(f"quantization to {dtype!r} is not supported (choose one of {sorted(QUANT_DTYPES)})")
    if len(block_sizes) != weight.ndim:
        raise UsageError(f"{len(block_sizes)} block sizes for a weight of rank {weight.ndim}")
    split_shape: list[int] = []
    scale_shape: list[int] = []
    keep: list[int] = []  # axes of split_shape that index blocks (not reduced)
    for axis, (size, block) in enumerate(zip(weight.shape, block_sizes)):
        if block > 0:
            if size % block:
                raise UsageError(f"axis {axis} of size {size} cannot be split into blocks of {block}")
            keep.append(len(split_shape))
            split_shape += [size // block, block]
            scale_shape.append(size // block)
        else:
            split_shape.append(size)
            scale_shape.append(1)
    reduce = tuple(i for i in range(len(split_shape)) if i not in keep)
    q_max = (1 << (bits - 1)) - 1
    blocks = weight.reshape(split_shape)
    lo = np.amin(blocks, axis=reduce, keepdims=True)
    hi = np.amax(blocks, axis=reduce, keepdims=True)
    max_abs = np.maximum(np.abs(lo), np.abs(hi))
    scale = (max_abs - (-max_abs)) / (2 * q_max)
    scale[scale == 0] = 1
    if weight.dtype == np.float16:
        # numpy's float16 division, multiplication and rounding work in float32 and round each
        # result to float16; doing that here directly is the same arithmetic, several times faster
        s32 = scale.astype(np.float32)
        data = np.rint((blocks.astype(np.float32) / s32).astype(np.float16).astype(np.float32))
        np.clip(data, -q_max, q_max, out=data)
        if errors is not None:
            errors.add(blocks, (data * s32).astype(np.float16))
    else:
        data = np.clip(np.round(blocks / scale), -q_max, q_max)
        if errors is not None:
            errors.add(blocks, (data * scale).astype(weight.dtype))
    data = data.reshape(weight.shape).astype(np.int8)
    scale = scale.astype(weight.dtype).reshape(scale_shape)
    return np.ascontiguousarray(data), np.ascontiguousarray(scale)
