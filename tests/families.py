"""Tiny randomly initialised models of every supported family (transformers CLIP / SigLIP, open_clip timm SigLIP),
built from configs (no download), and a word-level tokenizer for the transformers ones."""
import torch

WORDS = ["a", "an", "photo", "of", "circle", "square", "triangle", "star", "cross", "red", "blue", "green", "object",
         "on", "water", "land", "small", "large", "shape", "picture", "the"]


def _text_cfg():
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
                max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _vision_cfg(**kw):
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
                patch_size=8, **kw)


def hf_clip(seed=0, **vision):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(text_config=_text_cfg(), vision_config=_vision_cfg(**vision), projection_dim=24)
    return CLIPModel(cfg).eval()


def hf_siglip(seed=0):
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    return SiglipModel(SiglipConfig(text_config=_text_cfg(), vision_config=_vision_cfg())).eval()


def open_clip_siglip(seed=0):
    """An open_clip CustomTextCLIP whose image tower is a timm SigLIP ViT ('map' attention pooling), small widths."""
    import open_clip
    import timm
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    m = open_clip.CustomTextCLIP(
        embed_dim=32, init_logit_bias=-10.0,
        vision_cfg=CLIPVisionCfg(timm_model_name="vit_tiny_patch16_224", timm_pool="map", timm_proj="none",
                                 image_size=32),
        text_cfg=CLIPTextCfg(context_length=16, vocab_size=64, width=32, heads=4, layers=2, no_causal_mask=True,
                             pool_type="last", proj_bias=True))
    m.visual.trunk = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, num_classes=0,
                                       global_pool="map", img_size=32, patch_size=8, embed_dim=32, depth=3,
                                       num_heads=4)
    return m.eval()


def word_tokenizer():
    """A transformers fast tokenizer over WORDS (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def tiny_eva(seed=0, inner=True, fused=False, layer_scale=False, post_norm=False, dtype=torch.float64):
    """A tiny EVA02-style CLIP: open_clip's EVA02-B-16 model with its timm `Eva` trunk replaced by a 3-block,
    64-wide one at 32 px (8 px patches): rotary embeddings, SwiGLU MLPs with their inner norm, the LayerNorm over the
    heads before the output projection (`inner`), separate or fused (`fused`, with q/v biases) q/k/v, optional layer
    scale, or EVA02-E's post-norm blocks (`post_norm`: a LayerNorm after the attention's and the MLP's outputs, none
    before); the trunk's head is the projection with a bias, as in EVA02 CLIP. Every parameter randomised."""
    import open_clip
    from timm.models.eva import Eva

    torch.manual_seed(seed)
    model = open_clip.create_model("EVA02-B-16")
    model.visual.trunk = Eva(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, qkv_fused=fused,
                             qkv_bias=True, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=inner,
                             use_rot_pos_emb=True, ref_feat_shape=(4, 4), num_classes=512, global_pool="token",
                             mlp_ratio=2.0, init_values=0.5 if layer_scale else None, use_post_norm=post_norm)
    randomise_eva(model, seed + 1)
    return model.to(dtype).eval()


def randomise_eva(model, seed: int):
    """An EVA model's image tower with every parameter drawn (`helpers.randomise`; norm weights around 1)."""
    from helpers import randomise

    randomise(model.visual.named_parameters(), seed, lambda name: "norm" in name and name.endswith("weight"))
    return model.eval()
