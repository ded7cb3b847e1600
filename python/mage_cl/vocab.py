"""The joint text + image-token vocabulary of the embedded digits benchmark.

The paper's Dual-to-Dual model (SEED-X) reads and writes images as discrete tokens in
the same sequence as text. This module is the miniature of that: one flat id space with

=========================  ===========================================================
ids                        meaning
=========================  ===========================================================
0 .. 5                     special tokens ``PAD BOS EOS SEP BOI EOI``
6 .. 6 + n_chars - 1       text tokens, one per character of :data:`TEXT_CHARS`
then ``levels`` ids        image tokens, one per pixel intensity level ``0..levels-1``
=========================  ===========================================================

``SEP`` separates the prompt from the answer, ``BOI``/``EOI`` wrap one image. An image of
shape ``[h, w]`` is ``BOI`` + ``h*w`` pixel tokens in row-major order + ``EOI``; its shape
is not encoded (each task fixes the shapes it reads and writes).

scikit-learn's 8x8 digits have intensities ``0..16``; :meth:`Vocab.quantize` maps them to
``levels`` evenly spaced levels (default 5: ``round(v * 4 / 16)``), and every image the
benchmark encodes is such a level map. The vocabulary is deterministic and picklable.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

import numpy as np

#: Special tokens, by id.
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<sep>", "<boi>", "<eoi>")
PAD, BOS, EOS, SEP, BOI, EOI = range(len(SPECIAL_TOKENS))

#: Characters that are text tokens (lowercase only: the benchmark's prompts are lowercase).
TEXT_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,:;?!'\"-[]()+=/"

#: How :meth:`Vocab.decode_text` renders a token that is not text (special or image token).
PLACEHOLDER = "\u25a1"

#: Largest intensity of ``sklearn.datasets.load_digits`` images.
DIGITS_MAX_INTENSITY = 16


class Vocab:
    """Joint vocabulary: special tokens, character text tokens and pixel-level image tokens.

    Args:
        levels: number of image intensity levels (image tokens), at least 2.
    """

    def __init__(self, levels: int = 5) -> None:
        if not isinstance(levels, int) or levels < 2:
            raise ValueError(f"levels must be an int >= 2, got {levels!r}")
        self.levels = levels
        self.text_offset = len(SPECIAL_TOKENS)
        self.image_offset = self.text_offset + len(TEXT_CHARS)
        self._char_to_id = {c: self.text_offset + i for i, c in enumerate(TEXT_CHARS)}

    # ------------------------------------------------------------------ sizes and ids
    @property
    def size(self) -> int:
        """Number of token ids (the model's vocabulary size)."""
        return self.image_offset + self.levels

    def __len__(self) -> int:
        return self.size

    pad_id = PAD
    bos_id = BOS
    eos_id = EOS
    sep_id = SEP
    boi_id = BOI
    eoi_id = EOI

    def is_special_token(self, token_id: int) -> bool:
        return 0 <= int(token_id) < self.text_offset

    def is_text_token(self, token_id: int) -> bool:
        return self.text_offset <= int(token_id) < self.image_offset

    def is_image_token(self, token_id: int) -> bool:
        """True for a pixel token (not for ``BOI``/``EOI``, which are special tokens)."""
        return self.image_offset <= int(token_id) < self.size

    # ------------------------------------------------------------------ text
    def encode_text(self, text: str) -> List[int]:
        """Character ids of ``text``; raises ``ValueError`` naming any character outside :data:`TEXT_CHARS`."""
        ids = []
        for pos, ch in enumerate(text):
            tid = self._char_to_id.get(ch)
            if tid is None:
                raise ValueError(
                    f"character {ch!r} at position {pos} of {text!r} is not in the vocabulary "
                    f"(allowed: {TEXT_CHARS!r})"
                )
            ids.append(tid)
        return ids

    def decode_text(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; every non-text token (special or image) becomes :data:`PLACEHOLDER`."""
        out = []
        for tid in ids:
            tid = int(tid)
            out.append(TEXT_CHARS[tid - self.text_offset] if self.is_text_token(tid) else PLACEHOLDER)
        return "".join(out)

    # ------------------------------------------------------------------ images
    def quantize(self, image: np.ndarray, max_value: float = DIGITS_MAX_INTENSITY) -> np.ndarray:
        """Map intensities in ``[0, max_value]`` to integer levels ``0..levels-1`` (round to nearest)."""
        arr = np.asarray(image, dtype=np.float64)
        if arr.size and (np.nanmin(arr) < 0 or np.nanmax(arr) > max_value or np.isnan(arr).any()):
            raise ValueError(f"image intensities must lie in [0, {max_value}]")
        return np.rint(arr * (self.levels - 1) / max_value).astype(np.int64)

    def encode_image(self, image: np.ndarray) -> List[int]:
        """``BOI`` + one token per pixel (row-major) + ``EOI`` for a 2-D array of levels ``0..levels-1``."""
        arr = np.asarray(image)
        if arr.ndim != 2 or arr.size == 0:
            raise ValueError(f"an image must be a non-empty 2-D array of levels, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            if not np.all(np.equal(np.mod(arr, 1), 0)):
                raise ValueError("image levels must be integers (use Vocab.quantize for raw intensities)")
            arr = arr.astype(np.int64)
        if arr.min() < 0 or arr.max() >= self.levels:
            raise ValueError(
                f"image levels must lie in [0, {self.levels - 1}], got [{arr.min()}, {arr.max()}]"
            )
        return [BOI] + (arr.reshape(-1).astype(np.int64) + self.image_offset).tolist() + [EOI]

    def decode_image(self, ids: Sequence[int], shape: Sequence[int]) -> Optional[np.ndarray]:
        """The level map of ``ids`` if they are exactly ``BOI`` + ``h*w`` pixel tokens + ``EOI``, else ``None``."""
        h, w = (int(s) for s in shape)
        ids = [int(t) for t in ids]
        if len(ids) != h * w + 2 or ids[0] != BOI or ids[-1] != EOI:
            return None
        pixels = ids[1:-1]
        if not all(self.is_image_token(t) for t in pixels):
            return None
        return (np.asarray(pixels, dtype=np.int64) - self.image_offset).reshape(h, w)

    # ------------------------------------------------------------------ misc
    def describe(self, ids: Iterable[int], shape: Optional[Sequence[int]] = None) -> str:
        """Human-readable rendering of a token sequence (specials by name, images as ``<image hxw>``)."""
        parts: List[str] = []
        ids = [int(t) for t in ids]
        i = 0
        while i < len(ids):
            tid = ids[i]
            if tid == BOI:
                j = i + 1
                while j < len(ids) and self.is_image_token(ids[j]):
                    j += 1
                closed = j < len(ids) and ids[j] == EOI
                parts.append(f"<image {j - i - 1} px{'' if closed else ', unterminated'}>")
                i = j + 1 if closed else j
                continue
            if self.is_special_token(tid):
                parts.append(SPECIAL_TOKENS[tid])
            elif self.is_text_token(tid):
                parts.append(TEXT_CHARS[tid - self.text_offset])
            elif self.is_image_token(tid):
                parts.append(f"<px{tid - self.image_offset}>")
            else:
                parts.append(f"<unk:{tid}>")
            i += 1
        return "".join(parts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and other.levels == self.levels

    def __hash__(self) -> int:
        return hash(("Vocab", self.levels))

    def __repr__(self) -> str:
        return f"Vocab(levels={self.levels}, size={self.size})"


def render_image(levels_map: np.ndarray, levels: int) -> str:
    """ASCII art of a level map (for printed examples and debugging)."""
    ramp = " .:*#@"
    arr = np.asarray(levels_map)
    scale = (len(ramp) - 1) / max(levels - 1, 1)
    return "\n".join("".join(ramp[int(round(v * scale))] for v in row) for row in arr)
