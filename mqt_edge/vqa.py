"""A synthetic visual-QA task (shapes and colours), generated in code: seeded and reproducible.

The spec users and checks hold the default model to:
- RGB images of any size from 64 to 512 px a side, a uniform background with each channel in
  200..255;
- 1 to 3 filled, non-overlapping shapes (circle, square, upward triangle), each 15-30% of the
  shorter side, coloured red (220,40,40), green (40,180,60), blue (40,80,220) or yellow (230,200,40)
  with up to +-20 per channel; no two shapes share both shape and colour;
- questions, each answered by one lowercase word:
  "What color is the {shape}?" (that shape occurs once) -> the colour;
  "How many shapes are there?" -> one / two / three;
  "Is there a {color} {shape}?" -> yes / no;
  "What shape is the {color} object?" (that colour occurs once) -> the shape;
  "Is the {shape} on the left or on the right?" (exactly two shapes, that one unique) -> left /
  right, by its centre x against the other shape's.

Torch-free (numpy + Pillow): `mqt-edge synth-vqa` and `mqt-edge eval` run on a device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .atomic import atomic_dir
from .errors import InputError

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
NUMBERS = ("zero", "one", "two", "three")
QUESTION_TYPES = ("color", "count", "exists", "shape", "side")


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    rgb: tuple[int, int, int]
    cx: float
    cy: float
    size: float  # diameter / side length in pixels

    def box(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return self.cx - h, self.cy - h, self.cx + h, self.cy + h


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: tuple[int, int, int]
    shapes: tuple[Shape, ...]

    def recoloured(self, order) -> "Scene":
        """The same shapes in the same places, shape k taking the colour (and exact RGB) of shape order[k]."""
        return replace(self, shapes=tuple(replace(s, color=self.shapes[i].color, rgb=self.shapes[i].rgb)
                                          for s, i in zip(self.shapes, order)))

    def render(self) -> Image.Image:
        im = Image.new("RGB", (self.width, self.height), self.background)
        d = ImageDraw.Draw(im)
        for s in self.shapes:
            x0, y0, x1, y1 = s.box()
            if s.kind == "circle":
                d.ellipse([x0, y0, x1, y1], fill=s.rgb)
            elif s.kind == "square":
                d.rectangle([x0, y0, x1, y1], fill=s.rgb)
            else:  # upward triangle: apex at the top centre
                d.polygon([(s.cx, y0), (x0, y1), (x1, y1)], fill=s.rgb)
        return im

    def questions(self) -> list[tuple[str, str, str]]:
        """Every valid (type, question, answer) for this scene."""
        kinds = [s.kind for s in self.shapes]
        colors = [s.color for s in self.shapes]
        out = [("count", "How many shapes are there?", NUMBERS[len(self.shapes)])]
        for s in self.shapes:
            if kinds.count(s.kind) == 1:
                out.append(("color", f"What color is the {s.kind}?", s.color))
                if len(self.shapes) == 2:
                    other = next(o for o in self.shapes if o is not s)
                    out.append(("side", f"Is the {s.kind} on the left or on the right?",
                                "left" if s.cx < other.cx else "right"))
            if colors.count(s.color) == 1:
                out.append(("shape", f"What shape is the {s.color} object?", s.kind))
        present = {(s.color, s.kind) for s in self.shapes}
        for color in COLORS:
            for kind in SHAPES:
                out.append(("exists", f"Is there a {color} {kind}?", "yes" if (color, kind) in present else "no"))
        return out


def random_scene(rng: np.random.Generator, min_side: int = 64, max_side: int = 512) -> Scene:
    while True:  # rejection sampling: retry the rare layout that cannot fit its shapes
        w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
        background = tuple(int(v) for v in rng.integers(200, 256, 3))
        n = int(rng.integers(1, 4))
        short = min(w, h)
        shapes: list[Shape] = []
        used: set[tuple[str, str]] = set()
        for _ in range(200):
            if len(shapes) == n:
                break
            kind, color = SHAPES[int(rng.integers(3))], list(COLORS)[int(rng.integers(4))]
            if (kind, color) in used:
                continue
            size = float(rng.uniform(0.15, 0.30) * short)
            cx, cy = float(rng.uniform(size / 2, w - size / 2)), float(rng.uniform(size / 2, h - size / 2))
            cand = Shape(kind, color, tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLORS[color]),
                         cx, cy, size)
            if all(_apart(cand, s) for s in shapes):
                shapes.append(cand)
                used.add((kind, color))
        if len(shapes) == n:
            return Scene(w, h, background, tuple(shapes))


def _apart(a: Shape, b: Shape, gap: float = 2.0) -> bool:
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def sample(rng: np.random.Generator, **kw) -> tuple[Scene, str, str, str]:
    """A scene and one question: the type is drawn uniformly among those valid for the scene."""
    scene = random_scene(rng, **kw)
    t, question, answer = _pick(scene.questions(), rng)
    return scene, t, question, answer


def conversation(rng: np.random.Generator, turns: int, **kw) -> tuple[Scene, list[tuple[str, str, str]]]:
    """A scene and up to `turns` distinct questions about it, each drawn as `sample` draws one."""
    scene = random_scene(rng, **kw)
    qs = scene.questions()
    chosen: list[tuple[str, str, str]] = []
    for _ in range(turns):
        q = _pick(qs, rng)
        if q not in chosen:
            chosen.append(q)
    return scene, chosen


def _pick(qs: list[tuple[str, str, str]], rng: np.random.Generator) -> tuple[str, str, str]:
    types = sorted({t for t, _, _ in qs})
    qtype = types[int(rng.integers(len(types)))]
    pool = [q for q in qs if q[0] == qtype]
    if qtype == "exists":  # balance yes and no
        want = "yes" if rng.random() < 0.5 else "no"
        pool = [q for q in pool if q[2] == want] or pool
    return pool[int(rng.integers(len(pool)))]


def write_dataset(out: Path, n: int, seed: int, force: bool = False) -> Path:
    """DIR/images/*.png + DIR/data.jsonl (LLaVA-style: image, text, answer, question_id). Atomic."""
    if n < 1:
        raise InputError(f"--n {n}", "ask for at least one example")
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out} already exists", "choose another --out or pass --force")
    rng = np.random.default_rng(seed)
    with atomic_dir(out) as tmp, open(tmp / "data.jsonl", "w") as f:
        (tmp / "images").mkdir()
        for i in range(n):
            scene, qtype, question, answer = sample(rng)
            name = f"images/{i:06d}.png"
            scene.render().save(tmp / name)
            f.write(json.dumps({"question_id": i, "image": name, "text": question, "answer": answer,
                                "type": qtype}) + "\n")
    return out / "data.jsonl"
