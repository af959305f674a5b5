"""Explainers: each method against a slow formula written here (per image, per prompt, plain autograd or the
model's own attention weights), plus the contract every registered method keeps (shape, batching, determinism,
the model left exactly as it was, also after a call that raised)."""
import pytest
import torch
import torch.nn.functional as F

import textspan
from textspan.methods import explain, list_methods, upsample_maps
from textspan.engine import read_tower

from helpers import random_images, tiny_clip

torch.set_default_dtype(torch.float32)


@pytest.fixture(scope="module", params=["plain", "layer_scale"])
def model(request):
    ls = 0.7 if request.param == "layer_scale" else None
    m = tiny_clip(seed=3, layers=3, ls_init_value=ls).double()
    if ls is not None:  # make the layer-scale vectors non-uniform
        with torch.no_grad():
            for blk in m.visual.transformer.resblocks:
                blk.ls_1.gamma.uniform_(0.3, 1.2)
                blk.ls_2.gamma.uniform_(0.3, 1.2)
    return m


@pytest.fixture(scope="module")
def images():
    return random_images(2, seed=5).double()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(7)
    return F.normalize(torch.randn(3, 24, generator=g, dtype=torch.float64), dim=-1)


# ---- slow reference forward: per image, heads in a loop, nothing shared with textspan -------------------------

def slow_forward(model, img, single_head_last=False):
    """One image [3, H, W] -> dict of per-block tensors in the autograd graph: x_in, A [H, N, N] (post-softmax),
    o (attention output before out_proj, [N, D]), q/k/v full width [N, D], x_out; and e_hat (normalised embedding)."""
    v_ = model.visual
    x = v_.conv1(img[None])[0].flatten(1).t()  # [N-1, D]
    x = torch.cat([v_.class_embedding[None], x]) + v_.positional_embedding
    x = v_.ln_pre(x)
    blocks = []
    for i, blk in enumerate(v_.transformer.resblocks):
        D = x.shape[-1]
        H = blk.attn.num_heads
        dh = D // H
        h = blk.ln_1(x)
        qkv = h @ blk.attn.in_proj_weight.t() + blk.attn.in_proj_bias
        q, k, v = qkv[:, :D], qkv[:, D:2 * D], qkv[:, 2 * D:]
        last = i == len(v_.transformer.resblocks) - 1
        if single_head_last and last:
            A = torch.softmax(q @ k.t() / D ** 0.5, dim=-1)[None]
            o = A[0] @ v
        else:
            A = torch.stack([torch.softmax(q[:, j * dh:(j + 1) * dh] @ k[:, j * dh:(j + 1) * dh].t() / dh ** 0.5, -1)
                             for j in range(H)])
            o = torch.cat([A[j] @ v[:, j * dh:(j + 1) * dh] for j in range(H)], dim=-1)
        y = x + blk.ls_1(o @ blk.attn.out_proj.weight.t() + blk.attn.out_proj.bias)
        x_out = y + blk.ls_2(blk.mlp(blk.ln_2(y)))
        blocks.append(dict(x_in=x, A=A, o=o, q=q, k=k, v=v, x_out=x_out))
        x = x_out
    e = v_.ln_post(x[0]) @ v_.proj
    return blocks, F.normalize(e, dim=-1)


def test_slow_forward_is_the_model(model, images):
    _, e = slow_forward(model, images[0])
    want = F.normalize(model.encode_image(images[:1])[0], dim=-1)
    assert torch.allclose(e, want, atol=1e-12)


def grid(model):
    return tuple(model.visual.grid_size)


@pytest.mark.parametrize("layers", [None, "all", [0]])
def test_legrad_matches_autograd(model, images, prompts, layers):
    got = explain(model, images, prompts, method="legrad", layers=layers)
    L = 3
    chosen = {None: [1, 2], "all": [0, 1, 2]}.get(layers if not isinstance(layers, list) else None, None)
    chosen = layers if isinstance(layers, list) else chosen
    for b in range(images.shape[0]):
        for p in range(prompts.shape[0]):
            blocks, _ = slow_forward(model, images[b])
            total = 0
            for l in chosen:
                feat = model.visual.ln_post(blocks[l]["x_out"].mean(0)) @ model.visual.proj
                s = F.normalize(feat, dim=-1) @ prompts[p]
                g = torch.autograd.grad(s, blocks[l]["A"], retain_graph=True)[0]  # [H, N, N]
                total = total + g.clamp(min=0).mean(0).mean(0)[1:]
            assert torch.allclose(got[b, p].flatten(), total, atol=1e-12), (b, p)
    assert L == len(model.visual.transformer.resblocks)


