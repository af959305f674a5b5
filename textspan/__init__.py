"""textspan: explain the attention heads of CLIP vision transformers in words.

Python API (see the README):

    model, preprocess, tokenizer = textspan.load_model("ViT-B-16", "laion2b_s34b_b88k")
    d = textspan.decompose(model, images)          # d.heads [b, L, N, H, d'], d.mlps [b, L+1, d']
    d.total()                                      # == encode_image(images) / ||.||
    maps = textspan.explain(model, images, text_embeddings, method="legrad")   # [b, P, grid_h, grid_w]
"""

from ._version import __version__  # noqa: E402,F401

from .errors import (  # noqa: E402
    BadInputError,
    CacheMismatchError,
    EmbeddingMismatchError,
    FolderBusyError,
    FolderMismatchError,
    InputNotFoundError,
    ModelMismatchError,
    TextspanError,
    UnknownModelError,
    UnsupportedModelError,
    WeightsUnavailableError,
)
from .names import head_mask, head_name, parse_heads, parse_layers  # noqa: E402
from .cache import HeadCache, build_cache  # noqa: E402
from .datasets import ImageList  # noqa: E402
from .decomposition import Decomposition, Projection, decompose, forward_image, project  # noqa: E402
from .heatmaps import heatmaps, pool_head_maps  # noqa: E402
from .methods import explain, get_method, list_methods, upsample_maps  # noqa: E402
from .debias import DebiasedClassifier  # noqa: E402
from .span import TextSpanResult, label_heads, text_span  # noqa: E402
from .text import TextBank, bank_embeddings, encode_texts  # noqa: E402
from .zeroshot import build_classifier  # noqa: E402
from .store import RunFolder  # noqa: E402
from .jobs import (  # noqa: E402
    AblationResult,
    CompletenessResult,
    DebiasResult,
    DecomposeSummary,
    HeadLabels,
    Retrieval,
    ablate_cache,
    cache_images,
    debias_cache,
    decompose_images,
    encode_bank,
    evaluate_shapes,
    label_cache,
    measure_completeness,
    retrieve_images,
    write_shapes_waterbirds,
    write_shapes_world,
)
from .image_jobs import (  # noqa: E402
    Comparison,
    HeatmapResult,
    compare_methods,
    draw_heatmaps,
    evaluate_perturbation,
    evaluate_segmentation,
)
from .datasets import read_image  # noqa: E402
from .neurons import (NeuronEffects, first_order_effects, neuron_directions, neuron_effect_parts,  # noqa: E402
                      neuron_effects)
from .neuron_jobs import NeuronMaps, NeuronResult, ablate_neurons, analyse_neurons, draw_neuron_maps  # noqa: E402
from .benchmark import (  # noqa: E402
    evaluate_deletion_insertion,
    evaluate_imagenet_s,
    evaluate_points,
    run_benchmark,
)
from .atlas import AtlasResult, build_atlas  # noqa: E402
from .models import (  # noqa: E402
    ModelInfo,
    check_decomposable,
    fingerprint,
    load_model,
    model_info,
)

__all__ = [
    "TextspanError", "BadInputError", "InputNotFoundError", "UnknownModelError", "FolderMismatchError",
    "FolderBusyError", "ModelMismatchError", "EmbeddingMismatchError", "head_mask", "head_name", "parse_heads",
    "parse_layers", "CacheMismatchError", "Decomposition", "HeadCache", "ImageList", "ModelInfo", "UnsupportedModelError",
    "WeightsUnavailableError", "build_cache", "check_decomposable", "decompose", "fingerprint", "forward_image",
    "load_model", "model_info", "TextSpanResult", "label_heads", "text_span", "TextBank", "bank_embeddings",
    "encode_texts", "build_classifier", "Projection", "project", "heatmaps", "pool_head_maps", "DebiasedClassifier",
    "explain", "get_method", "list_methods", "upsample_maps", "RunFolder", "read_image",
    # jobs: whole analyses with their command's guarantees (textspan.jobs, textspan.image_jobs)
    "AblationResult", "CompletenessResult", "DebiasResult", "DecomposeSummary", "HeadLabels", "Retrieval",
    "ablate_cache", "cache_images", "debias_cache", "decompose_images", "encode_bank", "evaluate_shapes",
    "label_cache", "measure_completeness", "retrieve_images", "write_shapes_waterbirds", "write_shapes_world",
    "Comparison", "HeatmapResult", "compare_methods", "draw_heatmaps", "evaluate_perturbation",
    "evaluate_segmentation", "evaluate_deletion_insertion", "evaluate_imagenet_s", "evaluate_points",
    "run_benchmark", "NeuronEffects", "neuron_directions", "neuron_effects", "first_order_effects",
    "neuron_effect_parts", "NeuronMaps", "draw_neuron_maps", "NeuronResult", "ablate_neurons",
    "analyse_neurons", "AtlasResult", "build_atlas",
]
