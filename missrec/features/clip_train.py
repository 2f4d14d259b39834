"""Fit a small open_clip model on a catalogue's own (text, image) pairs, for the offline demo.

No pretrained CLIP weights can be downloaded on an offline machine, and a randomly initialised tower
encodes little. The demo therefore trains a tiny open_clip architecture (registered from a JSON
config) with the symmetric CLIP contrastive loss on the item pairs of the pre-training domains, saves
it as an ordinary open_clip checkpoint, and the extraction stage loads it with ``--pretrained PATH``
exactly as it would load ``ViT-B-32``/``openai`` on a connected machine.

    cfg_path, ckpt = fit_demo_clip([(text, image_path), ...], out_dir, steps=300)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from missrec.errors import InputError
from missrec.features.clip import register_model_config
from missrec.io import atomic_open, write_json

log = logging.getLogger(__name__)

DEMO_CLIP_NAME = "MissrecDemoCLIP"
DEMO_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def fit_demo_clip(
    pairs: Sequence[tuple[str, str | Path | None]], out_dir: str | Path, steps: int = 300, batch_size: int = 128,
    lr: float = 2e-3, seed: int = 0, name: str = DEMO_CLIP_NAME, progress: bool = True,
) -> tuple[Path, Path]:
    """Train ``name`` (architecture :data:`DEMO_CLIP_CONFIG`) on ``pairs`` of (text, image file or None);
    pairs without an image train the text tower only through the others. Returns (config, checkpoint)."""
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - a core dependency
        raise ImportError("the demo CLIP needs open_clip: `pip install 'missrec[clip]'`") from e
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path, ckpt = out_dir / f"{name}.json", out_dir / f"{name}.pt"
    write_json(cfg_path, DEMO_CLIP_CONFIG)
    register_model_config(cfg_path)
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(name)
    with_image = [(t, Path(p)) for t, p in pairs if p]
    if len(with_image) < 2:
        raise InputError("fitting the demo CLIP needs at least 2 items with images")
    t0 = time.perf_counter()
    images = torch.stack([preprocess(Image.open(p).convert("RGB")) for _, p in with_image])  # [N, 3, H, W]
    tokens = tokenizer([t for t, _ in with_image])  # [N, context]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    model.train()
    bar = tqdm(range(steps), desc="fit demo CLIP", unit="step", disable=not progress)
    loss = torch.zeros(())
    for _ in bar:
        idx = torch.from_numpy(rng.choice(len(with_image), size=min(batch_size, len(with_image)), replace=False))
        img = F.normalize(model.encode_image(images[idx]), dim=-1)  # [B, E]
        txt = F.normalize(model.encode_text(tokens[idx]), dim=-1)  # [B, E]
        logits = model.logit_scale.exp() * img @ txt.T  # [B, B]
        labels = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.detach().item():.3f}")
    model.eval()
    with atomic_open(ckpt, "wb") as fh:
        torch.save(model.state_dict(), fh)
    log.info("demo CLIP: %d pairs, %d steps, final loss %.3f, %.1fs -> %s", len(with_image), steps, loss.detach().item(),
             time.perf_counter() - t0, ckpt)
    return cfg_path, ckpt
