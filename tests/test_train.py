"""Matryoshka training: the recipe runs, learns, and saves a checkpoint that loads back exactly."""

import json

import numpy as np
import pytest
import torch

from conftest import scene
from mqt_edge.errors import InputError
from mqt_edge.model import MQTLlava
from mqt_edge.train import (
    LABELS,
    Example,
    StageConfig,
    _batch_loss,
    conversation_ids,
    separate_turn_ids,
    localize_queries,
    patch_labels,
    save_checkpoint,
    synthetic_examples,
    train_stage,
)
from mqt_edge.image import preprocess
from mqt_edge.vqa import COLORS, SHAPES, Scene, Shape


def test_stages_learn_and_the_checkpoint_round_trips(tiny_ckpt, tmp_path):
    model = MQTLlava.from_pretrained(tiny_ckpt, dtype=torch.float32)
    frozen_vision = {k: v.clone() for k, v in model.vision.state_dict().items()}
    data = synthetic_examples(0)
    seen_m = []
    l1 = train_stage(model, StageConfig(1, steps=12, batch_size=4, lr=2e-3, train=("mqt", "llm"), warmup=2), data,
                     on_step=lambda s, loss, m: seen_m.append(m))
    assert set(seen_m) == {256}  # stage 1: every query
    assert sum(l1[-3:]) / 3 < 0.8 * sum(l1[:3]) / 3  # it learns (the answer prior, at least)
    assert all(torch.equal(v, model.vision.state_dict()[k]) for k, v in frozen_vision.items())  # frozen part
    seen_m.clear()
    train_stage(model, StageConfig(2, steps=6, batch_size=2, lr=1e-3, train=("mqt",)), data, seed=3,
                on_step=lambda s, loss, m: seen_m.append(m))
    assert all(m % 2 == 0 and 2 <= m <= 256 for m in seen_m) and len(set(seen_m)) > 1  # stage 2: m ~ U{2..M}
    out = save_checkpoint(model, tmp_path / "trained")
    again = MQTLlava.from_pretrained(out, dtype=torch.float32)
    im = scene(seed=2)
    assert torch.allclose(again.encode_image(im, m=64), model.encode_image(im, m=64), atol=1e-6)
    q = "What color is the circle?"
    assert again.generate(im, q, m=16, max_new_tokens=6).token_ids == \
        model.generate(im, q, m=16, max_new_tokens=6).token_ids


def test_conversations_ask_distinct_valid_questions_and_score_every_answer(tiny_model):
    data = synthetic_examples(4, turns=5)
    lengths = set()
    for _ in range(30):
        image, questions, answers, sc = next(data)
        valid = {(q, a) for _, q, a in sc.questions()}
        turns = list(zip(questions, answers))
        assert image.size == (sc.width, sc.height) and set(turns) <= valid and len(set(turns)) == len(turns)
        lengths.add(len(turns))
    assert max(lengths) == 5 and min(lengths) >= 1
    first = next(synthetic_examples(4))  # one turn: the earlier stream, unchanged
    assert isinstance(first[1], str) and isinstance(first[2], str)

    tok, eos = tiny_model.tokenizer, min(tiny_model.eos_ids)
    turns = [("What color is the circle?", "red"), ("How many shapes are there?", "two")]
    before, text, target = conversation_ids(tiny_model, turns)
    single = conversation_ids(tiny_model, turns[:1])
    assert single[0] == before and text[: len(single[1])] == single[1]  # turn 1 is the inference prompt
    assert (before, single[1][: -len(tok.encode("red")) - 1]) == tiny_model.prompt_ids(turns[0][0])
    scored = [t for t in target if t != -100]
    assert scored == tok.encode("red") + [eos] + tok.encode("two") + [eos]
    asked = [i for i, t in zip(text, target) if t == -100][len(single[1]) - len(tok.encode("red")) - 1:]
    assert tok.decode(asked) == "USER: How many shapes are there? ASSISTANT:"

    # the 2-turn loss averages both answers: its turn-1 tokens score exactly as the 1-turn example (causal
    # masking), so total(both) - total(one) is turn 2's own loss, which must be there and positive
    pix = torch.from_numpy(preprocess(scene(seed=1), tiny_model.image_spec)[0])
    with torch.no_grad():
        one = _batch_loss(tiny_model, [Example(pix, "What color is the circle?", "red")], 16)
        both = _batch_loss(tiny_model, [Example(pix, *zip(*turns))], 16)
    n1, n2 = len(tok.encode("red")) + 1, len(tok.encode("two")) + 1
    assert not torch.isclose(both, one)  # turn 2 is scored (were it not, the two means would be equal)
    assert float(both) * (n1 + n2) - float(one) * n1 > 0.1 * n2


