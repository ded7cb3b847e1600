"""The six Continual-NExT tasks on real data (paper appendix 9.1 formats; ALGORITHM.md §8).

Layout of ``--data-dir DIR``: one folder per task, named by its short id or its paper name
(``vqa``/``VQAv2``, ``classification``/``ImageNet``, ``generation``/``Flickr30k``,
``ocr``/``OCRVQA``, ``grounding``/``RefCOCO``, ``editing``/``HQEdit``), holding
``train.jsonl`` and ``test.json``; image paths in them are relative to that folder (or
absolute). Training files are JSONL, test files a JSON array (JSONL accepted too)::

    VQAv2 / ImageNet / OCRVQA / RefCOCO train:
        {"image": "xxx.jpg", "data": ["What is this photo taken looking through? ...", "net", "...?", "pitcher"]}
    VQAv2 / ImageNet / OCRVQA test:
        {"question id": 262148000, "image": "xxx.jpg", "text": "Where is he looking? ...", "answer": "down"}
    RefCOCO test:
        {"question id": "34136", "size": [640,424], "image": "xxx.jpg", "text": "Please provide the bounding box ...",
         "origin answer bbox": "[242.94,155.68,86.22,162.53]", "answer bbox": "[0.38,0.41,0.51,0.67]"}
    Flickr30k train:  {"image": "xxx.jpg", "data": ["Please generate the image.", "Two young guys with shaggy hair ..."]}
    Flickr30k test:   {"question id": "89779839", "text": "Please generate the image: A woman wearing ..."}
    HQEdit train:     {"source image": "xxx.jpg", "target image": "yyy.jpg", "instruction": "Add futuristic elements ..."}
    HQEdit test:      {"source image": "xxx.jpg", "target image": "target images/yyy.jpg",
                       "instruction": "Please generate the image: Replace the antique desk with ..."}

``"question_id"`` is accepted for ``"question id"``; ``"answer"`` may be a list of accepted
answers (VQAv2 has ten per question).

**Samples.** Each turn ``k`` of a training conversation is one example: the image, the earlier
turns and the k-th question as the prompt, the k-th answer + EOS as the target. A test record
is one example with the same layout and no history. Flickr30k: a (instruction, caption) pair
is one example whose prompt is ``"Please generate the image: <caption>"`` -- the test prompts'
form -- and whose answer is the image. HQEdit: the source image and
``"Please generate the image: <instruction>"`` (the prefix added where the training file lacks
it), answered by the target image.

**Two ways to build them.** :func:`load_backbone_task` (what ``mage-cl run --model`` uses): the
backbone renders prompts (its chat template) and keeps each image as a slot expanded when a
batch is built (:mod:`mage_cl.backbones`); every image file is checked here, before any
training, and a missing or unreadable one is named with its file and line. :func:`load_task`:
a plain tokenizer and, optionally, an ``image_encoder(path) -> ids`` whose ids are put
before the prompt text (text-output tasks only).

**Judges** (ALGORITHM.md §5 error types, rules of :mod:`mage_cl.error_types`): exact match
after normalization (lowercase, punctuation and articles removed, whitespace collapsed) for
VQAv2 / ImageNet / OCRVQA; IoU > 0.5 with ``"answer bbox"`` for RefCOCO. A wrong answer is IUF
when it is an image (image tokens where text is asked) or has the wrong form (not yes/no for a
yes/no answer, no number -- digits or a number word -- for a numeric answer, no box for a box,
an over-long phrase for a short-answer question), OTH when empty or a repetition loop, HAL
otherwise. Flickr30k and HQEdit: the CLIP score of the generated image against the caption /
instruction, :mod:`mage_cl.tasks.clip_judge` (its docstring says how the score becomes an
accuracy and how image answers are typed). The paper types errors with a VLM; these rules
are the documented, deterministic stand-in.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

from ..error_types import IUF, box_iou, is_number, parse_bbox, type_text_answer
from .base import Example, Task, Verdict

__all__ = [
    "PROMPT_TEMPLATE", "TEXT_TASKS", "IMAGE_TASKS", "ALL_TASKS", "Tokenizer", "canonical_task_name",
    "normalize_answer", "RealTextJudge", "find_task_files", "load_task", "load_backbone_task",
]

#: How a question becomes prompt text (plain template, no chat template).
PROMPT_TEMPLATE = "{question}\n"

#: Canonical task ids of the text-output tasks and the paper datasets they load.
TEXT_TASKS = {"vqa": "VQAv2", "classification": "ImageNet", "ocr": "OCRVQA", "grounding": "RefCOCO"}
#: Canonical task ids of the image-output tasks.
IMAGE_TASKS = {"generation": "Flickr30k", "editing": "HQEdit"}
ALL_TASKS = {**TEXT_TASKS, **IMAGE_TASKS}
_ALIASES = {**{k: k for k in ALL_TASKS}, **{v.lower(): k for k, v in ALL_TASKS.items()}}
#: The instruction of the image-output prompts (appendix 9.1).
GENERATE_PREFIX = "Please generate the image"


class Tokenizer(Protocol):
    """What the plain loader needs from a tokenizer (a Hugging Face tokenizer fits)."""

    eos_token_id: int

    def encode(self, text: str) -> List[int]: ...

    def decode(self, ids: List[int]) -> str: ...


def canonical_task_name(name: str) -> str:
    """``vqa``/``VQAv2`` ... -> the short task id; ``ValueError`` listing the valid names."""
    key = _ALIASES.get(str(name).lower())
    if key is None:
        valid = ", ".join(f"{k} ({v})" for k, v in ALL_TASKS.items())
        raise ValueError(f"unknown task {name!r}; valid tasks: {valid}")
    return key


def find_task_files(data_dir: str, name: str) -> Optional[Tuple[str, str]]:
    """``(train.jsonl, test.json)`` of task ``name`` under ``data_dir`` (folder: short id or paper name), or None."""
    task = canonical_task_name(name)
    for folder in (task, ALL_TASKS[task]):
        d = os.path.join(data_dir, folder)
        train, test = os.path.join(d, "train.jsonl"), os.path.join(d, "test.json")
        if os.path.isfile(train) and os.path.isfile(test):
            return train, test
    return None


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
    """Judge for a real-data text-output task; see the module docstring for the rules.

    ``is_image_token(id)`` (a backbone's) marks ids of the image modality: an answer holding
    one is an image where text is asked (IUF), whatever else it says.
    """

    def __init__(self, task: str, tokenizer: Tokenizer, min_iou: float = 0.5,
                 is_image_token: Optional[Callable[[int], bool]] = None) -> None:
        self.task = task
        self.tokenizer = tokenizer
        self.min_iou = min_iou
        self.is_image_token = is_image_token

    def __call__(self, generated: List[int], example: Example) -> Verdict:
        ids = [int(t) for t in generated]
        if self.is_image_token is not None and any(self.is_image_token(t) for t in ids):
            return Verdict(False, IUF)
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


def _turns(record: Dict[str, Any], where: str) -> List[Tuple[str, str]]:
    turns = _require(record, "data", where, (list,))
    if not turns or len(turns) % 2:
        raise ValueError(f"{where}: 'data' must hold question/answer pairs, got {len(turns)} turns")
    if not all(isinstance(t, str) for t in turns):
        raise ValueError(f"{where}: every turn of 'data' must be a string")
    return [(turns[k], turns[k + 1]) for k in range(0, len(turns), 2)]


def _generation_prompt(text: str) -> str:
    """``"Please generate the image: <text>"`` unless ``text`` already starts with the instruction."""
    t = text.strip()
    return t if t.lower().startswith(GENERATE_PREFIX.lower()) else f"{GENERATE_PREFIX}: {t}"


# ---------------------------------------------------------------------- encoders
class _PlainEncoder:
    """Plain tokenizer (+ optional eager image encoder): image ids, then the prompt text (with BOS)."""

    def __init__(self, tokenizer: Tokenizer, image_encoder: Optional[Callable[[str], List[int]]], root: str) -> None:
        self.tokenizer = tokenizer
        self.image_encoder = image_encoder
        self.root = root
        if not hasattr(tokenizer, "eos_token_id") or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs an eos_token_id")
        self.eos = int(tokenizer.eos_token_id)

    @property
    def reads_images(self) -> bool:
        return self.image_encoder is not None

    def resolve(self, name: str) -> str:
        return name if os.path.isabs(name) else os.path.join(self.root, name)

    def prompt(self, history: Sequence[Tuple[str, str]], question: str, images: Sequence[str], where: str
               ) -> Tuple[List[int], Dict[str, Any]]:
        ids: List[int] = []
        for name in images:
            path = self.resolve(name)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{where}: image {path!r} not found (image_root={self.root!r})")
            ids += [int(t) for t in self.image_encoder(path)]  # type: ignore[misc]
        text = "".join(q + "\n" + a + "\n" for q, a in history) + PROMPT_TEMPLATE.format(question=question)
        return ids + [int(t) for t in self.tokenizer.encode(text)], {}

    def text_target(self, answer: str) -> List[int]:
        """Answer tokens without the BOS a Hugging Face tokenizer adds by default, + EOS."""
        try:
            ids = self.tokenizer.encode(answer, add_special_tokens=False)  # type: ignore[call-arg]
        except TypeError:
            ids = self.tokenizer.encode(answer)
        return [int(t) for t in ids] + [self.eos]

    def text_judge(self, task: str) -> RealTextJudge:
        return RealTextJudge(task, self.tokenizer)


class _BackboneEncoder:
    """A backbone's prompts (chat template, image slots) and image checks; see :mod:`mage_cl.backbones`."""

    def __init__(self, backbone: Any, root: str) -> None:
        self.backbone = backbone
        self.root = root
        self._checked: Dict[str, Dict[str, Any]] = {}

    @property
    def reads_images(self) -> bool:
        return bool(self.backbone.reads_images)

    def resolve(self, name: str) -> str:
        return name if os.path.isabs(name) else os.path.join(self.root, name)

    def prompt(self, history: Sequence[Tuple[str, str]], question: str, images: Sequence[str], where: str
               ) -> Tuple[List[int], Dict[str, Any]]:
        paths = [self.resolve(n) for n in images]
        meta: Dict[str, Any] = {}
        if paths:
            key = "\0".join(paths)
            if key not in self._checked:
                self._checked[key] = self.backbone.image_meta(paths, where)
            meta = dict(self._checked[key])
        text = self.backbone.render_prompt(list(history), question, len(paths))
        return self.backbone.encode_prompt(text, len(paths), where), meta

    def text_target(self, answer: str) -> List[int]:
        return self.backbone.text_target(answer)

    def image_target(self, name: Optional[str], where: str, check: bool = True) -> Tuple[List[int], Dict[str, Any]]:
        from ..backbones.base import TARGET_IMAGE_SLOT, check_image

        path = None if name is None else self.resolve(name)
        if path is not None and check:
            check_image(path, where)
        return [TARGET_IMAGE_SLOT], {"target_image": path}

    def text_judge(self, task: str) -> RealTextJudge:
        return RealTextJudge(task, self.backbone.tokenizer, is_image_token=self.backbone.is_image_token)


# ---------------------------------------------------------------------- building
def _text_train(path: str, task: str, enc: Any, limit: Optional[int], bar: Any) -> List[Example]:
    examples: List[Example] = []
    for lineno, record in _read_jsonl(path):
        where = f"{path}:{lineno}"
        turns = _turns(record, where)
        images = [_require(record, "image", where)] if enc.reads_images else []
        history: List[Tuple[str, str]] = []
        for k, (question, answer) in enumerate(turns):
            prompt, extra = enc.prompt(history, question, images, where)
            meta: Dict[str, Any] = {"answers": [answer], "source": where, "image": record.get("image"), **extra}
            if task == "grounding":
                box = parse_bbox(answer)
                if box is None:
                    raise ValueError(f"{where}: answer {k} {answer!r} is not a box [x1,y1,x2,y2]")
                meta["bbox"] = box
            examples.append(Example(prompt=prompt, target=enc.text_target(answer), meta=meta))
            history.append((question, answer))
            if limit is not None and len(examples) >= limit:
                return examples
        bar.update(1)
    return examples


def _text_test(path: str, task: str, enc: Any, limit: Optional[int], bar: Any) -> List[Example]:
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
        images = [_require(record, "image", where)] if enc.reads_images else []
        prompt, extra = enc.prompt([], question, images, where)
        meta.update(extra)
        examples.append(Example(prompt=prompt, target=enc.text_target(answer), meta=meta))
        bar.update(1)
        if limit is not None and len(examples) >= limit:
            break
    return examples


def _generation_train(path: str, enc: _BackboneEncoder, limit: Optional[int], bar: Any) -> List[Example]:
    from .clip_judge import strip_instruction

    examples: List[Example] = []
    for lineno, record in _read_jsonl(path):
        where = f"{path}:{lineno}"
        target, tmeta = enc.image_target(_require(record, "image", where), where)
        for instruction, caption in _turns(record, where):
            # the paper's instruction "Please generate the image." + caption -> the test prompts' form
            paper = instruction.strip().lower().startswith(GENERATE_PREFIX.lower())
            text = f"{GENERATE_PREFIX}: {caption.strip()}" if paper else f"{instruction.strip()} {caption.strip()}"
            prompt, _ = enc.prompt([], text, [], where)
            examples.append(Example(prompt=prompt, target=list(target),
                                    meta={"source": where, "clip_text": strip_instruction(caption), **tmeta}))
            if limit is not None and len(examples) >= limit:
                return examples
        bar.update(1)
    return examples


def _generation_test(path: str, enc: _BackboneEncoder, limit: Optional[int], bar: Any) -> List[Example]:
    from .clip_judge import strip_instruction

    examples: List[Example] = []
    for where, record in _read_test(path):
        text = _generation_prompt(_require(record, "text", where))
        prompt, _ = enc.prompt([], text, [], where)
        target, tmeta = enc.image_target(record.get("image"), where, check=False)  # test images are not needed
        examples.append(Example(prompt=prompt, target=target,
                                meta={"question_id": record.get("question id", record.get("question_id")),
                                      "source": where, "clip_text": strip_instruction(text), **tmeta}))
        bar.update(1)
        if limit is not None and len(examples) >= limit:
            break
    return examples


def _editing(path: str, enc: _BackboneEncoder, limit: Optional[int], bar: Any, test: bool) -> List[Example]:
    from .clip_judge import strip_instruction

    examples: List[Example] = []
    records = _read_test(path) if test else [(f"{path}:{n}", r) for n, r in _read_jsonl(path)]
    for where, record in records:
        source = _require(record, "source image", where)
        text = _generation_prompt(_require(record, "instruction", where))
        prompt, meta = enc.prompt([], text, [source], where)
        target, tmeta = enc.image_target(_require(record, "target image", where), where, check=not test)
        meta.update(tmeta, source=where, clip_text=strip_instruction(text))
        if test:
            meta["question_id"] = record.get("question id", record.get("question_id", len(examples)))
        examples.append(Example(prompt=prompt, target=target, meta=meta))
        bar.update(1)
        if limit is not None and len(examples) >= limit:
            break
    return examples


def _check_files(task: str, *paths: str) -> None:
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{ALL_TASKS[task]} annotation file {path!r} not found")


def _finish(task: str, train: List[Example], test: List[Example], train_path: str, test_path: str,
            inputs: frozenset, output: str, judge: Any, max_new_tokens: int) -> Task:
    if not train:
        raise ValueError(f"{train_path}: no training examples")
    if not test:
        raise ValueError(f"{test_path}: no test examples")
    return Task(name=task, paper_name=ALL_TASKS[task], inputs=inputs, output=output, train=train, test=test,
                max_new_tokens=max_new_tokens, judge=judge)


def _no_bar() -> Any:
    class _Bar:
        def update(self, n: int = 1) -> None:
            pass

        def close(self) -> None:
            pass

    return _Bar()


def load_task(name: str, train_jsonl: str, test_json: str, tokenizer: Tokenizer,
              image_encoder: Optional[Callable[[str], List[int]]] = None,
              max_examples: Optional[int] = None, image_root: Optional[str] = None) -> Task:
    """Load one text-output Continual-NExT task with a plain tokenizer (no backbone).

    Args:
        name: ``vqa``/``VQAv2``, ``classification``/``ImageNet``, ``ocr``/``OCRVQA`` or
            ``grounding``/``RefCOCO`` (``generation``/``Flickr30k`` and ``editing``/``HQEdit``
            raise ``NotImplementedError``: they need a backbone, :func:`load_backbone_task`).
        train_jsonl, test_json: the annotation files (appendix 9.1 format).
        tokenizer: ``encode(str) -> list[int]``, ``decode(list[int]) -> str``, ``eos_token_id``.
        image_encoder: optional ``path -> list[int]`` image tokenizer; without it prompts are text only.
        max_examples: keep at most this many train and this many test examples (the first ones).
        image_root: folder image paths are relative to (default: the folder of each annotation file).
    """
    task = canonical_task_name(name)
    if task in IMAGE_TASKS:
        raise NotImplementedError(
            f"{IMAGE_TASKS[task]} ({task}) outputs images: producing and scoring them needs a backbone that "
            "writes images and a CLIP checkpoint (load_backbone_task; mage-cl run --model DIR --clip DIR). With a "
            f"plain tokenizer only the text-output tasks load ({', '.join(f'{k}/{v}' for k, v in TEXT_TASKS.items())}).")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}")
    _check_files(task, train_jsonl, test_json)
    bar = _no_bar()
    train = _text_train(train_jsonl, task, _PlainEncoder(
        tokenizer, image_encoder, image_root or os.path.dirname(os.path.abspath(train_jsonl))), max_examples, bar)
    test = _text_test(test_json, task, _PlainEncoder(
        tokenizer, image_encoder, image_root or os.path.dirname(os.path.abspath(test_json))), max_examples, bar)
    longest = max((len(e.target) for e in train + test), default=0)
    inputs = frozenset({"image", "text"} if image_encoder is not None else {"text"})
    return _finish(task, train, test, train_jsonl, test_json, inputs, "text", RealTextJudge(task, tokenizer),
                   longest + 8)


