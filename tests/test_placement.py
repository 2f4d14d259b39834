"""Device mistakes caught without a GPU: a pre-training and a fine-tuning step run with the model on a stand-in
device (PyTorch's ``meta`` device: real shapes, no data) while the batches are built on the CPU by the real
loaders. An op that mixes a CPU tensor into the step fails there as it would on CUDA, and so does any host sync
(``.item()``, ``.tolist()``, ``int(tensor)``), which the step must not have."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from missrec.data.batching import Batch
from missrec.train.placement import place

META = torch.device("meta")


def _all_on(batch, device: torch.device) -> list[str]:
    tensors = batch.tensors() if hasattr(batch, "tensors") else (
        (k, v) for k, v in vars(batch).items() if isinstance(v, torch.Tensor))
    return [name for name, t in tensors if t.device != device]


@pytest.fixture(scope="module")
def shards(synthetic_root, tmp_path_factory) -> Path:
    from missrec.data.atomic import load_domain
    from missrec.data.shard_writer import write_domain_shards

    out = tmp_path_factory.mktemp("placement") / "Kitchen"
    dom = load_domain(synthetic_root / "Kitchen", "Kitchen", ["feat1CLS", "feat3CLS"])
    write_domain_shards(dom, out, samples_per_shard=500, feature_suffixes=["feat1CLS", "feat3CLS"], show_progress=False)
    return out


def test_meta_stands_in_for_a_device_that_rejects_cpu_tensors():
    """What the checks below rely on: the stand-in rejects a CPU operand and a host sync, as CUDA would."""
    x = torch.ones(3, device=META)
    with pytest.raises(RuntimeError):
        x + torch.ones(3)
    with pytest.raises(Exception):  # noqa: B017 - PyTorch raises a RuntimeError or a NotImplementedError
        x.sum().item()


def test_pretraining_step_runs_on_the_step_device(shards, tmp_path):
    from missrec.config import PretrainConfig
    from missrec.data.pretrain_stream import PretrainData
    from missrec.interests.tables import write_index, write_slices
    from missrec.models.build import missrec_from_config
    from missrec.train.pretrain import NonFiniteWatch, Sums, step_terms

    data = PretrainData([shards], ("feat1CLS", "feat3CLS"), batch_size=32, seed=1, max_len=10, drop_prob=0.2,
                        num_workers=1)
    rng = np.random.default_rng(0)
    write_slices(tmp_path, 0, rng.integers(0, 9, (data.num_items, 2)), rng.normal(size=(9, 16)))
    write_index(tmp_path, [0, data.num_items], [0, 9], 2, 16)
    batch = next(iter(data.loader(0, tmp_path, pin_memory=False)))
    assert not _all_on(batch, torch.device("cpu"))  # built on the host
    cfg = PretrainConfig().missrec
    model = missrec_from_config(cfg.__class__(**{**cfg.__dict__, "hidden": 16, "inner": 32, "heads": 2}),
                                data.num_items, None, 10, 0, feature_dims=data.store.dims).to(META)
    assert not _all_on(place(batch, META), META)
    out = step_terms(model, batch, META, seq_seq_weight=0.1)  # the loop's own step function, model as engine
    assert out["loss"].device == META and out["loss"].shape == ()
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.device == META for p in model.parameters() if p.requires_grad)
    Sums(META).add(out)  # the loop's per-step bookkeeping stays on the device too
    NonFiniteWatch(META).observe(out["loss"], 0, "")


@pytest.mark.parametrize("model_name", ["missrec", "sasrec"])
def test_finetuning_step_runs_on_the_step_device(synthetic_root, model_name):
    from missrec.config import RunConfig, build
    from missrec.train.loop import step_terms
    from missrec.transfer.finetune import DomainData, build_model

    cfg = build(RunConfig, overrides=[
        f"data.data_root={synthetic_root}", "data.domain=Kitchen", "data.features=[feat1CLS,feat3CLS]",
        f"model={model_name}", "missrec.hidden=16", "missrec.inner=32", "missrec.heads=2", "sasrec.hidden=16",
        "sasrec.heads=2", "sasrec.inner=32", "data.max_len=10", "train.batch_size=32"])
    data = DomainData(cfg)
    model = build_model(cfg, data)
    if model_name == "missrec":
        model.refresh_interests()  # on the host, as begin_epoch() does before the epoch's steps
    model.to(META)
    batch = next(iter(data.train_batches(0)))
    assert isinstance(batch, Batch) and not _all_on(batch, torch.device("cpu"))
    terms = step_terms(model, batch, META)
    assert terms["loss"].device == META
    terms["loss"].backward()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    assert all(p.device == META for p in model.parameters())
