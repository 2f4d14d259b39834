"""Fine-tune (or train from scratch) one model on one domain and print its metrics as the last line;
or, with --domains, fan out one job per (domain, setting) as Ray tasks and write a results table.

    python launcher/finetune.py --data-root ../shared/datasets/scientific --domain Scientific \
        --model sasrec --output-dir runs/sasrec-sci
    python launcher/finetune.py --data-root ../shared/datasets/scientific_mm --domain Scientific \
        --model missrec --mode transductive --features feat1CLS,feat3CLS --output-dir runs/missrec-mm

Fan-out (run folders RUNS/<domain>/<setting>[-scratch]/, tables RUNS/results.md and results.json; exits 1
if any job failed, after writing the others' results; a rerun skips finished jobs):

    python launcher/finetune.py --data-root DATA --domains Scientific,Pantry \
        --settings transductive,inductive,sasrec --features feat1CLS,feat3CLS \
        [--pretrained CKPT --compare-scratch] --output-dir RUNS --num-cpus 8 --cpus-per-job 2 [--gpus-per-job 1]
    ray job submit --working-dir . -- python launcher/finetune.py ... --address auto

Settings: transductive / inductive = MISSRec with / without item IDs, sasrec = SASRec (IDs, no features).
Any config value can be set with ``--config diff.yaml`` and ``--set train.lr=5e-4`` (dotted keys); in a
fan-out they apply to every job (the setting decides model and missrec.mode).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from missrec.cli import add_debug_flag, launch
from missrec.config import RunConfig, build
from missrec.transfer.finetune import run_finetune


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_debug_flag(p)
    p.add_argument("--data-root", required=True, help="folder with the domain's atomic files or shard folder")
    one = p.add_mutually_exclusive_group(required=True)
    one.add_argument("--domain", help="one run on this domain")
    one.add_argument("--domains", help="fan-out: comma-separated domains, one job per (domain, setting)")
    p.add_argument("--model", choices=["sasrec", "missrec"], default=None)
    p.add_argument("--mode", choices=["transductive", "inductive"], default=None)
    p.add_argument("--features", default=None, help="comma-separated feature suffixes, e.g. feat1CLS,feat3CLS")
    p.add_argument("--feature-dir", default=None, help="folder of the feature files, if not beside the data")
    p.add_argument("--pretrained", default=None, help="pre-trained checkpoint (launcher/export.py output)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--config", action="append", default=[], help="YAML/JSON config diff (repeatable)")
    p.add_argument("--set", action="append", default=[], dest="overrides", help="dotted override key=value")
    p.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    fan = p.add_argument_group("fan-out (with --domains)")
    fan.add_argument("--settings", default="transductive,inductive",
                     help="comma-separated among transductive, inductive, sasrec")
    fan.add_argument("--compare-scratch", action="store_true",
                     help="with --pretrained: also run each MISSRec setting without pre-training")
    fan.add_argument("--num-cpus", type=int, default=0, help="CPUs of the local Ray (0: all)")
    fan.add_argument("--cpus-per-job", type=float, default=1.0)
    fan.add_argument("--gpus-per-job", type=float, default=0.0)
    fan.add_argument("--address", default="", help="Ray cluster address, e.g. auto (default: RAY_ADDRESS or local)")
    fan.add_argument("--on-config-change", choices=["rerun", "refuse"], default="rerun",
                     help="a finished run made with another config: move it aside and rerun, or stop")
    args = p.parse_args(argv)
    if args.domains is None:
        fan_only = [f for f, v in (("--settings", args.settings != "transductive,inductive"),
                                   ("--compare-scratch", args.compare_scratch), ("--num-cpus", args.num_cpus),
                                   ("--cpus-per-job", args.cpus_per_job != 1.0), ("--gpus-per-job", args.gpus_per_job),
                                   ("--address", args.address),
                                   ("--on-config-change", args.on_config_change != "rerun")) if v]
        if fan_only:
            p.error(f"{', '.join(fan_only)} need --domains (fan-out)")
    elif args.model or args.mode:
        p.error("--model/--mode are single-run options; a fan-out takes --settings")
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    logging.getLogger("missrec.train.loop").setLevel(logging.INFO)  # one line per epoch, even when quiet

    flags = [f"data.data_root={args.data_root}", f"output_dir={args.output_dir}"]
    if args.domain:
        flags.append(f"data.domain={args.domain}")
    if args.model:
        flags.append(f"model={args.model}")
    if args.mode:
        flags.append(f"missrec.mode={args.mode}")
    if args.features is not None:
        flags.append(f"data.features=[{args.features}]")
    if args.feature_dir:
        flags.append(f"data.feature_dir={args.feature_dir}")
    if args.pretrained:
        flags.append(f"pretrained={args.pretrained}")
    if args.epochs is not None:
        flags.append(f"train.epochs={args.epochs}")
    if args.seed is not None:
        flags.append(f"train.seed={args.seed}")
    if args.quiet:
        flags.append("train.progress=false")
    cfg = build(RunConfig, args.config, flags + args.overrides)
    if args.domains is not None:
        return _fanout(args, cfg)
    metrics = run_finetune(cfg)
    sys.stdout.write(json.dumps(metrics) + "\n")
    return 0


def _fanout(args: argparse.Namespace, base: RunConfig) -> int:
    from missrec.transfer.fanout import FanoutConfig, run_fanout

    for name in ("missrec.transfer.fanout", "missrec.transfer.results"):  # a line per job, even when quiet
        logging.getLogger(name).setLevel(logging.INFO)
    fan = FanoutConfig(
        domains=tuple(d for d in args.domains.split(",") if d),
        settings=tuple(s for s in args.settings.split(",") if s),
        output_dir=args.output_dir, compare_scratch=args.compare_scratch, num_cpus=args.num_cpus,
        cpus_per_job=args.cpus_per_job, gpus_per_job=args.gpus_per_job, address=args.address,
        on_config_change=args.on_config_change, progress=not args.quiet,
    )
    summary = run_fanout(fan, base)
    sys.stdout.write(summary["markdown"] + "\n")
    last = {k: summary[k] for k in ("output_dir", "seconds", "counts", "failed")}
    last["results"] = {r["domain"]: r["values"] for r in summary["table"]["rows"]}
    sys.stdout.write(json.dumps(last) + "\n")
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(launch(main))
