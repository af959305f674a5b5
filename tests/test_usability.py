"""What a new user meets: figures that can be read at a glance (titles, colour bars, the map visible wherever it is
not zero, one sign convention), commands whose defaults do what their help says, and short reprs."""
from __future__ import annotations

import configparser
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import textspan
from textspan import visualize
from textspan.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("use")
    textspan.write_shapes_world(tmp / "w", 30, seed=4)
    textspan.cache_images(tmp / "w" / "images", tmp / "cache", "shapes", device="cpu")
    textspan.label_cache(tmp / "cache", tmp / "labels", bank="shapes", n_texts=3, layers="-2:", rank=8)
    return tmp


def _images(world, k=2):
    return [sorted((world / "w" / "images" / s).glob("*.png"))[0] for s in ("circle", "square", "star")[:k]]


# --------------------------------------------------------------------------------------------------------------------
# the command line does what its help says


def test_heatmap_labels_honour_heads(world, tmp_path):
    res = run("heatmap", *_images(world), "--labels", world / "labels", "--heads", "L3H1", "-o", tmp_path / "h",
              "--quiet")
    assert res.exit_code == 0, res.output
    drawn = sorted(p.stem for p in (tmp_path / "h").glob("L*H*.png"))
    assert drawn == ["L3H1"]
    res = run("heatmap", *_images(world), "--labels", world / "labels", "--heads", "L0H1", "-o", tmp_path / "h2")
    assert res.exit_code == 1 and "L0H1" in res.output and "no labels" in res.output


def test_compare_shows_progress(world, tmp_path):
    res = run("compare", *_images(world, 1), "-p", "a circle", "-p", "a star", "--methods",
              "decomposition,raw_attention", "-o", tmp_path / "c")
    assert res.exit_code == 0, res.output
    assert "explainers" in res.output  # the progress bar (stderr)
    quiet = run("compare", *_images(world, 1), "-p", "a circle", "-p", "a star", "--methods", "raw_attention",
                "-o", tmp_path / "c2", "--quiet")
    assert quiet.exit_code == 0 and "explainers" not in quiet.output


def test_segment_eval_defaults_to_the_folders_classes(world, tmp_path):
    res = run("segment-eval", world / "w", "--samples", "2", "-o", tmp_path / "s", "--quiet")
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "s" / "segmentation.json").read_text())
    run_json = json.loads((tmp_path / "s" / "run.json").read_text())
    assert out["n_images"] == 30 if "n_images" in out else True
    assert sorted(run_json["settings"]["classes"]) == sorted(textspan.world.SHAPES)
    assert len(list((tmp_path / "s").glob("sample_*.png"))) == 2


def test_perturb_eval_limit_is_a_seeded_sample_across_classes(world, tmp_path):
    from textspan.datasets import ImageList
    from textspan.image_jobs import sample_across_classes

    items = ImageList.from_folder(world / "w" / "images")
    first = items.subset(0, 10)
    assert len(set(first.labels)) <= 2  # the first files in sorted order: one or two classes
    picked = sample_across_classes(items, 10, seed=0)
    assert len(picked) == 10 and len(set(picked.labels)) == len(items.classes)
    assert picked.paths == sample_across_classes(items, 10, seed=0).paths
    assert picked.paths != sample_across_classes(items, 10, seed=1).paths
    assert picked.paths == sorted(picked.paths)
    res = run("perturb-eval", world / "w" / "images", "--limit", "10", "--method", "raw_attention", "-o",
              tmp_path / "p", "--quiet")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "p" / "perturbation.json").read_text())["n_images"] == 10


def test_label_heads_lists_every_unknown_word(world, tmp_path):
    bank = tmp_path / "bank.txt"
    bank.write_text("a red circle\na purple giraffe\nthe stormy ocean\na red zebra\n")
    res = run("label-heads", world / "cache", "--bank", bank, "--n-texts", "2", "-o", tmp_path / "l")
    assert res.exit_code == 1
    for word in ("giraffe", "stormy", "ocean", "zebra"):
        assert word in res.output
    assert "4 words" in res.output and "Traceback" not in res.output


def test_results_have_short_reprs(world):
    labels = textspan.HeadLabels.load(world / "labels")
    res = textspan.ablate_cache(world / "cache", same_set=True)
    for obj in (labels, labels["L3H1"], res, textspan.HeadCache(world / "cache")):
        text = repr(obj)
        assert len(text) < 500 and "array(" not in text and "\n" not in text, text
    assert "ndarray[" in repr(labels["L3H1"])


