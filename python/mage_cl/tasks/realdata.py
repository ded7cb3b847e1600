"""Loader for the Continual-NExT annotation format (paper appendix 9.1), for real datasets.

Training files are JSONL, one image per line with its conversation as alternating turns::

    {"image": "xxx.jpg", "data": ["What is this photo taken looking through? Answer ...", "net",
                                   "What position is this man playing?", "pitcher"]}

Test files are JSON (an array of records; one record per line, JSONL, is accepted too)::

    {"question id": 262148000, "image": "xxx.jpg", "text": "Where is he looking? ...", "answer": "down"}
    {"question id": "34136", "image": "xxx.jpg", "text": "Please provide the bounding box ...",
     "answer bbox": "[0.38,0.41,0.51,0.67]"}                                   (RefCOCO)

``"question_id"`` is accepted for ``"question id"``; ``"answer"`` may be a list of accepted
answers (VQAv2 has ten per question).

Only the text-output tasks run on real data (VQAv2, ImageNet, OCRVQA, RefCOCO): producing and
scoring images (Flickr30k, HQEdit) needs the paper's visual de-tokenizer and CLIP, which this
package does not ship, so those raise ``NotImplementedError``. Without an ``image_encoder``
the prompts are text only and the task declares ``inputs={"text"}``.

Sequences: each turn ``k`` of a training conversation is one example whose prompt is the
image tokens (if any) + the previous turns + the k-th question (each question formatted with
:data:`PROMPT_TEMPLATE`, each earlier answer followed by a newline), and whose target is the
k-th answer + EOS. A test record is one example with the same layout and no history.

Judges (SPEC section 5 error types, rules of :mod:`mage_cl.error_types`): exact match after
normalization (lowercase, punctuation and articles removed, whitespace collapsed) for
VQAv2 / ImageNet / OCRVQA; IoU > 0.5 with ``"answer bbox"`` for RefCOCO. A wrong answer is IUF
when it has the wrong form (not yes/no for a yes/no answer, no number -- digits or a number
word -- for a numeric answer, no box for a box, an over-long phrase for a short-answer
question), OTH when empty or a repetition loop, HAL otherwise. The paper types errors with
a VLM; these rules are the documented, deterministic stand-in.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

from ..error_types import box_iou, is_number, parse_bbox, type_text_answer
from .base import Example, Task, Verdict

#: How a question becomes prompt text.
PROMPT_TEMPLATE = "{question}\n"

#: Canonical task ids of the text-output tasks and the paper datasets they load.
TEXT_TASKS = {"vqa": "VQAv2", "classification": "ImageNet", "ocr": "OCRVQA", "grounding": "RefCOCO"}
IMAGE_TASKS = {"generation": "Flickr30k", "editing": "HQEdit"}
_ALIASES = {**{k: k for k in list(TEXT_TASKS) + list(IMAGE_TASKS)},
            **{v.lower(): k for k, v in {**TEXT_TASKS, **IMAGE_TASKS}.items()}}


class Tokenizer(Protocol):
    """What the loader needs from a tokenizer (a Hugging Face tokenizer fits)."""

    eos_token_id: int

    def encode(self, text: str) -> List[int]: ...

    def decode(self, ids: List[int]) -> str: ...


def canonical_task_name(name: str) -> str:
    """``vqa``/``VQAv2`` ... -> the short task id; ``ValueError`` listing the valid names."""
    key = _ALIASES.get(str(name).lower())
    if key is None:
        valid = ", ".join(f"{k} ({v})" for k, v in {**TEXT_TASKS, **IMAGE_TASKS}.items())
        raise ValueError(f"unknown task {name!r}; valid tasks: {valid}")
    return key


# ---------------------------------------------------------------------- normalization
_ARTICLES = {"a", "an", "the"}
_NUMBER_WORDS = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                 "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
                 "eighteen", "nineteen", "twenty", "hundred", "thousand", "million"}


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation -> space (decimal points kept), articles dropped, whitespace collapsed."""
    s = str(text).lower().replace("\u2019", "'")
    s = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", s)  # a period that is not a decimal point
    s = re.sub(r"[^\w\s.]", " ", s)
    return " ".join(w for w in s.split() if w not in _ARTICLES)


