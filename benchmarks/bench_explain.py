"""Cost of every explainer against one plain `encode_image` of the same batch.

ViT-B-16 (random init), CPU, 224 px; batches of 1 and 8 images, 1, 3 and 8 prompts; timings interleaved with the
baseline, median of repeats; prints a table of ratios. Goals at 1 image: legrad <= 1.2x at 3 prompts and <= 1.5x at 8;
chefer <= 3x at 8 prompts; decomposition <= 1.3x everywhere. If the published LeGrad (legrad-torch) imports, its time
on the same inputs (one image per call, its own wrapper) is printed as well. m2ib optimises a mask per image and
prompt (10 steps of 10 noise draws through the last blocks), so it runs only where images x prompts <= --m2ib-pairs
("-" elsewhere); the published M2IB's time on the same inputs is printed by experiments/m2ib_reference.py.

    python benchmarks/bench_explain.py [--methods legrad,decomposition] [--repeats 3] [--threads 2]
"""
import argparse
import copy
import statistics
import time

import open_clip
import torch

import textspan


def _published_legrad(model):
    try:
        import legrad
    except Exception:
        return None
    wrapped = legrad.LeWrapper(copy.deepcopy(model), layer_index=-2)

    def run(x, T):
        for img in x:
            wrapped.compute_legrad(T, image=img[None])
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--methods", default=",".join(textspan.list_methods()))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompts", default="1,3,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--m2ib-pairs", type=int, default=3, help="run m2ib where images x prompts <= this")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = open_clip.create_model(args.model).eval()
    size = model.visual.image_size
    methods = args.methods.split(",")
    published = _published_legrad(model)
    print(f"{args.model}, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"time / encode_image of the same batch (median of {args.repeats})")
    header = f"{'images':>6} {'prompts':>7} {'encode_image':>12} " + " ".join(f"{m:>13}" for m in methods)
    if published:
        header += f" {'legrad-torch':>13}"
    print(header)
    results = {}
    for b in map(int, args.batches.split(",")):
        x = torch.randn(b, 3, *size)
        for P in map(int, args.prompts.split(",")):
            T = torch.nn.functional.normalize(torch.randn(P, model.visual.output_dim), dim=-1)
            runs = {"encode_image": lambda: model.encode_image(x)}
            for m in methods:
                if m == "m2ib" and b * P > args.m2ib_pairs:
                    continue
                # one prompt: the decomposition's own map (a relative map needs two prompts at least)
                opts = {"relative": False} if m == "decomposition" and T.shape[0] == 1 else {}
                if m == "clip_surgery":  # as its published evaluation: 59 more (background) texts beside the prompts
                    opts = {"redundant_texts": torch.nn.functional.normalize(torch.randn(59, T.shape[1]), dim=-1)}
                runs[m] = (lambda m=m, opts=opts: textspan.explain(model, x, T, method=m, **opts))
            if published:
                runs["legrad-torch"] = lambda: published(x, T)
            times = {k: [] for k in runs}
            for k, f in runs.items():  # warm-up
                with torch.no_grad() if k == "encode_image" else torch.enable_grad():
                    f()
            for _ in range(args.repeats):
                for k, f in runs.items():
                    t0 = time.perf_counter()
                    with torch.no_grad() if k == "encode_image" else torch.enable_grad():
                        f()
                    times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(v) for k, v in times.items()}
            base = med["encode_image"]
            line = f"{b:>6} {P:>7} {base:>11.3f}s " + " ".join(
                f"{med[m] / base:>12.2f}x" if m in med else f"{'-':>13}" for m in methods)
            if published:
                line += f" {med['legrad-torch'] / base:>12.2f}x"
            print(line, flush=True)
            results[(b, P)] = {k: v / base for k, v in med.items()}
    goals = [("legrad", 1, 3, 1.2), ("legrad", 1, 8, 1.5), ("chefer", 1, 8, 3.0)] + \
        [("decomposition", b, P, 1.3) for (b, P) in results]
    print("goals:")
    for m, b, P, g in goals:
        if m in methods and (b, P) in results and m in results[(b, P)]:
            r = results[(b, P)][m]
            print(f"  {m} at {b} image(s), {P} prompts: {r:.2f}x (goal <= {g}x) {'met' if r <= g else 'NOT met'}")


if __name__ == "__main__":
    main()
