"""Run presets: model size, pretraining and training budget for ``--preset {smoke,cpu,gpu}``.

The data sizes per preset are the benchmark's (:data:`mage_cl.tasks.PRESETS`); this
module fixes everything else. ``smoke`` runs the six-task sequence for one method in
well under a minute on 2 CPU cores (CI; a plumbing check); ``cpu`` learns every task (the
README's main job and the committed CPU comparison);
``gpu`` is a larger model with all the data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from .model import ModelConfig, PretrainConfig
from .trainer import TrainConfig

__all__ = ["Preset", "PRESETS", "DEFAULT_PRESET", "MAIN_JOB_PRESET", "get_preset"]

#: The preset of ``mage-cl run`` without ``--preset`` (fast: a plumbing check).
DEFAULT_PRESET = "smoke"

#: The preset of the README's main job: the smallest that learns every task
#: (``tests/test_main_job.py``).
MAIN_JOB_PRESET = "cpu"

#: The knowledge prior of the v4 base models (:func:`mage_cl.model._knowledge_prior`): recognition,
#: drawing and arithmetic of the digits in forms none of the six tasks uses.
_KNOWLEDGE = "describe,show,facts,small,strip,smallbox"

#: The base model of the ``cpu`` preset (shipped for seed 0: :data:`mage_cl.model.BUNDLED_BASES`).
_CPU_MODEL = ModelConfig(hidden_size=96, num_layers=3, num_heads=4, intermediate_size=256)
_CPU_PRETRAIN = PretrainConfig(steps=800, batch_size=32, lr=3e-3, knowledge_fraction=0.3,
                               knowledge_kinds=_KNOWLEDGE)


@dataclass(frozen=True)
class Preset:
    name: str
    model: ModelConfig
    pretrain: PretrainConfig
    train: TrainConfig
    #: CPU threads for torch ops (None: torch's default). The tiny models run fastest on one
    #: thread: their GEMMs are too small to split, and on a shared machine extra threads spin.
    cpu_threads: Optional[int] = None
    #: One line for ``mage-cl --help``: what the preset is for.
    description: str = ""
    #: A plumbing check only: too few steps and test examples for its accuracies to mean anything
    #: (the CLI says so above a run's final line).
    plumbing_check: bool = False


PRESETS: Dict[str, Preset] = {
    "smoke": Preset(
        "smoke",
        ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=176),
        PretrainConfig(steps=120, batch_size=16, lr=3e-3),
        TrainConfig(steps_per_task=12, batch_size=8, lr=3e-3, eval_batch_size=16, max_eval=16,
                    consolidate_batches=2),
        cpu_threads=1,
        description="plumbing check for CI: tiny model, 12 steps per task, 16 test examples "
                    "(its accuracies mean nothing)",
        plumbing_check=True,
    ),
    "cpu": Preset(
        "cpu",
        _CPU_MODEL,
        _CPU_PRETRAIN,
        # v5 (2026-12-04): lr 2e-3 (v4: 1e-3, LoRA New.ACC 45-61) and a multitask bound with twice the
        # steps (with one budget it learned HQEdit to 3 %); bench/results/cl_cpu_v5_2026-12-04/
        TrainConfig(steps_per_task=250, batch_size=16, lr=2e-3, eval_batch_size=100, max_eval=300,
                    consolidate_batches=8, joint_steps_scale=2),
        cpu_threads=1,
        description="the committed CPU comparison (bench/results/cl_cpu_v5_2026-12-04/): LoRA learns each task "
                    "(New.ACC about 60); about 5 min per continual method on one idle core",
    ),
    "gpu": Preset(
        "gpu",
        ModelConfig(hidden_size=256, num_layers=6, num_heads=8, intermediate_size=688),
        PretrainConfig(steps=3000, batch_size=64, lr=1e-3, max_sequences=20000),
        TrainConfig(steps_per_task=1000, batch_size=32, lr=1e-3, eval_batch_size=256, max_eval=None,
                    consolidate_batches=32),
        description="a larger model on all the data, for a GPU (not run yet)",
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ``ValueError`` listing the valid ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None
