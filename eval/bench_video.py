"""Video benchmarks: wall-clock speed-up against the analytic FLOPs bound.

    python -m tokenreduce.eval.bench_video                       # both, JSON on stdout
    python -m tokenreduce.eval.bench_video sta --depth 6 --runs 3
    python -m tokenreduce.eval.bench_video swin --policy "stage.1=sta_slices(r=2)"

(a) `bench_sta_videomae`: STA on a VideoMAE-B-shaped random model (width 768, 12 heads, MLP
    3072; 16 frames x 224^2, tubelet 2 -> 1568 tokens). `depth` shortens the encoder to fit a
    slow CPU (STA's stages follow blocks 0, depth/3, 2 depth/3 at any depth, so the FLOPs
    fraction stays close to ViT-B's). Reports baseline / reduced ms, speed-up, the analytic
    FLOPs fraction (handle.stats["flops_fraction"], transformer blocks only), the FLOPs-bound
    speed-up 1/fraction and measured / bound.
(b) `bench_swin`: structured STA (`sta_slices`) on torchvision swin3d_t at 16 x 224 x 224:
    speed-up against the token cut (block-weighted share of tokens the stages still carry) and
    against the analytic FLOPs fraction.

Weights are random: speed does not depend on them. Baseline and reduced models are separate
copies timed interleaved (see eval/bench.py); medians and os.getloadavg() are reported,
because a shared machine makes single timings noisy.
"""
from __future__ import annotations

import argparse
import copy
import json

import torch

import tokenreduce as tr

from .bench import check_counts, check_device, check_fits_patches, machine, time_interleaved

VIDEOMAE_B = dict(image_size=224, patch_size=16, num_frames=16, tubelet_size=2, hidden_size=768,
                  num_attention_heads=12, intermediate_size=3072, num_labels=400)


def videomae_b(depth: int = 12, seed: int = 0, frames: int = 16, image: int = 224):
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification
    torch.manual_seed(seed)
    cfg = VideoMAEConfig(num_hidden_layers=depth, **{**VIDEOMAE_B, "num_frames": frames, "image_size": image})
    return VideoMAEForVideoClassification(cfg).eval()


def _timed_pair(model, policy, x, runs, warmup, device):
    reduced = copy.deepcopy(model)
    handle = tr.reduce(reduced, policy)

    def run(m):
        with torch.inference_mode():
            return m(x)
    with torch.inference_mode():  # one pass fills handle.stats
        reduced(x)
    stats = handle.stats
    ms = time_interleaved({"baseline": lambda: run(model), "reduced": lambda: run(reduced)}, runs, warmup, device)
    spec = handle.policy.to_spec()
    handle.remove()
    return ms, stats, spec


def _summary(ms, frac):
    speedup = ms["baseline"] / ms["reduced"]
    return {"baseline_ms": round(ms["baseline"], 1), "reduced_ms": round(ms["reduced"], 1),
            "speedup": round(speedup, 3), "flops_fraction": round(frac, 4),
            "flops_bound_speedup": round(1.0 / frac, 3), "speedup_vs_flops_bound": round(speedup * frac, 3)}


