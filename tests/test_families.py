"""Model families beyond open_clip's own ViT: transformers CLIP and SigLIP, open_clip's timm SigLIP trunk.

Identities on tiny randomly initialised models: our forward equals the library's; the terms sum to the normalised
embedding (float64 1e-12, float32 1e-5); spatial terms summed over tokens equal the non-spatial ones; the
pooling-level split equals the published one (computed here from the transformers module itself); an open_clip CLIP
and a transformers CLIP with the same weights give the same terms. Then the jobs on a transformers SigLIP folder
loaded by path, and the refusals."""
import os
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from families import hf_clip, hf_siglip, open_clip_siglip, word_tokenizer  # noqa: E402

import textspan  # noqa: E402
from textspan import engine  # noqa: E402

pytest.importorskip("transformers")
BUILDERS = {"hf_clip": hf_clip, "hf_siglip": hf_siglip, "open_clip_siglip": open_clip_siglip}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request):
    return request.param, BUILDERS[request.param]()


def _images(n=3, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g, dtype=dtype)


def test_forward_equals_library(family):
    name, model = family
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        m = model.to(dtype)
        x = _images(dtype=dtype)
        with torch.no_grad():
            ref = engine.library_image_embedding(m, x)
            ours = textspan.decomposition.forward_image(m, x)
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max() < tol * max(1.0, ref.abs().max().item()), name
    model.float()


def test_identity_spatial_and_pool_split(family):
    name, model = family
    m = model.double()
    x = _images()
    e = F.normalize(engine.library_image_embedding(m, x), dim=-1).detach()
    d = textspan.decompose(m, x, spatial=False)
    ds = textspan.decompose(m, x, spatial=True)
    assert (d.total() - e).abs().max() < 1e-12
    assert (ds.total() - e).abs().max() < 1e-12
    assert (ds.heads.sum(dim=2) - d.heads).abs().max() < 1e-13
    assert (d.embedding - e).abs().max() < 1e-13
    info = textspan.model_info(m)
    assert d.mlps.shape[1] == info.n_mlp_terms
    assert ds.heads.shape[2] == info.n_tokens
    if info.pooling == "attention":
        assert d.cls_to_cls is None
        assert (d.pool_total() - e).abs().max() < 1e-12
        assert (ds.pool_heads.sum(dim=2) - d.pool_heads).abs().max() < 1e-13
        # every head and MLP matters: no term is identically zero
        assert d.heads.abs().amax(dim=(0, 3)).min() > 0 and d.mlps.abs().amax(dim=(0, 2)).min() > 0
    m.float()
    d32 = textspan.decompose(m, x.float(), spatial=False)
    e32 = F.normalize(engine.library_image_embedding(m, x.float()), dim=-1).detach()
    assert (d32.total() - e32).abs().max() < 1e-5