def _answer_form(task: str, answers: Sequence[str]) -> Callable[[str], bool]:
    """The form a wrong answer must have to count as a hallucination rather than IUF."""
    if task == "grounding":
        return lambda s: parse_bbox(s) is not None
    norm = [normalize_answer(a) for a in answers]
    if norm and all(a in ("yes", "no") for a in norm):
        return lambda s: normalize_answer(s) in ("yes", "no")
    if any(is_number(a) for a in norm):  # a count / year / amount: the answer must hold a number
        return lambda s: any(is_number(w) or w in _NUMBER_WORDS for w in normalize_answer(s).split())
    longest = max((len(a.split()) for a in norm), default=1)
    limit = max(4, 2 * longest)  # "a single word or phrase"
    return lambda s: 0 < len(normalize_answer(s).split()) <= limit


class RealTextJudge:
    """Judge for a real-data text-output task; see the module docstring for the rules."""

    def __init__(self, task: str, tokenizer: Tokenizer, min_iou: float = 0.5) -> None:
        self.task = task
        self.tokenizer = tokenizer
        self.min_iou = min_iou

    def __call__(self, generated: List[int], example: Example) -> Verdict:
        ids = [int(t) for t in generated]
        try:  # a Hugging Face tokenizer would otherwise render pad/bos tokens as text
            text = self.tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[call-arg]
        except TypeError:
            text = self.tokenizer.decode(ids)
        text = text.strip()
        answers = list(example.meta["answers"])  # type: ignore[arg-type]
        if self.task == "grounding":
            box = parse_bbox(text)
            if box is not None and box_iou(box, example.meta["bbox"]) > self.min_iou:  # type: ignore[arg-type]
                return Verdict(True)
        elif normalize_answer(text) in {normalize_answer(a) for a in answers}:
            return Verdict(True)
        return Verdict(False, type_text_answer(text, _answer_form(self.task, answers)))


