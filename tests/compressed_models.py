"""Compressed fixture packages: tiny MIL programs compressed with coremltools.optimize.coreml.

``linears`` builds a chain of linear layers from seeded weights; ``compress`` applies one of the
compression kinds deployers use (``KINDS``) to a saved package. Group sizes are chosen so that
k-means runs on kmeans1d's exact path (>= 10,000 values per group) or uses ``mode="uniform"``.
"""

from __future__ import annotations

import numpy as np

#: kind -> (minimum target, description). iOS 16 kinds produce the attribute form of the ops.
KINDS = {
    "lut4_grouped": "iOS18",  # k-means LUT4, per_grouped_channel, group size 8
    "lut6_grouped": "iOS18",  # k-means LUT6, per_grouped_channel, group size 16
    "lut2_vector": "iOS18",  # k-means LUT2 of vectors of 2 (vector_axis)
    "lut4_scaled": "iOS18",  # k-means LUT4 with a per-channel scale (lut -> shift_scale chain)
    "lut4_int8lut": "iOS18",  # k-means LUT4 whose LUT is itself quantized to int8 (chain)
    "int8_block": "iOS18",  # linear int8, per_block 32
    "int4_block": "iOS18",  # linear int4 (symmetric), per_block 32
    "uint4_channel": "iOS18",  # linear uint4 asymmetric, per_channel (offset input)
    "sparse": "iOS18",  # magnitude pruning, 50 %
    "sparse_lut4": "iOS18",  # pruned, then palettized jointly (constexpr_lut_to_sparse)
    "sparse_int8": "iOS18",  # pruned, then quantized jointly (constexpr_sparse_blockwise_shift_scale)
    "lut4_ios16": "iOS16",  # k-means LUT4 per tensor, attribute form, packed indices
    "int8_ios16": "iOS16",  # constexpr_affine_dequantize, per channel
    "sparse_ios16": "iOS16",  # constexpr_sparse_to_dense with packed mask
}


def linear_weights(seed: int, shapes, nudge: float = 0.0) -> list[np.ndarray]:
    """Float16 weights for ``linears``; ``nudge`` moves that fraction of elements by one fp16 ulp
    (the drift of separate conversions), chosen by a generator of its own."""
    out = []
    for i, shape in enumerate(shapes):
        w = (np.random.default_rng([seed, i]).standard_normal(shape) * 0.05).astype(np.float16)
        if nudge:
            rng = np.random.default_rng([seed, i, 99])
            hit = rng.random(w.shape) < nudge
            w = np.where(hit, np.nextafter(w, np.float16(np.inf)), w).astype(np.float16)
        out.append(w)
    return out


def linears(path: str, weights, *, target: str = "iOS18", extra_op: bool = False, seq: int = 1,
            order: list[int] | None = None) -> str:
    """x (seq, in) -> one relu(linear(x, W)) output per weight, in ``order`` (default: as given).

    ``extra_op`` adds a leading op, which shifts auto-generated names; ``order`` reorders the ops,
    so the same weight gets another name. Weights are (out, in) float16 arrays of one ``in``."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    tgt = {"iOS16": ct.target.iOS16, "iOS18": ct.target.iOS18}[target]
    order = list(range(len(weights))) if order is None else order

    @mb.program(input_specs=[mb.TensorSpec(shape=(seq, weights[0].shape[1]), dtype=types.fp32)], opset_version=tgt)
    def prog(x):
        if extra_op:
            x = mb.mul(x=x, y=np.float32(0.5))
        return tuple(mb.relu(x=mb.linear(x=x, weight=weights[i].astype(np.float32))) for i in order)

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=tgt,
                       compute_precision=ct.precision.FLOAT16)
    model.save(path)
    return path


def compress(src: str, dest: str, kind: str) -> str:
    """Compress package ``src`` as ``kind`` (see ``KINDS``) with coremltools and save ``dest``."""
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    model = ct.models.MLModel(src, skip_model_load=True)
    def pal(m=None, joint=False, **kw):
        config = cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(weight_threshold=1, **kw))
        return cto.palettize_weights(m or model, config, joint_compression=joint)

    def lin(m, joint=False, **kw):
        config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(weight_threshold=1, **kw))
        return cto.linear_quantize_weights(m, config, joint_compression=joint)

    prune = lambda m: cto.prune_weights(m, cto.OptimizationConfig(global_config=cto.OpMagnitudePrunerConfig(target_sparsity=0.5, weight_threshold=1)))  # noqa: E731
    if kind == "lut4_grouped":
        out = pal(mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=8)
    elif kind == "lut6_grouped":
        out = pal(mode="kmeans", nbits=6, granularity="per_grouped_channel", group_size=16)
    elif kind == "lut2_vector":
        out = pal(mode="kmeans", nbits=2, cluster_dim=2)
    elif kind == "lut4_scaled":
        out = pal(mode="kmeans", nbits=4, enable_per_channel_scale=True)
    elif kind == "lut4_int8lut":
        out = lin(pal(mode="kmeans", nbits=4), joint=True, mode="linear_symmetric", dtype="int8", granularity="per_tensor")
    elif kind == "int8_block":
        out = lin(model, mode="linear_symmetric", dtype="int8", granularity="per_block", block_size=32)
    elif kind == "int4_block":
        out = lin(model, mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=32)
    elif kind == "uint4_channel":
        out = lin(model, mode="linear", dtype="uint4", granularity="per_channel")
    elif kind in ("sparse", "sparse_ios16"):
        out = prune(model)
    elif kind == "sparse_lut4":
        out = pal(prune(model), joint=True, mode="kmeans", nbits=4, granularity="per_tensor")
    elif kind == "sparse_int8":
        out = lin(prune(model), mode="linear_symmetric", dtype="int8", granularity="per_channel", joint=True)
    elif kind == "lut4_ios16":
        out = pal(mode="kmeans", nbits=4)
    elif kind == "int8_ios16":
        out = lin(model, mode="linear_symmetric", dtype="int8")
    else:
        raise ValueError(kind)
    out.save(dest)
    return dest


def ct_value(var):
    """A variable's value as coremltools evaluates it (op value inference, recursively for chains
    whose intermediate op coremltools does not materialize by itself)."""
    if var.val is not None:
        return var.val
    op = var.op
    index = list(op.outputs).index(var)
    try:
        value = op.materialized_val_inference()
    except AttributeError:
        assert op.op_type == "constexpr_lut_to_dense", op.op_type
        axis = None if op.vector_axis is None else op.vector_axis.val
        value = type(op).decompress(ct_value(op.indices), ct_value(op.lut), axis)
    return value[index] if isinstance(value, tuple) else value


def ct_function_weights(pkg_path: str, function: str) -> dict:
    """Name -> (float64 values, op type chain) of every blob-held weight a linear op consumes, as
    coremltools' milproto loader and its op value inference see them."""
    from checks import ct_load_program

    ops = ct_load_program(pkg_path).functions[function].operations
    out = {}
    for op in ops:
        if op.op_type != "linear":
            continue
        for v in (op.weight, op.bias):
            if v.op.op_type == "const" and v.val.size < 10:
                continue  # stored inline, not a blob
            chain, stack = [], [v.op]
            while stack:
                o = stack.pop()
                chain.append(o.op_type)
                stack.extend(i.op for i in o.inputs.values() if hasattr(i, "op") and i.op is not None
                             and i.op.op_type.startswith(("const", "constexpr_")))
            out[v.name] = (np.asarray(ct_value(v), dtype=np.float64), tuple(sorted(chain)))
    return out
