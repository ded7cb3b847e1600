"""The backbones (mage_cl.backbones) on tiny random Janus / Emu3 / Chameleon checkpoints built in the test.

Each check compares against transformers' own path where there is one: the image tokens the
processor + model make, Janus' two heads, Emu3's own LM loss, greedy decoding by full
forwards without a cache, guidance from two separate forwards.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import mage_kernels as mk
from backbone_fakes import make_chameleon, make_data, make_emu3, make_janus
from mage_cl.backbones import (IMAGE_SLOT, TARGET_IMAGE_SLOT, BackboneError, BackboneOptions, open_backbone)
from mage_cl.methods import make_method
from mage_cl.methods.base import MethodConfig
from mage_cl.tasks.base import Task, Verdict
from mage_cl.tasks.realdata import load_backbone_task

warnings.filterwarnings("ignore", category=FutureWarning)

MAKERS = {"janus": make_janus, "emu3": make_emu3, "chameleon": make_chameleon}
LM_PREFIX = {"janus": "hf.model.language_model.layers.", "emu3": "hf.model.text_model.layers.",
             "chameleon": "hf.model.layers."}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    paths = {name: make(root / name) for name, make in MAKERS.items()}
    paths["data"] = make_data(root / "data", ["VQAv2", "Flickr30k", "HQEdit", "RefCOCO"])
    return paths


def _open(ckpt, fam, **kw):
    opts = BackboneOptions(**{"image_size": 16, **kw}) if fam == "emu3" else BackboneOptions(**kw)
    bb = open_backbone(str(ckpt[fam]), options=opts)
    return bb, bb.load_model()


def _stub_judge(train):
    return lambda generated, example: Verdict(False, "HAL")


def _task(ckpt, bb, paper):
    d = ckpt["data"] / paper
    return load_backbone_task(paper, str(d / "train.jsonl"), str(d / "test.json"), bb,
                              image_judge=_stub_judge if paper in ("Flickr30k", "HQEdit") else None)


def _force_image_start(bb, model):
    """Make the image-start token the argmax of every text step (a hook on the LM head)."""
    hf = model.hf

    def hook(module, args, out):
        out = out.clone()
        out[..., bb.image_start_id] += 1e4
        return out

    return hf.lm_head.register_forward_hook(hook)


# ---------------------------------------------------------------------------------------- adapters


@pytest.mark.parametrize("fam", ["janus", "emu3", "chameleon"])
def test_adapters_go_on_the_language_model_only(ckpt, fam):
    bb, model = _open(ckpt, fam)
    targets = bb.target_modules(model)
    assert targets and all(t.startswith(LM_PREFIX[fam]) and t.rsplit(".", 1)[-1] in mk.LLAMA_TARGETS for t in targets)
    assert len(targets) == 2 * 7  # two decoder layers x q/k/v/o/gate/up/down
    # the vision tower / VQ model do have q/k/v linears; the plain leaf-name match would hit them
    others = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
              and n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj") and not n.startswith(LM_PREFIX[fam])]
    if fam in ("janus", "emu3"):
        assert others, "the test model should have q/k/v outside the LM (vision tower / VQ attention)"
    m = make_method("mage", MethodConfig(target_modules=tuple(targets)))
    m.setup(model)
    injected = [n for n, _ in mk.mage_layers(model)]
    assert sorted(injected) == sorted(targets)
    assert not any(n.startswith(("hf.model.vision_model", "hf.model.vqmodel", "hf.model.aligner",
                                 "hf.model.generation")) for n in injected)
    mk.for_task(model, ["image", "text"], "text")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(LM_PREFIX[fam]) and ".lora_" in n for n in trainable)


# ---------------------------------------------------------------------------------------- image tokens


def test_emu3_and_chameleon_input_images_match_the_processor_path(ckpt):
    from mage_cl.backbones.base import open_image

    for fam in ("emu3", "chameleon"):
        bb, model = _open(ckpt, fam)
        task = _task(ckpt, bb, "VQAv2")
        ex = task.test[0]
        assert ex.prompt.count(IMAGE_SLOT) == 1
        ids, _ = bb.expand_prompt(model, ex)
        # transformers' own path: processor placeholders, replaced by the model's image tokens
        img = open_image(ex.meta["images"][0])
        proc = bb.processor(text=["<image>q"], images=[img], return_tensors="pt")
        hf = model.hf
        if fam == "emu3":
            tokens = hf.model.get_image_tokens(proc["pixel_values"], proc["image_sizes"])
        else:
            tokens = hf.model.get_image_tokens(proc["pixel_values"]).reshape(-1)
        ref = proc["input_ids"][0].clone()
        ref[ref == bb.token_id("<image>", "image")] = tokens.to(ref.dtype)
        ref = ref.tolist()
        start = ids.index(bb.image_start_id)
        n = bb.input_image_length((24, 20))  # the fake images are 24 x 20
        assert ids[start:start + n] == ref[ref.index(bb.image_start_id):ref.index(bb.image_start_id) + n]
        assert bb.num_tokens(ex) == len(ids) + len(ex.target)


def test_janus_prompt_uses_the_chat_template_and_placeholders(ckpt):
    bb, model = _open(ckpt, "janus")
    task = _task(ckpt, bb, "VQAv2")
    first, second = task.train[0], task.train[1]
    assert bb.tokenizer.decode([t for t in first.prompt if t >= 0]).startswith("<s>User: ")
    assert first.prompt.count(IMAGE_SLOT) == 1 and second.prompt.count(IMAGE_SLOT) == 1
    assert "Assistant: " + first.meta["answers"][0] in bb.tokenizer.decode([t for t in second.prompt if t >= 0])
    ids, pixels = bb.expand_prompt(model, first)
    k = ids.index(bb.boi_id)
    assert ids[k + 1:k + 17] == [bb.placeholder_id] * 16 and ids[k + 17] == bb.eoi_id
    assert len(pixels) == 1 and tuple(pixels[0].shape) == (3, 32, 32)


# ---------------------------------------------------------------------------------------- losses


def test_janus_joint_logits_give_janus_own_text_and_image_losses(ckpt):
    bb, model = _open(ckpt, "janus")
    hf = model.hf
    text_ex = _task(ckpt, bb, "VQAv2").train[0]
    img_ex = _task(ckpt, bb, "Flickr30k").train[0]
    batch = bb.collate([text_ex, img_ex], model, torch.device("cpu"))
    got = bb.loss(model, batch)

    # reference 1: the text sample through JanusForConditionalGeneration itself (LM head, pixel values)
    p, px = bb.expand_prompt(model, text_ex)
    ids = torch.tensor([p + list(text_ex.target)])
    logits = hf(input_ids=ids, pixel_values=torch.stack(px)).logits[0, :-1].float()
    tgt = ids[0, 1:].clone()
    tgt[: len(p) - 1] = -100
    text_loss = F.cross_entropy(logits, tgt, ignore_index=-100)
    # reference 2: the image sample the way Janus trains generation: text embeddings of the prompt and
    # <begin_of_image>, generation embeddings of the codes, LM head for <begin_of_image>, generation head after
    p2, _ = bb.expand_prompt(model, img_ex)
    target = bb.expand_target(model, img_ex)
    assert target[0] == bb.boi_id and len(target) == 17
    codes = torch.tensor([t - bb.text_vocab for t in target[1:]])
    assert int(codes.min()) >= 0 and int(codes.max()) < 32
    emb = torch.cat([hf.get_input_embeddings()(torch.tensor(p2 + [bb.boi_id])),
                     hf.prepare_embeddings_for_image_generation(codes)], 0)[None]
    h = hf.model.language_model(inputs_embeds=emb).last_hidden_state[0]
    P = len(p2)
    # position P-1 predicts <begin_of_image> (LM head); P (<begin_of_image>) and P+k (code k) predict the codes
    boi_loss = F.cross_entropy(hf.lm_head(h[P - 1: P]).float(), torch.tensor([bb.boi_id]), reduction="sum")
    code_loss = F.cross_entropy(hf.model.generation_head(h[P: P + 16]).float(), codes, reduction="sum")
    image_loss = (boi_loss + code_loss) / 17
    want = (text_loss + image_loss) / 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_emu3_image_answer_loss_is_the_plain_lm_loss(ckpt):
    bb, model = _open(ckpt, "emu3")
    ex = _task(ckpt, bb, "HQEdit").train[0]
    assert ex.target == [TARGET_IMAGE_SLOT] and ex.prompt.count(IMAGE_SLOT) == 1
    batch = bb.collate([ex], model, torch.device("cpu"))
    target = bb.expand_target(model, ex)
    g = bb.grid
    assert len(target) == bb.target_image_length and target[-1] == bb.eos_id and target[0] == bb.boi_id
    rows = target[len(bb._header(g, g)):][: g * (g + 1)]
    assert all(rows[r * (g + 1) + g] == bb.eol_id for r in range(g))
    got = bb.loss(model, batch)
    labels = batch["labels"]
    want = model.hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_chameleon_refuses_image_answers(ckpt):
    bb, _ = _open(ckpt, "chameleon")
    assert not bb.writes_images and "infinite loss" in bb.image_output_refusal
    d = ckpt["data"] / "Flickr30k"
    with pytest.raises(ValueError, match="infinite loss"):
        load_backbone_task("Flickr30k", str(d / "train.jsonl"), str(d / "test.json"), bb, image_judge=_stub_judge)


# ---------------------------------------------------------------------------------------- generation


def _full_forward_greedy(bb, model, prompt_ids, pixels, steps):
    """Reference: greedy by full forwards without a cache, one prompt at a time (no padding)."""
    seq = list(prompt_ids)
    out = []
    for _ in range(steps):
        kw = {"pixel_values": torch.stack(pixels)} if pixels else {}
        logits = model(input_ids=torch.tensor([seq]), **kw).logits[0, -1]
        t = int(logits.argmax())
        out.append(t)
        if t in (bb.eos_id, bb.image_start_id):
            break
        seq.append(t)
    return [t for t in out if t != bb.eos_id]


@pytest.mark.parametrize("fam", ["janus", "emu3", "chameleon"])
def test_text_generation_matches_full_forwards(ckpt, fam):
    bb, model = _open(ckpt, fam)
    model.eval()
    task = _task(ckpt, bb, "VQAv2")
    examples = task.train[:3]  # different prompt lengths (history turns): left padding is exercised
    assert len({bb.prompt_tokens(e) for e in examples}) > 1
    task_small = Task(task.name, task.paper_name, task.inputs, "text", task.train, task.test, 4, task.judge)
    with torch.no_grad():
        got = bb.generate(model, examples, task_small)
        for e, g in zip(examples, got):
            p, px = bb.expand_prompt(model, e)
            assert g == _full_forward_greedy(bb, model, p, px, 4)


@pytest.mark.parametrize("fam,guidance", [("janus", 1.0), ("janus", 5.0), ("emu3", 3.0)])
def test_image_generation_is_well_formed_and_decodes(ckpt, fam, guidance):
    bb, model = _open(ckpt, fam, guidance_scale=guidance)
    model.eval()
    task = _task(ckpt, bb, "Flickr30k")
    handle = _force_image_start(bb, model)
    try:
        with torch.no_grad():
            outs = bb.generate(model, task.test[:2], task)
    finally:
        handle.remove()
    plan = bb.image_plan()
    for out in outs:
        assert out[0] == bb.image_start_id and len(out) == 1 + len(plan)
        for step, tok in zip(plan, out[1:]):
            if step is None:
                assert bb.is_image_token(tok) and tok != bb.image_start_id
            else:
                assert tok == step
        img = bb.decode_image(out)
        assert img is not None and img.size == ((32, 32) if fam == "janus" else (16, 16)) and img.mode == "RGB"
    assert bb.decode_image(outs[0][:-1]) is None  # a truncated image is not an image
    assert bb.decode_image([bb.eos_id]) is None


def test_janus_guidance_combines_a_conditional_and_an_unconditional_forward(ckpt):
    bb, model = _open(ckpt, "janus", guidance_scale=5.0)
    model.eval()
    task = _task(ckpt, bb, "HQEdit")  # a source image: pixel values in the conditional rows only
    examples = task.test[:2]
    with torch.no_grad():
        rows = [bb.expand_prompt(model, e) for e in examples]
        imgs = bb._generate_images(model, [p for p, _ in rows], [px for _, px in rows])
        for (p, px), img in zip(rows, imgs):
            cond = model(input_ids=torch.tensor([p + [bb.boi_id]]), pixel_values=torch.stack(px)).logits[0, -1]
            unc = model(input_ids=torch.tensor([bb.uncond_prompt(p) + [bb.boi_id]])).logits[0, -1]
            mix = unc + 5.0 * (cond - unc)
            mix[: bb.text_vocab] = float("-inf")
            assert img[1] == int(mix.argmax())


# ---------------------------------------------------------------------------------------- options


def test_bf16_runs_float32_adapters_under_autocast(ckpt):
    bb, model = _open(ckpt, "janus", dtype="bf16")
    assert next(model.hf.parameters()).dtype == torch.bfloat16 and bb.adapter_dtype == torch.float32
    m = make_method("lora", MethodConfig(target_modules=tuple(bb.target_modules(model)), adapter_dtype=bb.adapter_dtype))
    m.setup(model)
    mk.set_trainable(model, [0])
    params = m.trainable_parameters()
    assert params and all(p.dtype == torch.float32 for p in params)
    exs = [_task(ckpt, bb, "VQAv2").train[0], _task(ckpt, bb, "Flickr30k").train[0]]
    with mk.use_backend("torch"):
        model.train()
        loss = bb.loss(model, bb.collate(exs, model, torch.device("cpu")))
        loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)


def test_gradient_checkpointing_gives_the_same_gradients(ckpt):
    grads = []
    for gc in (False, True):
        bb, model = _open(ckpt, "janus", gradient_checkpointing=gc)
        torch.manual_seed(0)
        m = make_method("ew", MethodConfig(target_modules=tuple(bb.target_modules(model)), dropout=0.0))
        m.setup(model)
        with torch.no_grad():
            for _, layer in mk.mage_layers(model):
                for b in layer.lora_B:
                    b.normal_(0, 0.05)
        model.train()
        exs = [_task(ckpt, bb, "VQAv2").train[0], _task(ckpt, bb, "Flickr30k").train[1]]
        fisher = mk.Fisher(model, loss_reduction="mean")
        bb.loss(model, bb.collate(exs, model, torch.device("cpu"))).backward()
        grads.append(({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                      {k: v.clone() for k, v in fisher.values().items()}))
        fisher.remove()
    (g0, f0), (g1, f1) = grads
    assert set(g0) == set(g1) and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)
    for n in f0:
        torch.testing.assert_close(f1[n], f0[n], rtol=1e-5, atol=1e-9)


def test_micro_batches_under_a_token_budget_give_the_whole_batch_step(ckpt):
    """One training step split into micro-batches: same loss, gradients and per-sample Fisher."""
    from mage_cl.trainer import TrainConfig, micro_batches, train_task
    from mage_cl.methods.mage import MAGE

    seen = []

    class Probe(MAGE):
        def after_step(self, fisher):
            seen.append(({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None},
                         {k: v.clone() for k, v in fisher.values().items()}))
            super().after_step(fisher)

    bb, _ = _open(ckpt, "janus")
    exs = _task(ckpt, bb, "VQAv2").train[:3] + _task(ckpt, bb, "Flickr30k").train[:2]
    sizes = [bb.num_tokens(e) for e in exs]
    budget = max(sizes) + 10
    parts = micro_batches(exs, budget, bb)
    assert len(parts) > 2 and all(max(bb.num_tokens(e) for e in p) * len(p) <= budget for p in parts)
    losses = []
    for tokens in (None, budget):
        _, model = _open(ckpt, "janus")
        torch.manual_seed(0)
        m = Probe(MethodConfig(target_modules=tuple(bb.target_modules(model)), dropout=0.0))
        m.setup(model)
        m.before_task(Task("mixed", "mixed", frozenset({"image", "text"}), "image", exs, exs, 1, None), 0)
        cfg = TrainConfig(steps_per_task=1, batch_size=len(exs), lr=1e-3, warmup_steps=1, max_batch_tokens=tokens)
        stats = train_task(model, m, exs, cfg, bb.pad_id, seed=0, backbone=bb)
        losses.append(stats["loss"])
    assert len(seen) == 2
    (g0, f0), (g1, f1) = seen
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-8)
    assert f0 and set(f0) == set(f1)
    for n in f0:
        torch.testing.assert_close(f1[n], f0[n], rtol=1e-4, atol=1e-10)
    assert any(float(v.abs().max()) > 0 for v in f0.values())


# ---------------------------------------------------------------------------------------- loading


def test_open_backbone_errors_are_one_line(ckpt, tmp_path):
    import json

    with pytest.raises(BackboneError, match="no such directory"):
        open_backbone(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="not a transformers checkpoint"):
        open_backbone(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(BackboneError, match="invalid JSON"):
        open_backbone(str(bad))
    for mt, words in (("vit", "model family 'vit' is not supported"), ("multi_modality", "original DeepSeek")):
        (bad / "config.json").write_text(json.dumps({"model_type": mt}))
        with pytest.raises(BackboneError, match=words):
            open_backbone(str(bad))
    noproc = tmp_path / "noproc"
    noproc.mkdir()
    (noproc / "config.json").write_text((ckpt["janus"] / "config.json").read_text())
    with pytest.raises(BackboneError, match="no usable Janus processor"):
        open_backbone(str(noproc))
    with pytest.raises(BackboneError, match="model_type 'janus', not 'emu3'"):
        open_backbone(str(ckpt["janus"]), "emu3")
    with pytest.raises(BackboneError, match="needs the optional flash-attn"):
        open_backbone(str(ckpt["janus"]), options=BackboneOptions(attn_implementation="flash_attention_2"))
    with pytest.raises(BackboneError, match="unknown --attn-implementation"):
        open_backbone(str(ckpt["janus"]), options=BackboneOptions(attn_implementation="fast"))
    with pytest.raises(BackboneError, match="multiple of Emu3's VQ downsampling 8"):
        open_backbone(str(ckpt["emu3"]), options=BackboneOptions(image_size=20))


def test_six_tasks_load_with_images_checked(ckpt, tmp_path):
    bb, _ = _open(ckpt, "emu3")
    full = make_data(tmp_path / "d", ["VQAv2", "ImageNet", "OCRVQA", "RefCOCO", "Flickr30k", "HQEdit"])
    got = {}
    for paper in ("VQAv2", "ImageNet", "OCRVQA", "RefCOCO", "Flickr30k", "HQEdit"):
        d = full / paper
        got[paper] = load_backbone_task(paper, str(d / "train.jsonl"), str(d / "test.json"), bb,
                                        image_judge=_stub_judge if paper in ("Flickr30k", "HQEdit") else None)
    assert {p: (t.output, tuple(sorted(t.inputs))) for p, t in got.items()} == {
        "VQAv2": ("text", ("image", "text")), "ImageNet": ("text", ("image", "text")),
        "OCRVQA": ("text", ("image", "text")), "RefCOCO": ("text", ("image", "text")),
        "Flickr30k": ("image", ("text",)), "HQEdit": ("image", ("image", "text"))}
    dec = lambda ids: bb.tokenizer.decode([t for t in ids if t >= 0], skip_special_tokens=True)
    fl = got["Flickr30k"]
    assert dec(fl.train[0].prompt).strip() == "Please generate the image: A red square on a wall."
    assert fl.train[0].meta["clip_text"] == "A red square on a wall."
    assert fl.test[1].meta["clip_text"] == "A blue square on a wall." and fl.test[0].meta["target_image"] is None
    hq = got["HQEdit"]
    assert dec(hq.train[0].prompt).strip() == "Please generate the image: Paint the wall red."
    assert hq.train[0].meta["target_image"].endswith("target images/t0.png")
    assert hq.test[0].meta["clip_text"] == "Paint the wall red." and hq.train[0].prompt.count(IMAGE_SLOT) == 1
    ref = got["RefCOCO"]
    assert ref.test[0].meta["bbox"] == (0.1, 0.2, 0.5, 0.6)
    vqa = got["VQAv2"]
    assert len(vqa.train) == 8 and len(vqa.test) == 3  # two turns per training image
    # the text judge: an image answer to a text question is IUF
    assert vqa.judge([bb.visual_ids[0]], vqa.test[0]).error == "IUF"
    red = bb.encode_text("red")
    assert vqa.judge(red, vqa.test[0]).correct


def test_missing_or_unreadable_images_are_named_with_file_and_line(ckpt, tmp_path):
    bb, _ = _open(ckpt, "janus")
    data = make_data(tmp_path / "d", ["VQAv2", "HQEdit"])
    d = data / "VQAv2"
    (d / "tr1.png").unlink()
    with pytest.raises(BackboneError, match=r"VQAv2/train.jsonl:2: image '.*tr1.png' not found"):
        load_backbone_task("VQAv2", str(d / "train.jsonl"), str(d / "test.json"), bb)
    (d / "tr1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(BackboneError, match=r"VQAv2/train.jsonl:2: image '.*tr1.png' cannot be read"):
        load_backbone_task("VQAv2", str(d / "train.jsonl"), str(d / "test.json"), bb)
    from PIL import Image

    jpg = d / "tr1.jpg"
    Image.new("RGB", (64, 48), (200, 10, 10)).save(jpg, quality=90)
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])  # a truncated JPEG: its header still reads
    lines = (d / "train.jsonl").read_text().replace("tr1.png", "tr1.jpg")
    (d / "train.jsonl").write_text(lines)
    with pytest.raises(BackboneError, match=r"VQAv2/train.jsonl:2: image '.*tr1.jpg' cannot be read .*[Tt]runcated"):
        load_backbone_task("VQAv2", str(d / "train.jsonl"), str(d / "test.json"), bb)
    h = data / "HQEdit"
    (h / "target images" / "t2.png").unlink()
    with pytest.raises(BackboneError, match=r"HQEdit/train.jsonl:3: image '.*target images/t2.png' not found"):
        load_backbone_task("HQEdit", str(h / "train.jsonl"), str(h / "test.json"), bb, image_judge=_stub_judge)