def bench_sta_videomae(r: int = 32, depth: int = 12, batch: int = 1, runs: int = 3, warmup: int = 1,
                       device: str = "cpu", dtype: str = "float32", policy: str | None = None,
                       frames: int = 16, image: int = 224) -> dict:
    """STA on a VideoMAE-B-shaped random model (frames x image^2 input); see the module docstring."""
    check_counts(depth=depth, batch=batch, runs=runs, warmup=warmup, frames=frames, image=image)
    check_device(device)
    patch, tubelet = VIDEOMAE_B["patch_size"], VIDEOMAE_B["tubelet_size"]
    check_fits_patches(image, patch, "VideoMAE")
    if frames % tubelet:
        raise ValueError(f"--frames {frames}: VideoMAE groups frames in tubelets of {tubelet}, so the number of "
                         f"frames must be a multiple of {tubelet}")
    dt = getattr(torch, dtype)
    model = videomae_b(depth, frames=frames, image=image).to(device=device, dtype=dt)
    policy = policy or f"vision.layer.*=sta(r={r})"
    x = torch.randn(batch, frames, 3, image, image, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dt)
    before = machine()
    ms, stats, spec = _timed_pair(model, policy, x, runs, warmup, device)
    out = {"benchmark": "sta_videomae", "model": f"VideoMAE-B shape (depth {depth}, random weights)",
           "policy": spec, "batch": batch, "frames": frames, "image": image, "tokens_start": stats.get("tokens_start"),
           "device": str(device), "dtype": dtype, "runs": runs, "warmup": warmup}
    out.update(_summary(ms, stats.get("flops_fraction", 1.0)))
    toks = stats.get("tokens") or []
    out["tokens"] = [toks[0]] + [b for a, b in zip(toks, toks[1:]) if b != a] if toks else None
    out["reducer_ms"] = round(stats["reducer_ms"], 2)
    out["machine_before"], out["machine_after"] = before, machine()
    return out


SWIN_POLICIES = ("stage.0=sta_slices(r=2)", "stage.1=sta_slices(r=2)", "stage.1=sta_slices(r=4)",
                 "frames=frame_select(k=12)")


def bench_swin(policies=SWIN_POLICIES, frames: int = 16, size: int = 224, batch: int = 1, runs: int = 3,
               warmup: int = 1, device: str = "cpu", dtype: str = "float32") -> dict:
    """Structured STA on swin3d_t: speed-up vs token cut, per policy; see the module docstring."""
    check_counts(frames=frames, image=size, batch=batch, runs=runs, warmup=warmup)
    check_device(device)
    from torchvision.models.video import swin3d_t
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    model = swin3d_t(weights=None).eval().to(device=device, dtype=dt)
    depths = [len(m) for m in model.features if isinstance(m, torch.nn.Sequential)]
    x = torch.randn(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dt)
    results = []
    before = machine()
    for pol in ([policies] if isinstance(policies, str) else list(policies)):
        ms, stats, spec = _timed_pair(model, pol, x, runs, warmup, device)
        st = stats.get("stage_tokens", {})
        full = sum(depths[s] * v[0] for s, v in st.items())
        kept = sum(depths[s] * v[1] for s, v in st.items())
        frac_tokens = kept / full if full else 1.0
        res = {"policy": spec, "stage_tokens": {f"stage.{s}": v for s, v in sorted(st.items())},
               "token_fraction": round(frac_tokens, 4), "token_cut": round(1 - frac_tokens, 4)}
        res.update(_summary(ms, stats.get("flops_fraction", 1.0)))
        res["speedup_vs_token_bound"] = round(res["speedup"] * frac_tokens, 3)
        res["reducer_ms"] = round(stats["reducer_ms"], 2)
        results.append(res)
    return {"benchmark": "swin_sta_slices", "model": "torchvision swin3d_t (random weights)", "batch": batch,
            "frames": frames, "image": size, "device": str(device), "dtype": dtype, "runs": runs, "warmup": warmup,
            "results": results, "machine_before": before, "machine_after": machine()}


