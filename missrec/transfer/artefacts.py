"""Per-domain adapter artefacts: only the trainable parameters of a fine-tuned model and the scoring policy chosen
on its domain (:mod:`missrec.eval.policy`), plus the sha256 of the backbone checkpoint they were trained on top of
(loading checks it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from missrec.errors import InputError, MISSRecError
from missrec.eval.policy import ScoringPolicy
from missrec.io import atomic_open, sha256_file

FORMAT = "missrec-adapter/1"


class BackboneMismatchError(MISSRecError, ValueError):
    pass


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of the parameters that train (``requires_grad``), detached, on CPU."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model: nn.Module, path: str | Path, backbone: str | Path, extra: dict[str, Any] | None = None,
                 policy: ScoringPolicy | None = None) -> int:
    """Write the trainable parameters of ``model``, its scoring ``policy`` and the backbone's hash; returns the file
    size in bytes."""
    state = {
        "format": FORMAT,
        "backbone_sha256": sha256_file(backbone),
        "backbone_path": str(backbone),
        "params": trainable_state(model),
        "policy": (policy or ScoringPolicy()).to_dict(),
        "extra": extra or {},
    }
    with atomic_open(path, "wb") as fh:
        torch.save(state, fh)
    return Path(path).stat().st_size


def load_checkpoint_file(path: str | Path) -> Any:
    """``torch.load`` on CPU (tensors only); a damaged or foreign file is a ValueError naming ``path``."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, KeyError, pickle.UnpicklingError) as e:
        raise InputError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None


def load_adapter(model: nn.Module, path: str | Path, backbone: str | Path) -> tuple[dict[str, Any], ScoringPolicy]:
    """Load an adapter onto a model that already holds ``backbone`` (refuses another backbone); returns the extra
    metadata and the scoring policy it carries."""
    state = load_checkpoint_file(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"{path}: not a {FORMAT} adapter file")
    digest = sha256_file(backbone)
    if digest != state["backbone_sha256"]:
        raise BackboneMismatchError(
            f"{path}: adapter was trained on backbone sha256 {state['backbone_sha256'][:16]}... "
            f"({state.get('backbone_path')}), but {backbone} has sha256 {digest[:16]}..."
        )
    own = dict(model.named_parameters())
    unknown = sorted(set(state["params"]) - set(own))
    if unknown:
        raise InputError(f"{path}: adapter holds parameters the model does not have: {unknown[:5]}")
    with torch.no_grad():
        for name, t in state["params"].items():
            if own[name].shape != t.shape:
                raise InputError(f"{path}: {name} has shape {tuple(t.shape)}, model has {tuple(own[name].shape)}")
            own[name].copy_(t)
    return state.get("extra", {}), ScoringPolicy.from_dict(state.get("policy"))
