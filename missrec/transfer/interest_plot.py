"""Pictures of the discovered interests of a trained MISSRec run.

- a PNG: a 2-D projection (PCA over all modalities' item tokens together) with one panel per
  modality, tokens coloured by interest, interest centroids marked;
- TensorBoard's projector: every item token with its item id, modality and interest as metadata.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from missrec.errors import InputError
from missrec.serve.loading import load_run
from missrec.train.rank_zero import RankZero

log = logging.getLogger(__name__)

MODALITY_NAMES = ("text", "image", "modality 3", "modality 4")


def _pca(x: np.ndarray, dims: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(projection of ``x`` [N, D] -> [N, dims], mean [D], components [D, dims])."""
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    comp = vt[:dims].T
    return (x - mean) @ comp, mean, comp


def interest_picture(run_dir: str | Path, png: str | Path, tb_dir: str | Path | None = None) -> dict[str, Any]:
    """Draw the interests of the fine-tuned MISSRec in ``run_dir`` into ``png``; with ``tb_dir`` also log
    the item tokens and their interests to TensorBoard's projector there. Returns counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaded = load_run(run_dir)
    model = loaded.model
    if not getattr(model, "use_interests", False):
        raise InputError(f"{run_dir}: no interests to draw (not a MISSRec run, or trained with "
                         "missrec.use_interests=false)")
    with torch.no_grad():
        tokens = model.item_tokens()[:, 1:].float().cpu().numpy()  # [M, N, D]
    labels = model.item_interest[1:].cpu().numpy()  # [N, M]
    centroids = model.centroids.float().cpu().numpy()  # [C, D]
    m, n, _ = tokens.shape
    present = labels >= 0  # [N, M]
    flat = np.concatenate([tokens[j][present[:, j]] for j in range(m)])
    _, mean, comp = _pca(flat)
    cen2 = (centroids - mean) @ comp
    fig, axes = plt.subplots(1, m, figsize=(5.5 * m, 5), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for j in range(m):
        ax = axes[0, j]
        pts = (tokens[j][present[:, j]] - mean) @ comp
        lab = labels[present[:, j], j]
        ax.scatter(pts[:, 0], pts[:, 1], c=cmap(lab % 20), s=9, alpha=0.75, linewidths=0)
        used = np.unique(lab)
        ax.scatter(cen2[used, 0], cen2[used, 1], marker="X", s=70 if len(used) <= 40 else 14, c="black",
                   alpha=0.9 if len(used) <= 40 else 0.5, label="interest centres")
        ax.set_title(f"{MODALITY_NAMES[j] if j < len(MODALITY_NAMES) else j}: {int(present[:, j].sum())} tokens, "
                     f"{len(used)} interests")
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"Discovered interests of {Path(run_dir).name} (PCA of the adapted item tokens)")
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)
    if tb_dir is not None:
        raw = loaded.raw_ids
        meta, rows = [], []
        for j in range(m):
            for i in np.flatnonzero(present[:, j]):
                meta.append([raw[i], MODALITY_NAMES[j] if j < len(MODALITY_NAMES) else str(j), str(labels[i, j])])
                rows.append(tokens[j][i])
        rz = RankZero(tb_dir, rank=0)
        rz.embedding(torch.from_numpy(np.stack(rows)), meta, tag="item_tokens",
                     header=["item", "modality", "interest"])
        rz.close()
    log.info("interest picture: %s (%d items, %d interests)", png, n, centroids.shape[0])
    return {"png": str(png), "items": int(n), "interests": int(centroids.shape[0]),
            "tokens": int(present.sum()), "tensorboard": str(tb_dir) if tb_dir else None}