def test_separate_turns_score_each_question_exactly_as_if_asked_alone(tiny_model):
    """With separate_turns, a 3-question example's loss is the token-weighted mean of the three
    one-question losses (block mask, positions restarting after the image), in a padded batch."""
    tok = tiny_model.tokenizer
    turns = [("What color is the circle?", "red"), ("How many shapes are there?", "three"),
             ("Is there a blue square?", "no")]
    pix = torch.from_numpy(preprocess(scene(seed=1), tiny_model.image_spec)[0])
    other = Example(torch.from_numpy(preprocess(scene(seed=2), tiny_model.image_spec)[0]), "What color is the "
                    "square?", "blue")  # shorter: padding in the batch
    with torch.no_grad():
        alone = [float(_batch_loss(tiny_model, [Example(pix, q, a)], 16)) for q, a in turns]
        together = float(_batch_loss(tiny_model, [Example(pix, *zip(*turns))], 16, separate_turns=True))
        conversation = float(_batch_loss(tiny_model, [Example(pix, *zip(*turns))], 16))
        pair = float(_batch_loss(tiny_model, [Example(pix, *zip(*turns)), other], 16, separate_turns=True))
        other_alone = float(_batch_loss(tiny_model, [other], 16))
    n = [len(tok.encode(a)) + 1 for _, a in turns]
    assert together == pytest.approx(sum(x * k for x, k in zip(alone, n)) / sum(n), rel=1e-4)
    assert abs(conversation - together) > 1e-3  # a conversation's later turns see the earlier ones
    n_other = len(tok.encode("blue")) + 1
    assert pair == pytest.approx((together * sum(n) + other_alone * n_other) / (sum(n) + n_other), rel=1e-4)
    before, segments = separate_turn_ids(tiny_model, turns)
    assert [(before, ids[: len(ids) - k]) for (ids, _), k in zip(segments, n)] == \
        [tiny_model.prompt_ids(q) for q, _ in turns]


def test_colour_twins_permute_colours_and_keep_the_questions():
    data = synthetic_examples(6, turns=4, twins=True)
    twins = 0
    previous = next(data)
    for _ in range(40):
        item = next(data)
        a, b = previous[3], item[3]
        same_layout = [(s.kind, s.cx, s.cy, s.size) for s in a.shapes] == [(s.kind, s.cx, s.cy, s.size) for s in b.shapes]
        if same_layout and (a.width, a.height, a.background) == (b.width, b.height, b.background):
            twins += 1
            assert sorted((s.color, s.rgb) for s in a.shapes) == sorted((s.color, s.rgb) for s in b.shapes)
            assert [s.color for s in a.shapes] != [s.color for s in b.shapes]
            assert item[1] == previous[1]  # the same questions ...
            truth = {q: ans for _, q, ans in b.questions()}
            assert item[2] == tuple(truth[q] for q in item[1])  # ... answered for the twin
            item = next(data)  # a twin is not twinned again
        elif len({s.color for s in a.shapes}) > 1:
            raise AssertionError("a scene of two or more colours was not followed by its twin")
        previous = item
    assert twins >= 10


def test_bad_stage_configs():
    with pytest.raises(InputError):
        StageConfig(3, steps=1)
    with pytest.raises(InputError):
        StageConfig(1, steps=1, train=("eyes",))
    with pytest.raises(InputError):
        StageConfig(0, steps=1, train=("mqt",))  # stage 0 is the vision tower's


