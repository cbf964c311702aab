"""The memory model, checked against numbers worked out by hand for hand-built packages."""

from __future__ import annotations

import numpy as np
import pytest

import minipkg
from milsurgery import Package, UsageError
from milsurgery.memory import memory_model, render_memory_text


@pytest.fixture
def pkg3(tmp_path):
    """Functions a, b, c. a: blobs X (8000 B), Y (4000 B); b: X (shared record), Z (2000 B);
    c: a copy of Y's bytes stored at another offset (sharing defeated)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(4000).astype(np.float16)
    y = rng.standard_normal(2000).astype(np.float16)
    z = rng.standard_normal(1000).astype(np.float16)
    return minipkg.make(tmp_path / "p.mlpackage", {"a": [("float16", x), ("float16", y)], "b": [0, ("float16", z)], "c": [("float16", y.copy())]})


def test_shared_mapping_and_per_function_copies(pkg3):
    m = memory_model(pkg3)
    a, b, c = m["functions"]
    assert [f["referenced_bytes"] for f in (a, b, c)] == [12000, 10000, 4000]
    assert [f["added_bytes"] for f in (a, b, c)] == [12000, 2000, 4000]  # b adds only Z
    assert [f["shared_mapping_bytes"] for f in (a, b, c)] == [12000, 14000, 18000]
    assert [f["per_function_copy_bytes"] for f in (a, b, c)] == [12000, 22000, 26000]
    (group,) = m["sharing_defeated"]
    assert group["bytes"] == 4000 and group["extra_bytes"] == 4000 and group["across_functions"]
    assert [c["functions"] for c in group["copies"]] == [["a"], ["c"]]
    assert m["sharing_defeated_bytes"] == 4000


def test_page_granular_union(pkg3):
    """Pages covering the blobs: computed by hand from the records' data offsets."""
    with Package(pkg3) as pkg:
        spans = {r.ref.function: [] for r in pkg.refs}
        for r in pkg.refs:
            spans[r.ref.function].append((r.blob.data_offset, r.blob.data_offset + r.blob.size))
    page = 4096

    def pages(intervals):
        return len({p for s, e in intervals for p in range(s // page, -(-e // page))}) * page

    m = memory_model(pkg3, page_size=page)
    a, b, c = m["functions"]
    assert a["referenced_page_bytes"] == pages(spans["a"])
    assert b["shared_mapping_page_bytes"] == pages(spans["a"] + spans["b"])
    assert c["shared_mapping_page_bytes"] == pages(spans["a"] + spans["b"] + spans["c"])
    assert all(f["shared_mapping_page_bytes"] >= f["shared_mapping_bytes"] for f in m["functions"])


def test_load_order_changes_what_each_function_adds(pkg3):
    m = memory_model(pkg3, ["b", "a"], duplicates=False)
    b, a, c = m["functions"]  # c, not named, is loaded after the functions named
    assert (b["added_bytes"], a["added_bytes"]) == (10000, 4000)
    assert m["sharing_defeated"] is None and m["order"] == ["b", "a", "c"] and c["name"] == "c"
    with pytest.raises(UsageError, match="no function 'nope'"):
        memory_model(pkg3, ["nope"])


def test_render_and_cli(pkg3, capsys):
    from milsurgery.cli import main

    text = render_memory_text(memory_model(pkg3))
    assert "identical blobs stored apart: 1 groups" in text
    assert main(["inspect", pkg3, "--memory", "--order", "c,a"]) == 0
    out = capsys.readouterr().out
    assert "weight memory by load order" in out and out.index("  c ") < out.index("  a ")
