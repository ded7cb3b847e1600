"""The base model shipped with the package is the one the current recipe builds for seed 0.

``python/mage_cl/bases/base_<key>.pt`` saves every user of the ``cpu`` preset the
pretraining (minutes on a CPU) and makes the committed ``cpu`` results reproducible with the
identical base weights. The file is only used when its key -- the hash of the model and
pretraining configs, the mixture, the vocabulary, the seed and the whole corpus -- matches, so a
change of the recipe silently falls back to pretraining; this test makes that change visible.
"""

from __future__ import annotations

import torch

from mage_cl.model import BUNDLED_BASES, base_model_key, load_pretrained
from mage_cl.presets import get_preset
from mage_cl.tasks import build_tasks
from mage_cl.vocab import Vocab


def test_the_shipped_base_matches_the_cpu_recipe_and_loads(tmp_path):
    vocab = Vocab()
    preset = get_preset("cpu")
    keys = {"cpu": base_model_key(vocab, build_tasks("cpu", 0, vocab), preset.model, preset.pretrain, 0)[0]}
    shipped = sorted(p.name for p in BUNDLED_BASES.glob("base_*.pt"))
    assert shipped == [f"base_{keys['cpu']}.pt"], "regenerate python/mage_cl/bases/ for the new recipe"
    preset = get_preset("cpu")
    model, info = load_pretrained(vocab, build_tasks("cpu", 0, vocab), preset.model, preset.pretrain, 0,
                                  cache=tmp_path / "empty-cache")
    assert info["cached"] and info["path"].startswith(str(BUNDLED_BASES))
    assert not (tmp_path / "empty-cache").exists()  # read from the package, nothing written
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())
