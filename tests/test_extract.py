"""Item feature extraction: a pool of Ray actors running a tiny open_clip model (and sentence-transformers).

The Ray tests share one head started here on 127.0.0.1 (private temp dir and ports, dashboard on) with
``ray start --head --block``; terminating that process stops the processes it started, and only those
(``ray stop --force`` would stop every Ray on the machine, other users' included).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from missrec.data.atomic import read_features, write_index_map, write_text
from missrec.data.synthetic import SyntheticConfig, generate_catalogue
from missrec.errors import DataFormatError
from missrec.features.chunks import ChunkRange, ChunkStore, assemble, plan_chunks
from missrec.features.encode import EncoderSpec
from missrec.features.images import open_image
from missrec.features.items import read_item_source
from missrec.features.job import ExtractConfig, encode_in_process, extract_features
from missrec.features.pool import FaultHook, PoolConfig
from missrec.train.dist import free_port

REPO = Path(__file__).resolve().parents[1]
RAY = REPO / ".venv" / "bin" / "ray"
DOMAIN = "Kitchen"
N_ITEMS = 60
TOL = 1e-5
CORRUPT, DELETED = f"{DOMAIN}-000005", f"{DOMAIN}-000007"


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def domain_dir(tmp_path_factory) -> Path:
    """60 synthetic items (3 without an image); one image file corrupted and one deleted."""
    root = tmp_path_factory.mktemp("extract-cat")
    generate_catalogue(root, SyntheticConfig(items_per_domain=N_ITEMS, users_per_domain=50, domains=(DOMAIN,),
                                             target_domains=(), proxy_features=False))
    ddir = root / DOMAIN
    (ddir / "images" / f"{CORRUPT}.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (ddir / "images" / f"{DELETED}.png").unlink()
    return ddir


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> EncoderSpec:
    """The tiny open_clip model: random weights saved with torch.save, loaded back as ``pretrained``."""
    from missrec.features.clip import make_tiny_clip

    cfg_path, ckpt = make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
    return EncoderSpec(backend="open_clip", model=cfg_path.stem, pretrained=str(ckpt), model_config=str(cfg_path),
                       batch_size=8)


@pytest.fixture(scope="module")
def reference(domain_dir, spec) -> dict:
    return encode_in_process(spec, read_item_source(domain_dir, DOMAIN))



def _ray_env() -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1", PATH=f"{RAY.parent}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    return env


@contextlib.contextmanager
def _head(num_cpus: int = 2) -> Iterator[tuple[str, str, subprocess.Popen]]:
    """A private Ray head on 127.0.0.1 with the dashboard; yields (gcs address, dashboard URL, process)."""
    port, dash, client, agent = (free_port() for _ in range(4))
    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    log = open(Path(temp_dir) / "head.log", "w")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
         "--num-cpus", str(num_cpus), "--ray-client-server-port", str(client), "--dashboard-agent-listen-port",
         str(agent), "--temp-dir", temp_dir, "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, env=_ray_env(), start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray head did not start: {(Path(temp_dir) / 'head.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", url, proc
    finally:
        _stop_head(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_head(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # the --block process stops the Ray processes it started
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our own session: only what this head started
        proc.wait()


@pytest.fixture(scope="module")
def ray_head():
    """The module's shared head; yields (gcs address, dashboard URL)."""
    old_auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # for ray.init(address=...) from this process
    try:
        with _head() as (address, url, _):
            yield address, url
    finally:
        if old_auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = old_auth


def _tables(out: Path, n: int = N_ITEMS) -> tuple[np.ndarray, np.ndarray]:
    return (np.array(read_features(out / f"{DOMAIN}.feat1CLS", n)),
            np.array(read_features(out / f"{DOMAIN}.feat3CLS", n)))


