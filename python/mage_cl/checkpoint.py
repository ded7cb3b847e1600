"""Resumable runs: a checkpoint after every finished stage, verified before it is used.

``<out>/checkpoint.pt`` holds the finished stages' results, every adapter tensor and
the method's between-task state; ``<out>/checkpoint.json`` holds its SHA-256 and the
run's configuration fingerprint. :func:`load` refuses (``CheckpointError``, one
line) a checkpoint whose bytes do not match the recorded hash (truncated or
edited), that cannot be read, or that was written by a different configuration
(method, order, preset, seed, model, data). Files are written to a temporary name
and renamed, so an interruption while saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional

import torch

__all__ = ["CheckpointError", "save", "load", "exists", "remove", "fingerprint"]

_PT, _META = "checkpoint.pt", "checkpoint.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or belongs to another configuration."""


def fingerprint(config: Dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def exists(out_dir: Path) -> bool:
    return (Path(out_dir) / _META).exists() or (Path(out_dir) / _PT).exists()


def remove(out_dir: Path) -> List[str]:
    """Delete the checkpoint files in ``out_dir`` (and stale temporaries); returns the names removed."""
    out_dir = Path(out_dir)
    gone = []
    for path in sorted(out_dir.glob("checkpoint.*")) if out_dir.is_dir() else []:
        if path.name in (_PT, _META) or path.name.startswith((f"{_PT}.tmp", f"{_META}.tmp")):
            path.unlink()
            gone.append(path.name)
    return gone


def save(out_dir: Path, payload: Dict[str, object], config: Dict[str, object]) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"{_PT}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    digest = _sha256(tmp)
    os.replace(tmp, out_dir / _PT)
    meta = {"sha256": digest, "config": config, "fingerprint": fingerprint(config),
            "stages_done": int(payload.get("stages_done", 0))}
    tmp_meta = out_dir / f"{_META}.tmp{os.getpid()}"
    tmp_meta.write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
    os.replace(tmp_meta, out_dir / _META)


def load(out_dir: Path, config: Dict[str, object]) -> Optional[Dict[str, object]]:
    """The verified payload, or ``None`` when ``out_dir`` has no checkpoint."""
    out_dir = Path(out_dir)
    pt, meta_path = out_dir / _PT, out_dir / _META
    if not pt.exists() and not meta_path.exists():
        return None
    if not pt.exists() or not meta_path.exists():
        raise CheckpointError(f"checkpoint in {out_dir} is incomplete: {_PT if not pt.exists() else _META} is missing")
    try:
        meta = json.loads(meta_path.read_text())
        expected = meta["sha256"]
    except Exception as exc:
        raise CheckpointError(f"checkpoint metadata {meta_path} is corrupt ({type(exc).__name__})") from None
    if _sha256(pt) != expected:
        raise CheckpointError(f"checkpoint {pt} is corrupt: its SHA-256 does not match {meta_path.name}")
    if meta.get("fingerprint") != fingerprint(config):
        theirs = meta.get("config", {})
        diff = sorted(k for k in set(theirs) | set(config) if theirs.get(k) != config.get(k))
        raise CheckpointError(f"checkpoint in {out_dir} was written by a different configuration "
                              f"(differs in: {', '.join(diff) or 'unknown'}; its options are in {meta_path}): "
                              "rerun with those options to continue it, pass --overwrite to replace it, "
                              "or choose another --out")
    try:
        return torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {pt} cannot be read ({type(exc).__name__}: {exc})") from None