# ---------------------------------------------------------------------- reading files
def _read_jsonl(path: str) -> Iterator[Tuple[int, Dict[str, Any]]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def _read_test(path: str) -> List[Tuple[str, Dict[str, Any]]]:
    """``[(where, record)]`` from a JSON array (``where`` = record index) or a JSONL file (line number)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        out = []
        for k, record in enumerate(records):
            if not isinstance(record, dict):
                raise ValueError(f"{path}: record {k}: expected a JSON object, got {type(record).__name__}")
            out.append((f"{path}: record {k}", record))
        return out
    return [(f"{path}:{lineno}", record) for lineno, record in _read_jsonl(path)]


def _require(record: Dict[str, Any], key: str, where: str, kinds: Tuple[type, ...] = (str,)) -> Any:
    if key not in record:
        raise ValueError(f"{where}: missing key {key!r} (has {sorted(record)})")
    value = record[key]
    if not isinstance(value, kinds):
        raise ValueError(f"{where}: {key!r} must be {' or '.join(k.__name__ for k in kinds)}, "
                         f"got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------- building
class _Encoder:
    def __init__(self, tokenizer: Tokenizer, image_encoder: Optional[Callable[[str], List[int]]],
                 image_root: str) -> None:
        self.tokenizer = tokenizer
        self.image_encoder = image_encoder
        self.image_root = image_root
        if not hasattr(tokenizer, "eos_token_id") or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs an eos_token_id")
        self.eos = int(tokenizer.eos_token_id)

    def text(self, text: str) -> List[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def answer(self, text: str) -> List[int]:
        """Answer tokens without the BOS a Hugging Face tokenizer adds by default."""
        try:
            ids = self.tokenizer.encode(text, add_special_tokens=False)  # type: ignore[call-arg]
        except TypeError:
            ids = self.tokenizer.encode(text)
        return [int(t) for t in ids]

    def image(self, record: Dict[str, Any], where: str) -> List[int]:
        if self.image_encoder is None:
            return []
        name = _require(record, "image", where)
        path = name if os.path.isabs(name) else os.path.join(self.image_root, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{where}: image {path!r} not found (image_root={self.image_root!r})")
        return [int(t) for t in self.image_encoder(path)]


def _train_examples(path: str, task: str, enc: _Encoder, limit: Optional[int]) -> List[Example]:
    examples: List[Example] = []
    for lineno, record in _read_jsonl(path):
        where = f"{path}:{lineno}"
        turns = _require(record, "data", where, (list,))
        if not turns or len(turns) % 2:
            raise ValueError(f"{where}: 'data' must hold question/answer pairs, got {len(turns)} turns")
        if not all(isinstance(t, str) for t in turns):
            raise ValueError(f"{where}: every turn of 'data' must be a string")
        image = enc.image(record, where)
        history = ""
        for k in range(0, len(turns), 2):
            question, answer = turns[k], turns[k + 1]
            prompt_text = history + PROMPT_TEMPLATE.format(question=question)
            meta: Dict[str, Any] = {"answers": [answer], "source": where, "image": record.get("image")}
            if task == "grounding":
                box = parse_bbox(answer)
                if box is None:
                    raise ValueError(f"{where}: answer {k // 2} {answer!r} is not a box [x1,y1,x2,y2]")
                meta["bbox"] = box
            examples.append(Example(prompt=image + enc.text(prompt_text),
                                    target=enc.answer(answer) + [enc.eos], meta=meta))
            history = prompt_text + answer + "\n"
            if limit is not None and len(examples) >= limit:
                return examples
    return examples


def _test_examples(path: str, task: str, enc: _Encoder, limit: Optional[int]) -> List[Example]:
    examples: List[Example] = []
    for where, record in _read_test(path):
        qid = record.get("question id", record.get("question_id"))
        if qid is None:
            raise ValueError(f"{where}: missing key 'question id' (or 'question_id')")
        question = _require(record, "text", where)
        meta: Dict[str, Any] = {"question_id": qid, "source": where, "image": record.get("image")}
        if task == "grounding":
            raw = _require(record, "answer bbox", where, (str, list))
            box = parse_bbox(raw if isinstance(raw, str) else "[" + ",".join(str(v) for v in raw) + "]")
            if box is None:
                raise ValueError(f"{where}: 'answer bbox' {raw!r} is not a box [x1,y1,x2,y2]")
            answer = "[" + ",".join(f"{v:.2f}" for v in box) + "]"
            meta.update(bbox=box, answers=[answer])
        else:
            raw = _require(record, "answer", where, (str, list))
            answers = [raw] if isinstance(raw, str) else list(raw)
            if not answers or not all(isinstance(a, str) for a in answers):
                raise ValueError(f"{where}: 'answer' must be a string or a non-empty list of strings")
            answer = answers[0]
            meta["answers"] = answers
        examples.append(Example(prompt=enc.image(record, where) + enc.text(PROMPT_TEMPLATE.format(question=question)),
                                target=enc.answer(answer) + [enc.eos], meta=meta))
        if limit is not None and len(examples) >= limit:
            break
    return examples


def load_task(name: str, train_jsonl: str, test_json: str, tokenizer: Tokenizer,
              image_encoder: Optional[Callable[[str], List[int]]] = None,
              max_examples: Optional[int] = None, image_root: Optional[str] = None) -> Task:
    """Load one text-output Continual-NExT task from its annotation files.

    Args:
        name: ``vqa``/``VQAv2``, ``classification``/``ImageNet``, ``ocr``/``OCRVQA`` or
            ``grounding``/``RefCOCO`` (``generation``/``Flickr30k`` and ``editing``/``HQEdit``
            raise ``NotImplementedError``).
        train_jsonl, test_json: the annotation files (appendix 9.1 format).
        tokenizer: ``encode(str) -> list[int]``, ``decode(list[int]) -> str``, ``eos_token_id``.
        image_encoder: optional ``path -> list[int]`` image tokenizer; without it prompts are text only.
        max_examples: keep at most this many train and this many test examples (the first ones).
        image_root: folder image paths are relative to (default: the folder of each annotation file).
    """
    task = canonical_task_name(name)
    if task in IMAGE_TASKS:
        raise NotImplementedError(
            f"{IMAGE_TASKS[task]} ({task}) outputs images: producing and scoring them needs the paper's "
            "visual de-tokenizer and CLIP score, which this package does not ship. The real-data path runs "
            f"the text-output tasks ({', '.join(f'{k}/{v}' for k, v in TEXT_TASKS.items())}); image-output "
            "tasks run on the embedded digits benchmark (mage_cl.tasks.build_tasks).")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}")
    for path in (train_jsonl, test_json):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{TEXT_TASKS[task]} annotation file {path!r} not found")
    train = _train_examples(train_jsonl, task, _Encoder(
        tokenizer, image_encoder, image_root or os.path.dirname(os.path.abspath(train_jsonl))), max_examples)
    test = _test_examples(test_json, task, _Encoder(
        tokenizer, image_encoder, image_root or os.path.dirname(os.path.abspath(test_json))), max_examples)
    if not train:
        raise ValueError(f"{train_jsonl}: no training examples")
    if not test:
        raise ValueError(f"{test_json}: no test examples")
    longest = max(len(e.target) for e in train + test)
    return Task(
        name=task,
        paper_name=TEXT_TASKS[task],
        inputs=frozenset({"image", "text"} if image_encoder is not None else {"text"}),
        output="text",
        train=train,
        test=test,
        max_new_tokens=longest + 8,
        judge=RealTextJudge(task, tokenizer),
    )
