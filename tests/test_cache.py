"""The cache: equals direct decomposition, survives kills and bad files, refuses mismatches, shards with torchrun."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import save_local_dir, tiny_clip, write_images
import textspan
from textspan.cache import ARRAYS, CacheMismatchError, HeadCache, build_cache, read_manifest, shard_bounds
from textspan.datasets import ImageList, load_rgb

ENV = dict(os.environ, PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    name, _ = save_local_dir(tmp_path_factory.mktemp("model"), seed=0)
    model, preprocess, _ = textspan.load_model(name)
    return name, model, preprocess


def _arrays(folder):
    return {a: np.load(Path(folder) / f"{a}.npy") for a in ARRAYS}


def _assert_same_cache(a, b):
    xa, xb = _arrays(a), _arrays(b)
    for k in ARRAYS:
        assert xa[k].shape == xb[k].shape, k
        np.testing.assert_array_equal(xa[k], xb[k], err_msg=k)
    ra = [r[1:] for r in csv.reader(open(Path(a) / "images.csv"))]
    rb = [r[1:] for r in csv.reader(open(Path(b) / "images.csv"))]
    assert ra == rb
    assert read_manifest(a)["failures"] == read_manifest(b)["failures"]


def test_cache_equals_direct_decomposition(tmp_path, local_model):
    name, model, preprocess = local_model
    write_images(tmp_path / "imgs", 7)
    images = ImageList.from_folder(tmp_path / "imgs")
    res = build_cache(model, preprocess, images, tmp_path / "c", model_name=name, batch_size=3, quiet=True)
    assert res.rows == 7 and res.failures == []
    x = torch.stack([preprocess(load_rgb(p)) for p in images.paths])
    d = textspan.decompose(model, x, spatial=False)
    arr = _arrays(tmp_path / "c")
    np.testing.assert_allclose(arr["heads"], d.heads.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(arr["cls_to_cls"], d.cls_to_cls.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(arr["mlps"], d.mlps.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(arr["embeddings"], d.embedding.numpy(), rtol=0, atol=1e-6)
    m = read_manifest(tmp_path / "c")
    for key in ("model", "pretrained", "fingerprint", "image_size", "dtype", "rows_done", "failures"):
        assert key in m
    assert m["rows_done"] == 7 and m["complete"] and m["image_size"] == [32, 32]
    assert m["fingerprint"] == textspan.fingerprint(model)
    cache = HeadCache(tmp_path / "c")
    assert cache.heads.shape == (7, 2, 4, 24) and cache.mlps.shape == (7, 3, 24)
    assert list(cache.images["label"]) == images.labels
    assert list(cache.images["class_name"]) == [images.classes[y] for y in images.labels]
    cache.check_model(model)
    with pytest.raises(CacheMismatchError):
        cache.check_model(tiny_clip(seed=9))


def _bad_files(folder):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    good = Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    good.save(folder / "a_good.jpg", quality=95)
    data = (folder / "a_good.jpg").read_bytes()
    (folder / "b_corrupt.jpg").write_bytes(data[: len(data) // 2])
    (folder / "c_empty.jpg").write_bytes(b"")
    (folder / "d_notimage.png").write_bytes(b"this is not a png")
    Image.fromarray(rng.integers(0, 256, (40, 36), dtype=np.uint8), mode="L").save(folder / "e_gray.png")
    Image.fromarray(rng.integers(0, 256, (36, 40, 4), dtype=np.uint8), mode="RGBA").save(folder / "f_rgba.png")
    return folder


def test_bad_files_are_reported_and_skipped(tmp_path, local_model):
    name, model, preprocess = local_model
    folder = _bad_files(tmp_path / "imgs")
    images = ImageList.from_folder(folder)
    res = build_cache(model, preprocess, images, tmp_path / "c", model_name=name, batch_size=4, quiet=True)
    failed = sorted(Path(f["path"]).name for f in res.failures)
    assert failed == ["b_corrupt.jpg", "c_empty.jpg", "d_notimage.png"]
    assert all(f["error"] for f in res.failures)
    cache = HeadCache(tmp_path / "c")
    names = [Path(p).name for p in cache.images["path"]]
    assert names == ["a_good.jpg", "e_gray.png", "f_rgba.png"] and list(cache.images["row"]) == [0, 1, 2]
    assert cache.heads.shape[0] == 3 and read_manifest(tmp_path / "c")["failures"] == res.failures
    x = torch.stack([preprocess(load_rgb(folder / n)) for n in names])
    np.testing.assert_allclose(cache.heads, textspan.decompose(model, x, spatial=False).heads.numpy(), atol=1e-6)


def test_mismatched_cache_is_refused(tmp_path, local_model):
    name, model, preprocess = local_model
    write_images(tmp_path / "imgs", 4)
    images = ImageList.from_folder(tmp_path / "imgs")
    build_cache(model, preprocess, images, tmp_path / "c", model_name=name, quiet=True)
    other = tiny_clip(seed=5)
    with pytest.raises(CacheMismatchError, match="fingerprint"):
        build_cache(other, preprocess, images, tmp_path / "c", model_name=name, quiet=True)
    with pytest.raises(CacheMismatchError, match="dtype"):
        build_cache(model, preprocess, images, tmp_path / "c", model_name=name, dtype="float16", quiet=True)
    write_images(tmp_path / "imgs2", 5)
    with pytest.raises(CacheMismatchError, match="images_digest"):
        build_cache(model, preprocess, ImageList.from_folder(tmp_path / "imgs2"), tmp_path / "c", model_name=name,
                    quiet=True)
    res = build_cache(other, preprocess, images, tmp_path / "c", model_name=name, overwrite=True, quiet=True)
    assert res.rows == 4 and read_manifest(tmp_path / "c")["fingerprint"] == textspan.fingerprint(other)
    # a finished cache with the same settings is a no-op
    again = build_cache(other, preprocess, images, tmp_path / "c", model_name=name, overwrite=False, quiet=True)
    assert again.rows == 4 and again.seconds == 0.0


def test_float16_storage(tmp_path, local_model):
    name, model, preprocess = local_model
    write_images(tmp_path / "imgs", 3)
    images = ImageList.from_folder(tmp_path / "imgs")
    build_cache(model, preprocess, images, tmp_path / "a", model_name=name, quiet=True)
    build_cache(model, preprocess, images, tmp_path / "b", model_name=name, dtype="float16", quiet=True)
    a, b = _arrays(tmp_path / "a"), _arrays(tmp_path / "b")
    assert b["heads"].dtype == np.float16
    np.testing.assert_allclose(b["heads"].astype(np.float32), a["heads"], atol=2e-3, rtol=2e-3)


def test_crash_at_every_commit_then_resume_equals_uninterrupted(tmp_path, local_model, monkeypatch):
    """Simulate a crash just before each manifest commit (the batch in flight is lost), resume, compare bitwise."""
    import textspan.cache as cache_mod

    name, model, preprocess = local_model
    folder = _bad_files(tmp_path / "imgs")
    write_images(folder, 9, seed=3)
    images = ImageList.from_folder(folder)
    build_cache(model, preprocess, images, tmp_path / "ref", model_name=name, batch_size=2, quiet=True)
    real = cache_mod.write_json_atomic
    n_commits = -(-len(images) // 2) + 2
    for crash_at in range(1, n_commits):
        out = tmp_path / f"run{crash_at}"
        calls = {"n": 0}

        def flaky(path, data):
            calls["n"] += 1
            if calls["n"] == crash_at + 1:
                raise KeyboardInterrupt("simulated kill")
            real(path, data)

        monkeypatch.setattr(cache_mod, "write_json_atomic", flaky)
        with pytest.raises(KeyboardInterrupt):
            build_cache(model, preprocess, images, out, model_name=name, batch_size=2, quiet=True)
        monkeypatch.setattr(cache_mod, "write_json_atomic", real)
        res = build_cache(model, preprocess, images, out, model_name=name, batch_size=2, quiet=True)
        _assert_same_cache(out, tmp_path / "ref")
        assert res.rows == HeadCache(tmp_path / "ref").heads.shape[0]


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "textspan", *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, timeout=300)


def test_sigkill_then_rerun_equals_uninterrupted(tmp_path, local_model):
    name, _, _ = local_model
    write_images(tmp_path / "imgs", 300, size=32)
    args = ["cache", tmp_path / "imgs", "--model", name, "--batch-size", "2", "--device", "cpu", "--quiet"]
    ref = _cli(*args, "--output", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "textspan", *map(str, args), "--output", str(out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        m = None
        try:
            m = read_manifest(out)
        except (json.JSONDecodeError, OSError):
            pass
        if m and m["rows_done"] >= 40:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed_at = m["rows_done"]
            break
        time.sleep(0.002)
    assert killed_at is not None, "the run finished before it could be killed"
    m = read_manifest(out)
    assert not m["complete"] and m["rows_done"] < 300
    res = _cli(*args, "--output", out)
    assert res.returncode == 0, res.stderr
    assert "resumed at image" in res.stdout
    _assert_same_cache(out, tmp_path / "ref")
    assert json.loads((out / "run.json").read_text())["command"] == "cache"


@pytest.mark.parametrize("n_images", [11])
def test_torchrun_two_ranks_equal_one(tmp_path, local_model, n_images):
    name, _, _ = local_model
    folder = _bad_files(tmp_path / "imgs")
    write_images(folder, n_images, seed=4)
    common = ["cache", folder, "--model", name, "--batch-size", "3", "--device", "cpu", "--quiet"]
    # torchrun runs each rank with one thread; with the same thread count the arrays are bitwise equal (with other
    # thread counts, CPU matmuls may round differently in the last bit).
    one = _cli(*common, "--output", tmp_path / "one", env=dict(ENV, OMP_NUM_THREADS="1"))
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "--module", "textspan", *map(str, common), "--output", str(tmp_path / "two")],
                         capture_output=True, text=True, env=dict(ENV, OMP_NUM_THREADS="1"), timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    _assert_same_cache(tmp_path / "two", tmp_path / "one")
    m = read_manifest(tmp_path / "two")
    assert m["complete"] and m["world_size"] == 2 and not (tmp_path / "two" / "shards").exists()
    assert len(m["failures"]) == 3


def test_shard_bounds_cover_the_list_in_batch_aligned_pieces():
    for n in (0, 1, 7, 100, 101):
        for world in (1, 2, 3, 5):
            spans = [shard_bounds(n, 4, world, r) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert all(s % 4 == 0 or s == n for s, _ in spans)


def test_list_files(tmp_path):
    paths = write_images(tmp_path / "imgs", 4)
    (tmp_path / "list.txt").write_text("# my images\n" + "\n".join(str(p.relative_to(tmp_path)) for p in paths)
                                       + "\n\n")
    il = ImageList.from_path(tmp_path / "list.txt")
    assert il.paths == [str(p.resolve()) for p in paths] and il.labels == [-1] * 4
    with open(tmp_path / "list.csv", "w") as f:
        f.write("path,label\n" + "".join(f"{p},{'bird' if i % 2 else 'fish'}\n" for i, p in enumerate(paths)))
    il = ImageList.from_path(tmp_path / "list.csv")
    assert il.classes == ["bird", "fish"] and il.labels == [1, 0, 1, 0]
    with pytest.raises(FileNotFoundError, match="nothere"):
        ImageList.from_path(tmp_path / "nothere")
    (tmp_path / "bad.csv").write_text("file,label\nx.png,1\n")
    with pytest.raises(ValueError, match="'path' column"):
        ImageList.from_path(tmp_path / "bad.csv")


@pytest.mark.slow
def test_streaming_memory_is_bounded():
    """benchmarks/bench_cache_memory.py: 4000 images cost no more memory than 400 (results are streamed)."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_cache_memory.py"
    res = subprocess.run([sys.executable, str(script), "--json"], capture_output=True, text=True, env=ENV,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["small_images"] == 400 and r["large_images"] == 4000
    assert r["large_results_mb"] > 300  # holding the results in memory would show
    assert r["difference_mb"] < 100, r


@pytest.mark.slow
def test_torchrun_refuses_a_mismatched_cache_on_every_rank(tmp_path, local_model):
    name, _, _ = local_model
    write_images(tmp_path / "imgs", 4)
    assert _cli("cache", tmp_path / "imgs", "--model", name, "--quiet", "--output", tmp_path / "c",
                "--dtype", "float16").returncode == 0
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "--module", "textspan", "cache", str(tmp_path / "imgs"), "--model", name, "--quiet",
                          "--output", str(tmp_path / "c")], capture_output=True, text=True,
                         env=dict(ENV, OMP_NUM_THREADS="1"), timeout=120)
    assert two.returncode != 0
    assert two.stderr.count("other settings") >= 2  # both ranks say why
