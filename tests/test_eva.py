"""EVA towers (open_clip's timm `Eva` trunks): our forward equals open_clip's, the decomposition's identity, each
head's term from its definition through the linearised inner norm, every method run or refused with its reason, the
jobs on an EVA cache, and the reader registry."""
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

import textspan
from families import randomise_eva, tiny_eva
from helpers import encode_with_hooks
from textspan import UnsupportedModelError, decompose, forward_image
from textspan.methods import explain, list_methods

VARIANTS = {"inner_norm": dict(), "fused_qkv": dict(fused=True), "layer_scale": dict(layer_scale=True),
            "no_inner_norm": dict(inner=False), "post_norm": dict(post_norm=True, inner=False),
            "post_and_inner_norm": dict(post_norm=True)}


def _x(n=2, seed=0, dtype=torch.float64, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _encode_capturing(model, x, modules):
    """open_clip's encode_image with each of `modules` ({key: module}) recording its (input, output): the model's own
    forward, hooks removed afterwards."""
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, k=k: seen.__setitem__(k, (i[0], o))) for k, m in modules.items()]
    return encode_with_hooks(model, x, hooks), seen


def _ln_post_offset(trunk, d):
    """[b, d']: ln_post's frozen mean/bias part and the head's bias, pushed through the projection."""
    ln, head = trunk.norm, trunk.head
    return (ln.bias - ln.weight * (d.ln_mean / d.ln_std)[:, None]) @ head.weight.t() + head.bias


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_and_identity_float64(variant):
    model = tiny_eva(seed=1, **VARIANTS[variant])
    x = _x()
    with torch.no_grad():
        e = model.encode_image(x)
    torch.testing.assert_close(forward_image(model, x), e, rtol=0, atol=1e-10)
    target = e / e.norm(dim=-1, keepdim=True)
    sp, ns = decompose(model, x, spatial=True), decompose(model, x, spatial=False)
    torch.testing.assert_close(sp.total(), target, rtol=0, atol=1e-12)
    torch.testing.assert_close(ns.total(), target, rtol=0, atol=1e-12)
    torch.testing.assert_close(sp.heads.sum(dim=2), ns.heads, rtol=0, atol=1e-14)
    torch.testing.assert_close(sp.heads[:, :, 0], sp.cls_to_cls, rtol=0, atol=1e-15)


def test_float32_identity_and_forward():
    model = tiny_eva(seed=2, dtype=torch.float32)
    x = _x(dtype=torch.float32)
    with torch.no_grad():
        e = model.encode_image(x)
    torch.testing.assert_close(forward_image(model, x), e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decompose(model, x).total(), e / e.norm(dim=-1, keepdim=True), rtol=0, atol=1e-5)


def test_eva02_b16_random_weights():
    model = randomise_eva(open_clip.create_model("EVA02-B-16"), 0).double()
    info = textspan.model_info(model)
    assert (info.n_layers, info.n_heads, info.d_mlp, info.d_embed) == (12, 12, 2048, 512)
    assert info.family == "open_clip timm (EVA)"
    x = _x(1, size=224)
    with torch.no_grad():
        e = model.encode_image(x)
    torch.testing.assert_close(forward_image(model, x), e, rtol=0, atol=1e-10)
    d = decompose(model, x, spatial=False)
    torch.testing.assert_close(d.total(), e / e.norm(dim=-1, keepdim=True), rtol=0, atol=1e-12)
    m32 = model.float()
    e32 = m32.encode_image(x.float())
    d32 = decompose(m32, x.float(), spatial=False)
    assert (d32.total() - e32 / e32.norm(dim=-1, keepdim=True)).abs().max() <= 1e-5


