"""transformers.Trainer + MageCallback against the library's own loop on the same batches.

A tiny float64 LLaMA trains a few optimizer steps with gradient accumulation (windows of 2, 2 and
a short last one of 1 micro-batch); the library's loop (README: Fisher -> step -> PEMA) then
replays the very batches the Trainer drew, each window as ONE batch. theta*, theta, every step's
F and the fallback counts must agree -- which they only do when the Fisher is reset per window
(not per micro-batch) and each micro-batch's loss is scaled by 1/window. A DDP run (2 gloo
processes through torchrun, average_tokens_across_devices on) is checked the same way.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F
import transformers

import mage_kernels as mk
from mage_kernels.integrations.transformers import MageCallback, quantized_base, sample_mean_lm_loss

CFG = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=32)
LR = 0.5


def base_model(dtype=torch.float64):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).to(dtype)


def injected(base):
    model = mk.inject(copy.deepcopy(base), r=2, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # B != 0, so that every adapter gets a gradient from the first step
        for _, p in mk.adapter_parameters(model, trainable_only=False):
            p.normal_(0, 0.2, generator=g)
    mk.for_task(model, {"image", "text"}, "text", task="vqa")
    return model


class Sequences(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(1)
        self.items = [torch.randint(0, 50, (int(torch.randint(4, 10, (1,), generator=g)),), generator=g)
                      for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def collate(items):
    """Right-padded ids, labels (-100 on padding) and mask."""
    t = max(len(x) for x in items)
    ids = torch.zeros(len(items), t, dtype=torch.long)
    labels = torch.full((len(items), t), -100)
    mask = torch.zeros(len(items), t, dtype=torch.long)
    for i, x in enumerate(items):
        ids[i, :len(x)], labels[i, :len(x)], mask[i, :len(x)] = x, x, 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class Recorder(transformers.TrainerCallback):
    """Keeps the samples each optimizer step trained on (as the model received them: the dataloader
    prefetches, so the collate order is not the step order) and the step's Fisher (after MageCallback ran)."""

    def __init__(self, model, fisher):
        self.fisher, self.windows, self.current, self.fishers = fisher, [], [], []
        model.register_forward_pre_hook(self._seen, with_kwargs=True)

    def _seen(self, module, args, kwargs):
        if torch.is_grad_enabled():
            ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
            self.current.append([ids[i][mask[i] == 1].clone() for i in range(ids.shape[0])])

    def on_optimizer_step(self, args, state, control, **kw):
        self.windows.append(self.current)
        self.current = []
        if self.fisher is not None:
            self.fishers.append({k: v.clone() for k, v in self.fisher.values().items()})


def train_with_trainer(base, n_items, method="pema", fisher_window="step", ga=2, out_dir=None, **extra_args):
    model = injected(base)
    fisher = mk.Fisher(model, loss_reduction="mean") if method not in ("dema", "fixed") else None
    m = {"pema": lambda: mk.PEMA(model), "dema": lambda: mk.DEMA(model), "fixed": lambda: mk.FixedEMA(model),
         None: lambda: None}[method]()
    cb = MageCallback(fisher, m, fisher_window=fisher_window)
    rec = Recorder(model, fisher if fisher_window == "step" else None)
    args = transformers.TrainingArguments(
        output_dir=out_dir or tempfile.mkdtemp(), use_cpu=True, per_device_train_batch_size=2,
        gradient_accumulation_steps=ga, num_train_epochs=1, learning_rate=LR, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], save_strategy="no", logging_strategy="no",
        seed=0, disable_tqdm=True, **extra_args)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Sequences(n_items), data_collator=collate,
                                   compute_loss_func=cb.compute_loss, callbacks=[cb, rec])
    trainer.train()
    return model, fisher, m, rec


def train_with_library_loop(base, windows, method="pema", fisher_window="step"):
    """README's loop, one batch per optimizer step (the window's micro-batches concatenated)."""
    model = injected(base)
    fisher = mk.Fisher(model, loss_reduction="mean") if method not in ("dema", "fixed") else None
    m = {"pema": lambda: mk.PEMA(model), "dema": lambda: mk.DEMA(model), "fixed": lambda: mk.FixedEMA(model),
         None: lambda: None}[method]()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    fishers = []
    model.train()
    if fisher is not None:
        fisher.reset()
    for window in windows:
        batch = collate([x for micro in window for x in micro])
        if fisher is not None and fisher_window == "step":
            fisher.reset()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mask = batch["attention_mask"][:, 1:].to(logits.dtype)
        tok = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:], reduction="none") * mask
        loss = (tok.sum(1) / mask.sum(1)).mean()  # MEAN over samples of each sample's loss
        loss.backward()
        opt.step()
        if m is not None:
            m.update(fisher)
        if fisher is not None and fisher_window == "step":
            fishers.append({k: v.clone() for k, v in fisher.values().items()})
        opt.zero_grad()
    if m is not None:
        m.finish_task()
    return model, fisher, m, fishers


