"""Inputs as users really save them, caches that check themselves and one error boundary: each class of input read
as a viewer or a spreadsheet shows it, or refused with the file, row or option named, never a traceback and never
a wrong number with exit status 0."""
from __future__ import annotations

import codecs
import csv
import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import textspan
from helpers import save_local_dir, tiny_clip, write_images
from textspan.cache import HeadCache, build_cache, check_cache
from textspan.cli import main
from textspan.datasets import ImageList, read_image
from textspan.errors import BadInputError, CorruptCacheError, DeviceError, StorageError, UnsupportedModelError
from textspan.text import TextBank


def run(*args, env=None):
    res = CliRunner().invoke(main, [str(a) for a in args], env=env)
    return res


def no_traceback(res):
    text = res.output + (res.stderr if res.stderr_bytes is not None else "")
    return "Traceback" not in text and not (res.exception and not isinstance(res.exception, SystemExit))


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    name, model = save_local_dir(tmp / "model", seed=0)
    return name, model


def _arrays_equal(a: Path, b: Path):
    for name in ("heads", "mlps", "embeddings", "cls_to_cls"):
        np.testing.assert_array_equal(np.load(a / f"{name}.npy"), np.load(b / f"{name}.npy"))


def _records(folder: Path):
    with open(folder / "images.csv", newline="", encoding="utf-8") as f:
        return [r[1:] for r in csv.reader(f)]


# --------------------------------------------------------------------------------------------------------------------
# text files as spreadsheets save them


