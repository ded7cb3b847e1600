"""``mage_kernels.Fisher`` (ALGORITHM.md §2) against per-sample gradients from torch.func.

The reference is ``torch.func.vmap(torch.func.grad(sample_loss))`` in float64
over a functional copy of the model built from ``reference.lora_linear``; the
Fisher is ``mean_n g_n^2`` over every sample of every micro-batch since reset.

Padding: the models here are per-token (tokens do not interact), and the loss
the TRAINING step backpropagates includes the padded tokens (they carry a
nonzero loss). With ``token_weight(w)``, each token's contribution to its
sample's gradient is weighted by ``w`` before squaring, so the Fisher must equal
the per-sample Fisher of the *weighted* loss ``sum_t w_nt * loss_nt`` -- and
differ from the Fisher of the unweighted loss (checked, so a kernel that ignored
the weights would fail). The batch gradient of the same backward is that of the
unweighted training loss (autograd of ``reference.lora_linear``).

The comparisons against the reference run on the ``device`` fixture
(tests/conftest.py): Triton's interpreter on CPU, or the compiled kernels on CUDA
(where backend ``"auto"`` is Triton too); the float64 references run there as well.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
import torch
from torch import nn
from torch.func import grad, vmap

import mage_kernels as mk
from mage_kernels import reference

from gloo import init_gloo

BACKENDS = ["torch", "triton"]
REL = 2e-5  # float32 layer vs float64 reference (relative to the largest entry)


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, rel: float = REL, what: str = "") -> None:
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    scale = ref.abs().max().item()
    assert scale > 0, f"{what}: the reference is all zeros, the comparison would prove nothing"
    err = (out.double() - ref).abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3g} vs reference scale {scale:.3g}"


def randomize(model: nn.Module) -> None:
    """Nonzero B (the default init is B = 0, which would make dA and its Fisher zero)."""
    with torch.no_grad():
        for _, layer in mk.mage_layers(model):
            for b in layer.lora_B:
                b.normal_(0.0, 0.5)
            for a in layer.lora_A:
                a.normal_(0.0, 0.5)


# ----------------------------------------------------------------------------- functional float64 model


def layer_fn(layer: mk.MageLinear, prefix: str):
    """float64 function (trainable params dict, x) -> y for one MageLinear, via reference.lora_linear."""
    W = layer.base.weight.detach().double()
    b = None if layer.base.bias is None else layer.base.bias.detach().double()
    consts_a = [a.detach().double() for a in layer.lora_A]
    consts_b = [bb.detach().double() for bb in layer.lora_B]

    def f(tp: Dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        A = torch.cat([tp.get(f"{prefix}lora_A.{k}", consts_a[k]) for k in range(layer.num_adapters)], 0)
        B = torch.cat([tp.get(f"{prefix}lora_B.{k}", consts_b[k]) for k in range(layer.num_adapters)], 1)
        return reference.lora_linear(x, W, b, A, B, layer.scaling)

    return f


class TwoLayer(nn.Module):
    """Per-token MLP: up -> tanh -> down, both injected with MageLinear."""

    def __init__(self, d_in=6, hidden=9, d_out=5):
        super().__init__()
        self.up = nn.Linear(d_in, hidden)
        self.down = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def model_fn(model: nn.Module):
    """float64 functional twin of a MageLinear or of TwoLayer."""
    if isinstance(model, mk.MageLinear):
        return layer_fn(model, "")
    up, down = layer_fn(model.up, "up."), layer_fn(model.down, "down.")
    return lambda tp, x: down(tp, torch.tanh(up(tp, x)))


def token_losses(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token loss (nonlinear in y, so dY depends on the activations)."""
    return ((y - target) ** 2).sum(-1) + 0.3 * torch.sin(y).sum(-1)


def trainable(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: p.detach().double() for n, p in model.named_parameters() if p.requires_grad}