def test_pooling_split_is_the_published_one():
    """Per pooling head g and token m: a[g, m] W_out[:, g] (W_v[g] xn_m + b_v[g]), the TextSpan authors' SigLIP split
    (their pooling_head.attention out.post); the rest is out_proj's bias and the pooling MLP's output. Computed here
    from the transformers module's own nn.MultiheadAttention (attention weights per head)."""
    m = hf_siglip().double()
    x = _images()
    vm = m.vision_model
    with torch.no_grad():
        xn = vm(pixel_values=x).last_hidden_state  # after post_layernorm
        head = vm.head
        probe = head.probe.repeat(x.shape[0], 1, 1)
        mha = head.attention
        _, attn = mha(probe, xn, xn, need_weights=True, average_attn_weights=False)  # [b, G, 1, N]
        d_model, G = xn.shape[-1], mha.num_heads
        v = F.linear(xn, mha.in_proj_weight[2 * d_model:], mha.in_proj_bias[2 * d_model:])
        v = v.view(*v.shape[:2], G, d_model // G)  # [b, N, G, dg]
        w_out = mha.out_proj.weight.view(d_model, G, d_model // G)
        published = torch.einsum("bgn,bngc,dgc->bgnd", attn[:, :, 0], v, w_out)  # [b, G, N, d]
        pooled = published.sum(dim=(1, 2)) + mha.out_proj.bias
        mlp_out = head.mlp(head.layernorm(pooled[:, None]))[:, 0]
        e = pooled + mlp_out
    ds = textspan.decompose(m, x, spatial=True)
    norm = ds.norm[:, None, None, None]
    assert (ds.pool_heads * norm - published).abs().max() < 1e-12
    assert (ds.pool_mlp * ds.norm[:, None] - mlp_out).abs().max() < 1e-12
    assert (ds.pool_out_bias * ds.norm[:, None] - mha.out_proj.bias).abs().max() < 1e-12
    assert (e - engine.library_image_embedding(m, x)).abs().max() < 1e-12


def _open_clip_to_hf(oc, hf):
    """Copy an open_clip ViT image tower's weights into a transformers CLIP vision tower of the same shape."""
    v, h = oc.visual, hf.vision_model
    sd = {"embeddings.patch_embedding.weight": v.conv1.weight, "embeddings.class_embedding": v.class_embedding,
          "embeddings.position_embedding.weight": v.positional_embedding,
          "pre_layrnorm.weight": v.ln_pre.weight, "pre_layrnorm.bias": v.ln_pre.bias,
          "post_layernorm.weight": v.ln_post.weight, "post_layernorm.bias": v.ln_post.bias}
    for i, b in enumerate(v.transformer.resblocks):
        p = f"encoder.layers.{i}."
        q, k, vv = b.attn.in_proj_weight.chunk(3)
        qb, kb, vb = b.attn.in_proj_bias.chunk(3)
        sd.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                   p + "self_attn.v_proj.weight": vv, p + "self_attn.q_proj.bias": qb,
                   p + "self_attn.k_proj.bias": kb, p + "self_attn.v_proj.bias": vb,
                   p + "self_attn.out_proj.weight": b.attn.out_proj.weight,
                   p + "self_attn.out_proj.bias": b.attn.out_proj.bias,
                   p + "layer_norm1.weight": b.ln_1.weight, p + "layer_norm1.bias": b.ln_1.bias,
                   p + "layer_norm2.weight": b.ln_2.weight, p + "layer_norm2.bias": b.ln_2.bias,
                   p + "mlp.fc1.weight": b.mlp.c_fc.weight, p + "mlp.fc1.bias": b.mlp.c_fc.bias,
                   p + "mlp.fc2.weight": b.mlp.c_proj.weight, p + "mlp.fc2.bias": b.mlp.c_proj.bias})
    missing = h.load_state_dict({k: t.detach().clone() for k, t in sd.items()}, strict=False)
    assert not missing.unexpected_keys and not [k for k in missing.missing_keys if "position_ids" not in k]
    with torch.no_grad():
        hf.visual_projection.weight.copy_(v.proj.t())


def test_open_clip_and_transformers_clip_same_weights_same_terms():
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(3)
    oc = open_clip.CLIP(embed_dim=24, vision_cfg=CLIPVisionCfg(layers=3, width=32, head_width=8, patch_size=8,
                                                               image_size=32, mlp_ratio=2.0),
                        text_cfg=CLIPTextCfg(context_length=16, vocab_size=64, width=32, heads=4, layers=1)).eval()
    hf = hf_clip(hidden_act="gelu")
    _open_clip_to_hf(oc, hf)
    oc, hf = oc.double(), hf.double()
    x = _images()
    for spatial in (False, True):
        a = textspan.decompose(oc, x, spatial=spatial)
        b = textspan.decompose(hf, x, spatial=spatial)
        assert (a.heads - b.heads).abs().max() < 1e-12
        assert (a.mlps - b.mlps).abs().max() < 1e-12
        assert (a.cls_to_cls - b.cls_to_cls).abs().max() < 1e-12
    assert (F.normalize(oc.encode_image(x), dim=-1) - a.embedding).abs().max() < 1e-12


def test_heatmaps_on_attention_pooled_tower():
    m = hf_siglip().double()
    x = _images(2)
    T = F.normalize(torch.randn(3, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), dim=-1)
    p = textspan.project(m, x, T)
    d = textspan.decompose(m, x, spatial=True)
    assert (p.total() - d.embedding @ T.T).abs().max() < 1e-12
    maps = textspan.explain(m, x, T, method="decomposition", relative=False)
    assert maps.shape == (2, 3, 4, 4)
    assert (maps.flatten(2).sum(-1) - torch.einsum("blnhe,ke->bk", d.heads, T)).abs().max() < 1e-12
    with pytest.raises(textspan.UnsupportedModelError, match="attention"):
        textspan.explain(m, x, T, method="gradeclip")


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory):
    from textspan.hf import save_hf_model

    return save_hf_model(hf_siglip(), tmp_path_factory.mktemp("hf") / "siglip", image_size=32,
                         tokenizer=word_tokenizer())


