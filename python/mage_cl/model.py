"""The small Dual-to-Dual model of the embedded benchmark, and the ``--model PATH`` loader.

The paper fine-tunes SEED-X, a multimodal LLM that reads and writes both text and
images. This module builds the miniature stand-in: a LLaMA-architecture causal LM
(``transformers.LlamaForCausalLM``) over the *joint* vocabulary of
:class:`mage_cl.vocab.Vocab` (text tokens and discrete image tokens), so one model
reads and writes both modalities.

Before the continual sequence it is *pretrained briefly on a mixture* (:data:`MIXTURE`) built
only from the benchmark's training split:

* plain modelling -- each image-token run found in a training example, alone
  (``BOS image EOS``), and each text span of a training prompt, alone;
* an answer-form prior (:func:`_format_prior`) -- the tasks' training prompts, each followed by
  an answer of the right *form* drawn independently of its image (another example's answer of
  the same task and form, or a random unedited digit for image answers);
* generic instruction following -- 22 small tasks that are none of the six (repeat / reverse /
  count the letters of a word, yes/no questions about words and images, copy or blank an image,
  the box around its ink, draw a square or a frame; see :func:`_generic_instruction`),

so the model knows the statistics of both modalities and, like an instruction-tuned base
model, answers each kind of prompt in the right form (zero-shot IUF 0 on the ``cpu`` preset),
but at chance content: none of the six tasks' input -> output mappings is taught (those are
what continual learning must teach). Without the answer-form prior every adapter had to teach
the form as well, and that form then applied to every prompt: all methods forgot everything
(``bench/results/cl_cpu_v3_2026-11-25/probes/README.md``).

The pretrained weights are cached on disk (``$MAGE_CL_CACHE`` or ``~/.cache/mage_cl``) under
a key hashed from the model config, the pretraining config, the mixture's name, the
vocabulary, the seed and the corpus itself; they are reproducible from the seed. The model is
then frozen and MageLinear adapters are injected by the methods (:mod:`mage_cl.methods`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .error_types import DIGIT_WORDS
from .tasks.digits import DIGIT_SHAPE, GROUNDING_CANVAS, OCR_SHAPE, _ink_bbox, format_bbox

__all__ = [
    "MIXTURE",
    "ModelConfig",
    "PretrainConfig",
    "build_model",
    "cache_dir",
    "pretrain_corpus",
    "pretrain",
    "load_pretrained",
    "base_model_key",
    "load_local_model",
    "model_bytes",
]

#: Bump when the pretraining recipe changes, so stale caches are not reused.
_RECIPE_VERSION = 2


@dataclass(frozen=True)
class ModelConfig:
    """Size of the tiny LLaMA (a ``transformers.LlamaConfig`` is built from it)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 176
    max_positions: int = 512


