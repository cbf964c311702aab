"""Weight pairs measured on helper processes (``merge``/``shrink --adopt --workers``).

The plan and the output must not depend on how many processes measure, nor on helpers that
cannot start, die, or fail a task: the parent then measures those pairs itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from compressed_models import compress, linear_weights, linears
from milsurgery import UsageError, merge, shrink
from milsurgery import parallel
from milsurgery.cli import main

SHAPES = [(16, 1280)] * 3 + [(8, 1280), (24, 640)]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("parallel")
    shapes_a = SHAPES[:4]
    infer = linears(str(d / "infer.mlpackage"), linear_weights(5, shapes_a), seq=1)
    prefill = linears(str(d / "prefill.mlpackage"), linear_weights(5, shapes_a, nudge=0.03), seq=4, order=[2, 3, 0, 1])
    int4 = (compress(infer, str(d / "infer_int4.mlpackage"), "int4_block"),
            compress(prefill, str(d / "prefill_int4.mlpackage"), "int4_block"))
    return {"fp16": (infer, prefill), "int4_block": int4, "dir": d}


def sources(pair):
    return [f"{pair[0]}:main=infer", f"{pair[1]}:main=prefill"]


def weight_bytes(pkg: str) -> bytes:
    with open(os.path.join(pkg, "Data", "com.apple.CoreML", "weights", "weight.bin"), "rb") as f:
        return f.read()


@pytest.fixture
def always_parallel(monkeypatch):
    """Helpers started however small the weights; records every helper started and every
    answer a helper sent back. This process measures slowly (a pause before each pair), so that
    helpers, which get tasks only once they are ready, take some."""
    import milsurgery.measure

    started, answers = [], []
    start, receive = parallel._start, parallel._receive
    compare = milsurgery.measure.compare_weights

    def slow_compare(*args, **kwargs):
        time.sleep(0.5)
        return compare(*args, **kwargs)

    def record_start(fds):
        p = start(fds)
        if p is not None:
            started.append(p)
        return p

    def record_receive(stream):
        got = receive(stream)
        answers.append(got)
        return got

    monkeypatch.setattr(parallel, "MIN_PARALLEL_BYTES", 0)
    monkeypatch.setattr(parallel, "_start", record_start)
    monkeypatch.setattr(parallel, "_receive", record_receive)
    monkeypatch.setattr(milsurgery.measure, "compare_weights", slow_compare)
    return started, answers


def report_without_time(report) -> dict:
    d = report.to_dict()
    d["totals"].pop("seconds")
    return d


@pytest.mark.parametrize("kind", ["fp16", "int4_block"])
def test_same_plan_and_output_for_any_number_of_workers(pairs, kind, tmp_path, always_parallel):
    started, answers = always_parallel
    pair = pairs[kind]
    serial = merge(sources(pair), tmp_path / "one.mlpackage", adopt=True, workers=1)
    assert started == []
    assert serial.adoption["totals"]["adopted"] == 4
    for workers in (2, 3):
        out = tmp_path / f"workers{workers}.mlpackage"
        report = merge(sources(pair), out, adopt=True, workers=workers)
        # Metrics equal to the last bit, whichever process computed them.
        assert report.adoption["adopted"] == serial.adoption["adopted"]
        assert weight_bytes(str(out)) == weight_bytes(str(tmp_path / "one.mlpackage"))
    assert len(started) == 1 + 2
    assert all(p.returncode is not None for p in started)  # every helper ended and was reaped
    measured_remotely = [a for a in answers if isinstance(a, list)]
    assert measured_remotely and all(len(a) >= 1 for a in measured_remotely)
    dry = [report_without_time(merge(sources(pair), tmp_path / "dry", adopt=True, dry_run=True, workers=j)) for j in (1, 2)]
    assert dry[0] == dry[1]
    assert not os.path.exists(tmp_path / "dry")


HELPER = "import sys\nfrom milsurgery.parallel import _receive, _send\nsource, sink = sys.stdin.buffer, sys.stdout.buffer\n"


@pytest.mark.parametrize("command, takes_task", [
    (["/nonexistent/python"], False),  # cannot start
    ([sys.executable, "-c", "import sys; sys.exit(0)"], False),  # exits before it is ready
    ([sys.executable, "-c", "import sys; sys.stdout.buffer.write(b'garbage!'); sys.stdout.flush()"], False),
    # ready, then exits holding a task
    ([sys.executable, "-c", HELPER + "_send(sink, 'ready'); _receive(source)"], True),
    # ready, then answers a task with garbage
    ([sys.executable, "-c", HELPER + "_send(sink, 'ready'); _receive(source); sink.write(b'garbage!' * 4); sink.flush()"], True),
    # every task fails in the helper (it answers None): the parent measures them all itself
    ([sys.executable, "-c", "import sys, milsurgery.measure as m\n"
                            "def fail(*a, **k): raise RuntimeError('injected')\n"
                            "m.compare_weights = fail\n"
                            "from milsurgery.parallel import _worker_main\n"
                            "sys.exit(_worker_main())"], True),
])
def test_failing_helpers_change_nothing(pairs, tmp_path, always_parallel, monkeypatch, command, takes_task):
    started, answers = always_parallel
    pair = pairs["int4_block"]
    expected = report_without_time(merge(sources(pair), tmp_path / "dry", adopt=True, dry_run=True, workers=1))
    monkeypatch.setattr(parallel, "WORKER_COMMAND", command)
    sent = []
    send = parallel._send
    monkeypatch.setattr(parallel, "_send", lambda stream, message: (sent.append(message), send(stream, message)))
    got = report_without_time(merge(sources(pair), tmp_path / "dry", adopt=True, dry_run=True, workers=3))
    assert got == expected
    assert not any(isinstance(a, list) for a in answers)  # nothing measured elsewhere
    assert bool(sent) == takes_task  # the failure came with a task in hand, or before any
    assert all(p.returncode is not None for p in started)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads process states from /proc")
def test_helper_ends_when_its_parent_dies(pairs, tmp_path):
    """A helper's input closes when the process that started it is gone: it exits rather than
    linger (the parent was killed, so nothing cleaned up after it)."""
    pair = pairs["int4_block"]
    script = (
        "import os, sys\n"
        "from milsurgery import parallel\n"
        "from milsurgery.dequant import find_weights\n"
        "from milsurgery.package import Package\n"
        "pkg = Package(sys.argv[1])\n"
        "h = parallel.helpers_for(find_weights(pkg, 'main'), workers=2, min_parallel_bytes=0)\n"
        "print(h.procs[0].pid, flush=True)\n"
        "os._exit(0)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, pair[0]], capture_output=True, text=True, check=True)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":  # exited; waiting for init to reap it
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"helper {pid} still running a minute after its parent exited")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads process states from /proc")
def test_helpers_left_open_are_killed_at_exit(pairs):
    """A process that exits without closing its helpers (an interrupt unwinding past them) kills
    and reaps them on the way out: none outlives it."""
    script = (
        "import sys\n"
        "from milsurgery import parallel\n"
        "from milsurgery.dequant import find_weights\n"
        "from milsurgery.package import Package\n"
        "pkg = Package(sys.argv[1])\n"
        "h = parallel.helpers_for(find_weights(pkg, 'main'), workers=3, min_parallel_bytes=0)\n"
        "print(*(p.pid for p in h.procs), flush=True)\n"
        "sys.exit(0)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, pairs["int4_block"][0]], capture_output=True, text=True, check=True)
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"helper {pid} outlived its parent"


def test_shrink_in_place_with_helpers(pairs, tmp_path, always_parallel):
    started, _ = always_parallel
    combined = tmp_path / "combined.mlpackage"
    merge(sources(pairs["int4_block"]), combined)
    expected = report_without_time(shrink(combined, adopt=True, dry_run=True, workers=1))
    assert expected["totals"]["adopted"] == 4
    report = shrink(combined, in_place=True, adopt=True, workers=2)
    assert report.adoption["adopted"] == expected["adopted"]
    assert started and all(p.returncode is not None for p in started)


@pytest.mark.parametrize("workers", [0, -1, 1.5, True, "2"])
def test_workers_validated(pairs, tmp_path, workers):
    with pytest.raises(UsageError, match=r"workers \(--workers\) must be a whole number >= 1"):
        merge(sources(pairs["fp16"]), tmp_path / "o.mlpackage", adopt=True, workers=workers)
    assert not os.path.exists(tmp_path / "o.mlpackage")


def test_workers_need_adopt(pairs, tmp_path, capsys):
    with pytest.raises(UsageError, match="--workers applies only with --adopt"):
        merge(sources(pairs["fp16"]), tmp_path / "o.mlpackage", workers=2)
    assert main(["merge", *sources(pairs["fp16"]), "-o", str(tmp_path / "o.mlpackage"), "--workers", "0", "--adopt"]) == 2
    err = capsys.readouterr().err
    assert "--workers" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "o.mlpackage")


def test_cli_workers(pairs, tmp_path, capsys, always_parallel):
    started, _ = always_parallel
    rc = main(["merge", *sources(pairs["fp16"]), "-o", str(tmp_path / "o.mlpackage"), "--adopt", "--workers", "2", "--json", "--quiet"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adoption"]["totals"]["adopted"] == 4
    assert len(started) == 1
