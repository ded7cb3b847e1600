"""Chameleon (``ChameleonForConditionalGeneration``, e.g. facebook/chameleon-7b): text-output tasks only.

An input image is VQ-encoded into ``image_seq_length`` (1024) codes, each mapped to an
``IMGIMG...`` token of the text vocabulary, between ``<racm3:break>`` and ``<eoss>``; the
prompt ends with the chat-mode separator (the tokenizer's ``sep_token``), as the processor
does. The adapters go on ``model.layers.*`` q/k/v/o/gate/up/down.

Image output is refused before training: transformers' forward sets the logits of every
image token to the dtype's minimum, so an image-token label has an infinite loss and the
model can never generate an image token. :data:`IMAGE_OUTPUT_REFUSAL` is the error a user
sees when the sequence holds Flickr30k or HQEdit.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .base import BackboneError, open_image
from .hf import BackboneModel, HFBackbone, first_line

__all__ = ["ChameleonBackbone", "IMAGE_OUTPUT_REFUSAL"]

IMAGE_OUTPUT_REFUSAL = (
    "Chameleon cannot be trained on an image-output task: transformers' ChameleonForConditionalGeneration sets "
    "the logits of every image token to the dtype's minimum, so an image-token label has an infinite loss and "
    "no image can be generated; run the text-output tasks only (--tasks vqa,classification,ocr,grounding) "
    "or use Janus or Emu3"
)


def _hf(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)
    return inner.hf if isinstance(inner, BackboneModel) else inner


class ChameleonBackbone(HFBackbone):
    """Chameleon through transformers (text answers); see the module docstring."""

    name = "chameleon"
    display_name = "Chameleon"
    model_types = ("chameleon",)
    lm_prefix = "hf.model.layers."
    reads_images = True
    writes_images = False
    image_output_refusal = IMAGE_OUTPUT_REFUSAL

    @property
    def model_class(self):
        from transformers import ChameleonForConditionalGeneration

        return ChameleonForConditionalGeneration

    def _setup_tokens(self) -> None:
        super()._setup_tokens()
        p = self.processor
        self.boi_id = self.token_id(p.image_start_token, "image-start")
        self.eoi_id = self.token_id(p.image_end_token, "image-end")
        self.seq_length = int(p.image_seq_length)
        vmap = self.config.get("vocabulary_map") or {}
        if not vmap:
            raise BackboneError(f"--model {self.path}/config.json has no vocabulary_map (Chameleon maps its image "
                                "tokens through it)")
        self._image_ids = {int(i) for name, i in vmap.items() if name.startswith("IMGIMG")}
        sep = getattr(self.tokenizer, "sep_token", None)
        self._suffix = sep or ""

    def prompt_suffix(self) -> str:
        return self._suffix

    def input_image_length(self, size: Tuple[int, int]) -> int:
        return self.seq_length + 2

    @property
    def target_image_length(self) -> int:
        raise BackboneError(IMAGE_OUTPUT_REFUSAL)

    @property
    def image_start_id(self) -> Optional[int]:
        return self.boi_id

    def encode_image(self, model: nn.Module, path: str) -> Tuple[List[int], Optional[torch.Tensor]]:
        hf = _hf(model)
        try:
            pv = self.processor.image_processor(images=[open_image(path)], return_tensors="pt")["pixel_values"]
        except BackboneError:
            raise
        except Exception as exc:
            raise BackboneError(f"image {path!r}: the Chameleon image processor fails on it: {first_line(exc)}") from None
        p = next(hf.model.vqmodel.parameters())
        codes = hf.model.get_image_tokens(pv.to(p.device, p.dtype)).reshape(-1)
        if codes.numel() != self.seq_length:
            raise BackboneError(f"image {path!r}: the VQ model makes {codes.numel()} tokens, the processor expects "
                                f"{self.seq_length}")
        return [self.boi_id] + [int(t) for t in codes.tolist()] + [self.eoi_id], None

    def encode_target_image(self, model: nn.Module, path: str) -> List[int]:
        raise BackboneError(IMAGE_OUTPUT_REFUSAL)

    def is_image_token(self, token_id: int) -> bool:
        return token_id in self._image_ids or token_id in (self.boi_id, self.eoi_id)

    def decode_image(self, generated: Sequence[int]) -> Optional[Any]:
        return None
