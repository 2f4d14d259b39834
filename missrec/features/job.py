"""One feature-extraction job: read a domain's items, encode them in chunks (Ray pool or in-process),
resume from finished chunks, assemble the tables in item order, write them and then the metadata.

Outputs in ``out_dir`` (default: the domain folder), all written atomically:

- open_clip: ``<D>.<text_suffix>`` (default ``feat1CLS``) and ``<D>.<image_suffix>`` (``feat3CLS``) and
  ``<D>.features.json``;
- sentence-transformers (text only): ``<D>.<text_suffix>`` and ``<D>.<text_suffix>.json``;
- ``.chunks/<D>.<name>/``: the finished chunks (kept for resuming unless ``keep_chunks=False``).

Tables are MISSRec's raw little-endian float32 layout, row ``i`` = item ``i``. ``centre=True`` subtracts the
domain's mean row from every row and L2-normalises the result (rows that were zero stay zero): each domain's
items then sit around the origin, so a backbone pre-trained on several domains does not learn each one's offset
(docs/experiments.md, section 6). The chunks keep the raw rows: switching it costs no encoding.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from missrec.data.atomic import write_features
from missrec.errors import ConfigError
from missrec.features.chunks import ChunkRange, ChunkStore, assemble, fingerprint, plan_chunks
from missrec.features.clip import ClipSpec, describe_model
from missrec.features.encode import ChunkEncoder, EncoderSpec
from missrec.features.items import ItemSource, read_item_source
from missrec.features.pool import FaultHook, PoolConfig, run_pool
from missrec.features.text import resolve_model_path
from missrec.io import sha256_file, write_json

log = logging.getLogger(__name__)

FORMAT = "missrec-features/1"


@dataclass(frozen=True)
class ExtractConfig:
    """A job. ``pool=None`` encodes in this process (no Ray); ``fault`` is a test-only hook."""

    domain_dir: str
    domain: str
    encoder: EncoderSpec = field(default_factory=EncoderSpec)
    pool: PoolConfig | None = field(default_factory=PoolConfig)
    out_dir: str | None = None
    text_suffix: str = "feat1CLS"
    image_suffix: str = "feat3CLS"
    chunk_size: int = 256
    keep_chunks: bool = True
    centre: bool = False  # subtract the domain's mean row, then L2-normalise rows
    progress: bool = True
    fault: FaultHook | None = None

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if not self.text_suffix or self.text_suffix == self.image_suffix:
            raise ConfigError("text_suffix must be non-empty and differ from image_suffix")

    @property
    def output_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir else Path(self.domain_dir)

    @property
    def name(self) -> str:
        """``features`` for open_clip (two tables), else the text suffix: names the metadata and chunks."""
        return "features" if self.encoder.backend == "open_clip" else self.text_suffix


def describe_encoder(spec: EncoderSpec) -> dict:
    """JSON-able identity of the encoder's weights (what makes features comparable across runs)."""
    if spec.backend == "open_clip":
        return {"backend": spec.backend, **describe_model(ClipSpec(spec.model, spec.pretrained,
                                                                   spec.model_config, spec.precision))}

    path = Path(resolve_model_path(spec.model))
    weights = path / "model.safetensors"
    return {"backend": spec.backend, "name": spec.model, "path": str(path) if path.exists() else None,
            "weights_sha256": sha256_file(weights) if weights.is_file() else None}


def encode_in_process(spec: EncoderSpec, source: ItemSource) -> dict:
    """Reference path: all items of ``source`` through one in-process encoder.
    Returns ``{"text": [N, D], "image": [N, D] or None, "stats": {...}}``."""
    images = source.images if spec.has_image_tower else None
    return ChunkEncoder(spec, source.root).encode(source.item_ids, source.texts, images)