def test_dev_extras_hold_what_the_readme_runs():
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    dev = cfg["options.extras_require"]["dev"]
    for pkg in ("nbconvert", "ipywidgets", "pytest"):
        assert pkg in dev


# --------------------------------------------------------------------------------------------------------------------
# figures


def test_the_map_is_visible_wherever_it_is_not_zero():
    v = np.array([[0.0, 0.05, -0.05, 1.0], [-1.0, 0.2, 0.0, 0.5]])
    _, alpha = visualize.colourise(v, relative=True)
    assert alpha[0, 0] == 0 and alpha[1, 2] == 0
    assert (alpha[v != 0] >= visualize.MIN_ALPHA).all()
    assert alpha.max() == pytest.approx(visualize.MAX_ALPHA)
    # on a row's shared scale, a map much smaller than the row's largest stays faint (no stretching of noise)
    _, faint = visualize.colourise(0.005 * v, relative=True, scale=1.0)
    assert faint.max() < visualize.MIN_ALPHA


def test_grid_figures_have_titles_and_a_colour_bar_per_row():
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(3)]
    maps = rng.normal(size=(3, 2, 4, 4))
    maps[1] *= 100  # a row on another scale: per-row scales keep the others visible
    fig = visualize.overlay_grid(imgs, maps, ["a", "b", "c"], ["p1", "p2"], title="maps")
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 3
    assert "colour scale shared within each row" in fig._suptitle.get_text()
    panel_titles = [ax.get_title() for ax in fig.axes if ax.get_title() in ("p1", "p2")]
    assert panel_titles.count("p1") == 3
    fig = visualize.overlay_grid(imgs, maps, ["a", "b", "c"], ["p1", "p2"], scale="panel")
    assert len([ax for ax in fig.axes if ax.get_label() == "<colorbar>"]) == 6
    scales = visualize.row_scales(maps, True, "row")
    assert scales[1][0] > 50 * scales[0][0]


def test_segmentation_samples_have_a_title_an_outline_and_a_colour_bar():
    img = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = np.zeros((64, 64), bool)
    mask[16:48, 16:48] = True
    heat = np.zeros((8, 8))
    heat[2:6, 2:6] = 1.0
    fig = visualize.sample_figure(img, heat, mask, "img.png: class 'square'")
    assert "square" in fig._suptitle.get_text()
    assert len([ax for ax in fig.axes if ax.get_label() == "<colorbar>"]) == 1
    shown = np.asarray(visualize.overlay(img, heat, relative=False, mask=mask))
    edge = visualize.mask_outline(mask, shown.shape[:2])
    assert edge.any() and (shown[edge] == 0).all()  # the outline is drawn in black


def test_one_sign_convention_for_ablation_effects():
    from matplotlib import colormaps

    neg, pos = colormaps[visualize.EFFECT_CMAP](0.0), colormaps[visualize.EFFECT_CMAP](1.0)
    assert neg[0] > neg[2] and pos[2] > pos[0]  # negative (the head matters) red, positive blue
    js = (Path(textspan.__file__).parent / "atlas_assets" / "atlas.js").read_text()
    stops = json.loads(js.split("var DIV = ")[1].split(";")[0])
    assert stops[0][0] > stops[0][2] and stops[-1][2] > stops[-1][0]
    fig = visualize.head_importance_figure(-np.eye(3), -0.1 * np.eye(3))
    labels = {ax.get_xlabel() for ax in fig.axes if ax.get_label() != "<colorbar>"}
    assert labels == {"head"}
    assert all(im.get_cmap().name == visualize.EFFECT_CMAP for ax in fig.axes for im in ax.get_images())


def test_ablate_reports_a_measure_that_does_not_saturate(world, tmp_path):
    res = textspan.ablate_cache(world / "cache", tmp_path / "abl", same_set=True)
    margin = res.single_heads_margin
    assert margin.shape == res.single_heads.shape
    assert np.abs(margin - res.results["baseline_margin"]).max() > 0  # heads move the margin even at 100% accuracy
    rows = (tmp_path / "abl" / "single_heads.csv").read_text().splitlines()
    assert rows[0].split(",")[-2:] == ["margin", "margin_change"]
