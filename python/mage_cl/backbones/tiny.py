"""The embedded tiny backbone: the joint text + pixel-token LLaMA of the digits benchmark.

Everything is already a token id here (:class:`mage_cl.vocab.Vocab`): an input image is its
``BOI`` + one token per pixel level + ``EOI`` run inside the prompt, a target image the same
run as the answer. The batch, loss and greedy generation are the trainer's own
(:func:`mage_cl.trainer.collate`, :func:`mage_cl.methods.base.batch_loss`,
:func:`mage_cl.trainer.greedy_generate`), so the committed CPU results are reproduced bit
for bit. The adapters go on the LLaMA's q/k/v/o/gate/up/down (it has no other linears but the
LM head).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

import mage_kernels as mk

from .base import Backbone

__all__ = ["TinyBackbone", "TokenIdBackbone"]


class TokenIdBackbone(Backbone):
    """Examples that are plain token ids (no image slots): the trainer's collate, loss and greedy decoding."""

    name = "token-ids"
    #: :meth:`generate` can run in lock-step over the ranks (FSDP2, ZeRO-3: every forward a collective).
    lockstep = True

    def __init__(self, pad_id: int, eos_id: int) -> None:
        self.pad_id, self.eos_id = int(pad_id), int(eos_id)

    def target_modules(self, model: nn.Module) -> List[str]:
        return list(mk.LLAMA_TARGETS)

    def collate(self, examples: Sequence[Any], model: nn.Module, device: torch.device) -> Dict[str, Any]:
        from ..trainer import collate

        return collate(examples, self.pad_id, device)

    def loss(self, model: nn.Module, batch: Dict[str, Any], reduction: str = "sample",
             divisor: Optional[float] = None) -> torch.Tensor:
        from ..methods.base import batch_loss

        return batch_loss(model, batch, reduction, divisor)

    def generate(self, model: nn.Module, examples: Sequence[Any], task: Any, lockstep: bool = False) -> List[List[int]]:
        from ..trainer import greedy_generate

        return greedy_generate(model, [e.prompt for e in examples], task.max_new_tokens, self.pad_id, self.eos_id,
                               lockstep)


class TinyBackbone(TokenIdBackbone):
    """The digits benchmark's model family: images are pixel-level tokens of one joint vocabulary."""

    name = "tiny"
    reads_images = True
    writes_images = True

    def __init__(self, vocab) -> None:
        super().__init__(vocab.pad_id, vocab.eos_id)
        self.vocab = vocab

    def encode_image(self, levels: np.ndarray) -> List[int]:
        """An input image (2-D array of levels) as its ``BOI`` pixels ``EOI`` tokens."""
        return self.vocab.encode_image(levels)

    def encode_target_image(self, levels: np.ndarray) -> List[int]:
        """A target image as discrete tokens: the same run as an input image (one joint vocabulary)."""
        return self.vocab.encode_image(levels)

    def is_image_token(self, token_id: int) -> bool:
        return self.vocab.is_image_token(token_id)

    def decode_image(self, generated: Sequence[int], shape: Optional[Sequence[int]] = None) -> Optional[np.ndarray]:
        """The level map of a generated image answer (``None`` when it is not a well-formed ``shape`` image)."""
        if shape is None:
            raise ValueError("the tiny backbone decodes an image to a given shape (rows, cols)")
        return self.vocab.decode_image(list(generated), shape)

    def describe(self) -> Dict[str, object]:
        return {"backbone": self.name}
