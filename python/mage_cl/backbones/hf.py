"""What the transformers backbones share: loading, prompts, image slots, batches, decoding loops.

A family module (:mod:`.janus`, :mod:`.emu3`, :mod:`.chameleon`, :mod:`.causal_lm`) subclasses
:class:`HFBackbone` and fills in how an image becomes tokens and back; this module does the
rest the same way for all of them:

* **Loading** (:meth:`HFBackbone.open`, :meth:`HFBackbone.load_model`): the processor first
  (cheap; every error is one line), the weights last, with ``dtype``, ``attn_implementation``
  and gradient checkpointing from :class:`~.base.BackboneOptions`, everything frozen. The
  model the methods train is a :class:`BackboneModel` around the transformers model: its
  forward runs under ``torch.autocast(bfloat16)`` for a bf16 run (weights bf16, adapters
  float32) and returns logits only for the last ``logits_to_keep`` positions (the answer).
* **Prompts**: the processor's chat template when it has one (the image token where the
  image goes, earlier turns as user/assistant messages), else ``{image}{history}{question}\\n``;
  the image token becomes an :data:`~.base.IMAGE_SLOT`.
* **Batches** (:meth:`HFBackbone.collate`): slots expanded into the family's tokens (encoded
  images are cached), right padding, labels on the answer only.
* **Decoding** (:meth:`HFBackbone.generate`): greedy, with a KV cache, left padding. A text
  task stops at EOS or at the image-start token (an image answer to a text question: the
  judge types it IUF). An image task whose first generated token is the image start goes on
  in image mode: the family's *plan* of the image (forced structure tokens such as Emu3's size
  header and end-of-line tokens; every other position restricted to visual tokens), with
  classifier-free guidance (``guidance_scale > 1``: a second, unconditional row whose prompt
  is padding). Any other first token means a text answer (capped at ``max_text_answer``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import mage_kernels as mk

from .. import distributed
from .base import (IMAGE_SLOT, TARGET_IMAGE_SLOT, LRU, Backbone, BackboneError, BackboneOptions, check_image,
                   iter_left_padded, model_cache)

__all__ = ["HFBackbone", "BackboneModel", "ModelOutput", "first_line"]

#: A plan step: a forced token id, or ``None`` (argmax over the family's visual tokens).
PlanStep = Optional[int]


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (transformers' errors run over many lines)."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


class ModelOutput:
    """What :class:`BackboneModel` returns: ``logits`` and the KV ``cache`` (also as ``past_key_values``)."""

    def __init__(self, logits: torch.Tensor, cache: Any = None) -> None:
        self.logits = logits
        self.cache = cache
        self.past_key_values = cache


class BackboneModel(nn.Module):
    """The trainable view of a transformers model: ``forward(input_ids, attention_mask, ...) -> .logits``.

    The wrapped model is ``self.hf``, so qualified names carry an ``hf.`` prefix. A bf16 run
    enters ``torch.autocast`` here, so every caller (the trainer, EWC's and PGP's passes over
    the training data, generation) runs the float32 adapters the same way.
    """

    def __init__(self, hf: nn.Module, autocast_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.hf = hf
        self.autocast_dtype = autocast_dtype

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, cache: Any = None, use_cache: Optional[bool] = None,
                logits_to_keep: int = 0, **extra: Any) -> ModelOutput:
        if extra:
            raise TypeError(f"{type(self.hf).__name__} takes no {sorted(extra)} here (images are tokens already)")
        kw: Dict[str, Any] = {}
        if cache is not None:
            kw["cache"] = cache
        with self.autocast(input_ids.device):  # no KV cache unless asked (training builds none)
            out = self.hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=bool(use_cache), logits_to_keep=logits_to_keep, **kw)
        return ModelOutput(out.logits, model_cache(out))


class HFBackbone(Backbone):
    """A transformers model family; subclasses set the class attributes and the image hooks.

    Class attributes: ``name``; ``model_types`` (the config ``model_type`` values it loads);
    ``lm_prefix`` (qualified-name prefix of the language model's decoder layers inside
    :class:`BackboneModel`, ``None``: match the leaf names anywhere); ``guidance_default``.
    """

    model_types: Tuple[str, ...] = ()
    lm_prefix: Optional[str] = None
    guidance_default: float = 1.0
    display_name = "model"

    def __init__(self, path: str, options: BackboneOptions, config: Dict[str, Any]) -> None:
        self.path = path
        self.options = options
        self.config = config
        self.processor: Any = None
        self.tokenizer: Any = None
        self.dtype = options.torch_dtype()
        self.adapter_dtype = torch.float32 if self.dtype != torch.float32 else None
        self._cache = LRU(options.image_cache)
        self._decoder_model: Optional[nn.Module] = None
        self._image_token_str: Optional[str] = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def open(cls, path: str, options: BackboneOptions, config: Dict[str, Any]) -> "HFBackbone":
        """Read the processor (and check the options) without loading any weights."""
        b = cls(path, options, config)
        b._check_options()
        b._load_processor()
        b._setup_tokens()
        return b

    def _check_options(self) -> None:
        o = self.options
        from .base import ATTN_IMPLEMENTATIONS

        if o.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise BackboneError(f"unknown --attn-implementation {o.attn_implementation!r}; choose from "
                                f"{', '.join(ATTN_IMPLEMENTATIONS)}")
        if o.attn_implementation == "flash_attention_2":
            import importlib.util

            if importlib.util.find_spec("flash_attn") is None:
                raise BackboneError("--attn-implementation flash_attention_2 needs the optional flash-attn package "
                                    "(pip install flash-attn --no-build-isolation); use sdpa (the default) otherwise")
            if not torch.cuda.is_available():
                raise BackboneError("--attn-implementation flash_attention_2 runs on a CUDA GPU only; use sdpa on CPU")
            if self.dtype == torch.float32:
                raise BackboneError("--attn-implementation flash_attention_2 needs half precision: add --dtype bf16")
        if o.guidance_scale is not None and not (o.guidance_scale >= 1.0):
            raise BackboneError(f"--image-guidance must be >= 1 (1 disables guidance), got {o.guidance_scale}")
        if o.max_text_answer < 1:
            raise BackboneError(f"max_text_answer must be >= 1, got {o.max_text_answer}")

    def _load_processor(self) -> None:
        from transformers import AutoProcessor

        try:
            proc = AutoProcessor.from_pretrained(self.path, local_files_only=True)
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError, TypeError ... here
            raise BackboneError(f"--model {self.path}: no usable {self.display_name} processor "
                                f"(processor_config.json or preprocessor_config.json + tokenizer files): "
                                f"{first_line(exc)}") from None
        if not hasattr(proc, "image_processor") or not hasattr(proc, "tokenizer"):
            raise BackboneError(f"--model {self.path}: found a {type(proc).__name__} but no image processor; "
                                f"{self.display_name} needs its processor (tokenizer + image processor) saved with it")
        self.processor = proc
        self.tokenizer = proc.tokenizer

    def _setup_tokens(self) -> None:
        tok = self.tokenizer
        if tok.eos_token_id is None:
            raise BackboneError(f"--model {self.path}: the tokenizer has no eos_token")
        self.eos_id = int(tok.eos_token_id)
        self.pad_id = int(tok.pad_token_id) if tok.pad_token_id is not None else self.eos_id
        self.bos_id = None if tok.bos_token_id is None else int(tok.bos_token_id)

    @property
    def max_positions(self) -> Optional[int]:
        """The language model's context length (``max_position_embeddings``), when the config gives it."""
        for cfg in (self.config.get("text_config") or {}, self.config):
            v = cfg.get("max_position_embeddings") if isinstance(cfg, dict) else None
            if v:
                return int(v)
        return None

    def token_id(self, token: str, what: str) -> int:
        """The id of a special token the family needs (a clear error when the tokenizer lacks it)."""
        tid = self.tokenizer.convert_tokens_to_ids(token) if token is not None else None
        unk = self.tokenizer.unk_token_id
        if tid is None or (unk is not None and tid == unk and token != self.tokenizer.unk_token):
            raise BackboneError(f"--model {self.path}: the tokenizer has no {what} token {token!r}")
        return int(tid)

    @property
    def model_class(self):
        raise NotImplementedError

    def load_model(self) -> nn.Module:
        """The frozen model (weights from disk, no download) wrapped for training; see the module docstring."""
        kw: Dict[str, Any] = {"local_files_only": True, "dtype": self.dtype,
                              "attn_implementation": self.options.attn_implementation}
        try:
            hf = self.model_class.from_pretrained(self.path, **kw)
        except Exception as exc:
            raise BackboneError(f"--model {self.path}: cannot load the {self.display_name} weights: "
                                f"{first_line(exc)}") from None
        hf.requires_grad_(False)
        hf.eval()
        if self.options.gradient_checkpointing:
            if not getattr(hf, "supports_gradient_checkpointing", False):
                raise BackboneError(f"{type(hf).__name__} does not support gradient checkpointing")
            kw_gc = {"use_reentrant": False}  # the frozen embeddings' outputs need no grad: reentrant would drop it
            if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.x name
                hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kw_gc)
            else:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw_gc)
        model = self.wrap(hf)
        model.requires_grad_(False)
        model.eval()
        self._after_load(model)
        return model

    def wrap(self, hf: nn.Module) -> nn.Module:
        return BackboneModel(hf, None if self.dtype == torch.float32 else self.dtype)

    def _after_load(self, model: nn.Module) -> None:
        """Family hook: read ids / sizes that need the loaded model."""

    # ------------------------------------------------------------------ adapters
    def target_modules(self, model: nn.Module) -> List[str]:
        names = []
        for name, mod in model.named_modules():
            if not isinstance(mod, nn.Linear) and not type(mod).__module__.startswith("bitsandbytes"):
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in mk.LLAMA_TARGETS:
                continue
            if self.lm_prefix is not None and not name.startswith(self.lm_prefix):
                continue
            names.append(name)
        if not names:
            where = f"under {self.lm_prefix}" if self.lm_prefix else "in the model"
            raise BackboneError(f"--model {self.path}: no linear named {'/'.join(mk.LLAMA_TARGETS)} {where}; "
                                "the adapters have nowhere to go")
        return names

    def autocast(self, model: nn.Module):
        inner = model.module if hasattr(model, "module") and isinstance(model.module, BackboneModel) else model
        if isinstance(inner, BackboneModel):
            return inner.autocast(next(inner.parameters()).device)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ prompts (data side)
    @property
    def image_token_str(self) -> str:
        """The string the chat template (or the plain template) puts where an image goes."""
        if self._image_token_str is None:
            tok = getattr(self.processor, "image_token", None) or "<image>"
            self._image_token_str = str(tok)
        return self._image_token_str

    def render_prompt(self, history: Sequence[Tuple[str, str]], question: str, n_images: int) -> str:
        """Prompt text: earlier turns, then the question with the images in its (first) user turn."""
        template = getattr(self.processor, "chat_template", None)
        if template:
            messages: List[Dict[str, Any]] = []
            first = True
            for q, a in history:
                content = [{"type": "image"} for _ in range(n_images if first else 0)] + [{"type": "text", "text": q}]
                messages += [{"role": "user", "content": content},
                             {"role": "assistant", "content": [{"type": "text", "text": a}]}]
                first = False
            content = [{"type": "image"} for _ in range(n_images if first else 0)] + [{"type": "text", "text": question}]
            messages.append({"role": "user", "content": content})
            try:
                text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as exc:
                raise BackboneError(f"--model {self.path}: its chat template fails on a prompt: {first_line(exc)}") from None
            if isinstance(text, list):
                text = text[0]
        else:
            text = self.image_token_str * n_images + "".join(f"{q}\n{a}\n" for q, a in history) + f"{question}\n"
        return text + self.prompt_suffix()

    def prompt_suffix(self) -> str:
        """Text appended to every prompt (Chameleon's chat-mode separator)."""
        return ""

    def encode_text(self, text: str) -> List[int]:
        return [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False)]

    def encode_prompt(self, text: str, n_images: int, where: str) -> List[int]:
        """Token ids of a rendered prompt, BOS first, each image token an :data:`IMAGE_SLOT`."""
        pieces = text.split(self.image_token_str) if n_images else [text]
        if len(pieces) - 1 != n_images:
            raise BackboneError(f"{where}: the prompt holds {len(pieces) - 1} image tokens {self.image_token_str!r} "
                                f"for {n_images} image(s) (the chat template of {self.path} must place one per image)")
        ids: List[int] = []
        for k, piece in enumerate(pieces):
            if k:
                ids.append(IMAGE_SLOT)
            ids += self.encode_text(piece)
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def text_target(self, answer: str) -> List[int]:
        """A text answer: its tokens + EOS."""
        return self.encode_text(answer) + [self.eos_id]

    def input_image_length(self, size: Tuple[int, int]) -> int:
        """Tokens an input image of this ``(width, height)`` becomes (slot expanded)."""
        raise NotImplementedError

    @property
    def target_image_length(self) -> int:
        """Tokens of an image answer (the whole target, structure tokens included)."""
        raise NotImplementedError

    def image_meta(self, paths: Sequence[str], where: str) -> Dict[str, Any]:
        """Checks the input images of a sample; returns the ``meta`` entries the batches need."""
        sizes = [check_image(p, where) for p in paths]
        return {"images": list(paths), "image_lengths": [self.input_image_length(s) for s in sizes]}

    # ------------------------------------------------------------------ images (model side)
    def encode_image(self, model: nn.Module, path: str) -> Tuple[List[int], Optional[torch.Tensor]]:
        """An input image: its token ids in the prompt, and pixel values when the model embeds pixels."""
        raise NotImplementedError

    def encode_target_image(self, model: nn.Module, path: str) -> List[int]:
        """A target image as discrete tokens: the whole answer sequence (image start ... end)."""
        raise NotImplementedError

    def image_plan(self) -> List[PlanStep]:
        """The image-mode steps after the image-start token (forced ids or ``None`` = a visual token)."""
        raise NotImplementedError

    def visual_mask(self, vocab: int, device: torch.device) -> torch.Tensor:
        """Bool ``[vocab]``: the ids allowed at a free (``None``) plan step."""
        raise NotImplementedError

    @property
    def image_start_id(self) -> Optional[int]:
        return None

    def decode_image_ids(self, model: nn.Module, generated: Sequence[int]) -> Optional[Any]:
        raise NotImplementedError

    def decode_image(self, generated: Sequence[int]) -> Optional[Any]:
        """PIL image of an image answer, decoded by the model that generated it (``None``: not an image)."""
        if self._decoder_model is None:
            raise RuntimeError("decode_image before generate: no model has generated an image yet")
        ids = [int(t) for t in generated]
        plan = self.image_plan()
        if not ids or ids[0] != self.image_start_id or len(ids) != 1 + len(plan):
            return None
        with torch.no_grad(), self.autocast(self._decoder_model):
            return self.decode_image_ids(self._decoder_model, ids)

    # ------------------------------------------------------------------ batches
    def _slot_lengths(self, ex) -> Tuple[int, int]:
        lens = ex.meta.get("image_lengths", [])
        p = len(ex.prompt) - len(lens) + sum(lens)
        t = self.target_image_length if list(ex.target) == [TARGET_IMAGE_SLOT] else len(ex.target)
        return p, t

    def num_tokens(self, example) -> int:
        p, t = self._slot_lengths(example)
        return p + t

    def prompt_tokens(self, example) -> int:
        return self._slot_lengths(example)[0]

    def _cached_image(self, model: nn.Module, path: str) -> Tuple[List[int], Optional[torch.Tensor]]:
        if self.pixels_in_prompt:  # pixel values are not cached (large); the ids are fixed placeholders
            return self.encode_image(model, path)
        return self._cache.get(("in", path), lambda: self.encode_image(model, path))

    #: whether input images reach the model as pixel values (Janus) rather than tokens
    pixels_in_prompt = False

    def expand_prompt(self, model: nn.Module, ex) -> Tuple[List[int], List[torch.Tensor]]:
        images = list(ex.meta.get("images", []))
        out: List[int] = []
        pixels: List[torch.Tensor] = []
        k = 0
        for t in ex.prompt:
            if t == IMAGE_SLOT:
                if k >= len(images):
                    raise ValueError(f"{ex.meta.get('source')}: more image slots than images")
                ids, px = self._cached_image(model, images[k])
                out += ids
                if px is not None:
                    pixels.append(px)
                k += 1
            else:
                out.append(int(t))
        return out, pixels

    def expand_target(self, model: nn.Module, ex) -> List[int]:
        if list(ex.target) == [TARGET_IMAGE_SLOT]:
            path = ex.meta["target_image"]
            return list(self._cache.get(("out", path), lambda: self.encode_target_image(model, path)))
        return [int(t) for t in ex.target]

    @torch.no_grad()
    def _expand_all(self, model: nn.Module, examples: Sequence[Any], targets: bool):
        with self.autocast(model):
            rows = [self.expand_prompt(model, e) for e in examples]
            tg = [self.expand_target(model, e) for e in examples] if targets else None
        return rows, tg

    def collate(self, examples: Sequence[Any], model: nn.Module, device: torch.device) -> Dict[str, Any]:
        rows, targets = self._expand_all(model, examples, True)
        seqs = [p + t for (p, _), t in zip(rows, targets)]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        att = torch.zeros((len(seqs), T), dtype=torch.long)
        labels = torch.full((len(seqs), T), -100, dtype=torch.long)
        for b, ((p, _), t, s) in enumerate(zip(rows, targets, seqs)):
            ids[b, : len(s)] = torch.tensor(s)
            att[b, : len(s)] = 1
            labels[b, len(p): len(s)] = torch.tensor(t)
        batch: Dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": att.to(device), "labels": labels.to(device)}
        pixels = [px for _, pxs in rows for px in pxs]
        if pixels:
            batch["pixel_values"] = torch.stack(pixels).to(device)
        batch["logits_to_keep"] = int(T - min(len(p) for p, _ in rows) + 1)
        return batch

    # ------------------------------------------------------------------ generation
    def is_image_token(self, token_id: int) -> bool:
        return token_id == self.image_start_id

    def _forward(self, model: nn.Module, ids, att, pos, cache=None, pixel_values=None):
        kw: Dict[str, Any] = {"attention_mask": att, "position_ids": pos, "use_cache": True, "logits_to_keep": 1}
        if cache is not None:
            kw["cache"] = cache
        if pixel_values is not None:
            kw["pixel_values"] = pixel_values
        return model(input_ids=ids, **kw)

    @torch.no_grad()
    def _greedy_text(self, model: nn.Module, prompts: List[List[int]], pixels: List[torch.Tensor],
                     max_new_tokens: int, lockstep: bool = False) -> List[List[int]]:
        """Greedy text until EOS (excluded) or the image-start token (included, then stop).

        ``lockstep`` (FSDP2: every decoder layer's forward is a collective): stop only when every
        rank's rows are done."""
        dev = next(model.parameters()).device
        ids, att, pos = iter_left_padded(prompts, self.pad_id, dev)
        B = len(prompts)
        px = torch.stack(pixels).to(dev) if pixels else None
        out = self._forward(model, ids, att, pos, pixel_values=px)
        cache = model_cache(out)
        nxt = out.logits[:, -1].argmax(-1)
        stop_ids = torch.tensor([self.eos_id] + ([self.image_start_id] if self.image_start_id is not None else []),
                                device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        gen = []
        last_pos = pos[:, -1]
        for step in range(max_new_tokens):
            nxt = torch.where(done, torch.full_like(nxt, self.eos_id), nxt)
            gen.append(nxt)
            done |= torch.isin(nxt, stop_ids)
            if step == max_new_tokens - 1 or (distributed.all_true(bool(done.all())) if lockstep else bool(done.all())):
                break
            att = torch.cat([att, torch.ones((B, 1), dtype=att.dtype, device=dev)], 1)
            last_pos = last_pos + 1
            out = self._forward(model, nxt[:, None], att, last_pos[:, None], cache=cache)
            cache = model_cache(out)
            nxt = out.logits[:, -1].argmax(-1)
        result = []
        for row in torch.stack(gen, 1).tolist():
            cut = []
            for t in row:
                if t == self.eos_id:
                    break
                cut.append(t)
                if t == self.image_start_id:
                    break
            result.append(cut)
        return result

    def uncond_prompt(self, prompt: List[int]) -> List[int]:
        """The unconditional row of classifier-free guidance: BOS kept, everything else padding."""
        return [prompt[0]] + [self.pad_id] * (len(prompt) - 1)

    @property
    def guidance_scale(self) -> float:
        g = self.options.guidance_scale
        return float(self.guidance_default if g is None else g)

    @torch.no_grad()
    def _generate_images(self, model: nn.Module, prompts: List[List[int]], pixels: List[List[torch.Tensor]]
                         ) -> List[List[int]]:
        """Image answers (image start + plan tokens) for prompts already answered with the image start."""
        dev = next(model.parameters()).device
        start = self.image_start_id
        cond = [p + [start] for p in prompts]
        g = self.guidance_scale
        rows = cond + ([self.uncond_prompt(p) + [start] for p in prompts] if g > 1.0 else [])
        flat = [px for pxs in pixels for px in pxs]
        ids, att, pos = iter_left_padded(rows, self.pad_id, dev)
        out = self._forward(model, ids, att, pos, pixel_values=torch.stack(flat).to(dev) if flat else None)
        cache = model_cache(out)
        R = len(cond)
        plan = self.image_plan()
        allowed = None
        gen: List[torch.Tensor] = []
        last_pos = pos[:, -1]
        for s, step in enumerate(plan):
            if step is None:
                logits = out.logits[:, -1].float()
                if g > 1.0:
                    c, u = logits[:R], logits[R:]
                    logits = u + g * (c - u)
                if allowed is None:
                    allowed = self.visual_mask(logits.shape[-1], dev)
                nxt = logits.masked_fill(~allowed, float("-inf")).argmax(-1)
            else:
                nxt = torch.full((R,), int(step), dtype=torch.long, device=dev)
            gen.append(nxt)
            if s == len(plan) - 1:
                break
            feed = torch.cat([nxt, nxt]) if g > 1.0 else nxt
            att = torch.cat([att, torch.ones((att.shape[0], 1), dtype=att.dtype, device=dev)], 1)
            last_pos = last_pos + 1
            out = self._forward(model, feed[:, None], att, last_pos[:, None], cache=cache)
            cache = model_cache(out)
        body = torch.stack(gen, 1).tolist() if gen else [[] for _ in range(R)]
        return [[start] + row for row in body]

    #: Generation can run in lock-step across ranks (FSDP2 evaluation, :func:`mage_cl.trainer.evaluate`).
    lockstep = True

    def generate(self, model: nn.Module, examples: Sequence[Any], task: Any, lockstep: bool = False
                 ) -> List[List[int]]:
        """Greedy answers; ``lockstep``: every rank runs the same forwards (the text loop ends when all
        ranks are done, and image generation runs on every rank when any rank needs it; a rank with no
        image to make generates one for its first prompt and drops it)."""
        self._decoder_model = model
        rows, _ = self._expand_all(model, examples, False)
        prompts = [p for p, _ in rows]
        pixels = [pxs for _, pxs in rows]
        flat = [px for pxs in pixels for px in pxs]
        image_task = getattr(task, "output", "text") == "image"
        limit = self.options.max_text_answer if image_task else int(task.max_new_tokens)
        with self.autocast(model):
            outs = self._greedy_text(model, prompts, flat, limit, lockstep)
            if not image_task or not self.writes_images:
                return outs
            want = [i for i, o in enumerate(outs) if o == [self.image_start_id]]
            run = want
            if lockstep and not distributed.all_true(not want) and not want:  # a collective: every rank calls it
                run = [0]
            if run:
                imgs = self._generate_images(model, [prompts[i] for i in run], [pixels[i] for i in run])
                for i, img in zip(want, imgs):
                    outs[i] = img
        return outs

    def describe(self) -> Dict[str, object]:
        return {"backbone": self.name, "dtype": str(self.dtype).replace("torch.", ""),
                "attn_implementation": self.options.attn_implementation,
                "gradient_checkpointing": self.options.gradient_checkpointing,
                **({"image_guidance": self.guidance_scale} if self.writes_images else {})}


def pil_from_pixels(x: torch.Tensor, image_processor: Any) -> Any:
    """A decoded ``[3, H, W]`` image in the image processor's normalized space as an RGB PIL image.

    Undoes the processor's normalization (``x * std + mean``) and rescaling (``/ rescale_factor``,
    1/255 by default), as its ``postprocess`` does.
    """
    from PIL import Image

    x = x.detach().float().cpu()
    if getattr(image_processor, "do_normalize", True):
        mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(-1, 1, 1)
        x = x * std + mean
    scale = float(getattr(image_processor, "rescale_factor", 1 / 255)) if getattr(image_processor, "do_rescale", True) else 1.0
    arr = (x / scale).clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr, mode="RGB")


def center_square(img: Any, side: int) -> Any:
    """The largest centered square of a PIL image, resized to ``side`` x ``side`` (bicubic)."""
    from PIL import Image

    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((side, side), Image.BICUBIC)