def test_each_head_term_from_its_definition():
    """Head h's term at layer l, written from the definition with timm's own modules: its slice u_h of the heads'
    output at CLS (the input of the inner norm), centred by its own mean over all D features and divided by the std
    of the whole vector (frozen), times the norm's weight, out_proj's weight (its bias and the norm's bias spread
    over the heads), ln_post linearised with the CLS stream's mean and std and its bias and the projection's bias
    spread over the 2L + 1 terms, the projection, divided by ||e||. Summed over heads: the block's attention output
    at CLS through the linearised ln_post."""
    model = tiny_eva(seed=3)
    trunk = model.visual.trunk
    x = _x(3, seed=1)
    e, seen = _encode_capturing(model, x, {**{("in", l): blk.attn.norm for l, blk in enumerate(trunk.blocks)},
                                           **{("out", l): blk.attn for l, blk in enumerate(trunk.blocks)}})
    d = decompose(model, x, spatial=False)
    L, H, D = len(trunk.blocks), trunk.blocks[0].attn.num_heads, trunk.embed_dim
    dh = D // H
    K = 2 * L + 1
    ln, head = trunk.norm, trunk.head
    norm = e.norm(dim=-1)
    sigma = d.ln_std
    offset = _ln_post_offset(trunk, d)  # [b, d']

    def through_ln_post(c, share):  # a residual-stream term at CLS -> its term of e / ||e||
        return ((c * ln.weight) @ head.weight.t()) / (sigma * norm)[:, None] + offset * share / norm[:, None]

    for l, blk in enumerate(trunk.blocks):
        o = seen[("in", l)][0][:, 0]  # [b, D] heads concatenated at CLS
        inner = blk.attn.norm
        s = torch.sqrt(o.var(dim=-1, unbiased=False) + inner.eps)
        for h in range(H):
            u = torch.zeros_like(o)
            u[:, h * dh:(h + 1) * dh] = o[:, h * dh:(h + 1) * dh]
            centred = (u - u.mean(dim=-1, keepdim=True)) / s[:, None] * inner.weight
            c = F.linear(centred, blk.attn.proj.weight) + (blk.attn.proj.weight @ inner.bias + blk.attn.proj.bias) / H
            torch.testing.assert_close(d.heads[:, l, h], through_ln_post(c, 1 / (K * H)), rtol=0, atol=1e-13)
        # summed over heads: the attention output at CLS
        torch.testing.assert_close(d.heads[:, l].sum(dim=1), through_ln_post(seen[("out", l)][1][:, 0], 1 / K),
                                   rtol=0, atol=1e-13)


@pytest.mark.parametrize("kind", [dict(), dict(post_norm=True, inner=False)], ids=["inner_norm", "post_norm"])
def test_methods_run_or_refuse_with_the_reason(kind):
    model = tiny_eva(seed=4, **kind)
    x = _x()
    T = F.normalize(torch.randn(3, 512, generator=torch.Generator().manual_seed(5), dtype=torch.float64), dim=-1)
    runs = list_methods(model)
    assert runs == ["decomposition", "gradeclip", "gradcam", "rollout", "raw_attention", "chefer", "clip_surgery",
                    "m2ib"]
    for p in model.parameters():
        p.requires_grad_(True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for method in list_methods():
        opts = {"steps": 2, "samples": 2} if method == "m2ib" else {}
        if method in runs:
            before = x.clone()
            a = explain(model, x, T, method=method, **opts)
            assert torch.equal(x, before), method
            b = explain(model, x.clone(), T, method=method, **opts)
            assert a.shape == (2, 3, 4, 4) and torch.isfinite(a).all(), method
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        else:
            with pytest.raises(UnsupportedModelError, match="LayerNorm between them"):
                explain(model, x, T, method=method)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.requires_grad for p in model.parameters())
    # the decomposition's own map is the per-patch dot product of every head's terms with the prompt
    d = decompose(model, x)
    own = explain(model, x, T, method="decomposition", relative=False)
    want = torch.einsum("blnhe,pe->bpn", d.heads[:, :, 1:], T).reshape(2, 3, 4, 4)
    torch.testing.assert_close(own, want, rtol=0, atol=1e-12)


def test_rope_is_read_at_the_models_own_size_only():
    model = tiny_eva(seed=5)
    with pytest.raises(UnsupportedModelError, match="own image size"):
        explain(model, _x(size=48), torch.randn(2, 512, dtype=torch.float64), method="raw_attention")


def test_jobs_on_an_eva_cache(tmp_path):
    from PIL import Image
    from torchvision import transforms

    model = tiny_eva(seed=6, dtype=torch.float32)
    rng = np.random.default_rng(0)
    for i in range(8):
        (tmp_path / "imgs" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"c{i % 2}" / f"{i}.png")
    pre = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])
    images = textspan.ImageList.from_folder(tmp_path / "imgs")
    res = textspan.build_cache(model, pre, images, tmp_path / "cache", model_name="tiny-eva", batch_size=3, quiet=True)
    cache = textspan.HeadCache(tmp_path / "cache")
    assert res.rows == 8 and cache.heads.shape == (8, 3, 4, 512)
    total = cache.heads[:].sum(axis=(1, 2)) + cache.mlps[:].sum(axis=1)
    np.testing.assert_allclose(total, cache.embeddings[:], atol=2e-5)
    W = F.normalize(torch.randn(512, 2), dim=0).numpy()
    abl = textspan.ablate_cache(tmp_path / "cache", classifier=W, same_set=True)
    assert abl.single_heads.shape == (3, 4)
    deb = textspan.debias_cache(tmp_path / "cache", classifier=W, select="explicit", heads="L2H1", same_set=True,
                                group_column="label", draws=1)
    assert deb.report["heads"] == ["L2H1"] and 0 <= deb.report["heads_ablated"]["worst_group"] <= 100
    labels = textspan.text_span(np.asarray(cache.heads[:, 2, 1]), F.normalize(torch.randn(30, 512), dim=-1).numpy(),
                                [f"t{i}" for i in range(30)], n_texts=3, rank=8)
    assert len(labels.texts) == 3
    maps = textspan.heatmaps(model, torch.stack([pre(Image.open(p).convert("RGB")) for p in images.paths[:2]]),
                             torch.from_numpy(W.T.copy()), heads="L2H1")
    assert maps.shape == (2, 2, 4, 4) and torch.isfinite(maps).all()


