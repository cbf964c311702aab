"""A function's weights, found from its spec alone (no numpy, no weight bytes).

A *weight* is the tensor produced by a ``const`` op whose value is a blob, or by a constexpr op
whose inputs are consts or other constexpr ops (a chain). :func:`find_weights` lists them with
the ops producing each and their blob references; :mod:`milsurgery.dequant` evaluates them.
Kept apart from it so that commands can pair weights by structure and bytes (adoption's screen
for byte-identical weights) without importing numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ._proto import milsurgery_spec_pb2 as pb
from .errors import SpecError
from .package import Package, ResolvedRef

__all__ = ["Weight", "WeightGraph", "find_weights", "CONSTEXPR_PREFIX"]

CONSTEXPR_PREFIX = "constexpr_"


@dataclass
class Weight:
    """One weight of a function: the op that outputs it and every const/constexpr op feeding it.

    ``ops`` lists the producing ops terminal first, then depth-first through their inputs in
    input-name order (the same order for two weights of the same structure); ``refs`` holds the
    blob references of those ops in the same order, each resolved to its blob.
    """

    package: Package
    function: str
    name: str  # the weight's variable name (first output of the terminal op)
    ops: list[pb.Operation]
    refs: list[ResolvedRef] = field(default_factory=list)
    shape: tuple[int, ...] = ()
    dtype: int = 0  # proto DataType of the materialized tensor
    graph: object = field(default=None, repr=False, compare=False)  # the function's op index, shared

    @property
    def op_type(self) -> str:
        return self.ops[0].type

    @property
    def kind(self) -> str:
        """The producing op types, terminal first (``const`` for a dense weight)."""
        return "+".join(dict.fromkeys(op.type for op in self.ops if op.type != "const")) or "const"

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def blob_bytes(self) -> int:
        """Bytes of the distinct blobs the weight's ops reference."""
        return sum({(id(r.file), r.blob.record_offset): r.blob.size for r in self.refs}.values())

    def describe(self) -> str:
        return f"function {self.function!r} op {self.name!r} ({self.op_type})"


def op_error(w_pkg: Package, function: str, op: pb.Operation, message: str) -> SpecError:
    name = op.outputs[0].name if op.outputs else "?"
    return SpecError(w_pkg.spec_path, f"function {function!r} op {name!r} ({op.type}): {message}")


def shape_of(vtype: pb.ValueType) -> tuple[int, ...] | None:
    if vtype.WhichOneof("type") != "tensorType":
        return None
    dims = []
    for d in vtype.tensorType.dimensions:
        if d.WhichOneof("dimension") != "constant":
            return None
        dims.append(d.constant.size)
    return tuple(dims)



class WeightGraph:
    """A function's top-level ops by output name, and each op's resolved blob references."""

    def __init__(self, pkg: Package, function: str):
        self.pkg, self.function = pkg, function
        fn = pkg.function(function)
        block = None
        for e in fn.block_specializations:
            if e.key == fn.opset or block is None:
                block = e.value
        self.block = block
        self.producers: dict[str, tuple[pb.Operation, int]] = {}
        for op in block.operations if block is not None else ():
            for i, out in enumerate(op.outputs):
                self.producers[out.name] = (op, i)
        self.refs: dict[str, list[ResolvedRef]] = {}
        for r in pkg.function_refs(function):
            if ".blocks[" not in r.ref.location and r.ref.op_name:
                self.refs.setdefault(r.ref.op_name, []).append(r)

    def fail(self, op: pb.Operation):
        return lambda message: op_error(self.pkg, self.function, op, message)

    def param(self, op: pb.Operation, name: str):
        """An op's parameter: ("op", producer, output index), ("value", Value, location) or None."""
        for e in op.inputs:
            if e.key == name:
                args = e.value.arguments
                if len(args) != 1:
                    raise self.fail(op)(f"input {name!r} binds {len(args)} arguments, expected 1")
                b = args[0]
                if b.WhichOneof("binding") == "name":
                    found = self.producers.get(b.name)
                    if found is None:
                        raise self.fail(op)(f"input {name!r} is {b.name!r}, which no const op produces")
                    return ("op",) + found
                return ("value", b.value, f"inputs[{name}][0]")
        for e in op.attributes:
            if e.key == name:
                return ("value", e.value, f"attributes[{name}]")
        return None


def _is_weight_op(graph: WeightGraph, op: pb.Operation) -> bool:
    if op.type.startswith(CONSTEXPR_PREFIX):
        return True
    return op.type == "const" and bool(op.outputs) and bool(graph.refs.get(op.outputs[0].name))


def _closure(graph: WeightGraph, op: pb.Operation) -> list[pb.Operation]:
    """``op`` and every const/constexpr op feeding it, depth-first in input-name order."""
    out: list[pb.Operation] = []
    seen: set[int] = set()

    def visit(o: pb.Operation) -> None:
        if id(o) in seen:
            return
        seen.add(id(o))
        out.append(o)
        for e in sorted(o.inputs, key=lambda e: e.key):
            for b in e.value.arguments:
                if b.WhichOneof("binding") == "name" and b.name in graph.producers:
                    p = graph.producers[b.name][0]
                    if p.type == "const" or p.type.startswith(CONSTEXPR_PREFIX):
                        visit(p)

    visit(op)
    return out


def find_weights(pkg: Package, function: str, graph_type: type[WeightGraph] | None = None) -> list[Weight]:
    """Every weight of ``function`` that holds blob data, in graph order.

    A weight is a blob-valued ``const`` or a constexpr op whose output is used by something other
    than another constexpr op (its intermediate results belong to it). Reads the spec only; no
    weight bytes. Ops in nested blocks (loop and cond bodies) are not considered. ``graph_type``
    (a subclass of :class:`WeightGraph`) is what each weight's ``graph`` is made as.
    """
    graph = (graph_type or WeightGraph)(pkg, function)
    if graph.block is None:
        return []
    consumed: set[str] = set()  # outputs feeding a constexpr op
    for op in graph.block.operations:
        if op.type.startswith(CONSTEXPR_PREFIX):
            for e in op.inputs:
                for b in e.value.arguments:
                    if b.WhichOneof("binding") == "name":
                        consumed.add(b.name)
    weights = []
    for op in graph.block.operations:
        if not _is_weight_op(graph, op) or not op.outputs or op.outputs[0].name in consumed:
            continue
        if op.type.startswith(CONSTEXPR_PREFIX) and op.type in ("constexpr_lut_to_sparse", "constexpr_sparse_blockwise_shift_scale"):
            continue
        ops = _closure(graph, op)
        refs = [r for o in ops for r in graph.refs.get(o.outputs[0].name if o.outputs else "", [])]
        if not refs:
            continue
        shape = shape_of(op.outputs[0].type)
        if shape is None:
            continue
        w = Weight(pkg, function, op.outputs[0].name, ops, refs, shape, op.outputs[0].type.tensorType.dataType, graph)
        weights.append(w)
    return weights
