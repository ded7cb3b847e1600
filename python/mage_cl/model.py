"""The small Dual-to-Dual model of the embedded benchmark, and the ``--model PATH`` loader.

The paper fine-tunes SEED-X, a multimodal LLM that reads and writes both text and
images. This module builds the miniature stand-in: a LLaMA-architecture causal LM
(``transformers.LlamaForCausalLM``) over the *joint* vocabulary of
:class:`mage_cl.vocab.Vocab` (text tokens and discrete image tokens), so one model
reads and writes both modalities.

Before the continual sequence it is *pretrained briefly on a generic mixture*
(:data:`MIXTURE`) built only from the benchmark's training split:

* plain modelling -- each image-token run found in a training example, alone
  (``BOS image EOS``), and each text span of a training prompt, alone, and
* generic instruction following -- small tasks that are none of the six (repeat / reverse /
  count the letters of a word, the next letter, copy or blank an image, count its bright
  pixels, draw a blank or full square; see :func:`_generic_instruction`),

so the model knows the statistics of both modalities and the *format prior* of an
instruction-tuned base model (questions are answered with text, image instructions with an
image) but none of the six tasks' input -> output mappings (those are what continual
learning must teach). The pretrained weights are cached on disk (``$MAGE_CL_CACHE`` or
``~/.cache/mage_cl``) under a key hashed from the model config, the pretraining config, the
mixture's name, the vocabulary, the seed and the corpus itself; they are reproducible from
the seed. The model is then frozen and MageLinear adapters are injected by the methods (:mod:`mage_cl.methods`).
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

import torch
from torch import nn

__all__ = [
    "MIXTURE",
    "ModelConfig",
    "PretrainConfig",
    "build_model",
    "cache_dir",
    "pretrain_corpus",
    "pretrain",
    "load_pretrained",
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
MIXTURE = "generic-instructions-v2"

#: Fraction of the mixture that is plain modelling (lone images, lone prompt texts); the rest
#: is generic instruction following (:func:`_generic_instruction`).
PLAIN_FRACTION = 0.25


def _words(text_runs: Iterable[Sequence[int]], vocab) -> List[str]:
    """Distinct alphabetic words (2-8 letters) of the decoded text runs, in first-seen order."""
    seen: Dict[str, None] = {}
    for run in text_runs:
        for w in re.findall(r"[a-z]+", vocab.decode_text(run)):
            if 2 <= len(w) <= 8:
                seen.setdefault(w, None)
    return list(seen)


def _generic_instruction(vocab, rng: random.Random, images: List[List[int]], words: List[str]) -> List[int]:
    """One generic instruction-following sequence ``BOS [image] text SEP answer EOS``.

    None of these is one of the six benchmark tasks; together they teach the *format prior*
    the paper's base model has: a question is answered with text, an image instruction with
    an image. Kinds (drawn uniformly):

    * text -> text: ``repeat: <word>``, ``spell <word> backwards.``, ``how many letters in
      <word>?`` (a number), ``what comes after <letter>?`` (the next letter);
    * image + text -> image: ``copy the image.`` (the same pixels), ``make it blank.`` (all
      level 0, same size);
    * image + text -> text: ``how many bright pixels?`` (count of the top level, a number),
      ``is the first pixel dark?`` (``yes``/``no``);
    * text -> image: ``draw a blank square.`` / ``draw a full square.`` (8 x 8, all level 0 /
      all top level).
    """
    enc = vocab.encode_text
    top = vocab.image_offset + vocab.levels - 1
    kind = rng.randrange(10)
    img: List[int] = []
    if kind <= 3:
        w = rng.choice(words)
        if kind == 0:
            text, ans = f"repeat: {w}", enc(w)
        elif kind == 1:
            text, ans = f"spell {w} backwards.", enc(w[::-1])
        elif kind == 2:
            text, ans = f"how many letters in {w}?", enc(str(len(w)))
        else:
            c = rng.choice("abcdefghijklmnopqrstuvwxy")
            text, ans = f"what comes after {c}?", enc(chr(ord(c) + 1))
    elif kind <= 7:
        run = rng.choice(images)
        img = [vocab.boi_id] + run + [vocab.eoi_id]
        if kind == 4:
            text, ans = "copy the image.", list(img)
        elif kind == 5:
            text, ans = "make it blank.", [vocab.boi_id] + [vocab.image_offset] * len(run) + [vocab.eoi_id]
        elif kind == 6:
            text, ans = "how many bright pixels?", enc(str(sum(t == top for t in run)))
        else:
            text, ans = "is the first pixel dark?", enc("yes" if run[0] == vocab.image_offset else "no")
    else:
        fill = vocab.image_offset if kind == 8 else top
        text = "draw a blank square." if kind == 8 else "draw a full square."
        ans = [vocab.boi_id] + [fill] * 64 + [vocab.eoi_id]
    return [vocab.bos_id] + img + enc(text) + [vocab.sep_id] + ans + [vocab.eos_id]


def pretrain_corpus(vocab, train_sets: Iterable[Sequence], max_sequences: int, seed: int) -> List[List[int]]:
    """The generic mixture (:data:`MIXTURE`), built from the training examples only.

    * plain modelling (:data:`PLAIN_FRACTION`): lone image-token runs (``BOS BOI image EOI
      EOS``) and lone prompt text spans, and
    * generic instruction following (:func:`_generic_instruction`) over the same training
      images and the words of the training prompts.

    The task answers are never used, and no image is paired with a task's text, so none of
    the six tasks' input -> output mappings is learned here -- only the format prior.
    Deterministic given ``seed``.
    """
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
    if runs and words:
        corpus += [_generic_instruction(vocab, rng, runs, words) for _ in range(max_sequences - len(corpus))]
    rng.shuffle(corpus)
    return corpus


def _key(vocab, mcfg: ModelConfig, pcfg: PretrainConfig, seed: int, corpus: List[List[int]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": _RECIPE_VERSION, "mixture": MIXTURE, "model": asdict(mcfg), "pretrain": asdict(pcfg),
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


def load_pretrained(vocab, tasks: Dict[str, object], mcfg: ModelConfig, pcfg: PretrainConfig, seed: int = 0,
                    progress: bool = False, cache: Optional[Path] = None) -> Tuple[nn.Module, Dict[str, object]]:
    """The pretrained, frozen base model for ``tasks`` (from the disk cache when present).

    Returns ``(model, info)`` with ``info`` holding the cache ``path``, whether it
    was ``cached`` and the final pretraining ``loss``. A cache file that cannot be
    read (truncated, wrong shapes) is rebuilt, with a warning.
    """
    import warnings

    corpus = pretrain_corpus(vocab, [t.train for t in tasks.values()], pcfg.max_sequences, seed)
    key = _key(vocab, mcfg, pcfg, seed, corpus)
    folder = cache if cache is not None else cache_dir()
    path = folder / f"base_{key}.pt"
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
