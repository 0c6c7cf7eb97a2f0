"""Wall-clock benchmarks that print ratios (baseline vs reduced in one process, interleaved).

Timings on a shared machine are noisy: runs of the two models alternate, the first runs are
thrown away, and we report medians together with os.getloadavg().
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

import tokenreduce as tr

from .cli import check_device  # noqa: F401  (bench_vlm / bench_video import it from here)
from .models import call_vision, image_size, load_model, patch_size


def check_counts(**counts) -> None:
    """ValueError unless every count is an int >= 1 (warmup: >= 0)."""
    for name, value in counts.items():
        low = 0 if name == "warmup" else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be a whole number >= {low}, got {value!r}")


def check_fits_patches(size: int, patch: int, name: str) -> None:
    """--image must be a multiple of the model's patch side; the error names the two nearest sizes."""
    if size % patch:
        lower = max(1, size // patch) * patch
        raise ValueError(f"--image {size}: {name} cuts images into {patch}x{patch} patches, so the size must be a "
                         f"multiple of {patch} (e.g. {lower} or {lower + patch})")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict, runs: int, warmup: int, device) -> dict:
    """Median milliseconds of each callable, runs interleaved so load changes hit all alike."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    sync(device)
    times = {k: [] for k in fns}
    for _ in range(runs):
        for k, f in fns.items():
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def machine() -> dict:
    info = {"loadavg": [round(v, 2) for v in os.getloadavg()], "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def cuda_graphed(fn, device):
    """`fn` (no arguments, fixed input tensors) captured once in a CUDA graph; the returned callable
    replays it. Kernel launches and the Python of the hooks are paid once, at capture, which is
    what a GPU too fast for its host needs. Only a forward that neither reads values back to the
    host nor copies from it can be captured (ToMe with a fixed r; vtc_cls with a fixed `keep`;
    uniform on whole frames; random, whose CPU draw the warm-up copies to the device, once): ATP,
    PruMerge+, FrameFusion and uniform after another reduction read counts or indices back; their
    capture fails with a ValueError saying so."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = fn()
    except RuntimeError as exc:
        raise ValueError(f"--cuda-graph: the forward cannot be captured in a CUDA graph ({str(exc).splitlines()[0]}); "
                         "a captured forward may neither read values back to the host (ATP, PruMerge+, FrameFusion "
                         "and uniform after another reduction read counts or indices) nor copy from it") from None

    def replay():
        graph.replay()
        return out
    return replay


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def first_tensor(out):
    """The first tensor of a model's output (a tensor, a tuple, or a transformers ModelOutput)."""
    while not torch.is_tensor(out):
        out = out[0]
    return out


def max_abs_diff(out, reference) -> float:
    """Largest absolute difference between the first tensors of two model outputs."""
    return float((first_tensor(out) - first_tensor(reference)).abs().max())


