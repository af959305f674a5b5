"""Library first: every job callable from Python with the command's guarantees and the same files; the model read in
one module; head and layer names parsed once; one error family; a thin command line."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import textspan
from textspan import BadInputError, TextspanError, names
from textspan.cli import main

PACKAGE = Path(textspan.__file__).parent

# open_clip's attribute names (image tower, blocks, attention, text side): only the readers (textspan/readers/, one
# module per model library) may use them; the engine's compute types do not
OPEN_CLIP_ATTRIBUTES = [
    "resblocks", "c_fc", "c_proj", "ln_post", "ln_pre", "conv1", "in_proj_weight", "in_proj_bias", "out_proj",
    "class_embedding", "positional_embedding", "ls_1", "ls_2", "ln_1", "ln_2", "attn_pool", "encode_image",
    "encode_text", "logit_scale", "head_scale", "ln_q", "ln_k", "transformer", "visual", "proj", "pool_type",
    "patch_dropout", "attn_mask", "text_projection", "token_embedding", "ln_final", "ln_inner", "ln_attn",
]


def test_no_open_clip_attribute_outside_the_readers():
    pattern = re.compile(r"\.(%s)\b" % "|".join(OPEN_CLIP_ATTRIBUTES))
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "readers":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line.split("#")[0]):
                found.append(f"{path.relative_to(PACKAGE)}:{i}: {line.strip()}")
    assert not found, "\n".join(found)
    assert pattern.search("x = visual.ln_post(y)")  # the pattern does catch what it is for


def test_cli_is_thin():
    src = (PACKAGE / "cli.py").read_text()
    assert len(src.splitlines()) <= 450
    # no arithmetic: no array library in the command line
    assert not re.search(r"^\s*(import|from) (numpy|torch)\b", src, flags=re.M)


def test_every_command_has_quiet_and_models_mean_the_same_device():
    for name, cmd in main.commands.items():
        opts = {o.name: o for o in cmd.params}
        assert "quiet" in opts, name
        if "device" in opts:
            assert "cuda when available" in opts["device"].help, name


def test_head_and_layer_names():
    assert names.parse_heads("L3H1, l-1h0", 4, 8) == [(3, 1), (3, 0)]
    assert names.parse_heads([(3, 1), "L0H2"], 4, 8) == [(3, 1), (0, 2)]
    assert names.parse_layers("-2:", 4) == [2, 3] and names.parse_layers("1:3", 4) == [1, 2]
    assert names.parse_layers("0,-1", 4) == [0, 3] and names.parse_layers("all", 4) == [0, 1, 2, 3]
    assert names.head_name(3, 1) == "L3H1"
    for bad in ("-9:", "0:9", "4", "0,5", "x", "3:1"):
        with pytest.raises(BadInputError):
            names.parse_layers(bad, 4)
    with pytest.raises(BadInputError, match="out of range for a model with 4 layers"):
        names.parse_layers("-9:", 4)
    for bad in ("L4H0", "L0H8", "L-5H0", "L0H-1", "head3"):
        with pytest.raises(BadInputError):
            names.parse_heads(bad, 4, 8)
    # the list form is checked too (it used to wrap L5 around to L1)
    with pytest.raises(BadInputError, match="outside the model's 4 layers x 8 heads"):
        names.head_mask(4, 8, heads=[(5, 0)])
    mask = names.head_mask(4, 8, heads="L3H1", layers="0")
    assert mask.sum() == 9 and mask[3, 1] and mask[0].all()


def test_errors_are_one_family_and_the_cli_prints_them_without_traceback(tmp_path):
    for err in ("BadInputError", "InputNotFoundError", "UnknownModelError", "UnsupportedModelError",
                "WeightsUnavailableError", "FolderMismatchError", "CacheMismatchError", "FolderBusyError",
                "ModelMismatchError", "EmbeddingMismatchError"):
        assert issubclass(getattr(textspan, err), TextspanError), err
    res = CliRunner().invoke(main, ["info", "--model", "ViT-B-61"])
    assert res.exit_code == 1 and "Traceback" not in res.output and len(res.output.splitlines()) <= 2
    assert "unknown open_clip model name 'ViT-B-61'" in res.output and "ViT-B-16" in res.output
    res = CliRunner().invoke(main, ["info", "--model", "shapez"])
    assert res.exit_code == 1 and "shapes" in res.output


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lib")
    textspan.write_shapes_world(tmp / "w", 40, seed=5)
    res = textspan.cache_images(tmp / "w" / "images", tmp / "cache", "shapes", device="cpu", batch_size=16)
    assert res.rows == 40 and (tmp / "cache" / "run.json").is_file()
    # in the cache's class order (its folders, sorted): the world's own order would shift every label
    (tmp / "classes.txt").write_text("\n".join(sorted(textspan.world.SHAPES)) + "\n")
    return tmp


def _same_files(a: Path, b: Path, names_):
    for n in names_:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_label_cache_api_equals_the_command_and_reloads(world):
    labels = textspan.label_cache(world / "cache", world / "lab_api", bank="shapes", n_texts=3, layers="-2:",
                                  rank=16)
    assert sorted(labels.results) == [(l, h) for l in (2, 3) for h in range(8)]
    res = CliRunner().invoke(main, ["label-heads", str(world / "cache"), "--bank", "shapes", "--n-texts", "3",
                                    "--layers", "-2:", "--rank", "16", "-o", str(world / "lab_cli"), "--quiet"])
    assert res.exit_code == 0, res.output
    _same_files(world / "lab_api", world / "lab_cli", ["heads.csv", "heads.json", "heads.md"])
    back = textspan.HeadLabels.load(world / "lab_api")
    assert back.heads() == labels.heads() and back["L3H1"].texts == labels[(3, 1)].texts
    np.testing.assert_allclose(back["L3H1"].variance_explained, labels[(3, 1)].variance_explained, atol=1e-6)
    header = (world / "lab_api" / "heads.csv").read_text().splitlines()[0]
    assert header.startswith("head,layer,head_index,")
    assert json.loads((world / "lab_api" / "run.json").read_text())["command"] == "label-heads"


def test_ablate_cache_api_equals_the_command(world):
    r = textspan.ablate_cache(world / "cache", world / "abl_api", heads="L3H1,L2H0", draws=2)
    res = CliRunner().invoke(main, ["ablate", str(world / "cache"), "--heads", "L3H1,L2H0", "--draws", "2", "-o",
                                    str(world / "abl_cli")])
    assert res.exit_code == 0, res.output
    _same_files(world / "abl_api", world / "abl_cli", ["ablations.json", "single_heads.csv", "accumulated.csv"])
    assert r.single_heads.shape == (4, 8) and r.results["n_evaluated"] == 20  # the default: a disjoint half
    same = textspan.ablate_cache(world / "cache", same_set=True)  # no output: nothing written, same numbers
    assert same.results["n_evaluated"] == 40 and "published" in same.results["protocol"]
    assert (world / "abl_cli" / "single_heads.csv").read_text().splitlines()[1].startswith("L0H0,0,0,")
    with pytest.raises(BadInputError, match="exclude each other"):
        textspan.ablate_cache(world / "cache", reference=world / "cache", same_set=True)
    with pytest.raises(TextspanError, match="cache folder itself"):
        textspan.ablate_cache(world / "cache", world / "cache")


def test_completeness_default_is_a_disjoint_split_and_takes_same_set(world):
    base = dict(bank="shapes", classes=world / "classes.txt", n_texts=(1, 3), layers="-2:", rank=16)
    split = textspan.measure_completeness(world / "cache", world / "comp", **base)
    same = textspan.measure_completeness(world / "cache", **base, same_set=True)
    assert "seeded half" in split.protocol and "published" in same.protocol
    direct = textspan.span.completeness(
        textspan.HeadCache(world / "cache").heads, textspan.HeadCache(world / "cache").mlps,
        textspan.HeadCache(world / "cache").embeddings, textspan.jobs.zero_shot_classifier(
            textspan.jobs.resolve_model("shapes", device="cpu"), world / "classes.txt")[0],
        textspan.HeadCache(world / "cache").labels, same.labels.results, [1, 3], same_set=True)
    assert direct["by_n_texts"] == same.by_n_texts
    res = CliRunner().invoke(main, ["completeness", str(world / "cache"), "--bank", "shapes", "--classes",
                                    str(world / "classes.txt"), "--n-texts", "1,3", "--layers", "-2:", "--rank", "16",
                                    "--same-set", "-o", str(world / "comp_cli"), "--quiet"])
    assert res.exit_code == 0, res.output
    saved = json.loads((world / "comp_cli" / "completeness.json").read_text())
    assert saved["by_n_texts"] == {str(k): v for k, v in same.by_n_texts.items()}


def test_retrieve_and_decompose_through_the_api(world):
    r = textspan.retrieve_images(world / "cache", "L3H1", "an object on water", world / "ret", top=4)
    assert len(r.rows) == 4 and r.scores == sorted(r.scores, reverse=True) and r.head == "L3H1"
    assert (world / "ret" / "retrieval.png").stat().st_size > 0
    with pytest.raises(BadInputError, match="L9H1 is outside"):
        textspan.retrieve_images(world / "cache", "L9H1", "water")
    paths = sorted((world / "w" / "images").rglob("*.png"))[:2]
    s = textspan.decompose_images(paths, world / "dec", "shapes", device="cpu", top=2)
    assert len(s.images) == 2 and all(i["identity_error"] < 1e-5 for i in s.images)
    assert np.load(world / "dec" / f"{paths[0].stem}_heads.npy").shape == (4, 65, 8, 64)


def test_debias_cache_api(world, tmp_path):
    textspan.write_shapes_waterbirds(tmp_path / "wb", 0, 40, 40)
    for split in ("val", "test"):
        textspan.cache_images(tmp_path / "wb", tmp_path / split, "shapes-spurious", split=split, device="cpu")
    r = textspan.debias_cache(tmp_path / "test", tmp_path / "deb", reference=tmp_path / "val", n_heads=2, draws=2)
    assert len(r.report["heads"]) == 2 and set(r.report["baseline"]["per_group"]) == {
        "circle_on_land", "circle_on_water", "square_on_land", "square_on_water"}
    clf = textspan.DebiasedClassifier.load(tmp_path / "deb")
    np.testing.assert_allclose(clf.head_means, r.classifier.head_means)
    logits = clf.predict_cache(tmp_path / "test")
    assert logits.shape == (40, 2) and (clf.predict_labels(tmp_path / "test") == logits.argmax(1)).all()


def test_evaluations_through_the_api_resume_after_a_kill(world, tmp_path, monkeypatch):
    import textspan.metrics as metrics

    common = dict(classes=world / "classes.txt", method="raw_attention", batch_size=4)
    whole = textspan.evaluate_segmentation(world / "w", tmp_path / "whole", "shapes", device="cpu", **common)
    real = metrics.segmentation_row
    calls = []

    def dies(*a, **k):
        calls.append(1)
        if len(calls) == 6:  # inside the second batch of 4
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(metrics, "segmentation_row", dies)
    with pytest.raises(KeyboardInterrupt):
        textspan.evaluate_segmentation(world / "w", tmp_path / "cut", "shapes", device="cpu", **common)
    saved = json.loads((tmp_path / "cut" / "segment_progress.json").read_text())
    assert saved["next_entry"] == 4 and len(saved["rows"]) == 4
    monkeypatch.setattr(metrics, "segmentation_row", real)
    seen = []
    again = textspan.evaluate_segmentation(world / "w", tmp_path / "cut", "shapes", device="cpu", notify=seen.append,
                                           **common)
    assert again == whole and seen == ["resuming after 4 entries (4 images scored)"]
    assert (tmp_path / "cut" / "segmentation.json").read_bytes() == (tmp_path / "whole" / "segmentation.json") \
        .read_bytes()
    with pytest.raises(TextspanError, match=r"other settings \(method\)"):
        textspan.evaluate_segmentation(world / "w", tmp_path / "cut", "shapes", device="cpu",
                                       **dict(common, method="rollout"))
    p = textspan.evaluate_perturbation(world / "w" / "images", tmp_path / "pert", "shapes", device="cpu", limit=8,
                                       classes=world / "classes.txt", method="raw_attention", batch_size=4)
    assert p["n_images"] == 8 and len(p["steps"]) == 10
    assert json.loads((tmp_path / "pert" / "perturbation.json").read_text())["positive_auc"] == p["positive_auc"]


def test_heatmaps_and_compare_through_the_api(world, tmp_path):
    paths = sorted((world / "w" / "images").rglob("*.png"))[:2]
    h = textspan.draw_heatmaps(paths, tmp_path / "hm", ["a star", "a circle"], "shapes", device="cpu",
                               heads="L3H1,L2H0", head_grid=True)
    assert h.maps.shape == (2, 2, 8, 8) and set(h.per_head) == {"L3H1", "L2H0"}
    np.testing.assert_array_equal(np.load(tmp_path / "hm" / "maps.npy"), h.maps)
    # one prompt in relative mode would be all zeros: refused before anything is written
    with pytest.raises(BadInputError, match="at least two prompts"):
        textspan.draw_heatmaps(paths, tmp_path / "one", ["a star"], "shapes", device="cpu")
    assert not (tmp_path / "one").exists()
    res = CliRunner().invoke(main, ["heatmap", str(paths[0]), "-p", "a star", "-p", "a circle", "--head-grid",
                                    "-o", str(tmp_path / "hg")])
    assert res.exit_code == 1 and "--heads" in res.output and not (tmp_path / "hg").exists()
    one = textspan.draw_heatmaps(paths, None, ["a star"], "shapes", device="cpu", absolute=True)
    assert np.abs(one.maps).sum() > 0
    model, _, tok = textspan.load_model("shapes")
    T = torch.from_numpy(textspan.encode_texts(model, tok, ["a star"]))
    with pytest.raises(BadInputError, match="relative=False"):
        textspan.explain(model, torch.zeros(1, 3, 64, 64), T, method="decomposition")
    c = textspan.compare_methods(paths, ["a star", "a circle"], tmp_path / "cmp", "shapes",
                                 methods=["rollout", "decomposition"], device="cpu")
    assert set(c.maps) == {"rollout", "decomposition"} and c.maps["rollout"].shape == (2, 2, 8, 8)


def test_encode_bank_writes_its_run_record(tmp_path):
    emb, path = textspan.encode_bank("shapes", tmp_path / "t.npy", "shapes", device="cpu")
    assert emb.shape[1] == 64 and path == tmp_path / "t.npy"
    run = json.loads((tmp_path / "t.run.json").read_text())
    assert run["command"] == "encode-texts" and run["model_fingerprint"]


def test_term_logits_without_cls_terms_reads_no_uninitialised_memory():
    from textspan import ablation

    rng = np.random.default_rng(0)
    heads = rng.normal(size=(30, 2, 3, 5)).astype(np.float32)
    mlps = rng.normal(size=(30, 3, 5)).astype(np.float32)
    W = rng.normal(size=(5, 4)).astype(np.float32)
    labels = rng.integers(0, 4, 30)
    t = ablation.term_logits(heads, None, mlps, W, same_set=True)
    assert t.layer_cls is None and t.mean_cls is None
    res = ablation.standard_ablations(t, labels)
    assert "cls_to_cls" not in res and len(res["accumulated"]) == 3
    with pytest.raises(BadInputError, match="CLS->CLS"):
        ablation.ablate_heads(t, [], cls_layers=[0])


def test_tests_write_their_caches_in_a_temporary_folder():
    import tempfile

    from textspan.text import default_cache_dir

    assert str(default_cache_dir()).startswith(tempfile.gettempdir())
