"""Generate packages for Neural Engine weight-sharing experiments, and the plan that measures them.

For every combination of ``--functions N``, ``--shared FRACTION``, ``--dtype`` and ``--size-mib``
it writes, into ``--out``:

* ``NAME.mlpackage``: one package of N functions ``f0`` .. ``f{N-1}`` (milsurgery's synthetic
  LLM-like graph, :func:`milsurgery.synth.build_llm_like`), each holding about SIZE MiB of fp16
  or 4-bit palettized weights, of which FRACTION of the layers reference the same blobs in every
  function and the others have weights of their own. Function ``fI`` takes a sequence of
  ``--seq`` << I positions: no two functions are the same program, so no two separate packages
  are the same bytes, and a cache keyed on content (the Neural Engine's compile cache) cannot
  make separate packages look shared;
* ``NAME.separate/fI.mlpackage``: each function extracted (``milsurgery extract --single``) as an
  ordinary single-function package. These share nothing with one another: the baseline the
  merged package is compared with.

``plan.json`` lists every package (paths relative to ``--out``) with its parameters, the layers
actually shared (FRACTION is rounded to whole layers) and the weight bytes milsurgery's memory
model predicts for loading all functions, on a shared mapping and as per-function copies. The
command to run on a Mac is printed at the end; ``bench/load_memory.py`` reads ``plan.json``
directly. Run from the repository root::

    python bench/make_experiments.py --functions 2,4 --shared 0,0.5,1 --dtype fp16,palettized4 \\
        --size-mib 64,256 --out bench/out/experiments
    python bench/make_experiments.py --functions 2 --size-mib 64 --out bench/out/e --dry-run

``--dry-run`` prints the plan (without predictions) and writes nothing. Memory stays flat
whatever the sizes: weights are generated and written one tensor at a time, extraction copies
blob bytes file to file, and the memory model reads no weight bytes. Names encode the parameters
(``n2-s050-fp16-64mib-h1024``); values that give the same name (``--shared 0.501,0.504``) are a
usage error rather than one experiment silently dropped; an existing package is an error unless
``--force``.

Exit status: 0 written, 2 bad usage or a failure writing a package.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from milsurgery import MilSurgeryError  # noqa: E402
from milsurgery.memory import memory_model  # noqa: E402
from milsurgery.surgery import extract  # noqa: E402
from milsurgery.synth import build_llm_like, layers_for_bytes, shared_layer_count  # noqa: E402

PROG = "make_experiments.py"
PLAN_NAME = "plan.json"
PLAN_SCHEMA = 1
DTYPES = ("fp16", "palettized4")
MIB = 1 << 20
#: Longest input sequence a function may take (fI takes --seq << I).
MAX_SEQ = 1 << 16
#: Page size of Apple silicon, where the plan is measured.
APPLE_SILICON_PAGE = 16384


@dataclass(frozen=True)
class Experiment:
    """One package to write: N functions sharing a fraction of their layers."""

    n_functions: int
    shared_fraction: float
    dtype: str
    size_mib: float
    hidden: int
    seq: int
    seed: int = 0

    @property
    def name(self) -> str:
        return (f"n{self.n_functions}-s{round(self.shared_fraction * 100):03d}-{self.dtype}-"
                f"{self.size_mib:g}mib-h{self.hidden}")

    @property
    def functions(self) -> list[str]:
        return [f"f{i}" for i in range(self.n_functions)]

    @property
    def seq_lens(self) -> dict[str, int]:
        """Sequence length of each function's input: ``seq`` << i, so the programs differ."""
        return {f: self.seq << i for i, f in enumerate(self.functions)}

    @property
    def layers(self) -> int:
        return layers_for_bytes(round(self.size_mib * MIB), self.hidden, self.dtype)

    @property
    def shared_layers(self) -> int:
        """Layers shared by every function, as :func:`build_llm_like` rounds the fraction."""
        return shared_layer_count(self.layers, self.shared_fraction)

    @property
    def package(self) -> str:
        """Path of the merged package, relative to ``--out`` ('/'-separated, as in plan.json)."""
        return f"{self.name}.mlpackage"

    def separate(self, function: str) -> str:
        """Path of one function's separate package, relative to ``--out``."""
        return f"{self.name}.separate/{function}.mlpackage"


