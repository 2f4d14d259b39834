"""Cheap, deterministic stand-ins for CLIP features, computed from the content itself.

- text: lowercase word tokens, each hashed (``zlib.crc32``, stable across runs, unlike ``hash``) into
  one of ``4096`` signed buckets; the bag of buckets goes through a fixed Gaussian projection.
- image: the picture downsampled (area average) to ``size x size`` RGB, flattened, centred (its own
  mean removed) and sent through a fixed Gaussian projection.

Rows are L2-normalised and then scaled by ``scale`` (default ``sqrt(dim)``, so entries have roughly
unit variance). A missing input (empty text, ``None`` image) gives an all-zero row, which the atomic
format reads as "modality missing".
"""

from __future__ import annotations

import logging
import math
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from missrec.data.atomic import load_item_table, read_index_map, write_features
from missrec.errors import DataFormatError

log = logging.getLogger(__name__)

TEXT_BUCKETS = 1 << 12
_TOKEN = re.compile(r"[a-z0-9]+")
_CHUNK = 1024


def _projection(seed: int, salt: int, rows: int, dim: int) -> np.ndarray:
    return np.random.default_rng([seed, salt, rows, dim]).standard_normal((rows, dim))


def _normalise(x: np.ndarray, scale: float | None) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    s = math.sqrt(x.shape[1]) if scale is None else scale
    return (np.divide(x, norm, out=np.zeros_like(x), where=norm > 0) * s).astype(np.float32)


def hash_text_features(texts: Sequence[str], dim: int = 64, seed: int = 0,
                       scale: float | None = None) -> np.ndarray:
    """Hashed bag-of-words features: ``[N]`` strings -> ``[N, dim]`` float32 (empty text -> zeros)."""
    proj = _projection(seed, 1, TEXT_BUCKETS, dim)
    rows, buckets, signs = [], [], []
    for i, text in enumerate(texts):
        for tok in _TOKEN.findall(text.lower()):
            h = zlib.crc32(tok.encode("utf-8"))
            rows.append(i)
            buckets.append(h % TEXT_BUCKETS)
            signs.append(1.0 if (h >> 20) & 1 else -1.0)
    out = np.zeros((len(texts), dim))
    if rows:
        np.add.at(out, np.asarray(rows), proj[np.asarray(buckets)] * np.asarray(signs)[:, None])
    return _normalise(out, scale)


def pixel_image_features(images: Sequence[Image.Image | None], dim: int = 64, seed: int = 0, size: int = 8,
                         scale: float | None = None) -> np.ndarray:
    """Downsampled-pixel features: ``[N]`` PIL images (``None`` = missing) -> ``[N, dim]`` float32."""
    proj = _projection(seed, 2, size * size * 3, dim)
    out = np.zeros((len(images), dim))
    for i, img in enumerate(images):
        if img is None:
            continue
        small = img.convert("RGB").resize((size, size), Image.Resampling.BOX)
        x = np.asarray(small, dtype=np.float64).reshape(-1) / 255.0
        out[i] = (x - x.mean()) @ proj
    return _normalise(out, scale)


def _load_image(path: Path, table: Path, lineno: int) -> Image.Image | None:
    if not path.is_file():
        log.warning("%s:%d: image %s not found; treating it as missing", table, lineno, path)
        return None
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise DataFormatError(table, f"cannot read image {path}: {err}", lineno) from err


def write_proxy_features(domain_dir: str | Path, name: str, dim: int = 64, text_suffix: str = "feat1CLS",
                         image_suffix: str = "feat3CLS", seed: int = 0) -> dict:
    """Compute proxy features from ``<D>.items.tsv`` and its images; write ``<D>.<text_suffix>`` and
    ``<D>.<image_suffix>`` (``[num_items, dim]`` raw float32, row = item index). Returns counts."""
    domain_dir = Path(domain_dir)
    table_path = domain_dir / f"{name}.items.tsv"
    table = load_item_table(table_path)
    order = list(range(len(table)))
    index_path = domain_dir / f"{name}.item2index"
    if index_path.exists():  # place rows by the domain's item index, not by table order
        ids = read_index_map(index_path)
        pos = {raw: i for i, (raw, _, _) in enumerate(table)}
        missing = [raw for raw in ids if raw not in pos]
        if missing or len(ids) != len(table):
            raise DataFormatError(table_path, f"items do not match {index_path.name}: {len(table)} rows vs "
                                              f"{len(ids)} indexed items (first unmatched: {missing[:1]})")
        order = [pos[raw] for raw in ids]
    texts = [table[j][1] for j in order]
    text_feats = hash_text_features(texts, dim, seed)
    image_feats = np.zeros((len(order), dim), dtype=np.float32)
    n_missing = 0
    for start in range(0, len(order), _CHUNK):
        imgs = []
        for j in order[start:start + _CHUNK]:
            rel = table[j][2]
            img = _load_image(domain_dir / rel, table_path, j + 2) if rel else None
            n_missing += img is None
            imgs.append(img)
        image_feats[start:start + len(imgs)] = pixel_image_features(imgs, dim, seed)
    text_out, image_out = domain_dir / f"{name}.{text_suffix}", domain_dir / f"{name}.{image_suffix}"
    write_features(text_out, text_feats)
    write_features(image_out, image_feats)
    log.info("proxy features for %s: %d items, dim %d, %d missing images", name, len(order), dim, n_missing)
    return {"num_items": len(order), "dim": dim, "missing_images": n_missing,
            "text": str(text_out), "image": str(image_out)}


__all__ = ["TEXT_BUCKETS", "hash_text_features", "pixel_image_features", "write_proxy_features"]
