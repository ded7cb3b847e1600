"""Train a method through the task sequence and evaluate it after every task.

One *stage* = train task ``j`` (``steps_per_task`` AdamW steps on shuffled
batches of its training set, the method's hooks around each step, see
:class:`mage_cl.methods.base.Method`), then evaluate tasks ``0..j`` by greedy
generation judged by each task's judge. The accuracy matrix row ``j`` holds the
rates (0-100) for those tasks; tasks not trained yet are ``None`` (the paper's
tables show "-" there). Each wrong answer has exactly one error type, so the
IUF / HAL / OTH matrices are filled alongside (ALGORITHM.md section 5).

The loss is the mean over samples of each sample's mean target-token loss
(:func:`mage_cl.methods.base.batch_loss`), which is what the per-sample Fisher
(``mk.Fisher(loss_reduction="mean")``, ALGORITHM.md §2) expects. With
``max_batch_tokens`` each step's batch is split into micro-batches of at most that many
padded tokens whose gradients (and per-sample Fisher sums) accumulate into the same step:
micro-batch ``m`` of ``n_m`` samples contributes ``(n_m / N) * mean_m``, so the step's loss
and gradient are those of the whole batch. ``multitask-tokens`` and ``multitask-sqrt`` weight
each sample by its target tokens or their square root instead (``Method.loss_reduction`` ``"token"``,
``"sqrt"``): each micro-batch's weighted sum is divided by the global batch's total weight per
rank, so that the ranks' averaged gradients are those of the global weighted mean (one scalar
all-reduce per step; their micro-batches are collated up front).
A real model's batches, loss and generation come from its backbone (:mod:`mage_cl.backbones`;
``backbone=None``: the token-id examples of the embedded benchmark, with :func:`collate`,
``batch_loss`` and :func:`greedy_generate`). Under DDP
(:mod:`mage_cl.distributed`) each rank trains on its slice of every global
batch, the Fisher is synced before the method reads it, and evaluation counts
are summed over ranks.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

import mage_kernels as mk

from . import distributed
from .engines import Engine
from .methods.base import Method, batch_loss, loss_weight_total
from .tasks.base import ERROR_TYPES, Example, Task

__all__ = ["TrainConfig", "StageResult", "collate", "greedy_generate", "evaluate_task", "train_task",
           "Sequencer"]


@dataclass
class TrainConfig:
    """Optimization and evaluation settings of one run (the presets live in :mod:`mage_cl.presets`)."""

    steps_per_task: int = 40
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 5
    #: Learning-rate shape after the warm-up, per task: ``"constant"`` or ``"cosine"`` (half a cosine
    #: from ``lr`` down to 0 at the task's last step, :func:`mage_cl.engines.lr_factor`). Every task
    #: restarts it (a new optimizer per task).
    lr_schedule: str = "constant"
    eval_batch_size: int = 64
    max_eval: Optional[int] = None  # test examples per task (None: all)
    #: The multitask upper bound trains ``joint_steps_scale * steps_per_task * tasks`` steps: 1 gives it
    #: the continual methods' total budget; the ``cpu`` preset gives it twice that (with one budget it
    #: never learned HQEdit: bench/results/cl_cpu_v5_2026-12-04/README.md).
    joint_steps_scale: int = 1
    consolidate_batches: Optional[int] = 8  # batches an after_task pass (EWC, PGP) may read (None: all)
    seed: int = 0
    max_batch_tokens: Optional[int] = None  # padded tokens per micro-batch (None: the whole batch at once)


@dataclass
class StageResult:
    """What one stage produced: rates per evaluated task and training statistics."""

    task: str
    acc: Dict[str, float]
    iuf: Dict[str, float]
    hal: Dict[str, float]
    oth: Dict[str, float]
    train_tokens: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    final_loss: float = float("nan")
    method_state_bytes: int = 0
    peak_bytes: int = 0
    extra: Dict[str, object] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- batches


def collate(examples: Sequence[Example], pad_id: int, device: torch.device) -> Dict[str, torch.Tensor]:
    """Right-padded ``input_ids = prompt + target``; labels only on the target tokens."""
    seqs = [list(e.prompt) + list(e.target) for e in examples]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), T), dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for b, (e, s) in enumerate(zip(examples, seqs)):
        ids[b, : len(s)] = torch.tensor(s)
        att[b, : len(s)] = 1
        labels[b, len(e.prompt): len(s)] = torch.tensor(list(e.target))
    return {"input_ids": ids.to(device), "attention_mask": att.to(device), "labels": labels.to(device)}


def _batches(examples: Sequence[Example], batch_size: int, steps: int, seed: int) -> Iterator[List[Example]]:
    """``steps`` global batches from reshuffled epochs (same on every rank: same seed)."""
    rng = random.Random(seed)
    order: List[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            more = list(range(len(examples)))
            rng.shuffle(more)
            order += more
        yield [examples[i] for i in order[:batch_size]]
        order = order[batch_size:]


def _collate(backbone, examples: Sequence[Example], model: nn.Module, pad_id: int, device: torch.device):
    return collate(examples, pad_id, device) if backbone is None else backbone.collate(examples, model, device)


def _loss(backbone, model: nn.Module, batch, reduction: str = "sample",
          divisor: Optional[float] = None) -> torch.Tensor:
    if backbone is None:
        return batch_loss(model, batch, reduction, divisor)
    return backbone.loss(model, batch, reduction, divisor)


def _num_tokens(backbone, e: Example) -> int:
    return len(e.prompt) + len(e.target) if backbone is None else int(backbone.num_tokens(e))


def micro_batches(examples: Sequence[Example], max_tokens: Optional[int], backbone=None) -> List[List[Example]]:
    """Split one batch into micro-batches of at most ``max_tokens`` padded tokens (rows x longest).

    Examples are grouped by length (longest first) so padding stays small; a single example
    longer than the budget is a micro-batch of its own (the runner refuses such data up front).
    ``max_tokens=None`` keeps the batch whole, in its order.
    """
    if max_tokens is None or not examples:
        return [list(examples)]
    sized = sorted(((_num_tokens(backbone, e), k) for k, e in enumerate(examples)), reverse=True)
    groups: List[List[Example]] = []
    cur: List[Example] = []
    longest = 0
    for n, k in sized:
        if cur and max(longest, n) * (len(cur) + 1) > max_tokens:
            groups.append(cur)
            cur, longest = [], 0
        cur.append(examples[k])
        longest = max(longest, n)
    if cur:
        groups.append(cur)
    return groups


# ---------------------------------------------------------------------------------------- generation


@torch.no_grad()
def greedy_generate(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int,
                    eos_id: int, lockstep: bool = False) -> List[List[int]]:
    """Greedy continuation of each prompt (left-padded batch, KV cache), cut before the first EOS.

    ``lockstep``: stop only when every rank's batch is done (each forward is a collective
    under FSDP2 and ZeRO-3, so all ranks must run the same number of them).
    """
    if not prompts:
        return []
    dev = next(model.parameters()).device
    L = max(len(p) for p in prompts)
    B = len(prompts)
    ids = torch.full((B, L), pad_id, dtype=torch.long, device=dev)
    att = torch.zeros((B, L), dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError("cannot generate from an empty prompt")
        ids[b, L - len(p):] = torch.tensor(list(p), device=dev)
        att[b, L - len(p):] = 1
    pos = (att.cumsum(1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    nxt = out.logits[:, -1].argmax(-1)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    gen = []
    last_pos = pos[:, -1]
    for step in range(max_new_tokens):
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        gen.append(nxt)
        done |= nxt == eos_id
        if step == max_new_tokens - 1 or (distributed.all_true(bool(done.all())) if lockstep else bool(done.all())):
            break
        att = torch.cat([att, torch.ones((B, 1), dtype=att.dtype, device=dev)], 1)
        last_pos = last_pos + 1
        kw = {"cache": cache} if hasattr(out, "cache") else {"past_key_values": cache}
        out = model(input_ids=nxt[:, None], attention_mask=att, position_ids=last_pos[:, None], use_cache=True, **kw)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        nxt = out.logits[:, -1].argmax(-1)
    toks = torch.stack(gen, 1).tolist()
    result = []
    for row in toks:
        result.append(row[: row.index(eos_id)] if eos_id in row else row)
    return result


def evaluate_task(model: nn.Module, task: Task, pad_id: int, eos_id: int, batch_size: int = 64,
                  max_eval: Optional[int] = None, backbone=None, max_tokens: Optional[int] = None,
                  progress: bool = False, lockstep: bool = False) -> Dict[str, float]:
    """Rates (0-100) of correct answers and of each error type on ``task.test`` (summed over ranks).

    With a ``backbone`` the answers are its :meth:`~mage_cl.backbones.Backbone.generate`; chunks
    of ``batch_size`` prompts are split further so that ``rows * (prompt + answer tokens)``
    stays within ``max_tokens``. When the judge gives scores (the CLIP judge), ``"score"``
    is their mean over the examples that have one. ``lockstep`` (FSDP2, ZeRO-3: every forward
    is a collective) pads each rank's share to the same number of prompts with repeats of its
    first one, whose answers are not counted, and generates in lock-step.
    """
    from tqdm.auto import tqdm

    tests = task.test if max_eval is None else task.test[:max_eval]
    mine = distributed.shard(list(range(len(tests))))
    counted = len(mine)
    if lockstep:
        if backbone is not None and not getattr(backbone, "lockstep", False):
            raise ValueError(f"lock-step evaluation (FSDP2, ZeRO-3) of a {backbone.name} backbone is not supported")
        per_rank = -(-len(tests) // distributed.world_size())
        mine = mine + [mine[0] if mine else 0] * (per_rank - len(mine))
    counts = torch.zeros(1 + len(ERROR_TYPES) + 2, dtype=torch.float64)  # correct, IUF, HAL, OTH, score sum, scored
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(mine), desc=f"eval {task.name}", disable=not progress or not distributed.is_main(),
               leave=False)
    try:
        for s in range(0, len(mine), batch_size):
            chunk = [tests[i] for i in mine[s: s + batch_size]]
            keep = max(0, min(len(chunk), counted - s))  # the padding (lockstep) is not counted
            for part in [chunk] if lockstep else _eval_parts(chunk, task, backbone, max_tokens):
                if backbone is None:
                    outs = greedy_generate(model, [e.prompt for e in part], task.max_new_tokens, pad_id, eos_id,
                                           lockstep)
                elif lockstep:
                    outs = backbone.generate(model, part, task, lockstep=True)
                else:
                    outs = backbone.generate(model, part, task)
                for e, g in zip(part[:keep], outs[:keep]):
                    v = task.judge(g, e)
                    counts[0 if v.correct else 1 + ERROR_TYPES.index(v.error)] += 1
                    if getattr(v, "score", None) is not None:
                        counts[-2] += float(v.score)
                        counts[-1] += 1
                bar.update(len(part))
    finally:
        bar.close()
        model.train(was_training)
    distributed.all_reduce_sum(counts)
    n = max(1.0, float(counts[:4].sum()))
    rates = (100.0 * counts[:4] / n).tolist()
    out = {"acc": rates[0], "IUF": rates[1], "HAL": rates[2], "OTH": rates[3], "n": int(counts[:4].sum())}
    if counts[-1] > 0:
        out["score"] = float(counts[-2] / counts[-1])
    return out


def _eval_parts(chunk: List[Example], task: Task, backbone, max_tokens: Optional[int]) -> List[List[Example]]:
    if max_tokens is None or backbone is None:
        return [chunk]
    rows = 2 if task.output == "image" else 1  # classifier-free guidance doubles the image rows
    size = [rows * (backbone.prompt_tokens(e) + task.max_new_tokens) for e in chunk]
    from .backbones.base import chunks_by_budget

    return [[chunk[i] for i in g] for g in chunks_by_budget(chunk, size, len(chunk), max_tokens)]


# ---------------------------------------------------------------------------------------- training


def _weight_per_rank(local: float) -> float:
    """The global batch's total loss weight (target tokens, or their square roots per sample) over the
    ranks (``local`` on one process): dividing each rank's weighted sum by it makes the engines'
    average of the ranks' gradients the gradient of the global weighted mean."""
    n = torch.tensor([float(local)], dtype=torch.float64)
    distributed.all_reduce_sum(n)
    return float(n.item()) / distributed.world_size()


