"""Continual-learning methods of the paper's comparison (Table 1 and the Table 4 ablations).

``METHODS`` maps each command-line name to its class; :func:`make_method` builds
one and raises ``ValueError`` naming the choices for an unknown name. All share
the interface of :class:`~mage_cl.methods.base.Method` and the same total LoRA
rank (four rank-8 adapters or one rank-32 adapter).
"""

from __future__ import annotations

from typing import Dict, Optional, Type

from .base import LoRA, Method, MethodConfig, Multitask, MultitaskSqrt, MultitaskTokens, ZeroShot
from .cia import CIA
from .ewc import EWC
from .lae import LAE
from .mage import EW, EWGA, MAGE, MAGEAuthors, MAGEDEMA
from .moelora import MoELoRA, MoELoRALinear
from .pgp import PGP
from .reglora import RegLoRA

__all__ = ["METHODS", "make_method", "Method", "MethodConfig", "MoELoRALinear"]

#: CLI name -> method class, in the paper's Table 1 order, then the ablations, MAGE's two update variants
#: (DEMA, the authors' dense PEMA) and the upper bound (with its three loss reductions).
METHODS: Dict[str, Type[Method]] = {
    cls.name: cls
    for cls in (ZeroShot, LoRA, MoELoRA, EWC, LAE, PGP, CIA, RegLoRA, EW, EWGA, MAGE, MAGEDEMA, MAGEAuthors,
                Multitask, MultitaskTokens, MultitaskSqrt)
}


def make_method(name: str, config: Optional[MethodConfig] = None, **kwargs) -> Method:
    """The method called ``name`` (see :data:`METHODS`)."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None
    return cls(config, **kwargs)