@pytest.mark.parametrize("single_head", [False, True])
def test_gradeclip_matches_autograd(model, images, prompts, single_head):
    got = explain(model, images, prompts, method="gradeclip", single_head=single_head)
    for b in range(images.shape[0]):
        blocks, e = slow_forward(model, images[b], single_head_last=single_head)
        last = blocks[-1]
        qn, kn = F.normalize(last["q"][0], dim=-1), F.normalize(last["k"][1:], dim=-1)
        a = kn @ qn
        a = (a - a.min()) / (a.max() - a.min())
        for p in range(prompts.shape[0]):
            g = torch.autograd.grad(e @ prompts[p], last["o"], retain_graph=True)[0][0]
            want = F.relu((g * last["v"][1:] * a[:, None]).sum(-1))
            assert torch.allclose(got[b, p].flatten(), want, atol=1e-12), (b, p)


def test_gradeclip_default_keeps_the_models_output(model, images, prompts):
    """Only the single-head reproduction mode changes the embedding the gradient is taken of."""
    a = explain(model, images, prompts, method="gradeclip")
    b = explain(model, images, prompts, method="gradeclip", single_head=True)
    assert not torch.allclose(a, b)


def test_gradcam_matches_autograd(model, images, prompts):
    got = explain(model, images, prompts, method="gradcam")
    for b in range(images.shape[0]):
        blocks, e = slow_forward(model, images[b])
        x_in = blocks[-1]["x_in"]
        for p in range(prompts.shape[0]):
            g = torch.autograd.grad(e @ prompts[p], x_in, retain_graph=True)[0]
            want = F.relu((g.mean(0) * x_in[1:]).sum(-1))
            assert torch.allclose(got[b, p].flatten(), want, atol=1e-12)


def test_gradcam_pytorch_grad_cam_variant_matches_autograd(model, images, prompts):
    """pytorch-grad-cam's ViT recipe: activations and gradients at the last block's ln_1 output, CLS dropped."""
    got = explain(model, images, prompts, method="gradcam", variant="pytorch-grad-cam")
    for b in range(images.shape[0]):
        v_ = model.visual
        blocks, _ = slow_forward(model, images[b])
        x_in = blocks[-1]["x_in"].detach()
        blk = v_.transformer.resblocks[-1]
        a = blk.ln_1(x_in).detach().requires_grad_(True)
        D = a.shape[-1]
        H = blk.attn.num_heads
        dh = D // H
        qkv = a @ blk.attn.in_proj_weight.t() + blk.attn.in_proj_bias
        q, k, v = qkv[:, :D], qkv[:, D:2 * D], qkv[:, 2 * D:]
        A = torch.stack([torch.softmax(q[:, j * dh:(j + 1) * dh] @ k[:, j * dh:(j + 1) * dh].t() / dh ** 0.5, -1)
                         for j in range(H)])
        o = torch.cat([A[j] @ v[:, j * dh:(j + 1) * dh] for j in range(H)], dim=-1)
        y = x_in + blk.ls_1(o @ blk.attn.out_proj.weight.t() + blk.attn.out_proj.bias)
        x_out = y + blk.ls_2(blk.mlp(blk.ln_2(y)))
        e = F.normalize(v_.ln_post(x_out[0]) @ v_.proj, dim=-1)
        for p in range(prompts.shape[0]):
            g = torch.autograd.grad(e @ prompts[p], a, retain_graph=True)[0]
            want = F.relu((g[1:].mean(0) * a[1:]).sum(-1))
            assert torch.allclose(got[b, p].flatten(), want, atol=1e-12)
    with pytest.raises(ValueError, match="variant"):
        explain(model, images, prompts, method="gradcam", variant="other")


def test_maskclip_matches_the_published_formula(model, images, prompts):
    """Grad-ECLIP's generate_emap.py: clip_encode_dense's v_final and k_out, then mask_clip."""
    got = explain(model, images, prompts, method="maskclip")
    v_ = model.visual
    blk = v_.transformer.resblocks[-1]
    for b in range(images.shape[0]):
        blocks, _ = slow_forward(model, images[b])
        x_in = blocks[-1]["x_in"]
        with torch.no_grad():
            a = blk.ln_1(x_in)
            q, k, v = F.linear(a, blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, dim=-1)
            out = lambda t: F.linear(t, blk.attn.out_proj.weight, blk.attn.out_proj.bias)  # noqa: E731
            v_final = x_in + blk.ls_1(out(v))
            v_final = v_final + blk.ls_2(blk.mlp(blk.ln_2(v_final)))
            v_final = F.normalize(v_.ln_post(v_final) @ v_.proj, dim=-1)[1:]
            k_out = F.normalize(out(k), dim=-1)
            cos_k = (k_out[:1] * k_out[1:]).sum(-1)
            want = (v_final @ prompts.t()).t() * cos_k[None]  # [P, N - 1]
        assert torch.allclose(got[b].flatten(1), want, atol=1e-12)


