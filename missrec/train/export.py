"""Turn a pre-training checkpoint (any ZeRO stage, fp32 or bf16) into one consolidated file that
``launcher/finetune.py --pretrained`` loads.

The file holds ``{"format", "model": fp32 state dict, "config": the run's merged config, "source":
checkpoint folder and tag, "sha256s"}``; the interest index is not needed downstream (fine-tuning
rediscovers interests on the target domain) and is left out.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from missrec.errors import MissingInputError
from missrec.io import atomic_open
from missrec.train.checkpoint import CHECKPOINTS, latest_tag

log = logging.getLogger(__name__)

EXPORT_FORMAT = "missrec-pretrained/1"


def export_checkpoint(run_dir: str | Path, out: str | Path, tag: str | None = None) -> dict[str, Any]:
    """Consolidate checkpoint ``tag`` (default: the latest complete one) of ``run_dir`` into ``out``."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir = Path(run_dir)
    tag = tag or latest_tag(run_dir)
    if tag is None:
        raise MissingInputError(f"{run_dir / CHECKPOINTS}: no complete checkpoint to export")
    state = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / CHECKPOINTS), tag=tag)
    state = {k: v.detach().to(torch.float32).clone().contiguous() for k, v in state.items()}
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    payload = {"format": EXPORT_FORMAT, "model": state, "config": config,
               "source": {"run": str(run_dir), "tag": tag}}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out, "wb") as fh:
        torch.save(payload, fh)
    n = sum(v.numel() for v in state.values())
    log.info("exported %s/%s -> %s (%d tensors, %d parameters)", run_dir, tag, out, len(state), n)
    return {"out": str(out), "tag": tag, "tensors": len(state), "parameters": int(n)}
