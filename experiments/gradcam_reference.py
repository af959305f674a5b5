"""textspan's `gradcam` (variant="pytorch-grad-cam") against pytorch-grad-cam itself on the same weights and inputs.

pytorch-grad-cam's documented ViT recipe: `GradCAM(model, target_layers=[blocks[-1].norm1], reshape_transform=...)`
with the reshape dropping the CLS token; here the target layer is open_clip's `ln_1` of the last block, the model
returns the normalised image embedding and the target returns its dot product with the prompt embedding (the
image-text cosine; the similarity target of pytorch-grad-cam's CLIP tutorial). pytorch-grad-cam returns min-max
normalised maps resized to the input (cv2); textspan's raw maps go through the same steps with pytorch-grad-cam's
own `scale_cam_image` (per layer with the resize, then again after the mean over layers), and the largest
difference is printed.

    pip install grad-cam opencv-python-headless       # not a textspan dependency
    python experiments/gradcam_reference.py [--model ViT-B-16] [--images 4] [--size 224]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()

    import open_clip
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import scale_cam_image

    import textspan

    torch.manual_seed(0)
    model = open_clip.create_model(args.model).eval()
    grid = args.size // model.visual.patch_size[0]
    x = torch.randn(args.images, 3, args.size, args.size)
    T = F.normalize(torch.randn(args.images, model.visual.output_dim), dim=-1)

    class Embedding(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, images):
            return F.normalize(self.m.encode_image(images), dim=-1)

    def reshape(t):  # the recipe's reshape transform: drop CLS, [b, N, D] -> [b, D, h, w]
        return t[:, 1:, :].reshape(t.shape[0], grid, grid, t.shape[2]).permute(0, 3, 1, 2)

    cam = GradCAM(model=Embedding(model), target_layers=[model.visual.transformer.resblocks[-1].ln_1],
                  reshape_transform=reshape)
    class Similarity:  # pytorch-grad-cam calls a target on one image's model output
        def __init__(self, t):
            self.t = t

        def __call__(self, output):
            return (output * self.t).sum()

    theirs = cam(input_tensor=x, targets=[Similarity(t) for t in T])  # [b, size, size]
    ours_raw = torch.stack([textspan.explain(model, x[i:i + 1], T[i:i + 1], method="gradcam",
                                             variant="pytorch-grad-cam")[0, 0] for i in range(args.images)])
    # BaseCAM scales each layer's cam (min-max, cv2 resize), averages over layers, and min-max scales again
    ours = scale_cam_image(scale_cam_image(ours_raw.numpy(), (args.size, args.size)))
    diff = float(np.abs(theirs - ours).max())
    print(f"{args.model} at {args.size} px, {args.images} images: largest difference of the min-max maps "
          f"(pytorch-grad-cam's scaling on both) {diff:.2e}")


if __name__ == "__main__":
    main()