@pytest.mark.parametrize("layers,extra", [(None, 0), (2, 0), (None, 2)])
def test_clip_surgery_matches_the_published_code(model, images, prompts, layers, extra):
    """clip_surgery_model.py's dual path (v-v attention on the last blocks, CLS from the own path) and clip.py's
    clip_feature_surgery, written here on the model's own modules."""
    g = torch.Generator().manual_seed(11)
    R = F.normalize(torch.randn(extra, 24, generator=g, dtype=torch.float64), dim=-1) if extra else None
    got = explain(model, images, prompts, method="clip_surgery", surgery_layers=layers, redundant_texts=R)
    v_ = model.visual
    L = len(v_.transformer.resblocks)
    n = min(6, L) if layers is None else layers
    texts = prompts if R is None else torch.cat([prompts, R])
    for b in range(images.shape[0]):
        blocks, _ = slow_forward(model, images[b])
        x = blocks[L - n]["x_in"]
        x_ori, x_new = x, x
        with torch.no_grad():
            for i in range(L - n, L):
                blk = v_.transformer.resblocks[i]
                D = x.shape[-1]
                H = blk.attn.num_heads
                dh = D // H
                qkv = blk.ln_1(x_ori) @ blk.attn.in_proj_weight.t() + blk.attn.in_proj_bias
                q, k, v = qkv[:, :D], qkv[:, D:2 * D], qkv[:, 2 * D:]
                heads = [slice(j * dh, (j + 1) * dh) for j in range(H)]
                o_ori = torch.cat([torch.softmax(q[:, h] @ k[:, h].t() * dh ** -0.5, -1) @ v[:, h] for h in heads], -1)
                o_new = torch.cat([torch.softmax(v[:, h] @ v[:, h].t() * dh ** -0.5, -1) @ v[:, h] for h in heads], -1)
                proj = lambda t: t @ blk.attn.out_proj.weight.t() + blk.attn.out_proj.bias  # noqa: E731
                x_ori = x_ori + blk.ls_1(proj(o_ori))
                x_ori = x_ori + blk.ls_2(blk.mlp(blk.ln_2(x_ori)))
                x_new = x_new + blk.ls_1(proj(o_new))
            x_new = torch.cat([x_ori[:1], x_new[1:]])
            f = v_.ln_post(x_new) @ v_.proj  # [N, d']
            f = (f / f.norm(dim=0, keepdim=True))[None]  # the published norm over the tokens (dim 1 of [b, N, d'])
            # clip.py's clip_feature_surgery (redundant_feats=None), line by line, on one image as published:
            # the weights come from the CLS token's similarities only
            prob = f[:, :1, :] @ texts.t()
            prob = (prob * 2).softmax(-1)
            w = prob / prob.mean(-1, keepdim=True)
            nb, n_t, n_i, c = f.shape[0], texts.shape[0], f.shape[1], f.shape[2]
            feats = f.reshape(nb, n_i, 1, c) * texts.reshape(1, 1, n_t, c)
            feats *= w.reshape(1, 1, n_t, 1)
            redundant = feats.mean(2, keepdim=True)
            feats = feats - redundant
            sim = feats.sum(-1)[0]  # [N, n_texts]
        assert torch.allclose(got[b].flatten(1), sim[1:, :prompts.shape[0]].t(), atol=1e-12)
    with pytest.raises(ValueError, match="one text"):
        explain(model, images, prompts[:1], method="clip_surgery")


