"""CLIP-score judge of the image-output tasks on real data (Flickr30k, HQEdit; ALGORITHM.md §8).

**The score.** For a generated image ``I`` and its text ``c`` (the Flickr30k caption, the
HQEdit instruction, without the ``"Please generate the image:"`` prefix)::

    score(I, c) = 100 * max(0, cos(E_img(I), E_txt(c)))

with ``E_img`` / ``E_txt`` the projected image and text embeddings of a local transformers
``CLIPModel`` (``--clip DIR``; texts are truncated to CLIP's 77 positions). This is the
CLIPScore of Hessel et al. (2021) with the weight 100 instead of 2.5, the scale of the
paper's image-task columns (e.g. Flickr30k 31.18 for LoRA).

**From score to accuracy.** The accuracy matrix needs one verdict per test example (so the
error types add up, ALGORITHM.md §5): an image is *correct* when its score reaches a
threshold ``tau``. ``--clip-threshold`` sets ``tau``:

* a number: that score (e.g. ``25``);
* ``auto`` (default): calibrated per task on the data set itself, ``tau`` = the
  :data:`AUTO_PERCENTILE`-th percentile of the scores of up to :data:`AUTO_PAIRS` of the
  task's own *training* pairs (the real target image with its caption / instruction). A
  generated image then counts as correct when it matches its text at least as well as 90 %
  of the data set's real images match theirs, so a model that draws like the data set scores
  about 90, and ``tau`` follows the CLIP checkpoint's own scale (ViT-B/32 and ViT-L/14 score
  matched pairs differently). The value used is written in the run's record.

The mean score of each image task is recorded too (``diagnostics[*]["clip_score"]``): the
paper's own number for these columns.

**Error types** (rules of :mod:`mage_cl.error_types`): an empty answer is OTH; an answer that
is not an image (the model wrote text, or did not start with the image-start token) is IUF;
an image that cannot be decoded (wrong token count) is OTH; a decoded image below ``tau`` is
HAL (a well-formed image of the wrong content).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, List, Optional, Protocol, Sequence, Tuple, Union

import torch

from .base import Example, Verdict

__all__ = ["AUTO_PERCENTILE", "AUTO_PAIRS", "ClipError", "ClipScorer", "ClipJudge", "ImageScorer",
           "resolve_threshold", "strip_instruction"]

#: ``--clip-threshold auto``: the percentile of the reference (real) pairs' scores used as tau.
AUTO_PERCENTILE = 10.0
#: ``--clip-threshold auto``: at most this many training pairs are scored to calibrate tau.
AUTO_PAIRS = 256
#: The instruction prefix of the generation prompts (appendix 9.1); CLIP sees the text after it.
GENERATE_PREFIX = "Please generate the image"


class ClipError(ValueError):
    """A missing or unusable CLIP checkpoint, or a bad ``--clip-threshold`` (one line)."""


class ImageScorer(Protocol):
    """What the judge needs: ``score(images, texts) -> [score per pair]`` (0-100)."""

    def score(self, images: Sequence[Any], texts: Sequence[str]) -> List[float]: ...


def strip_instruction(text: str) -> str:
    """``"Please generate the image: a dog."`` -> ``"a dog."`` (other texts unchanged)."""
    t = text.strip()
    if t.lower().startswith(GENERATE_PREFIX.lower()):
        rest = t[len(GENERATE_PREFIX):].lstrip(" .:")
        return rest or t
    return t


class ClipScorer:
    """CLIP score (see the module docstring) from a local ``CLIPModel`` checkpoint."""

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, device: Optional[torch.device] = None,
                 path: str = "") -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = device or next(model.parameters()).device
        self.model.to(self.device)
        self.path = path
        self.max_text = int(getattr(model.config.text_config, "max_position_embeddings", 77))

    @classmethod
    def load(cls, path: str, device: Optional[torch.device] = None) -> "ClipScorer":
        """The scorer of the CLIP checkpoint in directory ``path`` (``ClipError`` when it is not one)."""
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        if not os.path.isdir(path):
            raise ClipError(f"--clip {path}: no such directory (a local transformers CLIP checkpoint)")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ClipError(f"--clip {path} is not a transformers checkpoint (no config.json in it)")
        try:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                model_type = json.load(f).get("model_type")
        except (OSError, ValueError, AttributeError) as exc:
            raise ClipError(f"--clip {path}/config.json cannot be read: {_first_line(exc)}") from None
        if model_type != "clip":
            raise ClipError(f"--clip {path} has model_type {model_type!r}: not a CLIPModel checkpoint")
        try:
            model = CLIPModel.from_pretrained(path, local_files_only=True)
        except Exception as exc:
            raise ClipError(f"--clip {path}: not a loadable CLIPModel checkpoint: {_first_line(exc)}") from None
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            proc = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        except Exception as exc:
            raise ClipError(f"--clip {path}: no CLIP tokenizer / image processor saved with it: {_first_line(exc)}") from None
        dev = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                         else torch.device("cpu"))
        return cls(model, tok, proc, dev, path)

    @staticmethod
    def _features(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def score(self, images: Sequence[Any], texts: Sequence[str]) -> List[float]:
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images for {len(texts)} texts")
        if not images:
            return []
        px = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        tx = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_text, return_tensors="pt")
        tx = {k: v.to(self.device) for k, v in tx.items() if k in ("input_ids", "attention_mask")}
        img = self._features(self.model.get_image_features(pixel_values=px)).float()
        txt = self._features(self.model.get_text_features(**tx)).float()
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        return (100.0 * cos.clamp_min(0.0)).tolist()


def resolve_threshold(spec: Union[str, float, None], scorer: ImageScorer,
                      reference: Sequence[Tuple[Any, str]], batch: int = 16) -> Tuple[float, str]:
    """``(tau, how)`` for ``--clip-threshold spec``: a number, or ``auto`` calibrated on ``reference``.

    ``reference`` holds ``(image, text)`` pairs of the real data (images as PIL images or paths);
    ``how`` says where ``tau`` came from (written to the run's record).
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        pairs = list(reference)[:AUTO_PAIRS]
        if not pairs:
            raise ClipError("--clip-threshold auto needs training pairs (image + text) to calibrate on; "
                            "give a number instead")
        scores: List[float] = []
        for s in range(0, len(pairs), batch):
            chunk = pairs[s: s + batch]
            scores += scorer.score([_as_image(im) for im, _ in chunk], [t for _, t in chunk])
        scores.sort()
        k = max(1, math.ceil(AUTO_PERCENTILE / 100.0 * len(scores)))  # nearest-rank percentile
        return float(scores[k - 1]), f"auto: {AUTO_PERCENTILE:g}th percentile of {len(scores)} training pairs"
    try:
        tau = float(spec)
    except (TypeError, ValueError):
        raise ClipError(f"--clip-threshold must be 'auto' or a number in [0, 100], got {spec!r}") from None
    if not 0.0 <= tau <= 100.0:
        raise ClipError(f"--clip-threshold must be in [0, 100] (a CLIP score), got {tau}")
    return tau, "fixed"


def _as_image(im: Any) -> Any:
    if isinstance(im, str):
        from ..backbones.base import open_image

        return open_image(im)
    return im


class ClipJudge:
    """Judge of an image-output task: decode the generated image, score it with CLIP, compare with ``tau``.

    ``decode(generated) -> image or None`` and ``is_image_start(generated) -> bool`` come from
    the backbone; ``example.meta["clip_text"]`` is the text the image is scored against.
    """

    def __init__(self, scorer: ImageScorer, threshold: float, decode: Callable[[List[int]], Optional[Any]],
                 image_start: Optional[int]) -> None:
        self.scorer = scorer
        self.threshold = float(threshold)
        self.decode = decode
        self.image_start = image_start

    def __call__(self, generated: List[int], example: Example) -> Verdict:
        ids = [int(t) for t in generated]
        if not ids:
            return Verdict(False, "OTH")
        if ids[0] != self.image_start:
            return Verdict(False, "IUF")  # text (or anything but an image) where an image is asked
        image = self.decode(ids)
        if image is None:
            return Verdict(False, "OTH")  # an image that is not well-formed
        s = float(self.scorer.score([image], [str(example.meta["clip_text"])])[0])
        if s >= self.threshold:
            return Verdict(True, score=s)
        return Verdict(False, "HAL", score=s)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
