"""`mqt-edge eval`: accuracy, TTFT and total time against m on a LLaVA-style VQA jsonl.

Each line: {"image": path relative to the file, "text": question, "answer": word, "question_id": optional}.
Scoring: exact match of the first word, case and punctuation ignored.

Accuracy at every m comes from one session per item that refines m upward (exact: a refined answer
has the same ids as a fresh run at that m, see docs/runtime.md), so each image is encoded once.
TTFT and total time per m come from fresh one-shot requests on the first `timing_samples` items.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from .bundle import AccuracyRow
from .errors import InputError, require

DEFAULT_TOKENS = (2, 4, 8, 16, 36, 64, 144, 256)


@dataclass(frozen=True)
class Item:
    image: Path
    text: str
    answer: str
    question_id: object = None



def first_word(text: str) -> str:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return words[0] if words else ""


def load_items(path: Path, limit: int | None = None) -> list[Item]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no data file at {path}", "make one with: mqt-edge synth-vqa --n 200 --out DIR")
    items = []
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            item = Item(path.parent / d["image"], str(d["text"]), str(d["answer"]), d.get("question_id"))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"{path}, line {no}: not a VQA record ({type(exc).__name__}: {exc})",
                             'each line needs "image", "text" and "answer"') from None
        items.append(item)
        if limit and len(items) >= limit:
            break
    if not items:
        raise InputError(f"{path} has no records", "add lines with image, text and answer")
    return items


def evaluate(pipe, items: list[Item], ms: list[int], timing_samples: int = 5,
             max_new_tokens: int = 8, on_item=lambda i: None) -> list[AccuracyRow]:
    ms = sorted(set(ms))
    for m in ms:
        pipe.check_tokens(m)
    correct = {m: 0 for m in ms}
    for i, item in enumerate(items):
        with pipe.look(item.image, m=ms[0], reserve=64 + max_new_tokens) as session:
            for m in ms:
                if m > session.m:
                    session.refine(m)
                answer = session.ask(item.text, max_new_tokens=max_new_tokens).answer
                correct[m] += first_word(answer) == first_word(item.answer)
        on_item(i)
    rows = []
    for m in ms:
        timed = [pipe.ask(it.image, it.text, m=m, max_new_tokens=max_new_tokens)
                 for it in items[: max(1, timing_samples)]]
        rows.append(AccuracyRow(m, round(correct[m] / len(items), 4),
                        round(statistics.mean(a.timings_ms["ttft"] for a in timed), 1),
                        round(statistics.mean(a.timings_ms["total"] for a in timed), 1), len(items)))
    return rows


def evaluate_reference(model, items: list[Item], ms: list[int], max_new_tokens: int = 8) -> list[AccuracyRow]:
    """The same scoring with the PyTorch reference (MQTLlava.generate), for bundle-vs-reference checks."""
    import time

    rows = []
    for m in sorted(set(ms)):
        correct, seconds = 0, []
        for it in items:
            t = time.perf_counter()
            answer = model.generate(it.image, it.text, m=m, max_new_tokens=max_new_tokens).text
            seconds.append(time.perf_counter() - t)
            correct += first_word(answer) == first_word(it.answer)
        total = round(1000 * statistics.mean(seconds), 1)
        rows.append(AccuracyRow(m, round(correct / len(items), 4), float("nan"), total, len(items)))
    return rows


def plot(rows: list[AccuracyRow], out: Path, title: str) -> None:
    """Accuracy and TTFT against m (log scale), the trade-off figure of the paper."""
    require("matplotlib", "dev")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = [r.m for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ms, [100 * r.accuracy for r in rows], "o-", color="tab:blue", label="accuracy")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ms, [str(m) for m in ms])
    ax.set_xlabel("visual tokens m")
    ax.set_ylabel("accuracy (%)", color="tab:blue")
    ax.set_ylim(0, 100)
    ax2 = ax.twinx()
    ax2.plot(ms, [r.ttft_ms for r in rows], "s--", color="tab:red", label="TTFT")
    ax2.set_ylabel("TTFT (ms)", color="tab:red")
    ax2.set_ylim(0, max(r.ttft_ms for r in rows) * 1.1)  # from zero: timing noise must not look like a trend
    ax.set_title(title, fontsize=10, wrap=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def save_to_bundle(bundle, rows: list[AccuracyRow], data: Path) -> None:
    """Store the table in the manifest; the planner then picks the smallest m within an accuracy drop."""
    import hashlib

    from .bundle import write_manifest

    manifest = replace(bundle.manifest, accuracy=tuple(rows),
                       accuracy_data={"file": str(Path(data).resolve()),
                                      "sha256": hashlib.sha256(Path(data).read_bytes()).hexdigest()})
    write_manifest(bundle.root, manifest)
