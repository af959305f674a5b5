"""Explainer evaluations: patch removal by hand, perturbation counts, target maps, and the perturb-eval, compare and
segment-eval --method commands on the built-in model."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import textspan
from textspan.cli import main
from textspan.explain_eval import FRACTIONS, area_under, perturbation_counts, remove_patches, target_maps

from helpers import random_images, tiny_clip


def test_remove_patches_by_hand():
    x = torch.arange(1, 1 + 2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)  # a 2 x 3 grid of 2 px patches
    order = torch.tensor([[4, 0, 1, 2, 3, 5], [5, 4, 3, 2, 1, 0]])
    out = remove_patches(x, order, 2, (2, 2))
    want = x.clone()
    want[0, :, 2:4, 2:4] = 0  # patch 4: row 1, column 1
    want[0, :, 0:2, 0:2] = 0  # patch 0
    want[1, :, 2:4, 4:6] = 0  # patch 5
    want[1, :, 2:4, 2:4] = 0  # patch 4
    assert torch.equal(out, want)
    assert torch.equal(remove_patches(x, order, 0, (2, 2)), x)
    assert x[0, 0, 0, 0] == 1  # input untouched


def test_area_under_by_hand():
    assert area_under([0, 0.5, 1.0], [100, 50, 0]) == pytest.approx(50.0)
    assert area_under(FRACTIONS, [80] * 10) == pytest.approx(80 * 0.9)


def test_perturbation_counts_start_at_clean_accuracy():
    model = tiny_clip(seed=2)
    x = random_images(6, seed=1)
    W = F.normalize(torch.randn(24, 3), dim=0)
    pred = (F.normalize(model.encode_image(x), dim=-1) @ W).argmax(1).detach()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    maps = torch.rand(6, 4, 4)
    c = perturbation_counts(model, x, maps, W, labels)
    assert c["positive"][0] == c["negative"][0] == int((pred == labels).sum())
    c2 = perturbation_counts(model, x, maps, W, pred)  # against the clean prediction: all correct at 0
    assert c2["positive"][0] == 6 and c2["positive"].shape == (10,)
    # negative removal of 90% of the patches keeps the most relevant 10%: same input as positive removal of the
    # complementary order at 90% with the map negated
    c3 = perturbation_counts(model, x, -maps, W, labels)
    assert np.array_equal(c3["positive"], c["negative"]) and np.array_equal(c3["negative"], c["positive"])


def test_target_maps():
    model = tiny_clip(seed=2)
    x = random_images(3, seed=1)
    T = F.normalize(torch.randn(4, 24), dim=-1)
    targets = [2, 0, 2]
    m = target_maps(model, x, T, targets, "decomposition")
    full = textspan.heatmaps(model, x, T, relative=False)
    assert torch.allclose(m, full[torch.arange(3), torch.tensor(targets)] - full.mean(1), atol=1e-6)
    m = target_maps(model, x, T, targets, "legrad", layers="all")
    want = textspan.explain(model, x, T, method="legrad", layers="all")
    assert torch.allclose(m, want[torch.arange(3), torch.tensor(targets)], atol=1e-6)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("w")
    r = CliRunner()
    assert r.invoke(main, ["shapes-world", "--n", "10", "-o", str(d / "w")]).exit_code == 0
    (d / "classes.txt").write_text("circle\nsquare\ntriangle\nstar\ncross\n")
    return d


def test_perturb_eval_cli(world_dir, tmp_path):
    bad = world_dir / "w" / "images" / "circle" / "broken.png"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(b"not a png")
    try:
        res = CliRunner().invoke(main, ["perturb-eval", str(world_dir / "w" / "images"), "--classes",
                                        str(world_dir / "classes.txt"), "--method", "legrad", "--option",
                                        "layers=all", "--batch-size", "4", "-o", str(tmp_path / "p"), "--quiet"])
    finally:
        bad.unlink()
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "p" / "perturbation.json").read_text())
    assert {"positive_auc", "negative_auc", "steps"} <= set(out)
    assert [s["fraction"] for s in out["steps"]] == list(FRACTIONS)
    assert out["steps"][0]["positive_accuracy"] == out["steps"][0]["negative_accuracy"]
    assert out["n_images"] == 10 and len(out["failures"]) == 1 and out["options"] == {"layers": "all"}
    assert out["target"] == "class folder"
    acc = [s["positive_accuracy"] for s in out["steps"]]
    assert out["positive_auc"] == pytest.approx(area_under(FRACTIONS, acc))
    assert (tmp_path / "p" / "perturbation.png").stat().st_size > 0
    assert (tmp_path / "p" / "perturbation.csv").read_text().startswith("fraction,positive_accuracy")
    res = CliRunner().invoke(main, ["perturb-eval", str(world_dir / "w" / "images"), "--classes",
                                    str(world_dir / "classes.txt"), "--method", "legrad", "--option", "layers=[9]",
                                    "-o", str(tmp_path / "p2"), "--quiet"])
    assert res.exit_code != 0 and "out of range" in res.output


def test_segment_eval_any_method(world_dir, tmp_path):
    r = CliRunner()
    common = [str(world_dir / "w"), "--classes", str(world_dir / "classes.txt"), "--quiet"]
    # the decomposition through the generic path (an option given) equals its one-projection fast path
    a = r.invoke(main, ["segment-eval", *common, "-o", str(tmp_path / "a")])
    b = r.invoke(main, ["segment-eval", *common, "--option", "layers=all", "-o", str(tmp_path / "b")])
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    ja = json.loads((tmp_path / "a" / "segmentation.json").read_text())
    jb = json.loads((tmp_path / "b" / "segmentation.json").read_text())
    assert ja["miou"] == pytest.approx(jb["miou"], abs=1e-6) and ja["map"] == pytest.approx(jb["map"], abs=1e-6)
    for m in ("legrad", "rollout"):
        res = r.invoke(main, ["segment-eval", *common, "--method", m, "-o", str(tmp_path / m)])
        assert res.exit_code == 0, res.output
        assert json.loads((tmp_path / m / "run.json").read_text())["arguments"]["method"] == m
    res = r.invoke(main, ["segment-eval", *common, "--method", "nope", "-o", str(tmp_path / "n")])
    assert res.exit_code != 0


def test_segment_eval_scores_each_object_of_two_object_images(world_dir, tmp_path):
    """shapes-world --objects 2 writes masks/SHAPE/NNNNNN/CLASS.png; segment-eval explains each object's class and
    scores it against that object's mask alone (the other object is background), with the pointing game."""
    from PIL import Image

    from textspan.metrics import normalise_map, segmentation_row
    from textspan.visualize import upsample

    r = CliRunner()
    assert r.invoke(main, ["shapes-world", "--n", "5", "--objects", "2", "-o", str(tmp_path / "w2")]).exit_code == 0
    res = r.invoke(main, ["segment-eval", str(tmp_path / "w2"), "--classes", str(world_dir / "classes.txt"),
                          "--method", "legrad", "--batch-size", "3", "-o", str(tmp_path / "s"), "--quiet"])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "s" / "segmentation.json").read_text())
    rows = (tmp_path / "s" / "per_image.csv").read_text().splitlines()
    header = rows[0].split(",")
    expected = sum(len(list(d.glob("*.png"))) for d in (tmp_path / "w2" / "masks").glob("*/*") if d.is_dir())
    assert expected >= 5 and len(rows) - 1 == expected == out["n_images"] == out["by_objects"]["2"]["n_images"]
    assert 0 <= out["pointing"] <= 100 and {"pointing", "class", "objects"} <= set(header)
    # one row by hand: the legrad map of the object's class against the object's own mask
    first = dict(zip(header, rows[1].split(",")))
    image_rel, cls = first["item"].split(":")
    loaded = textspan.jobs.resolve_model("shapes")
    x = loaded.preprocess(Image.open(tmp_path / "w2" / "images" / image_rel).convert("RGB"))[None]
    classes = (world_dir / "classes.txt").read_text().split()
    W, _ = textspan.jobs.zero_shot_classifier(loaded, classes)
    m = target_maps(loaded.model, x, torch.from_numpy(W.T.copy()), [classes.index(cls)], "legrad")[0]
    mask = np.asarray(Image.open((tmp_path / "w2" / "masks" / image_rel).with_suffix("") / f"{cls}.png")) > 0
    want = segmentation_row(normalise_map(upsample(m, x.shape[-2:]).numpy()), mask)
    for key in ("pixel_accuracy", "iou_foreground", "ap", "pointing"):
        assert float(first[key]) == pytest.approx(want[key], abs=1e-3), key  # percent; batched float32 maps
    # an object mask naming no class of the classifier is a failure naming the image, the rest is scored
    extra = next(d for d in (tmp_path / "w2" / "masks").glob("*/*") if d.is_dir()) / "dragon.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(extra)
    res = r.invoke(main, ["segment-eval", str(tmp_path / "w2"), "--classes", str(world_dir / "classes.txt"),
                          "-o", str(tmp_path / "s2"), "--quiet"])
    assert res.exit_code == 0, res.output
    fails = json.loads((tmp_path / "s2" / "segmentation.json").read_text())["failures"]
    assert len(fails) == 1 and "dragon" in fails[0]["error"]