def load_backbone_task(name: str, train_jsonl: str, test_json: str, backbone: Any,
                       max_examples: Optional[int] = None, image_judge: Optional[Callable[[], Any]] = None,
                       progress: bool = False) -> Task:
    """Load one of the six Continual-NExT tasks for a backbone (:mod:`mage_cl.backbones`).

    Every image the task's samples read or answer with is checked here (exists, PIL reads it);
    a bad one raises ``BackboneError`` naming the annotation file and line. Image paths are
    relative to the folder of the annotation file (or absolute).

    Args:
        name: a task id or paper name (all six).
        train_jsonl, test_json: the annotation files (appendix 9.1 format).
        backbone: an opened backbone (prompts, image slots, text judge's image tokens).
        max_examples: keep at most this many train and this many test examples (the first ones).
        image_judge: for Flickr30k / HQEdit, ``factory(train_examples) -> judge`` (the CLIP judge,
            :mod:`mage_cl.tasks.clip_judge`; it may calibrate on the training pairs).
        progress: a progress bar over the records (image checks take a while on a full data set).
    """
    task = canonical_task_name(name)
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}")
    if task in IMAGE_TASKS and not backbone.writes_images:
        raise ValueError(f"{IMAGE_TASKS[task]}: {backbone.image_output_refusal}")
    if task in IMAGE_TASKS and image_judge is None:
        raise ValueError(f"{IMAGE_TASKS[task]} is judged by CLIP score: an image judge is needed")
    _check_files(task, train_jsonl, test_json)
    enc_train = _BackboneEncoder(backbone, os.path.dirname(os.path.abspath(train_jsonl)))
    enc_test = _BackboneEncoder(backbone, os.path.dirname(os.path.abspath(test_json)))
    from tqdm.auto import tqdm

    bar = tqdm(desc=f"load {ALL_TASKS[task]}", unit=" records", disable=not progress, leave=False)
    try:
        if task in TEXT_TASKS:
            train = _text_train(train_jsonl, task, enc_train, max_examples, bar)
            test = _text_test(test_json, task, enc_test, max_examples, bar)
        elif task == "generation":
            train = _generation_train(train_jsonl, enc_train, max_examples, bar)
            test = _generation_test(test_json, enc_test, max_examples, bar)
        else:
            train = _editing(train_jsonl, enc_train, max_examples, bar, test=False)
            test = _editing(test_json, enc_test, max_examples, bar, test=True)
    finally:
        bar.close()
    if task in TEXT_TASKS:
        inputs = frozenset({"image", "text"} if backbone.reads_images else {"text"})
        longest = max((len(e.target) for e in train + test), default=0)
        return _finish(task, train, test, train_jsonl, test_json, inputs, "text", enc_train.text_judge(task),
                       longest + 8)
    inputs = frozenset({"text"} if task == "generation" else {"image", "text"})
    if not train:
        raise ValueError(f"{train_jsonl}: no training examples")
    return _finish(task, train, test, train_jsonl, test_json, inputs, "image", image_judge(train),
                   int(backbone.target_image_length))
