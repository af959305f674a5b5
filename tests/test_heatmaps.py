"""Heatmaps: the slow formula, relative maps, and the similarity identity."""
import pytest
import torch

from helpers import random_images, tiny_clip
import textspan
from textspan.decomposition import project
from textspan.heatmaps import head_mask, heatmaps


@pytest.fixture(scope="module")
def setup():
    model = tiny_clip(seed=4, dtype=torch.float64, ls_init_value=0.4)
    x = random_images(3, dtype=torch.float64)
    T = torch.nn.functional.normalize(torch.randn(4, 24, dtype=torch.float64), dim=-1)
    return model, x, T


def test_map_equals_slow_formula(setup):
    model, x, T = setup
    d = textspan.decompose(model, x)  # [b, L, N, H, d']
    slow = torch.einsum("blnhd,kd->bkn", d.heads, T)[:, :, 1:].reshape(3, 4, 4, 4)
    torch.testing.assert_close(heatmaps(model, x, T, relative=False), slow, rtol=0, atol=1e-13)
    only = torch.einsum("bnd,kd->bkn", d.heads[:, 1, :, 2], T)[:, :, 1:].reshape(3, 4, 4, 4)
    torch.testing.assert_close(heatmaps(model, x, T, heads="L1H2", relative=False), only, rtol=0, atol=1e-13)
    layer0 = torch.einsum("bnhd,kd->bkn", d.heads[:, 0], T)[:, :, 1:].reshape(3, 4, 4, 4)
    torch.testing.assert_close(heatmaps(model, x, T, layers=[0], relative=False), layer0, rtol=0, atol=1e-13)


def test_relative_maps_sum_to_zero_over_prompts(setup):
    model, x, T = setup
    rel = heatmaps(model, x, T)
    torch.testing.assert_close(rel.sum(dim=1), torch.zeros_like(rel[:, 0]), rtol=0, atol=1e-13)
    absolute = heatmaps(model, x, T, relative=False)
    torch.testing.assert_close(rel, absolute - absolute.mean(dim=1, keepdim=True))


def test_patches_plus_cls_plus_rest_give_the_image_text_similarity(setup):
    model, x, T = setup
    with torch.no_grad():
        e = model.encode_image(x)
    sim = (e / e.norm(dim=-1, keepdim=True)) @ T.t()  # [b, k]
    p = project(model, x, T)
    maps = heatmaps(model, x, T, relative=False)
    total = maps.sum(dim=(2, 3)) + p.tokens[:, 0] + p.mlps  # patch maps + CLS token + MLP-type terms
    torch.testing.assert_close(total, sim, rtol=0, atol=1e-12)
    part = project(model, x, T, head_mask(model, "L0H1,L1H3"))
    torch.testing.assert_close(part.total(), sim, rtol=0, atol=1e-12)


def test_head_mask_parsing(setup):
    model = setup[0]
    m = head_mask(model, "L-1H3", layers="0")
    assert m.sum() == 5 and m[1, 3] and m[0].all()
    with pytest.raises(ValueError):
        head_mask(model, "L5H0")


def test_heatmap_command(tmp_path):
    import json

    import numpy as np
    from click.testing import CliRunner

    from helpers import save_shapes_checkpoint
    from textspan.cli import main

    ckpt, model = save_shapes_checkpoint(tmp_path / "run")
    r = CliRunner()
    assert r.invoke(main, ["shapes-world", "--n", "2", "-o", str(tmp_path / "w")]).exit_code == 0
    imgs = sorted(str(p) for p in (tmp_path / "w" / "images").rglob("*.png"))
    res = r.invoke(main, ["heatmap", *imgs, "--model", "shapes", "--pretrained", str(ckpt), "-p", "a red object",
                          "-p", "a star", "--heads", "L3H1,L2H0", "--head-grid", "-o", str(tmp_path / "hm")])
    assert res.exit_code == 0, res.output
    maps = np.load(tmp_path / "hm" / "maps.npy")
    assert maps.shape == (2, 2, 8, 8)
    np.testing.assert_allclose(maps.sum(axis=1), 0, atol=1e-6)  # relative by default
    assert (tmp_path / "hm" / "grid.png").stat().st_size > 0
    assert len(list((tmp_path / "hm").glob("0*_0*.png"))) == 4 and len(list((tmp_path / "hm").glob("head_grid_*"))) == 2
    assert json.loads((tmp_path / "hm" / "run.json").read_text())["command"] == "heatmap"


def test_cls_attention_rows(setup):
    from textspan.decomposition import cls_attention

    model, x, T = setup
    a = cls_attention(model, x)
    assert a.shape == (3, 2, 4, 17)
    torch.testing.assert_close(a.sum(-1), torch.ones(3, 2, 4, dtype=a.dtype), rtol=0, atol=1e-12)
    # layer 0 by hand from the stock weights
    v = model.visual
    with torch.no_grad():
        z = v.ln_pre(torch.cat([v.class_embedding.expand(3, 1, -1), v.conv1(x).flatten(2).transpose(1, 2)], 1)
                     + v.positional_embedding)
        blk = v.transformer.resblocks[0]
        q, k, _ = torch.nn.functional.linear(blk.ln_1(z), blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, -1)
        q = q.view(3, 17, 4, 16).transpose(1, 2)
        k = k.view(3, 17, 4, 16).transpose(1, 2)
        ref = torch.softmax(q[:, :, 0:1] @ k.transpose(-1, -2) / 4.0, dim=-1)[:, :, 0]
    torch.testing.assert_close(a[:, 0], ref, rtol=0, atol=1e-12)
