"""The package's structure from its own imports: layers, arrows, and what breaks the rules.

    python scripts/structure.py                 # the check, as text; exit 1 when a rule is broken
    python scripts/structure.py --png out.png   # the picture: one row per layer, arrows between parts
    python scripts/structure.py --root DIR      # another checkout (e.g. `git worktree add DIR REV`)

A part is a top-level module of mqt_edge/ or a whole subpackage; a `__main__.py` is an entry point
of its own. Every import counts, lazy ones inside functions too: a lazy import is still a
dependency, it only moves the cost. The layers and what each may import are the tables below, the
same picture as docs/architecture.md. tests/test_architecture.py holds the code to them.
"""

from __future__ import annotations

import argparse
import ast
import signal
import sys
from pathlib import Path

# Top to bottom. A part not named here is reported: a new module must be given a layer.
LAYERS: dict[str, tuple[str, ...]] = {
    "entry": ("__main__", "ros2/__main__"),
    "front ends": ("cli", "serve", "ros2", "doctor", "live", "chat"),
    "API": ("watch", "stream", "frames", "evaluate", "calibrate", "pipeline", "__init__", "session", "conversation",
            "scheduler", "caches"),
    "build host": ("exporters", "train", "model"),
    "runtimes": ("runtimes",),
    "profiles": ("profiles",),
    "ground": ("bundle", "atomic", "image", "prompt", "vqa", "presets", "quants", "costs", "device",
               "defaults", "errors", "_version", "backends", "sources", "checks", "sampling", "cores"),
}
# What each layer may import besides itself. Device code (everything but the build host) never
# imports the build host; runtimes and profiles stand side by side on the ground.
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "entry": ("front ends",),
    "front ends": ("API", "build host", "runtimes", "profiles", "ground"),
    "API": ("runtimes", "profiles", "ground"),
    "build host": ("runtimes", "ground"),
    "runtimes": ("ground",),
    "profiles": ("ground",),
    "ground": (),
}


def part_of(path: Path, pkg: Path) -> str:
    rel = path.relative_to(pkg)
    if rel.name == "__main__.py":
        return str(rel.with_suffix(""))
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.name != "__init__.py" else "__init__"


def _target(node: ast.ImportFrom, module: list[str]) -> list[str] | None:
    """The mqt_edge-relative dotted path an import names, or None when it is not ours."""
    if node.level:
        base = module[: len(module) - node.level]
        return base + (node.module.split(".") if node.module else [])
    if node.module and node.module.split(".")[0] == "mqt_edge":
        return node.module.split(".")[1:]
    return None


def imports(pkg: Path) -> dict[tuple[str, str], set[str]]:
    """(part, part) -> the files of the first that import the second."""
    arrows: dict[tuple[str, str], set[str]] = {}
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg)
        module = list(rel.with_suffix("").parts)  # the module's own dotted path; a package is its __init__
        src = part_of(path, pkg)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[list[str]] = []
            if isinstance(node, ast.ImportFrom) and (dotted := _target(node, module)) is not None:
                names = [dotted + [a.name] for a in node.names] if not dotted else [dotted]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == "mqt_edge"]
            for dotted in names:
                dst = _part_of_dotted(pkg, dotted)
                if dst and dst != src:
                    arrows.setdefault((src, dst), set()).add(str(rel))
    return arrows


def _part_of_dotted(pkg: Path, dotted: list[str]) -> str | None:
    if not dotted or dotted == ["__init__"]:
        return "__init__"
    if (pkg / dotted[0]).is_dir():
        return dotted[0] if dotted[-1] != "__main__" else f"{dotted[0]}/__main__"
    return dotted[0] if (pkg / f"{dotted[0]}.py").is_file() else "__init__"  # a name from the package face


def layer_of(part: str) -> str | None:
    return next((layer for layer, parts in LAYERS.items() if part in parts), None)


