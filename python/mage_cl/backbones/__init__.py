"""Model families the driver trains (ALGORITHM.md §8): one backbone per family.

* ``tiny`` (:mod:`.tiny`): the embedded joint text + pixel-token LLaMA of the digits benchmark
  (the default when no ``--model`` is given);
* ``janus`` (:mod:`.janus`): Janus / Janus-Pro, images in and out;
* ``emu3`` (:mod:`.emu3`): Emu3, images in and out (image tokens are LM tokens);
* ``chameleon`` (:mod:`.chameleon`): Chameleon, images in, text out (image output refused);
* ``causal-lm`` (:mod:`.causal_lm`): any other transformers causal LM, text only.

:func:`open_backbone` reads ``--model PATH``'s ``config.json``, picks the family from its
``model_type`` (or checks the one named by ``--backbone``) and loads the processor; the
weights are loaded later by ``backbone.load_model()``, after the data have been checked.
"""

from __future__ import annotations

from typing import Dict, Optional, Type

from .base import (IMAGE_SLOT, TARGET_IMAGE_SLOT, Backbone, BackboneError, BackboneOptions, check_image, open_image,
                   read_config)
from .causal_lm import CausalLMBackbone
from .chameleon import ChameleonBackbone
from .emu3 import Emu3Backbone
from .hf import HFBackbone
from .janus import JanusBackbone
from .tiny import TinyBackbone, TokenIdBackbone

__all__ = [
    "IMAGE_SLOT", "TARGET_IMAGE_SLOT", "Backbone", "BackboneError", "BackboneOptions", "HFBackbone", "TinyBackbone",
    "TokenIdBackbone", "JanusBackbone", "Emu3Backbone", "ChameleonBackbone", "CausalLMBackbone", "FAMILIES",
    "BACKBONE_NAMES", "detect_family", "open_backbone", "check_image", "open_image", "read_config",
]

#: ``--backbone`` name -> implementation, for checkpoints given with ``--model``.
FAMILIES: Dict[str, Type[HFBackbone]] = {
    "janus": JanusBackbone, "emu3": Emu3Backbone, "chameleon": ChameleonBackbone, "causal-lm": CausalLMBackbone,
}
#: Every backbone name (``tiny`` is the embedded model, used without ``--model``).
BACKBONE_NAMES = ("tiny",) + tuple(FAMILIES)

#: model_type values of checkpoints in their authors' own (non-transformers) format, and what to use instead.
_FOREIGN_FORMATS = {
    "multi_modality": "the original DeepSeek Janus format; use a transformers conversion such as "
                      "deepseek-community/Janus-Pro-1B",
    "Emu3": "the original BAAI Emu3 format (trust_remote_code); use BAAI/Emu3-Gen-hf or BAAI/Emu3-Chat-hf",
}


def _is_causal_lm(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def detect_family(config: Dict[str, object], path: str = "") -> str:
    """The family name of a checkpoint from its config's ``model_type`` (:class:`BackboneError` if none fits)."""
    mt = str(config.get("model_type"))
    for name, cls in FAMILIES.items():
        if mt in cls.model_types:
            return name
    if mt in _FOREIGN_FORMATS:
        raise BackboneError(f"--model {path}: model_type {mt!r} is {_FOREIGN_FORMATS[mt]}")
    if _is_causal_lm(mt):
        return "causal-lm"
    raise BackboneError(f"--model {path}: model family {mt!r} is not supported; supported: janus, emu3 (images in "
                        "and out), chameleon (images in, text out), or a causal LM (text only)")


def open_backbone(path: str, name: Optional[str] = None, options: Optional[BackboneOptions] = None) -> HFBackbone:
    """The backbone for the checkpoint at ``path`` with its processor loaded (no weights yet).

    ``name`` (``--backbone``) overrides the detection; it must still fit the checkpoint:
    ``janus``/``emu3``/``chameleon`` need that ``model_type``, ``causal-lm`` any causal LM (an
    Emu3 checkpoint can run text only this way).
    """
    options = options or BackboneOptions()
    config = read_config(path)
    mt = str(config.get("model_type"))
    if name is None:
        name = detect_family(config, path)
    elif name == "tiny":
        raise BackboneError("--backbone tiny is the embedded model; it takes no --model")
    elif name not in FAMILIES:
        raise BackboneError(f"unknown --backbone {name!r}; choose from {', '.join(BACKBONE_NAMES)}")
    elif name == "causal-lm":
        if not _is_causal_lm(mt):
            raise BackboneError(f"--backbone causal-lm: {path} (model_type {mt!r}) is not a causal LM")
    elif mt not in FAMILIES[name].model_types:
        raise BackboneError(f"--backbone {name}: {path}/config.json has model_type {mt!r}, not "
                            f"{' or '.join(repr(t) for t in FAMILIES[name].model_types)}")
    return FAMILIES[name].open(path, options, config)
