"""``mk.Fisher`` under ``torch.compile(fullgraph=True)``: no graph breaks, and the same F as eager.

The model is a tiny transformers LLaMA with MageLinear injected into its seven projections
(the shape of real use). Graph breaks are counted with ``torch._dynamo.explain``; the compiled
training steps (``aot_eager`` and ``inductor``) must give the eager run's F, sample count and
adapter gradients.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import mage_kernels as mk

VOCAB, N, T = 64, 3, 6


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = mk.inject(transformers.LlamaForCausalLM(cfg), target_modules=mk.LLAMA_TARGETS, r=2, dropout=0.0)
    for layer in mk.mage_layers(model):
        layer = layer[1]
        for b in layer.lora_B:  # B = 0 at init would make every A-gradient zero
            torch.nn.init.normal_(b, std=0.1)
    mk.for_task(model, {"image", "text"}, "text")  # adapters 0, 1, 2 train; 3 frozen
    return model.eval()  # eval: no dropout anywhere; the Fisher still runs (grad is enabled)


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _step(model, fisher, ids, step_fn):
    model.zero_grad(set_to_none=True)
    fisher.reset()
    step_fn(ids).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return fisher.num_samples, {k: v.clone() for k, v in fisher.values().items()}, grads


def test_explain_finds_no_graph_break_with_a_fisher_attached():
    model = _model()
    fisher = mk.Fisher(model, loss_reduction="mean")
    ids = torch.randint(0, VOCAB, (N, T))
    torch._dynamo.reset()
    with mk.use_backend("torch"):
        report = torch._dynamo.explain(lambda i: _loss(model, i))(ids)
    assert report.graph_break_count == 0, report.break_reasons
    assert report.graph_count == 1
    fisher.remove()


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compiled_training_step_gives_the_eager_fisher(compile_backend):
    model = _model()
    fisher = mk.Fisher(model, loss_reduction="mean")
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB, (N, T), generator=g) for _ in range(2)]
    torch._dynamo.reset()
    with mk.use_backend("torch"):
        eager = [_step(model, fisher, ids, lambda i: _loss(model, i)) for ids in batches]
        compiled_loss = torch.compile(lambda i: _loss(model, i), backend=compile_backend, fullgraph=True)
        compiled = [_step(model, fisher, ids, compiled_loss) for ids in batches]
    for (n_e, f_e, g_e), (n_c, f_c, g_c) in zip(eager, compiled):
        assert n_e == n_c == N
        assert sorted(f_e) == sorted(f_c) and len(f_e) == 2 * 3 * 7 * 2  # 2 layers, 3 adapters, 7 targets, A+B
        for name in f_e:
            assert f_e[name].abs().max() > 0, name
            torch.testing.assert_close(f_c[name], f_e[name], rtol=1e-4, atol=1e-9)
        assert sorted(g_e) == sorted(g_c)
        for name in g_e:
            torch.testing.assert_close(g_c[name], g_e[name], rtol=1e-4, atol=1e-7)
    # the two batches differ, so a compiled step that replayed the first F would fail above
    assert any(not torch.allclose(eager[0][1][k], eager[1][1][k]) for k in eager[0][1])
    # accumulation over two compiled backwards without reset: counts and sums add up
    fisher.reset()
    with mk.use_backend("torch"):
        for ids in batches:
            compiled_loss(ids).backward()
    assert fisher.num_samples == 2 * N
    for name, v in fisher.values().items():
        torch.testing.assert_close(v, (eager[0][1][name] + eager[1][1][name]) / 2, rtol=1e-4, atol=1e-9)


def test_token_weights_under_compile_match_eager():
    model = _model()
    fisher = mk.Fisher(model, loss_reduction="mean")
    ids = torch.randint(0, VOCAB, (N, T))
    mask = torch.ones(N, T)
    mask[0, -2:] = 0  # two padded tokens: they must add nothing to F
    torch._dynamo.reset()
    with mk.use_backend("torch"):
        with fisher.token_weight(mask):
            report = torch._dynamo.explain(lambda i: _loss(model, i))(ids)
        assert report.graph_break_count == 0, report.break_reasons
        fisher.reset()
        _loss(model, ids).backward()
        unweighted = {k: v.clone() for k, v in fisher.values().items()}
        model.zero_grad(set_to_none=True)
        fisher.reset()
        with fisher.token_weight(mask):
            _loss(model, ids).backward()
        eager = {k: v.clone() for k, v in fisher.values().items()}
        model.zero_grad(set_to_none=True)
        fisher.reset()
        compiled = torch.compile(lambda i: _loss(model, i), backend="aot_eager", fullgraph=True)
        with fisher.token_weight(mask):
            compiled(ids).backward()
    assert fisher.num_samples == N
    assert any(not torch.allclose(eager[k], unweighted[k]) for k in eager)  # the weights matter
    for name, v in fisher.values().items():
        torch.testing.assert_close(v, eager[name], rtol=1e-4, atol=1e-9)
