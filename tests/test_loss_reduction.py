"""The training loss's three reductions: the mean of per-sample means, ``multitask-tokens``' token mean and
``multitask-sqrt``'s per-sample means weighted by the square root of their target tokens."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cl_fakes import tiny_model, toy_tasks
from mage_cl.methods import METHODS, make_method
from mage_cl.methods.base import MethodConfig, batch_loss, loss_weight_total, target_tokens
from mage_cl.trainer import TrainConfig, micro_batches, train_task


class _Logits(nn.Module):
    """A stand-in model whose forward returns fixed logits."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, **kw):
        return SimpleNamespace(logits=self.logits)


def _batch(seed=0, n=4, t=9, vocab=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, t, vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (n, t), generator=g)
    lengths = [1, 3, 6, 8][:n]  # targets of very different lengths, at the end of each row
    for i, k in enumerate(lengths):
        labels[i, : t - k] = -100
    return logits, {"input_ids": labels.clamp_min(0), "labels": labels}, lengths


def _token_losses(logits, labels):
    """Per-sample lists of the target tokens' cross-entropies, written out with log-softmax."""
    out = []
    for i in range(labels.shape[0]):
        row = []
        for j in range(1, labels.shape[1]):  # position j - 1 predicts token j
            if labels[i, j] != -100:
                row.append(float(-torch.log_softmax(logits[i, j - 1].double(), -1)[labels[i, j]]))
        out.append(row)
    return out


def test_the_reductions_against_losses_written_out_per_token():
    logits, batch, lengths = _batch()
    per = _token_losses(logits, batch["labels"])
    assert [len(r) for r in per] == lengths
    sample = sum(sum(r) / len(r) for r in per) / len(per)
    token = sum(sum(r) for r in per) / sum(lengths)
    model = _Logits(logits)
    assert float(batch_loss(model, batch)) == pytest.approx(sample, rel=1e-6)
    assert float(batch_loss(model, batch, "token")) == pytest.approx(token, rel=1e-6)
    assert token != pytest.approx(sample, rel=1e-3)  # the lengths differ, so the reductions do
    roots = [len(r) ** 0.5 for r in per]
    sqrt = sum(w * sum(r) / len(r) for w, r in zip(roots, per)) / sum(roots)
    assert float(batch_loss(model, batch, "sqrt")) == pytest.approx(sqrt, rel=1e-6)
    assert min(abs(sqrt - sample), abs(sqrt - token)) > 1e-3 * sample  # a third reduction, not one of the two
    # the divisor of a micro-batch that is part of a larger batch
    assert float(batch_loss(model, batch, "token", divisor=50)) == pytest.approx(sum(map(sum, per)) / 50,
                                                                                rel=1e-6)
    assert float(batch_loss(model, batch, "sqrt", divisor=7.5)) == pytest.approx(
        sum(w * sum(r) / len(r) for w, r in zip(roots, per)) / 7.5, rel=1e-6)
    assert target_tokens(batch) == sum(lengths)
    assert loss_weight_total(batch, "token") == sum(lengths)
    assert loss_weight_total(batch, "sqrt") == pytest.approx(sum(roots), rel=1e-12)
    with pytest.raises(ValueError, match="loss reduction 'sample' has no total weight"):
        loss_weight_total(batch, "sample")
    with pytest.raises(ValueError, match="unknown loss reduction 'mean'; choose from sample, token, sqrt"):
        batch_loss(model, batch, "mean")


def test_the_weighted_upper_bounds_are_the_upper_bound_with_another_reduction():
    mt, mtt, mts = METHODS["multitask"], METHODS["multitask-tokens"], METHODS["multitask-sqrt"]
    assert all(m.joint and m.trains and not m.needs_fisher for m in (mtt, mts))
    assert (mt.loss_reduction, mtt.loss_reduction, mts.loss_reduction) == ("sample", "token", "sqrt")
    assert all(cls.loss_reduction == "sample" for name, cls in METHODS.items()
               if name not in ("multitask-tokens", "multitask-sqrt"))


def _set_up(method_name):
    """A tiny model with ``method_name`` set up for one step on a batch mixing text and image answers."""
    v, model = tiny_model(seed=3)
    tasks = toy_tasks(n_train=8, seed=1)
    exs = [e for t in tasks.values() for e in t.train[:3]]  # text and image answers in one batch
    torch.manual_seed(0)
    m = make_method(method_name, MethodConfig(r_total=8, dropout=0.0))
    m.setup(model)
    m.before_task(next(iter(tasks.values())), 0)
    for p in m.trainable_parameters():  # B != 0, so that every adapter tensor gets a gradient
        p.data.normal_(0, 0.3)
    return v, model, m, exs


