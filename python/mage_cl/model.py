"""The small Dual-to-Dual model of the embedded benchmark, and the ``--model PATH`` loader.

The paper fine-tunes SEED-X, a multimodal LLM that reads and writes both text and
images. This module builds the miniature stand-in: a LLaMA-architecture causal LM
(``transformers.LlamaForCausalLM``) over the *joint* vocabulary of
:class:`mage_cl.vocab.Vocab` (text tokens and discrete image tokens), so one model
reads and writes both modalities.

Before the continual sequence it is *pretrained briefly on a generic mixture*
built only from the benchmark's training split:

* image modelling -- each image-token run found in a training example, alone
  (``BOS image EOS``), without its caption, question or answer, and
* text modelling -- each text span of a training prompt (the instructions), alone,

so the model knows the statistics of both modalities but none of the six tasks'
input -> output mappings (those are what continual learning must teach). The
pretrained weights are cached on disk (``$MAGE_CL_CACHE`` or ``~/.cache/mage_cl``)
under a key hashed from the model config, the pretraining config, the vocabulary
and the seed; they are reproducible from the seed. The model is then frozen and
MageLinear adapters are injected by the methods (:mod:`mage_cl.methods`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = [
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
_RECIPE_VERSION = 1


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


def pretrain_corpus(vocab, train_sets: Iterable[Sequence], max_sequences: int, seed: int) -> List[List[int]]:
    """The generic mixture: lone image-token runs and lone prompt text spans from training examples.

    Answers (the example targets' text) are left out, and no image is ever paired
    with text, so no task mapping is learned here.
    """
    images, texts = [], []
    seen_img, seen_txt = set(), set()
    for examples in train_sets:
        for ex in examples:
            for run in _runs(list(ex.prompt) + list(ex.target), vocab.is_image_token):
                key = tuple(run)
                if key not in seen_img:
                    seen_img.add(key)
                    images.append([vocab.bos_id, vocab.boi_id] + run + [vocab.eoi_id, vocab.eos_id])
            for run in _runs(ex.prompt, vocab.is_text_token):
                key = tuple(run)
                if len(run) > 1 and key not in seen_txt:
                    seen_txt.add(key)
                    texts.append([vocab.bos_id] + run + [vocab.eos_id])
    rng = random.Random(seed)
    rng.shuffle(images)
    rng.shuffle(texts)
    n_txt = min(len(texts), max_sequences // 4)
    corpus = images[: max_sequences - n_txt] + texts[:n_txt]
    rng.shuffle(corpus)
    if not corpus:
        raise ValueError("the pretraining corpus is empty: the tasks have no training examples")
    return corpus


def _key(vocab, mcfg: ModelConfig, pcfg: PretrainConfig, seed: int, corpus: List[List[int]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"v": _RECIPE_VERSION, "model": asdict(mcfg), "pretrain": asdict(pcfg),
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