def train_task(model: nn.Module, method: Method, examples: Sequence[Example], cfg: TrainConfig, pad_id: int,
               seed: int, desc: str = "train", progress: bool = False, backbone=None,
               engine: Optional[Engine] = None) -> Dict[str, float]:
    """``cfg.steps_per_task`` steps of ``method`` on ``examples``; returns tokens, seconds and final loss.

    ``engine`` (:mod:`mage_cl.engines`; default: DDP under ``torchrun``, plain steps on one
    process) builds the task's optimizer step; the method sees it through
    :meth:`~mage_cl.methods.base.Method.bind_steps` before the first step.
    """
    from tqdm.auto import tqdm

    params = method.trainable_parameters()
    if not params:
        raise RuntimeError(f"method {method.name} has no trainable parameters for this task")
    if method.needs_fisher and method.loss_reduction != "sample":
        raise ValueError(f"method {method.name}: the per-sample Fisher needs loss_reduction 'sample', "
                         f"not {method.loss_reduction!r}")
    engine = engine or Engine()
    dev = next(model.parameters()).device
    steps = engine.begin_task(model, params, cfg)
    method.bind_steps(steps)
    fisher = mk.Fisher(model, loss_reduction="mean") if method.needs_fisher else None
    tokens, losses, peak = 0, [], 0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model.train()
    t0 = time.perf_counter()
    try:
        bar = tqdm(_batches(examples, cfg.batch_size, cfg.steps_per_task, seed), total=cfg.steps_per_task,
                   desc=desc, disable=not progress or not distributed.is_main(), leave=False)
        for global_batch in bar:
            mine = distributed.shard(global_batch)
            parts = micro_batches(mine, cfg.max_batch_tokens, backbone)
            if fisher is not None:
                fisher.reset()
            steps.zero_grad()
            step_loss, step_tokens = 0.0, 0
            # a weighted loss (token, sqrt) divides every micro-batch's weighted sum by the global batch's
            # total weight per rank (the engines average the ranks' gradients), so its micro-batches are
            # collated up front; the sample mean collates them one by one
            batches = ([_collate(backbone, part, model, pad_id, dev) for part in parts]
                       if method.loss_reduction != "sample" else None)
            divisor = None if batches is None else _weight_per_rank(
                sum(loss_weight_total(b, method.loss_reduction) for b in batches))
            for m_idx, part in enumerate(parts):
                batch = batches[m_idx] if batches is not None else _collate(backbone, part, model, pad_id, dev)
                share = len(part) / len(mine)  # this micro-batch's part of the mean over the batch
                # a weighted mean is already divided by the whole step's weight; the sample mean is weighted
                weight = 1.0 if divisor is not None else share
                if fisher is not None:
                    fisher.loss_scale = share  # its gradient is share * (1/n_m) sum_n g_n
                with steps.accumulate(m_idx == len(parts) - 1):
                    loss = _loss(backbone, steps.module, batch, method.loss_reduction, divisor)
                    total = loss if weight == 1.0 else loss * weight
                    if m_idx == 0:
                        extra = method.loss_extra(model)
                        total = total if extra is None else total + extra
                    steps.backward(total)
                step_loss += float(loss.detach()) * weight
                step_tokens += int(batch["attention_mask"].sum())
            if fisher is not None:
                fisher.loss_scale = 1.0
            method.after_backward()
            steps.clip()  # to cfg.grad_clip (DeepSpeed clips inside its step)
            method.before_step()
            steps.step()  # optimizer step, scheduler step
            if fisher is not None:
                fisher.sync()  # identical F on every rank before PEMA reads it
            method.after_step(fisher)
            tokens += step_tokens
            losses.append(step_loss)
            if not peak:
                peak = training_bytes(model, steps.optimizer_state(), method, fisher)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    except BaseException:
        steps.close()  # on success the engine closes it after the task's evaluation (Engine.finish)
        raise
    finally:
        if fisher is not None:
            fisher.remove()
    seconds = time.perf_counter() - t0
    tok = torch.tensor([float(tokens)], dtype=torch.float64)
    distributed.all_reduce_sum(tok)
    if dev.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(dev))
    return {"tokens": int(tok.item()), "seconds": seconds, "loss": sum(losses[-5:]) / max(1, len(losses[-5:])),
            "peak_bytes": peak}