def test_load_local_folder_and_jobs(siglip_folder, tmp_path):
    model, preprocess, tokenizer = textspan.load_model(str(siglip_folder))
    assert type(model).__name__ == "SiglipModel" and tokenizer is not None
    world = tmp_path / "w"
    textspan.write_shapes_world(world, 24)
    res = textspan.cache_images(world / "images", tmp_path / "cache", str(siglip_folder), batch_size=8)
    c = textspan.HeadCache(tmp_path / "cache")
    info = textspan.model_info(model)
    assert c.heads.shape == (24, 3, 4, 32) and c.mlps.shape == (24, 5, 32) and c.pool_heads.shape == (24, 4, 32)
    assert c.cls_to_cls is None
    total = np.asarray(c.heads).sum(axis=(1, 2)) + np.asarray(c.mlps).sum(axis=1)
    assert np.abs(total - np.asarray(c.embeddings)).max() < 1e-5
    assert info.pooling == "attention"
    # the cached embeddings are the library's own
    from textspan.datasets import read_image
    paths = list(c.images["path"][:2])
    x = torch.stack([preprocess(read_image(p)) for p in paths])
    with torch.no_grad():
        ref = F.normalize(engine.library_image_embedding(model, x), dim=-1).numpy()
    assert np.abs(ref - np.asarray(c.embeddings[:2])).max() < 1e-5
    abl = textspan.ablate_cache(tmp_path / "cache", tmp_path / "abl",
                                classes=["circle", "cross", "square", "star", "triangle"])  # the cache's order
    assert "cls_to_cls" not in abl.results and len(abl.results["single_heads"]) == 3
    textspan.write_shapes_waterbirds(tmp_path / "wb", 0, 16, 16)
    textspan.cache_images(tmp_path / "wb", tmp_path / "wb_cache", str(siglip_folder), split="test", batch_size=8)
    deb = textspan.debias_cache(tmp_path / "wb_cache", tmp_path / "deb", select="auto", n_heads=2)
    assert (tmp_path / "deb" / "debiased_classifier.json").exists() and deb.report
    seg = textspan.evaluate_segmentation(world, tmp_path / "seg", str(siglip_folder),
                                         classes=["circle", "square", "triangle", "star", "cross"])
    assert 0 <= seg["miou"] <= 100
    imgs = sorted((world / "images").rglob("*.png"))[:2]
    cmp = textspan.compare_methods(imgs, ["a circle", "a star"], tmp_path / "cmp", str(siglip_folder))
    assert sorted(cmp.maps) == sorted(["decomposition", "legrad", "raw_attention", "gradcam", "rollout", "chefer", "m2ib"])
    hm = textspan.draw_heatmaps(imgs, tmp_path / "hm", ["a circle", "a star"], str(siglip_folder), heads="L2H1")
    assert (tmp_path / "hm" / "maps.npy").exists() and hm is not None
    labels = textspan.label_cache(tmp_path / "cache", tmp_path / "labels", bank="shapes", n_texts=2, layers="all", rank=8)
    assert len(labels.results) == 12
    pool = textspan.label_cache(tmp_path / "cache", tmp_path / "pool_labels", bank="shapes", n_texts=2, rank=8,
                                pool_heads=True)
    assert sorted(pool.results) == [(3, g) for g in range(4)]  # layer L: one past the trunk
    assert (tmp_path / "pool_labels" / "heads.csv").read_text().splitlines()[1].startswith("L3H0,3,0,")
    textspan.cache_images(world / "images", tmp_path / "clip_cache", "shapes", batch_size=8)
    with pytest.raises(textspan.BadInputError, match="attention-pooled"):
        textspan.label_cache(tmp_path / "clip_cache", None, bank="shapes", pool_heads=True, n_texts=2)



def test_pool_head_maps_sum_to_the_published_terms():
    m = hf_siglip().double()
    x = _images(2)
    T = F.normalize(torch.randn(3, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), dim=-1)
    maps = textspan.pool_head_maps(m, x, T, relative=False)  # [b, G, k, gh, gw]
    d = textspan.decompose(m, x, spatial=True)
    assert maps.shape == (2, 4, 3, 4, 4)
    ref = torch.einsum("bgne,ke->bgkn", d.pool_heads, T)
    assert (maps.flatten(3) - ref).abs().max() < 1e-12
    total = maps.sum(dim=(1, 3, 4)) + (d.pool_mlp + d.pool_out_bias) @ T.T
    assert (total - d.embedding @ T.T).abs().max() < 1e-12
    with pytest.raises(textspan.BadInputError, match="attention-pooled"):
        textspan.pool_head_maps(hf_clip(), x.float(), torch.randn(2, 24))


