"""Per-domain adapter artefacts: only the trainable parameters of a fine-tuned model (and the few buffers fit
on its domain, such as the history offset chosen on validation), plus the sha256 of the backbone checkpoint
they were trained on top of (loading checks it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from missrec.io import atomic_open, sha256_file

FORMAT = "missrec-adapter/1"


class BackboneMismatchError(ValueError):
    pass


def fitted_buffers(model: nn.Module) -> list[str]:
    """Names of the buffers fit on the target domain that an adapter must carry (``model.fitted_buffers()``,
    e.g. MISSRec's history offset chosen on validation); none for a model without that method."""
    names = getattr(model, "fitted_buffers", None)
    return list(names()) if names is not None else []


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of the parameters that train (``requires_grad``) and of the fitted buffers, detached, on CPU."""
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())
    state.update({n: buffers[n].detach().cpu().clone() for n in fitted_buffers(model)})
    return state


def save_adapter(model: nn.Module, path: str | Path, backbone: str | Path, extra: dict[str, Any] | None = None) -> int:
    """Write the trainable parameters of ``model`` and the backbone's hash; returns the file size in bytes."""
    state = {
        "format": FORMAT,
        "backbone_sha256": sha256_file(backbone),
        "backbone_path": str(backbone),
        "params": trainable_state(model),
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
        raise ValueError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None


def load_adapter(model: nn.Module, path: str | Path, backbone: str | Path) -> dict[str, Any]:
    """Load an adapter onto a model that already holds ``backbone``; refuses another backbone."""
    state = load_checkpoint_file(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} adapter file")
    digest = sha256_file(backbone)
    if digest != state["backbone_sha256"]:
        raise BackboneMismatchError(
            f"{path}: adapter was trained on backbone sha256 {state['backbone_sha256'][:16]}... "
            f"({state.get('backbone_path')}), but {backbone} has sha256 {digest[:16]}..."
        )
    own = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    own.update({n: buffers[n] for n in fitted_buffers(model)})
    unknown = sorted(set(state["params"]) - set(own))
    if unknown:
        raise ValueError(f"{path}: adapter holds parameters the model does not have: {unknown[:5]}")
    with torch.no_grad():
        for name, t in state["params"].items():
            if own[name].shape != t.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, model has {tuple(own[name].shape)}")
            own[name].copy_(t)
    return state.get("extra", {})
