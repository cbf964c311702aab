"""Fixture packages built with coremltools' MIL builder (no torch needed).

Every builder takes the output path first, is deterministic for a given seed, and returns the
path. ``llm_like`` with the same seed gives the same weights at any sequence length, so the
``infer`` (seq 1) and ``prefill`` (seq 64) packages form the realistic input of a merge.
"""

from __future__ import annotations

import numpy as np


def _ct():
    import coremltools as ct

    return ct


def _target(name: str):
    ct = _ct()
    return {"iOS16": ct.target.iOS16, "iOS17": ct.target.iOS17, "iOS18": ct.target.iOS18}[name]


def llm_weights(seed: int, vocab: int, hidden: int, layers: int, ffn: int, tied: bool = False) -> dict:
    """Weights of the LLM-like network, float32, scaled small; one generator per tensor so every
    tensor is the same whatever the sequence length."""
    def tensor(index: int, shape) -> np.ndarray:
        rng = np.random.default_rng([seed, index])
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    w = {"embedding": tensor(0, (vocab, hidden))}
    i = 1
    for layer in range(layers):
        for name, shape in (("q", (hidden, hidden)), ("k", (hidden, hidden)), ("v", (hidden, hidden)),
                            ("o", (hidden, hidden)), ("up", (ffn, hidden)), ("down", (hidden, ffn))):
            w[f"l{layer}.{name}.weight"] = tensor(i, shape)
            w[f"l{layer}.{name}.bias"] = tensor(i + 1, shape[:1])
            i += 2
    w["lm_head"] = w["embedding"].copy() if tied else tensor(i, (vocab, hidden))
    return w


def llm_like(path: str, *, seq_len: int, vocab: int = 256, hidden: int = 64, layers: int = 2, ffn: int | None = None,
             seed: int = 0, tied: bool = False, pass_pipeline=None, target: str = "iOS18",
             precision: str = "fp16", metadata: dict | None = None) -> str:
    """An LLM-like ML program: input_ids (1, seq_len) int32 -> gather from an embedding ->
    ``layers`` blocks of q/k/v/o and MLP up/down linears with residual adds -> lm_head logits.

    ``tied`` makes lm_head a separate constant with the embedding's values (a duplicate a
    converter may keep, e.g. with ``pass_pipeline=ct.PassPipeline.EMPTY``).
    ``metadata``: optional ``author``, ``license``, ``short_description``, ``version`` and
    ``user_defined`` (dict) set on the model before saving.
    """
    ct = _ct()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    ffn = ffn or 4 * hidden
    w = llm_weights(seed, vocab, hidden, layers, ffn, tied)

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, seq_len), dtype=types.int32)], opset_version=_target(target))
    def prog(input_ids):
        x = mb.gather(x=w["embedding"], indices=input_ids, axis=0, name="embed")
        for layer in range(layers):
            p = f"l{layer}."
            lin = lambda name, inp: mb.linear(x=inp, weight=w[p + name + ".weight"], bias=w[p + name + ".bias"], name=p + name)  # noqa: E731
            q, k, v = lin("q", x), lin("k", x), lin("v", x)
            attn = mb.add(x=mb.mul(x=q, y=k), y=v, name=p + "attn")
            x = mb.add(x=x, y=lin("o", attn), name=p + "residual1")
            up = mb.silu(x=lin("up", x), name=p + "act")
            x = mb.add(x=x, y=lin("down", up), name=p + "residual2")
        return mb.linear(x=x, weight=w["lm_head"], name="logits")

    model = ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=_target(target),
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        pass_pipeline=pass_pipeline,
    )
    _set_metadata(model, metadata)
    model.save(path)
    return path


def _set_metadata(model, metadata: dict | None) -> None:
    if not metadata:
        return
    for key, attr in (("author", "author"), ("license", "license"), ("short_description", "short_description"),
                      ("version", "version")):
        if key in metadata:
            setattr(model, attr, metadata[key])
    for k, v in metadata.get("user_defined", {}).items():
        model.user_defined_metadata[k] = v


def stateful(path: str, *, seed: int = 0, hidden: int = 64) -> str:
    """A KV-cache-like stateful model (iOS 18): read_state, a linear, coreml_update_state."""
    ct = _ct()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((hidden, hidden)) * 0.02).astype(np.float16)
    bias = (rng.standard_normal(hidden) * 0.02).astype(np.float16)

    @mb.program(
        input_specs=[mb.TensorSpec((1, hidden), dtype=types.fp16), mb.StateTensorSpec((1, hidden), dtype=types.fp16)],
        opset_version=ct.target.iOS18,
    )
    def prog(x, cache):
        past = mb.read_state(input=cache, name="past")
        y = mb.linear(x=mb.add(x=x, y=past), weight=weight, bias=bias, name="proj")
        mb.coreml_update_state(state=cache, value=y, name="update")
        return mb.relu(x=y, name="out")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT16)
    model.save(path)
    return path


def palettized(path: str, *, seed: int = 0, nbits: int = 4, seq_len: int = 1, **llm_kwargs) -> str:
    """``llm_like`` with every weight palettized to ``nbits`` (k-means LUT + packed indices)."""
    ct = _ct()
    from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

    tmp = path[: -len(".mlpackage")] + "-dense.mlpackage"
    llm_like(tmp, seq_len=seq_len, seed=seed, **llm_kwargs)
    dense = ct.models.MLModel(tmp, skip_model_load=True)
    config = OptimizationConfig(global_config=OpPalettizerConfig(nbits=nbits, mode="kmeans", weight_threshold=512))
    compressed = palettize_weights(dense, config)
    compressed.save(path)
    import shutil

    shutil.rmtree(tmp)
    return path


def multifunction(path: str, sources: dict[str, tuple[str, str]], default: str | None = None) -> str:
    """coremltools' save_multifunction: ``sources`` maps new name -> (package, function)."""
    ct = _ct()
    desc = ct.utils.MultiFunctionDescriptor()
    for new, (pkg, fn) in sources.items():
        desc.add_function(pkg, fn, new)
    desc.default_function_name = default or next(iter(sources))
    ct.utils.save_multifunction(desc, path)
    return path


def duplicated_weights(path: str, *, seed: int = 0) -> str:
    """A model whose weight.bin stores the same tensors several times: a tied embedding and
    lm_head, and equal biases, kept apart by the empty pass pipeline."""
    ct = _ct()
    return llm_like(path, seq_len=4, seed=seed, tied=True, pass_pipeline=ct.PassPipeline.EMPTY, precision="fp32")