def training_bytes(model: nn.Module, opt_state, method: Method, fisher) -> int:
    """Bytes of the tensors a training step keeps alive, summed from the real tensors (CPU peak proxy).

    Model parameters + gradients of the trainable ones + optimizer state + the Fisher
    buffers + the method's persistent state, counting what this rank holds (its FSDP2 shards,
    its ZeRO-3 partitions; ``opt_state`` is :meth:`mage_cl.engines.TaskSteps.optimizer_state`).
    (On CUDA the trainer reports ``torch.cuda.max_memory_allocated`` instead, which also counts
    activations.)
    """
    total = sum(_held_bytes(p) for p in model.parameters())
    total += sum(_held_bytes(p.grad) for p in model.parameters() if p.grad is not None)
    for st in opt_state.values():
        total += sum(_held_bytes(v) for v in st.values() if torch.is_tensor(v))
    if fisher is not None:
        total += int(mk.persistent_state_bytes(fisher)) if hasattr(mk, "persistent_state_bytes") else 0
    return int(total + method.state_bytes())


def _held_bytes(t: torch.Tensor) -> int:
    """Bytes of ``t`` on this rank: a DTensor's local shard; a ZeRO-3 parameter's partition plus, while
    it is gathered (a parameter under ``stage3_param_persistence_threshold`` always is), its whole data."""
    if hasattr(t, "to_local"):
        t = t.to_local()
    elif hasattr(t, "ds_tensor"):
        return t.ds_tensor.numel() * t.ds_tensor.element_size() + t.data.numel() * t.data.element_size()
    return t.numel() * t.element_size()


