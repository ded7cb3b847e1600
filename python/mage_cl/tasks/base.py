"""The task interface shared by the embedded digits benchmark and the real-data loader.

A continual-learning *task* is a list of training and test examples in one joint
token space (text and image tokens, see :mod:`mage_cl.vocab`), the modalities it
reads and writes (which decide MAGE's trainable adapters), and a judge that scores
a generated answer and, when it is wrong, types the error (ALGORITHM.md §5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Optional

#: Error types of ALGORITHM.md §5: instruction unfollowing, hallucination, other.
ERROR_TYPES = ("IUF", "HAL", "OTH")


@dataclass
class Example:
    """One sample: the model reads ``prompt`` and must generate ``target`` (which ends with EOS)."""

    prompt: List[int]
    target: List[int]
    meta: Dict[str, object] = field(default_factory=dict)  # what the judge needs (label, bbox, ...)


@dataclass(frozen=True)
class Verdict:
    """The judge's answer for one generated sequence.

    ``score`` is the judge's raw number when it has one (the CLIP score of an image answer,
    :mod:`mage_cl.tasks.clip_judge`); the trainer reports its mean per task.
    """

    correct: bool
    error: Optional[str] = None  # None when correct, else one of ERROR_TYPES
    score: Optional[float] = None

    def __post_init__(self) -> None:
        if self.correct and self.error is not None:
            raise ValueError("a correct answer has no error type")
        if not self.correct and self.error not in ERROR_TYPES:
            raise ValueError(f"a wrong answer needs an error type in {ERROR_TYPES}, got {self.error!r}")


@dataclass
class Task:
    """A continual-learning task.

    ``name`` is the short id used on the command line (``vqa``, ``classification``,
    ``generation``, ``ocr``, ``grounding``, ``editing``); ``paper_name`` the paper's
    dataset it stands in for (``VQAv2``, ``ImageNet``, ``Flickr30k``, ``OCRVQA``,
    ``RefCOCO``, ``HQEdit``). ``judge(generated_token_ids, example)`` returns a
    :class:`Verdict`; ``generated_token_ids`` is what the model produced after the
    prompt, cut at (and excluding) the first EOS.
    """

    name: str
    paper_name: str
    inputs: FrozenSet[str]  # subset of {"text", "image"}
    output: str  # "text" or "image"
    train: List[Example]
    test: List[Example]
    max_new_tokens: int
    judge: Callable[[List[int], Example], Verdict]
