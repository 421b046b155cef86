"""Image-free check: can the LLM bind a question's words to facts given as "visual tokens"?

    python benchmarks/training_probes/binding.py SCALE STEPS CHECKPOINT [--only TYPE] [--pairs] [--mlp N]
    (docs/training.md: SCALE 10 and 0.02, STEPS 600, CHECKPOINT = mqt-edge synth --preset shapes;
     the "exists" study: SCALE 10, STEPS 2000, --only exists, with and without --pairs, --mlp 1536)

Each example's 32 visual tokens are copies of a fixed random linear code of the scene's scene-wide
facts (the dense labels of mqt_edge.train) plus noise, scaled to entries of SCALE. Only the LLM
trains; the first answer token is scored on 200 fresh questions.

--only TYPE asks only questions of that type (yes and no balanced for "exists"). --pairs makes the
first 12 tokens one per (colour, shape) pair: the sum of fixed codes of its colour, its shape and
"present" or "absent", so an attention head could look the asked pair up. --mlp N replaces the LLM
with a fresh one whose MLP is N wide (the rest of its shape unchanged).
"""

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from mqt_edge.model import MQTLlava
from mqt_edge.train import LABELS, SCENE_COLUMNS, patch_labels
from mqt_edge.vqa import COLORS, SHAPES, sample

WIDE = SCENE_COLUMNS  # the scene-wide label columns
N_TOKENS, BATCH = 32, 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scale", type=float)
    ap.add_argument("steps", type=int)
    ap.add_argument("checkpoint")
    ap.add_argument("--only")
    ap.add_argument("--pairs", action="store_true")
    ap.add_argument("--mlp", type=int)
    args = ap.parse_args()
    scale, steps = args.scale, args.steps
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = MQTLlava.from_pretrained(args.checkpoint, dtype="float32")
    llm = net.llm
    if args.mlp:
        from transformers import LlamaForCausalLM

        llm = LlamaForCausalLM(type(llm.config)(**(llm.config.to_dict() | {"intermediate_size": args.mlp})))
    embed = llm.get_input_embeddings()
    dims = sum(LABELS[c] for c in WIDE)
    code = torch.randn(dims, llm.config.hidden_size) / dims**0.5
    own = torch.Generator().manual_seed(1)  # the pair codes leave the default run's random stream as it was
    colour_code, shape_code, said_code = (torch.randn(n, llm.config.hidden_size, generator=own)
                                          for n in (len(COLORS), len(SHAPES), 2))

    def example(rng):
        scene, qtype, question, answer = sample(rng)
        if args.only:  # same scene, a question of the asked type (yes and no balanced)
            pool = [q for q in scene.questions() if q[0] == args.only]
            if not pool:
                return example(rng)
            want = [q for q in pool if q[2] == ("yes" if rng.random() < 0.5 else "no")] or pool
            qtype, question, answer = want[int(rng.integers(len(want)))]
        row = patch_labels(scene, net.image_spec, net.mqt.config.key_grid)[0]
        facts = torch.cat([F.one_hot(torch.tensor(max(int(row[c]), 0)), LABELS[c]).float() * (row[c] != -100)
                           for c in WIDE])
        vis = (facts @ code).expand(N_TOKENS, -1).clone()
        if args.pairs:
            present = {(s.color, s.kind) for s in scene.shapes}
            vis[:12] = torch.stack([colour_code[i] + shape_code[j] + said_code[int((c, k) in present)]
                                    for i, c in enumerate(COLORS) for j, k in enumerate(SHAPES)])
        vis = vis + 0.3 * torch.randn(N_TOKENS, code.shape[1])
        vis = vis / vis.norm(dim=-1, keepdim=True) * scale * code.shape[1] ** 0.5  # entries of size ~scale
        before, after = net.prompt_ids(question)
        return before, vis, after, net.tokenizer.encode(answer), qtype

    opt = torch.optim.AdamW(llm.parameters(), lr=1.5e-3)
    rng, start = np.random.default_rng(0), time.time()
    for step in range(steps):
        xs, ys = [], []
        for _ in range(BATCH):
            before, vis, after, answer, _ = example(rng)
            xs.append(torch.cat([embed(torch.tensor(before)), vis, embed(torch.tensor(after + answer))]))
            ys.append(torch.tensor([-100] * (len(before) + N_TOKENS + len(after)) + answer))
        width = max(len(x) for x in xs)
        x = torch.zeros(BATCH, width, xs[0].shape[1])
        y = torch.full((BATCH, width), -100)
        mask = torch.zeros(BATCH, width, dtype=torch.long)
        for i, (xi, yi) in enumerate(zip(xs, ys)):
            x[i, : len(xi)], y[i, : len(yi)], mask[i, : len(xi)] = xi, yi, 1
        logits = llm(inputs_embeds=x, attention_mask=mask).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            print(step, round(loss.item(), 3), f"{time.time() - start:.0f}s", flush=True)
    rng, per = np.random.default_rng(99), {}
    with torch.no_grad():
        for _ in range(200):
            before, vis, after, answer, qtype = example(rng)
            x = torch.cat([embed(torch.tensor(before)), vis, embed(torch.tensor(after))])[None]
            right = int(llm(inputs_embeds=x).logits[0, -1].argmax()) == answer[0]
            per.setdefault(qtype, [0, 0])
            per[qtype][0] += right
            per[qtype][1] += 1
    print("scale", scale, {k: f"{a}/{n}" for k, (a, n) in per.items()},
          "all", sum(a for a, _ in per.values()) / 200)


if __name__ == "__main__":
    main()