def _waterbirds(folder: Path, n: int = 8, encoding="utf-8", bom=False, crlf=False, drop=None):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        name = f"images/b{i}.png"
        if not (folder / name).exists():
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / name)
        rows.append({"img_filename": name, "y": i % 2, "split": i % 3, "place": (i // 2) % 2})
    cols = [c for c in ("img_filename", "y", "split", "place") if c != drop]
    end = "\r\n" if crlf else "\n"
    text = ",".join(cols) + end + "".join(",".join(str(r[c]) for c in cols) + end for r in rows)
    data = text.encode(encoding)
    (folder / "metadata.csv").write_bytes((codecs.BOM_UTF8 if bom else b"") + data)
    return folder


def test_waterbirds_saved_by_a_spreadsheet_gives_the_clean_tables(tmp_path, local):
    name, _ = local
    clean = _waterbirds(tmp_path / "clean")
    saved = _waterbirds(tmp_path / "saved", bom=True, crlf=True)
    for src, out in ((clean, "c1"), (saved, "c2")):
        res = run("cache", src, "--model", name, "--device", "cpu", "--quiet", "-o", tmp_path / out)
        assert res.exit_code == 0, res.output
    a, b = HeadCache(tmp_path / "c1"), HeadCache(tmp_path / "c2")
    assert a.manifest["classes"] == b.manifest["classes"] == ["landbird", "waterbird"]
    ta, tb = a.images, b.images
    assert list(ta.columns) == list(tb.columns) and {"place", "group", "split"} <= set(tb.columns)
    assert list(ta["label"]) == list(tb["label"]) == [i % 2 for i in range(8)]
    assert list(ta["split"]) == list(tb["split"])
    _arrays_equal(tmp_path / "c1", tmp_path / "c2")


def test_a_metadata_csv_missing_a_column_is_refused_not_read_as_a_plain_folder(tmp_path, local):
    name, _ = local
    folder = _waterbirds(tmp_path / "wb", drop="place")
    res = run("cache", folder, "--model", name, "--device", "cpu", "--quiet", "-o", tmp_path / "c")
    assert res.exit_code == 1 and "metadata.csv" in res.output and "place" in res.output, res.output
    assert no_traceback(res) and not (tmp_path / "c" / "manifest.json").exists()


def test_lists_banks_and_class_files_with_bom_crlf_and_latin1(tmp_path):
    imgs = write_images(tmp_path / "imgs", 3)
    clean = ImageList.from_file(_write(tmp_path / "a.txt", "\n".join(map(str, imgs)) + "\n"))
    bom = ImageList.from_file(_write(tmp_path / "b.txt", "\r\n".join(map(str, imgs)) + "\r\n", bom=True))
    assert bom.paths == clean.paths
    c_clean = ImageList.from_file(_write(tmp_path / "a.csv", "path,label\n" + "".join(f"{p},x{i}\n" for i, p in
                                                                                      enumerate(imgs))))
    c_bom = ImageList.from_file(_write(tmp_path / "b.csv", "path,label\r\n" + "".join(f"{p},x{i}\r\n" for i, p in
                                                                                      enumerate(imgs)), bom=True))
    assert (c_bom.paths, c_bom.labels, c_bom.classes) == (c_clean.paths, c_clean.labels, c_clean.classes)
    # a bank saved in Latin-1 (a spreadsheet on Windows) is read with a warning and a note, not a traceback
    (tmp_path / "latin.txt").write_bytes("a caf\xe9\r\nna\xefve art\r\n".encode("latin-1"))
    assert TextBank.load(tmp_path / "latin.txt").texts == ["a café", "naïve art"]
    assert TextBank.load(_write(tmp_path / "bom.txt", "water\r\nland\r\n", bom=True)).texts == ["water", "land"]
    from textspan.zeroshot import read_lines

    assert read_lines(_write(tmp_path / "cls.txt", "cat\r\ndog\r\n", bom=True), "classes") == ["cat", "dog"]
    (tmp_path / "bad.txt").write_bytes(b"ok\nbad \x81\x8d here\n")
    with pytest.raises(BadInputError, match=r"bad\.txt, line 2"):
        TextBank.load(tmp_path / "bad.txt")
    with pytest.raises(BadInputError, match="twice"):
        read_lines(_write(tmp_path / "dup.txt", "cat\ndog\ncat\n"), "classes")


def _write(path: Path, text: str, bom: bool = False) -> Path:
    path.write_bytes((codecs.BOM_UTF8 if bom else b"") + text.encode("utf-8"))
    return path


# --------------------------------------------------------------------------------------------------------------------
# labels that must not shift


def test_an_empty_class_folder_keeps_its_index(tmp_path, local):
    name, _ = local
    write_images(tmp_path / "full", 9, classes=("a", "b", "c"))
    shutil.copytree(tmp_path / "full", tmp_path / "gap")
    for p in (tmp_path / "gap" / "b").iterdir():
        p.unlink()
    full, gap = ImageList.from_folder(tmp_path / "full"), ImageList.from_folder(tmp_path / "gap")
    assert gap.classes == full.classes == ["a", "b", "c"]
    assert [y for p, y in zip(full.paths, full.labels) if "/c/" in p] == [2, 2, 2]
    assert [y for p, y in zip(gap.paths, gap.labels) if "/c/" in p] == [2, 2, 2]
    assert any("'b'" in n["note"] and "no images" in n["note"] for n in gap.notes)
    res = run("cache", tmp_path / "gap", "--model", name, "--device", "cpu", "--quiet", "-o", tmp_path / "c")
    assert res.exit_code == 0, res.output
    cache = HeadCache(tmp_path / "c")
    assert cache.manifest["classes"] == ["a", "b", "c"]
    assert any("no images" in n["note"] for n in cache.manifest["notes"])
    assert sorted(set(cache.labels)) == [0, 2]


def test_an_unreadable_class_folder_keeps_its_index(tmp_path, monkeypatch):
    write_images(tmp_path / "imgs", 9, classes=("a", "b", "c"))
    real = os.scandir

    def scandir(path="."):
        if str(path).endswith(os.sep + "b"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    images = ImageList.from_folder(tmp_path / "imgs")
    assert images.classes == ["a", "b", "c"]
    assert set(images.labels) == {0, 2}
    assert any("cannot be read" in n["note"] for n in images.notes)


@pytest.fixture(scope="module")
def shapes_cache(tmp_path_factory):
    """A cache of the built-in model on 20 shapes-world images (its text tower reads the class names)."""
    tmp = tmp_path_factory.mktemp("shapes")
    textspan.write_shapes_world(tmp / "w", 20, seed=3)
    textspan.cache_images(tmp / "w" / "images", tmp / "c", "shapes", device="cpu")
    return tmp / "c"


def test_class_lists_are_checked_against_the_cache(tmp_path, shapes_cache):
    c = shapes_cache
    known = HeadCache(c).manifest["classes"]
    assert known == ["circle", "cross", "square", "star", "triangle"]
    wrong_count = _write(tmp_path / "two.txt", "circle\ncross\n")
    res = run("ablate", c, "--classes", wrong_count, "-o", tmp_path / "abl", "--same-set")
    assert res.exit_code == 1 and "2 classes" in res.output and "has 5" in res.output, res.output
    shifted = _write(tmp_path / "shift.txt", "circle\nsquare\ntriangle\nstar\ncross\n")  # the world's own order
    res = run("ablate", c, "--classes", shifted, "-o", tmp_path / "abl", "--same-set")
    assert res.exit_code == 1 and "'square'" in res.output and "cache's order" in res.output, res.output
    assert no_traceback(res) and not (tmp_path / "abl" / "ablations.json").exists()
    same = _write(tmp_path / "same.txt", "\r\n".join(known) + "\r\n", bom=True)
    res = run("ablate", c, "--classes", same, "-o", tmp_path / "abl", "--same-set")
    assert res.exit_code == 0, res.output
    from textspan.jobs import check_classes

    check_classes(["a", "b", "c", "d", "e"], HeadCache(c))  # other names in the cache's order (e.g. for ids): fine
    np.save(tmp_path / "w.npy", np.ones((HeadCache(c).manifest["d_embed"], 2), np.float32))
    with pytest.raises(BadInputError, match=r"expected a \[64, 5\] classifier"):
        textspan.ablate_cache(c, classifier=tmp_path / "w.npy", same_set=True)
    with pytest.raises(BadInputError, match="2 classes"):
        textspan.ablate_cache(c, classifier=tmp_path / "w.npy", classes=["circle", "cross"], same_set=True)


# --------------------------------------------------------------------------------------------------------------------
# caches that check themselves


def _odd_names(folder: Path):
    """Images whose names hold a newline, a comma, a quote and non-ASCII letters."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = ["a\nnewline.png", "b, comma.png", 'c "quoted".png', "d_\u00e9t\u00e9.png", "e plain.png", "f.png",
             "g\r\nboth.png"]
    for n in names:
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / n)
    return folder


def test_newline_in_a_file_name_then_a_kill_and_a_resume(tmp_path, local, monkeypatch):
    import textspan.cache as cache_mod

    name, model = local
    folder = _odd_names(tmp_path / "imgs")
    images = ImageList.from_folder(folder)
    pre = textspan.load_model(name)[1]
    build_cache(model, pre, images, tmp_path / "ref", model_name=name, batch_size=2, quiet=True)
    real = cache_mod.write_json_atomic
    for crash_at in (2, 3, 4):
        calls = {"n": 0}

        def flaky(path, data):
            calls["n"] += 1
            if calls["n"] == crash_at:
                # the batch's rows are in images.csv and the arrays, but not committed: a kill here
                raise KeyboardInterrupt("simulated kill")
            real(path, data)

        out = tmp_path / f"run{crash_at}"
        monkeypatch.setattr(cache_mod, "write_json_atomic", flaky)
        with pytest.raises(KeyboardInterrupt):
            build_cache(model, pre, images, out, model_name=name, batch_size=2, quiet=True)
        monkeypatch.setattr(cache_mod, "write_json_atomic", real)
        build_cache(model, pre, images, out, model_name=name, batch_size=2, quiet=True)
        assert _records(out) == _records(tmp_path / "ref")
        _arrays_equal(out, tmp_path / "ref")
        c = HeadCache(out)
        assert list(c.images["path"]) == images.paths and len(c.images) == len(c) == 7


def _small_cache(tmp_path, local, n=6):
    name, _ = local
    write_images(tmp_path / "imgs", n)
    res = run("cache", tmp_path / "imgs", "--model", name, "--device", "cpu", "--quiet", "-o", tmp_path / "c")
    assert res.exit_code == 0, res.output
    return tmp_path / "c"


def test_a_cut_short_array_is_named_on_open(tmp_path, local):
    c = _small_cache(tmp_path, local)
    data = (c / "heads.npy").read_bytes()
    (c / "heads.npy").write_bytes(data[:-100])
    with pytest.raises(CorruptCacheError, match=r"heads\.npy: \d+ bytes, expected \d+") as info:
        HeadCache(c)
    assert "--overwrite" in str(info.value)
    res = run("label-heads", c, "--bank", "shapes", "-o", c.parent / "lab")
    assert res.exit_code == 1 and "heads.npy" in res.output and no_traceback(res)


def test_a_missing_table_or_an_edited_row_count_is_named_on_open(tmp_path, local):
    c = _small_cache(tmp_path, local)
    m = json.loads((c / "manifest.json").read_text())
    (c / "manifest.json").write_text(json.dumps(dict(m, rows_done=4)))
    with pytest.raises(CorruptCacheError, match=r"shape \(6, .*expected \(4,"):
        HeadCache(c)
    (c / "manifest.json").write_text(json.dumps(m))
    HeadCache(c)
    rows = (c / "images.csv").read_text().splitlines()
    (c / "images.csv").write_text("\n".join(rows[:-1]) + "\n")
    with pytest.raises(CorruptCacheError, match=r"images\.csv: 5 image records, expected 6"):
        HeadCache(c)
    (c / "images.csv").unlink()
    with pytest.raises(CorruptCacheError, match=r"images\.csv is missing"):
        check_cache(c)
    (c / "manifest.json").write_text("{not json")
    res = run("ablate", c, "-o", c.parent / "abl")
    assert res.exit_code == 1 and "manifest.json" in res.output and no_traceback(res)


def test_cache_refuses_another_commands_folder(tmp_path, shapes_cache):
    assert run("ablate", shapes_cache, "-o", tmp_path / "abl", "--same-set").exit_code == 0
    res = run("cache", shapes_cache.parent / "w" / "images", "--device", "cpu", "--quiet", "-o", tmp_path / "abl")
    assert res.exit_code == 1 and "textspan ablate" in res.output, res.output
    assert not (tmp_path / "abl" / "heads.npy").exists()


def test_jobs_refuse_a_finished_run_with_other_settings(tmp_path, shapes_cache):
    c = shapes_cache
    for cmd, first, other in (("label-heads", ["--n-texts", "2"], ["--n-texts", "3"]),
                              ("ablate", ["--seed", "0"], ["--seed", "1"]),
                              ("completeness", ["--n-texts", "1,2"], ["--n-texts", "1,3"])):
        base = [cmd, c, "--bank", "shapes"] if cmd != "ablate" else [cmd, c]
        if cmd == "label-heads":
            base += ["--layers", "-1:"]
        if cmd == "completeness":
            base += ["--layers", "-1:", "--rank", "4"]
        out = tmp_path / cmd
        res = run(*base, *first, "-o", out, "--quiet")
        assert res.exit_code == 0, res.output
        before = (out / "run.json").read_text()
        assert run(*base, *first, "-o", out, "--quiet").exit_code == 0  # the same settings: rerun
        res = run(*base, *other, "-o", out, "--quiet")
        assert res.exit_code == 1 and "other settings" in res.output and no_traceback(res), res.output
        assert json.loads((out / "run.json").read_text())["settings"] == json.loads(before)["settings"]
        assert run(*base, *other, "-o", out, "--quiet", "--overwrite").exit_code == 0
    # the atlas of those labels: other settings (another image count) refused, --overwrite replaces
    site = tmp_path / "site"
    args = ["atlas", c, "--labels", tmp_path / "label-heads", "--map-images", "0", "-o", site, "--quiet"]
    assert run(*args, "--images", "2").exit_code == 0
    res = run(*args, "--images", "3")
    assert res.exit_code == 1 and "other settings" in res.output and "n_images" in res.output, res.output
    assert run(*args, "--images", "3", "--overwrite").exit_code == 0


def test_debias_refuses_a_finished_run_with_other_settings(tmp_path):
    textspan.write_shapes_waterbirds(tmp_path / "wb", 0, 12, 12)
    textspan.cache_images(tmp_path / "wb", tmp_path / "c", "shapes-spurious", device="cpu", split="test")
    base = ["debias", tmp_path / "c", "--same-set", "--draws", "1", "-o", tmp_path / "d", "--quiet"]
    assert run(*base, "--n-heads", "1").exit_code == 0
    res = run(*base, "--n-heads", "2")
    assert res.exit_code == 1 and "other settings" in res.output and "heads" in res.output, res.output
    assert run(*base, "--n-heads", "2", "--overwrite").exit_code == 0


# --------------------------------------------------------------------------------------------------------------------
# ordinary faults: one line, exit status 1, finished work kept


def test_disk_full_during_cache_keeps_the_last_commit_and_resumes(tmp_path, local, monkeypatch):
    name, _ = local
    write_images(tmp_path / "imgs", 10)
    ok = run("cache", tmp_path / "imgs", "--model", name, "--device", "cpu", "--quiet", "--batch-size", "2", "-o",
             tmp_path / "ref")
    assert ok.exit_code == 0
    import textspan.cache as cache_mod

    real = os.pwrite
    calls = {"n": 0}

    def full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 13:  # the lock's record, three batches of four arrays, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(cache_mod.os, "pwrite", full)
    res = run("cache", tmp_path / "imgs", "--model", name, "--device", "cpu", "--quiet", "--batch-size", "2", "-o",
              tmp_path / "c")
    assert res.exit_code == 1 and "disk is full" in res.output and "rerun the same command" in res.output, res.output
    assert "keeps the 6 images" in res.output and no_traceback(res)
    monkeypatch.setattr(cache_mod.os, "pwrite", real)
    res = run("cache", tmp_path / "imgs", "--model", name, "--device", "cpu", "--quiet", "--batch-size", "2", "-o",
              tmp_path / "c")
    assert res.exit_code == 0 and "resumed at image 6" in res.output, res.output
    _arrays_equal(tmp_path / "c", tmp_path / "ref")
    assert _records(tmp_path / "c") == _records(tmp_path / "ref")


def test_read_only_and_file_in_the_path(tmp_path, local, monkeypatch):
    name, _ = local
    write_images(tmp_path / "imgs", 2)
    (tmp_path / "file").write_text("x")
    res = run("cache", tmp_path / "imgs", "--model", name, "--device", "cpu", "--quiet", "-o",
              tmp_path / "file" / "sub")
    assert res.exit_code == 1 and "is a file, not a folder" in res.output and no_traceback(res), res.output
    res = run("label-heads", tmp_path / "nowhere", "-o", tmp_path / "file" / "x")
    assert res.exit_code in (1, 2) and no_traceback(res)
    real = Path.mkdir

    def read_only(self, *a, **k):
        if "ro" in self.parts:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", read_only)
    res = run("shapes-world", "--n", "2", "-o", tmp_path / "ro" / "w")
    assert res.exit_code == 1 and "read-only" in res.output and str(tmp_path / "ro") in res.output, res.output
    with pytest.raises(StorageError, match="read-only"):
        textspan.write_shapes_world(tmp_path / "ro" / "w2", 2)


def test_device_that_is_not_there(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    res = run("info", "--device", "cuda")
    assert res.exit_code == 1 and "--device cuda" in res.output and "--device cpu" in res.output, res.output
    assert no_traceback(res)
    with pytest.raises(DeviceError):
        textspan.load_model("shapes", device="cuda:0")
    res = run("info", "--device", "gpu7")
    assert res.exit_code == 1 and "not a torch device" in res.output


def test_hf_names_that_are_not_hub_ids():
    for bad in ("hf:not a name", "hf:https://huggingface.co/openai/clip-vit-base-patch16", "hf:a/b/c"):
        res = run("info", "--model", bad)
        assert res.exit_code == 1 and no_traceback(res) and bad[3:] in res.output, res.output


def test_checkpoints_that_are_not_state_dicts(tmp_path):
    model = tiny_clip(seed=0)
    torch.save(model, tmp_path / "whole.pt")  # a pickled module
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "meta.pt")
    for f, words in (("whole.pt", "does not unpickle"), ("text.pt", "not a PyTorch checkpoint"),
                     ("meta.pt", "not a state dict")):
        res = run("info", "--model", "ViT-B-32", "--pretrained", tmp_path / f)
        assert res.exit_code == 1 and words in res.output and f in res.output, res.output
        assert "weights_only=False" not in res.output and no_traceback(res)


def test_unreadable_image_files_are_skipped_and_reported(tmp_path, local):
    name, _ = local
    write_images(tmp_path / "imgs", 4)
    (tmp_path / "imgs" / "cat" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    res = run("cache", tmp_path / "imgs", "--model", name, "--device", "cpu", "--quiet", "-o", tmp_path / "c")
    assert res.exit_code == 0 and "1 failed" in res.output and "zz_broken.jpg" in res.output


def test_debug_shows_the_traceback():
    quiet = run("info", "--model", "hf:not a name")
    assert quiet.exit_code == 1 and no_traceback(quiet)
    loud = run("--debug", "info", "--model", "hf:not a name")
    assert isinstance(loud.exception, BadInputError)
    env = run("info", "--model", "hf:not a name", env={"TEXTSPAN_DEBUG": "1"})
    assert isinstance(env.exception, BadInputError)


def test_an_internal_error_is_one_line_with_status_3(monkeypatch):
    import textspan.models as models

    def boom(*a, **k):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(models, "model_info", boom)
    res = run("info")
    assert res.exit_code == 3 and "internal error" in res.output and "--debug" in res.output and no_traceback(res)


# --------------------------------------------------------------------------------------------------------------------
# code from a model folder


def test_a_model_folder_that_names_custom_code_is_refused_and_its_code_never_runs(tmp_path):
    from families import hf_clip

    model = hf_clip(seed=0)
    folder = tmp_path / "evil"
    model.save_pretrained(folder)
    marker = tmp_path / "ran.txt"
    (folder / "evil_config.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import CLIPConfig\n\nclass EvilConfig(CLIPConfig):\n    model_type = 'evil'\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil_config.EvilConfig"}
    cfg["model_type"] = "evil"
    (folder / "config.json").write_text(json.dumps(cfg))
    res = CliRunner().invoke(main, ["info", "--model", str(folder)], input="y\ny\ny\n")
    assert res.exit_code == 1 and "custom code" in res.output and "auto_map" in res.output, res.output
    assert not marker.exists() and no_traceback(res)
    with pytest.raises(UnsupportedModelError, match="never runs code"):
        textspan.load_model(f"hf:{folder}")
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------------------------
# images deeper than 8 bits


def test_deep_integer_and_float_images_keep_their_brightness(tmp_path):
    dark = np.full((16, 16), 2 ** 20, np.int32)
    bright = np.full((16, 16), 2 ** 30, np.int32)
    Image.fromarray(dark).save(tmp_path / "dark.tif")
    Image.fromarray(bright).save(tmp_path / "bright.tif")
    notes = []
    d, b = np.asarray(read_image(tmp_path / "dark.tif", notes=notes)), np.asarray(read_image(tmp_path / "bright.tif"))
    assert d.max() < 2 and 120 < b.max() < 135  # 2^20 and 2^30 of 2^31 - 1: not both white
    assert any("32-bit" in n and "2147483647" in n for n in notes)
    sixteen = np.full((16, 16), 32768, np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "g16.png")
    assert np.asarray(read_image(tmp_path / "g16.png")).max() == 128
    for top, expect in ((0.5, 128), (200.0, 200), (30000.0, 117)):
        Image.fromarray(np.full((8, 8), top, np.float32)).save(tmp_path / "f.tif")
        notes = []
        assert np.asarray(read_image(tmp_path / "f.tif", notes=notes)).max() == expect
        assert notes and "float image" in notes[0]
    Image.fromarray(np.full((8, 8), 1e6, np.float32)).save(tmp_path / "huge.tif")
    with pytest.raises(BadInputError, match="no known range"):
        read_image(tmp_path / "huge.tif")


# --------------------------------------------------------------------------------------------------------------------
# methods run where they are defined


def test_compare_on_an_average_pooled_tower_runs_the_methods_defined_there(tmp_path):
    model = tiny_clip(seed=6, layers=3, pool_type="avg", final_ln_after_pool=True, no_ln_pre=True)
    assert textspan.list_methods(model) == ["decomposition", "m2ib"]
    paths = write_images(tmp_path / "imgs", 2, size=32)
    from torchvision import transforms

    pre = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])
    tok = lambda texts: torch.randint(0, 64, (len(texts), 8))  # noqa: E731
    cmp = textspan.compare_methods(paths, ["a", "b"], tmp_path / "cmp",
                                   model=textspan.jobs.Loaded(model, pre, tok, "tiny"))
    assert list(cmp.maps) == ["decomposition", "m2ib"]
    assert textspan.list_methods("attn") == ["decomposition", "legrad", "gradcam", "rollout", "raw_attention",
                                             "chefer", "m2ib"]
    assert textspan.list_methods("cls") == textspan.list_methods()


def test_file_names_that_are_not_utf8_and_a_one_class_cache(tmp_path, shapes_cache):
    folder = tmp_path / "imgs" / "a"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / "ok.png")
    Image.fromarray(np.full((20, 20, 3), 200, np.uint8)).save(os.fsdecode(bytes(folder) + b"/bad\xff name.png"))
    res = run("cache", tmp_path / "imgs", "--device", "cpu", "--quiet", "-o", tmp_path / "c")
    assert res.exit_code == 0, res.output
    c = HeadCache(tmp_path / "c")
    assert len(c) == 2 and all(os.path.exists(p) for p in c.images["path"])
    res = run("ablate", tmp_path / "c", "--same-set", "-o", tmp_path / "abl")
    assert res.exit_code == 1 and "two classes" in res.output and no_traceback(res)


def test_overwrite_replaces_a_folder_with_an_unreadable_manifest(tmp_path, local):
    c = _small_cache(tmp_path, local)
    (c / "manifest.json").write_text("{not json")
    name, _ = local
    args = ["cache", tmp_path / "imgs", "--model", name, "--device", "cpu", "--quiet", "-o", c]
    res = run(*args)
    assert res.exit_code == 1 and "manifest.json" in res.output and "--overwrite" in res.output
    assert run(*args, "--overwrite").exit_code == 0 and len(HeadCache(c)) == 6
