"""The continual-learning methods: registry, equal rank, and each method's rule checked by hand."""

from __future__ import annotations

import pytest
import torch

import mage_kernels as mk
from mage_cl.engines import Engine
from mage_cl.methods import METHODS, MoELoRALinear, make_method
from mage_cl.methods.base import batch_loss
from mage_cl.trainer import TrainConfig, collate, train_task

from cl_fakes import adapter_rank, batches, tiny_model, toy_tasks

PAPER_METHODS = ["zero-shot", "lora", "moelora", "ewc", "lae", "pgp", "cia", "reglora", "ew", "ew-ga", "mage",
                 "mage-dema", "mage-authors", "multitask", "multitask-tokens", "multitask-sqrt"]


def _setup(name, **kw):
    v, model = tiny_model()
    m = make_method(name, **kw)
    m.setup(model)
    return v, model, m


def _step(model, method, batch, lr=0.05):
    """One plain SGD step through the method's hooks (no Fisher)."""
    params = method.trainable_parameters()
    loss = batch_loss(model, batch)
    extra = method.loss_extra(model)
    (loss if extra is None else loss + extra).backward()
    method.after_backward()
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad


def test_registry_names_and_unknown_method():
    assert list(METHODS) == PAPER_METHODS
    with pytest.raises(ValueError, match="unknown method 'nope'.*mage"):
        make_method("nope")


@pytest.mark.parametrize("name", PAPER_METHODS)
def test_every_method_has_total_rank_32_and_the_same_adapter_size(name):
    _, model, m = _setup(name)
    ranks = adapter_rank(model)
    assert ranks and set(ranks.values()) == {32}
    n_adapter = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    _, ref, _ = _setup("lora")
    assert n_adapter == sum(p.numel() for n, p in ref.named_parameters() if ".lora_" in n)


def test_ew_ga_and_mage_train_only_the_task_modality_adapters():
    tasks = toy_tasks()
    for name, want_echo, want_draw in (("ew", [0, 1, 2, 3], [0, 1, 2, 3]), ("ew-ga", [0, 2], [0, 3]),
                                       ("mage", [0, 2], [0, 3])):
        _, model, m = _setup(name)
        m.before_task(tasks["echo"], 0)
        assert all(l.trainable_adapters() == want_echo for _, l in mk.mage_layers(model)), name
        m.before_task(tasks["draw"], 1)
        assert all(l.trainable_adapters() == want_draw for _, l in mk.mage_layers(model)), name


def test_moelora_layer_matches_the_gated_sum():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 7)
    layer = MoELoRALinear(12, 7, r=3, alpha=6, dropout=0.0, base=base, num_adapters=4)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
        layer.router.normal_()
    x = torch.randn(2, 5, 12)
    y = layer(x)
    g = torch.softmax(x @ layer.router.t(), -1)
    want = base(x)
    for k in range(4):
        want = want + layer.scaling * g[..., k: k + 1] * (x @ layer.lora_A[k].t() @ layer.lora_B[k].t())
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert layer.router.grad is not None and layer.router.grad.abs().sum() > 0


def test_moelora_injection_keeps_the_adapters_and_trains_the_router():
    _, model, m = _setup("moelora")
    layers = list(mk.mage_layers(model))
    assert layers and all(isinstance(l, MoELoRALinear) for _, l in layers)
    m.before_task(toy_tasks()["echo"], 0)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("router") for n in names) and any(".lora_A." in n for n in names)


@pytest.mark.parametrize("name", ["moelora", "lae", "mage"])
def test_the_engine_prepares_the_model_after_every_trained_parameter_exists(name):
    """The FSDP2 engine shards the model in ``prepare``: MoELoRA's routers must exist by then (or they
    would stay unsharded), and LAE's / MAGE's EMA must be built after it (on the shards)."""
    _, model = tiny_model()
    m = make_method(name)
    seen = {}

    def prepare(mdl):
        seen["layers"] = [type(layer).__name__ for _, layer in mk.mage_layers(mdl)]
        seen["routers"] = sum(n.endswith(".router") for n, _ in mdl.named_parameters())
        seen["ema_built"] = getattr(m, "ema", None) is not None or getattr(m, "pema", None) is not None

    m.setup(model, prepare)
    assert seen["layers"] and not seen["ema_built"]
    if name == "moelora":
        assert set(seen["layers"]) == {"MoELoRALinear"} and seen["routers"] == len(seen["layers"])