def format_result(res: dict) -> str:
    if res["benchmark"] == "sta_videomae":
        return (f"{res['model']}  {res['policy']}  batch {res['batch']}  {res['device']} {res['dtype']}\n"
                f"  tokens {res['tokens']}\n"
                f"  baseline {res['baseline_ms']:.0f} ms  reduced {res['reduced_ms']:.0f} ms  speed-up "
                f"{res['speedup']:.2f}x  FLOPs fraction {res['flops_fraction']:.3f} (bound {res['flops_bound_speedup']:.2f}x)"
                f"  measured/bound {res['speedup_vs_flops_bound']:.2f}\n"
                f"  load average {res['machine_before']['loadavg']} -> {res['machine_after']['loadavg']}")
    lines = [f"{res['model']}  {res['frames']}x{res['image']}x{res['image']}  batch {res['batch']}  "
             f"{res['device']} {res['dtype']}"]
    for r in res["results"]:
        lines.append(f"  {r['policy']:<28} token cut {r['token_cut']:.1%}  FLOPs fraction {r['flops_fraction']:.3f}  "
                     f"{r['baseline_ms']:.0f} -> {r['reduced_ms']:.0f} ms  speed-up {r['speedup']:.2f}x  "
                     f"measured/FLOPs-bound {r['speedup_vs_flops_bound']:.2f}")
    lines.append(f"  load average {res['machine_before']['loadavg']} -> {res['machine_after']['loadavg']}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="STA / structured STA video benchmarks (JSON output)")
    ap.add_argument("what", nargs="?", default="all", choices=["all", "sta", "swin"])
    ap.add_argument("--r", type=int, default=32, help="STA tokens removed per group (sta)")
    ap.add_argument("--depth", type=int, default=12, help="VideoMAE encoder layers (sta)")
    ap.add_argument("--policy", default=None, help="override the policy (sta: one spec; swin: one spec)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--frames", type=int, default=16, help="input frames (swin)")
    ap.add_argument("--image", type=int, default=224, help="input resolution (swin)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    from .cli import THREADS
    ap.add_argument("--threads", type=THREADS, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--json", default=None, help="also write the JSON here")
    ap.add_argument("--quiet", action="store_true", help="JSON only, no summary lines")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    out = {}
    if a.what in ("all", "sta"):
        out["sta_videomae"] = bench_sta_videomae(r=a.r, depth=a.depth, batch=a.batch, runs=a.runs, warmup=a.warmup,
                                                 device=a.device, dtype=a.dtype,
                                                 policy=a.policy if a.what == "sta" else None)
    if a.what in ("all", "swin"):
        pols = [a.policy] if (a.policy and a.what == "swin") else SWIN_POLICIES
        out["swin"] = bench_swin(pols, frames=a.frames, size=a.image, batch=a.batch, runs=a.runs, warmup=a.warmup,
                                 device=a.device, dtype=a.dtype)
    if not a.quiet:
        for res in out.values():
            print(format_result(res))
    print(json.dumps(out, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


def main_from_args(args) -> dict:
    """Entry for `tokenreduce bench video` (eval/cli.py): --model videomae|swin (default both),
    --policy, --layers (VideoMAE depth), --frames, --image, --batch, --runs, --warmup, --device, --dtype."""
    which = (getattr(args, "model", None) or "all").lower()
    if which == "torchvision:swin3d_t":  # the form `tokenreduce sites` takes
        which = "swin3d_t"
    if which not in ("all", "videomae", "sta", "swin", "swin3d_t", "videoswin"):
        raise ValueError(f"bench video: --model must be videomae or swin (or omitted for both), got {which!r}")
    if args.policy and which == "all":
        raise ValueError("bench video: --policy names one model's sites; give --model videomae or --model swin with it")
    def arg(name, default):  # 0 is a value (refused below), not "use the default"
        value = getattr(args, name, None)
        return default if value is None else value
    frames, image, batch = arg("frames", 16), arg("image", 224), arg("batch", 1)
    out = {}
    if which in ("all", "videomae", "sta"):
        out["sta_videomae"] = bench_sta_videomae(depth=arg("layers", 12), batch=batch, runs=args.runs,
                                                 warmup=args.warmup, device=args.device, dtype=args.dtype,
                                                 policy=args.policy, frames=frames, image=image)
        print(format_result(out["sta_videomae"]))
    if which in ("all", "swin", "swin3d_t", "videoswin"):
        if getattr(args, "layers", None) is not None and which != "all":
            raise ValueError("bench video --model swin: --layers cannot apply (it sets VideoMAE's depth; swin3d_t "
                             "keeps its own stages)")
        pols = [args.policy] if args.policy else SWIN_POLICIES
        out["swin"] = bench_swin(pols, frames=frames, size=image, batch=batch, runs=args.runs, warmup=args.warmup,
                                 device=args.device, dtype=args.dtype)
        print(format_result(out["swin"]))
    return out


if __name__ == "__main__":
    main()
