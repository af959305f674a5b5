"""Model loading: local checkpoints, schema folders, cached tags offline, clear errors within seconds."""
import json
import os
import time

import pytest
import torch

from helpers import TINY_CFG, tiny_clip
import textspan
from textspan import UnsupportedModelError, WeightsUnavailableError, load_model, model_info


@pytest.fixture(scope="module")
def tiny_config_name(tmp_path_factory):
    import open_clip

    folder = tmp_path_factory.mktemp("cfg")
    (folder / "tiny-textspan-test.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(folder / "tiny-textspan-test.json")
    return "tiny-textspan-test"


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors"])
def test_local_checkpoint_files(tmp_path, tiny_config_name, suffix):
    ref = tiny_clip(seed=3)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    else:
        torch.save(ref.state_dict(), path)
    model, preprocess, tokenizer = load_model(tiny_config_name, str(path))
    assert textspan.fingerprint(model) == textspan.fingerprint(ref)
    assert not model.training
    assert tokenizer(["a photo"]).shape == (1, 8)


def test_missing_checkpoint_and_unknown_tag(tiny_config_name):
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        load_model(tiny_config_name, "/tmp/nothere.pt")
    with pytest.raises(ValueError, match="neither a known tag"):
        load_model("ViT-B-32", "no_such_tag")
    with pytest.raises(ValueError, match="unknown open_clip model name"):
        load_model("ViT-Nope-99", "openai")


def test_uncached_tag_offline_fails_fast_with_options(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    t0 = time.time()
    with pytest.raises(WeightsUnavailableError) as err:
        load_model("ViT-B-32", "laion2b_s34b_b79k", cache_dir=str(tmp_path / "empty"))
    assert time.time() - t0 < 20
    msg = str(err.value)
    assert "laion2b_s34b_b79k" in msg and "local checkpoint" in msg and "shapes" in msg


def test_cached_tag_loads_offline_with_its_activation(tmp_path):
    """A tag whose file sits in the cache loads without network; OpenAI tags get QuickGELU as trained."""
    import open_clip

    torch.manual_seed(0)
    ref = open_clip.create_model("ViT-B-32", force_quick_gelu=True)
    cfg = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    cache_dir = tmp_path / "cache"
    # huggingface_hub cache layout: models--org--name/snapshots/<rev>/<file>, refs/main -> <rev>
    repo_id = cfg["hf_hub"].rstrip("/")
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({k: v.half().contiguous() for k, v in ref.state_dict().items()}, str(snap / "open_clip_model.safetensors"))
    model, preprocess, _ = load_model("ViT-B-32", "openai", cache_dir=str(cache_dir))
    assert type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert model_info(model).activation == "QuickGELU"
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), ref.half().float().encode_image(x), rtol=1e-4, atol=1e-4)


def test_local_dir_schema(tmp_path):
    from helpers import save_local_dir

    name, ref = save_local_dir(tmp_path / "m", seed=2)
    model, preprocess, tokenizer = load_model(name)
    assert textspan.fingerprint(model) == textspan.fingerprint(ref)
    info = model_info(model)
    assert (info.n_layers, info.n_heads, info.d_model, info.d_head, info.d_embed, info.n_tokens) == (2, 4, 64, 16,
                                                                                                     24, 17)


def test_unsupported_model_refused_at_load():
    with pytest.raises(UnsupportedModelError):
        load_model("RN50")


def test_fingerprint_sees_every_weight(tiny_model):
    a = tiny_clip(seed=0)
    fp = textspan.fingerprint(a)
    assert fp == textspan.fingerprint(tiny_clip(seed=0))
    with torch.no_grad():
        a.visual.transformer.resblocks[1].mlp.c_proj.bias[3] += 1e-6
    assert textspan.fingerprint(a) != fp
