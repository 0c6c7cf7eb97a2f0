"""Train ATP's threshold modules (and nothing else) on a frozen LLaVA, on CPU, with accelerate.

    python -m tokenreduce.eval.train_atp --model embedded --budget 0.3 --steps 150 --out DIR
    python -m tokenreduce.eval.train_atp --steps 30 --out DIR            # tiny random LLaVA

--model embedded: the shipped video-QA model (trained, frozen) on fresh synthetic clips (seed
4242 + --seed, never the held-out seed 12345), one ATP stage at llm.layer.2 as in the sweep,
starting from the fixed rule for the budget (alpha = Phi^-1(1 - budget)). Loss: cross-entropy of
the answer among the options + λ_target · |mean kept fraction − budget| over the batch (the
budget holds on average, each instance keeps its own count) + λ_atp · the paper's layer-weighted
kept term. Evaluate with `llm.layer.2=atp(thresholds='learned', weights=DIR/atp_thresholds.safetensors,
alpha=...)` (train_log.json records the policy).

--model tiny (the default) is a pipeline check, not a reproduction. The paper (Ye et al., ATP-LLaVA,
CVPR 2025, arXiv:2412.00447) trains its ATP modules together with the LLM on the LLaVA-1.5
recipe; here a tiny LLaVA (the classes real checkpoints use, random weights, built from a
config) stays frozen, the data are random images with a fixed prompt and a fixed random target
answer, and only the per-layer threshold heads learn. The loss is the ATP loss

    L = L_ntp + λ_atp · Σ_stages (kept_l / n) · l / depth + λ_target · |avg kept / n − target|

(`ATP.budget_loss`; every constant is a [3rd-impl] placeholder, see docs/ALGORITHMS.md §2). During
training ATP keeps every token and hands later layers a soft key mask (size_scale with
proportional attention), so L_ntp reaches the thresholds too. It writes
`atp_thresholds.safetensors` (load with `atp(thresholds='learned', weights=PATH)`) and
`train_log.json` (per-step losses and kept fractions).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

IMG = 100
PAD = 0
PROMPT_HEAD = (5, 6, 7)
PROMPT_TAIL = (8, 9, 10)


def tiny_llava(depth: int = 4, seed: int = 0, attn: str = "sdpa"):
    """A tiny LlavaForConditionalGeneration (CLIP tower 28 px / patch 7 -> 16 image tokens,
    Llama LM of `depth` layers), random weights, eval mode, every parameter frozen."""
    import transformers as tf
    torch.manual_seed(seed)
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                 image_size=28, patch_size=7)
    text = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=depth, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, pad_token_id=PAD)
    cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMG, image_seq_length=16)
    model = tf.LlavaForConditionalGeneration(cfg).eval()
    model.set_attn_implementation(attn)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def synthetic_batch(batch: int, target: torch.Tensor, generator: torch.Generator, n_image_tokens: int = 16):
    """Random images, the fixed prompt, and the fixed target answer appended (teacher forcing).
    Returns (inputs for the model, the positions whose logits predict the target, the target)."""
    pix = torch.randn(batch, 3, 28, 28, generator=generator)
    row = list(PROMPT_HEAD) + [IMG] * n_image_tokens + list(PROMPT_TAIL) + target.tolist()
    ids = torch.tensor([row] * batch)
    L, T = ids.shape[1], target.numel()
    pred_pos = torch.arange(L - T - 1, L - 1)  # logits at these positions predict the target
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pix}, pred_pos


def train(steps: int = 30, out: str | Path | None = None, *, batch: int = 4, lr: float = 0.05, seed: int = 0,
          depth: int = 4, lambda_atp: float | None = None, lambda_target: float | None = None,
          target_fraction: float | None = None, log_every: int = 5, quiet: bool = False) -> dict:
    """Train the ATP threshold heads; returns the log (and writes it plus the weights to `out`)."""
    from accelerate import Accelerator

    import tokenreduce
    from tokenreduce.reducers import atp as atp_mod

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(seed)
    model = tiny_llava(depth=depth, seed=seed)
    reducer = atp_mod.ATP(thresholds="learned", training=True, seed=seed)
    handle = tokenreduce.reduce(model, atp_mod.atp_policy(depth, reducer))  # creates a head per insertion layer
    module = reducer.threshold_module().to(accelerator.device)
    n_params = sum(p.numel() for p in module.parameters())
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    model, opt = accelerator.prepare(model, opt)
    kw = {k: v for k, v in (("lambda_atp", lambda_atp), ("lambda_target", lambda_target),
                            ("target", target_fraction)) if v is not None}
    g = torch.Generator().manual_seed(seed + 1)
    target = torch.randint(11, 99, (4,), generator=g)
    log = {"steps": [], "layers": atp_mod.atp_layers(depth), "params": n_params, "seed": seed, "lr": lr,
           "batch": batch, "depth": depth, **{k: v for k, v in kw.items()}}
    t0 = time.perf_counter()
    for step in range(steps):
        inputs, pred_pos = synthetic_batch(batch, target, g)
        inputs = {k: v.to(accelerator.device) for k, v in inputs.items()}
        logits = model(**inputs).logits
        ntp = F.cross_entropy(logits[:, pred_pos].flatten(0, 1).float(),
                              target.to(logits.device).repeat(batch))
        budget = reducer.budget_loss(**kw)
        loss = ntp + budget
        opt.zero_grad()
        accelerator.backward(loss)
        opt.step()
        kept = float(reducer.kept_fraction().detach().mean())
        entry = {"step": step, "loss": float(loss.detach()), "ntp": float(ntp.detach()), "budget": float(budget.detach()),
                 "kept": kept}
        log["steps"].append(entry)
        if not quiet and (step % log_every == 0 or step == steps - 1):
            accelerator.print(f"step {step:3d}  loss {entry['loss']:.4f}  ntp {entry['ntp']:.4f}  "
                              f"budget {entry['budget']:.5f}  kept {kept:.3f}")
    log["seconds"] = time.perf_counter() - t0
    handle.remove()
    if out is not None and accelerator.is_main_process:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        reducer.save_thresholds(out / "atp_thresholds.safetensors")
        (out / "train_log.json").write_text(json.dumps(log, indent=1))
        log["weights"] = str(out / "atp_thresholds.safetensors")
    return log


EMBEDDED_SEED = 4242  # the training clips' generator (the report's held-out set uses 12345)


def train_on_embedded(steps: int = 150, out: str | Path | None = None, *, budget: float = 0.3, batch: int = 16,
                      lr: float = 0.02, seed: int = 0, layer: int = 2, lambda_atp: float = 0.0,
                      lambda_target: float = 1.0, log_every: int = 10, quiet: bool = False) -> dict:
    """Train ATP's threshold head on the frozen embedded video-QA model toward `budget` kept."""
    from accelerate import Accelerator

    import tokenreduce
    from tokenreduce.reducers import atp as atp_mod

    from .embedded import load_embedded
    from .sweep import atp_alpha

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(seed)
    model, proc = load_embedded()
    for p in model.parameters():
        p.requires_grad_(False)
    alpha = atp_alpha(budget) if budget < 1 else -8.0  # the sweep's fixed rule for this budget
    reducer = atp_mod.ATP(thresholds="learned", training=True, seed=seed, alpha=alpha)
    handle = tokenreduce.reduce(model, tokenreduce.Policy([tokenreduce.Stage(f"llm.layer.{layer}", reducer)]))
    try:
        log = _train_embedded_steps(model, proc, reducer, accelerator, steps, budget=budget, batch=batch, lr=lr,
                                    seed=seed, layer=layer, alpha=alpha, lambda_atp=lambda_atp,
                                    lambda_target=lambda_target, log_every=log_every, quiet=quiet)
    finally:
        handle.remove()
    if out is not None and accelerator.is_main_process:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        weights = (out / "atp_thresholds.safetensors").resolve()  # the policy works from any folder
        reducer.save_thresholds(weights)
        log["weights"] = str(weights)
        log["policy"] = f"llm.layer.{layer}=atp(thresholds='learned', weights={str(weights)!r}, alpha={alpha})"
        (out / "train_log.json").write_text(json.dumps(log, indent=1))
    return log