def test_compare_cli(world_dir, tmp_path):
    imgs = sorted((world_dir / "w" / "images").rglob("*.png"))[:2]
    res = CliRunner().invoke(main, ["compare", *map(str, imgs), "--prompts", "a circle", "--prompts", "water",
                                    "--methods", "decomposition,legrad,rollout", "-o", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    for m in ("decomposition", "legrad", "rollout"):
        assert np.load(tmp_path / "c" / f"maps_{m}.npy").shape == (2, 2, 8, 8)
    times = json.loads((tmp_path / "c" / "times.json").read_text())
    assert set(times["seconds"]) == {"decomposition", "legrad", "rollout"}
    assert (tmp_path / "c" / "compare.png").stat().st_size > 0
    res = CliRunner().invoke(main, ["compare", str(imgs[0]), "--prompts", "a circle", "--methods", "legrad,nope",
                                    "-o", str(tmp_path / "d")])
    assert res.exit_code != 0 and "nope" in res.output
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    res = CliRunner().invoke(main, ["compare", str(bad), "--prompts", "a circle", "-o", str(tmp_path / "e")])
    assert res.exit_code != 0 and "broken.png: cannot read the image" in res.output


def dies_on_call(fn, n):
    """fn, except that its n-th call raises (a run killed midway)."""
    calls = []

    def wrapped(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("killed")
        return fn(*a, **k)

    return wrapped


def test_perturb_eval_resumes_an_interrupted_run(world_dir, tmp_path, monkeypatch):
    import textspan.explain_eval as ee

    args = ["perturb-eval", str(world_dir / "w" / "images"), "--classes", str(world_dir / "classes.txt"),
            "--method", "rollout", "--batch-size", "3", "--quiet"]
    r = CliRunner()
    whole = r.invoke(main, [*args, "-o", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    want = json.loads((tmp_path / "whole" / "perturbation.json").read_text())

    real = ee.perturbation_counts
    monkeypatch.setattr(ee, "perturbation_counts", dies_on_call(real, 3))  # the third batch
    cut = r.invoke(main, [*args, "-o", str(tmp_path / "cut")])
    assert cut.exit_code != 0 and not (tmp_path / "cut" / "perturbation.json").exists()
    saved = json.loads((tmp_path / "cut" / "perturbation_progress.json").read_text())
    assert saved["next_index"] == 6 and saved["n"] == 6  # two whole batches kept, the third not
    monkeypatch.setattr(ee, "perturbation_counts", real)
    resumed = r.invoke(main, [*args, "-o", str(tmp_path / "cut")])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming at image 6 of 10" in resumed.output
    got = json.loads((tmp_path / "cut" / "perturbation.json").read_text())
    assert got["steps"] == want["steps"] and got["n_images"] == want["n_images"] == 10
    assert got["positive_auc"] == want["positive_auc"] and got["negative_auc"] == want["negative_auc"]
    # another method into the same folder is refused, not mixed in; --overwrite starts afresh
    other = ["perturb-eval", str(world_dir / "w" / "images"), "--classes", str(world_dir / "classes.txt"),
             "--method", "raw_attention", "--quiet", "-o", str(tmp_path / "cut")]
    res = r.invoke(main, other)
    assert res.exit_code != 0 and "other settings (method)" in res.output
    res = r.invoke(main, [*other, "--overwrite"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "cut" / "perturbation.json").read_text())["method"] == "raw_attention"


def test_segment_eval_resumes_an_interrupted_run(world_dir, tmp_path, monkeypatch):
    import textspan.metrics as metrics

    args = ["segment-eval", str(world_dir / "w"), "--classes", str(world_dir / "classes.txt"), "--method", "chefer",
            "--batch-size", "3", "--quiet"]
    r = CliRunner()
    whole = r.invoke(main, [*args, "-o", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    real = metrics.segmentation_row
    monkeypatch.setattr(metrics, "segmentation_row", dies_on_call(real, 5))  # inside the second batch of 3
    cut = r.invoke(main, [*args, "-o", str(tmp_path / "cut")])
    assert cut.exit_code != 0 and not (tmp_path / "cut" / "segmentation.json").exists()
    saved = json.loads((tmp_path / "cut" / "segment_progress.json").read_text())
    assert saved["next_entry"] == 3 and len(saved["rows"]) == 3
    monkeypatch.setattr(metrics, "segmentation_row", real)
    resumed = r.invoke(main, [*args, "-o", str(tmp_path / "cut")])
    assert resumed.exit_code == 0 and "resuming after 3 entries" in resumed.output, resumed.output
    for name in ("segmentation.json", "per_image.csv"):
        assert (tmp_path / "cut" / name).read_text() == (tmp_path / "whole" / name).read_text()
    assert sorted(p.name for p in (tmp_path / "cut").glob("sample_*.png")) == \
        sorted(p.name for p in (tmp_path / "whole").glob("sample_*.png"))
    res = r.invoke(main, [*args, "--target", "true", "-o", str(tmp_path / "cut")])
    assert res.exit_code != 0 and "other settings (target)" in res.output
