"""`mqt-edge chat`: the bundle loaded once, each later question prefilling only its own turn; piped
stdin for scripts (plain lines, no prompt, no ANSI) and a pseudo-terminal for people."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli, scene, stderr_lines
from mqt_edge.pipeline import Pipeline

EXAMPLE = Path(__file__).parent.parent / "examples" / "shapes.png"
Q1, Q2, Q3 = "What color is the circle?", "What color is the circle?", "How many shapes are there?"

# The command in a fresh interpreter whose Pipeline.load counts its calls (printed at exit).
COUNTING = """
import atexit, sys
from mqt_edge.pipeline import Pipeline
loads = []
original = Pipeline.load.__func__
Pipeline.load = classmethod(lambda cls, *a, **k: loads.append(1) or original(cls, *a, **k))
atexit.register(lambda: print(f"bundle loads: {len(loads)}", file=sys.stderr))
sys.argv = ["mqt-edge", "chat", *sys.argv[1:]]
from mqt_edge.cli import main
main()
"""


def chat(script: str, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", COUNTING, *map(str, args)], input=script, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def turn_ids(shipped_bundle):
    """Positions each question's turn takes, from the API: as a first turn (its ids and the template's
    tail) and as a later one ("</s>USER: ... ASSISTANT:", after the earlier answer)."""
    with Pipeline.load(shipped_bundle, threads=1) as pipe, pipe.conversation(EXAMPLE, m=4) as conv:
        first = {q: len(pipe.question_ids(q)) for q in (Q1, Q2, Q3)}
        later = {q: len(conv.turn_ids([], q, first=False)[0]) for q in (Q1, Q2, Q3)}
        return first | {("later", q): n for q, n in later.items()}


def stats(stderr: str) -> list[dict]:
    found = re.findall(r"^m=(\d+)  TTFT (\d+) ms  prefilled (\d+)", stderr, re.M)
    return [{"m": int(m), "ttft": int(t), "prefilled": int(p)} for m, t, p in found]


def test_a_piped_script_loads_once_and_later_questions_prefill_only_their_turn(shipped_bundle, turn_ids):
    r = chat(f"/m 4\n{Q1}\n{Q2}\n{Q3}\n", EXAMPLE, "--bundle", shipped_bundle, "--threads", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bundle loads: 1" in r.stderr and r.stderr.count("loaded ") == 1
    answers = r.stdout.splitlines()
    assert len(answers) == 3 and answers[0] == answers[1] == "red", r.stdout
    s = stats(r.stderr)
    assert [x["m"] for x in s] == [4, 4, 4], r.stderr
    # the first turn also feeds the image's 4 visual tokens; the next ones only themselves
    assert s[0]["prefilled"] == 4 + turn_ids[Q1]
    assert s[1]["prefilled"] == turn_ids["later", Q2] and s[2]["prefilled"] == turn_ids["later", Q3]
    assert "\x1b" not in r.stdout + r.stderr and "> " not in r.stdout  # no ANSI, no prompt when piped


def test_json_answers_and_a_new_image(shipped_bundle, turn_ids, tmp_path):
    scene(seed=3).save(tmp_path / "other.png")
    script = f"{Q1}\n/image {tmp_path / 'other.png'}\n{Q1}\n/reset\n{Q1}\n{Q1}\n"
    r = chat(script, EXAMPLE, "--bundle", shipped_bundle, "--threads", "1", "-m", "8", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [a["question"] for a in records] == [Q1] * 4 and records[0]["answer"] == "red"
    # a new image and /reset each start a conversation: its first turn feeds the image again
    full = 8 + turn_ids[Q1]
    assert [a["prefilled"] for a in records] == [full, full, full, turn_ids["later", Q1]]
    assert all(a["m"] == 8 and a["timings_ms"]["ttft"] > 0 for a in records)
    assert "image " + str(tmp_path / "other.png") in r.stderr and "new conversation" in r.stderr


def test_a_failing_line_is_one_line_and_the_script_goes_on(shipped_bundle):
    script = f"{Q1}\n/m 9999\n/m four\n/refine 2\n/image missing.png\n/frobnicate\n{Q1}\n/quit\n{Q1}\n"
    r = chat(script, "--bundle", shipped_bundle, "--threads", "1", "-m", "4")
    assert r.returncode == 1 and "Traceback" not in r.stderr  # a script learns that something failed
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 7, r.stderr  # no image yet (twice), then one per bad command (5)
    for named in ("no image yet", "m=9999", "/m 'four'", "/refine 2 is not above m = 4", "no image at missing.png",
                  "unknown command /frobnicate"):
        assert any(named in e and ";" in e for e in errors), (named, errors)
    assert r.stdout == ""  # /quit ended it before the last question
    assert "bundle loads: 1" in r.stderr


def test_an_image_that_does_not_exist_fails_before_the_bundle_loads(tmp_path):
    r = cli("chat", tmp_path / "nope.png", "--bundle", tmp_path / "no-bundle")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = stderr_lines(r)
    assert len(err) == 1 and "no image at" in err[0] and "/image" in err[0], r.stderr


class Terminal:
    """The command on a pseudo-terminal: what a person at a keyboard sees and types."""

    def __init__(self, *args) -> None:
        import pty

        self.master, slave = pty.openpty()
        env = os.environ | {"TERM": "xterm", "COLUMNS": "120"}
        self.p = subprocess.Popen([sys.executable, "-m", "mqt_edge", "chat", *map(str, args)], stdin=slave,
                                  stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.seen = ""

    def expect(self, pattern: str, timeout: float = 60) -> str:
        end = time.monotonic() + timeout
        while not re.search(pattern, self.seen):
            ready, _, _ = select.select([self.master], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                raise AssertionError(f"{pattern!r} not seen in {timeout} s; the terminal shows:\n{self.seen[-2000:]}")
            try:
                self.seen += os.read(self.master, 4096).decode(errors="replace")
            except OSError:  # the child closed the terminal
                raise AssertionError(f"{pattern!r} not seen before the end:\n{self.seen[-2000:]}") from None
        return self.seen

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def close(self) -> int:
        try:
            return self.p.wait(timeout=30)
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait()
            os.close(self.master)


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def test_a_person_at_a_terminal(shipped_bundle):
    term = Terminal(EXAMPLE, "--bundle", shipped_bundle, "--threads", "1", "-m", "16")
    try:
        term.expect(r"/help lists the commands")
        term.expect(r"> ")
        term.type(Q1)
        term.expect(r"prefilled \d+")
        term.expect(r"> $|> \x1b")
        term.type("/m 4")
        term.expect(r"m = 4: new conversation")
        term.type(Q3)
        seen = term.expect(r"m=4\S*\s+TTFT")
        term.type("/quit")
    finally:
        code = term.close()
    assert code == 0
    text = plain(seen)
    assert "red" in text and re.search(r"m=16\s+TTFT \d+ ms\s+prefilled \d+", text), text
    assert "\x1b[" in seen  # a terminal gets colours
