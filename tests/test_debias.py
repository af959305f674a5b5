"""Waterbirds layout, group metrics, ablate/debias commands and the debiased classifier artifact."""
import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import save_shapes_checkpoint
import textspan
from textspan import builtin, debias as db
from textspan.cli import main
from textspan.datasets import ImageList, load_rgb


def test_group_metrics_by_hand():
    pred = np.array([0, 0, 1, 1, 0, 1])
    y = np.array([0, 0, 1, 0, 1, 1])
    g = ["a", "a", "b", "b", "c", "c"]
    m = db.group_metrics(pred, y, g)
    assert m["per_group"] == {"a": 100.0, "b": 50.0, "c": 50.0}
    assert m["worst_group"] == 50.0 and m["average"] == pytest.approx(400 / 6) and m["mean_group"] == 200 / 3


def test_top_heads():
    s = np.array([[0.1, 0.9], [0.5, 0.3]])
    assert db.top_heads(s, 2) == [(0, 1), (1, 0)]
    assert db.top_heads(s, threshold=0.3) == [(0, 1), (1, 0), (1, 1)]


def test_head_scores():
    rng = np.random.default_rng(0)
    attr = rng.integers(0, 2, 300)
    heads = rng.normal(size=(300, 2, 3, 8))
    heads[:, 1, 2, 0] += 4 * attr  # one head encodes the attribute along dimension 0
    auto = db.head_scores_auto(heads, attr)
    # between-class variance 16 * 1/4 = 4 on dimension 0, over a total of 4 + 8 unit-variance dimensions
    assert np.unravel_index(auto.argmax(), auto.shape) == (1, 2) and abs(auto[1, 2] - 4 / 12) < 0.05
    assert np.sort(auto.ravel())[-2] < 0.03
    concept = np.zeros((1, 8))
    concept[0, 0] = 1
    conc = db.head_scores_concept(heads, concept)
    assert np.unravel_index(conc.argmax(), conc.shape) == (1, 2)
    assert abs(conc[0, 0] - 1 / 8) < 0.05


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wb")
    ckpt, model = save_shapes_checkpoint(tmp / "run", seed=3)
    r = CliRunner()
    assert r.invoke(main, ["shapes-waterbirds", "--n-train", "4", "--n-val", "40", "--n-test", "40", "-o",
                           str(tmp / "wb")]).exit_code == 0
    for split in ("val", "test"):
        res = r.invoke(main, ["cache", str(tmp / "wb"), "--split", split, "--model", "shapes", "--pretrained",
                              str(ckpt), "-o", str(tmp / split), "--quiet", "--device", "cpu"])
        assert res.exit_code == 0, res.output
    return tmp, ckpt, model


def test_waterbirds_reader_and_cache_columns(testbed, tmp_path):
    tmp, ckpt, model = testbed
    cache = textspan.HeadCache(tmp / "test")
    table = cache.images
    assert {"place", "group", "split"} <= set(table.columns) and set(table["split"]) == {"test"}
    assert cache.manifest["classes"] == ["circle", "square"]
    counts = table["group"].value_counts()
    assert set(counts.index) == {"circle_on_land", "circle_on_water", "square_on_land", "square_on_water"}
    # missing and corrupt rows are reported and skipped, not fatal
    rows = list(csv.DictReader(open(tmp / "wb" / "metadata.csv")))
    wb = tmp_path / "wb"
    (wb / "images").mkdir(parents=True)
    keep = rows[:3]
    for r in keep:
        (wb / r["img_filename"]).write_bytes((tmp / "wb" / r["img_filename"]).read_bytes())
    (wb / keep[1]["img_filename"]).write_bytes(b"broken")
    extra = dict(keep[0], img_filename="images/missing.png")
    with open(wb / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(keep[0]))
        w.writeheader()
        w.writerows(keep + [extra])
    images = ImageList.from_path(wb)
    assert len(images) == 4
    res = textspan.build_cache(model, builtin.preprocess, images, tmp_path / "c", model_name="x", quiet=True)
    assert res.rows == 2 and len(res.failures) == 2
    with pytest.raises(ValueError, match="split"):
        ImageList.from_path(wb, split="nope")