def assert_same_adapters(a, b, tol=1e-10):
    sa, sb = mk.adapter_state_dict(a), mk.adapter_state_dict(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=tol, atol=tol, msg=k)


def test_sample_mean_lm_loss_is_the_mean_of_per_sample_means():
    logits = torch.randn(3, 5, 7, dtype=torch.float64)
    labels = torch.randint(0, 7, (3, 5))
    labels[0, 3:] = -100
    want = torch.stack([F.cross_entropy(logits[n, :-1][labels[n, 1:] != -100], labels[n, 1:][labels[n, 1:] != -100])
                        for n in range(3)]).mean()
    torch.testing.assert_close(sample_mean_lm_loss(logits, labels), want, rtol=1e-13, atol=0)
    labels[1, 1:] = -100
    with pytest.raises(ValueError, match="sample 1 .* no label token"):
        sample_mean_lm_loss(logits, labels)


def test_trainer_with_gradient_accumulation_matches_the_library_loop():
    base = base_model()
    model, fisher, pema, rec = train_with_trainer(base, n_items=10)
    assert [[len(m) for m in w] for w in rec.windows] == [[2, 2], [2, 2], [2]]  # a short last window
    ref, ref_fisher, ref_pema, ref_fishers = train_with_library_loop(base, rec.windows)
    assert pema.steps == ref_pema.steps == 3
    assert len(rec.fishers) == len(ref_fishers) == 3
    for got, want in zip(rec.fishers, ref_fishers):
        assert got.keys() == want.keys() and len(got) == 14 * 2 * 3
        for k in want:
            assert want[k].abs().max() > 0, k
            torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-18, msg=k)
    for e, re_ in zip(pema.emas, ref_pema.emas):
        torch.testing.assert_close(e, re_, rtol=1e-10, atol=1e-12)
    assert torch.equal(pema.counts, ref_pema.counts)
    assert_same_adapters(model, ref)  # finish_task ran: theta <- theta*
    moved = [(a - b).abs().max() for a, b in zip(mk.adapter_state_dict(model).values(),
                                                 mk.adapter_state_dict(injected(base)).values())]
    assert max(moved) > 1e-4  # training did something
    assert fisher.num_samples == 2  # the last window's samples


def test_trainer_with_dema_with_a_fixed_ema_and_with_an_ewc_fisher_over_the_whole_run():
    base = base_model()
    model, _, dema, rec = train_with_trainer(base, n_items=10, method="dema")
    ref, _, ref_dema, _ = train_with_library_loop(base, rec.windows, method="dema")
    torch.testing.assert_close(dema.last_alphas, ref_dema.last_alphas, rtol=1e-9, atol=0)
    assert_same_adapters(model, ref)
    model, _, fixed, rec = train_with_trainer(base, n_items=10, method="fixed")  # LAE's EMA: no Fisher either
    ref, _, ref_fixed, _ = train_with_library_loop(base, rec.windows, method="fixed")
    assert fixed.steps == ref_fixed.steps == len(rec.windows) > 1
    assert_same_adapters(model, ref)
    _, fisher, _, rec = train_with_trainer(base, n_items=10, method=None, fisher_window="train")
    _, ref_fisher, _, _ = train_with_library_loop(base, rec.windows, method=None, fisher_window="train")
    assert fisher.num_samples == ref_fisher.num_samples == 10
    got, want = fisher.values(), ref_fisher.values()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-18, msg=k)


def test_the_callback_refuses_a_trainer_that_would_make_the_fisher_wrong():
    base = base_model()
    model = injected(base)
    fisher, pema = mk.Fisher(model), mk.PEMA(model)
    cb = MageCallback(fisher, pema)
    args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2, max_steps=1, report_to=[], save_strategy="no",
                                          disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Sequences(8), data_collator=collate,
                                   callbacks=[cb])  # no compute_loss_func: the token-mean default loss
    with pytest.raises(RuntimeError, match="compute_loss_func=callback.compute_loss"):
        trainer.train()
    model = injected(base)
    fisher, pema = mk.Fisher(model), mk.PEMA(model)
    cb = MageCallback(fisher, pema)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Sequences(8), data_collator=collate,
                                   compute_loss_func=cb.compute_loss, callbacks=[cb])
    trainer.loss_is_scaled_for_ga = False  # the Trainer would divide by the window a second time
    before = mk.adapter_state_dict(model)
    with pytest.raises(RuntimeError, match=r"scaled the compute_loss_func loss by 0\.5"):
        trainer.train()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())  # raised before accumulating
    assert all(torch.equal(v, before[k]) for k, v in mk.adapter_state_dict(model).items())
    with pytest.raises(ValueError, match="loss_reduction='mean'"):
        MageCallback(mk.Fisher(injected(base), loss_reduction="sum"))
    with pytest.raises(ValueError, match="PEMA needs"):
        MageCallback(None, mk.PEMA(injected(base)))
    with pytest.raises(ValueError, match="fisher_window"):
        MageCallback(mk.Fisher(injected(base)), fisher_window="epoch")


