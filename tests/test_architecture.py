"""The layers of docs/architecture.md, held against the code's own imports (scripts/structure.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "mqt_edge"


def _structure():
    spec = importlib.util.spec_from_file_location("structure", ROOT / "scripts" / "structure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_import_points_down_and_no_two_parts_import_each_other():
    s = _structure()
    parts = {s.part_of(p, PKG) for p in PKG.rglob("*.py")}
    assert s.problems(s.imports(PKG), parts) == []


def test_no_function_is_longer_than_80_lines():
    assert _structure().long_functions(PKG, 80) == []


def test_the_checker_sees_a_lazy_import_that_runs_back_up(tmp_path):
    # A rule a checker cannot break is no rule: a ground module importing the API inside a function.
    s = _structure()
    pkg = tmp_path / "mqt_edge"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "pipeline.py").write_text("from .errors import X\n")
    (pkg / "errors.py").write_text("def f():\n    from .pipeline import Pipeline\n")
    parts = {s.part_of(p, pkg) for p in pkg.rglob("*.py")}
    found = s.problems(s.imports(pkg), parts)
    assert any("errors (ground) imports pipeline (API)" in line for line in found)
    assert any("errors and pipeline import each other" in line for line in found)
