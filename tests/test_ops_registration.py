"""The ``torch.ops.mage.*`` custom ops exist after a plain ``import mage_kernels``, with or without Triton.

Each check runs in a fresh interpreter (``subprocess``), because this test
process has usually imported the Triton kernel modules already. The "no
Triton" interpreter sets ``sys.modules["triton"] = None`` before anything is
imported, so every ``import triton`` raises ``ImportError``; the ``torch``
backend must then still run a whole MAGE step (MageLinear forward/backward with
the Fisher, PEMA) and match the plain-PyTorch reference.

Also here: ``"auto"`` resolves float64 to the torch backend (the Triton GEMMs
have no float64 path) and an explicit ``"triton"`` with float64 raises a clear
``TypeError``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mage_kernels as mk
from mage_kernels import backends, reference

OPS = ("lora_linear", "lora_linear_backward", "weight_grad_with_fisher", "pema_update_")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str) -> str:
    env = dict(os.environ)
    env.pop("MAGE_BACKEND", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, f"subprocess failed:\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}"
    return proc.stdout


def test_plain_import_registers_every_op_without_loading_triton_kernels():
    out = run_python(f"""
        import sys
        import torch
        import mage_kernels
        ops = {OPS!r}
        missing = [n for n in ops if not hasattr(torch.ops.mage, n)]
        assert not missing, missing
        schema = str(torch.ops.mage.weight_grad_with_fisher.default._schema)
        assert schema == "mage::weight_grad_with_fisher" + mage_kernels.weight_grad_op.OP_SCHEMA, schema
        # the Triton kernel modules are imported lazily (only for the triton backend)
        loaded = sorted(m for m in sys.modules if m.startswith("mage_kernels.kernels."))
        assert not loaded, loaded
        print("REGISTERED", len(ops))
    """)
    assert "REGISTERED 4" in out


def test_schema_string_is_the_documented_one():
    assert mk.weight_grad_op.OP_SCHEMA == (
        "(Tensor g, Tensor x, int num_samples, float scale, Tensor(a!)? fisher, "
        "Tensor? token_weight, float fisher_scale) -> Tensor"
    )
    # The Triton kernel module does not import the op module (no import circle): it has no op names.
    from mage_kernels.kernels import weight_grad as triton_wg

    assert not hasattr(triton_wg, "OP_SCHEMA") and not hasattr(triton_wg, "weight_grad_with_fisher_op")


_NO_TRITON_STEP = """
    import sys
    sys.modules["triton"] = None  # every `import triton` now raises ImportError
    sys.modules["triton.language"] = None
    import torch
    import mage_kernels as mk
    from mage_kernels import reference

    try:
        import triton  # noqa: F401
        raise SystemExit("triton is still importable")
    except ImportError:
        pass
    for name in {ops!r}:
        assert hasattr(torch.ops.mage, name), name
    assert mk.backend_info()["triton_installed"] is False
    assert mk.resolve_backend(torch.device("cuda")) == "torch"  # auto never picks a missing Triton

    torch.manual_seed(0)
    layer = mk.MageLinear(12, 10, r=2, dropout=0.0)
    layer.set_trainable([0, 2])
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.3)  # fresh nonzero adapters (lora_B starts at zero)
    fisher = mk.Fisher(layer, loss_reduction="sum")
    pema = mk.PEMA(layer, backend="torch")
    x = torch.randn(3, 4, 12)
    target = torch.randn(3, 4, 10)

    # reference: plain autograd on the same weights, per-sample gradients by a loop over samples
    named = dict(layer.named_parameters())
    trained = [n for n, p in named.items() if p.requires_grad]

    def ref_forward(xs):
        w = layer.base.weight
        b = layer.base.bias
        a_cat = torch.cat([named[f"lora_A.{{k}}"] for k in range(4)])
        b_cat = torch.cat([named[f"lora_B.{{k}}"] for k in range(4)], dim=1)
        return reference.lora_linear(xs, w, b, a_cat, b_cat, layer.scaling)

    ref_loss = ((ref_forward(x) - target) ** 2).sum()
    ref_grads = torch.autograd.grad(ref_loss, [named[n] for n in trained])
    ref_fisher = [torch.zeros_like(named[n]) for n in trained]
    for s in range(x.shape[0]):
        gs = torch.autograd.grad(((ref_forward(x[s:s + 1]) - target[s:s + 1]) ** 2).sum(), [named[n] for n in trained])
        for acc, g in zip(ref_fisher, gs):
            acc += g * g
    ref_fisher = [f / x.shape[0] for f in ref_fisher]

    for backend_name in ("torch", "auto"):
        with mk.use_backend(backend_name):
            for p in layer.parameters():
                p.grad = None
            fisher.reset()
            y = layer(x)
            torch.testing.assert_close(y, ref_forward(x), rtol=1e-5, atol=1e-5)
            ((y - target) ** 2).sum().backward()
            values = fisher.values()
            for n, g, f in zip(trained, ref_grads, ref_fisher):
                torch.testing.assert_close(named[n].grad, g, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(values[n], f, rtol=1e-4, atol=1e-6)
                assert float(f.abs().max()) > 0

    # PEMA with backend torch: the same as the float64 formula on these values
    emas_before = [e.clone() for e in pema.emas]
    with torch.no_grad():
        for n in trained:
            named[n].add_(0.05 * torch.randn_like(named[n]))
    counts = pema.update(fisher)
    assert counts.shape == (2,)
    for n, e0, e in zip(pema.names, emas_before, pema.emas):
        p = named[n].detach().double()
        g = named[n].grad.double()
        f = values[n].double()
        beta = (g + 1) / (f * (p - e0.double()) + pema.lam)
        beta = torch.where((beta > 0) & (beta < 1), beta, torch.full_like(beta, pema.beta_fallback))
        torch.testing.assert_close(e.double(), beta * e0.double() + (1 - beta) * p, rtol=1e-5, atol=1e-6)

    try:
        with mk.use_backend("triton"):
            layer(x)
        raise SystemExit("explicit triton did not raise")
    except mk.BackendUnavailableError as exc:
        assert "triton is not installed" in str(exc), exc
    print("NO_TRITON_OK")
"""


def test_without_triton_the_torch_backend_runs_a_whole_step():
    out = run_python(_NO_TRITON_STEP.format(ops=OPS))
    assert "NO_TRITON_OK" in out


# ----------------------------------------------------------------------------- float64 and "auto"


@pytest.mark.parametrize("op", ["", "weight_grad_with_fisher"])
def test_auto_resolves_float64_to_torch_on_cuda_devices(op):
    cuda = torch.device("cuda")  # resolve_backend only looks at the device type; no GPU needed
    with mk.use_backend("auto"):
        assert mk.resolve_backend(cuda, op, torch.float64) == "torch"
        for dtype in backends.TRITON_DTYPES:
            assert mk.resolve_backend(cuda, op, dtype) == "triton"
        assert mk.resolve_backend(cuda, op) == "triton"  # no dtype given: device only
        assert mk.resolve_backend(torch.device("cpu"), op, torch.float32) == "torch"
    with mk.use_backend("torch"):
        assert mk.resolve_backend(cuda, op, torch.float32) == "torch"


def test_explicit_triton_with_float64_raises_a_clear_type_error():
    if not backends.triton_interpreter() and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    layer = mk.MageLinear(8, 6, r=2, dropout=0.0, dtype=torch.float64, device=dev)
    x = torch.randn(2, 3, 8, dtype=torch.float64, device=dev)
    with mk.use_backend("triton"):
        with pytest.raises(TypeError, match="float64"):
            layer(x)
        g = torch.randn(6, 4, dtype=torch.float64, device=dev)
        with pytest.raises(TypeError, match="float64"):
            mk.weight_grad_op.weight_grad_with_fisher_op(g, g, 2, 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_auto_float64_on_cuda_matches_the_reference():
    torch.manual_seed(0)
    layer = mk.MageLinear(16, 12, r=4, dropout=0.0, dtype=torch.float64, device="cuda")
    layer.set_trainable([0, 1])
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2)
    fisher = mk.Fisher(layer)
    x = torch.randn(3, 5, 16, dtype=torch.float64, device="cuda")
    with mk.use_backend("auto"):
        y = layer(x)
        y.square().sum().backward()
    named = dict(layer.named_parameters())
    a_cat = torch.cat([named[f"lora_A.{k}"] for k in range(4)])
    b_cat = torch.cat([named[f"lora_B.{k}"] for k in range(4)], dim=1)
    ref = reference.lora_linear(x, layer.base.weight, layer.base.bias, a_cat, b_cat, layer.scaling)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert all(float(v.abs().max()) > 0 for v in fisher.values().values())