def test_a_bitsandbytes_quantized_llama_trains_with_trainer():
    import bitsandbytes as bnb  # installed by tests/run.sh (the test extra): this test does not skip

    torch.manual_seed(0)
    cfg = dict(CFG, hidden_size=64, intermediate_size=128)  # bitsandbytes layers need in_features >= 64
    with tempfile.TemporaryDirectory() as d:
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).save_pretrained(d)
        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        model = transformers.LlamaForCausalLM.from_pretrained(d, quantization_config=q, device_map="cpu")
    assert model.is_quantized and isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    mk.inject(model, r=2, alpha=8, dropout=0.0)
    mk.for_task(model, {"text"}, "text")
    packed = {n: p.clone() for n, p in model.named_parameters() if ".base." in n}
    fisher, pema = mk.Fisher(model), mk.PEMA(model)
    cb = MageCallback(fisher, pema, finish_task=False)
    args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, per_device_train_batch_size=2,
                                          max_steps=2, learning_rate=1e-2, report_to=[], save_strategy="no",
                                          disable_tqdm=True)
    kwargs = dict(model=model, args=args, train_dataset=Sequences(4), data_collator=collate,
                  compute_loss_func=cb.compute_loss, callbacks=[cb])
    with pytest.raises(ValueError, match="purely quantized"):
        transformers.Trainer(**kwargs)
    with quantized_base(model):
        trainer = transformers.Trainer(**kwargs)
    assert getattr(model, "_hf_peft_config_loaded") is False  # the marker was only there for the check
    before = mk.adapter_state_dict(model)
    trainer.train()
    assert pema.steps == 2 and fisher.num_samples == 2
    after = mk.adapter_state_dict(model)
    assert max((after[k] - before[k]).abs().max() for k in after if ".lora_B.0" in k) > 0
    assert all(torch.equal(p, packed[n]) for n, p in model.named_parameters() if ".base." in n)  # base untouched
    mk.set_trainable(model, [])
    with pytest.raises(ValueError, match="no trainable MageLinear adapters"):
        with quantized_base(model):
            pass


# ----------------------------------------------------------------------------- DDP (2 gloo processes)


def _ddp_main(out_dir: str) -> None:
    torch.set_num_threads(1)
    _, _, pema, rec = train_with_trainer(base_model(), n_items=16, out_dir=out_dir)
    rank = int(os.environ["RANK"])
    torch.save({"windows": rec.windows, "fishers": rec.fishers, "emas": pema.emas, "counts": pema.counts,
                "names": pema.names}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_trainer_under_ddp_matches_one_process_on_the_global_batches(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__)] + sys.path), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for a, b in zip(r0["emas"], r1["emas"]):
        assert torch.equal(a, b)  # both ranks hold the same theta*
    assert len(r0["windows"]) == len(r1["windows"]) == 2
    windows = [w0 + w1 for w0, w1 in zip(r0["windows"], r1["windows"])]  # the global batch of each step
    assert len({tuple(x.tolist()) for w in windows for m in w for x in m}) == 16  # every sample once
    _, _, ref_pema, ref_fishers = train_with_library_loop(base_model(), windows)
    for got, want in zip(r0["fishers"], ref_fishers):
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-18, msg=k)
    for e, re_ in zip(r0["emas"], ref_pema.emas):
        torch.testing.assert_close(e, re_, rtol=1e-10, atol=1e-12)
    assert torch.equal(r0["counts"], ref_pema.counts)


if __name__ == "__main__":  # the DDP worker, started by torchrun from the test above
    _ddp_main(sys.argv[1])


def test_trainer_with_gradient_checkpointing_matches_the_library_loop():
    """The recomputed forward of a checkpointed block counts no samples (the count is in the backward op)."""
    base = base_model()
    model, fisher, pema, rec = train_with_trainer(base, n_items=8, gradient_checkpointing=True,
                                                  gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.model.gradient_checkpointing
    ref, _, ref_pema, ref_fishers = train_with_library_loop(base, rec.windows)
    assert len(rec.fishers) == len(ref_fishers) == 2
    for got, want in zip(rec.fishers, ref_fishers):
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-18, msg=k)
    assert fisher.num_samples == 4
    for e, re_ in zip(pema.emas, ref_pema.emas):
        torch.testing.assert_close(e, re_, rtol=1e-10, atol=1e-12)
    assert_same_adapters(model, ref)
