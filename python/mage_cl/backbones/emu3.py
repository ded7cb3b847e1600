"""Emu3 (``Emu3ForConditionalGeneration``, e.g. BAAI/Emu3-Gen-hf, BAAI/Emu3-Chat-hf).

Emu3's image tokens are ordinary LM tokens: the VQ model turns an image into a grid of codes,
each code is a ``<|visual token NNNNNN|>`` of the text vocabulary, and every grid row ends with
an end-of-line token. An image in a sequence is::

    <|image start|> "h*w" <|image token|>  h rows of (w visual tokens + EOL)  <|extra_201|> <|image end|>

(``h``, ``w``: the grid; the size is written as text). So an input image is these tokens in the
prompt, and an image answer is the same with EOS after it; the loss of an image answer is the
plain LM cross-entropy over those tokens. Generation writes the structure tokens itself (the
size header, the EOLs, the end markers) and restricts every other position to the visual
tokens, as Emu3's own ``prefix_allowed_tokens_fn`` does; the grid is decoded by
``vqmodel.decode``.

* input images: the processor's resizing (``min_pixels``/``max_pixels`` of its config);
* target / generated images: a square of ``--image-size`` pixels (default 512: a 64 x 64 grid,
  4160 tokens with the EOLs; Emu3's own default 720 x 720 is 8190), the centre square of the
  target image resized to it;
* adapters: ``model.text_model.layers.*`` q/k/v/o/gate/up/down (the VQ model's attention
  projections are left alone);
* classifier-free guidance 3 by default (``--image-guidance``), the unconditional row being
  the prompt replaced by padding.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .base import BackboneError, open_image
from .hf import BackboneModel, HFBackbone, PlanStep, center_square, first_line, pil_from_pixels

__all__ = ["Emu3Backbone"]

#: Side (pixels) of generated images unless ``--image-size`` says otherwise.
DEFAULT_IMAGE_SIZE = 512


def _hf(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)
    return inner.hf if isinstance(inner, BackboneModel) else inner


class Emu3Backbone(HFBackbone):
    """Emu3 through transformers; see the module docstring."""

    name = "emu3"
    display_name = "Emu3"
    model_types = ("emu3",)
    lm_prefix = "hf.model.text_model.layers."
    guidance_default = 3.0
    reads_images = True
    writes_images = True

    @property
    def model_class(self):
        from transformers import Emu3ForConditionalGeneration

        return Emu3ForConditionalGeneration

    def _setup_tokens(self) -> None:
        super()._setup_tokens()
        p = self.processor
        self.boi_id = self.token_id(p.image_start_token, "image-start")
        self.eoi_id = self.token_id(p.image_end_token, "image-end")
        self.wrapper_id = self.token_id(p.fake_token_around_image, "image-wrapper")
        self.eof_id = self.token_id(p.eof_token, "end-of-frame")
        vmap: Dict[str, int] = self.config.get("vocabulary_map") or {}
        if not vmap:
            raise BackboneError(f"--model {self.path}/config.json has no vocabulary_map (Emu3 maps its visual tokens "
                                "through it)")
        if "<|extra_200|>" not in vmap:
            raise BackboneError(f"--model {self.path}: the vocabulary has no end-of-line token '<|extra_200|>'")
        self.eol_id = int(vmap["<|extra_200|>"])
        visual = {int(name[-8:-2]): int(i) for name, i in vmap.items() if name.startswith("<|visual token")}
        if not visual:
            raise BackboneError(f"--model {self.path}: the vocabulary has no '<|visual token NNNNNN|>' tokens")
        self.visual_ids = sorted(visual.values())
        self._visual_set = set(self.visual_ids)
        vq = self.config.get("vq_config") or {}
        self.spatial_factor = 2 ** (len(vq.get("channel_multiplier", (1, 2, 2, 4))) - 1)
        side = self.options.image_size or DEFAULT_IMAGE_SIZE
        if side % self.spatial_factor or side < self.spatial_factor:
            raise BackboneError(f"--image-size {side} must be a positive multiple of Emu3's VQ downsampling "
                                f"{self.spatial_factor}")
        self.image_size = int(side)
        self.grid = side // self.spatial_factor
        self._structure = {self.boi_id, self.eoi_id, self.wrapper_id, self.eof_id, self.eol_id}

    # ------------------------------------------------------------------ layout
    def _header(self, h: int, w: int) -> List[int]:
        return [self.boi_id] + self.encode_text(f"{h}*{w}") + [self.wrapper_id]

    def _grid_of(self, size: Tuple[int, int]) -> Tuple[int, int]:
        from transformers.models.emu3.image_processing_emu3 import smart_resize

        ip = self.processor.image_processor
        w, h = size
        try:
            H, W = smart_resize(h, w, ip.spatial_factor, ip.min_pixels, ip.max_pixels)
        except ValueError as exc:
            raise BackboneError(f"an image of {w}x{h} pixels: {exc}") from None
        return H // self.spatial_factor, W // self.spatial_factor

    def input_image_length(self, size: Tuple[int, int]) -> int:
        h, w = self._grid_of(size)
        return len(self._header(h, w)) + h * (w + 1) + 2

    @property
    def target_image_length(self) -> int:
        g = self.grid
        return len(self._header(g, g)) + g * (g + 1) + 3  # eof, eoi, eos

    # ------------------------------------------------------------------ images
    @property
    def image_start_id(self) -> Optional[int]:
        return self.boi_id

    def _tokens(self, model: nn.Module, img: Any, resize: bool, path: str) -> Tuple[List[int], int, int]:
        hf = _hf(model)
        ip = self.processor.image_processor
        try:
            feats = ip(images=[img], do_resize=resize, return_tensors="pt")
        except Exception as exc:
            raise BackboneError(f"image {path!r}: the Emu3 image processor fails on it: {first_line(exc)}") from None
        vq = hf.model.vqmodel
        p = next(vq.parameters())
        pv, sizes = feats["pixel_values"].to(p.device, p.dtype), feats["image_sizes"].to(p.device)
        bpe = hf.model.get_image_tokens(pv, sizes)
        h, w = int(sizes[0, 0]) // self.spatial_factor, int(sizes[0, 1]) // self.spatial_factor
        if bpe.numel() != h * (w + 1):
            raise BackboneError(f"image {path!r}: {bpe.numel()} VQ tokens for a {h}x{w} grid")
        return [int(t) for t in bpe.tolist()], h, w

    def encode_image(self, model: nn.Module, path: str) -> Tuple[List[int], Optional[torch.Tensor]]:
        bpe, h, w = self._tokens(model, open_image(path), True, path)
        return self._header(h, w) + bpe + [self.eof_id, self.eoi_id], None

    def encode_target_image(self, model: nn.Module, path: str) -> List[int]:
        img = center_square(open_image(path), self.image_size)
        bpe, h, w = self._tokens(model, img, False, path)
        if (h, w) != (self.grid, self.grid):
            raise BackboneError(f"image {path!r}: a {h}x{w} grid, expected {self.grid}x{self.grid}")
        return self._header(h, w) + bpe + [self.eof_id, self.eoi_id, self.eos_id]

    def image_plan(self) -> List[PlanStep]:
        g = self.grid
        header = self._header(g, g)[1:]
        rows: List[PlanStep] = []
        for _ in range(g):
            rows += [None] * g + [self.eol_id]
        return list(header) + rows + [self.eof_id, self.eoi_id]

    def visual_mask(self, vocab: int, device: torch.device) -> torch.Tensor:
        mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        mask[torch.tensor(self.visual_ids, device=device)] = True
        return mask

    def is_image_token(self, token_id: int) -> bool:
        return token_id in self._visual_set or token_id in self._structure

    def decode_image_ids(self, model: nn.Module, generated: Sequence[int]) -> Any:
        hf = _hf(model)
        g = self.grid
        head = len(self._header(g, g))
        body = torch.tensor([int(t) for t in generated[head: head + g * (g + 1)]], dtype=torch.long)
        codes = hf.model.vocabulary_mapping.convert_bpe2img(body.view(1, g, g + 1))
        dev = next(hf.parameters()).device
        pixels = hf.model.vqmodel.decode(codes.to(dev))  # [1, 3, S, S] in the processor's normalized space
        return pil_from_pixels(pixels[0], self.processor.image_processor)
