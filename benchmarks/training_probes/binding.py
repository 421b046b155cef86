"""Image-free check: can the LLM bind a question's words to facts given as "visual tokens"?

    python benchmarks/training_probes/binding.py SCALE STEPS CHECKPOINT
    (docs/training.md: SCALE 10 and 0.02, STEPS 600, CHECKPOINT = mqt-edge synth --preset shapes)

Each example's 32 visual tokens are copies of a fixed random linear code of the scene's scene-wide
facts (the dense labels of mqt_edge.train) plus noise, scaled to entries of SCALE. Only the LLM
trains; the first answer token is scored on 200 fresh questions.
"""

import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from mqt_edge.model import MQTLlava
from mqt_edge.train import LABELS, patch_labels
from mqt_edge.vqa import sample

WIDE = [2, *range(4, len(LABELS))]  # the scene-wide label columns
N_TOKENS, BATCH = 32, 16


def main() -> None:
    scale, steps = float(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = MQTLlava.from_pretrained(sys.argv[3], dtype="float32")
    llm, embed = net.llm, net.llm.get_input_embeddings()
    dims = sum(LABELS[c] for c in WIDE)
    code = torch.randn(dims, llm.config.hidden_size) / dims**0.5

    def example(rng):
        scene, qtype, question, answer = sample(rng)
        row = patch_labels(scene, net.image_spec, net.mqt.config.key_grid)[0]
        facts = torch.cat([F.one_hot(torch.tensor(max(int(row[c]), 0)), LABELS[c]).float() * (row[c] != -100)
                           for c in WIDE])
        vis = (facts @ code).expand(N_TOKENS, -1) + 0.3 * torch.randn(N_TOKENS, code.shape[1])
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