def consolidation_batches(examples: Sequence[Example], cfg: TrainConfig, pad_id: int, device: torch.device,
                          seed: int, backbone=None, model: Optional[nn.Module] = None
                          ) -> Callable[[], Iterator[Dict[str, torch.Tensor]]]:
    """A re-iterable source of this rank's batches over (a sample of) a task's training set.

    With ``cfg.max_batch_tokens`` each batch comes as its micro-batches (EWC's and PGP's
    passes sum or average over samples, so the split changes nothing but the memory).
    """
    n_batches = math.ceil(len(examples) / cfg.batch_size)
    if cfg.consolidate_batches is not None:
        n_batches = min(n_batches, cfg.consolidate_batches)

    def gen():
        for global_batch in _batches(examples, cfg.batch_size, n_batches, seed):
            mine = distributed.shard(global_batch)
            for part in (micro_batches(mine, cfg.max_batch_tokens, backbone) if mine else []):
                yield _collate(backbone, part, model, pad_id, device)

    return gen


class Sequencer:
    """Runs ``method`` through ``tasks`` in ``order``: train, evaluate, checkpoint after each stage.

    ``on_stage(stage_index, StageResult)`` is called after every finished stage (the CLI
    saves a checkpoint there); ``start_stage`` skips the stages a resumed run already has.
    """

    def __init__(self, model: nn.Module, method: Method, tasks: Dict[str, Task], order: Sequence[str],
                 cfg: TrainConfig, pad_id: int, eos_id: int, progress: bool = False, backbone=None,
                 engine: Optional[Engine] = None) -> None:
        unknown = [n for n in order if n not in tasks]
        if unknown:
            raise ValueError(f"order names tasks {unknown} that are not loaded (have: {sorted(tasks)})")
        self.model, self.method, self.tasks, self.order = model, method, tasks, list(order)
        self.cfg, self.pad_id, self.eos_id, self.progress = cfg, pad_id, eos_id, progress
        self.backbone = backbone  # None: the token-id examples of the embedded benchmark
        self.engine = engine or Engine()  # DDP under torchrun, plain steps on one process
        self.device = next(model.parameters()).device

    def evaluate(self, names: Sequence[str]) -> Tuple[Dict[str, Dict[str, float]], float]:
        t0 = time.perf_counter()
        res = {n: evaluate_task(self.model, self.tasks[n], self.pad_id, self.eos_id, self.cfg.eval_batch_size,
                                self.cfg.max_eval, self.backbone, self.cfg.max_batch_tokens,
                                self.progress and self.backbone is not None, self.engine.lockstep) for n in names}
        return res, time.perf_counter() - t0

    def _stage(self, j: int, name: str, train_stats: Dict[str, float], evals, eval_s: float,
               state_bytes: int) -> StageResult:
        return StageResult(
            task=name,
            acc={n: r["acc"] for n, r in evals.items()},
            iuf={n: r["IUF"] for n, r in evals.items()},
            hal={n: r["HAL"] for n, r in evals.items()},
            oth={n: r["OTH"] for n, r in evals.items()},
            train_tokens=int(train_stats.get("tokens", 0)),
            train_seconds=float(train_stats.get("seconds", 0.0)),
            eval_seconds=eval_s,
            final_loss=float(train_stats.get("loss", float("nan"))),
            method_state_bytes=state_bytes,
            peak_bytes=int(train_stats.get("peak_bytes", 0)),
            extra=({"clip_score": {n: r["score"] for n, r in evals.items() if "score" in r}}
                   if any("score" in r for r in evals.values()) else {}),
        )

    def run(self, start_stage: int = 0,
            on_stage: Optional[Callable[[int, StageResult], None]] = None,
            on_stage_start: Optional[Callable[[int, str], None]] = None) -> List[StageResult]:
        """Run the stages from ``start_stage``; ``on_stage_start(j, task)`` is called before each."""
        m, cfg = self.method, self.cfg
        on_stage_start = on_stage_start or (lambda j, name: None)
        stages: List[StageResult] = []
        if not m.trains:
            # zero-shot: nothing changes between stages, so evaluate every task once
            on_stage_start(start_stage, self.order[start_stage])
            evals, eval_s = self.evaluate(self.order)
            for j, name in enumerate(self.order[start_stage:], start_stage):
                seen = {n: evals[n] for n in self.order[: j + 1]}
                st = self._stage(j, name, {}, seen, eval_s if j == start_stage else 0.0, m.state_bytes())
                stages.append(st)
                if on_stage:
                    on_stage(j, st)
            return stages
        if m.joint:
            # multitask upper bound: one stage on the union of all tasks, joint_steps_scale x the total steps
            on_stage_start(0, "multitask")
            union = [e for n in self.order for e in self.tasks[n].train]
            joint_steps = cfg.steps_per_task * len(self.order) * cfg.joint_steps_scale
            joint_cfg = TrainConfig(**{**asdict(cfg), "steps_per_task": joint_steps})
            first = self.tasks[self.order[0]]
            m.before_task(first, 0)
            stats = train_task(self.model, m, union, joint_cfg, self.pad_id, cfg.seed, "multitask", self.progress,
                               self.backbone, self.engine)
            sb = m.state_bytes()
            m.after_task(first, consolidation_batches(union, cfg, self.pad_id, self.device, cfg.seed, self.backbone,
                                                      self.model))
            evals, eval_s = self.evaluate(self.order)
            st = self._stage(len(self.order) - 1, "all", stats, evals, eval_s, sb)
            if on_stage:
                on_stage(len(self.order) - 1, st)
            return [st]
        for j, name in enumerate(self.order):
            if j < start_stage:
                continue
            on_stage_start(j, name)
            task = self.tasks[name]
            seed = cfg.seed * 1000 + j
            torch.manual_seed(seed)
            m.before_task(task, j)
            stats = train_task(self.model, m, task.train, cfg, self.pad_id, seed,
                               f"[{j + 1}/{len(self.order)}] {m.name}:{name}", self.progress, self.backbone,
                               self.engine)
            state_bytes = m.state_bytes()  # measured at the end of training, before consolidation frees it
            diag = m.diagnostics()
            m.after_task(task, consolidation_batches(task.train, cfg, self.pad_id, self.device, seed, self.backbone,
                                                     self.model))
            evals, eval_s = self.evaluate(self.order[: j + 1])
            st = self._stage(j, name, stats, evals, eval_s, state_bytes)
            st.extra.update(diag)
            stages.append(st)
            if on_stage:
                on_stage(j, st)
        return stages
