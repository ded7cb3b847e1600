"""Janus / Janus-Pro (``JanusForConditionalGeneration``, e.g. deepseek-community/Janus-Pro-1B).

Janus reads an image through its SigLIP vision tower + aligner (continuous embeddings at
``num_image_tokens`` placeholder positions) and writes one through a separate path: the
target image is VQ-encoded into codes of ``vq_config.num_embeddings``, embedded by the
generation embeddings + aligner, and predicted by the generation head (not the LM head).

:class:`JanusLM` puts both paths into one token space so the driver's batches, loss and
greedy loop work unchanged: ids ``< V`` (the text vocabulary) are text, ids ``V + c`` are VQ
code ``c``. Its logits are ``[LM head | generation head]``; at a position whose input token is
``<begin_of_image>`` or an image code the next token is an image code, so the LM-head part is
masked there, and the generation-head part everywhere else. A cross-entropy over the joint
logits is then exactly Janus' own losses: text cross-entropy of the LM head on text
answers, cross-entropy of the generation head on image codes.

* input image: ``<begin_of_image>`` + ``num_image_tokens`` x ``<image_placeholder>`` +
  ``<end_of_image>``, with the processor's pixel values;
* image answer: ``<begin_of_image>`` + the target's ``num_image_tokens`` VQ codes (no EOS:
  Janus generates a fixed number of codes), decoded by ``decode_image_tokens``;
* adapters: ``model.language_model.layers.*`` q/k/v/o/gate/up/down; the vision tower, the
  aligners, the VQ model and both heads stay frozen and get none;
* classifier-free guidance 5 by default (Janus' own default; ``--image-guidance``).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .base import BackboneError, model_cache, open_image
from .hf import BackboneModel, HFBackbone, ModelOutput, PlanStep, first_line, pil_from_pixels

__all__ = ["JanusBackbone", "JanusLM"]


class JanusLM(BackboneModel):
    """Janus with text and image codes in one id space; see the module docstring."""

    def __init__(self, hf: nn.Module, autocast_dtype: Optional[torch.dtype], boi_id: int) -> None:
        super().__init__(hf, autocast_dtype)
        self.text_vocab = int(hf.config.text_config.vocab_size)
        self.image_vocab = int(hf.config.vq_config.num_embeddings)
        self.boi_id = int(boi_id)
        self.image_token_id = int(hf.config.image_token_id)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, cache: Any = None, use_cache: Optional[bool] = None,
                logits_to_keep: int = 0, pixel_values: Optional[torch.Tensor] = None) -> ModelOutput:
        hf, V = self.hf, self.text_vocab
        with self.autocast(input_ids.device):
            is_code = input_ids >= V
            emb = hf.get_input_embeddings()(input_ids.masked_fill(is_code, 0))
            if bool(is_code.any()):
                codes = hf.prepare_embeddings_for_image_generation(input_ids[is_code] - V)
                emb = emb.clone()
                emb[is_code] = codes.to(emb.dtype)
            if pixel_values is not None:
                vision = hf.model.vision_model
                feats = hf.model.get_image_features(pixel_values.to(next(vision.parameters()).dtype)).pooler_output
                slots = (input_ids == self.image_token_id).unsqueeze(-1)
                if int(slots.sum()) * emb.shape[-1] != feats.numel():
                    raise ValueError(f"{int(slots.sum())} image placeholders for {feats.shape[0]} image(s) of "
                                     f"{feats.shape[1]} tokens")
                emb = emb.masked_scatter(slots, feats.reshape(-1, emb.shape[-1]).to(emb.dtype))
            kw = {"cache": cache} if cache is not None else {}
            out = hf.model.language_model(inputs_embeds=emb, attention_mask=attention_mask,
                                          position_ids=position_ids, use_cache=bool(use_cache), **kw)
            h = out.last_hidden_state
            image_mode = is_code | (input_ids == self.boi_id)
            if logits_to_keep:
                h = h[:, -int(logits_to_keep):]
                image_mode = image_mode[:, -int(logits_to_keep):]
            text_logits = hf.lm_head(h).float()
            code_logits = hf.model.generation_head(h).float()
        low = torch.finfo(torch.float32).min
        mode = image_mode.unsqueeze(-1)
        logits = torch.cat([text_logits.masked_fill(mode, low), code_logits.masked_fill(~mode, low)], -1)
        return ModelOutput(logits, model_cache(out))


def _hf(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)
    return inner.hf


class JanusBackbone(HFBackbone):
    """Janus(-Pro) through transformers; see the module docstring."""

    name = "janus"
    display_name = "Janus"
    model_types = ("janus",)
    lm_prefix = "hf.model.language_model.layers."
    guidance_default = 5.0
    reads_images = True
    writes_images = True
    pixels_in_prompt = True

    @property
    def model_class(self):
        from transformers import JanusForConditionalGeneration

        return JanusForConditionalGeneration

    def _setup_tokens(self) -> None:
        super()._setup_tokens()
        tok = self.tokenizer
        self.boi_id = self.token_id(getattr(tok, "boi_token", None) or "<begin_of_image>", "begin-of-image")
        self.eoi_id = self.token_id(getattr(tok, "eoi_token", None) or "<end_of_image>", "end-of-image")
        self.placeholder_id = self.token_id(self.image_token_str, "image placeholder")
        cfg = self.config
        self.text_vocab = int(cfg["text_config"]["vocab_size"])
        self.image_vocab = int(cfg.get("vq_config", {}).get("num_embeddings", 16384))
        self.num_image_tokens = int(getattr(self.processor, "num_image_tokens", 576))
        if int(cfg.get("image_token_id", self.placeholder_id)) != self.placeholder_id:
            raise BackboneError(f"--model {self.path}: config image_token_id {cfg.get('image_token_id')} is not the "
                                f"tokenizer's {self.image_token_str!r} ({self.placeholder_id})")

    def _after_load(self, model: nn.Module) -> None:
        vis = int(_hf(model).config.vision_config.num_image_tokens)
        if vis != self.num_image_tokens:
            raise BackboneError(f"--model {self.path}: the processor inserts {self.num_image_tokens} image tokens, "
                                f"the vision tower makes {vis}")

    def wrap(self, hf: nn.Module) -> nn.Module:
        return JanusLM(hf, None if self.dtype == torch.float32 else self.dtype, self.boi_id)

    # ------------------------------------------------------------------ images
    @property
    def image_start_id(self) -> Optional[int]:
        return self.boi_id

    def input_image_length(self, size: Tuple[int, int]) -> int:
        return self.num_image_tokens + 2

    @property
    def target_image_length(self) -> int:
        return 1 + self.num_image_tokens

    def _pixels(self, path: str) -> torch.Tensor:
        img = open_image(path)
        try:
            return self.processor.image_processor(images=[img], return_tensors="pt")["pixel_values"][0]
        except Exception as exc:
            raise BackboneError(f"image {path!r}: the Janus image processor fails on it: {first_line(exc)}") from None

    def encode_image(self, model: nn.Module, path: str) -> Tuple[List[int], Optional[torch.Tensor]]:
        ids = [self.boi_id] + [self.placeholder_id] * self.num_image_tokens + [self.eoi_id]
        return ids, self._pixels(path)

    def encode_target_image(self, model: nn.Module, path: str) -> List[int]:
        hf = _hf(model)
        vq = hf.model.vqmodel
        p = next(vq.parameters())
        px = self._pixels(path)[None].to(p.device, p.dtype)
        codes = vq.encode(px).image_tokens.reshape(-1)
        if codes.numel() != self.num_image_tokens:
            raise BackboneError(f"image {path!r}: the VQ model makes {codes.numel()} codes, the model generates "
                                f"{self.num_image_tokens}")
        return [self.boi_id] + [self.text_vocab + int(c) for c in codes.tolist()]

    def image_plan(self) -> List[PlanStep]:
        return [None] * self.num_image_tokens

    def visual_mask(self, vocab: int, device: torch.device) -> torch.Tensor:
        mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        mask[self.text_vocab:self.text_vocab + self.image_vocab] = True
        return mask

    def is_image_token(self, token_id: int) -> bool:
        return token_id >= self.text_vocab or token_id in (self.boi_id, self.placeholder_id)

    def decode_image_ids(self, model: nn.Module, generated: Sequence[int]) -> Any:
        hf = _hf(model)
        dev = next(hf.parameters()).device
        codes = torch.tensor([int(t) - self.text_vocab for t in generated[1:]], dtype=torch.long, device=dev)
        pixels = hf.model.vqmodel.decode(codes[None])  # [1, 3, H, W] in the processor's normalized space
        return pil_from_pixels(pixels[0], self.processor.image_processor)
