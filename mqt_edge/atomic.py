"""Atomic directory writes: build a directory beside its destination, move it into place only whole.

Every writer of a directory (bundles, synth checkpoints, trained checkpoints, VQA data sets) stages
in a hidden sibling `.NAME.partial-PID`. An interrupted write leaves no half-made `NAME`; its staging
directory carries the writer's pid, so `remove_stale_staging` can tell a dead writer's leftovers
from a live one's work in progress. Ground level: imports nothing from the package.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

STAGING = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)$")  # .NAME.partial-PID beside NAME


def staging_path(out: Path, kind: str = "") -> Path:
    """The hidden sibling of `out` this process stages in (`kind` names a second one, e.g. "old")."""
    name = f"{out.name}.{kind}" if kind else out.name
    return out.parent / f".{name}.partial-{os.getpid()}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OverflowError:  # no such process can exist
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def remove_stale_staging(parent: Path) -> list[Path]:
    """Remove the staging directories (.NAME.partial-PID) in `parent` whose writing process is gone;
    never one whose process is alive. Returns what was removed."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        match = STAGING.match(p.name)
        if match and p.is_dir() and not p.is_symlink() and not _alive(int(match["pid"])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def move_into_place(tmp: Path, out: Path) -> None:
    """Put the finished `tmp` at `out`. Whatever was at `out` is moved aside first and removed only
    once the new directory is in place, so `out` is the old or the new one at every moment."""
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        return
    old = staging_path(out, "old")  # a staging name: a kill here leaves nothing remove_stale_staging misses
    _remove(old)
    os.replace(out, old)
    os.replace(tmp, out)
    _remove(old)


@contextmanager
def atomic_dir(out: str | os.PathLike, install: Callable[[Path, Path], None] = move_into_place) -> Iterator[Path]:
    """Yield an empty hidden directory beside `out`; when the block succeeds, `install(tmp, out)` puts it
    in place (by default replacing `out`), and on any failure, Ctrl-C included, the directory vanishes."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out.parent)
    tmp = staging_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
