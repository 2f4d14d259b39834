"""Extract item feature tables for a domain with a pool of Ray actors (or in-process).

open_clip, text and image towers of one model -> <D>.feat1CLS, <D>.feat3CLS, <D>.features.json:

    python launcher/extract_features.py --domain-dir DIR --domain D --backend open_clip \
        --model ViT-B-32 --pretrained openai --num-actors 2 --chunk-size 256 --batch-size 64 [--out DIR]

sentence-transformers, text only -> <D>.minilm, <D>.minilm.json:

    python launcher/extract_features.py --domain-dir ../shared/datasets/scientific --domain Scientific \
        --backend sentence-transformers --model all-MiniLM-L6-v2 --suffix minilm --out features/scientific

As a Ray job (the driver joins the job's cluster through RAY_ADDRESS):

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python launcher/extract_features.py --domain-dir /abs/DIR --domain D ...

Items come from <D>.items.tsv (item_id, text, image), else <D>.text (text only). Finished chunks are
kept under <out>/.chunks/ and skipped by a rerun. --num-actors 0 encodes in this process (no Ray).
The last stdout line is the metadata JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from missrec.cli import add_debug_flag, launch
from missrec.features.encode import EncoderSpec
from missrec.features.images import FetchConfig
from missrec.features.job import ExtractConfig, extract_features
from missrec.features.pool import PoolConfig

DEFAULT_MODEL = {"open_clip": "ViT-B-32", "sentence-transformers": "all-MiniLM-L6-v2"}


def build_config(args: argparse.Namespace) -> ExtractConfig:
    model = args.model or (Path(args.model_config).stem if args.model_config else DEFAULT_MODEL[args.backend])
    spec = EncoderSpec(
        backend=args.backend, model=model, pretrained=args.pretrained, model_config=args.model_config,
        precision=args.precision, normalize=args.normalize, batch_size=args.batch_size, device=args.device,
        torch_threads=args.torch_threads, encode_images=not args.no_images,
        fetch=FetchConfig(timeout=args.url_timeout, retries=args.url_retries),
    )
    pool = None
    if args.num_actors > 0:
        pool = PoolConfig(num_actors=args.num_actors, num_cpus_per_actor=args.cpus_per_actor,
                          num_gpus_per_actor=args.gpus_per_actor, address=args.address,
                          max_restarts=args.max_restarts, max_task_retries=args.max_task_retries)
    text_suffix = args.text_suffix or (args.suffix if args.backend == "sentence-transformers" else "feat1CLS")
    return ExtractConfig(
        domain_dir=args.domain_dir, domain=args.domain, encoder=spec, pool=pool, out_dir=args.out,
        text_suffix=text_suffix, image_suffix=args.image_suffix, chunk_size=args.chunk_size,
        keep_chunks=not args.clean_chunks, centre=args.centre, progress=not args.quiet,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_flag(p)
    p.add_argument("--domain-dir", "--data-root", dest="domain_dir", required=True,
                   help="the domain folder (<D>.items.tsv or <D>.text); image paths are relative to it")
    p.add_argument("--domain", required=True)
    p.add_argument("--out", default=None, help="folder for the tables and metadata (default: --domain-dir)")
    p.add_argument("--backend", choices=["open_clip", "sentence-transformers"], default="sentence-transformers")
    p.add_argument("--model", default=None, help="open_clip architecture or sentence-transformers model "
                   "(default ViT-B-32 / all-MiniLM-L6-v2; with --model-config: its file stem)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or local checkpoint path")
    p.add_argument("--model-config", default=None, help="open_clip architecture JSON to register (name = stem)")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--normalize", action="store_true", help="L2-normalise rows (default: raw embeddings)")
    p.add_argument("--no-images", action="store_true", help="open_clip: write the text table only")
    p.add_argument("--suffix", default="minilm", help="text table suffix of the sentence-transformers backend")
    p.add_argument("--text-suffix", default=None, help="text table suffix (default feat1CLS / --suffix)")
    p.add_argument("--image-suffix", default="feat3CLS")
    p.add_argument("--num-actors", type=int, default=2, help="Ray actors (0: encode in this process)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--gpus-per-actor", type=float, default=None, help="default: 1 if the cluster has GPUs")
    p.add_argument("--torch-threads", type=int, default=None, help="default: --cpus-per-actor")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--max-restarts", type=int, default=3)
    p.add_argument("--max-task-retries", type=int, default=3)
    p.add_argument("--url-timeout", type=float, default=10.0)
    p.add_argument("--url-retries", type=int, default=3)
    p.add_argument("--clean-chunks", action="store_true", help="delete the chunk folder after success")
    p.add_argument("--centre", action="store_true", help="subtract the domain's mean row, then L2-normalise "
                   "rows (for pre-training on several domains and transferring; docs/experiments.md section 6)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    meta = extract_features(build_config(args))
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(launch(main))