def bench_vit(model="vit_base_patch16_224", policy="vision.block.*=tome(r=13)", batch=8, runs=10, warmup=3,
              device="cpu", dtype="float32", image=None, cuda_graph=False, compile=False) -> dict:
    """Baseline vs reduced ms/batch, speed-up, analytic FLOPs fraction, tokens per layer.
    cuda_graph: time both models as CUDA-graph replays (no host overhead); compile: both under
    torch.compile (True, or a mode of COMPILE_MODES). Either way the reduced model's output is
    checked against its eager forward."""
    check_counts(batch=batch, runs=runs, warmup=warmup, **({} if image is None else {"image": image}))
    mode = "default" if compile is True else compile or None
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"--compile {mode!r}: not a torch.compile mode; valid: {', '.join(COMPILE_MODES)}")
    if cuda_graph and compile:
        raise ValueError("give --cuda-graph or --compile, not both (each times the models its own way: graph "
                         "replays of the eager forward, or torch.compile's code)")
    check_device(device)
    if cuda_graph and torch.device(device).type != "cuda":
        raise ValueError(f"--cuda-graph needs a CUDA device (--device cuda), got --device {device}")
    if isinstance(model, str):
        name, model = model, load_model(model, image=image)
    else:
        name = type(model).__name__
    adapter = tr.find_adapter(model)
    if adapter.name in ("hf_llava", "videomae", "videoswin"):
        raise ValueError(f"bench vit times an image encoder; {name} is a {adapter.family} model (use bench vlm "
                         "for vision-language models, bench video for video models)")
    size = image_size(model) if image is None else image
    patch = patch_size(model)
    if image is not None and patch:  # a model's own size may be off the grid (timm rounds down)
        check_fits_patches(size, patch, name)
    dt = getattr(torch, dtype)
    model = model.to(device=device, dtype=dt).eval()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dt)
    if image is not None:  # one small forward: a model built for another size says so here, in one line
        try:
            with torch.inference_mode():
                call_vision(model, x[:1])
        except (AssertionError, RuntimeError, ValueError) as exc:
            raise ValueError(f"--image {size}: {name} does not take {size}x{size} images (it was built for "
                             f"{image_size(model)}x{image_size(model)}): {exc}") from None
    reduced = copy.deepcopy(model)
    handle = tr.reduce(reduced, policy)
    load_before = machine()

    def run(m):
        # capture and torch.compile take no inference tensors
        with torch.no_grad() if cuda_graph or compile else torch.inference_mode():
            return call_vision(m, x)
    fns = {"baseline": lambda: run(model), "reduced": lambda: run(reduced)}
    graph_error = None
    if cuda_graph or compile:
        eager = run(reduced)
        # the counts are the eager forward's; a replay runs no Python and compiled code times no
        # reducer (that first forward's time is mostly one-off set-up, not a timing)
        stats = dict(handle.stats, reducer_ms=None)
    if cuda_graph:
        fns = {k: cuda_graphed(f, device) for k, f in fns.items()}
        graph_error = max_abs_diff(fns["reduced"](), eager)
        ms = time_interleaved(fns, runs, warmup, device)
    elif compile:
        # the installed reduction makes dynamo guard on hooks (tokenreduce.reduce), so the
        # baseline's compiled code is not reused for the reduced copy; "reduce-overhead" replays
        # CUDA graphs on a GPU
        fns = {k: torch.compile(f, mode=mode) for k, f in fns.items()}
        graph_error = max_abs_diff(fns["reduced"](), eager)
        ms = time_interleaved(fns, runs, warmup, device)
    else:
        ms = time_interleaved(fns, runs, warmup, device)
        stats = handle.stats
    frac = stats.get("flops_fraction", 1.0)
    speedup = ms["baseline"] / ms["reduced"]
    out = {
        "benchmark": "vit", "model": name, "policy": handle.policy.to_spec(), "batch": batch, "image": size,
        "device": str(device), "dtype": dtype, "runs": runs, "warmup": warmup, "cuda_graph": bool(cuda_graph),
        "compile": mode or False, "graph_vs_eager_max_abs": graph_error, "baseline_ms": round(ms["baseline"], 2), "reduced_ms": round(ms["reduced"], 2),
        "speedup": round(speedup, 3), "flops_fraction": round(frac, 4),
        "flops_bound_speedup": round(1.0 / frac, 3), "speedup_vs_flops_bound": round(speedup * frac, 3),
        "reducer_ms": None if stats["reducer_ms"] is None else round(stats["reducer_ms"], 3), "tokens": stats.get("tokens"),
        "machine_before": load_before, "machine_after": machine(),
    }
    handle.remove()
    return out


def format_vit(res: dict) -> str:
    lines = [
        f"model {res['model']}  batch {res['batch']}  {res['image']}px  {res['device']} {res['dtype']}"
        + ("  (CUDA-graph replays; reduced graph vs eager max |diff| "
           f"{res['graph_vs_eager_max_abs']:.2e})" if res.get("cuda_graph") else "")
        + (f"  (torch.compile, mode {res['compile']}; reduced compiled vs eager max |diff| "
           f"{res['graph_vs_eager_max_abs']:.2e})" if res.get("compile") else ""),
        f"policy {res['policy']}",
        f"baseline {res['baseline_ms']:.1f} ms/batch   reduced {res['reduced_ms']:.1f} ms/batch   "
        f"speed-up {res['speedup']:.2f}x",
        f"FLOPs fraction {res['flops_fraction']:.3f}  (FLOPs-bound speed-up {res['flops_bound_speedup']:.2f}x; "
        f"measured / bound = {res['speedup_vs_flops_bound']:.2f})",
        f"tokens per layer {res['tokens']}",
        (("time in reducers: not timed in compiled code" if res.get("compile") else
          "time in reducers: none in a replay (their Python ran once, at capture)") if res["reducer_ms"] is None
         else f"time in reducers {res['reducer_ms']:.2f} ms/forward"),
        f"load average {res['machine_before']['loadavg']} -> {res['machine_after']['loadavg']}",
    ]
    return "\n".join(lines)


def write_json(res, path) -> None:
    """write a benchmark result, creating the folder (README's `--json out/vit.json` on a fresh clone)"""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
