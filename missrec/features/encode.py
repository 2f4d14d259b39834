"""Encode one chunk of items with one backend; the same code runs in a Ray actor and in-process.

Backends:

- ``open_clip``: texts through the text tower, images through the image tower of one model.
- ``sentence-transformers``: texts only (e.g. the packaged ``all-MiniLM-L6-v2``).

An empty text or a missing / unreadable image gives an all-zero row (the atomic format's "modality
missing"), and the item is listed in the chunk's stats with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from missrec.errors import ConfigError
from missrec.features.clip import ClipEncoder, ClipSpec
from missrec.features.images import FetchConfig, open_image
from missrec.features.text import SentenceEncoder

log = logging.getLogger(__name__)

BACKENDS = ("open_clip", "sentence-transformers")


@dataclass(frozen=True)
class EncoderSpec:
    """What encodes the items and how. ``device`` is ``cpu``, ``cuda`` or ``auto`` (cuda when visible);
    ``torch_threads`` sets torch's intra-op threads in the encoding process (``None``: leave as is)."""

    backend: str = "open_clip"
    model: str = "ViT-B-32"
    pretrained: str | None = None  # open_clip: tag or checkpoint path
    model_config: str | None = None  # open_clip: custom architecture JSON (file stem = model)
    precision: str = "fp32"
    normalize: bool = False  # L2-normalise rows (MISSRec's official features are raw: False)
    batch_size: int = 64
    device: str = "auto"
    torch_threads: int | None = None
    encode_images: bool = True  # open_clip only; a text-only item source never has images
    fetch: FetchConfig = field(default_factory=FetchConfig)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend {self.backend!r} is not one of {BACKENDS}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")

    @property
    def has_image_tower(self) -> bool:
        return self.backend == "open_clip" and self.encode_images


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; anything else unchanged."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; all-zero rows stay zero. [N, D] -> new [N, D] float32."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x, dtype=np.float32), where=norm > 0).astype(np.float32)


class ChunkEncoder:
    """Loads the backend's model once; :meth:`encode` turns a chunk of items into feature rows."""

    def __init__(self, spec: EncoderSpec, root: str | Path) -> None:
        self.spec = spec
        self.root = Path(root)
        self.device = resolve_device(spec.device)
        if spec.torch_threads:
            import torch

            torch.set_num_threads(spec.torch_threads)
        if spec.backend == "open_clip":
            self._clip = ClipEncoder(ClipSpec(spec.model, spec.pretrained, spec.model_config, spec.precision),
                                     self.device)
            self.dim = self._clip.dim
        else:
            self._st = SentenceEncoder(spec.model, device=self.device, normalize=False)
            self.dim = self._st.dim

    def _texts(self, texts: Sequence[str]) -> np.ndarray:
        if self.spec.backend == "open_clip":
            return self._clip.encode_texts(texts, self.spec.batch_size)
        return self._st.encode(texts, batch_size=self.spec.batch_size)

    def encode(self, item_ids: Sequence[str], texts: Sequence[str], images: Sequence[str] | None) -> dict:
        """Encode one chunk: ``[n]`` ids, texts and image references (``None``: no images).

        Returns ``{"text": [n, D] float32, "image": [n, D] float32 or None, "stats": {...}}``; stats hold
        ``texts_encoded``, ``images_encoded``, ``texts_empty`` (ids), ``images_missing`` and
        ``images_unreadable`` (``[item_id, reason]`` pairs).
        """
        n = len(item_ids)
        if len(texts) != n or (images is not None and len(images) != n):
            raise ValueError(f"chunk of {n} ids with {len(texts)} texts and "
                             f"{None if images is None else len(images)} images")
        stats: dict = {"texts_encoded": 0, "images_encoded": 0, "texts_empty": [], "images_missing": [],
                       "images_unreadable": []}
        text = np.zeros((n, self.dim), dtype=np.float32)
        keep = [i for i, t in enumerate(texts) if t.strip()]
        stats["texts_empty"] = [item_ids[i] for i in range(n) if not texts[i].strip()]
        if keep:
            text[keep] = self._texts([texts[i] for i in keep])
        stats["texts_encoded"] = len(keep)
        image = None
        if images is not None and self.spec.has_image_tower:
            image = np.zeros((n, self.dim), dtype=np.float32)
            bs = self.spec.batch_size
            for start in range(0, n, bs):  # decode one batch at a time: bounded memory
                rows, pics = [], []
                for i in range(start, min(start + bs, n)):
                    res = open_image(images[i], self.root, self.spec.fetch)
                    if res.image is not None:
                        rows.append(i)
                        pics.append(res.image)
                    else:
                        stats[f"images_{res.status}"].append([item_ids[i], res.reason])
                        log.debug("item %s: image %s (%s)", item_ids[i], res.status, res.reason)
                if pics:
                    image[rows] = self._clip.encode_images(pics, bs)
            stats["images_encoded"] = n - len(stats["images_missing"]) - len(stats["images_unreadable"])
        if self.spec.normalize:
            text = l2_normalise(text)
            image = l2_normalise(image) if image is not None else None
        return {"text": text, "image": image, "stats": stats}


__all__ = ["BACKENDS", "ChunkEncoder", "EncoderSpec", "l2_normalise", "resolve_device"]
