"""Distributed pre-training: config injection, the multi-domain plan, gathered negatives on 2 gloo ranks,
ZeRO-1/2/3, SIGKILL + resume, export, and transfer to a held-out domain."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from missrec.config import PretrainConfig
from missrec.errors import ConfigError
from missrec.train.dist import launch_command
from missrec.train.engine import deepspeed_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["missrec.hidden=32", "missrec.inner=64", "missrec.heads=2", "max_len=20", "progress=false"]



def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def pretrain(out: Path, data: list[Path], ranks: int, sets: list[str], zero: str = "zero2", resume: bool = False,
             launcher: str = "deepspeed", env: dict[str, str] | None = None, check: bool = True
             ) -> subprocess.CompletedProcess:
    args = ["--deepspeed_config", str(REPO / "cluster_configs" / f"{zero}.json"),
            "--data", ",".join(map(str, data)), "--output-dir", str(out), "--quiet"]
    for s in TINY + sets:
        args += ["--set", s]
    if resume:
        args.append("--resume")
    cmd = launch_command(str(REPO / "launcher" / "pretrain.py"), args, ranks, launcher)
    before = _shm_buffers()
    proc = subprocess.run(cmd, cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=600, check=False)
    # DeepSpeed's CPU all-reduce buffers (69 MB per rank) must not outlive the run, killed or not
    assert _shm_buffers() <= before, f"left in /dev/shm: {sorted(_shm_buffers() - before)}"
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def _shm_buffers() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("deepspeed_allreduce_buffer_*")} if shm.is_dir() else set()


def export(run: Path) -> dict[str, torch.Tensor]:
    out = run / "backbone.pt"
    subprocess.run([sys.executable, str(REPO / "launcher" / "export.py"), "--run", str(run), "--out", str(out)],
                   cwd=REPO, env=_env(), check=True, capture_output=True, timeout=300)
    return torch.load(out, weights_only=True)["model"]


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> dict[str, Path]:
    """Synthetic catalogue: two source domains and one held-out target, as shard folders."""
    from missrec.data.atomic import load_domain
    from missrec.data.shard_writer import write_domain_shards
    from missrec.data.synthetic import SyntheticConfig, generate_catalogue

    root = tmp_path_factory.mktemp("pretrain")
    cfg = SyntheticConfig(seed=3, items_per_domain=240, users_per_domain=480, domains=("Kitchen", "Garden", "Office"),
                          target_domains=("Office",))
    generate_catalogue(root / "cat", cfg)
    out = {}
    for d in cfg.domains:
        dom = load_domain(root / "cat" / d, d, ["feat1CLS", "feat3CLS"])
        write_domain_shards(dom, root / "shards" / d, samples_per_shard=1000, feature_suffixes=["feat1CLS", "feat3CLS"])
        out[d] = root / "shards" / d
    return out


# ------------------------------------------------------------------------------------------ fast checks


def test_deepspeed_config_injects_batch_and_optimizer():
    cfg = PretrainConfig(batch_size=64, lr=5e-4, grad_clip=1.0)
    engine = {"zero_optimization": {"stage": 2}}
    out = deepspeed_config(engine, cfg, world_size=4)
    assert out["train_micro_batch_size_per_gpu"] == 64 and out["train_batch_size"] == 256
    assert out["optimizer"]["params"]["lr"] == 5e-4 and out["optimizer"]["params"]["torch_adam"] is True
    assert out["gradient_clipping"] == 1.0
    assert engine == {"zero_optimization": {"stage": 2}}  # input untouched
    assert deepspeed_config({"train_batch_size": 256}, cfg, 4)["train_batch_size"] == 256  # agreeing is fine
    with pytest.raises(ConfigError, match="train_batch_size"):
        deepspeed_config({"train_batch_size": 128}, cfg, 4, "x.json")
    with pytest.raises(ConfigError, match="lr"):
        deepspeed_config({"optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}, cfg, 1)
    with pytest.raises(ConfigError, match="stage"):
        deepspeed_config({"zero_optimization": {"stage": 5}}, cfg, 1)


def test_bad_deepspeed_json_names_file_and_line(tmp_path):
    from missrec.train.engine import read_ds_config

    bad = tmp_path / "ds.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 2,}\n}\n')
    with pytest.raises(ConfigError, match=r"ds.json:2"):
        read_ds_config(bad)


def test_cluster_configs_are_engine_settings_only():
    for f in sorted((REPO / "cluster_configs").glob("*.json")):
        cfg = json.loads(f.read_text())
        assert not {"train_batch_size", "train_micro_batch_size_per_gpu"} & set(cfg), f
        assert "lr" not in cfg.get("optimizer", {}).get("params", {}), f
        deepspeed_config(cfg, PretrainConfig(), 2, str(f))


def test_multi_domain_plan_splits_global_batches_across_ranks(catalogue):
    from missrec.data.multi import MultiDomainData

    data = MultiDomainData([catalogue["Kitchen"], catalogue["Garden"]], ("feat1CLS", "feat3CLS"), max_len=20)
    assert data.num_items == 480 and data.features[0].shape == (480, 64)
    whole = list(data.batches(epoch=1, batch_size=64, seed=5))
    halves = [list(data.batches(epoch=1, batch_size=32, rank=r, world_size=2, seed=5)) for r in range(2)]
    assert len(whole) == len(halves[0]) == len(halves[1]) == data.steps_per_epoch(64)
    for (s, b), (_, b0), (_, b1) in zip(whole, *halves):
        assert torch.equal(b.target, torch.cat([b0.target, b1.target]))
        assert int(b.domain[0]) == int(b0.domain[0]) == int(b1.domain[0])
        assert (b.domain == b.domain[0]).all()
    # global item indices: Garden items come after Kitchen's
    garden = [b for _, b in whole if int(b.domain[0]) == 1]
    assert garden and all(int(b.target.min()) >= 240 for b in garden)
    # resuming at step 3 replays the same batches
    again = list(data.batches(epoch=1, batch_size=64, seed=5, start_step=3))
    assert [s for s, _ in again] == [s for s, _ in whole[3:]]
    assert torch.equal(again[0][1].seq, whole[3][1].seq)
    # weights decide the share of batches
    skewed = MultiDomainData([catalogue["Kitchen"], catalogue["Garden"]], ("feat1CLS",), weights=(3, 1), max_len=20)
    domains, _ = skewed.epoch_plan(0, 0, 64)
    assert abs((domains == 0).mean() - 0.75) < 0.1


# ------------------------------------------------------------------------------------------ distributed


@pytest.mark.slow
def test_two_ranks_one_step_equals_one_rank_on_the_global_batch(catalogue, tmp_path):
    """Gathered negatives + averaged gradients: 2 x 32 rows on 2 ranks == 64 rows on 1 rank."""
    data = [catalogue["Kitchen"], catalogue["Garden"]]
    common = ["epochs=1", "max_steps_per_epoch=2", "missrec.dropout=0.0", "missrec.attn_dropout=0.0",
              "drop_prob=0.0"]
    pretrain(tmp_path / "one", data, 1, common + ["batch_size=64"])
    pretrain(tmp_path / "two", data, 2, common + ["batch_size=32"], launcher="torchrun")
    one, two = export(tmp_path / "one"), export(tmp_path / "two")
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m2["world_size"] == 2 and m1["global_batch"] == m2["global_batch"] == 64
    assert m1["history"][0]["loss"] == pytest.approx(m2["history"][0]["loss"], rel=1e-5)
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5, rtol=1e-4), k
    assert any(not torch.equal(one[k], torch.zeros_like(one[k])) for k in one)


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero1", "zero3", "bf16"])
def test_zero_stages_lower_the_loss(catalogue, tmp_path, zero):
    data = [catalogue["Kitchen"], catalogue["Garden"]]
    proc = pretrain(tmp_path / zero, data, 2, ["epochs=3", "batch_size=32", "max_steps_per_epoch=6"], zero=zero)
    assert proc.returncode == 0
    m = json.loads((tmp_path / zero / "metrics.json").read_text())
    losses = [h["seq_item"] for h in m["history"]]
    assert losses[-1] < losses[0], losses
    assert m["zero_stage"] == (3 if zero == "zero3" else 1 if zero == "zero1" else 2)


@pytest.fixture(scope="module")
def zero2_run(catalogue, tmp_path_factory) -> Path:
    """An uninterrupted ZeRO-2 pre-training on 2 ranks (checkpoint every 5 steps)."""
    out = tmp_path_factory.mktemp("zero2") / "run"
    pretrain(out, [catalogue["Kitchen"], catalogue["Garden"]], 2, RESUMABLE)
    return out


RESUMABLE = ["epochs=6", "batch_size=32", "checkpoint_every=5", "trace_samples=true"]


def _assert_same_training(ref: Path, run: Path) -> None:
    """Same final parameters as the uninterrupted run, and the same rows in the same steps: within each
    epoch every planned row trained once, none twice, none skipped (train/trace.py)."""
    from missrec.train.trace import read_trace

    a, b = export(ref), export(run)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k
    for rank in (0, 1):
        want, got = read_trace(ref, rank), read_trace(run, rank)
        assert [t[1] for t in got] == list(range(len(got)))  # global steps 0, 1, 2, ... each once
        assert got == want
        for epoch in {t[0] for t in got}:
            for dom in {t[3] for t in got}:
                rows = [r for t in got if t[0] == epoch and t[3] == dom for r in t[4]]
                assert len(rows) == len(set(rows)), f"rank {rank} epoch {epoch}: a row trained twice"


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_reaches_the_same_parameters(catalogue, zero2_run, tmp_path):
    from missrec.train.checkpoint import latest_tag
    from missrec.train.faults import FAULT_ENV

    data = [catalogue["Kitchen"], catalogue["Garden"]]
    run = tmp_path / "killed"
    steps = json.loads((zero2_run / "env.json").read_text())["steps_per_epoch"]
    kill_at = next(s for s in range(steps + 3, 2 * steps) if s % 5 == 3)  # mid-epoch 1, 3 steps past a checkpoint
    proc = pretrain(run, data, 2, RESUMABLE, env=_env(**{FAULT_ENV: f"{kill_at}:1"}), check=False)
    assert proc.returncode != 0
    assert not (run / "metrics.json").exists()
    resumed_at = int(latest_tag(run).removeprefix("step"))
    assert steps <= resumed_at < kill_at
    pretrain(run, data, 2, RESUMABLE, resume=True)
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps_this_run"] == m["global_step"] - resumed_at  # it resumed at the checkpoint, not restarted
    killed = (run / "trace" / "rank1-from00000000.tsv").read_text().splitlines()
    assert len(killed) > resumed_at  # the killed attempt trained steps past the checkpoint: redone, not doubled
    _assert_same_training(zero2_run, run)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["diskfull", "die"])
def test_checkpoint_write_fault_keeps_the_previous_checkpoint(catalogue, zero2_run, tmp_path, mode):
    """The disk fills up (EFBIG) or the rank dies (SIGXFSZ) while writing a checkpoint: that checkpoint
    is never marked complete, the previous one is the one resumed from, and training ends as if nothing
    had happened."""
    from missrec.train.checkpoint import COMPLETE, complete_tags
    from missrec.train.faults import SAVE_FAULT_ENV

    data = [catalogue["Kitchen"], catalogue["Garden"]]
    run = tmp_path / mode
    steps = json.loads((zero2_run / "env.json").read_text())["steps_per_epoch"]
    at = next(s for s in range(steps + 1, 2 * steps) if s % 5 == 0)  # a mid-epoch checkpoint of epoch 1
    proc = pretrain(run, data, 2, RESUMABLE, env=_env(**{SAVE_FAULT_ENV: f"{at}:1:{mode}"}), check=False)
    assert proc.returncode != 0
    if mode == "diskfull":
        out = proc.stdout + proc.stderr
        assert f"step{at:08d}: writing the checkpoint failed" in out, out[-5000:]  # an error, not a kill
        assert "so --resume uses step" in out
    else:
        assert f"exits with return code = -{int(signal.SIGXFSZ)}" in proc.stdout + proc.stderr  # killed mid-write
    assert (run / "checkpoints" / f"step{at:08d}").is_dir()  # the interrupted save left files behind ...
    assert not (run / "checkpoints" / f"step{at:08d}" / COMPLETE).exists()  # ... never marked complete
    previous = complete_tags(run)[-1][0]
    assert previous < at
    pretrain(run, data, 2, RESUMABLE, resume=True)
    m = json.loads((run / "metrics.json").read_text())
    assert m["steps_this_run"] == m["global_step"] - previous
    _assert_same_training(zero2_run, run)


@pytest.mark.slow
def test_pretrained_backbone_beats_scratch_on_a_held_out_domain(catalogue, zero2_run, tmp_path):
    export(zero2_run)
    from missrec.config import RunConfig, build
    from missrec.transfer.finetune import run_finetune

    def finetune(name: str, extra: list[str]) -> dict:
        cfg = build(RunConfig, [], [
            f"data.data_root={catalogue['Office']}", "data.domain=Office", "data.features=[feat1CLS,feat3CLS]",
            f"output_dir={tmp_path / name}", "model=missrec", "missrec.mode=inductive", "train.epochs=3",
            "train.batch_size=128", "data.max_len=20", "missrec.hidden=32", "missrec.inner=64", "missrec.heads=2",
            "train.progress=false", "train.threads=2", *extra])
        return run_finetune(cfg)["test"]

    scratch = finetune("scratch", [])
    pre = finetune("pre", [f"pretrained={zero2_run / 'backbone.pt'}", "missrec.pretrained_trainable=all"])
    assert pre["ndcg@10"] > scratch["ndcg@10"] and pre["recall@50"] >= scratch["recall@50"], (pre, scratch)
    np.testing.assert_array_less(0, list(pre.values()))


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["skip", "error"])
def test_nonfinite_loss_on_one_rank_is_skipped_and_counted_or_stops_naming_it(catalogue, tmp_path, policy):
    from missrec.train.faults import NAN_FAULT_ENV

    data = [catalogue["Kitchen"], catalogue["Garden"]]
    run = tmp_path / policy
    sets = ["epochs=1", "batch_size=32", "max_steps_per_epoch=4", f"nonfinite={policy}"]
    proc = pretrain(run, data, 2, sets, env=_env(**{NAN_FAULT_ENV: "2:1"}), check=policy == "skip")
    if policy == "skip":  # both ranks skip the step together (the engines stay in step), and count it
        m = json.loads((run / "metrics.json").read_text())
        assert m["skipped_nonfinite"] == 1 and m["steps_this_run"] == 4
        assert all(np.isfinite(v) for v in m["history"][0].values())
        assert all(torch.isfinite(v).all() for v in export(run).values())
    else:
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0
        assert "non-finite pre-training loss at epoch 0 step 2 (global 2) on rank(s) [1]" in out
        assert "non-finite parameters: none" in out and "of domain" in out


def test_pretraining_refuses_the_ablation_without_interests(tmp_path):
    from missrec.config import build
    from missrec.train.pretrain import run_pretrain

    cfg = build(PretrainConfig, overrides=["missrec.use_interests=false", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="use_interests"):
        run_pretrain(cfg)