def published_m2ib(model, blocks, images, t, layer, beta=0.1, steps=10, lr=1.0, samples=10, seed=0):
    """[b, N] YingWANGG/M2IB's IBAInterpreter, written here on the model's own modules: its bottleneck replaces the
    output of `blocks[layer]` (here by a forward hook) while the whole model runs on `samples` copies of the image,
    noise from the global generator after torch.manual_seed(seed), Adam on alpha, the capacity of the last forward
    summed over channels; one image and one prompt t [d_embed] per run."""
    out = []
    for b in range(images.shape[0]):
        torch.manual_seed(seed)
        batch = images[b:b + 1].expand(samples, -1, -1, -1)
        state = {}

        def bottleneck(module, inputs, x):
            lamb = torch.sigmoid(state["alpha"]).expand(x.shape[0], x.shape[1], -1)
            mu, var = x * lamb, (1 - lamb) ** 2
            state["cap"] = -0.5 * (1 + torch.log(var) - mu ** 2 - var)
            return mu + var.sqrt() * mu.data.new(mu.size()).normal_()

        captured = {}
        handle = blocks[layer].register_forward_hook(lambda m, i, x: captured.update(shape=x.shape))
        with torch.no_grad():
            model.encode_image(batch[:1])
        handle.remove()
        alpha = torch.nn.Parameter(torch.full((1, *captured["shape"][1:]), 5.0, dtype=images.dtype))
        state["alpha"] = alpha
        opt = torch.optim.Adam([alpha], lr=lr)
        handle = blocks[layer].register_forward_hook(bottleneck)
        try:
            for _ in range(steps):
                opt.zero_grad()
                e = model.encode_image(batch)
                fit = torch.nn.CosineSimilarity(eps=1e-6)(t[None].expand(samples, -1), e).mean()
                alpha.grad, = torch.autograd.grad(beta * state["cap"].mean() - fit, alpha)
                opt.step()
        finally:
            handle.remove()
        out.append(torch.nansum(state["cap"].mean(dim=0), -1).detach())
    return torch.stack(out)


@pytest.mark.parametrize("opts", [dict(steps=3), dict(layer=0, beta=0.5, samples=4, seed=5, lr=0.3)])
def test_m2ib_matches_the_published_code(model, images, prompts, opts):
    got = explain(model, images, prompts[:2], method="m2ib", **opts)
    blocks = model.visual.transformer.resblocks
    layer = opts.get("layer", 0)  # default: three blocks from the end, block 0 of this 3-block model
    kw = {k: v for k, v in opts.items() if k != "layer"}
    for p in range(2):
        want = published_m2ib(model, blocks, images, prompts[p], layer, **kw)[:, 1:]
        assert torch.allclose(got[:, p].flatten(1), want, atol=1e-9, rtol=1e-9), p
    # the maps move with the seed, and the mask really is optimised (a different beta gives another map)
    assert not torch.allclose(explain(model, images, prompts[:2], method="m2ib", **{**opts, "seed": 9}), got)
    assert not torch.allclose(explain(model, images, prompts[:2], method="m2ib", **{**opts, "beta": 3.0}), got)
    with pytest.raises(ValueError, match="layer"):
        explain(model, images, prompts, method="m2ib", layer=5)


@pytest.mark.parametrize("kind", ["siglip", "clipa"])
def test_m2ib_on_pooled_towers_matches_the_published_code(kind):
    """The same bottleneck through the tower's own pooling: SigLIP's attention pool (no CLS: every token a patch),
    CLIPA's mean of the patch tokens."""
    if kind == "siglip":
        from families import open_clip_siglip

        model = open_clip_siglip(seed=2).double()
        blocks = model.visual.trunk.blocks
        skip = 0
    else:
        model = tiny_clip(seed=6, layers=3, pool_type="avg", final_ln_after_pool=True, no_ln_pre=True).double()
        blocks = model.visual.transformer.resblocks
        skip = 1
    d = model.encode_image(random_images(1, seed=1).double()).shape[-1]
    T = F.normalize(torch.randn(2, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64), dim=-1)
    imgs = random_images(2, seed=4).double()
    got = explain(model, imgs, T, method="m2ib", steps=3, samples=3, layer=1)
    for p in range(2):
        want = published_m2ib(model, blocks, imgs, T[p], 1, steps=3, samples=3)[:, skip:]
        assert torch.allclose(got[:, p].flatten(1), want, atol=1e-9, rtol=1e-9), (kind, p)


# ---- the published transformer LRP (Transformer-Explainability layers_lrp.py rules), with autograd as published --

def _sd(a, b):  # safe_divide
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + den.eq(0).type(den.type()) * 1e-9
    return a / den * b.ne(0).type(b.type())


def _simple(fn, xs, R):  # RelPropSimple: Z = fn(X), X * grad(Z, X, R / Z)
    xs = [x.detach().requires_grad_(True) for x in xs]
    Z = fn(*xs)
    C = torch.autograd.grad(Z, xs, _sd(R, Z))
    return [x.detach() * c for x, c in zip(xs, C)]


def _lin(R, X, W, alpha=1):  # Linear.relprop
    beta = alpha - 1
    pw, nw = torch.clamp(W, min=0), torch.clamp(W, max=0)
    X = X.detach().requires_grad_(True)
    px, nx = torch.clamp(X, min=0), torch.clamp(X, max=0)

    def f(w1, w2, x1, x2):
        Z1, Z2 = F.linear(x1, w1), F.linear(x2, w2)
        S1, S2 = _sd(R, Z1 + Z2), _sd(R, Z2 + Z2)
        return x1 * torch.autograd.grad(Z1, x1, S1, retain_graph=True)[0] + \
            x2 * torch.autograd.grad(Z2, x2, S2, retain_graph=True)[0]

    return (alpha * f(pw, nw, px, nx) - beta * f(nw, pw, px, nx)).detach()


