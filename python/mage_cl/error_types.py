"""Rule-based typing of wrong answers into IUF / HAL / OTH (ALGORITHM.md §5).

The paper asks a large VLM which type a wrong answer is; this project uses fixed rules,
applied in this order (the first rule that matches decides):

1. ``OTH`` -- the answer is empty.
2. ``IUF`` (instruction unfollowing) -- the answer is in the wrong modality: image tokens
   where text is asked, text tokens where an image is asked, or stray special tokens.
3. ``OTH`` -- the answer is broken: a repetition loop (text), or an image that is not
   well-formed (truncated, wrong pixel count, missing ``BOI``/``EOI``).
4. ``IUF`` -- the answer does not have the form the instruction asks: no yes/no where
   yes/no is asked, no number where a number is asked, no class name where a class name is
   asked, no box where a box is asked.
5. ``HAL`` (hallucination) -- a well-formed answer of the right form that is wrong.

Instruction unfollowing wins over hallucination: a wrong answer is typed exactly once, so
every test example is exactly one of correct / IUF / HAL / OTH and
``Forgetting = Avg.IUF + Avg.HAL + Avg.OTH`` holds (:mod:`mage_cl.metrics`).

The text-level helpers (:func:`type_text_answer`, :func:`parse_bbox`, ...) work on decoded
strings and are shared with the real-data loader (:mod:`mage_cl.tasks.realdata`).
"""

from __future__ import annotations

import re
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from .vocab import Vocab

IUF, HAL, OTH = "IUF", "HAL", "OTH"

#: Class names of the ten digits, as the classification task answers them.
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

_NUMBER_RE = re.compile(r"^-?\d+(\.\d+)?$")
_FLOAT = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BBOX_RE = re.compile(r"^\s*\[" + ",".join([_FLOAT] * 4) + r"\]\s*$")


# ---------------------------------------------------------------------- forms
def is_yes_no(text: str) -> bool:
    return text.strip() in ("yes", "no")


def is_number(text: str) -> bool:
    """A (signed, optionally decimal) number and nothing else."""
    return bool(_NUMBER_RE.match(text.strip()))


def is_digit_word(text: str) -> bool:
    return text.strip() in DIGIT_WORDS


def parse_bbox(text: str) -> Optional[Tuple[float, float, float, float]]:
    """``[x1,y1,x2,y2]`` (four numbers in brackets, any spacing) -> floats, else ``None``."""
    m = _BBOX_RE.match(text)
    if m is None:
        return None
    return tuple(float(g) for g in m.groups())  # type: ignore[return-value]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x1,y1,x2,y2]`` boxes; an inverted or empty box has area 0."""
    ax1, ay1, ax2, ay2 = a
    bx1, by1, bx2, by2 = b
    area_a = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1)
    area_b = max(0.0, bx2 - bx1) * max(0.0, by2 - by1)
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def is_repetition_loop(seq: Sequence[object], min_repeats: int = 4, max_period: int = 4) -> bool:
    """True when the sequence ends in one unit of ``<= max_period`` items repeated ``>= min_repeats`` times.

    Catches the degenerate ``"yesyesyesyes"`` / ``"7777777"`` outputs of a forgetting model;
    a short legitimate answer (``"11"``, ``"100"``) is shorter than ``min_repeats`` units.
    """
    items = list(seq)
    n = len(items)
    for period in range(1, max_period + 1):
        need = period * min_repeats
        if n < need:
            break
        tail = items[n - need:]
        unit = tail[:period]
        if all(tail[k] == unit[k % period] for k in range(need)):
            return True
    return False


# ---------------------------------------------------------------------- typing strings
def type_text_answer(text: str, form_ok: Callable[[str], bool]) -> str:
    """Type a WRONG decoded text answer: empty -> OTH, loop -> OTH, wrong form -> IUF, else HAL."""
    if not text.strip():
        return OTH
    if is_repetition_loop(text):
        return OTH
    if not form_ok(text):
        return IUF
    return HAL


# ---------------------------------------------------------------------- typing token ids
def type_text_tokens(generated: Sequence[int], vocab: Vocab, form_ok: Callable[[str], bool]) -> str:
    """Type a WRONG answer to a text-output task of the digits benchmark (rules 1-5 above)."""
    ids = [int(t) for t in generated]
    if not ids:
        return OTH
    if any(not vocab.is_text_token(t) for t in ids):
        return IUF  # image tokens (or BOI/EOI/SEP/BOS) where text is asked
    return type_text_answer(vocab.decode_text(ids), form_ok)


def type_image_tokens(generated: Sequence[int], vocab: Vocab, shape: Sequence[int]) -> str:
    """Type a WRONG answer to an image-output task: text -> IUF, malformed image -> OTH, else HAL."""
    ids = [int(t) for t in generated]
    if not ids:
        return OTH
    if any(vocab.is_text_token(t) for t in ids):
        return IUF  # text where an image is asked
    if vocab.decode_image(ids, shape) is None:
        return OTH  # truncated / overlong / unterminated image
    return HAL


def error_rates(errors: List[Optional[str]]) -> dict:
    """Percentages (0-100) of correct answers and of each error type over a task's test verdicts."""
    n = len(errors)
    if n == 0:
        raise ValueError("no verdicts to summarize")
    out = {"ACC": 100.0 * sum(e is None for e in errors) / n}
    for kind in (IUF, HAL, OTH):
        out[kind] = 100.0 * sum(e == kind for e in errors) / n
    return out


def ink_pixels(image: np.ndarray) -> int:
    """Number of non-zero pixels of a level map."""
    return int(np.count_nonzero(np.asarray(image)))