def problems(arrows: dict[tuple[str, str], set[str]], parts: set[str]) -> list[str]:
    out = [f"{p}: no layer (give it one in LAYERS)" for p in sorted(parts) if layer_of(p) is None]
    for (a, b), files in sorted(arrows.items()):
        la, lb = layer_of(a), layer_of(b)
        if la and lb and la != lb and lb not in MAY_IMPORT[la]:
            out.append(f"{a} ({la}) imports {b} ({lb}): not allowed [{', '.join(sorted(files))}]")
        if a < b and (b, a) in arrows:
            out.append(f"{a} and {b} import each other [{', '.join(sorted(files | arrows[(b, a)]))}]")
    return out


def long_functions(pkg: Path, limit: int) -> list[tuple[int, str]]:
    """Functions (nested ones inside their parent's count) longer than `limit` lines, longest first."""
    rows = []
    for path in pkg.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(pkg.parent)}:{node.lineno} {node.name}"))
    return sorted((r for r in rows if r[0] > limit), reverse=True)


def draw(arrows: dict[tuple[str, str], set[str]], parts: set[str], lines: dict[str, int], out: Path,
         title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(layer, [p for p in names if p in parts]) for layer, names in LAYERS.items()]
    rows = [r for r in rows if r[1]] + [("no layer", sorted(p for p in parts if layer_of(p) is None))]
    rows = [r for r in rows if r[1]]
    fig, ax = plt.subplots(figsize=(15, 1.3 * len(rows) + 1))
    where = {}
    for y, (layer, names) in enumerate(reversed(rows)):
        ax.text(-0.02, y, layer, ha="right", va="center", fontsize=10, weight="bold")
        for x, name in enumerate(names):
            cx = (x + 0.5) / len(names)
            where[name] = (cx, y)
            ax.text(cx, y, f"{name}\n{lines.get(name, 0)} lines", ha="center", va="center", fontsize=8,
                    bbox=dict(boxstyle="round", fc="#dde7f3" if layer != "no layer" else "#f6d5d5", ec="#556"))
    bad = {tuple(sorted((a, b))) for (a, b) in arrows if (b, a) in arrows}
    for (a, b) in arrows:
        if a in where and b in where:
            la, lb = layer_of(a), layer_of(b)
            wrong = (la and lb and la != lb and lb not in MAY_IMPORT[la]) or tuple(sorted((a, b))) in bad
            ax.annotate("", xy=where[b], xytext=where[a],
                        arrowprops=dict(arrowstyle="->", color="#c0392b" if wrong else "#8a94a6",
                                        lw=1.6 if wrong else 0.6, alpha=0.9 if wrong else 0.45,
                                        connectionstyle="arc3,rad=0.08", shrinkA=14, shrinkB=14))
    ax.set_xlim(-0.15, 1.02)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.axis("off")
    ax.set_title(title + "  (red: an import the layers forbid, or two parts importing each other)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> int:
    if hasattr(signal, "SIGPIPE"):  # `| head` ends the listing quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--png", type=Path)
    ap.add_argument("--title", default="mqt_edge")
    ap.add_argument("--longest", type=int, default=5, help="list this many of the longest functions")
    a = ap.parse_args()
    pkg = a.root / "mqt_edge"
    arrows = imports(pkg)
    parts = {part_of(p, pkg) for p in pkg.rglob("*.py")}
    lines: dict[str, int] = {}
    for p in pkg.rglob("*.py"):
        lines[part_of(p, pkg)] = lines.get(part_of(p, pkg), 0) + len(p.read_text().splitlines())
    found = problems(arrows, parts)
    print(f"{len(parts)} parts, {len(arrows)} arrows, {len(found)} broken rules")
    for line in found:
        print("  " + line)
    print(f"the {a.longest} longest functions:")
    for n, where in long_functions(pkg, 0)[: a.longest]:
        print(f"  {n:4d}  {where}")
    if a.png:
        draw(arrows, parts, lines, a.png, a.title)
        print(f"wrote {a.png}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
