"""Every open_clip ViT config of the CLIP/LAION kind decomposes exactly (each built with 2 blocks, random init)."""
import copy

import open_clip
import pytest
import torch
from open_clip.model import CLIP

from textspan import UnsupportedModelError, decompose, forward_image, model_info

SUPPORTED = ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-H-14", "ViT-bigG-14", "ViT-B-16-quickgelu",
             "ViT-H-14-378-quickgelu", "ViT-B-16-plus-240", "ViT-M-16-alt", "ViT-L-14-worldwide"]


def _shallow(name, layers=2):
    cfg = copy.deepcopy(open_clip.get_model_config(name))
    cfg["vision_cfg"]["layers"] = layers
    cfg["text_cfg"]["layers"] = 1
    torch.manual_seed(0)
    model = CLIP(**cfg).eval()
    with torch.no_grad():  # non-trivial biases, LayerNorm affine and layer scale
        for n, p in model.visual.named_parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn_like(p))
    return model, cfg


@pytest.mark.parametrize("name", SUPPORTED)
def test_open_clip_vit_configs(name):
    model, cfg = _shallow(name)
    info = model_info(model)
    v = cfg["vision_cfg"]
    assert info.d_model == v["width"] and info.d_head == v.get("head_width", 64)
    assert info.n_tokens == 1 + (v["image_size"] // v["patch_size"]) ** 2
    assert info.activation == ("QuickGELU" if cfg.get("quick_gelu") else "GELU")
    assert info.layer_scale == ("ls_init_value" in v)
    x = torch.randn(1, 3, v["image_size"], v["image_size"])
    with torch.no_grad():
        e = model.encode_image(x)
    torch.testing.assert_close(forward_image(model, x), e, rtol=1e-5, atol=1e-5)
    d = decompose(model, x, spatial=True)
    assert d.heads.shape == (1, 2, info.n_tokens, info.n_heads, cfg["embed_dim"])
    torch.testing.assert_close(d.total(), e / e.norm(dim=-1, keepdim=True), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,reason", [("RN50", "ResNets have no attention heads")])
def test_other_kinds_are_refused(name, reason):
    """A tower no reader reads is refused with the reason and the list of families textspan reads."""
    with pytest.raises(UnsupportedModelError, match=reason) as info:
        model_info(open_clip.create_model(name))
    for family in ("open_clip ViT", "EVA", "transformers CLIP / SigLIP", "SigLIP"):
        assert family in str(info.value)


@pytest.mark.parametrize("name", ["ViT-H-14-CLIPA", "ViT-L-14-CLIPA"])
def test_average_pooled_clipa_configs(name):
    """CLIPA: no ln_pre, the mean of the patch tokens, then ln_post: exact by linearising ln_post on that mean."""
    model, cfg = _shallow(name)
    info = model_info(model)
    assert info.family == "open_clip (average pool)"
    v = cfg["vision_cfg"]
    x = torch.randn(2, 3, v["image_size"], v["image_size"])
    with torch.no_grad():
        e = model.encode_image(x)
    torch.testing.assert_close(forward_image(model, x), e, rtol=1e-5, atol=1e-5)
    d = decompose(model, x, spatial=True)
    torch.testing.assert_close(d.total(), e / e.norm(dim=-1, keepdim=True), rtol=0, atol=1e-5)
    torch.testing.assert_close(d.heads.sum(dim=2), decompose(model, x, spatial=False).heads, rtol=0, atol=1e-6)
    import textspan

    T = torch.nn.functional.normalize(torch.randn(2, cfg["embed_dim"]), dim=-1)
    maps = textspan.explain(model, x, T, method="decomposition")
    assert maps.shape[:2] == (2, 2)
    with pytest.raises(UnsupportedModelError, match="average pool"):
        textspan.explain(model, x, T, method="legrad")


def test_stock_siglip_config_is_read_and_decomposed():
    """open_clip's own ViT-B-16-SigLIP (timm trunk, attention pooling; random weights): forward and identity."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-SigLIP").eval()
    info = model_info(model)
    assert (info.pooling, info.n_layers, info.n_heads, info.n_tokens, info.n_mlp_terms) == ("attention", 12, 12, 196, 14)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        e = model.encode_image(x)
    torch.testing.assert_close(forward_image(model, x), e, rtol=1e-5, atol=1e-5)
    d = decompose(model, x, spatial=False)
    torch.testing.assert_close(d.total(), e / e.norm(dim=-1, keepdim=True), rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16", "ViT-L-14"])
def test_full_depth_float64(name):
    torch.manual_seed(0)
    model = open_clip.create_model(name).double().eval()
    size = model.visual.image_size[0]
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        e = model.encode_image(x)
    torch.testing.assert_close(forward_image(model, x), e, rtol=0, atol=1e-10)
    torch.testing.assert_close(decompose(model, x).total(), e / e.norm(dim=-1, keepdim=True), rtol=0, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model, cfg = _shallow("ViT-B-16")
    x = torch.randn(2, 3, 224, 224)
    cpu = decompose(model, x)
    gpu = decompose(model.cuda(), x.cuda())
    torch.testing.assert_close(gpu.heads.cpu(), cpu.heads, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gpu.total().cpu(), cpu.total(), rtol=1e-4, atol=1e-5)
