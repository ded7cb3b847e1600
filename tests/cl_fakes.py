"""Small fakes shared by the driver tests: a tiny joint-vocab LLaMA and toy tasks.

The toy tasks are in the real vocabulary (:class:`mage_cl.vocab.Vocab`) but tiny and
fast: "echo" (prompt: a few text tokens, target: the same reversed), one with an image
output ("draw": prompt text, target a 2x2 "image"), so EW+GA's adapter choice differs
between them.
"""

from __future__ import annotations

import random
from typing import Dict, List

import torch

from mage_cl.model import ModelConfig, build_model
from mage_cl.tasks.base import Example, Task, Verdict
from mage_cl.vocab import Vocab

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_positions=64)


def tiny_model(seed: int = 0):
    v = Vocab()
    model = build_model(v, TINY, seed)
    model.requires_grad_(False)
    model.eval()
    return v, model


def _judge(generated: List[int], ex: Example) -> Verdict:
    want = list(ex.target[:-1])
    if generated == want:
        return Verdict(True)
    if not generated:
        return Verdict(False, "OTH")
    return Verdict(False, "HAL")


def toy_tasks(n_train: int = 16, n_test: int = 6, seed: int = 0) -> Dict[str, Task]:
    v = Vocab()
    rng = random.Random(seed)
    letters = v.encode_text("abcdefgh")
    pix = [v.image_offset + k for k in range(v.levels)]

    def echo(n):
        out = []
        for _ in range(n):
            s = [rng.choice(letters) for _ in range(3)]
            out.append(Example([v.bos_id] + s + [v.sep_id], s[::-1] + [v.eos_id]))
        return out

    def draw(n):
        out = []
        for _ in range(n):
            s = [rng.choice(letters) for _ in range(2)]
            img = [v.boi_id] + [pix[(t - letters[0]) % len(pix)] for t in s * 2] + [v.eoi_id]
            out.append(Example([v.bos_id] + s + [v.sep_id], img + [v.eos_id]))
        return out

    return {
        "echo": Task("echo", "Echo", frozenset({"text"}), "text", echo(n_train), echo(n_test), 5, _judge),
        "draw": Task("draw", "Draw", frozenset({"text"}), "image", draw(n_train), draw(n_test), 8, _judge),
    }


def adapter_rank(model) -> Dict[str, int]:
    """Total adapter rank per MageLinear layer."""
    import mage_kernels as mk

    return {n: l.r * l.num_adapters for n, l in mk.mage_layers(model)}


def batches(task: Task, pad_id: int, bs: int = 4):
    from mage_cl.trainer import collate

    def gen():
        for s in range(0, len(task.train), bs):
            yield collate(task.train[s: s + bs], pad_id, torch.device("cpu"))

    return gen
