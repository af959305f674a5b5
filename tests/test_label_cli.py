"""encode-texts, label-heads, completeness, retrieve: end to end on a small shapes-world cache."""
import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import save_shapes_checkpoint
import textspan
from textspan.cli import main
from textspan.span import completeness, text_span

BANK = ["a red object", "a white object", "an object on water", "an object on land", "a small object",
        "a large object", "a circle", "a square", "a star", "an object in the left", "an object in the top",
        "a red object", "", "a photo of a star"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("label")
    ckpt, model = save_shapes_checkpoint(tmp / "run")
    r = CliRunner()
    assert r.invoke(main, ["shapes-world", "--n", "24", "-o", str(tmp / "w")]).exit_code == 0
    res = r.invoke(main, ["cache", str(tmp / "w" / "images"), "--model", "shapes", "--pretrained", str(ckpt),
                          "-o", str(tmp / "c"), "--quiet", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    (tmp / "bank.txt").write_text("\n".join(BANK) + "\n")
    (tmp / "templates.txt").write_text("a {}\na photo of a {}\n")
    return tmp, ckpt, model


def test_encode_texts_and_label_heads(setup):
    tmp, ckpt, model = setup
    r = CliRunner()
    res = r.invoke(main, ["encode-texts", str(tmp / "bank.txt"), "--model", "shapes", "--pretrained", str(ckpt),
                          "-o", str(tmp / "emb.npy")])
    assert res.exit_code == 0, res.output
    emb = np.load(tmp / "emb.npy")
    meta = json.loads((tmp / "emb.json").read_text())
    assert emb.shape == (12, 64) and len(meta["texts"]) == 12  # blank line and duplicate dropped
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    res = r.invoke(main, ["label-heads", str(tmp / "c"), "--text-embeddings", str(tmp / "emb.npy"),
                          "--n-texts", "3", "--layers", "-2:", "--rank", "16", "-o", str(tmp / "labels"),
                          "--quiet"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp / "labels" / "heads.csv")))
    assert len(rows) == 2 * 8 * 3 and {r["layer"] for r in rows} == {"2", "3"}
    # the CSV is what text_span gives on the cache's heads
    cache = textspan.HeadCache(tmp / "c")
    direct = text_span(np.asarray(cache.heads[:, 3, 5]), emb, meta["texts"], n_texts=3, rank=16)
    mine = [r for r in rows if r["head"] == "L3H5"]
    assert {(r["layer"], r["head_index"]) for r in mine} == {("3", "5")}
    assert [r["text"] for r in mine] == direct.texts
    np.testing.assert_allclose([float(r["cumulative"]) for r in mine], direct.cumulative, atol=1e-6)
    assert "## L3H5" in (tmp / "labels" / "heads.md").read_text()
    assert len(json.loads((tmp / "labels" / "heads.json").read_text())["heads"]) == 16
    # the same with --bank (the model comes from the cache's manifest and encodes the bank itself)
    res = r.invoke(main, ["label-heads", str(tmp / "c"), "--bank", str(tmp / "bank.txt"), "--n-texts", "3",
                          "--layers", "-2:", "--rank", "16", "-o", str(tmp / "labels2"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert (tmp / "labels2" / "heads.csv").read_text() == (tmp / "labels" / "heads.csv").read_text()


def test_label_heads_refuses_bad_inputs(setup, tmp_path):
    tmp, ckpt, model = setup
    r = CliRunner()
    other_ckpt, _ = save_shapes_checkpoint(tmp_path / "other", seed=7)
    res = r.invoke(main, ["encode-texts", str(tmp / "bank.txt"), "--model", "shapes", "--pretrained",
                          str(other_ckpt), "-o", str(tmp_path / "other.npy")])
    assert res.exit_code == 0
    res = r.invoke(main, ["label-heads", str(tmp / "c"), "--text-embeddings", str(tmp_path / "other.npy"),
                          "-o", str(tmp_path / "x")])
    assert res.exit_code != 0 and "another model" in res.output
    res = r.invoke(main, ["label-heads", str(tmp / "c"), "--bank", str(tmp / "bank.txt"), "--n-texts", "50",
                          "-o", str(tmp_path / "x")])
    assert res.exit_code != 0 and "more than" in res.output
    res = r.invoke(main, ["label-heads", str(tmp / "c"), "--bank", str(tmp / "bank.txt"), "--layers", "7",
                          "-o", str(tmp_path / "x")])
    assert res.exit_code != 0 and "out of range" in res.output
    res = r.invoke(main, ["label-heads", str(tmp / "c"), "--bank", str(tmp / "bank.txt"), "--model", "shapes",
                          "--pretrained", str(other_ckpt), "-o", str(tmp_path / "x")])
    assert res.exit_code != 0 and "fingerprint" in res.output
    # a general-vocabulary bank with the built-in model: the error says which bank to use
    res = r.invoke(main, ["label-heads", str(tmp / "c"), "--bank", "general", "-o", str(tmp_path / "x")])
    assert res.exit_code != 0 and "--bank shapes" in res.output


def test_completeness_command_and_its_identities(setup):
    tmp, ckpt, model = setup
    res = CliRunner().invoke(main, ["completeness", str(tmp / "c"), "--bank", str(tmp / "bank.txt"),
                                    "--templates", str(tmp / "templates.txt"), "--n-texts", "2,5",
                                    "--layers", "-1:", "--rank", "12", "-o", str(tmp / "comp"), "--quiet"])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp / "comp" / "completeness.json").read_text())
    assert set(out["by_n_texts"]) == {"2", "5"} and (tmp / "comp" / "completeness.png").stat().st_size > 0
    # identity: with full-rank reconstructions of every head of every layer and nothing ablated but the MLPs,
    # ablating the MLP-type terms is the only change; with the MLPs' own per-image values as "means" (a
    # reference equal to the data when n = 1) the baseline comes back.
    cache = textspan.HeadCache(tmp / "c")
    heads, mlps = np.asarray(cache.heads[:1]), np.asarray(cache.mlps[:1])
    emb = np.asarray(cache.embeddings[:1])
    rng = np.random.default_rng(0)
    T = rng.normal(size=(80, 64))
    W = rng.normal(size=(64, 5))
    results = {(l, h): text_span(np.concatenate([heads[:, l, h], heads[:, l, h] + 1e-3]), T, [str(i) for i in
                                 range(80)], n_texts=64, rank=64) for l in range(4) for h in range(8)}
    acc = completeness(heads, mlps, emb, W, np.array([int((emb @ W).argmax())]), results, [64],
                       same_set=True)
    assert acc["baseline"] == 100.0 and acc["by_n_texts"][64] == 100.0 and acc["ablated_rest"] == 100.0


def test_retrieve_command(setup):
    tmp, ckpt, model = setup
    res = CliRunner().invoke(main, ["retrieve", str(tmp / "c"), "--head", "L-1H2", "--text", "a red object",
                                    "--top", "5", "-o", str(tmp / "ret")])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp / "ret" / "retrieval.csv")))
    assert len(rows) == 5
    cache = textspan.HeadCache(tmp / "c")
    t = textspan.text.encode_texts(model, textspan.builtin.WordTokenizer(textspan.world.vocabulary()),
                                   ["a red object"])[0]
    scores = np.asarray(cache.heads[:, 3, 2]) @ t
    assert [int(r["row"]) for r in rows] == list(np.argsort(-scores, kind="stable")[:5])
    assert (tmp / "ret" / "retrieval.png").stat().st_size > 0
    res = CliRunner().invoke(main, ["retrieve", str(tmp / "c"), "--head", "L9H0", "--text", "a star", "-o",
                                    str(tmp / "ret2")])
    assert res.exit_code != 0 and "outside" in res.output