def test_dense_labels_match_the_preprocessed_pixels(tiny_model):
    """Each labelled patch shows its object's colour after padding/resizing; background patches do not."""
    spec, grid = tiny_model.image_spec, tiny_model.mqt.config.key_grid
    for w, h in ((400, 120), (90, 300), (256, 256)):  # padded left/right, padded top/bottom, square
        short = min(w, h)
        shapes = (Shape("square", "red", COLORS["red"], w * 0.25, h * 0.5, 0.28 * short),
                  Shape("circle", "blue", COLORS["blue"], w * 0.75, h * 0.5, 0.28 * short))
        if h > w:
            shapes = (Shape("square", "red", COLORS["red"], w * 0.5, h * 0.25, 0.28 * short),
                      Shape("circle", "blue", COLORS["blue"], w * 0.5, h * 0.75, 0.28 * short))
        sc = Scene(w, h, (230, 230, 230), shapes)
        labels = patch_labels(sc, spec, grid)
        assert labels.shape == (grid[0] * grid[1], len(LABELS))
        pixels = preprocess(sc.render(), spec)[0]  # (3, H, W), normalised
        ph, pw = pixels.shape[1] // grid[0], pixels.shape[2] // grid[1]
        rgb = pixels.reshape(3, grid[0], ph, grid[1], pw).mean((2, 4)).reshape(3, -1).T
        rgb = rgb * np.array(spec.std) + np.array(spec.mean)  # back to 0..1
        for color_id, name in ((1 + list(COLORS).index("red"), "red"), (1 + list(COLORS).index("blue"), "blue")):
            at = labels[:, 0] == color_id
            assert at.sum() >= 2, (w, h, name)
            # at least half of a labelled patch is the shape (3x3 points vote), so its mean leans to the colour
            want = np.array(COLORS[name]) / 255
            assert np.abs(rgb[at].mean(0) - want).sum() < np.abs(np.array([230 / 255] * 3) - want).sum() * 0.75
        shape_of = {1 + list(COLORS).index("red"): SHAPES.index("square"),
                    1 + list(COLORS).index("blue"): SHAPES.index("circle")}
        for c, k in shape_of.items():
            assert (labels[labels[:, 0] == c, 1] == k).all()
        obj = labels[:, 0] > 0
        assert (labels[~obj][:, [1, 3]] == -100).all()  # local labels: undefined on background
        red = labels[:, 0] == 1 + list(COLORS).index("red")
        # scene-wide columns: identical on every patch, and the scene's facts
        wide = [2, *range(4, len(LABELS))]
        assert (labels[:, wide] == labels[0, wide]).all()
        scene_wide = labels[0]
        assert scene_wide[2] == 1  # count: two
        presence = scene_wide[4:16].reshape(4, 3)  # (colour, shape)
        expect = np.zeros((4, 3), int)
        expect[list(COLORS).index("red"), SHAPES.index("square")] = 1
        expect[list(COLORS).index("blue"), SHAPES.index("circle")] = 1
        assert (presence == expect).all()
        assert list(scene_wide[16:19]) == [list(COLORS).index("blue"), list(COLORS).index("red"), -100]
        assert list(scene_wide[19:23]) == [SHAPES.index("square"), -100, SHAPES.index("circle"), -100]
        if w > h:  # side by side: the square (red) is on the left
            assert (labels[red, 3] == 0).all() and list(scene_wide[23:26]) == [1, 0, -100]
        bg = rgb[~obj].mean(0)
        assert np.abs(bg - 230 / 255).max() < 0.1 or (w, h) != (256, 256)


