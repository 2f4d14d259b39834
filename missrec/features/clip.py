"""open_clip item encoder: one model, its text tower for texts and its image tower for images.

The model is an open_clip architecture name plus ``pretrained``: a tag open_clip knows (``openai``,
``laion2b_s34b_b79k``, ...; fetched into open_clip's cache on first use) or a local checkpoint path. A
custom architecture is registered from a JSON file with ``open_clip.add_model_config``; open_clip names
it after the file's stem, and the registration is per process, so every worker calls
:func:`register_model_config` itself (``ClipEncoder`` does it on construction).

Embeddings are the towers' raw outputs (what MISSRec's official ``feat1CLS`` / ``feat3CLS`` hold); L2
normalisation is left to the caller.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from missrec.errors import ConfigError, missing_extra
from missrec.io import atomic_open, sha256_file, write_json

log = logging.getLogger(__name__)

_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")


@dataclass(frozen=True)
class ClipSpec:
    """Which open_clip model: ``architecture`` (e.g. ``ViT-B-32``), ``pretrained`` (tag or checkpoint
    path; ``None`` = random weights, for tests only), optional ``model_config`` JSON registering a custom
    architecture (its file stem must be ``architecture``), and the compute ``precision``."""

    architecture: str
    pretrained: str | None = None
    model_config: str | None = None
    precision: str = "fp32"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.architecture:
            raise ConfigError("ClipSpec.architecture is empty")
        if self.model_config is not None and Path(self.model_config).stem != self.architecture:
            raise ConfigError(f"model config {self.model_config} registers architecture "
                              f"{Path(self.model_config).stem!r} (its file stem), not {self.architecture!r}")

    @property
    def checkpoint(self) -> Path | None:
        """The local checkpoint file when ``pretrained`` is a path, else ``None`` (a tag or nothing)."""
        if self.pretrained and Path(self.pretrained).is_file():
            return Path(self.pretrained)
        return None


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise missing_extra("open_clip_torch", "clip") from None
    return open_clip


def register_model_config(path: str | Path) -> str:
    """Register a custom architecture JSON with open_clip in this process; returns its name (file stem)."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: model config not found") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
    missing = [k for k in _CONFIG_KEYS if k not in cfg]
    if missing:
        raise ConfigError(f"{path}: an open_clip model config needs keys {list(_CONFIG_KEYS)}; missing {missing}")
    open_clip = _open_clip()
    if path.stem not in open_clip.list_models():
        open_clip.add_model_config(path)
    return path.stem


def describe_model(spec: ClipSpec) -> dict:
    """JSON-able identity of the model: architecture, pretrained tag or checkpoint path + sha256, config."""
    ckpt = spec.checkpoint
    if spec.pretrained and ckpt is None and ("/" in spec.pretrained or spec.pretrained.endswith((".pt", ".bin",
                                                                                                  ".safetensors"))):
        raise ConfigError(f"{spec.pretrained}: checkpoint file not found")
    out = {
        "architecture": spec.architecture,
        "pretrained_tag": spec.pretrained if spec.pretrained and ckpt is None else None,
        "checkpoint": str(ckpt.resolve()) if ckpt else None,
        "checkpoint_sha256": sha256_file(ckpt) if ckpt else None,
        "model_config": str(Path(spec.model_config).resolve()) if spec.model_config else None,
        "model_config_sha256": sha256_file(spec.model_config) if spec.model_config else None,
        "precision": spec.precision,
    }
    return out


class ClipEncoder:
    """An open_clip model loaded once, in eval mode, with its own tokenizer and image preprocessing."""

    def __init__(self, spec: ClipSpec, device: str = "cpu") -> None:
        open_clip = _open_clip()
        import torch

        if spec.model_config:
            register_model_config(spec.model_config)
        if spec.pretrained is None:
            log.warning("open_clip %s with random weights (no pretrained given)", spec.architecture)
        self.spec = spec
        self.device = torch.device(device)
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.architecture, pretrained=spec.pretrained, precision=spec.precision, device=self.device,
            cache_dir=spec.cache_dir,
        )
        self.model = model.eval()
        self.preprocess = preprocess  # the model's own eval transform: resize, crop, RGB, normalise
        self.tokenizer = open_clip.get_tokenizer(spec.architecture)
        self.dim = int(self.encode_texts(["a"]).shape[1])
        log.info("loaded open_clip %s (%s) on %s, dim %d", spec.architecture, spec.pretrained, device, self.dim)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """[N] texts -> [N, D] float32 text-tower embeddings (tokenizer truncates to its context length)."""
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                tokens = self.tokenizer(list(texts[start:start + batch_size])).to(self.device)
                out.append(self.model.encode_text(tokens).float().cpu().numpy())
        return _stack(out, getattr(self, "dim", 0))

    def encode_images(self, images: Sequence, batch_size: int = 64) -> np.ndarray:
        """[N] PIL images -> [N, D] float32 image-tower embeddings (the model's preprocessing applied)."""
        import torch

        out = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                batch = torch.stack([self.preprocess(im) for im in images[start:start + batch_size]])
                feats = self.model.encode_image(batch.to(self.device, dtype=_dtype(self.model)))
                out.append(feats.float().cpu().numpy())
        return _stack(out, self.dim)


TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def make_tiny_clip(folder: str | Path, name: str = "MissrecTinyCLIP", seed: int = 0) -> tuple[Path, Path]:
    """For tests and benchmarks: write a tiny architecture ``<folder>/<name>.json`` and a randomly
    initialised checkpoint ``<folder>/<name>.pt`` for it. Returns (config path, checkpoint path)."""
    import torch

    folder = Path(folder)
    cfg_path, ckpt = folder / f"{name}.json", folder / f"{name}.pt"
    write_json(cfg_path, TINY_CONFIG)
    open_clip = _open_clip()
    register_model_config(cfg_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    with atomic_open(ckpt, "wb") as fh:
        torch.save(model.state_dict(), fh)
    return cfg_path, ckpt


def _dtype(model):
    return next(model.parameters()).dtype


def _stack(parts: list[np.ndarray], dim: int) -> np.ndarray:
    if not parts:
        return np.zeros((0, dim), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


__all__ = ["TINY_CONFIG", "ClipEncoder", "ClipSpec", "describe_model", "make_tiny_clip", "register_model_config"]
