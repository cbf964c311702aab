"""MIL as text: print a program in the syntax Core ML's compiler writes to ``model.mil``, and
parse that text back into the project's proto messages.

Printing works on the spec alone: blob values print as ``BLOBFILE(path = ..., offset = ...)``
references, so no weight byte is read whatever the model's size. Parsing reads the text once
(bounded by :data:`MAX_MILTEXT_BYTES`) and builds a :class:`pb.MILProgram`; any fault is one
:class:`MilTextError` naming the file, line and column.

Two spellings of scalars exist in real files and both are read: ``string("x")``, ``uint64(64)``,
``fp16 x`` (``program(1.3)``, iOS 18 and later) and ``tensor<string, []>("x")``,
``tensor<uint64, []>(64)``, ``tensor<fp16, []> x`` (``program(1.0)``). The printer writes
``program(1.3)`` and the short spelling when a function uses the iOS 18 opset or a later one,
``program(1.0)`` and the long spelling otherwise.

Immediate values print exactly: integers in decimal, floating-point values as hexadecimal
floats (``0x1.8p+1``, ``-inf``, ``nan``; a NaN other than the dtype's usual one as
``nan(0xBITS)``), strings quoted with ``\\"``, ``\\\\``, ``\\n``, ``\\t`` and ``\\xHH`` escapes. Decimal
numbers are accepted on input. Values are stored in the TensorValue field coremltools uses for
their dtype (bytes for fp16, 8-bit and sub-byte types and uint32, packed LSB first; ints for
int16/uint16/int32; longInts for 64-bit integers; floats, doubles, bools, strings).

Parts of the program model that real files do not show get a spelling of this module's own, so
that every program coremltools makes prints and parses back equal, proto for proto:

* nested blocks (``cond``, ``while_loop``) follow the op's attributes:
  ``= cond(pred = p)[name = string("c")] {...} -> (a) {...} -> (b);``; a block's inputs are
  written before its brace: ``(int32 i) {...}``;
* a function whose block specializations are not exactly one block keyed by its opset writes
  ``<KEY>`` before each block;
* a tensor type whose ``rank`` differs from its number of dimensions adds it: ``tensor<fp32, [], -1>``;
  a variadic unknown dimension is ``*``;
* a name that is not an identifier is written as a quoted string.

Not represented (dropped on printing): docstrings of values, programs and functions, tensor
type attributes, and block attributes. Values held in another TensorValue field than the one
coremltools uses for their dtype print as what they are, but parse back into that field.
"""

from __future__ import annotations

import bisect
import math
import os
import re
import struct

from ._proto import milsurgery_spec_pb2 as pb
from .errors import MilTextError

__all__ = [
    "print_program",
    "print_function",
    "parse_program",
    "read_program",
    "program_syntax",
    "MAX_MILTEXT_BYTES",
    "type_text",
    "op_text",
]

#: Largest model.mil milsurgery reads (the text of multi-GB LLMs is a few tens of MB).
MAX_MILTEXT_BYTES = 1 << 30
#: Deepest nesting of types, values and blocks the parser accepts.
MAX_DEPTH = 64
#: Longest literal (digits of a number) the parser converts.
MAX_NUMBER_CHARS = 400

# -- dtypes -------------------------------------------------------------------------------------

_D = pb.DataType
DTYPE_NAMES = {
    _D.BOOL: "bool", _D.STRING: "string", _D.FLOAT16: "fp16", _D.FLOAT32: "fp32", _D.FLOAT64: "fp64",
    _D.BFLOAT16: "bf16", _D.INT8: "int8", _D.INT16: "int16", _D.INT32: "int32", _D.INT64: "int64",
    _D.INT4: "int4", _D.UINT8: "uint8", _D.UINT16: "uint16", _D.UINT32: "uint32", _D.UINT64: "uint64",
    _D.UINT4: "uint4", _D.UINT2: "uint2", _D.UINT1: "uint1", _D.UINT6: "uint6", _D.UINT3: "uint3",
    _D.FLOAT8E4M3FN: "fp8e4m3fn", _D.FLOAT8E5M2: "fp8e5m2",
}
DTYPE_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}

#: integer dtypes: (bits, signed)
_INTS = {
    _D.INT4: (4, True), _D.INT8: (8, True), _D.INT16: (16, True), _D.INT32: (32, True), _D.INT64: (64, True),
    _D.UINT1: (1, False), _D.UINT2: (2, False), _D.UINT3: (3, False), _D.UINT4: (4, False), _D.UINT6: (6, False),
    _D.UINT8: (8, False), _D.UINT16: (16, False), _D.UINT32: (32, False), _D.UINT64: (64, False),
}
_FLOATS = {_D.FLOAT16, _D.FLOAT32, _D.FLOAT64, _D.BFLOAT16, _D.FLOAT8E4M3FN, _D.FLOAT8E5M2}
#: integer dtypes coremltools stores in TensorValue.bytes (sub-byte ones packed LSB first)
_INTS_IN_BYTES = {_D.INT4, _D.INT8, _D.UINT1, _D.UINT2, _D.UINT3, _D.UINT4, _D.UINT6, _D.UINT8, _D.UINT32}
_FLOATS_IN_BYTES = {_D.FLOAT16: 2, _D.BFLOAT16: 2, _D.FLOAT8E4M3FN: 1, _D.FLOAT8E5M2: 1}

