"""The backbone interface: what the driver needs from a model family (ALGORITHM.md §8).

A *backbone* is the family-specific half of a run: how a sample becomes token ids, how a
batch's loss is computed, how an answer is generated and (for image outputs) decoded, and
which linears get MAGE's adapters. The trainer (:mod:`mage_cl.trainer`) only calls::

    batch = backbone.collate(examples, model, device)    # right-padded ids, labels, extras
    loss = backbone.loss(model, batch, reduction, n)     # mean of per-sample means ("sample") or token mean
    n = backbone.num_tokens(example)                     # for the token budget of micro-batches
    outs = backbone.generate(model, examples, task)      # generated ids per example (EOS excluded)

and the runner asks ``backbone.target_modules(model)`` where the adapters go. ``model`` is
the module the methods inject into and train (the backbone builds it with
:meth:`HFBackbone.load_model`; the trainer may train a copy of it).

Examples of a real backbone keep images out of the token lists until a batch is built:
an input image is one :data:`IMAGE_SLOT` in ``Example.prompt`` (the k-th slot is
``meta["images"][k]``) and an image answer is one :data:`TARGET_IMAGE_SLOT` as the whole
``Example.target`` (``meta["target_image"]``). :meth:`collate` expands a slot into the
family's tokens (VQ codes, or placeholders plus ``pixel_values`` for Janus' vision tower);
a data set of 100k images never holds 100k token sequences in memory.

Errors the user can fix (a directory that is not a checkpoint, an unsupported family, a
missing processor, an unreadable image) raise :class:`BackboneError` with one line naming
the problem; the CLI prints it as ``mage-cl: error: ...`` (exit 2) before any training.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = [
    "IMAGE_SLOT", "TARGET_IMAGE_SLOT", "BackboneError", "BackboneOptions", "Backbone", "open_image",
    "check_image", "read_config", "DTYPES", "ATTN_IMPLEMENTATIONS",
]

#: In ``Example.prompt``: the next input image of ``meta["images"]``.
IMAGE_SLOT = -1
#: As ``Example.target``: the image ``meta["target_image"]``, the whole answer.
TARGET_IMAGE_SLOT = -2

#: ``--dtype`` choices (``auto``: bfloat16 on a CUDA device, float32 on CPU).
DTYPES = {"auto": None, "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16}
#: ``--attn-implementation`` choices (transformers' names).
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


class BackboneError(ValueError):
    """A user-fixable problem with the model, its processor, or the data it reads (one line)."""


@dataclass(frozen=True)
class BackboneOptions:
    """How a real checkpoint is loaded and run (``mage-cl run`` flags of the same names).

    Attributes:
        dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``bfloat16``/``bf16`` or ``float32``/``fp32``.
            With bf16 the weights are bf16, the adapters float32, and every forward runs under
            ``torch.autocast(bfloat16)``.
        attn_implementation: ``sdpa`` (default), ``eager``, or ``flash_attention_2`` (needs the
            optional ``flash-attn`` package, a CUDA device and bf16).
        gradient_checkpointing: recompute the language model's activations in the backward
            (transformers' non-reentrant checkpointing).
        image_size: side in pixels of generated (and target) images, for the families whose
            generation size is free (Emu3); ``None``: the family's default.
        guidance_scale: classifier-free guidance of image generation (``1`` disables it);
            ``None``: the family's default.
        max_text_answer: tokens a text answer to an image-output task may run to (it is
            instruction unfollowing whatever it says; a short cap keeps evaluation cheap).
        image_cache: encoded images (VQ codes) kept in memory, least recently used dropped.
    """

    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    image_size: Optional[int] = None
    guidance_scale: Optional[float] = None
    max_text_answer: int = 32
    image_cache: int = 4096

    def torch_dtype(self, cuda: Optional[bool] = None) -> torch.dtype:
        """The weights' dtype these options ask for on this machine."""
        if self.dtype not in DTYPES:
            raise BackboneError(f"unknown --dtype {self.dtype!r}; choose from auto, bfloat16, float32")
        dt = DTYPES[self.dtype]
        if dt is None:
            cuda = torch.cuda.is_available() if cuda is None else cuda
            dt = torch.bfloat16 if cuda else torch.float32
        return dt


# ---------------------------------------------------------------------------------------- files


def read_config(path: str) -> Dict[str, Any]:
    """``config.json`` of a checkpoint directory, or a :class:`BackboneError` saying why it is not one."""
    if not os.path.isdir(path):
        raise BackboneError(f"--model {path}: no such directory")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise BackboneError(f"--model {path} is not a transformers checkpoint (no config.json in it)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as exc:
        raise BackboneError(f"{cfg_path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise BackboneError(f"{cfg_path}: cannot be read ({exc.strerror or exc})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type"), str):
        raise BackboneError(f"{cfg_path} has no \"model_type\": not a transformers model config")
    return cfg


def check_image(path: str, where: str) -> Tuple[int, int]:
    """``(width, height)`` of an image file, after checking that PIL can read it.

    Raises :class:`BackboneError` naming ``where`` (the annotation file and line) when the file
    is missing or is not a readable image (a truncated or corrupt file, another format). PNGs
    are checked chunk by chunk, JPEGs decoded at 1/8 scale, anything else decoded.
    """
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise BackboneError(f"{where}: image {path!r} not found")
    try:
        with Image.open(path) as im:
            size = im.size
            if im.format == "PNG":
                im.verify()  # every chunk's CRC: a truncated or corrupt PNG fails here
            else:  # JPEG: decode at 1/8 scale (all the entropy-coded data is read); other formats: decode
                if im.format == "JPEG":
                    im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
                im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BackboneError(f"{where}: image {path!r} cannot be read ({type(exc).__name__}: {exc})") from None
    return int(size[0]), int(size[1])


def open_image(path: str, where: str = "") -> "Any":
    """The image at ``path`` as an RGB ``PIL.Image`` (fully decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (FileNotFoundError, UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        at = f"{where}: " if where else ""
        raise BackboneError(f"{at}image {path!r} cannot be read ({type(exc).__name__}: {exc})") from None


class LRU:
    """A small least-recently-used cache (encoded images)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, int(capacity))
        self._d: "OrderedDict[Any, Any]" = OrderedDict()

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        if key in self._d:
            self._d.move_to_end(key)
            return self._d[key]
        value = make()
        if self.capacity:
            self._d[key] = value
            if len(self._d) > self.capacity:
                self._d.popitem(last=False)
        return value


# ---------------------------------------------------------------------------------------- interface


class Backbone:
    """What a model family provides to the driver; see the module docstring.

    Attributes:
        name: ``tiny``, ``causal-lm``, ``janus``, ``emu3`` or ``chameleon``.
        pad_id, eos_id: the tokenizer's padding and end-of-sequence ids.
        reads_images: whether prompts can hold images (else tasks are text only).
        writes_images: whether image-output tasks can be trained and generated.
        image_output_refusal: when ``writes_images`` is False, why (the error a user sees).
        adapter_dtype: the adapters' dtype when it differs from the weights' (bf16 runs).
    """

    name = "base"
    reads_images = False
    writes_images = False
    image_output_refusal: Optional[str] = None
    adapter_dtype: Optional[torch.dtype] = None
    pad_id: int = 0
    eos_id: int = 0

    # -------------------------------------------------------------- adapters
    def target_modules(self, model: nn.Module) -> List[str]:
        """Qualified names (relative to ``model``) of the linears that get adapters."""
        raise NotImplementedError

    # -------------------------------------------------------------- training
    def collate(self, examples: Sequence[Any], model: nn.Module, device: torch.device) -> Dict[str, Any]:
        """A right-padded batch: ``input_ids``, ``attention_mask``, ``labels`` (-100 off the target)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Dict[str, Any], reduction: str = "sample",
             divisor: Optional[float] = None) -> torch.Tensor:
        """The batch's target-token loss (text or image tokens), reduced as :func:`mage_cl.methods.base.batch_loss`."""
        from ..methods.base import batch_loss

        with self.autocast(model):
            return batch_loss(model, batch, reduction, divisor)

    def num_tokens(self, example: Any) -> int:
        """Tokens of the sample once its images are expanded (prompt + target)."""
        return len(example.prompt) + len(example.target)

    def prompt_tokens(self, example: Any) -> int:
        """Tokens of the sample's prompt once its images are expanded."""
        return len(example.prompt)

    def autocast(self, model: nn.Module):
        """The autocast context of this backbone's forward passes (none by default)."""
        return contextlib.nullcontext()

    # -------------------------------------------------------------- generation
    def generate(self, model: nn.Module, examples: Sequence[Any], task: Any) -> List[List[int]]:
        """Greedy answers (token ids, cut before EOS): text, or an image for an image-output task."""
        raise NotImplementedError

    def is_image_token(self, token_id: int) -> bool:
        """Whether a generated id belongs to an image (an image answer where text is asked is IUF)."""
        return False

    def decode_image(self, generated: Sequence[int]) -> Optional[Any]:
        """The PIL image of a generated image answer (ids as :meth:`generate` returns them), else ``None``."""
        return None

    def describe(self) -> Dict[str, object]:
        """What the results record says about the backbone."""
        return {"backbone": self.name}


def iter_left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask, position_ids)`` of left-padded prompts."""
    L = max(len(p) for p in prompts)
    B = len(prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    att = torch.zeros((B, L), dtype=torch.long)
    for b, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError("cannot generate from an empty prompt")
        ids[b, L - len(p):] = torch.tensor(list(p), dtype=torch.long)
        att[b, L - len(p):] = 1
    pos = (att.cumsum(1) - 1).clamp_min(0)
    return ids.to(device), att.to(device), pos.to(device)


def model_cache(out: Any) -> Any:
    """The KV cache of a transformers output (``cache`` in transformers >= 5.x, else ``past_key_values``)."""
    try:
        return out.cache  # present (maybe None) on transformers >= 5.x outputs; no deprecation warning
    except AttributeError:
        return getattr(out, "past_key_values", None)


def chunks_by_budget(items: Sequence[Any], sizes: Sequence[int], max_rows: int,
                     max_tokens: Optional[int]) -> Iterator[List[int]]:
    """Consecutive index groups of at most ``max_rows`` whose padded size ``rows * max(size)`` fits
    ``max_tokens`` (a single item larger than the budget is a group of its own)."""
    group: List[int] = []
    longest = 0
    for i in range(len(items)):
        s = int(sizes[i])
        new_longest = max(longest, s)
        if group and (len(group) >= max_rows or (max_tokens is not None and new_longest * (len(group) + 1) > max_tokens)):
            yield group
            group, new_longest = [], s
        group.append(i)
        longest = new_longest
    if group:
        yield group
