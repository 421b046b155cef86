#!/usr/bin/env python3
"""Independent generator of a held-out synthetic visual-QA test set.

Written from a written spec only, without reference to the project's own
generator, so that it can serve as an out-of-distribution-by-implementation
check on models trained on the project's data.

Usage:
    python benchmarks/independent_vqa.py --n N --seed S --out DIR

Writes DIR/images/<id>.png and DIR/test.jsonl, one JSON object per line:
    {"question_id": int, "image": "images/<id>.png", "text": str, "answer": str}
The "image" path is relative to the directory containing test.jsonl.
Refuses to write into an existing DIR (exit status 2).

Spec summary:
  * RGB image, width and height each uniform in 64..512, uniform background
    with each channel uniform in 200..255.
  * 1..3 filled shapes (circle, square, upward triangle) with pairwise disjoint
    bounding boxes, fully inside the image; size 15-30% of the shorter side.
  * Colours red/green/blue/yellow with +-20 per-channel jitter (clipped).
  * No two shapes share both kind and colour.
  * One question per image: type uniform among valid types, then a valid
    instance uniform (the yes/no type picks yes or no with probability 1/2).
Reproducible: image i depends only on (seed, i).
"""

import argparse
import json
import math
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
}
COLOR_NAMES = tuple(COLORS)
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}

MIN_SIDE, MAX_SIDE = 64, 512
BG_LOW, BG_HIGH = 200, 255
SIZE_FRAC_LOW, SIZE_FRAC_HIGH = 0.15, 0.30
JITTER = 20
MAX_PLACEMENT_TRIES = 200


def _boxes_disjoint(a, b):
    """Boxes are (x0, y0, side); pixel extents are [x0, x0+side) x [y0, y0+side)."""
    ax, ay, asz = a
    bx, by, bsz = b
    return ax + asz <= bx or bx + bsz <= ax or ay + asz <= by or by + bsz <= ay


def _sample_scene(rng):
    """Return a scene dict, or None if placement failed (caller retries)."""
    w = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    h = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    bg = tuple(int(c) for c in rng.integers(BG_LOW, BG_HIGH + 1, size=3))
    short = min(w, h)
    s_lo = math.ceil(SIZE_FRAC_LOW * short)
    s_hi = math.floor(SIZE_FRAC_HIGH * short)

    n = int(rng.integers(1, 4))
    # distinct (shape, colour) combinations
    combos = [(s, c) for s in SHAPES for c in COLOR_NAMES]
    picks = rng.choice(len(combos), size=n, replace=False)

    objects = []
    for idx in picks:
        kind, cname = combos[int(idx)]
        size = int(rng.integers(s_lo, s_hi + 1))
        placed = None
        for _ in range(MAX_PLACEMENT_TRIES):
            x0 = int(rng.integers(0, w - size + 1))
            y0 = int(rng.integers(0, h - size + 1))
            box = (x0, y0, size)
            if all(_boxes_disjoint(box, o["box"]) for o in objects):
                placed = box
                break
        if placed is None:
            return None
        base = np.array(COLORS[cname])
        jit = rng.integers(-JITTER, JITTER + 1, size=3)
        rgb = tuple(int(v) for v in np.clip(base + jit, 0, 255))
        objects.append({"shape": kind, "color": cname, "rgb": rgb, "box": placed})
    return {"width": w, "height": h, "bg": bg, "objects": objects}


def _render(scene):
    img = Image.new("RGB", (scene["width"], scene["height"]), scene["bg"])
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        x0, y0, s = o["box"]
        x1, y1 = x0 + s - 1, y0 + s - 1
        if o["shape"] == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=o["rgb"])
        elif o["shape"] == "square":
            draw.rectangle([x0, y0, x1, y1], fill=o["rgb"])
        else:  # upward triangle: apex at top centre, base along bottom edge
            draw.polygon([((x0 + x1) / 2.0, y0), (x0, y1), (x1, y1)], fill=o["rgb"])
    return img


def _centre_x(o):
    x0, _, s = o["box"]
    return x0 + (s - 1) / 2.0


def _valid_questions(scene):
    """Map question type -> list of zero-arg callables producing (text, answer)."""
    objs = scene["objects"]
    shape_count = {k: sum(o["shape"] == k for o in objs) for k in SHAPES}
    color_count = {c: sum(o["color"] == c for o in objs) for c in COLOR_NAMES}
    present = {(o["color"], o["shape"]) for o in objs}
    types = {}

    inst = [o for o in objs if shape_count[o["shape"]] == 1]
    if inst:
        types["color_of_shape"] = [
            (f"What color is the {o['shape']}?", o["color"]) for o in inst
        ]

    types["count"] = [("How many shapes are there?", COUNT_WORDS[len(objs)])]

    # yes/no: balanced by choosing the answer first (resolved in _pick)
    absent = [(c, s) for s in SHAPES for c in COLOR_NAMES if (c, s) not in present]
    types["exists"] = {
        "yes": [(f"Is there a {c} {s}?", "yes") for (c, s) in sorted(present)],
        "no": [(f"Is there a {c} {s}?", "no") for (c, s) in absent],
    }

    inst = [o for o in objs if color_count[o["color"]] == 1]
    if inst:
        types["shape_of_color"] = [
            (f"What shape is the {o['color']} object?", o["shape"]) for o in inst
        ]

    if len(objs) == 2:
        a, b = objs
        inst = []
        ax, bx = _centre_x(a), _centre_x(b)
        if ax != bx:  # an exact tie in centre x has no defined answer
            for me, other, mx, ox in ((a, b, ax, bx), (b, a, bx, ax)):
                if shape_count[me["shape"]] == 1:
                    inst.append(
                        (
                            f"Is the {me['shape']} on the left or on the right?",
                            "left" if mx < ox else "right",
                        )
                    )
        if inst:
            types["left_right"] = inst
    return types


def _pick(rng, types):
    names = sorted(types)
    t = names[int(rng.integers(len(names)))]
    pool = types[t]
    if isinstance(pool, dict):  # exists: choose yes/no with probability 1/2
        ans = "yes" if rng.random() < 0.5 else "no"
        pool = pool[ans]
    text, answer = pool[int(rng.integers(len(pool)))]
    return t, text, answer


def make_example(seed, index):
    """Deterministic (scene, image, qtype, text, answer) for (seed, index)."""
    rng = np.random.default_rng([int(seed), int(index)])
    scene = None
    while scene is None:
        scene = _sample_scene(rng)
    img = _render(scene)
    qtype, text, answer = _pick(rng, _valid_questions(scene))
    return scene, img, qtype, text, answer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, required=True, help="number of examples")
    ap.add_argument("--seed", type=int, required=True, help="random seed")
    ap.add_argument("--out", required=True, help="output directory (must not exist)")
    args = ap.parse_args(argv)

    if args.n < 0:
        print("error: --n must be non-negative", file=sys.stderr)
        return 2
    if os.path.exists(args.out):
        print(f"error: output directory {args.out!r} already exists; refusing to overwrite",
              file=sys.stderr)
        return 2
    img_dir = os.path.join(args.out, "images")
    os.makedirs(img_dir)
    with open(os.path.join(args.out, "test.jsonl"), "w") as f:
        for i in range(args.n):
            _, img, _, text, answer = make_example(args.seed, i)
            rel = f"images/{i}.png"
            img.save(os.path.join(args.out, rel))
            f.write(json.dumps({"question_id": i, "image": rel, "text": text,
                                "answer": answer}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