#: proto opset name <-> the name in angle brackets after a function's name
_OPSET_TEXT = {"CoreML5": "ios15", "CoreML6": "ios16", "CoreML7": "ios17", "CoreML8": "ios18", "CoreML9": "ios26"}
_OPSET_PROTO = {v: k for k, v in _OPSET_TEXT.items()}
_NEW_SYNTAX_OPSETS = {"CoreML8", "CoreML9"}


def _storage_field(dtype: int) -> str:
    if dtype == _D.BOOL:
        return "bools"
    if dtype == _D.STRING:
        return "strings"
    if dtype in _INTS_IN_BYTES or dtype in _FLOATS_IN_BYTES:
        return "bytes"
    if dtype in (_D.INT64, _D.UINT64):
        return "longInts"
    if dtype == _D.FLOAT32:
        return "floats"
    if dtype == _D.FLOAT64:
        return "doubles"
    return "ints"


# fp8 e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities; NaN is S.1111.111.
def _e4m3_value(bits: int) -> float:
    sign = -1.0 if bits & 0x80 else 1.0
    exp, man = (bits >> 3) & 0xF, bits & 7
    if exp == 0xF and man == 7:
        return math.nan
    if exp == 0:
        return sign * man * 2.0**-9
    return sign * (1 + man / 8) * 2.0 ** (exp - 7)


_E4M3 = [_e4m3_value(b) for b in range(256)]


def _float_bits(dtype: int, x: float) -> int:
    """The bit pattern of ``x`` in a float dtype; ``x`` must be representable exactly."""
    if dtype == _D.FLOAT64:
        return struct.unpack("<Q", struct.pack("<d", x))[0]
    if dtype == _D.FLOAT32:
        return struct.unpack("<I", struct.pack("<f", x))[0]
    if dtype == _D.FLOAT16:
        return struct.unpack("<H", struct.pack("<e", x))[0]
    if dtype == _D.BFLOAT16:
        bits = struct.unpack("<I", struct.pack("<f", x))[0]
        return bits >> 16
    if dtype == _D.FLOAT8E5M2:
        return struct.unpack("<H", struct.pack("<e", x))[0] >> 8
    for b, v in enumerate(_E4M3):  # FLOAT8E4M3FN
        if v == x and math.copysign(1, v) == math.copysign(1, x):
            return b
    raise ValueError


def _bits_float(dtype: int, bits: int) -> float:
    if dtype == _D.FLOAT64:
        return struct.unpack("<d", struct.pack("<Q", bits))[0]
    if dtype == _D.FLOAT32:
        return struct.unpack("<f", struct.pack("<I", bits))[0]
    if dtype == _D.FLOAT16:
        return struct.unpack("<e", struct.pack("<H", bits))[0]
    if dtype == _D.BFLOAT16:
        return struct.unpack("<f", struct.pack("<I", bits << 16))[0]
    if dtype == _D.FLOAT8E5M2:
        return struct.unpack("<e", struct.pack("<H", bits << 8))[0]
    return _E4M3[bits]


def _nearest_bits(dt: int, x: float) -> int:
    """The bits of the value of float dtype ``dt`` nearest to ``x`` (a decimal literal)."""
    if dt in (_D.FLOAT64, _D.FLOAT32, _D.FLOAT16):
        return _float_bits(dt, x)  # struct rounds to nearest
    if dt == _D.BFLOAT16:
        b = _float_bits(_D.FLOAT32, x)
        return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
    table = [_bits_float(dt, b) for b in range(256)]
    finite = [b for b in range(256) if math.isfinite(table[b])]
    if abs(x) > max(abs(table[b]) for b in finite) * 1.125:
        raise OverflowError
    return min(finite, key=lambda b: (abs(table[b] - x), b))


_CANONICAL_NAN = {_D.FLOAT64: 0x7FF8000000000000, _D.FLOAT32: 0x7FC00000, _D.FLOAT16: 0x7E00,
                  _D.BFLOAT16: 0x7FC0, _D.FLOAT8E5M2: 0x7E, _D.FLOAT8E4M3FN: 0x7F}
_FLOAT_BITS = {_D.FLOAT64: 64, _D.FLOAT32: 32, _D.FLOAT16: 16, _D.BFLOAT16: 16, _D.FLOAT8E5M2: 8, _D.FLOAT8E4M3FN: 8}