def reference_per_sample(model, batches) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(per-sample grads of the WEIGHTED loss over all micro-batches, the same for the UNWEIGHTED loss)."""
    f = model_fn(model)
    tp = trainable(model)

    def sample_loss(tp, x, target, w):
        return (w * token_losses(f(tp, x), target)).sum()

    weighted: Dict[str, List[torch.Tensor]] = {k: [] for k in tp}
    plain: Dict[str, List[torch.Tensor]] = {k: [] for k in tp}
    for x, target, w in batches:
        gw = vmap(grad(sample_loss), in_dims=(None, 0, 0, 0))(tp, x.double(), target.double(), w.double())
        gp = vmap(grad(sample_loss), in_dims=(None, 0, 0, 0))(tp, x.double(), target.double(), torch.ones_like(w).double())
        for k in tp:
            weighted[k].append(gw[k])
            plain[k].append(gp[k])
    return ({k: torch.cat(v) for k, v in weighted.items()}, {k: torch.cat(v) for k, v in plain.items()})


def reference_batch_grad(model, batches, reduction: str) -> Dict[str, torch.Tensor]:
    """Autograd (float64) of the unweighted training loss, summed over micro-batches."""
    f = model_fn(model)
    tp = {k: v.clone().requires_grad_(True) for k, v in trainable(model).items()}
    total = 0
    for x, target, _ in batches:
        per = token_losses(f(tp, x.double()), target.double()).sum(-1)
        total = total + (per.mean() if reduction == "mean" else per.sum())
    total.backward()
    return {k: v.grad for k, v in tp.items()}


def make_batches(sizes, T, d_in, d_out, device: torch.device, padding=True):
    batches = []
    for n in sizes:
        x = torch.randn(n, T, d_in, device=device)
        target = torch.randn(n, T, d_out, device=device)
        if padding:
            # ragged lengths (>= 1 real token) plus fractional weights on real tokens
            lengths = torch.randint(1, T + 1, (n,), device=device)
            mask = (torch.arange(T, device=device)[None, :] < lengths[:, None]).float()
            w = mask * (0.25 + 0.75 * torch.rand(n, T, device=device))
            w[0] = mask[0]  # one sample with a plain 0/1 mask
        else:
            w = torch.ones(n, T, device=device)
        batches.append((x, target, w))
    return batches


def run_training_backward(model, fisher, batches, reduction, use_weights=True):
    for x, target, w in batches:
        with fisher.token_weight(w) if use_weights else _null():
            y = model(x)
        per = token_losses(y, target).sum(-1)
        (per.mean() if reduction == "mean" else per.sum()).backward()


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_single_layer_matches_vmap_grad(backend, reduction, device):
    layer = mk.MageLinear(7, 5, r=3, dropout=0.0, device=device)
    randomize(layer)
    layer.set_trainable([0, 2])  # adapters 1 and 3 frozen
    fisher = mk.Fisher(layer, loss_reduction=reduction)
    batches = make_batches([3, 2], T=4, d_in=7, d_out=5, device=device)  # two micro-batches, N = 3 then 2
    with mk.use_backend(backend):
        run_training_backward(layer, fisher, batches, reduction)
    weighted, plain = reference_per_sample(layer, batches)
    assert fisher.num_samples == 5
    values = fisher.values()
    assert sorted(values) == sorted(n for n, p in layer.named_parameters() if p.requires_grad)
    for name, per in weighted.items():
        F_ref = per.pow(2).mean(0)
        assert_close_rel(values[name], F_ref, what=name)
        # the weights matter: the unweighted per-sample Fisher is far from it
        F_plain = plain[name].pow(2).mean(0)
        assert (F_plain - F_ref).abs().max() > 100 * REL * F_ref.abs().max(), name
        # the Fisher is not the squared batch gradient
        assert values[name].shape == dict(layer.named_parameters())[name].shape
    # frozen adapters: nothing accumulated
    r = layer.r
    for k in (1, 3):
        assert torch.count_nonzero(layer.fisher_a[k * r:(k + 1) * r]) == 0
        assert torch.count_nonzero(layer.fisher_b[:, k * r:(k + 1) * r]) == 0
        assert layer.lora_A[k].grad is None and layer.lora_B[k].grad is None
    # the batch gradient of the same backward = autograd of reference.lora_linear
    ref_grads = reference_batch_grad(layer, batches, reduction)
    params = dict(layer.named_parameters())
    for name, g in ref_grads.items():
        assert_close_rel(params[name].grad, g, what=f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_layer_model_counts_samples_once_and_names_match(backend, device):
    model = mk.inject(TwoLayer().to(device), ["up", "down"], r=2, dropout=0.0)
    randomize(model)
    mk.set_trainable(model, [1, 3])
    fisher = mk.Fisher(model, loss_reduction="mean")
    batches = make_batches([4, 3], T=5, d_in=6, d_out=5, device=device)
    with mk.use_backend(backend):
        run_training_backward(model, fisher, batches, "mean")
    assert fisher.num_samples == 7  # once per model forward, not once per layer
    weighted, _ = reference_per_sample(model, batches)
    values = fisher.values()
    assert sorted(values) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert len(values) == 8
    params = dict(model.named_parameters())
    for name, per in weighted.items():
        assert_close_rel(values[name], per.pow(2).mean(0), what=name)
        assert torch.equal(fisher.for_parameter(params[name]), values[name])
    ref_grads = reference_batch_grad(model, batches, "mean")
    for name, g in ref_grads.items():
        assert_close_rel(params[name].grad, g, what=f"grad {name}")


def test_without_token_weight_two_dim_input_and_no_padding(device):
    """[N, d_in] inputs (T = 1 implicitly) and no token weights: plain per-sample Fisher (backend "auto")."""
    layer = mk.MageLinear(6, 4, r=2, dropout=0.0, device=device)
    randomize(layer)
    fisher = mk.Fisher(layer, loss_reduction="sum")
    x, target = torch.randn(6, 6, device=device), torch.randn(6, 4, device=device)
    token_losses(layer(x), target).sum().backward()
    f = layer_fn(layer, "")
    tp = trainable(layer)
    per = vmap(grad(lambda tp, x, t: token_losses(f(tp, x[None]), t[None]).sum()), in_dims=(None, 0, 0))(
        tp, x.double(), target.double())
    assert fisher.num_samples == 6
    for name, v in fisher.values().items():
        assert_close_rel(v, per[name].pow(2).mean(0), what=name)


def test_reset_loss_scale_and_no_count_without_backward(device):
    layer = mk.MageLinear(5, 4, r=2, dropout=0.0, device=device)
    randomize(layer)
    fisher = mk.Fisher(layer, loss_reduction="mean")
    x, target = torch.randn(3, 2, 5, device=device), torch.randn(3, 2, 4, device=device)
    token_losses(layer(x), target).sum(-1).mean().backward()
    first = {k: v.clone() for k, v in fisher.values().items()}
    fisher.reset()
    assert fisher.num_samples == 0
    assert all(torch.count_nonzero(t) == 0 for t in fisher.persistent_tensors())
    with pytest.raises(RuntimeError, match="no samples"):
        fisher.values()
    # a forward without backward (and one under no_grad) adds nothing
    layer(x)
    with torch.no_grad():
        layer(x)
    assert fisher.num_samples == 0
    # a loss scaled by 8 (e.g. GradScaler) with loss_scale=8 gives the same Fisher
    fisher.loss_scale = 8.0
    (8.0 * token_losses(layer(x), target).sum(-1).mean()).backward()
    assert fisher.num_samples == 3
    for k, v in fisher.values().items():
        assert_close_rel(v, first[k].double(), rel=1e-5, what=k)


def test_token_weight_shape_errors_and_remove():
    layer = mk.MageLinear(5, 4, r=2, dropout=0.0)
    fisher = mk.Fisher(layer)
    with pytest.raises(RuntimeError, match="already accumulates"):
        mk.Fisher(layer)
    with pytest.raises(ValueError, match="token weight"):
        with fisher.token_weight(torch.ones(3, 7)):
            layer(torch.randn(3, 6, 5))
    with pytest.raises(ValueError, match="loss_reduction"):
        mk.Fisher(mk.MageLinear(5, 4), loss_reduction="avg")
    with pytest.raises(ValueError, match="no MageLinear"):
        mk.Fisher(nn.Linear(3, 3))
    with pytest.raises(KeyError):
        fisher.for_parameter(layer.base.weight)
    fisher.remove()
    assert layer.fisher_a is None and layer.fisher_b is None and layer.fisher_token_weight is None
    randomize(layer)
    layer(torch.randn(2, 3, 5)).sum().backward()  # no Fisher work, no error
    assert layer.lora_A[0].grad is not None
    mk.Fisher(layer).remove()  # attachable again after remove


def test_sync_is_a_noop_without_distributed():
    layer = mk.MageLinear(5, 4, r=2, dropout=0.0)
    randomize(layer)
    fisher = mk.Fisher(layer)
    layer(torch.randn(2, 3, 5)).pow(2).sum(-1).mean(-1).mean().backward()
    before = [t.clone() for t in fisher.persistent_tensors()]
    fisher.sync()
    assert fisher.num_samples == 2
    assert all(torch.equal(a, b) for a, b in zip(before, fisher.persistent_tensors()))


def _sync_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    init_gloo(init_file, rank, world)
    try:
        torch.manual_seed(0)
        layer = mk.MageLinear(5, 4, r=2, dropout=0.0)
        randomize(layer)
        x, target = torch.randn(2 + 3, 3, 5), torch.randn(2 + 3, 3, 4)
        mine = slice(0, 2) if rank == 0 else slice(2, 5)  # ranks see different samples (2 and 3)
        fisher = mk.Fisher(layer, loss_reduction="mean")
        token_losses(layer(x[mine]), target[mine]).sum(-1).mean().backward()
        fisher.sync()
        torch.save({"n": fisher.num_samples, "values": fisher.values()}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sync_all_reduces_sums_and_counts_across_two_ranks(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    # the same five samples on one process
    torch.manual_seed(0)
    layer = mk.MageLinear(5, 4, r=2, dropout=0.0)
    randomize(layer)
    x, target = torch.randn(5, 3, 5), torch.randn(5, 3, 4)
    fisher = mk.Fisher(layer, loss_reduction="sum")
    token_losses(layer(x), target).sum().backward()
    expected = fisher.values()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["n"] == 5
        for k, v in expected.items():
            assert_close_rel(got["values"][k], v.double(), rel=1e-5, what=f"rank {rank} {k}")


def test_counts_forwards_of_a_submodule_called_directly():
    """The root model is not called: a layer running again starts a new forward (counted once each)."""
    model = mk.inject(TwoLayer(), ["up", "down"], r=2, dropout=0.0)
    randomize(model)
    fisher = mk.Fisher(model, loss_reduction="sum")
    for n in (3, 2):
        model.up(torch.randn(n, 4, 6)).pow(2).sum().backward()
    assert fisher.num_samples == 5
    assert torch.count_nonzero(model.down.fisher_a) == 0  # never ran
    assert torch.count_nonzero(model.up.fisher_a) > 0


class _Flattening(TwoLayer):
    """``down`` sees a flattened ``[N*T, hidden]`` input: its leading dim is not the samples."""

    def forward(self, x):
        h = torch.tanh(self.up(x))
        return self.down(h.reshape(-1, h.shape[-1])).reshape(*x.shape[:-1], -1)


def test_layers_that_counted_different_samples_raise_naming_them():
    model = mk.inject(_Flattening(), ["up", "down"], r=2, dropout=0.0)
    randomize(model)
    fisher = mk.Fisher(model, loss_reduction="sum")
    model(torch.randn(3, 4, 6)).pow(2).sum().backward()
    assert [int(layer.fisher_count) for _, layer in fisher.layers] == [3, 12]
    with pytest.raises(RuntimeError, match=r"different numbers of samples.*up: 3, down: 12"):
        fisher.values()
    with pytest.raises(RuntimeError, match="different numbers of samples"):
        fisher.for_parameter(model.up.lora_A[0])
    fisher.reset()  # a consistent window afterwards reads normally
    model.down(torch.randn(5, 9)).pow(2).sum().backward()  # only `down` reached: `up` counts 0
    assert fisher.num_samples == 5 and torch.count_nonzero(model.up.fisher_a) == 0
    assert set(fisher.values()) >= {"down.lora_A.0", "up.lora_A.0"}


def test_bad_loss_scale_leaves_the_model_untouched_and_removed_fisher_says_so():
    layer = mk.MageLinear(5, 4, r=2, dropout=0.0)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="loss_scale"):
            mk.Fisher(layer, loss_scale=bad)
        assert layer.fisher_a is None and layer.fisher_count is None
    fisher = mk.Fisher(layer)  # attachable: nothing was half-installed
    with pytest.raises(ValueError, match="loss_scale"):
        fisher.loss_scale = 0.0
    assert fisher.loss_scale == 1.0
    fisher.remove()
    with pytest.raises(RuntimeError, match="was removed"):
        fisher.values()