def test_ablate_command(testbed):
    tmp, ckpt, model = testbed
    res = CliRunner().invoke(main, ["ablate", str(tmp / "test"), "--reference", str(tmp / "val"), "--heads",
                                    "L3H1,L2H0", "--draws", "3", "-o", str(tmp / "abl")])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp / "abl" / "ablations.json").read_text())
    for key in ("baseline", "mlps", "cls_to_cls", "mlps_and_cls_to_cls"):
        assert isinstance(out[key], float)
    assert len(out["accumulated"]) == 5 and out["accumulated"][0] == out["baseline"]
    assert np.array(out["single_heads"]).shape == (4, 8) and len(out["head_set"]["random"]) == 3
    for f in ("single_heads.csv", "accumulated.csv", "accumulated.png", "head_importance.png"):
        assert (tmp / "abl" / f).stat().st_size > 0
    # the default protocol splits the cache; --same-set uses it whole
    res = CliRunner().invoke(main, ["ablate", str(tmp / "test"), "--same-set", "-o", str(tmp / "abl2")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp / "abl2" / "ablations.json").read_text())["n_evaluated"] == 40


@pytest.mark.parametrize("select", ["explicit", "auto", "concept"])
def test_debias_command_and_artifact(testbed, select):
    tmp, ckpt, model = testbed
    out = tmp / f"debias-{select}"
    args = ["debias", str(tmp / "test"), "--reference", str(tmp / "val"), "--select", select, "--n-heads", "2",
            "--draws", "3", "-o", str(out)]
    if select == "explicit":
        args += ["--heads", "L3H1,L0H5"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert len(report["heads"]) == 2 and report["why"]
    for k in ("baseline", "heads_ablated", "generic_ablated", "heads_and_generic_ablated"):
        assert set(report[k]["per_group"]) == {"circle_on_land", "circle_on_water", "square_on_land",
                                               "square_on_water"}
    assert len(report["random_heads"]["worst_group"]) == 3
    clf = db.DebiasedClassifier.load(out)
    assert [f"L{l}H{h}" for l, h in clf.heads] == report["heads"]
    # applying it to the cache reproduces the report's numbers
    cache = textspan.HeadCache(tmp / "test")
    cache_logits = clf.predict_cache(cache)
    pred = clf.predict_labels(cache)
    assert cache_logits.shape == (len(cache), 2) and (cache_logits.argmax(axis=1) == pred).all()
    m = db.group_metrics(pred, cache.labels, cache.images["group"].astype(str).to_numpy())
    assert m["worst_group"] == pytest.approx(report["heads_ablated"]["worst_group"])
    # and to new images through the decomposition, the same logits and predictions (the same kind of thing)
    x = torch.stack([builtin.preprocess(load_rgb(p)) for p in cache.images["path"][:6]])
    logits = clf.predict(model, x)
    assert logits.shape == (6, 2) and np.allclose(logits, cache_logits[:6], atol=1e-5)
    assert (clf.predict_labels(model, x) == pred[:6]).all()
    other, _, _ = textspan.load_model("shapes", str(save_shapes_checkpoint(tmp / "other", seed=11)[0]))
    with pytest.raises(ValueError, match="fingerprint"):
        clf.predict(other, x)


def test_debias_explicit_requires_heads(testbed):
    tmp, _, _ = testbed
    res = CliRunner().invoke(main, ["debias", str(tmp / "test"), "--select", "explicit", "-o", str(tmp / "x")])
    assert res.exit_code != 0 and "--heads" in res.output


def test_shipped_spurious_testbed_is_debiased_by_auto_heads(tmp_path):
    """The built-in testbed's claim, at a small scale: the shipped spurious model's worst group gains >= 15 points
    when the 8 automatically chosen heads are mean-ablated, beats the best random set of 8, and the average holds."""
    r = CliRunner()
    data = tmp_path / "wb"
    assert r.invoke(main, ["shapes-waterbirds", "--n-train", "0", "--n-val", "400", "--n-test", "600",
                           "-o", str(data)]).exit_code == 0
    for split in ("val", "test"):
        res = r.invoke(main, ["cache", str(data), "--split", split, "--model", "shapes-spurious", "--device", "cpu",
                              "-o", str(tmp_path / split), "--quiet"])
        assert res.exit_code == 0, res.output
    res = r.invoke(main, ["debias", str(tmp_path / "test"), "--reference", str(tmp_path / "val"), "--select", "auto",
                          "--n-heads", "8", "-o", str(tmp_path / "deb")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "deb" / "report.json").read_text())
    before, after = rep["baseline"], rep["heads_ablated"]
    assert after["worst_group"] >= before["worst_group"] + 15
    assert after["worst_group"] > rep["random_heads"]["best_worst_group"]
    assert after["average"] >= before["average"] - 5