# ---------------------------------------------------------------------------------------------
# Command line


def _list(convert, check, what: str):
    """An argparse type: a comma-separated list of values, each converted and checked."""

    def parse(text: str) -> list:
        values = []
        for part in (p.strip() for p in text.split(",")):
            try:
                value = convert(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{part!r} is not {what}") from None
            if not check(value):
                raise argparse.ArgumentTypeError(f"{part!r} is not {what}")
            values.append(value)
        return list(dict.fromkeys(values))

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--functions", type=_list(int, lambda n: n >= 1, "a function count (1 or more)"),
                   default=[2], metavar="N[,N...]", help="functions per package (default 2)")
    p.add_argument("--shared", type=_list(float, lambda x: 0.0 <= x <= 1.0, "a fraction within [0, 1]"),
                   default=[0.0, 0.5, 1.0], metavar="F[,F...]",
                   help="fraction of each function's weights shared by all functions (default 0,0.5,1)")
    p.add_argument("--dtype", type=_list(str, lambda d: d in DTYPES, f"one of {', '.join(DTYPES)}"),
                   default=["fp16"], metavar="D[,D...]", help=f"weight storage: {', '.join(DTYPES)} (default fp16)")
    p.add_argument("--size-mib", type=_list(float, lambda s: s > 0, "a positive size"), default=[64.0],
                   metavar="S[,S...]", help="weight MiB per function, approximately (default 64)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size of every layer (default 1024)")
    p.add_argument("--seq", type=int, default=8,
                   help="sequence length of f0's input; fI takes SEQ << I (default 8)")
    p.add_argument("--seed", type=int, default=0, help="weight generator seed (default 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the packages and plan.json")
    p.add_argument("--force", action="store_true", help="replace packages that already exist")
    p.add_argument("--dry-run", action="store_true", help="print the plan as JSON; write nothing")
    args = p.parse_args(argv)
    if args.hidden < 1 or args.seq < 1:
        p.error("--hidden and --seq must be positive")
    if args.seq << (max(args.functions) - 1) > MAX_SEQ:
        p.error(f"--seq {args.seq} << {max(args.functions) - 1} (function f{max(args.functions) - 1}) exceeds "
                f"{MAX_SEQ}; use fewer functions or a shorter --seq")
    try:
        experiments(args)
    except ValueError as exc:
        p.error(str(exc))
    return args


def _clash(a: Experiment, b: Experiment) -> str:
    """The options of two experiments of one name that differ, as the user wrote them."""
    if a.shared_fraction != b.shared_fraction:
        return f"--shared {a.shared_fraction:g} and {b.shared_fraction:g}"
    return f"--size-mib {a.size_mib!r} and {b.size_mib!r}"


def experiments(args: argparse.Namespace) -> list[Experiment]:
    """Every combination of the options, in a stable order.

    Raises ``ValueError`` when two different combinations get the same name (values that round
    to the same name part), which would otherwise write one package over the other.
    """
    found: dict[str, Experiment] = {}
    for n in args.functions:
        for dtype in args.dtype:
            for size in args.size_mib:
                for shared in args.shared:
                    e = Experiment(n, shared, dtype, size, args.hidden, args.seq, args.seed)
                    other = found.setdefault(e.name, e)
                    if other != e:
                        raise ValueError(f"{_clash(other, e)} give the same package name {e.name}; "
                                         "choose values that differ in the name")
    return list(found.values())


# ---------------------------------------------------------------------------------------------
# Writing and predicting


def _abs(out: str, rel: str) -> str:
    return os.path.join(out, *rel.split("/"))