def test_logit_scale_and_bias_and_probabilities():
    from textspan.zeroshot import pair_probabilities

    m = hf_siglip()
    scale, bias = engine.logit_scale_and_bias(m)
    assert bias is not None and scale > 0
    cos = np.array([[0.1, -0.2, 0.3]])
    # transformers' own SigLIP scoring: logits_per_image = cos * exp(scale) + bias, then a sigmoid
    ref = torch.sigmoid(torch.tensor(cos) * m.logit_scale.exp().item() + m.logit_bias.item()).numpy()
    assert np.abs(pair_probabilities(m, cos) - ref).max() < 1e-12
    c = hf_clip()
    assert engine.logit_scale_and_bias(c)[1] is None
    p = pair_probabilities(c, cos)
    assert abs(p.sum() - 1) < 1e-12 and p.argmax() == cos.argmax()


def test_offline_hub_name_fails_fast(monkeypatch):
    monkeypatch.setenv("TEXTSPAN_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(textspan.WeightsUnavailableError, match="not in the local cache"):
        textspan.load_model("hf:google/siglip-base-patch16-224-not-cached")
    assert time.time() - t0 < 10


def test_refusals_name_the_reason():
    import open_clip

    m = open_clip.create_model("coca_ViT-B-32")
    with pytest.raises(textspan.UnsupportedModelError, match="attentional pooling"):
        textspan.model_info(m)


# ---- explainers on attention-pooled towers -------------------------------------------------------------------------

POOLED = tuple(textspan.list_methods("attn"))  # as the methods registered themselves


def test_the_methods_defined_on_attention_pooled_towers():
    """The registry's declaration, checked once against the published pooled variants the methods implement."""
    assert set(POOLED) == {"decomposition", "legrad", "raw_attention", "gradcam", "rollout", "chefer", "m2ib"}
    assert textspan.list_methods(open_clip_siglip(seed=0)) == list(POOLED)


def test_every_method_runs_or_refuses_with_the_reason_on_transformers_towers():
    """transformers CLIP runs every method; transformers SigLIP runs the pooled ones and refuses the rest by name."""
    x = _images(2, dtype=torch.float32)
    for build, runs in ((hf_clip, textspan.list_methods()), (hf_siglip, POOLED)):
        m = build(seed=1)
        d = textspan.engine.read_tower(m).d_embed
        T = F.normalize(torch.randn(2, d, generator=torch.Generator().manual_seed(2)), dim=-1)
        for method in textspan.list_methods():
            if method in runs:
                maps = textspan.explain(m, x, T, method=method, **({"steps": 2} if method == "m2ib" else {}))
                assert maps.shape == (2, 2, 4, 4) and torch.isfinite(maps).all(), (build.__name__, method)
            else:
                with pytest.raises(textspan.UnsupportedModelError, match="CLS token"):
                    textspan.explain(m, x, T, method=method)


@pytest.mark.parametrize("method", POOLED)
def test_pooled_methods_contract(method):
    m = open_clip_siglip(seed=5)
    for i, p in enumerate(m.parameters()):
        p.requires_grad_(i % 2 == 0)
    flags = [p.requires_grad for p in m.parameters()]
    state = {k: v.clone() for k, v in m.state_dict().items()}
    x = _images(3, dtype=torch.float32)
    T = F.normalize(torch.randn(3, 32, generator=torch.Generator().manual_seed(1)), dim=-1)
    before = m.encode_image(x).detach()
    maps = textspan.explain(m, x, T, method=method)
    assert maps.shape == (3, 3, 4, 4) and torch.isfinite(maps).all() and not maps.requires_grad
    assert torch.equal(m.encode_image(x).detach(), before)
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    assert flags == [p.requires_grad for p in m.parameters()]
    assert torch.equal(textspan.explain(m, x, T, method=method), maps)
    for b in range(3):
        for p in range(3):
            if method == "decomposition":
                one = textspan.explain(m, x[b:b + 1], T, method=method)[:, p:p + 1]
            else:
                one = textspan.explain(m, x[b:b + 1], T[p:p + 1], method=method)
            assert torch.allclose(one[0, 0], maps[b, p], atol=1e-5, rtol=1e-4), (b, p)


def test_gradeclip_refuses_attention_pooled_towers_with_the_reason():
    m = hf_siglip()
    with pytest.raises(textspan.UnsupportedModelError, match="CLS token.*legrad"):
        textspan.explain(m, _images(1, dtype=torch.float32), torch.randn(2, 32), method="gradeclip")


def _hf_attentions(m, x):
    """Per block attention maps [b, H, N, N] and the pooling head's probe attention [b, G, N], from transformers.
    (The maps come from its eager attention, which takes the softmax in float32: they agree to ~1e-7.)"""
    with torch.no_grad():
        last = m.vision_model(pixel_values=x).last_hidden_state
        head = m.vision_model.head
        probe = head.probe.repeat(x.shape[0], 1, 1)
        _, pool = head.attention(probe, last, last, need_weights=True, average_attn_weights=False)
    m.config.vision_config._attn_implementation = "eager"
    for layer in m.vision_model.encoder.layers:
        layer.self_attn.config._attn_implementation = "eager"
    with torch.no_grad():
        out = m.vision_model(pixel_values=x, output_attentions=True)
    return out.attentions, pool[:, :, 0]


def test_pooled_raw_attention_and_rollout_from_transformers():
    m = hf_siglip().double()
    x = _images(2)
    attentions, pool = _hf_attentions(m, x)
    T = F.normalize(torch.randn(2, 32, dtype=torch.float64), dim=-1)
    raw = textspan.explain(m, x, T, method="raw_attention")
    assert (raw[:, 0].flatten(1) - pool.mean(dim=1)).abs().max() < 1e-12
    R = None
    for A in attentions:
        A = A.mean(dim=1) + torch.eye(A.shape[-1], dtype=A.dtype)
        A = A / A.sum(dim=-1, keepdim=True)
        R = A if R is None else A @ R
    ref = (pool.mean(dim=1)[:, None] @ R)[:, 0]
    roll = textspan.explain(m, x, T, method="rollout")
    assert (roll[:, 1].flatten(1) - ref).abs().max() < 1e-6  # transformers' eager softmax is float32


def test_pooled_legrad_matches_autograd_on_the_timm_module():
    """The published SigLIP LeGrad, written here on timm's own modules: for each of the last two blocks, the pooling
    head on that block's output (no final norm), gradient of <t, normalised pooled> with respect to the probe's
    attention probabilities, ReLU, mean over the pooling heads; summed over the blocks."""
    m = open_clip_siglip(seed=2).double()
    trunk = m.visual.trunk
    pool = trunk.attn_pool
    x = _images(2)
    T = F.normalize(torch.randn(3, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4)), dim=-1)
    with torch.no_grad():
        h = trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(x)))
        feats = []
        for blk in trunk.blocks:
            h = blk(h)
            feats.append(h)
    total = 0
    for feat in feats[-2:]:
        B, N, C = feat.shape
        G, dg = pool.num_heads, pool.head_dim
        q = pool.q(pool.latent.expand(B, -1, -1)).reshape(B, 1, G, dg).transpose(1, 2)
        k, v = pool.kv(feat).reshape(B, N, 2, G, dg).permute(2, 0, 3, 1, 4).unbind(0)
        probs = ((q * pool.scale) @ k.transpose(-2, -1)).softmax(dim=-1).detach().requires_grad_(True)
        o = (probs @ v).transpose(1, 2).reshape(B, 1, C)
        o = pool.proj(o)
        o = o + pool.mlp(pool.norm(o))
        e = F.normalize(o[:, 0], dim=-1)
        rel = []
        for t in T:
            g, = torch.autograd.grad((e @ t).sum(), probs, retain_graph=True)
            rel.append(g.clamp(min=0).mean(dim=1)[:, 0])  # [B, N]
        total = total + torch.stack(rel, dim=1)
    ours = textspan.explain(m, x, T, method="legrad")
    assert (ours.flatten(2) - total).abs().max() < 1e-10


def test_transformers_vision_only_classes():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    kw = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
    for m in (CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=24, **kw)).eval().double(),
              SiglipVisionModel(SiglipVisionConfig(**kw)).eval().double()):
        x = _images(2)
        e = F.normalize(engine.library_image_embedding(m, x), dim=-1).detach()
        d = textspan.decompose(m, x, spatial=False)
        assert (d.total() - e).abs().max() < 1e-12, type(m).__name__


def test_transformers_siglip2_is_refused_with_the_reason():
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    m = Siglip2VisionModel(Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, patch_size=8, num_patches=16))
    with pytest.raises(textspan.UnsupportedModelError, match="pre-patchified"):
        textspan.model_info(m)
