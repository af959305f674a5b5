"""shapes-world / eval-shapes commands and loading built-in checkpoints (a freshly built model stands in for the
trained one; the shipped model has its own tests)."""
import csv
import json

import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image

import textspan
from textspan import builtin, world
from textspan.cli import main

from helpers import save_shapes_checkpoint


def _checkpoint(tmp_path):
    return save_shapes_checkpoint(tmp_path / "run")


def test_shapes_world_command_writes_images_masks_metadata(tmp_path):
    res = CliRunner().invoke(main, ["shapes-world", "--n", "5", "--seed", "2", "-o", str(tmp_path / "w")])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp_path / "w" / "metadata.csv")))
    assert len(rows) == 5
    for r in rows:
        s = world.sample(2, int(r["index"]))
        assert np.array_equal(np.asarray(Image.open(tmp_path / "w" / r["path"])), s.image)
        assert np.array_equal(np.asarray(Image.open(tmp_path / "w" / r["mask"])) > 0, s.mask)
        assert r["shape"] == s.labels["shape"] and r["caption"] == s.caption
        assert r["path"].startswith(f"images/{r['shape']}/")
    res = CliRunner().invoke(main, ["shapes-world", "--n", "8", "--spurious", "test", "-o", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp_path / "s" / "metadata.csv")))
    assert {r["shape"] for r in rows} <= set(world.SPURIOUS_CLASSES) and "group" in rows[0]


def test_training_checkpoint_loads_as_builtin(tmp_path):
    ckpt, ref = _checkpoint(tmp_path)
    model, preprocess, tok = textspan.load_model("shapes", str(ckpt))
    assert textspan.fingerprint(model) == textspan.fingerprint(ref)
    x = preprocess(Image.fromarray(world.sample(0, 0).image)).unsqueeze(0)
    d = textspan.decompose(model, x)
    with torch.no_grad():
        e = model.encode_image(x)
    torch.testing.assert_close(d.total(), e / e.norm(dim=-1, keepdim=True), rtol=0, atol=1e-5)


def test_eval_shapes_command(tmp_path):
    ckpt, _ = _checkpoint(tmp_path)
    res = CliRunner().invoke(main, ["eval-shapes", "--pretrained", str(ckpt), "--n", "40", "-o", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    acc = json.loads((tmp_path / "e" / "accuracy.json").read_text())
    assert set(acc) == set(world.ATTRIBUTES) and all(0 <= v <= 1 for v in acc.values())


def test_cache_of_the_shapes_world(tmp_path):
    """The main job: generate the world, cache it through a built-in-format model."""
    ckpt, _ = _checkpoint(tmp_path)
    r = CliRunner()
    assert r.invoke(main, ["shapes-world", "--n", "6", "-o", str(tmp_path / "w")]).exit_code == 0
    res = r.invoke(main, ["cache", str(tmp_path / "w" / "images"), "--model", "shapes", "--pretrained", str(ckpt),
                          "-o", str(tmp_path / "c"), "--quiet", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    cache = textspan.HeadCache(tmp_path / "c")
    assert cache.heads.shape == (6, 4, 8, 64)
    assert set(cache.images["class_name"]) <= set(world.SHAPES)