def _clone(x, Rs):
    x = x.detach().requires_grad_(True)
    C = torch.autograd.grad([x] * len(Rs), x, [_sd(r, x) for r in Rs])[0]
    return (x * C).detach()


def published_lrp(model, img, t):
    """(pixel map [H, W] of method="full", last block's attention relevance [H, N, N]) for one image and prompt."""
    v_ = model.visual
    with torch.no_grad():
        patches = v_.conv1(img[None])[0].flatten(1).t()
        tok = torch.cat([v_.class_embedding[None], patches])
        pos = v_.positional_embedding
        x = v_.ln_pre(tok + pos)
        saved = []
        for blk in v_.transformer.resblocks:
            D, H = x.shape[-1], blk.attn.num_heads
            a = blk.ln_1(x)
            q, k, v = (a @ blk.attn.in_proj_weight.t() + blk.attn.in_proj_bias).split(D, -1)
            q, k, v = (u.reshape(-1, H, D // H).transpose(0, 1) for u in (q, k, v))
            attn = torch.softmax(torch.einsum("hid,hjd->hij", q, k) * (D // H) ** -0.5, -1)
            heads = torch.einsum("hij,hjd->hid", attn, v).transpose(0, 1).reshape(-1, D)
            attn_out = blk.ls_1(heads @ blk.attn.out_proj.weight.t() + blk.attn.out_proj.bias)
            y = x + attn_out
            m = blk.ln_2(y)
            g = blk.mlp.gelu(blk.mlp.c_fc(m))
            mlp_out = blk.ls_2(blk.mlp.c_proj(g))
            saved.append(dict(x=x, a=a, q=q, k=k, v=v, attn=attn, heads=heads, attn_out=attn_out, y=y, m=m, g=g,
                              mlp_out=mlp_out))
            x = y + mlp_out
        n_all = v_.ln_post(x)
        e_hat = F.normalize(n_all[:1] @ v_.proj, dim=-1)
    R = _lin(torch.ones(1, 1, dtype=img.dtype), e_hat, t[None])  # the text head, one-hot relevance
    R = _lin(R, n_all[:1], v_.proj.t())
    R = _simple(lambda X: X[:1], [n_all], R)[0]  # IndexSelect of the CLS token
    for blk, s in zip(reversed(v_.transformer.resblocks), reversed(saved)):
        R_y, R_m = _simple(lambda p, q: p + q, [s["y"], s["mlp_out"]], R)
        R_m = _lin(_lin(R_m, s["g"], blk.mlp.c_proj.weight), s["m"], blk.mlp.c_fc.weight)
        R = _clone(s["y"], [R_y, R_m])
        R_x, R_a = _simple(lambda p, q: p + q, [s["x"], s["attn_out"]], R)
        H = blk.attn.num_heads
        R_o = _lin(R_a, s["heads"], blk.attn.out_proj.weight).reshape(-1, H, R.shape[-1] // H).transpose(0, 1)
        cam1, cam_v = _simple(lambda A, V: torch.einsum("hij,hjd->hid", A, V), [s["attn"], s["v"]], R_o)
        cam1, cam_v = cam1 / 2, cam_v / 2
        s["attn_cam"] = cam1
        cam_q, cam_k = _simple(lambda Q, K: torch.einsum("hid,hjd->hij", Q, K), [s["q"], s["k"]], cam1)
        merged = torch.cat([u.transpose(0, 1).reshape(-1, R.shape[-1]) for u in (cam_q / 2, cam_k / 2, cam_v)], -1)
        R = _clone(s["x"], [R_x, _lin(merged, s["a"], blk.attn.in_proj_weight)])
    R = _simple(lambda p, q: p + q, [tok, pos], R)[0][1:]  # the position add; the patch tokens
    gh = img.shape[-2] // v_.conv1.kernel_size[0]
    R = R.t().reshape(1, -1, gh, R.shape[0] // gh)
    X, w = img[None], v_.conv1.weight
    pw, nw = w.clamp(min=0), w.clamp(max=0)
    L = X * 0 + X.amin(dim=(1, 2, 3), keepdim=True)
    Hi = X * 0 + X.amax(dim=(1, 2, 3), keepdim=True)
    conv = lambda z, k: F.conv2d(z, k, stride=v_.conv1.stride)  # noqa: E731
    back = lambda s_, k: F.conv_transpose2d(s_, k, stride=v_.conv1.stride)  # noqa: E731
    S = R / (conv(X, w) - conv(L, pw) - conv(Hi, nw) + 1e-9)
    pixels = (X * back(S, w) - L * back(S, pw) - Hi * back(S, nw)).sum(dim=1)[0]
    return pixels, saved[-1]["attn_cam"]


def test_lrp_and_partial_lrp_match_the_published_rules(model, images, prompts):
    full = explain(model, images, prompts, method="lrp")
    part = explain(model, images, prompts, method="partial_lrp")
    p = model.visual.conv1.kernel_size[0]
    for b in range(images.shape[0]):
        for j in range(prompts.shape[0]):
            pixels, attn_cam = published_lrp(model, images[b], prompts[j])
            per_patch = pixels.reshape(4, p, 4, p).sum(dim=(1, 3))
            assert torch.allclose(full[b, j], per_patch, atol=1e-12, rtol=1e-9), (b, j)
            want = attn_cam.clamp(min=0).mean(dim=0)[0, 1:].reshape(4, 4)
            assert torch.allclose(part[b, j], want, atol=1e-12, rtol=1e-9), (b, j)
    assert not torch.allclose(full[:, 0], full[:, 1])  # the prompt matters


def model_attention(model, images):
    """[b, L, H, N, N] from the model's own nn.MultiheadAttention modules (need_weights)."""
    v_ = model.visual
    x = images
    x = v_.conv1(x).flatten(2).transpose(1, 2)
    x = torch.cat([v_.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v_.positional_embedding
    x = v_.ln_pre(x)
    out = []
    with torch.no_grad():
        for blk in v_.transformer.resblocks:
            h = blk.ln_1(x)
            _, w = blk.attn(h, h, h, need_weights=True, average_attn_weights=False)
            out.append(w)
            x = blk(x)
    return torch.stack(out, dim=1)


def test_rollout_is_the_matrix_product(model, images, prompts):
    got = explain(model, images, prompts, method="rollout")
    A = model_attention(model, images).mean(dim=2)  # [b, L, N, N]
    N = A.shape[-1]
    for b in range(images.shape[0]):
        R = torch.eye(N, dtype=A.dtype)
        for l in range(A.shape[1]):
            M = 0.5 * A[b, l] + 0.5 * torch.eye(N, dtype=A.dtype)  # rows of A sum to 1
            R = M @ R
        for p in range(prompts.shape[0]):
            assert torch.allclose(got[b, p].flatten(), R[0, 1:], atol=1e-12)


def test_raw_attention_is_the_cls_row(model, images, prompts):
    got = explain(model, images, prompts, method="raw_attention")
    A = model_attention(model, images)[:, -1].mean(dim=1)  # [b, N, N]
    for p in range(prompts.shape[0]):
        assert torch.allclose(got[:, p].flatten(1), A[:, 0, 1:], atol=1e-12)


@pytest.mark.parametrize("start_layer,target", [(0, "cosine"), (-1, "cosine"), (0, "logit"), (-1, "logit"),
                                                 (1, "logit")])
def test_chefer_matches_autograd(model, images, prompts, start_layer, target):
    got = explain(model, images, prompts, method="chefer", start_layer=start_layer, target=target)
    if (start_layer, target) == (-1, "logit"):  # the published notebook's defaults
        assert torch.equal(got, explain(model, images, prompts, method="chefer"))
    scale = model.logit_scale.exp().item() if target == "logit" else 1.0
    for b in range(images.shape[0]):
        for p in range(prompts.shape[0]):
            blocks, e = slow_forward(model, images[b])
            s = scale * (e @ prompts[p])
            N = blocks[0]["A"].shape[-1]
            R = torch.eye(N, dtype=torch.float64)
            for l, blk in enumerate(blocks):
                if l < start_layer % len(blocks):
                    continue
                g = torch.autograd.grad(s, blk["A"], retain_graph=True)[0]
                cam = (g * blk["A"]).clamp(min=0).mean(0)
                R = R + cam @ R
            assert torch.allclose(got[b, p].flatten(), R[0, 1:], atol=1e-12 * float(scale) ** 2), (b, p)


def test_chefer_logit_target_needs_the_whole_model(model, images, prompts):
    with pytest.raises(ValueError, match="logit scale"):
        explain(model.visual, images, prompts, method="chefer")
    a = explain(model.visual, images, prompts, method="chefer", target="cosine")
    b = explain(model, images, prompts, method="chefer")
    assert torch.allclose(a * model.logit_scale.exp().item(), b, atol=1e-12)  # last block only: linear in the scale


def test_decomposition_method_is_the_heatmaps(model, images, prompts):
    got = explain(model, images, prompts, method="decomposition", layers="-1:")
    want = textspan.heatmaps(model, images, prompts, layers="-1:")
    assert torch.allclose(got, want, atol=1e-12)
    # and the maps are the direct contributions: summed over patches (absolute), plus the rest, the cosine
    p = textspan.decomposition.project(model, images, prompts)
    cos = F.normalize(model.encode_image(images), dim=-1) @ prompts.t()
    assert torch.allclose(p.total(), cos, atol=1e-10)


# ---- the contract of every method ------------------------------------------------------------------------------

def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [m.training for m in model.modules()])


def _hooks_and_rebinds(model):
    found = []
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None):
            found.append(name)
        if "forward" in vars(m):
            found.append(name + ".forward")
    for name, p in model.named_parameters():
        if p._backward_hooks:
            found.append(name)
    return found


def _same(model, snap, images):
    state, flags, modes = snap
    now = _snapshot(model)
    assert state.keys() == now[0].keys()
    assert all(torch.equal(state[k], now[0][k]) for k in state)
    assert flags == now[1]
    assert modes == now[2]
    assert not _hooks_and_rebinds(model)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", list_methods())
def test_contract(method, prompts):
    model = tiny_clip(seed=11, layers=2)
    # a mix of frozen and trainable parameters: the flags must come back as they were
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 2 == 0)
    imgs = random_images(3, seed=2)
    T = prompts.float()
    snap = _snapshot(model)
    before = model.encode_image(imgs).detach()
    maps = explain(model, imgs, T, method=method)
    assert maps.shape == (3, 3, 4, 4) and maps.dtype == torch.float32 and not maps.requires_grad
    assert torch.isfinite(maps).all()
    _same(model, snap, imgs)
    assert torch.equal(model.encode_image(imgs).detach(), before)
    # deterministic; batched == one image and one prompt at a time
    assert torch.equal(explain(model, imgs, T, method=method), maps)
    for b in range(3):
        for p in range(3):
            if method in ("decomposition", "clip_surgery"):  # maps that depend on the prompt set (one prompt refused)
                one = explain(model, imgs[b:b + 1], T, method=method)[:, p:p + 1]
            else:
                one = explain(model, imgs[b:b + 1], T[p:p + 1], method=method)
            assert torch.allclose(one[0, 0], maps[b, p], atol=1e-5, rtol=1e-4), (b, p)
    # inputs not modified, works under no_grad, and in training mode
    imgs_copy = imgs.clone()
    with torch.no_grad():
        again = explain(model, imgs, T, method=method)
    assert torch.equal(imgs, imgs_copy) and torch.allclose(again, maps)
    model.train()
    snap_train = _snapshot(model)
    explain(model, imgs, T, method=method)
    _same(model, snap_train, imgs)
    model.eval()


@pytest.mark.parametrize("method", list_methods())
def test_contract_after_a_raise(method):
    model = tiny_clip(seed=11, layers=2)
    snap = _snapshot(model)
    imgs = random_images(2, seed=2)
    with pytest.raises(ValueError):
        explain(model, imgs, torch.randn(2, 5), method=method)  # wrong embedding width
    bad = {"legrad": dict(layers=[7]), "chefer": dict(start_layer=9), "rollout": dict(start_layer=9),
           "decomposition": dict(heads="L9H0")}
    if method in bad:
        with pytest.raises(ValueError):
            explain(model, imgs, torch.randn(2, 24), method=method, **bad[method])
    _same(model, snap, imgs)


@pytest.mark.parametrize("method", list_methods())
def test_any_size_and_non_square(method):
    model = tiny_clip(seed=11, layers=2)
    imgs = random_images(2, size=48, seed=2)[:, :, :, :40]  # 48 x 40 px: a 6 x 5 grid on an 8 px patch
    maps = explain(model, imgs, torch.randn(2, 24), method=method)
    assert maps.shape == (2, 2, 6, 5) and torch.isfinite(maps).all()
    assert tuple(model.visual.positional_embedding.shape) == (17, 64)  # not resized in place


def test_positions_resample_like_timm():
    from timm.layers import resample_abs_pos_embed

    model = tiny_clip(seed=1)
    v = model.visual
    imgs = random_images(1, size=48, seed=0)[:, :, :, :40]
    pos = resample_abs_pos_embed(v.positional_embedding[None], new_size=[6, 5], num_prefix_tokens=1,
                                 interpolation="bicubic", antialias=True)[0]
    x = v.conv1(imgs).flatten(2).transpose(1, 2)
    want = v.ln_pre(torch.cat([v.class_embedding.view(1, 1, -1), x], dim=1) + pos)
    tower = read_tower(model)
    assert torch.allclose(tower.embed(imgs), want, atol=1e-6)
    assert tower.positions((4, 4)) is v.positional_embedding  # the model's own grid: its positions, not resampled


def test_legrad_fast_tail_equals_autograd(model, images):
    """LeGrad's hand-written MLP/LayerNorm backward equals torch.func on the same block."""
    from textspan.methods._vit import batched_vjp, trace
    from textspan.methods.legrad import _MeanTail

    tower = read_tower(model)
    t = trace(tower, images, [1])[1]
    cot = torch.randn(4, images.shape[0], t.y.shape[-1], dtype=t.y.dtype)
    tail = _MeanTail(tower.blocks[1], t.y, t.hidden)
    assert tail.fast
    want = batched_vjp(lambda v: model.visual.transformer.resblocks[1].ls_2(
        model.visual.transformer.resblocks[1].mlp(model.visual.transformer.resblocks[1].ln_2(v))).add(v).mean(dim=1),
        t.y, cot)
    assert torch.allclose(tail.vjp(cot), want, atol=1e-12)


def test_unknown_method_lists_the_known():
    with pytest.raises(ValueError, match="legrad"):
        explain(tiny_clip(), random_images(1), torch.randn(1, 24), method="nope")
    assert list_methods() == ["decomposition", "legrad", "gradeclip", "gradcam", "rollout", "raw_attention",
                              "chefer", "maskclip", "clip_surgery", "m2ib", "lrp", "partial_lrp"]


def test_upsample_maps_by_hand():
    maps = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])  # [1, 1, 2, 2]
    up = upsample_maps(maps, 4)
    # bilinear, align_corners=False, 2 -> 4: source coordinates (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25,
    # clamped to [0, 1]: weights 0, 0.25, 0.75, 1 along each axis; the map is x + 2 y, then min-max to [0, 1]
    w = torch.tensor([0.0, 0.25, 0.75, 1.0])
    want = (w[None, :] + 2 * w[:, None]) / 3.0
    assert torch.allclose(up[0, 0], want, atol=1e-6)
    assert upsample_maps(torch.ones(2, 3, 4, 4), (8, 6)).shape == (2, 3, 8, 6)
    assert torch.equal(upsample_maps(torch.ones(1, 1, 2, 2), 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError):
        upsample_maps(torch.ones(4, 4), 8)


VARIANTS = {
    "quick_gelu": dict(quick_gelu=True),
    "layer_scale": dict(ls_init_value=0.5),
    "custom_block": dict(qk_norm=True, scale_heads=True),
    "no_ln_pre": dict(no_ln_pre=True),
    "final_ln_after_pool": dict(final_ln_after_pool=True),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_explainer_forward_is_the_models_on_every_block_kind(variant):
    """The explainers' forward (explicit attention map) equals open_clip's block by block and at the embedding."""
    model = tiny_clip(seed=4, dtype=torch.float64, **VARIANTS[variant])
    v = model.visual
    tower = read_tower(model)
    imgs = random_images(2, seed=3, dtype=torch.float64)
    with torch.no_grad():
        x = tower.embed(imgs)
        for blk, ours in zip(v.transformer.resblocks, tower.blocks):
            want = blk(x)
            t = ours.forward(x)
            assert torch.allclose(t.x_out, want, atol=1e-10)
            assert torch.allclose(ours.fast(x), want, atol=1e-10)
            assert torch.allclose(t.probs.sum(-1), torch.ones_like(t.probs[..., 0]))
            x = want
        e = F.normalize(model.encode_image(imgs), dim=-1)
        assert torch.allclose(tower.pooled_embedding(x[:, 0]), e, atol=1e-10)
    T = F.normalize(torch.randn(2, 24, dtype=torch.float64), dim=-1)
    for m in list_methods():
        maps = explain(model, imgs, T, method=m)
        assert maps.shape == (2, 2, 4, 4) and torch.isfinite(maps).all(), m


@pytest.mark.parametrize("tower", [dict(pool_type="avg"), dict(attentional_pool=True, attn_pooler_heads=2)])
def test_towers_the_decomposition_refuses_are_refused_by_every_method(tower):
    from textspan.models import UnsupportedModelError

    model = tiny_clip(seed=4, **tower)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    T = F.normalize(torch.randn(2, 24), dim=-1)
    for m in list_methods():
        with pytest.raises(UnsupportedModelError):
            explain(model, random_images(1), T, method=m)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
