"""Shared fixtures. Packages are built once per session into a temporary directory."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # tests import their helpers (checks, ct_models, malformed) by name

#: The real converter output shipped beside the project (read-only); see README "Tests".
CREPE_CANDIDATES = [
    os.environ.get("MILSURGERY_CREPE", ""),
    os.path.join(HERE, "..", "..", "shared", "models", "crepe-tiny.mlpackage"),
]


#: The one skip message of every test that needs crepe-tiny.mlpackage.
CREPE_MISSING = "crepe-tiny.mlpackage not found in ../shared/models/ beside the checkout (set MILSURGERY_CREPE to its path)"


def find_crepe() -> str | None:
    """The path of crepe-tiny.mlpackage, or None when it is absent."""
    for path in CREPE_CANDIDATES:
        if path and os.path.isdir(path):
            return os.path.abspath(path)
    return None


@pytest.fixture(scope="session")
def crepe() -> str:
    path = find_crepe()
    if path is None:
        pytest.skip(CREPE_MISSING)
    return path


@pytest.fixture
def crepe_copy(crepe, tmp_path) -> str:
    dst = tmp_path / "crepe.mlpackage"
    shutil.copytree(crepe, dst)
    for root, dirs, files in os.walk(dst):
        for name in dirs + files:
            os.chmod(os.path.join(root, name), 0o755 if name in dirs else 0o644)
    os.chmod(dst, 0o755)
    return str(dst)


def tree_digest(path: str) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes: to prove a source was not modified."""
    out = {}
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


@pytest.fixture(autouse=True)
def apple_validator_agrees(monkeypatch):
    """Every spec ``milsurgery.check`` judges (so every package a test writes, which is checked
    before it is published) is also given to Apple's validator, and the two must agree: valid
    or not, and on the first message. Rules marked ``program`` (the MIL program's, which Apple's
    validator does not look at) are left out of the comparison."""
    import importlib

    import checks

    if not checks.have_coreml_validate():
        yield
        return
    module = importlib.import_module("milsurgery.check")
    original = module.check

    def check_and_compare(path, **kwargs):
        report = original(path, **kwargs)
        status, message = checks.coreml_validate(report.spec_path)
        apple = [v for v in report.violations if v.rule != "program"]
        assert status in (0, 1), f"Apple's validator could not read {report.spec_path}: {message}"
        assert (status == 0) == (not apple), f"{report.spec_path}: validator says {message!r}, check says {apple}"
        if apple:
            assert message == apple[0].message, (message, apple[0].message)
        return report

    monkeypatch.setattr(module, "check", check_and_compare)
    yield