@dataclass(frozen=True)
class PretrainConfig:
    """The brief generic pretraining (steps of AdamW on the mixture)."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    max_sequences: int = 4000  # the corpus is subsampled to at most this many sequences
    #: Fraction of the corpus that is the knowledge prior (:func:`_knowledge_prior`); 0 = the v3 mixture.
    knowledge_fraction: float = 0.0
    #: Which knowledge templates (comma-separated subset of :data:`KNOWLEDGE_KINDS`).
    knowledge_kinds: str = "describe,show,facts,small"


#: Base models shipped with the package (``mage_cl/bases/base_<key>.pt``): the ``cpu`` preset's
#: base for seed 0 (the one the committed comparison used, bit for bit), so a run of it does not
#: spend minutes pretraining and starts from the identical weights (on another CPU type the runs
#: themselves may still differ in the last bits: bench/results/cl_cpu_v5_2026-12-04/README.md). A
#: shipped file is used only when its key -- the hash of the whole recipe and corpus -- matches;
#: any other seed or recipe is pretrained and cached as usual. ``tests/test_bundled_base.py``
#: checks that the shipped file matches the current recipe.
BUNDLED_BASES = Path(__file__).resolve().parent / "bases"


def cache_dir() -> Path:
    """``$MAGE_CL_CACHE`` if set, else ``~/.cache/mage_cl``."""
    env = os.environ.get("MAGE_CL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mage_cl"


def build_model(vocab, cfg: ModelConfig, seed: int = 0):
    """A freshly initialized ``LlamaForCausalLM`` over ``vocab`` (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
    lcfg = LlamaConfig(
        vocab_size=vocab.size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        pad_token_id=vocab.pad_id,
        bos_token_id=vocab.bos_id,
        eos_token_id=vocab.eos_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(lcfg)
    return model


def _runs(ids: Sequence[int], pred) -> List[List[int]]:
    """Maximal runs of consecutive ids for which ``pred(id)`` holds."""
    out: List[List[int]] = []
    cur: List[int] = []
    for t in ids:
        if pred(t):
            cur.append(t)
        elif cur:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


#: Name of the generic pretraining mixture; part of the cache key (bump on any change).
MIXTURE = "format-prior-and-generic-instructions-v3"

#: Fraction of the mixture that is plain modelling (lone images, lone prompt texts).
PLAIN_FRACTION = 0.25

#: Fraction that is the answer-form prior (:func:`_format_prior`); the rest is generic
#: instruction following (:func:`_generic_instruction`).
FORMAT_FRACTION = 0.25


def _format_prior(vocab, rng: random.Random, train_sets: List[List], n: int) -> List[List[int]]:
    """``n`` sequences teaching the *form* of each training prompt's answer, not its content.

    Each is a training prompt followed by an answer drawn at random, independent of the
    prompt's image: the answer of another training example of the same task and the same
    answer form (``meta["form"]``: yes/no, number, class word, box), or, when the task
    answers with an image, a random training digit image (never an edited one, so nothing of
    an edit's rule leaks). The base model thus answers a question of each kind in the right
    form, at chance content -- as an instruction-tuned multimodal LLM answers VQAv2 with a word
    and RefCOCO with a box before it is fine-tuned on them -- while the input -> answer
    mappings stay for continual learning to teach. Zero-shot accuracy is then the chance rate
    of each task (reported by ``mage-cl run --method zero-shot``).
    """
    digit_pixels = DIGIT_SHAPE[0] * DIGIT_SHAPE[1]
    groups: Dict[Tuple[int, str], List] = {}
    sources: List[List[int]] = []
    for t, examples in enumerate(train_sets):
        for ex in examples:
            first = ex.target[0] if ex.target else None
            form = "image" if first == vocab.boi_id else str(ex.meta.get("form", "text"))
            groups.setdefault((t, form), []).append(ex)
            for run in _runs(ex.prompt, vocab.is_image_token):
                if len(run) == digit_pixels:  # a digit as the prompt shows it (pixels only)
                    sources.append(run)
    keys = sorted(groups)
    out: List[List[int]] = []
    if not keys:
        return out
    for _ in range(n):
        key = keys[rng.randrange(len(keys))]
        group = groups[key]
        ex = rng.choice(group)
        if key[1] == "image" and sources:
            answer = [vocab.boi_id] + rng.choice(sources) + [vocab.eoi_id, vocab.eos_id]
        else:
            answer = list(rng.choice(group).target)
        out.append(list(ex.prompt) + answer)
    return out


#: Templates of the knowledge prior: what a pretrained multimodal LLM knows before instruction
#: tuning, none of them one of the six tasks' mappings.
KNOWLEDGE_KINDS = ("describe", "show", "facts", "small", "strip", "smallbox")


def _knowledge_prior(vocab, rng: random.Random, seed: int, n: int, kinds: Sequence[str]) -> List[List[int]]:
    """``n`` sequences of general knowledge about the digits, in forms none of the six tasks uses.

    * ``describe``: a train digit + ``describe the image.`` -> ``a handwritten 7.`` (recognition,
      answered in a caption form; the classification task answers ``seven``);
    * ``show``: ``show a handwritten 7.`` -> a train image of a 7 (drawing from a numeral; the
      generation task asks ``draw the digit seven.``);
    * ``facts``: text-only arithmetic and comparisons on numerals (``is 7 even?``, ``is 7 greater
      than 3?``, ``what is 7 plus 2?``, ``is 7 equal to 4?``) -- language knowledge, no image;
    * ``small``: one digit shrunk to 6x6 at a random place of a 12x12 canvas + ``describe the
      image.`` -> ``a small handwritten 7.``;
    * ``strip``: an 8x16 strip of two train digits + ``describe the image.`` -> ``a handwritten 4
      and a handwritten 7.``;
    * ``smallbox``: one small digit on a 12x12 canvas + ``where is the ink?`` -> its box.
    """
    from .tasks.digit_images import _raw_digits, global_split, load_digit_levels
    from .tasks.digits import resize_digit

    unknown = sorted(set(kinds) - set(KNOWLEDGE_KINDS))
    if unknown:
        raise ValueError(f"unknown knowledge kinds {unknown}; choose from {', '.join(KNOWLEDGE_KINDS)}")
    levels_maps, labels = load_digit_levels(vocab)
    raw, _ = _raw_digits()
    train_idx = [int(i) for i in global_split(seed)[0]]
    by_class: Dict[int, List[int]] = {}
    for i in train_idx:
        by_class.setdefault(int(labels[i]), []).append(i)
    enc = vocab.encode_text
    H, W = GROUNDING_CANVAS
    out: List[List[int]] = []
    kinds = list(kinds)
    for _ in range(n):
        kind = kinds[rng.randrange(len(kinds))]
        i = train_idx[rng.randrange(len(train_idx))]
        y = int(labels[i])
        img: List[int] = []
        if kind == "describe":
            img, text, ans = vocab.encode_image(levels_maps[i]), "describe the image.", enc(f"a handwritten {y}.")
        elif kind == "show":
            j = by_class[y][rng.randrange(len(by_class[y]))]
            text, ans = f"show a handwritten {y}.", vocab.encode_image(levels_maps[j])
        elif kind == "facts":
            k = rng.randrange(10)
            text, a = [
                (f"is {y} even?", "yes" if y % 2 == 0 else "no"),
                (f"is {y} greater than {k}?", "yes" if y > k else "no"),
                (f"what is {y} plus {k % 3 + 1}?", str(y + k % 3 + 1)),
                (f"is {y} equal to {k}?", "yes" if y == k else "no"),
            ][rng.randrange(4)]
            ans = enc(a)
        elif kind in ("small", "smallbox"):
            s = 6
            canvas = np.zeros((H, W), dtype=np.int64)
            r, c = rng.randrange(H - s + 1), rng.randrange(W - s + 1)
            canvas[r:r + s, c:c + s] = vocab.quantize(resize_digit(raw[i], s))
            img = vocab.encode_image(canvas)
            if kind == "small":
                text, ans = "describe the image.", enc(f"a small handwritten {y}.")
            else:
                text, ans = "where is the ink?", enc(_ink_box(img[1:-1], vocab.image_offset))
        else:  # strip
            j = train_idx[rng.randrange(len(train_idx))]
            strip = np.concatenate([levels_maps[i], levels_maps[j]], axis=1)
            img, text = vocab.encode_image(strip), "describe the image."
            ans = enc(f"a handwritten {y} and a handwritten {int(labels[j])}.")
        out.append([vocab.bos_id] + img + enc(text) + [vocab.sep_id] + ans + [vocab.eos_id])
    return out


def _words(text_runs: Iterable[Sequence[int]], vocab) -> List[str]:
    """Distinct alphabetic words (2-8 letters) of the decoded text runs, in first-seen order."""
    seen: Dict[str, None] = {}
    for run in text_runs:
        for w in re.findall(r"[a-z]+", vocab.decode_text(run)):
            if 2 <= len(w) <= 8:
                seen.setdefault(w, None)
    return list(seen)


#: Image shape of an image-token run, from its length (the benchmark's digits, OCR strips and
#: grounding canvases); other lengths are treated as one row.
_RUN_SHAPES = {h * w: (h, w) for h, w in (DIGIT_SHAPE, OCR_SHAPE, GROUNDING_CANVAS)}


def _ink_box(run: Sequence[int], offset: int) -> str:
    """``[x1,y1,x2,y2]`` (normalized, 2 decimals) around the non-zero pixels of an image run."""
    h, w = _RUN_SHAPES.get(len(run), (1, len(run)))
    levels_map = np.asarray(run, dtype=np.int64).reshape(h, w) - offset
    if not levels_map.any():
        return format_bbox((0.0, 0.0, 0.0, 0.0))
    r0, c0, r1, c1 = _ink_bbox(levels_map)
    return format_bbox((c0 / w, r0 / h, (c1 + 1) / w, (r1 + 1) / h))


def _generic_instruction(vocab, rng: random.Random, images: List[List[int]], words: List[str]) -> List[int]:
    """One generic instruction-following sequence ``BOS [image] text SEP answer EOS``.

    None of these is one of the six benchmark tasks' mappings; together they teach the
    *instruction-following prior* the paper's base model has: the form of the answer follows
    the instruction (a yes/no question gets ``yes``/``no``, ``how many`` a number, ``what`` a
    word, ``where`` a box, ``draw``/``make``/``copy`` an image), with several templates per form
    so the prior is keyed on the instruction, not memorized per template. Templates (drawn
    uniformly, 22 in all):

    * text -> text: repeat / spell backwards / first letter of a word, the next letter, letters
      or vowels in a word (numbers), ``is <word> longer than <k> letters?``, ``does <word>
      start with <c>?`` (yes/no), a number written in words and back (general language
      knowledge every LLM has; no image involved);
    * image + text -> text: bright pixels, or dark pixels of the top row (numbers); is the
      first pixel dark, is the top row blank, is the image mostly dark (yes/no); ``what is the
      first pixel?`` (``dark`` / ``gray`` / ``bright``); ``where is the ink?`` (the box
      around every non-zero pixel, the grounding answer format, not its mapping: it never
      names or separates digits);
    * image + text -> image: copy it, blank it, keep its top half (bottom half blanked);
    * text -> image: draw a blank / full square, draw a frame (8 x 8).
    """
    enc = vocab.encode_text
    off = vocab.image_offset
    top = off + vocab.levels - 1
    kind = rng.randrange(22)
    img: List[int] = []
    if kind <= 9:  # text -> text
        w = rng.choice(words)
        c = rng.choice("abcdefghijklmnopqrstuvwxy")
        n = rng.randrange(10)
        text, ans = [
            (f"repeat: {w}", w),
            (f"spell {w} backwards.", w[::-1]),
            (f"what is the first letter of {w}?", w[0]),
            (f"what comes after {c}?", chr(ord(c) + 1)),
            (f"how many letters in {w}?", str(len(w))),
            (f"how many vowels in {w}?", str(sum(ch in "aeiou" for ch in w))),
            (f"is {w} longer than {n % 6 + 2} letters?", "yes" if len(w) > n % 6 + 2 else "no"),
            (f"does {w} start with {c}?", "yes" if w[0] == c else "no"),
            (f"write {n} in words.", DIGIT_WORDS[n]),
            (f"write {DIGIT_WORDS[n]} as a number.", str(n)),
        ][kind]
        ans = enc(ans)
    elif kind <= 18:  # image + text -> text / image
        run = rng.choice(images)
        img = [vocab.boi_id] + run + [vocab.eoi_id]
        h, w_ = _RUN_SHAPES.get(len(run), (1, len(run)))
        mid = off + vocab.levels // 2
        if kind == 10:
            text, ans = "how many bright pixels?", enc(str(sum(t == top for t in run)))
        elif kind == 11:
            text, ans = "how many dark pixels in the top row?", enc(str(sum(t == off for t in run[:w_])))
        elif kind == 12:
            text, ans = "is the first pixel dark?", enc("yes" if run[0] == off else "no")
        elif kind == 13:
            text, ans = "is the top row blank?", enc("yes" if all(t == off for t in run[:w_]) else "no")
        elif kind == 14:
            text, ans = "is the image mostly dark?", enc("yes" if 2 * sum(t == off for t in run) > len(run) else "no")
        elif kind == 15:
            word = "dark" if run[0] == off else ("bright" if run[0] >= mid else "gray")
            text, ans = "what is the first pixel?", enc(word)
        elif kind == 16:
            text, ans = "where is the ink?", enc(_ink_box(run, off))
        elif kind == 17:
            text, ans = "copy the image.", list(img)
        else:
            blank_from = (h // 2) * w_
            text = rng.choice(["make it blank.", "keep the top half."])
            kept = run[:blank_from] if text == "keep the top half." else []
            ans = [vocab.boi_id] + kept + [off] * (len(run) - len(kept)) + [vocab.eoi_id]
    else:  # text -> image
        text = ["draw a blank square.", "draw a full square.", "draw a frame."][kind - 19]
        if kind == 21:
            pix = [top if r in (0, 7) or c in (0, 7) else off for r in range(8) for c in range(8)]
        else:
            pix = [off if kind == 19 else top] * 64
        ans = [vocab.boi_id] + pix + [vocab.eoi_id]
    return [vocab.bos_id] + img + enc(text) + [vocab.sep_id] + ans + [vocab.eos_id]


def pretrain_corpus(vocab, train_sets: Iterable[Sequence], max_sequences: int, seed: int,
                    knowledge_fraction: float = 0.0, knowledge_kinds: Sequence[str] = ()) -> List[List[int]]:
    """The pretraining mixture (:data:`MIXTURE`), built from the training examples only.

    * plain modelling (:data:`PLAIN_FRACTION`): lone image-token runs (``BOS BOI image EOI
      EOS``) and lone prompt text spans;
    * the answer-form prior (:data:`FORMAT_FRACTION`, :func:`_format_prior`): training prompts
      with answers of the right form drawn independently of the prompt's image;
    * generic instruction following (:func:`_generic_instruction`, the rest) over the same
      training images and the words of the training prompts.

    A prompt is followed by an answer drawn at random from its task's answers of the same form,
    independently of its image (its own answer only by chance), so none of the six tasks'
    input -> output mappings is learned here -- only the answer forms. Deterministic given
    ``seed``.
    """
    train_sets = [list(examples) for examples in train_sets]
    runs, images, texts = [], [], []
    seen_img, seen_txt = set(), set()
    for examples in train_sets:
        for ex in examples:
            for run in _runs(list(ex.prompt) + list(ex.target), vocab.is_image_token):
                key = tuple(run)
                if key not in seen_img:
                    seen_img.add(key)
                    runs.append(run)
                    images.append([vocab.bos_id, vocab.boi_id] + run + [vocab.eoi_id, vocab.eos_id])
            for run in _runs(ex.prompt, vocab.is_text_token):
                key = tuple(run)
                if len(run) > 1 and key not in seen_txt:
                    seen_txt.add(key)
                    texts.append(run)
    if not images and not texts:
        raise ValueError("the pretraining corpus is empty: the tasks have no training examples")
    words = _words(texts, vocab)
    texts = [[vocab.bos_id] + run + [vocab.eos_id] for run in texts]
    rng = random.Random(seed)
    rng.shuffle(images)
    rng.shuffle(texts)
    n_plain = int(round(PLAIN_FRACTION * max_sequences))
    n_txt = min(len(texts), n_plain // 4)
    corpus = images[: n_plain - n_txt] + texts[:n_txt]
    corpus += _format_prior(vocab, rng, train_sets, int(round(FORMAT_FRACTION * max_sequences)))
    if knowledge_fraction > 0:
        corpus += _knowledge_prior(vocab, rng, seed, int(round(knowledge_fraction * max_sequences)),
                                   knowledge_kinds)
    if runs and words:
        corpus += [_generic_instruction(vocab, rng, runs, words) for _ in range(max_sequences - len(corpus))]
    rng.shuffle(corpus)
    return corpus


def _key(vocab, mcfg: ModelConfig, pcfg: PretrainConfig, seed: int, corpus: List[List[int]]) -> str:
    h = hashlib.sha256()
    pre = asdict(pcfg)
    if not pcfg.knowledge_fraction:  # the v3 mixture: the same key as before the knowledge prior existed
        pre.pop("knowledge_fraction")
        pre.pop("knowledge_kinds")
    h.update(json.dumps({"v": _RECIPE_VERSION, "mixture": MIXTURE, "model": asdict(mcfg), "pretrain": pre,
                         "vocab": vocab.size, "seed": seed}, sort_keys=True).encode())
    for seq in corpus:
        h.update(b"|" + ",".join(map(str, seq)).encode())
    return h.hexdigest()[:16]


def pretrain(model: nn.Module, corpus: List[List[int]], pad_id: int, pcfg: PretrainConfig, seed: int,
             progress: bool = False) -> List[float]:
    """Plain next-token training of all weights on ``corpus``; returns the loss curve."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=pcfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / pcfg.steps))
    model.train()
    losses = []
    for _ in tqdm(range(pcfg.steps), desc="pretrain", disable=not progress, leave=False):
        idx = torch.randint(len(corpus), (pcfg.batch_size,), generator=g).tolist()
        seqs = [corpus[i] for i in idx]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
        att = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s)
            att[b, : len(s)] = 1
        labels = ids.masked_fill(att == 0, -100)
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def base_model_key(vocab, tasks: Dict[str, object], mcfg: ModelConfig, pcfg: PretrainConfig,
                   seed: int = 0) -> Tuple[str, List[List[int]]]:
    """``(cache key, corpus)`` of the base model for ``tasks``: cheap (no training), so a run can name
    its base model -- and check a checkpoint against it -- before pretraining."""
    kinds = [k for k in pcfg.knowledge_kinds.split(",") if k] if pcfg.knowledge_fraction > 0 else []
    corpus = pretrain_corpus(vocab, [t.train for t in tasks.values()], pcfg.max_sequences, seed,
                             pcfg.knowledge_fraction, kinds)
    return _key(vocab, mcfg, pcfg, seed, corpus), corpus


def load_pretrained(vocab, tasks: Dict[str, object], mcfg: ModelConfig, pcfg: PretrainConfig, seed: int = 0,
                    progress: bool = False, cache: Optional[Path] = None) -> Tuple[nn.Module, Dict[str, object]]:
    """The pretrained, frozen base model for ``tasks`` (from the disk cache when present).

    Returns ``(model, info)`` with ``info`` holding the cache ``path``, whether it
    was ``cached`` and the final pretraining ``loss``. A cache file that cannot be
    read (truncated, wrong shapes) is rebuilt, with a warning.
    """
    import warnings

    key, corpus = base_model_key(vocab, tasks, mcfg, pcfg, seed)
    folder = cache if cache is not None else cache_dir()
    path = folder / f"base_{key}.pt"
    if not path.exists() and (BUNDLED_BASES / path.name).exists():
        path = BUNDLED_BASES / path.name  # pretrained once and shipped with the package (read only)
    model = build_model(vocab, mcfg, seed)
    info: Dict[str, object] = {"path": str(path), "cached": False, "key": key}
    if path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(blob["state_dict"])
            info.update(cached=True, loss=blob.get("loss"))
        except Exception as exc:  # corrupt cache: rebuild it
            warnings.warn(f"pretrained model cache {path} is unreadable ({exc}); rebuilding it")
            model = build_model(vocab, mcfg, seed)
    if not info["cached"]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            losses = pretrain(model, corpus, vocab.pad_id, pcfg, seed, progress=progress)
        info["loss"] = sum(losses[-10:]) / len(losses[-10:])
        path = folder / f"base_{key}.pt"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"state_dict": model.state_dict(), "loss": info["loss"]}, tmp)
        os.replace(tmp, path)  # atomic: concurrent runs never see a half-written file
    model.requires_grad_(False)
    model.eval()
    return model, info


def load_local_model(path: str):
    """``(model, tokenizer)`` from a local transformers checkpoint (``local_files_only``; no download)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model {path}: not a directory holding a transformers checkpoint")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    model.requires_grad_(False)
    model.eval()
    return model, tok


def model_bytes(model: nn.Module) -> Dict[str, int]:
    """Bytes of the model's parameters and of the gradients of its trainable parameters."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"param_bytes": params, "grad_bytes": grads}