def test_lae_keeps_a_fixed_rate_ema_and_ends_on_it():
    v, model, m = _setup("lae")
    task = toy_tasks()["echo"]
    m.before_task(task, 0)
    start = {n: p.detach().clone() for n, p in m.named_trainable()}
    batch = collate(task.train[:4], v.pad_id, torch.device("cpu"))
    _step(model, m, batch)
    m.after_step(None)
    now = {n: p.detach().clone() for n, p in m.named_trainable()}
    moved = [n for n in now if not torch.equal(now[n], start[n])]
    assert moved, "the step changed nothing"
    assert sorted(m.ema.names) == sorted(now)  # the EMA tracks exactly the trainable adapters
    ema = {n: t.clone() for n, t in zip(m.ema.names, m.ema.emas)}
    for n in now:  # float64 reference of one step from theta* = theta_start
        want = 0.99 * start[n].double() + 0.01 * now[n].double()
        torch.testing.assert_close(ema[n].double(), want, rtol=1e-6, atol=1e-9)
    assert m.state_bytes() == sum(p.numel() * 4 for _, p in m.named_trainable())
    m.after_task(task, batches(task, v.pad_id))
    for n, p in m.named_trainable():
        assert torch.equal(p.detach(), ema[n])


def test_ewc_fisher_is_the_mean_per_sample_squared_gradient():
    v, model, m = _setup("ewc", lam=2.0)
    m.config.dropout = 0.0
    task = toy_tasks(n_train=6)["echo"]
    m.before_task(task, 0)
    # perturb B so the gradients are not degenerate
    with torch.no_grad():
        for n, p in m.named_trainable():
            p.add_(0.05 * torch.randn_like(p))
    m.after_task(task, batches(task, v.pad_id, bs=3))
    # brute force: one sample at a time
    model.eval()
    params = dict(m.named_trainable())
    sq = {n: torch.zeros_like(p) for n, p in params.items()}
    for ex in task.train:
        model.zero_grad(set_to_none=True)
        batch_loss(model, collate([ex], v.pad_id, torch.device("cpu"))).backward()
        for n, p in params.items():
            sq[n] += p.grad.double().float() ** 2
    model.zero_grad(set_to_none=True)
    ref = {n: s / len(task.train) for n, s in sq.items()}
    mean = torch.stack([r.mean() for r in ref.values()]).mean()
    assert set(m.fisher) == set(ref)
    for n in ref:
        torch.testing.assert_close(m.fisher[n], ref[n] / mean, rtol=2e-3, atol=1e-6)
    # the penalty: zero at the anchor, the quadratic form elsewhere
    assert m.loss_extra(model).item() == 0.0
    with torch.no_grad():
        delta = {n: 0.01 * torch.randn_like(p) for n, p in params.items()}
        for n, p in params.items():
            p.add_(delta[n])
    want = 0.5 * 2.0 * sum((m.fisher[n] * delta[n] ** 2).sum() for n in params)
    torch.testing.assert_close(m.loss_extra(model), want, rtol=1e-4, atol=0)