def _train_embedded_steps(model, proc, reducer, accelerator, steps, *, budget, batch, lr, seed, layer, alpha,
                          lambda_atp, lambda_target, log_every, quiet) -> dict:
    from .synthetic import VideoQAGenerator
    from .train_embedded import make_batch
    module = reducer.threshold_module().to(accelerator.device)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    model, opt = accelerator.prepare(model, opt)
    gen = VideoQAGenerator(seed=EMBEDDED_SEED + seed)
    log = {"model": "embedded", "steps": [], "layer": layer, "budget": budget, "alpha": alpha, "seed": seed,
           "lr": lr, "batch": batch, "lambda_atp": lambda_atp, "lambda_target": lambda_target,
           "params": sum(p.numel() for p in module.parameters())}
    t0 = time.perf_counter()
    for step in range(steps):
        _, inputs, answers, options, _, _ = make_batch(gen, proc, batch, with_labels=False)
        inputs = {k: v.to(accelerator.device) for k, v in inputs.items()}
        logits = model(**inputs).logits[:, -1].float()  # left padded: the last position answers
        options = options.to(logits.device)
        ce = F.cross_entropy(logits.gather(1, options), (options == answers.to(logits.device)[:, None]).float().argmax(1))
        kept = reducer.kept_fraction()
        loss = ce + lambda_target * (kept.mean() - budget).abs()
        if lambda_atp:
            loss = loss + reducer.budget_loss(lambda_atp=lambda_atp, lambda_target=0.0)
        opt.zero_grad()
        accelerator.backward(loss)
        opt.step()
        entry = {"step": step, "loss": float(loss.detach()), "ce": float(ce.detach()),
                 "kept": float(kept.detach().mean())}
        log["steps"].append(entry)
        if not quiet and (step % log_every == 0 or step == steps - 1):
            accelerator.print(f"step {step:3d}  loss {entry['loss']:.4f}  ce {entry['ce']:.4f}  kept {entry['kept']:.3f}")
    log["seconds"] = time.perf_counter() - t0
    return log


