"""Distributed pre-training: config injection, the streamed multi-domain plan, gathered negatives on 2 gloo
ranks (and 2 nodes), ZeRO-1/2/3 and bf16 against one rank, SIGKILL + resume, export, and transfer to a held-out
domain. Every run pins gloo on the CPU (DS_ACCELERATOR=cpu, no CUDA visible), so it behaves the same on a GPU
host."""

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
TINY = ["missrec.hidden=32", "missrec.inner=64", "missrec.heads=2", "max_len=20", "progress=false", "num_workers=1"]



def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def pretrain(out: Path, data: list[Path], ranks: int, sets: list[str], zero: str | Path = "zero2",
             resume: bool = False, launcher: str = "deepspeed", env: dict[str, str] | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    ds = zero if isinstance(zero, Path) else REPO / "cluster_configs" / f"{zero}.json"
    args = ["--deepspeed_config", str(ds),
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
        write_domain_shards(dom, root / "shards" / d, samples_per_shard=250, feature_suffixes=["feat1CLS", "feat3CLS"],
                            show_progress=False)
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


def _index(folder: Path, num_items: int, seed: int = 0) -> Path:
    """A random interest index for ``num_items`` items of 2 modalities (5 interests)."""
    from missrec.interests.tables import write_index, write_slices

    rng = np.random.default_rng(seed)
    write_slices(folder, 0, rng.integers(0, 5, (num_items, 2)), rng.normal(size=(5, 32)))
    write_index(folder, [0, num_items], [0, 5], 2, 32)
    return folder


def _shard_of(data, d: int, row: int) -> int:
    return row // 250  # samples_per_shard of the catalogue fixture


def test_streams_split_global_batches_across_ranks_and_shards(catalogue, tmp_path):
    """1 rank reading 2 streams trains on the global batches 2 ranks read, one stream each; the streams read
    disjoint shards that together cover every shard; resuming at step 3 replays the same batches; domain
    weights decide the share of steps; the batches bring only the rows they use."""
    from missrec.data.pretrain_stream import PretrainData

    folders = [catalogue["Kitchen"], catalogue["Garden"]]
    common = {"seed": 5, "max_len": 20, "drop_prob": 0.2, "streams": 2, "shuffle_buffer": 50}
    whole = PretrainData(folders, ("feat1CLS", "feat3CLS"), batch_size=64, **common)
    halves = [PretrainData(folders, ("feat1CLS", "feat3CLS"), batch_size=32, world_size=2, rank=r, **common)
              for r in range(2)]
    index = _index(tmp_path / "index", whole.num_items)
    assert whole.num_items == 480 and whole.steps_per_epoch() == halves[0].steps_per_epoch()
    a = list(whole.loader(1, index))
    b0, b1 = (list(h.loader(1, index)) for h in halves)
    assert len(a) == len(b0) == len(b1) == whole.steps_per_epoch()
    shards: dict[tuple[int, int], set[int]] = {}
    for x, y0, y1 in zip(a, b0, b1):
        assert x.step == y0.step == y1.step and x.domain == y0.domain == y1.domain
        assert torch.equal(x.item_key, torch.cat([y0.item_key, y1.item_key]))
        assert torch.equal(x.user_key, torch.cat([y0.user_key, y1.user_key]))
        assert torch.equal(x.rows, torch.cat([y0.rows, y1.rows]))
        for stream, y in enumerate((y0, y1)):  # the view is the stream's, whoever reads it
            assert torch.equal(x.view_len[32 * stream : 32 * (stream + 1)], y.view_len)
            shards.setdefault((x.domain, stream), set()).update(_shard_of(whole, x.domain, int(r)) for r in y.rows)
        assert (x.item_key >= 240).all() == (x.domain == 1)  # Garden's items come after Kitchen's
        assert len(x.feats[0]) <= 1 + 2 * 64 * 20 and len(x.feats[0]) < 480  # the rows it uses, not the catalogue
    for d, n in enumerate(whole.rows):
        total = -(-int(n) // 250)
        assert shards[(d, 0)].isdisjoint(shards[(d, 1)])
        assert shards[(d, 0)] | shards[(d, 1)] == set(range(total))
    again = list(whole.loader(1, index, start_step=3))
    assert [x.step for x in again] == [x.step for x in a[3:]]
    assert torch.equal(again[0].seq, a[3].seq) and torch.equal(again[0].view_seq, a[3].view_seq)
    workers = PretrainData(folders, ("feat1CLS", "feat3CLS"), batch_size=64, num_workers=2, **common)
    w = list(workers.loader(1, index, start_step=2))
    assert [x.step for x in w] == list(range(2, len(a)))  # in step order from 2 workers
    assert [x.step for x in list(workers.loader(1, index, start_step=2))] == [x.step for x in w]
    skewed = PretrainData(folders, ("feat1CLS",), weights=(3, 1), batch_size=64, **common)
    assert abs((skewed.domain_plan(0) == 0).mean() - 0.75) < 0.1


# ------------------------------------------------------------------------------------------ distributed


def _ds_json(tmp: Path, base: str) -> Path:
    """``base`` with Adam's eps at 1: the first updates are then about lr x gradient, not lr x its sign, so
    gradients averaged wrongly over ranks (summed, say) would change them."""
    cfg = json.loads((REPO / "cluster_configs" / f"{base}.json").read_text())
    cfg["optimizer"] = {"type": "AdamW", "params": {"eps": 1.0}}
    out = tmp / f"{base}-eps1.json"
    out.write_text(json.dumps(cfg))
    return out


PARITY = ["epochs=1", "max_steps_per_epoch=3", "missrec.dropout=0.0", "missrec.attn_dropout=0.0", "drop_prob=0.0",
          "streams=2", "lr=0.05"]


@pytest.fixture(scope="module")
def one_rank(catalogue, tmp_path_factory) -> Path:
    """The reference: 1 rank, global batch 64 read from the 2 streams 2 ranks read."""
    tmp = tmp_path_factory.mktemp("one")
    pretrain(tmp / "run", [catalogue["Kitchen"], catalogue["Garden"]], 1, PARITY + ["batch_size=64"],
             zero=_ds_json(tmp, "zero2"))
    return tmp / "run"


def _assert_parity(run: Path, ref: Path, atol: float, rtol: float) -> None:
    got, want = export(run), export(ref)
    m1 = json.loads((ref / "metrics.json").read_text())
    m2 = json.loads((run / "metrics.json").read_text())
    assert m2["world_size"] == 2 and m1["global_batch"] == m2["global_batch"] == 64
    for k in want:
        assert torch.allclose(got[k], want[k], atol=atol, rtol=rtol), (k, (got[k] - want[k]).abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero1", "zero3"])
def test_two_ranks_train_to_the_one_rank_parameters(catalogue, one_rank, tmp_path, zero):
    """Gathered negatives + averaged gradients: 2 x 32 rows on 2 ranks == 64 rows on 1 rank, with an optimizer
    step that is not invariant to the gradients' scale, for ZeRO-1, 2 and 3 (3 partitions the parameters)."""
    pretrain(tmp_path / zero, [catalogue["Kitchen"], catalogue["Garden"]], 2, PARITY + ["batch_size=32"],
             zero=_ds_json(tmp_path, zero), launcher="torchrun" if zero == "zero2" else "deepspeed")
    _assert_parity(tmp_path / zero, one_rank, atol=2e-5, rtol=1e-4)
    m = json.loads((tmp_path / zero / "metrics.json").read_text())
    assert m["zero_stage"] == int(zero[-1])


@pytest.mark.slow
def test_bf16_two_ranks_stay_close_to_one_rank(catalogue, tmp_path):
    """bf16 rounds differently for 32 and 64 rows, so 2 ranks are compared with 1 rank in bf16 within bf16's
    precision; gradients summed instead of averaged would move the parameters twice as far."""
    data = [catalogue["Kitchen"], catalogue["Garden"]]
    ds = _ds_json(tmp_path, "bf16")
    pretrain(tmp_path / "one", data, 1, PARITY + ["batch_size=64"], zero=ds)
    pretrain(tmp_path / "two", data, 2, PARITY + ["batch_size=32"], zero=ds)
    one, two = export(tmp_path / "one"), export(tmp_path / "two")
    m = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m["bf16"] is True
    for k in one:
        assert torch.allclose(one[k].float(), two[k].float(), atol=2e-3, rtol=2e-2), (k, (one[k] - two[k]).abs().max())


@pytest.mark.slow
def test_two_nodes_train_like_two_local_ranks(catalogue, tmp_path):
    """Two "nodes" of one rank each (torchrun --nnodes 2 --node_rank 0|1, rendezvous on 127.0.0.1) train an
    epoch to the parameters of 2 ranks on one node, on the same rows; each node reads its own shards: disjoint,
    and together every shard of the epoch's domains."""
    import sys as _sys

    from missrec.train.dist import free_port
    from missrec.train.trace import read_trace

    data = [catalogue["Kitchen"], catalogue["Garden"]]
    sets = PARITY + ["batch_size=32", "max_steps_per_epoch=0", "trace_samples=true"]
    ds = _ds_json(tmp_path, "zero2")
    pretrain(tmp_path / "local", data, 2, sets, zero=ds)
    port = str(free_port())
    args = ["--deepspeed_config", str(ds), "--data", ",".join(map(str, data)), "--output-dir",
            str(tmp_path / "nodes"), "--quiet"]
    for item in TINY + sets:
        args += ["--set", item]
    procs = [subprocess.Popen(
        [str(Path(_sys.executable).parent / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
         str(node), "--master_addr", "127.0.0.1", "--master_port", port, str(REPO / "launcher" / "pretrain.py"),
         *args], cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    m = json.loads((tmp_path / "nodes" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["global_batch"] == 64
    nodes, local = export(tmp_path / "nodes"), export(tmp_path / "local")
    for k in local:
        assert torch.allclose(nodes[k], local[k], atol=1e-6, rtol=1e-5), k
    seen = []
    for rank in (0, 1):
        trace = read_trace(tmp_path / "nodes", rank)
        assert trace == read_trace(tmp_path / "local", rank)
        seen.append({(t[3], r // 250) for t in trace for r in t[4]})  # (domain, shard) of every trained row
    assert seen[0].isdisjoint(seen[1])
    rows = [json.loads((f / "manifest.json").read_text())["splits"]["train"]["rows"] for f in data]
    assert seen[0] | seen[1] == {(d, s) for d, n in enumerate(rows) for s in range(-(-n // 250))}


@pytest.fixture(scope="module")
def zero2_run(catalogue, tmp_path_factory) -> Path:
    """An uninterrupted ZeRO-2 pre-training on 2 ranks (checkpoint every 5 steps)."""
    out = tmp_path_factory.mktemp("zero2") / "run"
    pretrain(out, [catalogue["Kitchen"], catalogue["Garden"]], 2, RESUMABLE)
    return out


RESUMABLE = ["epochs=3", "batch_size=32", "checkpoint_every=5", "trace_samples=true"]


def _assert_same_training(ref: Path, run: Path) -> None:
    """Same final parameters as the uninterrupted run, and the same rows in the same steps: within each
    epoch's pass over a domain no row trained twice (train/trace.py)."""
    from missrec.train.trace import read_trace

    a, b = export(ref), export(run)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k
    for rank in (0, 1):
        want, got = read_trace(ref, rank), read_trace(run, rank)
        assert [t[1] for t in got] == list(range(len(got)))  # global steps 0, 1, 2, ... each once
        assert got == want
        seen: dict[tuple[int, int, int], list[int]] = {}
        for epoch, _gs, _st, dom, rows, passes in got:
            for r, p in zip(rows, passes):
                seen.setdefault((epoch, dom, p), []).append(r)
        for key, rows in seen.items():  # within an epoch's pass over a domain, no row twice
            assert len(rows) == len(set(rows)), f"rank {rank} (epoch, domain, pass) {key}: a row trained twice"


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
        assert "non-finite parameters now:" in out and "of domain" in out


def test_pretraining_refuses_the_ablation_without_interests(tmp_path):
    from missrec.config import build
    from missrec.train.pretrain import run_pretrain

    cfg = build(PretrainConfig, overrides=["missrec.use_interests=false", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="use_interests"):
        run_pretrain(cfg)
