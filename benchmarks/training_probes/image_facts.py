"""What do the vision features of one image say? Ridge probes, read patch by patch.

    python benchmarks/training_probes/image_facts.py CHECKPOINT IMAGE [--tokens]
    (docs/training.md: run k1 on examples/shapes.png)

Ridge regressions (standardised inputs, lambda = 1, one-hot targets) are fitted on single patch
features of 200 images of the project's generator (seed 21), one per dense label column, then
applied to every patch of IMAGE. It prints the local shape map (c/s/T on patches that differ from
the background, '.' elsewhere) and, for each scene-wide column, how many of the patches vote for
each class: what an LLM could read from any one visual token if the MQT passed it on. With --tokens
the scene-wide columns are fitted and read on the visual tokens at m = 256 instead: what it can read.
"""

import sys

import torch
from PIL import Image

from mqt_edge.image import preprocess
from mqt_edge.model import MQTLlava
from mqt_edge.train import COLUMN, LABELS, Example, _features
from mqt_edge.vqa import COLORS, SHAPES

from ridge import fit
from shape import collect


def main() -> None:
    torch.set_num_threads(1)
    net = MQTLlava.from_pretrained(sys.argv[1], dtype="float32")
    feats, labels = collect(net, 21, 200)
    x, y = torch.cat(feats), torch.cat(labels)
    pixels = torch.from_numpy(preprocess(Image.open(sys.argv[2]).convert("RGB"), net.image_spec)[0])
    with torch.no_grad():
        f = _features(net, [Example(pixels, "", "")])[0]
    gh, gw = net.mqt.config.key_grid
    ph, pw = pixels.shape[1] // gh, pixels.shape[2] // gw
    on_object = pixels.reshape(3, gh, ph, gw, pw).mean((2, 4)).std(0) > 0.3  # colourful, not background
    shape = fit(x, y[:, COLUMN["shape"]], 3)(f).argmax(1).reshape(gh, gw)
    for r in range(gh):
        print("".join("csT"[int(shape[r, c])] if on_object[r, c] else "." for c in range(gw)))
    on_tokens = "--tokens" in sys.argv[3:]
    if on_tokens:  # every 4th token of each image, with its image's scene-wide row
        with torch.no_grad():
            tokens = [net.mqt(v[None], m=net.num_queries)[0, ::4] for v in feats]
            f = net.mqt(f[None], m=net.num_queries)[0]
        x_sub = torch.cat(tokens)
        y_sub = torch.cat([v[:1].expand(t.shape[0], -1) for v, t in zip(labels, tokens)])
    else:  # scene-wide columns repeat on every patch: every 9th is enough to fit
        x_sub, y_sub = torch.cat([v[::9] for v in feats]), torch.cat([v[::9] for v in labels])
    wide = {"count (one, two, three)": COLUMN["count"]}
    wide |= {f"colour of the {k} ({', '.join(COLORS)})": COLUMN["colour_of_kind"] + i for i, k in enumerate(SHAPES)}
    wide |= {f"shape of the {c} object ({', '.join(SHAPES)})": COLUMN["shape_of_colour"] + i for i, c in enumerate(COLORS)}
    wide |= {f"{c} {k} present (no, yes)": COLUMN["presence"] + i * len(SHAPES) + j
             for i, c in enumerate(COLORS) for j, k in enumerate(SHAPES)}
    for name, col in wide.items():
        votes = fit(x_sub, y_sub[:, col], LABELS[col])(f).argmax(1)
        print(f"{name}: {torch.bincount(votes, minlength=LABELS[col]).tolist()} of {f.shape[0]} "
              f"{'tokens' if on_tokens else 'patches'}")


if __name__ == "__main__":
    main()