def test_pgp_projects_adapter_gradients_off_the_old_input_subspace():
    v, model, m = _setup("pgp", threshold=0.9)
    tasks = toy_tasks()
    m.before_task(tasks["echo"], 0)
    m.after_task(tasks["echo"], batches(tasks["echo"], v.pad_id))
    assert m.basis
    for name, u in m.basis.items():
        k = u.shape[1]
        assert 0 < k <= max(u.shape[0] - m.r, u.shape[0] // 2)
        torch.testing.assert_close(u.t() @ u, torch.eye(k), atol=1e-5, rtol=0)
    m.before_task(tasks["draw"], 1)
    with torch.no_grad():  # B = 0 at init would give A no gradient
        for _, l in mk.mage_layers(model):
            l.lora_B[0].normal_(0, 0.1)
    batch = collate(tasks["draw"].train[:4], v.pad_id, torch.device("cpu"))
    model.zero_grad(set_to_none=True)
    batch_loss(model, batch).backward()
    raw = {n: l.lora_A[0].grad.clone() for n, l in mk.mage_layers(model)}
    m.after_backward()
    for n, l in mk.mage_layers(model):
        u = m.basis[n]
        g = l.lora_A[0].grad
        assert (raw[n] @ u).abs().max() > 1e-6  # there was something to remove
        assert (g @ u).abs().max() < 1e-5 * max(1.0, raw[n].abs().max().item())
        torch.testing.assert_close(g + raw[n] @ u @ u.t() - raw[n], torch.zeros_like(g), atol=1e-6, rtol=0)
    state = m.state_dict()
    m2 = make_method("pgp")
    m2.setup(tiny_model()[1])
    m2.load_state_dict(state)
    assert all(torch.equal(m2.basis[n], m.basis[n]) for n in m.basis)


def test_reglora_masks_the_largest_update_elements_and_penalizes_their_change():
    v, model, m = _setup("reglora", lam=10.0, top_fraction=0.05)
    task = toy_tasks()["echo"]
    m.before_task(task, 0)
    with torch.no_grad():
        for n, p in m.named_trainable():
            p.add_(0.1 * torch.randn_like(p))
    m.after_task(task, batches(task, v.pad_id))
    for name, layer in mk.mage_layers(model):
        mask, dw = m.mask[name], layer.delta_weight().detach()
        k = max(1, round(0.05 * dw.numel()))
        assert int(mask.sum()) == k
        assert dw.abs()[mask].min() >= dw.abs()[~mask].max()
    assert m.loss_extra(model).item() == 0.0
    with torch.no_grad():
        for _, layer in mk.mage_layers(model):
            layer.lora_B[0].mul_(1.5)
    want = sum(10.0 * ((l.delta_weight() - m.ref[n])[m.mask[n]] ** 2).sum() for n, l in mk.mage_layers(model))
    got = m.loss_extra(model)
    assert got.item() > 0
    torch.testing.assert_close(got, want)


def test_mage_state_is_theta_star_and_cia_state_is_theta_star_plus_g_prev():
    tasks = toy_tasks()
    v, model, mage = _setup("mage")
    _, model2, cia = _setup("cia")
    mage.before_task(tasks["echo"], 0)
    cia.before_task(tasks["echo"], 0)
    trained_mage = sum(p.numel() * p.element_size() for _, p in mage.named_trainable())
    trained_cia = sum(p.numel() * p.element_size() for _, p in cia.named_trainable())
    assert mage.state_bytes() == trained_mage
    assert cia.state_bytes() == 2 * trained_cia
    assert mage.state_bytes() < cia.state_bytes()


def test_mage_variants_state_dema_keeps_two_buffers_authors_one():
    tasks = toy_tasks()
    _, _, dema = _setup("mage-dema")
    _, _, authors = _setup("mage-authors")
    for m in (dema, authors):
        m.before_task(tasks["draw"], 0)
        assert all(l.trainable_adapters() == [0, 3] for _, l in mk.mage_layers(m.model))  # EW+GA's freezing
    assert authors.state_bytes() == 0  # its theta* is made when the task's steps are bound (the engine is known)
    authors.bind_steps(Engine().begin_task(authors.model, authors.trainable_parameters(), TrainConfig()))
    trained = sum(p.numel() * p.element_size() for _, p in dema.named_trainable())
    assert dema.state_bytes() == 2 * trained
    assert authors.state_bytes() == sum(p.numel() * p.element_size() for _, p in authors.named_trainable())


def test_mage_authors_runs_before_the_optimizer_step_and_reports_its_alphas():
    v, model, m = _setup("mage-authors")
    task = toy_tasks()["echo"]
    m.before_task(task, 0)
    cfg = TrainConfig(steps_per_task=3, batch_size=4, lr=1e-2)
    train_task(model, m, task.train, cfg, v.pad_id, seed=0)
    assert m.pema.steps == 3
    d = m.diagnostics()
    n = 3 * sum(p.numel() for p in m.pema.params)
    assert d["authors_elements"] == n
    assert 0.0 <= d["authors_alpha_outside_fraction"] <= 1.0
    assert d["authors_outside"] + d["authors_nonfinite_alpha"] <= n


def test_mage_records_how_pemas_beta_behaved():
    v, model, m = _setup("mage")
    task = toy_tasks()["echo"]
    m.before_task(task, 0)
    cfg = TrainConfig(steps_per_task=3, batch_size=4, lr=1e-2)
    train_task(model, m, task.train, cfg, v.pad_id, seed=0)
    d = m.diagnostics()
    n = 3 * sum(p.numel() for p in m.pema.params)
    assert sum(d["pema_hist_abs_F_dtheta"]) == n and sum(d["pema_hist_abs_g_plus_1"]) == n
    # the tracker's in-range share and the kernel's exact fallback counter describe the same elements
    assert abs(d["pema_beta_inside_fraction"] + d["pema_fallback_fraction"] - 1.0) < 1e-3
    q = d["pema_abs_F_dtheta_quantiles"]
    assert q["0.0"] <= q["0.5"] <= q["0.9"] <= q["0.99"] <= q["1.0"]
    assert len(d["pema_hist_abs_F_dtheta"]) == len(d["pema_log10_edges"]) + 1


def test_mage_training_ends_on_the_pema_average():
    v, model, m = _setup("mage")
    task = toy_tasks()["echo"]
    m.before_task(task, 0)
    cfg = TrainConfig(steps_per_task=3, batch_size=4, lr=1e-2)
    train_task(model, m, task.train, cfg, v.pad_id, seed=0)
    ema = [e.clone() for e in m.pema.emas]
    live = [p.detach().clone() for p in m.pema.params]
    assert any(not torch.equal(a, b) for a, b in zip(ema, live))
    assert m.pema.steps == 3
    m.after_task(task, batches(task, v.pad_id))
    for p, e in zip(m.pema.params, ema):
        assert torch.equal(p.detach(), e)


@pytest.mark.parametrize("name", ["ewc", "reglora"])
def test_state_dict_round_trip(name):
    v, model, m = _setup(name)
    task = toy_tasks()["echo"]
    m.before_task(task, 0)
    with torch.no_grad():
        for _, p in m.named_trainable():
            p.add_(0.05 * torch.randn_like(p))
    m.after_task(task, batches(task, v.pad_id))
    state = m.state_dict()
    _, model2, m2 = _setup(name)
    m2.load_state_dict(state)
    for key, val in state.items():
        for k, t in val.items():
            assert torch.equal(getattr(m2, key)[k], t)