def _pack_bits(codes: list[int], bits: int) -> bytes:
    """Pack ``bits``-bit codes LSB first (element i at bits [i*b, i*b+b)), as in weight.bin."""
    out = bytearray((len(codes) * bits + 7) // 8 + 1)
    mask = (1 << bits) - 1
    for i, c in enumerate(codes):
        at = i * bits
        word = (c & mask) << (at & 7)
        out[at >> 3] |= word & 0xFF
        out[(at >> 3) + 1] |= word >> 8
    return bytes(out[:-1])


def _unpack_bits(data: bytes, bits: int, count: int, signed: bool) -> list[int]:
    padded = bytes(data) + b"\0"
    mask = (1 << bits) - 1
    out = []
    for i in range(count):
        at = i * bits
        c = ((padded[at >> 3] | padded[(at >> 3) + 1] << 8) >> (at & 7)) & mask
        if signed and c >= 1 << (bits - 1):
            c -= 1 << bits
        out.append(c)
    return out


def _element_count(tt: pb.TensorType) -> int | None:
    n = 1
    for d in tt.dimensions:
        if d.WhichOneof("dimension") != "constant":
            return None
        n *= d.constant.size
    return n


# -- printing -----------------------------------------------------------------------------------

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t"}


def _quote(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _name(s: str) -> str:
    return s if _IDENT.match(s) else _quote(s)


def _hexfloat(x: float) -> str:
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    text = x.hex()  # e.g. -0x1.8000000000000p+1
    mant, exp = text.split("p")
    if "." in mant:
        mant = mant.rstrip("0").rstrip(".")
    return f"{mant}p{exp}"


def _float_text(dtype: int, bits: int) -> str:
    x = _bits_float(dtype, bits)
    if math.isnan(x):
        return "nan" if bits == _CANONICAL_NAN[dtype] else f"nan(0x{bits:x})"
    return _hexfloat(x)


class _Syntax:
    def __init__(self, new: bool, values: bool = True):
        self.new = new
        self.values = values


def program_syntax(program: pb.MILProgram) -> str:
    """``"1.3"`` if a function uses the iOS 18 opset or a later one, else ``"1.0"``."""
    for f in program.functions:
        keys = {f.value.opset} | {e.key for e in f.value.block_specializations}
        if keys & _NEW_SYNTAX_OPSETS:
            return "1.3"
    return "1.0"


def _dim_text(d: pb.Dimension) -> str:
    kind = d.WhichOneof("dimension")
    if kind == "constant":
        return str(d.constant.size)
    if kind == "unknown" and d.unknown.variadic:
        return "*"
    return "?"


def _dtype_text(dt: int) -> str:
    return DTYPE_NAMES.get(dt, f"dtype{dt}")


def type_text(vt: pb.ValueType, syntax: _Syntax | bool = True) -> str:
    """A ValueType as text: ``tensor<fp16, [1, ?]>``, ``fp16`` (a scalar, new syntax), ``list<...>``..."""
    new = syntax.new if isinstance(syntax, _Syntax) else syntax
    kind = vt.WhichOneof("type")
    if kind == "tensorType":
        tt = vt.tensorType
        dims = [_dim_text(d) for d in tt.dimensions]
        if tt.rank != len(dims):
            return f"tensor<{_dtype_text(tt.dataType)}, [{', '.join(dims)}], {tt.rank}>"
        if not dims and new:
            return _dtype_text(tt.dataType)
        return f"tensor<{_dtype_text(tt.dataType)}, [{', '.join(dims)}]>"
    if kind == "listType":
        lt = vt.listType
        inner = type_text(lt.type, new)
        if lt.HasField("length"):
            return f"list<{inner}, {_dim_text(lt.length)}>"
        return f"list<{inner}>"
    if kind == "tupleType":
        return "tuple<" + ", ".join(type_text(t, new) for t in vt.tupleType.types) + ">"
    if kind == "dictionaryType":
        d = vt.dictionaryType
        return f"dict<{type_text(d.keyType, new)}, {type_text(d.valueType, new)}>"
    if kind == "stateType":
        return f"state<{type_text(vt.stateType.wrappedType, new)}>"
    return "none"


def _tensor_elements(vt: pb.ValueType, tv: pb.TensorValue) -> list[str]:
    """The elements of an immediate tensor as text."""
    dt = vt.tensorType.dataType if vt.WhichOneof("type") == "tensorType" else _D.UNUSED_TYPE
    kind = tv.WhichOneof("value")
    if kind is None:
        return []
    if kind == "bytes":
        data = tv.bytes.values
        if dt in _FLOATS_IN_BYTES:
            w = _FLOATS_IN_BYTES[dt]
            return [_float_text(dt, int.from_bytes(data[i : i + w], "little")) for i in range(0, len(data) - w + 1, w)]
        bits, signed = _INTS.get(dt, (8, False))
        if bits >= 8:
            w = bits // 8
            return [str(int.from_bytes(data[i : i + w], "little", signed=signed)) for i in range(0, len(data) - w + 1, w)]
        n = _element_count(vt.tensorType)
        if n is None or n * bits > 8 * len(data):
            n = 8 * len(data) // bits
        return [str(c) for c in _unpack_bits(data, bits, n, signed)]
    values = getattr(tv, kind).values
    if kind == "strings":
        return [_quote(s) for s in values]
    if kind == "bools":
        return ["true" if b else "false" for b in values]
    if kind == "floats":
        return [_float_text(_D.FLOAT32, _float_bits(_D.FLOAT32, x)) for x in values]
    if kind == "doubles":
        return [_float_text(_D.FLOAT64, _float_bits(_D.FLOAT64, x)) for x in values]
    if dt == _D.UINT64:
        return [str(v & (2**64 - 1)) for v in values]
    return [str(v) for v in values]


_ELIDE_OVER = 16


def _bare(value: pb.Value, s: _Syntax) -> str:
    """A value's payload without its type (inside ``TYPE(...)`` or a typed container)."""
    vt = value.type
    kind = value.WhichOneof("value")
    if kind == "blobFileValue":
        b = value.blobFileValue
        path = f'string({_quote(b.fileName)})' if s.new else f"tensor<string, []>({_quote(b.fileName)})"
        off = f"uint64({b.offset})" if s.new else f"tensor<uint64, []>({b.offset})"
        return f"BLOBFILE(path = {path}, offset = {off})"
    if kind is None:
        return ""
    imm = value.immediateValue
    ik = imm.WhichOneof("value")
    if ik == "tensor":
        items = _tensor_elements(vt, imm.tensor)
        if not s.values and len(items) > _ELIDE_OVER:
            return f"...{len(items)} values..."
        scalar = vt.WhichOneof("type") == "tensorType" and vt.tensorType.rank == 0 and not vt.tensorType.dimensions
        if scalar and len(items) == 1:
            return items[0]
        return "[" + ", ".join(items) + "]"
    if ik in ("list", "tuple"):
        if ik == "list":
            expect = [vt.listType.type] * len(imm.list.values) if vt.WhichOneof("type") == "listType" else []
            open_, close = "[", "]"
        else:
            expect = list(vt.tupleType.types) if vt.WhichOneof("type") == "tupleType" else []
            open_, close = "(", ")"
        vals = getattr(imm, ik).values
        parts = [_element(v, expect[i] if i < len(expect) else None, s) for i, v in enumerate(vals)]
        if not s.values and len(parts) > _ELIDE_OVER:
            return f"{open_}...{len(parts)} values...{close}"
        return open_ + ", ".join(parts) + close
    if ik == "dictionary":
        kt = vt.dictionaryType.keyType if vt.WhichOneof("type") == "dictionaryType" else None
        vt2 = vt.dictionaryType.valueType if vt.WhichOneof("type") == "dictionaryType" else None
        parts = [f"{{{_element(kv.key, kt, s)}, {_element(kv.value, vt2, s)}}}" for kv in imm.dictionary.values]
        return "{" + ", ".join(parts) + "}"
    return ""  # ImmediateValue with nothing set


def _element(value: pb.Value, expected: pb.ValueType | None, s: _Syntax) -> str:
    if expected is not None and value.type == expected and value.WhichOneof("value") == "immediateValue":
        return _bare(value, s)
    return value_text(value, s)


def value_text(value: pb.Value, syntax: _Syntax | bool = True) -> str:
    """A Value as text: ``TYPE(PAYLOAD)``."""
    s = syntax if isinstance(syntax, _Syntax) else _Syntax(syntax)
    return f"{type_text(value.type, s)}({_bare(value, s)})"


def _attrs_text(attrs, s: _Syntax) -> str:
    return "[" + ", ".join(f"{_name(e.key)} = {value_text(e.value, s)}" for e in attrs) + "]"


def _binding_text(arg: pb.Argument, s: _Syntax) -> str:
    parts = []
    for b in arg.arguments:
        parts.append(_name(b.name) if b.WhichOneof("binding") == "name" else value_text(b.value, s))
    return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"


def _named(nv: pb.NamedValueType, s: _Syntax) -> str:
    return f"{type_text(nv.type, s)} {_name(nv.name)}"


def op_text(op: pb.Operation, syntax: _Syntax | bool = True) -> str:
    """One op as its first line of text (nested blocks not included)."""
    s = syntax if isinstance(syntax, _Syntax) else _Syntax(syntax)
    lhs = ", ".join(_named(o, s) for o in op.outputs)
    inputs = ", ".join(f"{_name(e.key)} = {_binding_text(e.value, s)}" for e in op.inputs)
    text = f"{lhs} = " if lhs else ""
    text += f"{_name(op.type)}({inputs})"
    if op.attributes:
        text += _attrs_text(op.attributes, s)
    return text


def _block_lines(block: pb.Block, s: _Syntax, indent: int, ops: set | None) -> list[str]:
    """A block as lines: the first is ``(inputs) {`` (the caller puts the op or function before
    it), the ops at ``indent`` spaces, the last is ``} -> (outputs)`` at ``indent - 4``."""
    inputs = "(" + ", ".join(_named(i, s) for i in block.inputs) + ") " if block.inputs else ""
    lines = [f"{inputs}{{"]
    pad = " " * indent
    for op in block.operations:
        if ops is not None and op.type not in ops and not op.blocks:
            continue
        text = pad + op_text(op, s)
        for nested in op.blocks:
            inner = _block_lines(nested, s, indent + 8, ops)
            lines.append(text + " " + inner[0])
            lines.extend(inner[1:-1])
            text = inner[-1]
        lines.append(text + ";")
    outs = ", ".join(_name(o) for o in block.outputs)
    lines.append(" " * (indent - 4) + f"}} -> ({outs})")
    return lines


def print_function(name: str, fn: pb.Function, syntax: _Syntax | bool = True, ops: set | None = None) -> list[str]:
    """A function as lines of text (``ops`` limits the ops shown to those types)."""
    s = syntax if isinstance(syntax, _Syntax) else _Syntax(syntax)
    opset = _OPSET_TEXT.get(fn.opset, fn.opset)
    inputs = ", ".join(_named(i, s) for i in fn.inputs)
    text = f"    func {_name(name)}<{_name(opset)}>({inputs})"
    if fn.attributes:
        text += " " + _attrs_text(fn.attributes, s)
    specs = list(fn.block_specializations)
    plain = len(specs) == 1 and specs[0].key == fn.opset
    lines: list[str] = []
    for e in specs:
        if not plain:
            text += f" <{_name(_OPSET_TEXT.get(e.key, e.key))}>"
        inner = _block_lines(e.value, s, 12, ops)
        lines.append(text + " " + inner[0])
        lines.extend(inner[1:-1])
        text = inner[-1]
    if not specs:
        text += " <> {} -> ()"
    lines.append(text + ";")
    return lines


def print_program(
    program: pb.MILProgram | pb.Model,
    *,
    functions: list[str] | None = None,
    ops: list[str] | set[str] | None = None,
    values: bool = True,
    syntax: str | None = None,
) -> str:
    """``program`` (or a Model's ``mlProgram``) as model.mil text. Reads no weight bytes.

    ``functions`` limits the output to those functions (in program order); ``ops`` to ops of
    those types (ops holding nested blocks are kept so the nesting shows); ``values=False``
    elides immediates of more than 16 elements (the text then no longer parses back).
    ``syntax`` is ``"1.0"`` or ``"1.3"`` (default: :func:`program_syntax`).
    """
    if isinstance(program, pb.Model):
        program = program.mlProgram
    syntax = syntax or program_syntax(program)
    s = _Syntax(syntax != "1.0", values)
    lines = [f"program({program.version}.{syntax.split('.', 1)[1]})"]
    if program.attributes:
        lines.append(_attrs_text(program.attributes, s))
    lines.append("{")
    wanted = set(ops) if ops is not None else None
    for e in program.functions:
        if functions is not None and e.key not in functions:
            continue
        lines.extend(print_function(e.key, e.value, s, wanted))
        lines.append("")
    if lines[-1] == "":
        lines.pop()
    lines.append("}")
    return "\n".join(lines) + "\n"


# -- parsing ------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<ws>[ \t\r\n]+|//[^\n]*)
  | (?P<str>"(?:[^"\\\n]|\\.)*")
  | (?P<num>[-+]?(?:0[xX][0-9a-fA-F]*\.?[0-9a-fA-F]*(?:[pP][-+]?[0-9]+)?|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)|-inf\b|-nan\b)
  | (?P<id>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<arrow>->)
  | (?P<p>[()\[\]{}<>,=;?*])
    """,
    re.VERBOSE,
)

class _Parser:
    def __init__(self, text: str, path: str):
        self.text = text
        self.path = path
        self.kinds: list[str] = []
        self.vals: list[str] = []
        self.pos: list[int] = []
        self._lines: list[int] | None = None
        self._tokenize()
        self.i = 0
        self.depth = 0

    # tokens
    def _tokenize(self) -> None:
        text, n, at = self.text, len(self.text), 0
        match = _TOKEN.match
        kinds, vals, pos = self.kinds, self.vals, self.pos
        while at < n:
            m = match(text, at)
            if m is None:
                ch = text[at]
                if ch == '"':
                    self.fail("unterminated string", at)
                self.fail(f"unexpected character {ch!r}", at)
            kind = m.lastgroup
            if kind != "ws":
                kinds.append(kind)
                vals.append(m.group())
                pos.append(at)
            at = m.end()
        kinds.append("eof")
        vals.append("end of text")
        pos.append(n)

    def where(self, offset: int) -> tuple[int, int]:
        if self._lines is None:
            self._lines = [0] + [m.end() for m in re.finditer("\n", self.text)]
        line = bisect.bisect_right(self._lines, offset)
        return line, offset - self._lines[line - 1] + 1

    def fail(self, message: str, offset: int | None = None):
        if offset is None:
            offset = self.pos[min(self.i, len(self.pos) - 1)]
        line, col = self.where(offset)
        raise MilTextError(self.path, line, col, message)

    def peek(self, k: int = 0) -> str:
        j = min(self.i + k, len(self.kinds) - 1)
        return self.vals[j] if self.kinds[j] in ("p", "arrow") else self.kinds[j]

    def peek_val(self, k: int = 0) -> str:
        return self.vals[min(self.i + k, len(self.vals) - 1)]

    def take(self, what: str) -> str:
        """Consume a punctuation token ``what`` or a token of kind ``what`` (id, num, str)."""
        kind, val = self.kinds[self.i], self.vals[self.i]
        if (kind in ("p", "arrow") and val == what) or kind == what:
            self.i += 1
            return val
        shown = {"id": "a name", "num": "a number", "str": "a string"}.get(what, repr(what))
        self.fail(f"expected {shown}, found {val!r}" if kind != "eof" else f"expected {shown}, found end of text")

    def accept(self, what: str) -> bool:
        if self.peek() == what:
            self.i += 1
            return True
        return False

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            self.fail(f"nested more than {MAX_DEPTH} levels deep")

    def leave(self) -> None:
        self.depth -= 1

    def word(self, what: str) -> None:
        if self.kinds[self.i] != "id" or self.vals[self.i] != what:
            self.fail(f"expected {what!r}, found {self.vals[self.i]!r}")
        self.i += 1

    def name(self) -> str:
        kind = self.kinds[self.i]
        if kind == "id":
            self.i += 1
            return self.vals[self.i - 1]
        if kind == "str":
            return self.string()
        self.fail(f"expected a name, found {self.vals[self.i]!r}")

    def string(self) -> str:
        at = self.pos[self.i]
        raw = self.take("str")[1:-1]
        out, j = [], 0
        while j < len(raw):
            ch = raw[j]
            if ch != "\\":
                out.append(ch)
                j += 1
                continue
            nxt = raw[j + 1]
            if nxt in '"\\':
                out.append(nxt)
                j += 2
            elif nxt in "nt":
                out.append("\n" if nxt == "n" else "\t")
                j += 2
            elif nxt == "x" and re.fullmatch(r"[0-9a-fA-F]{2}", raw[j + 2 : j + 4]):
                out.append(chr(int(raw[j + 2 : j + 4], 16)))
                j += 4
            else:
                self.fail(f"unknown escape \\{nxt} in string", at + 1 + j)
        return "".join(out)

    # program structure
    def program(self) -> pb.MILProgram:
        prog = pb.MILProgram()
        self.word("program")
        self.take("(")
        at = self.i
        version = self.take("num")
        m = re.fullmatch(r"(\d{1,6})(\.\d{1,6})?", version)
        if not m:
            self.i = at
            self.fail(f"program version {version!r} is not MAJOR.MINOR")
        prog.version = int(m.group(1))
        self.take(")")
        if self.peek() == "[":
            self.attributes(prog.attributes)
        self.take("{")
        seen = set()
        while not self.accept("}"):
            at = self.i
            name, fn = self.function()
            if name in seen:
                self.i = at
                self.fail(f"function {name!r} is defined twice")
            seen.add(name)
            prog.functions.add(key=name).value.CopyFrom(fn)
        if self.kinds[self.i] != "eof":
            self.fail(f"unexpected {self.vals[self.i]!r} after the program's closing brace")
        return prog

    def function(self) -> tuple[str, pb.Function]:
        self.word("func")
        name = self.name()
        fn = pb.Function()
        self.take("<")
        opset = self.name()
        fn.opset = _OPSET_PROTO.get(opset, opset)
        self.take(">")
        self.take("(")
        if not self.accept(")"):
            while True:
                self.named_type(fn.inputs.add())
                if self.accept(")"):
                    break
                self.take(",")
        if self.peek() == "[":
            self.attributes(fn.attributes)
        keys = set()
        while True:
            key = fn.opset
            if self.accept("<"):
                if self.accept(">"):
                    self.take("{")
                    self.take("}")
                    self.take("->")
                    self.take("(")
                    self.take(")")
                    break
                k = self.name()
                key = _OPSET_PROTO.get(k, k)
                self.take(">")
            if key in keys:
                self.fail(f"function {name!r} has two blocks for opset {key!r}")
            keys.add(key)
            self.block(fn.block_specializations.add(key=key).value)
            if self.peek() not in ("<", "{", "("):
                break
        self.take(";")
        return name, fn

    def block(self, block: pb.Block) -> None:
        self.enter()
        block.SetInParent()
        if self.accept("("):
            if not self.accept(")"):
                while True:
                    self.named_type(block.inputs.add())
                    if self.accept(")"):
                        break
                    self.take(",")
        self.take("{")
        while not self.accept("}"):
            self.operation(block.operations.add())
        self.take("->")
        self.take("(")
        if not self.accept(")"):
            while True:
                block.outputs.append(self.name())
                if self.accept(")"):
                    break
                self.take(",")
        self.leave()

    def operation(self, op: pb.Operation) -> None:
        if not (self.kinds[self.i] in ("id", "str") and self.peek(1) == "("):
            while True:
                self.named_type(op.outputs.add())
                if self.accept("="):
                    break
                self.take(",")
        op.type = self.name()
        self.take("(")
        if not self.accept(")"):
            while True:
                key = self.name()
                self.take("=")
                self.argument(op.inputs.add(key=key).value)
                if self.accept(")"):
                    break
                self.take(",")
        if self.peek() == "[":
            self.attributes(op.attributes)
        while self.peek() in ("{", "("):
            self.block(op.blocks.add())
        self.take(";")

    def argument(self, arg: pb.Argument) -> None:
        arg.SetInParent()
        if self.accept("("):
            if not self.accept(")"):
                while True:
                    self.binding(arg.arguments.add())
                    if self.accept(")"):
                        break
                    self.take(",")
        else:
            self.binding(arg.arguments.add())

    def binding(self, b: pb.Argument.Binding) -> None:
        if self.starts_type():
            self.typed_value(b.value)
        else:
            b.name = self.name()

    def attributes(self, attrs) -> None:
        self.take("[")
        if self.accept("]"):
            return
        while True:
            key = self.name()
            self.take("=")
            self.typed_value(attrs.add(key=key).value)
            if self.accept("]"):
                return
            self.take(",")

    def named_type(self, nv: pb.NamedValueType) -> None:
        self.value_type(nv.type)
        nv.name = self.name()

    # types
    def starts_type(self) -> bool:
        if self.kinds[self.i] != "id":
            return False
        word, nxt = self.vals[self.i], self.peek(1)
        if word in ("tensor", "list", "tuple", "dict", "state"):
            return nxt == "<"
        return (word in DTYPE_BY_NAME or word == "none" or re.fullmatch(r"dtype\d{1,4}", word) is not None) and nxt == "("

    def dtype(self) -> int:
        word = self.take("id")
        if word in DTYPE_BY_NAME:
            return DTYPE_BY_NAME[word]
        m = re.fullmatch(r"dtype(\d{1,4})", word)
        if m:
            return int(m.group(1))
        self.i -= 1
        self.fail(f"unknown data type {word!r}")

    def dim(self, d: pb.Dimension) -> None:
        if self.accept("?"):
            d.unknown.variadic = False
        elif self.accept("*"):
            d.unknown.variadic = True
        else:
            d.constant.size = self.uint(64, "dimension")

    def uint(self, bits: int, what: str) -> int:
        tok = self.peek_val()
        if self.kinds[self.i] != "num" or not re.fullmatch(r"[0-9]{1,%d}" % MAX_NUMBER_CHARS, tok):
            self.fail(f"expected a {what} (an unsigned integer), found {tok!r}")
        v = int(tok)
        if v >= 1 << bits:
            self.fail(f"{what} {tok} is out of range")
        self.i += 1
        return v

    def value_type(self, vt: pb.ValueType) -> None:
        self.enter()
        vt.SetInParent()
        at = self.i
        word = self.take("id")
        if word == "tensor":
            self.take("<")
            tt = vt.tensorType
            tt.dataType = self.dtype()
            self.take(",")
            self.take("[")
            if not self.accept("]"):
                while True:
                    self.dim(tt.dimensions.add())
                    if self.accept("]"):
                        break
                    self.take(",")
            tt.rank = len(tt.dimensions)
            if self.accept(","):
                tok = self.take("num")
                if not re.fullmatch(r"-?[0-9]{1,18}", tok):
                    self.i -= 1
                    self.fail(f"tensor rank {tok!r} is not an integer")
                tt.rank = int(tok)
            self.take(">")
        elif word == "list":
            self.take("<")
            self.value_type(vt.listType.type)
            if self.accept(","):
                self.dim(vt.listType.length)
            self.take(">")
        elif word == "tuple":
            vt.tupleType.SetInParent()
            self.take("<")
            if not self.accept(">"):
                while True:
                    self.value_type(vt.tupleType.types.add())
                    if self.accept(">"):
                        break
                    self.take(",")
        elif word == "dict":
            self.take("<")
            self.value_type(vt.dictionaryType.keyType)
            self.take(",")
            self.value_type(vt.dictionaryType.valueType)
            self.take(">")
        elif word == "state":
            self.take("<")
            self.value_type(vt.stateType.wrappedType)
            self.take(">")
        elif word == "none":
            pass
        else:
            self.i = at
            vt.tensorType.dataType = self.dtype()
            vt.tensorType.rank = 0
        self.leave()

    # values
    def typed_value(self, value: pb.Value) -> None:
        self.enter()
        if not self.starts_type():
            self.fail(f"expected a typed value such as int32(1), found {self.peek_val()!r}")
        self.value_type(value.type)
        self.take("(")
        if self.kinds[self.i] == "id" and self.vals[self.i] == "BLOBFILE":
            self.i += 1
            self.take("(")
            b = value.blobFileValue
            self.word("path")
            self.take("=")
            path = pb.Value()
            at = self.i
            self.typed_value(path)
            tv = path.immediateValue.tensor
            if tv.WhichOneof("value") != "strings" or len(tv.strings.values) != 1:
                self.i = at
                self.fail("BLOBFILE path must be a string")
            b.fileName = tv.strings.values[0]
            self.take(",")
            self.word("offset")
            self.take("=")
            at = self.i
            off = pb.Value()
            self.typed_value(off)
            tv = off.immediateValue.tensor
            if off.type.tensorType.dataType != _D.UINT64 or len(tv.longInts.values) != 1:
                self.i = at
                self.fail("BLOBFILE offset must be a uint64")
            b.offset = tv.longInts.values[0] & (2**64 - 1)
            self.take(")")
        elif self.peek() != ")":
            self.payload(value)
        self.take(")")
        self.leave()

    def payload(self, value: pb.Value) -> None:
        vt = value.type
        kind = vt.WhichOneof("type")
        imm = value.immediateValue
        if kind == "tensorType":
            dt = vt.tensorType.dataType
            items: list = []
            if self.peek() == "[":
                self.flat_list(items, dt)
            else:
                items.append(self.scalar(dt))
            self.store(imm.tensor, dt, items, vt.tensorType)
        elif kind == "listType":
            imm.list.SetInParent()
            self.take("[")
            if not self.accept("]"):
                while True:
                    self.element(imm.list.values.add(), vt.listType.type)
                    if self.accept("]"):
                        break
                    self.take(",")
        elif kind == "tupleType":
            imm.tuple.SetInParent()
            self.take("(")
            types = list(vt.tupleType.types)
            if not self.accept(")"):
                while True:
                    n = len(imm.tuple.values)
                    self.element(imm.tuple.values.add(), types[n] if n < len(types) else None)
                    if self.accept(")"):
                        break
                    self.take(",")
        elif kind == "dictionaryType":
            imm.dictionary.SetInParent()
            self.take("{")
            if not self.accept("}"):
                while True:
                    kv = imm.dictionary.values.add()
                    self.take("{")
                    self.element(kv.key, vt.dictionaryType.keyType)
                    self.take(",")
                    self.element(kv.value, vt.dictionaryType.valueType)
                    self.take("}")
                    if self.accept("}"):
                        break
                    self.take(",")
        else:
            self.fail(f"a value of type {type_text(vt)} cannot hold {self.peek_val()!r}")

    def element(self, value: pb.Value, expected: pb.ValueType | None) -> None:
        self.enter()
        if self.starts_type() or expected is None:
            self.typed_value(value)
        else:
            value.type.CopyFrom(expected)
            self.payload(value)
        self.leave()

    def flat_list(self, items: list, dt: int) -> None:
        self.enter()
        self.take("[")
        if not self.accept("]"):
            while True:
                if self.peek() == "[":
                    self.flat_list(items, dt)
                else:
                    items.append(self.scalar(dt))
                if self.accept("]"):
                    break
                self.take(",")
        self.leave()

    def scalar(self, dt: int):
        """One element of a tensor of dtype ``dt``: bool, str, int, or float bits."""
        at = self.i
        kind, tok = self.kinds[self.i], self.vals[self.i]
        if dt == _D.STRING:
            if kind != "str":
                self.fail(f"expected a string, found {tok!r}")
            return self.string()
        if dt == _D.BOOL:
            if kind == "id" and tok in ("true", "false"):
                self.i += 1
                return tok == "true"
            self.fail(f"expected true or false, found {tok!r}")
        if dt in _FLOATS:
            return self.float_bits(dt)
        if dt in _INTS:
            bits, signed = _INTS[dt]
            if kind != "num" or not re.fullmatch(r"[-+]?[0-9]{1,%d}" % MAX_NUMBER_CHARS, tok):
                self.fail(f"expected an integer for {_dtype_text(dt)}, found {tok!r}")
            v = int(tok)
            lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
            if not lo <= v <= hi:
                self.fail(f"{tok} is out of range for {_dtype_text(dt)}")
            self.i += 1
            return v
        self.i = at
        self.fail(f"values of data type {_dtype_text(dt)} cannot be written")

    def float_bits(self, dt: int) -> int:
        kind, tok = self.kinds[self.i], self.vals[self.i]
        name = _dtype_text(dt)
        if kind == "id" and tok in ("inf", "nan"):
            self.i += 1
            if tok == "nan" and self.peek() == "(":
                self.take("(")
                bits_tok = self.take("num")
                if not re.fullmatch(r"0[xX][0-9a-fA-F]{1,16}", bits_tok):
                    self.i -= 1
                    self.fail(f"expected NaN bits in hexadecimal, found {bits_tok!r}")
                bits = int(bits_tok, 16)
                if bits >> _FLOAT_BITS[dt] or not math.isnan(_bits_float(dt, bits)):
                    self.i -= 1
                    self.fail(f"{bits_tok} is not a NaN of {name}")
                self.take(")")
                return bits
            if tok == "nan":
                return _CANONICAL_NAN[dt]
            x = math.inf
        elif kind == "num" and tok in ("-inf", "-nan"):
            self.i += 1
            if tok == "-nan":
                return _CANONICAL_NAN[dt] | (1 << (_FLOAT_BITS[dt] - 1))
            x = -math.inf
        elif kind == "num" and len(tok) <= MAX_NUMBER_CHARS:
            try:
                x = float.fromhex(tok) if "x" in tok.lower() else float(tok)
            except (ValueError, OverflowError):
                self.fail(f"{tok!r} is not a number or out of range")
            if math.isinf(x):
                self.fail(f"{tok} is out of range (write inf or -inf for an infinity)")
            self.i += 1
        else:
            self.fail(f"expected a number for {name}, found {tok!r}")
        exact = "x" in tok.lower()
        try:
            bits = _float_bits(dt, x) if exact or math.isinf(x) else _nearest_bits(dt, x)
        except (OverflowError, ValueError):
            self.i -= 1
            self.fail(f"{tok} is not representable in {name}")
        if exact and _bits_float(dt, bits) != x:
            self.i -= 1
            self.fail(f"{tok} is not exactly representable in {name}")
        return bits

    def store(self, tv: pb.TensorValue, dt: int, items: list, tt: pb.TensorType) -> None:
        field = _storage_field(dt)
        if field == "bytes":
            if dt in _FLOATS_IN_BYTES:
                w = _FLOATS_IN_BYTES[dt]
                tv.bytes.values = b"".join(b.to_bytes(w, "little") for b in items)
            else:
                bits, _ = _INTS[dt]
                if bits < 8:
                    tv.bytes.values = _pack_bits(items, bits)
                else:
                    tv.bytes.values = b"".join((v & ((1 << bits) - 1)).to_bytes(bits // 8, "little") for v in items)
            return
        target = getattr(tv, field)
        target.SetInParent()
        if field == "floats":
            target.values.extend(_bits_float(_D.FLOAT32, b) for b in items)
        elif field == "doubles":
            target.values.extend(_bits_float(_D.FLOAT64, b) for b in items)
        elif field == "longInts":
            target.values.extend(v - (1 << 64) if v >= 1 << 63 else v for v in items)
        else:
            target.values.extend(items)


def parse_program(text: str, path: str = "<text>") -> pb.MILProgram:
    """Parse model.mil text into a :class:`pb.MILProgram`; raises :class:`MilTextError`."""
    try:
        return _Parser(text, path).program()
    except RecursionError:
        raise MilTextError(path, 0, 0, "nested too deeply") from None


def read_program(path: str | os.PathLike, root: str | os.PathLike | None = None) -> tuple[pb.MILProgram, int]:
    """Read and parse a model.mil file; returns the program and its size.

    The file is read as every model file is (:func:`milsurgery.package.read_input`): inside
    ``root`` (default: its own directory), a regular file opened without blocking, at most
    :data:`MAX_MILTEXT_BYTES` read."""
    from .package import read_input  # package sits above this module

    path = os.fspath(path)
    data = read_input(
        root if root is not None else os.path.dirname(os.path.abspath(path)), path, MAX_MILTEXT_BYTES,
        fault=lambda message: MilTextError(path, 0, 0, message),
    )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise MilTextError(path, line, col, "not valid UTF-8") from None
    return parse_program(text, path), len(data)
