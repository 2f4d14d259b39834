"""Write a domain's item feature table from its texts (in-process; the Ray actor pool builds on this).

The table is MISSRec's raw float32 layout, row i = item i, beside a metadata JSON with the model,
dimension, normalisation, counts and sha256.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from missrec.data.atomic import load_domain, write_features
from missrec.io import sha256_file, write_json

log = logging.getLogger(__name__)


def extract_text_features(
    data_root: str | Path, domain: str, out_dir: str | Path, suffix: str = "minilm",
    model: str = "all-MiniLM-L6-v2", batch_size: int = 64, progress: bool = True,
) -> dict:
    """Encode every item text of ``domain`` with a sentence-transformers model into ``out_dir/<domain>.<suffix>``."""
    from missrec.features.text import SentenceEncoder

    dom = load_domain(data_root, domain, max_len=None)
    if dom.texts is None:
        raise FileNotFoundError(f"{Path(data_root) / domain}.text: the domain has no item texts")
    t0 = time.perf_counter()
    enc = SentenceEncoder(model)
    load_s = time.perf_counter() - t0
    feats = enc.encode(dom.texts, batch_size=batch_size, progress=progress)
    enc_s = time.perf_counter() - t0 - load_s
    if feats.shape[0] != dom.num_items:
        raise RuntimeError(f"encoder returned {feats.shape[0]} rows for {dom.num_items} items")
    out = Path(out_dir) / f"{domain}.{suffix}"
    write_features(out, feats)
    meta = {
        "domain": domain, "suffix": suffix, "model": model, "dim": int(feats.shape[1]),
        "items": int(dom.num_items), "normalised": bool(np.allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-3)),
        "sha256": sha256_file(out), "load_seconds": round(load_s, 2), "encode_seconds": round(enc_s, 2),
        "items_per_second": round(dom.num_items / enc_s, 1),
    }
    write_json(Path(out_dir) / f"{domain}.{suffix}.json", meta)
    log.info("wrote %s: %s", out, meta)
    return meta