def _one_step_grads(method_name, max_batch_tokens, tiny_backbone=False):
    """One step's adapter gradients and loss; ``tiny_backbone``: through ``TinyBackbone.loss`` (what the runner
    uses) instead of ``batch_loss`` directly."""
    from mage_cl.backbones.tiny import TinyBackbone

    v, model, m, exs = _set_up(method_name)
    seen = []
    orig = m.after_backward

    def grab():
        seen.append({id(p): p.grad.clone() for p in m.trainable_parameters() if p.grad is not None})
        orig()

    m.after_backward = grab
    cfg = TrainConfig(steps_per_task=1, batch_size=len(exs), lr=1e-3, warmup_steps=1,
                      max_batch_tokens=max_batch_tokens)
    stats = train_task(model, m, exs, cfg, v.pad_id, seed=0, backbone=TinyBackbone(v) if tiny_backbone else None)
    return exs, stats["loss"], seen[0]


@pytest.mark.parametrize("tiny_backbone", [False, True])
@pytest.mark.parametrize("method", ["multitask", "multitask-tokens", "multitask-sqrt"])
def test_micro_batches_give_the_whole_batch_step_under_each_reduction(method, tiny_backbone):
    exs, loss0, g0 = _one_step_grads(method, None, tiny_backbone)
    budget = max(len(e.prompt) + len(e.target) for e in exs) + 2
    assert len(micro_batches(exs, budget)) > 2
    _, loss1, g1 = _one_step_grads(method, budget, tiny_backbone)
    assert loss1 == pytest.approx(loss0, rel=1e-5)
    assert g0 and len(g0) == len(g1)
    for a, b in zip(g0.values(), g1.values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("tiny_backbone", [False, True])
@pytest.mark.parametrize("other", ["multitask-tokens", "multitask-sqrt"])
def test_a_weighted_mean_trains_differently_from_the_sample_mean(other, tiny_backbone):
    """The token and sqrt means are not the sample mean under another name: same batch, other gradient (also
    through the backbone, so a backbone that dropped the reduction would fail here)."""
    _, loss_s, gs = _one_step_grads("multitask", None, tiny_backbone)
    _, loss_t, gt = _one_step_grads(other, None, tiny_backbone)
    assert loss_s != pytest.approx(loss_t, rel=1e-4)  # float32 losses of the same batch agree to ~1e-7
    diff = max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(gs.values(), gt.values()))
    assert diff > 1e-2


def test_the_sqrt_mean_s_step_is_the_written_out_weighted_gradient():
    """One step of ``multitask-sqrt``: the trainer's gradient equals autograd of sum_n sqrt(T_n) loss_n /
    sum_n sqrt(T_n) computed here per sample (float64 on the adapters)."""
    from mage_cl.trainer import collate

    _, loss, g = _one_step_grads("multitask-sqrt", None)
    v, model, m, exs = _set_up("multitask-sqrt")
    params = m.trainable_parameters()
    singles = [collate([e], v.pad_id, torch.device("cpu")) for e in exs]
    lengths = [target_tokens(b) for b in singles]
    assert len(set(lengths)) > 1  # answers of several lengths, so the weights matter
    total, weights = 0.0, 0.0
    for b, n in zip(singles, lengths):
        w = n ** 0.5
        total = total + w * batch_loss(model, b)
        weights += w
    ref = torch.autograd.grad(total / weights, params)
    assert float((total / weights).detach()) == pytest.approx(loss, rel=1e-5)
    assert len(g) == len(ref)  # the trainer's gradients, in the order of trainable_parameters()
    for got, r in zip(g.values(), ref):
        torch.testing.assert_close(got, r, rtol=1e-4, atol=1e-7)


def test_under_data_parallel_the_divisor_is_the_global_batch_s_weight_per_rank(monkeypatch):
    """Two ranks with 10 and 30 target tokens: each divides its token sum by 40 / 2 = 20, so the engines' mean of
    the two ranks' gradients is the gradient of (sum of all token losses) / 40."""
    from mage_cl import distributed, trainer

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda t: t.add_(30.0))  # the other rank's 30 tokens
    assert trainer._weight_per_rank(10.0) == 20.0


def test_a_fisher_method_cannot_use_the_token_mean():
    v, model = tiny_model()
    tasks = toy_tasks(n_train=4)
    m = make_method("mage", MethodConfig(r_total=8, dropout=0.0))
    m.setup(model)
    m.before_task(next(iter(tasks.values())), 0)
    m.loss_reduction = "token"
    with pytest.raises(ValueError, match="per-sample Fisher needs loss_reduction 'sample', not 'token'"):
        train_task(model, m, next(iter(tasks.values())).train, TrainConfig(steps_per_task=1, batch_size=2),
                   v.pad_id, seed=0)