def test_localized_queries_attend_to_their_cells(tiny_ckpt):
    model = MQTLlava.from_pretrained(tiny_ckpt, dtype=torch.float32)
    c = model.mqt.config
    im = scene(seed=4)
    v_before = model.mqt.ln_v.weight.clone()
    v_rows = model.mqt.attn.in_proj_weight[2 * c.kv_dim:].clone()
    kl = localize_queries(model, sigma=1.0, steps=200)
    assert kl < 0.1
    assert torch.equal(model.mqt.ln_v.weight, v_before)  # the value path is untouched
    assert torch.equal(model.mqt.attn.in_proj_weight[2 * c.kv_dim:], v_rows)
    # each query's strongest key lies within 1.5 patches of its cell's centre
    g = c.query_grid
    att = torch.softmax(model.mqt.attention_logits(torch.arange(c.num_queries)), -1).mean(0)  # (M, P)
    gh, gw = c.key_grid
    for i in (0, g + 1, c.num_queries // 2 + g // 2, c.num_queries - 1):
        r, col = divmod(int(att[i].argmax()), gw)
        qr, qc = divmod(i, g)
        assert abs(r - (qr + 0.5) * gh / g) <= 1.5 and abs(col - (qc + 0.5) * gw / g) <= 1.5
    # nesting still holds after the change
    full = model.encode_image(im)
    assert torch.allclose(model.encode_image(im, m=10), full[:, :10] if full.dim() == 3 else full[:10], atol=1e-6)


def test_stage0_trains_only_the_vision_tower_on_dense_labels(tiny_ckpt):
    model = MQTLlava.from_pretrained(tiny_ckpt, dtype=torch.float32)
    keep = {k: v.clone() for k, v in list(model.mqt.state_dict().items()) + list(model.llm.state_dict().items())}
    vision = {k: v.clone() for k, v in model.vision.state_dict().items()}
    losses = train_stage(model, StageConfig(0, steps=40, batch_size=4, lr=3e-3, train=("vision",), warmup=2),
                         synthetic_examples(1))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    state = dict(model.mqt.state_dict()) | dict(model.llm.state_dict())
    assert all(torch.equal(v, state[k]) for k, v in keep.items())
    assert any(not torch.equal(v, model.vision.state_dict()[k]) for k, v in vision.items())
    assert "_scene_head" not in dict(model.named_modules())  # the head never reaches a checkpoint


def test_token_labels_reach_the_mqt_and_stay_out_of_the_checkpoint(tiny_ckpt):
    """token_aux_weight asks every visual token the scene-wide facts through a discarded head."""
    runs = {}
    for w in (0.0, 1.0):
        model = MQTLlava.from_pretrained(tiny_ckpt, dtype=torch.float32)
        losses = train_stage(model, StageConfig(1, steps=30, batch_size=4, lr=3e-3, train=("mqt",), warmup=2,
                                                token_aux_weight=w), synthetic_examples(3), seed=3)
        runs[w] = model, losses
    (plain, plain_losses), (aux, aux_losses) = runs[0.0], runs[1.0]
    # the first step's loss adds the token head's cross-entropies: 23 scene-wide columns, 2-4 classes each
    assert aux_losses[0] - plain_losses[0] > 10, (aux_losses[0], plain_losses[0])
    # the head learns (from a tiny random tower, mostly the label priors: 124.5 -> 111.3 here)
    assert sum(aux_losses[-5:]) < 0.95 * sum(aux_losses[:5]), aux_losses
    assert any(not torch.equal(v, aux.mqt.state_dict()[k]) for k, v in plain.mqt.state_dict().items())
    assert hasattr(aux, "_token_head") and not hasattr(plain, "_token_head")
    assert not any("token_head" in k for k in aux.state_dict())


def test_reset_llm_redraws_the_llm_and_rescales_only_the_visual_tokens(tiny_ckpt):
    """--reset-llm: a fresh, seeded LLM; the vision tower and the MQT kept, the MQT's output scaled."""
    from mqt_edge.train import reset_llm

    model = MQTLlava.from_pretrained(tiny_ckpt, dtype=torch.float32)
    old = {name: {k: v.clone() for k, v in getattr(model, name).state_dict().items()} for name in ("vision", "mqt", "llm")}
    before = reset_llm(model, seed=1, visual_norm=0.5)
    assert before > 0
    matrices = [k for k, v in old["llm"].items() if v.dim() == 2]
    assert matrices and all(not torch.equal(model.llm.state_dict()[k], old["llm"][k]) for k in matrices)
    assert all(torch.equal(v, old["vision"][k]) for k, v in model.vision.state_dict().items())
    for k, v in model.mqt.state_dict().items():
        if k == "proj":
            torch.testing.assert_close(v, old["mqt"][k] * (0.5 / before))
        else:
            assert torch.equal(v, old["mqt"][k]), k
    # the same images' tokens now have mean norm 0.5 (a second reset measures them and scales nothing)
    assert abs(reset_llm(model, seed=1) - 0.5) < 1e-4
    again = MQTLlava.from_pretrained(tiny_ckpt, dtype=torch.float32)
    reset_llm(again, seed=1)
    assert all(torch.equal(v, model.llm.state_dict()[k]) for k, v in again.llm.state_dict().items())  # seeded
    reset_llm(again, seed=2)
    assert not torch.equal(again.llm.lm_head.weight, model.llm.lm_head.weight)
    kept = again.llm.lm_head.weight.clone()
    with pytest.raises(InputError, match="positive"):
        reset_llm(again, seed=1, visual_norm=0.0)
    assert torch.equal(again.llm.lm_head.weight, kept)  # refused before any change


def test_dense_loss_needs_scenes(tiny_ckpt):
    model = MQTLlava.from_pretrained(tiny_ckpt, dtype=torch.float32)
    plain = ((im, q, a) for im, q, a, _ in synthetic_examples(0))
    with pytest.raises(InputError, match="scenes"):
        train_stage(model, StageConfig(1, steps=1, batch_size=2, train=("mqt",), aux_weight=0.5), plain)


def test_local_vision_init_makes_attention_local_and_keeps_the_architecture(tiny_ckpt):
    from mqt_edge.train import local_vision_init

    model = MQTLlava.from_pretrained(tiny_ckpt, dtype=torch.float32)
    shapes = {k: v.shape for k, v in model.vision.state_dict().items()}
    local_vision_init(model, seed=0)
    assert {k: v.shape for k, v in model.vision.state_dict().items()} == shapes
    cfg = model.vision.config
    g, H = cfg.image_size // cfg.patch_size, cfg.num_attention_heads
    pos = model.vision.vision_model.embeddings.position_embedding.weight[1:].detach()  # (P, D)
    heads = pos.view(g * g, H, -1)
    centre = (g // 2) * g + g // 2
    for h in range(H):  # every head's slice of the code peaks at the same position and falls off with distance
        sim = heads[:, h] @ heads[centre, h]
        assert int(sim.argmax()) == centre
        assert sim[centre + 1] > sim[centre + 4] and sim[centre + g] > sim[centre + 4 * g]
    # layer-0 attention of a blank image: each patch attends mostly to its neighbourhood
    vm = model.vision.vision_model
    with torch.no_grad():
        x = vm.pre_layrnorm(vm.embeddings(torch.zeros(1, 3, cfg.image_size, cfg.image_size)))
        x = vm.encoder.layers[0].layer_norm1(x)[0, 1:]  # (P, D), class token left out
        attn = vm.encoder.layers[0].self_attn
        hd = cfg.hidden_size // H
        q = attn.q_proj(x).view(-1, H, hd).transpose(0, 1)
        k = attn.k_proj(x).view(-1, H, hd).transpose(0, 1)
        att = torch.softmax(q @ k.transpose(1, 2) * hd**-0.5, -1).mean(0)  # (P, P)
    r, c = divmod(int(att[centre].argmax()), g)
    assert abs(r - g // 2) <= 1 and abs(c - g // 2) <= 1
    near = att[centre].view(g, g)[g // 2 - 2: g // 2 + 3, g // 2 - 2: g // 2 + 3].sum()
    assert near > 0.3  # uniform attention would give these 25 patches 25/P (0.04 on the release grid)


def test_the_training_command_is_reproducible(tmp_path):
    """The documented command, shortened: the same seed gives the same weights, bit for bit."""
    from safetensors.torch import load_file

    from conftest import cli, stderr_lines

    args = ["train", "--init", "tiny", "--stage0-steps", "2", "--stage1-steps", "2", "--stage2-steps", "2",
            "--batch-size", "2", "--aux-weight", "0.5", "--token-aux-weight", "0.2", "--local-init", "--localize",
            "--turns", "3", "--separate-turns", "--colour-twins", "--reset-llm", "--visual-norm", "2.0",
            "--seed", "7", "--threads", "1"]
    for name in ("a", "b"):
        r = cli(*args, "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
    for f in ("model.safetensors", "clip-vision/model.safetensors"):
        a, b = load_file(tmp_path / "a" / f), load_file(tmp_path / "b" / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    recipe = json.loads((tmp_path / "a" / "config.json").read_text())["mqt_edge_train"]
    assert recipe["seed"] == 7 and recipe["examples_seen"] == 12 and recipe["local_init"] and recipe["turns"] == 3
    assert recipe["token_aux_weight"] == 0.2 and recipe["separate_turns"] and recipe["colour_twins"]
    assert recipe["reset_llm"] and recipe["visual_norm"] == 2.0
    r = cli("train", "--init", "tiny", "--out", str(tmp_path / "c"), "--visual-norm", "1",  # no --reset-llm
            "--stage1-steps", "0", "--stage2-steps", "0")  # were it accepted, it would finish at once
    assert r.returncode == 2 and len(stderr_lines(r)) == 1 and "add --reset-llm" in r.stderr, r.stderr
    assert not (tmp_path / "c").exists()


def test_the_default_chain_script_passes_only_options_train_accepts():
    """scripts/train_default.sh runs for hours: a mistyped option must fail here, not in its 9th link."""
    import shlex
    from pathlib import Path

    from typer.main import get_command

    from mqt_edge.cli import app

    train = get_command(app).commands["train"]
    script = Path(__file__).parent.parent / "scripts" / "train_default.sh"
    links = [shlex.split(line)[1:] for line in script.read_text().splitlines() if line.startswith("link ")]
    names = [args[0] for args in links]
    assert names == ["s0", "g", "h", "i", "j", "k", "k0", "k1", "k3", "k4", "k6", "k7", "k10", "r1", "r2"]
    for i, (name, *args) in enumerate(links):
        args = [a.replace("$W", "runs/default") for a in args]
        assert "--seed" in args and "--threads" in args, name  # what bit-reproducibility needs
        ctx = train.make_context("train", ["--out", f"runs/default/{name}", *args])  # raises on a bad option
        assert ctx.params["seed"] == int(args[args.index("--seed") + 1])
        if i:
            assert ctx.params["model"] == f"runs/default/{names[i - 1]}", name  # a chain
    with pytest.raises(Exception, match="No such option"):  # the check above can fail
        train.make_context("train", ["--out", "x", "--stage2-step", "5"])