def main(argv=None) -> int:
    from .cli import THREADS, check_writable, float_in, int_at_least
    ap = argparse.ArgumentParser(prog="python -m tokenreduce.eval.train_atp", description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("tiny", "embedded"), default="tiny",
                    help="tiny: a random tiny LLaVA (pipeline check); embedded: the shipped video-QA model")
    ap.add_argument("--budget", type=float_in(0, 1, low_open=True), default=None,
                    help="--model embedded: the kept fraction of visual tokens to train toward, in (0, 1]")
    ap.add_argument("--steps", type=int_at_least(1), default=30)
    ap.add_argument("--out", required=True, help="folder for atp_thresholds.safetensors and train_log.json")
    ap.add_argument("--batch", type=int_at_least(1), default=None, help="default 4 (tiny), 16 (embedded)")
    ap.add_argument("--lr", type=float_in(0, low_open=True), default=None, help="default 0.05 (tiny), 0.02 (embedded)")
    ap.add_argument("--seed", type=int_at_least(0), default=0)
    ap.add_argument("--depth", type=int_at_least(2, " (ATP scores from a layer after the first)"), default=4,
                    help="LLM layers of the tiny model")
    ap.add_argument("--lambda-atp", type=float_in(0), default=None)
    ap.add_argument("--lambda-target", type=float_in(0), default=None)
    ap.add_argument("--target", type=float_in(0, 1, low_open=True), default=None,
                    help="target kept fraction, in (0, 1] (default 144/576)")
    ap.add_argument("--threads", type=THREADS, default=1,
                    help="CPU threads for torch (default 1: the tiny model is fastest on one, also on a busy machine; "
                         "0 = torch's default)")
    a = ap.parse_args(argv)
    if a.model == "embedded" and (a.target is not None or a.depth != 4):
        ap.error("--target and --depth belong to --model tiny; with --model embedded give --budget (the kept "
                 "fraction) and the embedded model's own depth is used")
    if a.model == "tiny" and a.budget is not None:
        ap.error("--budget belongs to --model embedded; with --model tiny give --target (the kept fraction)")
    try:
        check_writable(a.out, "--out", folder=True)  # before training, not after it
    except ValueError as exc:
        ap.error(str(exc))
    a.budget = 0.3 if a.budget is None else a.budget
    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        if a.model == "embedded":
            kw = {k: v for k, v in (("lambda_atp", a.lambda_atp), ("lambda_target", a.lambda_target)) if v is not None}
            log = train_on_embedded(a.steps, a.out, budget=a.budget, batch=a.batch or 16, lr=a.lr or 0.02,
                                    seed=a.seed, **kw)
        else:
            log = train(a.steps, a.out, batch=a.batch or 4, lr=a.lr or 0.05, seed=a.seed, depth=a.depth, lambda_atp=a.lambda_atp,
                        lambda_target=a.lambda_target, target_fraction=a.target)
    finally:
        torch.set_num_threads(threads)
    if a.model == "embedded":
        last = log["steps"][-10:]
        print(f"last 10 steps: ce {sum(s['ce'] for s in last) / len(last):.4f}, kept "
              f"{sum(s['kept'] for s in last) / len(last):.3f} (budget {a.budget}; {log['seconds']:.1f} s); "
              f"evaluate with --policy \"{log.get('policy')}\"")
        return 0
    first = [s["budget"] for s in log["steps"][:5]]
    last = [s["budget"] for s in log["steps"][-5:]]
    print(f"budget loss: first-5 mean {sum(first) / len(first):.5f} -> last-5 mean {sum(last) / len(last):.5f} "
          f"({log['seconds']:.1f} s); weights: {log.get('weights')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