def test_reader_registry():
    from textspan import readers

    assert readers.families() == ["open_clip timm EVA (EVA01, EVA02)", "open_clip timm ViT (SigLIP)",
                                  "transformers CLIP / SigLIP", "open_clip ViT"]
    with pytest.raises(UnsupportedModelError, match="no textspan reader") as info:
        textspan.engine.read_tower(torch.nn.Linear(3, 3))
    assert all(f in str(info.value) for f in readers.families())


@pytest.mark.parametrize("name", ["EVA01-g-14", "EVA02-L-14", "EVA02-L-14-336", "EVA02-E-14-plus"])
def test_open_clip_eva_configs_one_block_deep(name):
    """Each EVA config's own timm trunk (one block deep, random weights), EVA02-E's post-norm blocks included: our
    forward equals timm's, and the terms sum to the normalised embedding."""
    import timm

    cfg = open_clip.get_model_config(name)
    v = cfg["vision_cfg"]
    trunk = timm.create_model(v["timm_model_name"], pretrained=False, depth=1, num_classes=cfg["embed_dim"],
                              global_pool=v["timm_pool"], img_size=v["image_size"])

    class Tower(torch.nn.Module):  # open_clip's TimmModel layout: trunk, then an empty head
        def __init__(self):
            super().__init__()
            self.trunk, self.head = trunk, torch.nn.Sequential()

        def forward(self, x):
            return self.head(self.trunk(x))

    model = Tower().double().eval()
    x = _x(1, size=v["image_size"])
    with torch.no_grad():
        e = model(x)
    torch.testing.assert_close(forward_image(model, x), e, rtol=0, atol=1e-10)
    torch.testing.assert_close(decompose(model, x, spatial=False).total(), e / e.norm(dim=-1, keepdim=True),
                               rtol=0, atol=1e-12)


def test_each_head_term_through_a_post_norm():
    """EVA02-E's post-norm blocks: head h's term, from the definition with timm's own modules: its slice u_h of the
    heads' output at CLS (the input of out_proj) through out_proj's weight, then the post-norm linearised with the
    attention output's own std s: g * (W u_h - its mean over D) / s, plus 1/H of g * (b - mean(b)) / s + beta, then
    ln_post linearised and the projection as for every term."""
    model = tiny_eva(seed=7, post_norm=True, inner=False)
    trunk = model.visual.trunk
    x = _x(2, seed=3)
    e, seen = _encode_capturing(model, x, {l: blk.attn.proj for l, blk in enumerate(trunk.blocks)})
    d = decompose(model, x, spatial=False)
    H, D = trunk.blocks[0].attn.num_heads, trunk.embed_dim
    dh, K = D // H, 2 * len(trunk.blocks) + 1
    ln, head = trunk.norm, trunk.head
    norm = e.norm(dim=-1)
    offset = _ln_post_offset(trunk, d)
    for l, blk in enumerate(trunk.blocks):
        heads_in, out = seen[l][0][:, 0], seen[l][1][:, 0]  # [b, D] at CLS: out_proj's input and output
        post = blk.norm1
        s = torch.sqrt(out.var(dim=-1, unbiased=False) + post.eps)
        W, b = blk.attn.proj.weight, blk.attn.proj.bias
        for h in range(H):
            a = heads_in[:, h * dh:(h + 1) * dh] @ W[:, h * dh:(h + 1) * dh].t()  # [b, D]
            c = post.weight * (a - a.mean(dim=-1, keepdim=True)) / s[:, None] \
                + (post.weight * (b - b.mean()) / s[:, None] + post.bias) / H
            want = ((c * ln.weight) @ head.weight.t()) / (d.ln_std * norm)[:, None] + offset / (K * H * norm[:, None])
            torch.testing.assert_close(d.heads[:, l, h], want, rtol=0, atol=1e-13)