def _launch(domain_dir: Path, spec: EncoderSpec, out: Path, chunk_size: int) -> dict:
    """A plain local run of the launcher (it starts and stops its own Ray, 2 actors); its metadata."""
    proc = subprocess.run(
        [sys.executable, "launcher/extract_features.py", "--domain-dir", str(domain_dir), "--domain", DOMAIN,
         "--backend", "open_clip", "--model-config", spec.model_config, "--pretrained", spec.pretrained,
         "--num-actors", "2", "--chunk-size", str(chunk_size), "--batch-size", str(chunk_size), "--out", str(out),
         "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=300, env=_ray_env(), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _index(item_id: str) -> int:
    return int(item_id.rsplit("-", 1)[1])


# ------------------------------------------------------------------------------------------------ fast units


def test_item_source_cross_checks_item2index(tmp_path):
    (tmp_path / "D.items.tsv").write_text("item_id\ttext\timage\na\tfirst\t\nb\tsecond\t\n")
    write_index_map(tmp_path / "D.item2index", ["a", "b"])
    src = read_item_source(tmp_path, "D")
    assert src.item_ids == ("a", "b") and src.images == ("", "")
    write_index_map(tmp_path / "D.item2index", ["b", "a"])
    with pytest.raises(DataFormatError, match=r"D\.items\.tsv:2: row 0 holds item 'a'"):
        read_item_source(tmp_path, "D")
    write_index_map(tmp_path / "D.item2index", ["a", "b", "c"])
    with pytest.raises(DataFormatError, match="2 item rows but D.item2index lists 3"):
        read_item_source(tmp_path, "D")


def test_text_only_source_from_atomic_text(tmp_path):
    write_index_map(tmp_path / "D.item2index", ["x", "y"])
    write_text(tmp_path / "D.text", ["y", "x"], ["why", "ex"])
    src = read_item_source(tmp_path, "D")
    assert src.texts == ("ex", "why") and src.images is None


def test_open_image_statuses(tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    assert open_image("ok.png", tmp_path).status == "ok"
    assert open_image("", tmp_path).status == "missing"
    assert open_image("nope.png", tmp_path).status == "missing"
    bad = open_image("bad.png", tmp_path)
    assert bad.status == "unreadable" and bad.image is None and "bad.png" in bad.reason


def test_open_image_from_url_on_localhost(tmp_path):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from PIL import Image

    from missrec.features.images import FetchConfig

    Image.new("RGB", (4, 4), (9, 9, 9)).save(tmp_path / "pic.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a, **k: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    fetch = FetchConfig(timeout=5, retries=1, backoff=0.01)
    try:
        assert open_image(f"{base}/pic.png", tmp_path, fetch).status == "ok"
        gone = open_image(f"{base}/absent.png", tmp_path, fetch)
        assert gone.status == "missing" and "404" in gone.reason
        assert open_image(f"{base}/bad.png", tmp_path, fetch).status == "unreadable"
    finally:
        server.shutdown()
        server.server_close()
    dead = open_image(f"{base}/pic.png", tmp_path, fetch)  # server gone: retried, then unreadable
    assert dead.status == "unreadable" and "2 tries" in dead.reason


def test_chunk_store_detects_corruption_and_assemble_checks_coverage(tmp_path):
    chunks = plan_chunks(5, 2)
    assert [(c.start, c.end) for c in chunks] == [(0, 2), (2, 4), (4, 5)]
    store = ChunkStore(tmp_path, "fp1")
    for c in chunks:
        store.write(c, {"text": np.full((len(c), 3), c.index, np.float32)}, {"k": c.index})
    assert [store.status(c) for c in chunks] == ["done"] * 3
    assert ChunkStore(tmp_path, "other-run").status(chunks[0]) == "stale"
    feats, stats = assemble(store, chunks, 5, ["text"])
    assert feats["text"][:, 0].tolist() == [0, 0, 1, 1, 2] and [s["k"] for s in stats] == [0, 1, 2]
    with open(tmp_path / "chunk-000001.text.npy", "r+b") as fh:  # flip a byte of the payload
        fh.seek(-1, os.SEEK_END)
        b = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([b[0] ^ 0xFF]))
    assert store.status(chunks[1]) == "stale"
    with pytest.raises(AssertionError, match="gap or overlap"):
        assemble(store, [chunks[0], ChunkRange(1, 1, 4), chunks[2]], 5, ["text"])
    with pytest.raises(AssertionError, match="cover items"):
        assemble(store, chunks[:2], 5, ["text"])


def test_in_process_job_zero_rows_counts_normalise_and_centre(domain_dir, spec, reference, tmp_path):
    meta = extract_features(ExtractConfig(str(domain_dir), DOMAIN, spec, pool=None, out_dir=str(tmp_path),
                                          chunk_size=16, progress=False))
    text, image = _tables(tmp_path)
    assert np.allclose(text, reference["text"], rtol=TOL, atol=TOL)
    assert np.allclose(image, reference["image"], rtol=TOL, atol=TOL)
    c = meta["counts"]
    assert c["images_unreadable"]["item_ids"] == [CORRUPT]
    assert DELETED in c["images_missing"]["item_ids"] and c["images_missing"]["count"] == 4  # 3 + deleted
    assert c["images_encoded"] == N_ITEMS - 5 and c["texts_encoded"] == N_ITEMS
    zero = ~image.any(axis=1)
    assert sorted(np.flatnonzero(zero)) == sorted(_index(i) for i in c["images_missing"]["item_ids"] + [CORRUPT])
    assert text.any(axis=1).all() and meta["normalisation"] == "none"
    assert not np.allclose(np.linalg.norm(text, axis=1), 1.0)  # raw embeddings by default
    assert meta["model"]["checkpoint_sha256"] and meta["dim"] == 16
    assert json.loads((tmp_path / f"{DOMAIN}.features.json").read_text())["tables"] == meta["tables"]
    norm = extract_features(ExtractConfig(str(domain_dir), DOMAIN, replace(spec, normalize=True),
                                          pool=None, out_dir=str(tmp_path / "l2"), chunk_size=16, progress=False))
    ntext, nimage = _tables(tmp_path / "l2")
    assert norm["normalisation"] == "l2" and np.allclose(np.linalg.norm(ntext, axis=1), 1.0, atol=1e-5)
    assert not nimage[zero].any()  # missing stays zero
    # centred: the same chunks (nothing encoded again), each table minus the mean of its non-zero rows, unit rows
    cen = extract_features(ExtractConfig(str(domain_dir), DOMAIN, spec, pool=None, out_dir=str(tmp_path),
                                         chunk_size=16, centre=True, progress=False))
    assert cen["chunks"]["computed"] == 0 and cen["normalisation"] == "centred, l2"
    ctext, cimage = _tables(tmp_path)
    for raw, got, name in ((text, ctext, "text"), (image, cimage, "image")):
        present = raw.any(axis=1)
        mean = raw[present].mean(axis=0)
        want = raw[present] - mean
        want /= np.linalg.norm(want, axis=1, keepdims=True)
        assert np.allclose(got[present], want, atol=1e-5) and not got[~present].any()
        assert cen["tables"][name]["centred_mean_norm"] == pytest.approx(np.linalg.norm(mean), rel=1e-4)
        assert cen["tables"][name]["unit_norm_rows"]


# ------------------------------------------------------------------------------------------------ Ray


@pytest.fixture(scope="module")
def pool_run(ray_head, domain_dir, spec, tmp_path_factory):
    """One 2-actor extraction on the head; (metadata, output folder)."""
    out = tmp_path_factory.mktemp("pool-out")
    cfg = ExtractConfig(str(domain_dir), DOMAIN, spec, PoolConfig(num_actors=2, address=ray_head[0]),
                        out_dir=str(out), chunk_size=8, progress=False)
    return extract_features(cfg), out


@pytest.mark.slow
def test_two_actors_equal_in_process(pool_run, reference):
    meta, out = pool_run
    text, image = _tables(out)
    assert np.allclose(text, reference["text"], rtol=TOL, atol=TOL)
    assert np.allclose(image, reference["image"], rtol=TOL, atol=TOL)
    assert meta["run"]["mode"] == "ray" and meta["run"]["num_actors"] == 2
    assert meta["chunks"] == {**meta["chunks"], "total": 8, "computed": 8, "skipped": 0}
    assert meta["counts"]["images_unreadable"]["item_ids"] == [CORRUPT]
    assert meta["counts"]["images_missing"]["count"] == 4 and not image[_index(DELETED)].any()


@pytest.mark.slow
def test_rerun_redoes_only_the_deleted_chunk_via_launcher(pool_run, domain_dir, spec):
    """Plain local run of the launcher (starts and stops its own Ray): only chunk 3 is encoded again."""
    meta0, out = pool_run
    before = _tables(out)
    (out / ".chunks" / f"{DOMAIN}.features" / "chunk-000003.image.npy").unlink()
    meta = _launch(domain_dir, spec, out, chunk_size=8)
    assert meta["chunks"]["computed"] == 1 and meta["chunks"]["skipped"] == 7 and meta["chunks"]["stale"] == 1
    assert meta["items_computed"] == 8 and meta["run"]["ray"].startswith("local")
    after = _tables(out)
    assert np.allclose(after[0], before[0], rtol=TOL, atol=TOL) and np.allclose(after[1], before[1], rtol=TOL, atol=TOL)
    assert meta["counts"] == meta0["counts"]


@pytest.mark.slow
def test_killed_actor_is_restarted_and_every_item_written_once(ray_head, domain_dir, spec, reference, tmp_path):
    marker = tmp_path / "fault-fired"
    cfg = ExtractConfig(str(domain_dir), DOMAIN, spec, PoolConfig(num_actors=2, address=ray_head[0]),
                        out_dir=str(tmp_path / "out"), chunk_size=8, progress=False,
                        fault=FaultHook(chunk=2, marker=str(marker)))
    meta = extract_features(cfg)
    assert marker.exists(), "the fault hook did not fire"
    assert meta["run"]["actor_restarts"] >= 1
    assert meta["chunks"]["computed"] == 8
    chunk_meta = [json.loads(p.read_text()) for p in sorted((tmp_path / "out" / ".chunks").glob("*/chunk-*.json"))]
    ranges = sorted((m["start"], m["end"]) for m in chunk_meta)
    assert len(ranges) == 8 and ranges[0][0] == 0 and ranges[-1][1] == N_ITEMS
    assert all(prev[1] == nxt[0] for prev, nxt in itertools.pairwise(ranges))  # no gap, no overlap
    text, image = _tables(tmp_path / "out")
    assert np.allclose(text, reference["text"], rtol=TOL, atol=TOL)
    assert np.allclose(image, reference["image"], rtol=TOL, atol=TOL)


@pytest.mark.slow
def test_ray_job_submit(ray_head, domain_dir, spec, reference, tmp_path):
    _, url = ray_head
    out = tmp_path / "job-out"
    sid = f"missrec-extract-{os.getpid()}-{int(time.time())}"
    cmd = [str(RAY), "job", "submit", "--address", url, "--submission-id", sid, "--working-dir", ".", "--",
           "python", "launcher/extract_features.py", "--domain-dir", str(domain_dir), "--domain", DOMAIN,
           "--backend", "open_clip", "--model-config", spec.model_config, "--pretrained", spec.pretrained,
           "--num-actors", "2", "--chunk-size", "16", "--batch-size", "8", "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=_ray_env(), check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert f"Job '{sid}' succeeded" in proc.stdout + proc.stderr
    status = subprocess.run([str(RAY), "job", "status", "--address", url, sid], capture_output=True, text=True,
                            timeout=60, env=_ray_env(), check=False)
    assert "succeeded" in (status.stdout + status.stderr).lower(), status.stdout[-2000:]
    meta_lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"format": "missrec-features/1"')]
    assert meta_lines, proc.stdout[-3000:]
    meta = json.loads(meta_lines[-1])
    assert meta["run"]["mode"] == "ray" and meta["run"]["ray"] != "existing" and meta["chunks"]["computed"] == 4
    text, image = _tables(out)
    assert np.allclose(text, reference["text"], rtol=TOL, atol=TOL)
    assert np.allclose(image, reference["image"], rtol=TOL, atol=TOL)
    assert json.loads((out / f"{DOMAIN}.features.json").read_text())["tables"] == meta["tables"]


# ------------------------------------------------------------------------------------------------ text backend


@pytest.mark.slow
def test_sentence_transformers_text_only_domain(tmp_path):
    """A domain with only <D>.text: the text backend writes <D>.minilm equal to SentenceEncoder's output."""
    pytest.importorskip("sentence_transformers")
    from missrec.features.text import SentenceEncoder

    ids = [f"i{k}" for k in range(12)]
    texts = [f"item number {k} " + "word " * k for k in range(12)]
    write_index_map(tmp_path / "S.item2index", ids)
    write_text(tmp_path / "S.text", ids, texts)
    spec = EncoderSpec(backend="sentence-transformers", model="all-MiniLM-L6-v2", batch_size=5)
    meta = extract_features(ExtractConfig(str(tmp_path), "S", spec, pool=None, text_suffix="minilm",
                                          chunk_size=5, progress=False))
    got = np.array(read_features(tmp_path / "S.minilm", 12))
    want = SentenceEncoder("all-MiniLM-L6-v2").encode(texts, batch_size=64)
    assert np.allclose(got, want, rtol=TOL, atol=TOL)
    assert set(meta["tables"]) == {"text"} and not (tmp_path / "S.feat3CLS").exists()
    assert (tmp_path / "S.minilm.json").exists() and meta["model"]["weights_sha256"]


# the extraction job of the head-stop test, run as its own driver: every actor takes a second per chunk
# (FaultHook.delay_s), so that the head can be stopped while the job is half done
_SLOW_DRIVER = """
import logging, sys
logging.basicConfig(level=logging.INFO)
from missrec.features.encode import EncoderSpec
from missrec.features.job import ExtractConfig, extract_features
from missrec.features.pool import FaultHook, PoolConfig
address, domain_dir, domain, out, model, pretrained, model_config = sys.argv[1:8]
spec = EncoderSpec(backend="open_clip", model=model, pretrained=pretrained, model_config=model_config, batch_size=4)
extract_features(ExtractConfig(domain_dir, domain, spec, PoolConfig(num_actors=2, address=address),
                               out_dir=out, chunk_size=4, progress=False, fault=FaultHook(delay_s=1.0)))
"""


@pytest.mark.slow
def test_ray_head_stopped_mid_job_then_rerun(domain_dir, spec, reference, tmp_path):
    """The Ray head node dies (SIGKILL to its processes) while half the chunks are stored: the driver
    fails (within RAY_gcs_rpc_server_reconnect_timeout_s) without writing the tables; the rerun, on a
    fresh local Ray, encodes only the missing chunks, every item once."""
    out = tmp_path / "out"
    chunk_dir = out / ".chunks" / f"{DOMAIN}.features"
    env = dict(_ray_env(), RAY_gcs_rpc_server_reconnect_timeout_s="5")
    with _head() as (address, _, head):
        job = subprocess.Popen(
            [sys.executable, "-c", _SLOW_DRIVER, address, str(domain_dir), DOMAIN, str(out), spec.model,
             spec.pretrained, spec.model_config], cwd=REPO, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300  # a loaded machine starts Ray and the actors slowly
        while len(list(chunk_dir.glob("chunk-*.json"))) < 3:
            assert job.poll() is None, f"the job ended before the head was stopped: {job.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "no chunk stored within 300 s"
            time.sleep(0.2)
        os.killpg(head.pid, signal.SIGKILL)  # the head node dies: GCS, raylet, dashboard, its workers
        head.wait()
        try:
            job.wait(timeout=300)
        except subprocess.TimeoutExpired:
            job.kill()
            pytest.fail("the job hung after its Ray head stopped")
    log = job.stdout.read()
    assert job.returncode != 0, log[-4000:]
    done = len(list(chunk_dir.glob("chunk-*.json")))
    assert 3 <= done < 15 and not (out / f"{DOMAIN}.features.json").exists()

    meta = _launch(domain_dir, spec, out, chunk_size=4)
    assert meta["chunks"]["skipped"] == done and meta["chunks"]["computed"] == 15 - done
    ranges = sorted((m["start"], m["end"]) for m in (json.loads(p.read_text()) for p in chunk_dir.glob("chunk-*.json")))
    assert len(ranges) == 15 and ranges[0][0] == 0 and ranges[-1][1] == N_ITEMS
    assert all(prev[1] == nxt[0] for prev, nxt in itertools.pairwise(ranges))  # every item once
    text, image = _tables(out)
    assert np.allclose(text, reference["text"], rtol=TOL, atol=TOL)
    assert np.allclose(image, reference["image"], rtol=TOL, atol=TOL)
