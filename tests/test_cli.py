"""The click CLI, in process."""
import json
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner

from helpers import save_local_dir, write_images
import textspan
from textspan.cli import main
from textspan.datasets import load_rgb


def test_version():
    res = CliRunner().invoke(main, ["--version"])
    assert res.exit_code == 0 and textspan.__version__ in res.output


def test_info(tmp_path):
    name, _ = save_local_dir(tmp_path / "m")
    res = CliRunner().invoke(main, ["info", "--model", name, "--json"])
    assert res.exit_code == 0, res.output
    facts = json.loads(res.output[res.output.index("{"):])
    assert facts["n_layers"] == 2 and facts["n_heads"] == 4 and facts["n_tokens"] == 17 and facts["d_embed"] == 24


def test_decompose_command(tmp_path):
    name, ref = save_local_dir(tmp_path / "m")
    paths = write_images(tmp_path / "imgs", 2)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["decompose", *map(str, paths), "--model", name, "--output", str(out),
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary] == [p.stem for p in paths]
    model, preprocess, _ = textspan.load_model(name)
    x = preprocess(load_rgb(paths[1])).unsqueeze(0)
    d = textspan.decompose(model, x)
    heads = np.load(out / f"{paths[1].stem}_heads.npy")
    assert heads.shape == (2, 17, 4, 24)
    np.testing.assert_allclose(heads, d.heads[0].numpy(), atol=1e-6)
    s = summary[1]
    assert s["identity_error"] < 1e-5
    # contributions (dot products with e/||e||) of every layer plus the embedding term add up to 1
    assert abs(sum(r["total"] for r in s["layers"]) + s["embedding_term"] - 1) < 1e-4
    assert len(s["top_layers"]) == 2 and s["top_heads"][0]["head"].startswith("L")
    assert json.loads((out / "run.json").read_text())["model_fingerprint"] == textspan.fingerprint(model)


def test_cache_command_errors_are_clear(tmp_path):
    name, _ = save_local_dir(tmp_path / "m")
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(main, ["cache", str(tmp_path / "empty"), "--model", name, "-o", str(tmp_path / "c")])
    assert res.exit_code != 0 and "no images" in res.output
    write_images(tmp_path / "imgs", 2)
    res = CliRunner().invoke(main, ["cache", str(tmp_path / "imgs"), "--model", "ViT-B-32", "--pretrained",
                                    "/no/such/file.pt", "-o", str(tmp_path / "c")])
    assert res.exit_code != 0 and "/no/such/file.pt" in res.output


def test_cache_command_in_process(tmp_path):
    name, _ = save_local_dir(tmp_path / "m")
    write_images(tmp_path / "imgs", 5)
    res = CliRunner().invoke(main, ["cache", str(tmp_path / "imgs"), "--model", name, "-o", str(tmp_path / "c"),
                                    "--quiet", "--device", "cpu", "--num-workers", "1"])
    assert res.exit_code == 0, res.output
    assert "5 images cached" in res.output
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["rows_done"] == 5 and m["complete"]
    assert np.load(tmp_path / "c" / "heads.npy").shape == (5, 2, 4, 24)