def write_experiment(e: Experiment, out: str, *, force: bool = False) -> int:
    """Write the merged package and its separate packages; the number of layers shared."""
    layout = build_llm_like(
        _abs(out, e.package), seq_lens=e.seq_lens, hidden=e.hidden, layers=e.layers,
        seed=e.seed, dtype=e.dtype, shared_fraction=e.shared_fraction, force=force,
        metadata={"milsurgery.experiment": e.name},
    )
    os.makedirs(_abs(out, f"{e.name}.separate"), exist_ok=True)
    for f in e.functions:
        extract(_abs(out, e.package), [f], _abs(out, e.separate(f)), single=True, force=force)
    return layout.shared_layers


def predict(e: Experiment, out: str) -> dict:
    """Weight bytes of loading every function in order, per the memory model (reads no weights)."""
    model = memory_model(_abs(out, e.package), e.functions, page_size=APPLE_SILICON_PAGE, duplicates=False)
    last = model["functions"][-1]
    separate = [
        memory_model(_abs(out, e.separate(f)), page_size=APPLE_SILICON_PAGE, duplicates=False)["functions"][0]
        for f in e.functions
    ]
    return {
        "page_size": APPLE_SILICON_PAGE,
        "functions": model["functions"],
        "shared_mapping_bytes": last["shared_mapping_bytes"],
        "shared_mapping_page_bytes": last["shared_mapping_page_bytes"],
        "per_function_copy_bytes": last["per_function_copy_bytes"],
        "separate_bytes": sum(f["referenced_bytes"] for f in separate),
    }


def plan_entry(e: Experiment, shared_layers: int, predicted: dict | None) -> dict:
    return {
        "name": e.name,
        "path": e.package,
        "n_functions": e.n_functions,
        "functions": e.functions,
        "shared_fraction": e.shared_fraction,
        "dtype": e.dtype,
        "size_mib": e.size_mib,
        "hidden": e.hidden,
        "seq": e.seq,
        "seq_lens": e.seq_lens,
        "layers": e.layers,
        "shared_layers": shared_layers,
        "separate": {f: e.separate(f) for f in e.functions},
        "predicted": predicted,
    }


def plan_document(args: argparse.Namespace, entries: list[dict]) -> dict:
    return {
        "schema": PLAN_SCHEMA,
        "generator": "bench/make_experiments.py",
        "settings": {"functions": args.functions, "shared": args.shared, "dtype": args.dtype,
                     "size_mib": args.size_mib, "hidden": args.hidden, "seq": args.seq, "seed": args.seed},
        "packages": entries,
    }


def write_plan(out: str, document: dict) -> str:
    path = os.path.join(out, PLAN_NAME)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def mac_command(out: str) -> str:
    """The command that measures the whole plan on a Mac, run from the repository root."""
    q = lambda name: shlex.quote(os.path.join(out, name))  # noqa: E731
    return f"python3 bench/load_memory.py {q(PLAN_NAME)} --json {q('results.json')} --markdown {q('results.md')}"


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    todo = experiments(args)
    if args.dry_run:
        entries = [plan_entry(e, e.shared_layers, None) for e in todo]
        print(json.dumps(plan_document(args, entries), indent=2))
        return 0
    entries, plan = [], os.path.join(args.out, PLAN_NAME)
    try:
        os.makedirs(args.out, exist_ok=True)
        for i, e in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {e.name}: {e.n_functions} functions x {e.layers} layers ...",
                  file=sys.stderr, flush=True)
            shared_layers = write_experiment(e, args.out, force=args.force)
            entries.append(plan_entry(e, shared_layers, predict(e, args.out)))
            write_plan(args.out, plan_document(args, entries))  # after each one: keeps what is done
    except (MilSurgeryError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    separate = sum(e.n_functions for e in todo)
    print(f"wrote {len(todo)} packages and {separate} separate packages to {args.out}; plan: {plan}")
    print("On a Mac (macOS 15+, Apple silicon, coremltools installed), from the repository root, run:")
    print(f"  {mac_command(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
