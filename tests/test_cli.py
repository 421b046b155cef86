"""The CLI's own promises: every command's --help renders (each usage error points the user at it)."""

import pytest
import typer
from typer.testing import CliRunner

from conftest import cli
from mqt_edge.cli import app


def command_paths(group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and sub-command, walked from the Click tree so new commands are covered too."""
    paths = [prefix]
    for name, sub in getattr(group, "commands", {}).items():  # typer may vendor its own click
        paths += command_paths(sub, prefix + (name,))
    return paths


PATHS = command_paths(typer.main.get_command(app))


def test_the_walk_finds_the_commands():
    names = {p[0] for p in PATHS if p}
    assert {"run", "export", "plan", "eval", "profiles", "train", "synth"} <= names
    assert ("profiles", "show") in PATHS


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "mqt-edge")
def test_every_help_renders(path):
    r = CliRunner().invoke(app, [*path, "--help"], terminal_width=100)
    assert r.exception is None, f"{' '.join(path)} --help raised {r.exception!r}"
    assert r.exit_code == 0 and "Usage" in r.output


def test_run_help_in_a_real_process():
    r = cli("run", "--help")
    assert r.returncode == 0 and "--vision-backend" in r.stdout and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, message, where", [
    (["run", "x.png", "q", "--tokens", "abc"], "Invalid value for '--tokens'", "run --help"),
    (["run"], "Missing argument 'image'", "run --help"),
    (["run", "x.png", "q", "--nope"], "No such option: --nope", "run --help"),
    (["bogus"], "No such command 'bogus'", "mqt_edge --help"),
    (["profiles", "show"], "Missing argument 'name'", "profiles show --help"),
])
def test_usage_errors_are_one_line_naming_the_help_to_run(args, message, where):
    r = cli(*args)
    lines = [line for line in r.stderr.splitlines() if line.strip() and "DeprecationWarning" not in line]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert message in lines[0] and lines[0].endswith(where) and "Usage:" not in r.stderr