def extract_features(cfg: ExtractConfig) -> dict:
    """Run the job of ``cfg``; returns the metadata also written to ``<out>/<D>.<name>.json``."""
    t0 = time.perf_counter()
    source = read_item_source(cfg.domain_dir, cfg.domain)
    spec = cfg.encoder
    tables = ["text"] + (["image"] if source.has_images and spec.has_image_tower else [])
    if spec.has_image_tower and not source.has_images:
        log.warning("%s has no image column: writing the text table only", source.path)
    suffix = {"text": cfg.text_suffix, "image": cfg.image_suffix}
    model = describe_encoder(spec)
    out = cfg.output_dir
    weights = {k: v for k, v in model.items() if k not in ("checkpoint", "model_config", "path")}  # not paths
    fp = fingerprint({"format": FORMAT, "source_sha256": source.sha256, "items": len(source),
                      "chunk_size": cfg.chunk_size, "model": weights, "normalize": spec.normalize, "tables": tables})
    store = ChunkStore(out / ".chunks" / f"{cfg.domain}.{cfg.name}", fp)
    chunks = plan_chunks(len(source), cfg.chunk_size)
    pruned = store.prune(chunks)
    status = {c.index: store.status(c) for c in chunks}
    todo = [c for c in chunks if status[c.index] != "done"]
    skipped = len(chunks) - len(todo)
    stale = sum(s == "stale" for s in status.values())
    log.info("%s: %d items in %d chunks; %d done already, %d to encode (%d stale)", cfg.domain, len(source),
             len(chunks), skipped, len(todo), stale)

    bars: list = []

    def on_ready() -> None:  # the bar starts once the models are loaded: its rate is the encoding rate
        bars.append(tqdm(total=len(source), initial=len(source) - sum(len(c) for c in todo), unit="item",
                         desc=f"extract {cfg.domain}", disable=not cfg.progress, dynamic_ncols=True))

    def on_result(c: ChunkRange, res: dict) -> None:
        parts = {"text": res["text"]}
        if "image" in tables:
            parts["image"] = res["image"]
        store.write(c, parts, res["stats"])  # only reads the (read-only) arrays
        bars[0].update(len(c))

    run: dict = {"mode": "none (all chunks done)"}
    try:
        if todo and cfg.pool is not None:
            run = run_pool(cfg.pool, spec, source, todo, on_result, cfg.fault, on_ready)
        elif todo:
            run = _run_in_process(spec, source, todo, on_result, on_ready)
    finally:
        for b in bars:
            b.close()
    feats, chunk_stats = assemble(store, chunks, len(source), tables)
    meta_path = out / f"{cfg.domain}.{cfg.name}.json"
    meta_path.unlink(missing_ok=True)  # an earlier run's metadata must not vouch for tables being replaced
    table_meta = {}
    for name in tables:
        path = out / f"{cfg.domain}.{suffix[name]}"
        mean_norm = centre_rows(feats[name]) if cfg.centre else None
        write_features(path, feats[name])
        norms = np.linalg.norm(feats[name], axis=1)
        present = norms[norms > 0]
        table_meta[name] = {"suffix": suffix[name], "path": str(path), "shape": list(feats[name].shape),
                            "sha256": sha256_file(path), "zero_rows": int((norms == 0).sum()),
                            "unit_norm_rows": bool(present.size and np.allclose(present, 1.0, atol=1e-3)),
                            **({"centred_mean_norm": mean_norm} if cfg.centre else {})}
    wall = time.perf_counter() - t0
    computed = sum(len(c) for c in todo)
    enc_s = run.get("encode_seconds")
    meta = {
        "format": FORMAT, "domain": cfg.domain,
        "source": {"path": str(source.path), "sha256": source.sha256, "kind": source.path.name[len(cfg.domain) + 1:]},
        "model": model, "dim": int(feats["text"].shape[1]),
        "normalisation": "centred, l2" if cfg.centre else "l2" if spec.normalize else "none",
        "tables": table_meta, "counts": _counts(len(source), chunk_stats, "image" in tables),
        "chunks": {"total": len(chunks), "computed": len(todo), "skipped": skipped, "stale": stale,
                   "pruned_files": pruned, "chunk_size": cfg.chunk_size, "folder": str(store.folder)},
        "run": {**run, "batch_size": spec.batch_size},
        "items_computed": computed, "wall_seconds": round(wall, 3),
        "items_per_second": round(computed / wall, 2) if wall > 0 else None,
        "encode_items_per_second": round(computed / enc_s, 2) if enc_s else None,
    }
    write_json(meta_path, meta)  # last: its presence marks the tables complete
    if not cfg.keep_chunks:
        shutil.rmtree(store.folder, ignore_errors=True)
    log.info("wrote %s (%d items, %d computed, %.1fs)", meta_path, len(source), computed, wall)
    return meta


def centre_rows(table: np.ndarray) -> float:
    """Centre ``table`` [N, D] in place on the mean of its non-zero rows, then scale every row to unit length
    (zero rows, items without a text or image, stay zero); returns the norm of the mean that was removed."""
    present = table.any(axis=1)  # [N]
    count = int(present.sum())
    if count == 0:
        return 0.0
    mean = table.sum(axis=0) / count  # [D]; zero rows add nothing to the sum
    table -= mean  # in place: no [P, D] copies of the table
    table[~present] = 0.0
    norms = np.linalg.norm(table, axis=1, keepdims=True)  # [N, 1]
    np.divide(table, norms, out=table, where=norms > 0)
    return round(float(np.linalg.norm(mean)), 6)


def _run_in_process(spec: EncoderSpec, source: ItemSource, todo: list[ChunkRange], on_result, on_ready) -> dict:
    t0 = time.perf_counter()
    enc = ChunkEncoder(spec, source.root)
    on_ready()
    t1 = time.perf_counter()
    for c in todo:
        imgs = source.images[c.start:c.end] if source.images is not None else None
        on_result(c, enc.encode(source.item_ids[c.start:c.end], source.texts[c.start:c.end], imgs))
    return {"mode": "in-process", "device": enc.device, "startup_seconds": round(t1 - t0, 3),
            "encode_seconds": round(time.perf_counter() - t1, 3)}


def _counts(n: int, stats: list[dict], images: bool) -> dict:
    def listed(key: str) -> dict:
        pairs = [p for s in stats for p in s[key]]
        return {"count": len(pairs), "item_ids": [p[0] for p in pairs], "reasons": {p[0]: p[1] for p in pairs}}

    empty = [i for s in stats for i in s["texts_empty"]]
    out = {"items": n, "texts_encoded": sum(s["texts_encoded"] for s in stats),
           "texts_empty": {"count": len(empty), "item_ids": empty}}
    if images:
        out["images_encoded"] = sum(s["images_encoded"] for s in stats)
        out["images_missing"] = listed("images_missing")
        out["images_unreadable"] = listed("images_unreadable")
        if out["images_encoded"] + out["images_missing"]["count"] + out["images_unreadable"]["count"] != n:
            raise RuntimeError(f"image counts do not add up to the {n} items: {out}")
    return out


__all__ = ["ExtractConfig", "centre_rows", "describe_encoder", "encode_in_process", "extract_features"]
