"""`tokenreduce bench vlm`: baseline vs reducers on a LLaVA-OneVision-0.5B-shaped model.

A real-size config (SigLIP-so400m tower + Qwen2-0.5B decoder, 8 frames x 196 tokens) with random
weights: speed does not depend on the weights. For each policy we measure the LLM prefill time,
time to first token (vision tower + projector + LLM prefill + first logits), decode tokens/s,
KV-cache bytes, peak memory (CUDA) and analytic FLOPs. Rounds interleave the policies so machine
load hits all alike; medians are reported with the load average. `--frames` and `--layers` shrink
it to fit a few minutes on a CPU.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import tokenreduce as tr

from .bench import check_counts, check_device, machine, sync, write_json

# 70% visual-token cut, for the methods that run on a SigLIP (no [CLS]) video model
DEFAULT_POLICIES = {
    "baseline": "",
    "fastv": "llm.layer.2=fastv(ratio=0.7)",
    "framefusion": "llm.layer.*=framefusion(cost=0.3)",
    "dycoke_ttm": "projector.out=dycoke_ttm(ratio=0.7)",
    "random": "projector.out=random(keep=0.3)",
    "uniform": "projector.out=uniform(keep=0.3)",
}


def onevision_config(frames=8, vision_layers=27, llm_layers=24):
    import transformers as tf
    vision = tf.SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=vision_layers,
                                   num_attention_heads=16, image_size=384, patch_size=14)
    text = tf.Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=llm_layers, num_attention_heads=14,
                          num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                          tie_word_embeddings=True)
    return tf.LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=151646,
                                   video_token_index=151647, vision_feature_select_strategy="full",
                                   vision_feature_layer=-1)


def build(frames, vision_layers, llm_layers, device, dtype):
    import transformers as tf
    torch.manual_seed(0)
    cfg = onevision_config(frames, vision_layers, llm_layers)
    with torch.device(device):
        model = tf.LlavaOnevisionForConditionalGeneration(cfg)
    model = model.to(dtype=dtype).eval()
    model.set_attn_implementation("sdpa")
    return model


def make_inputs(model, frames, device, dtype, text=24):
    cfg = model.config
    per = (cfg.vision_config.image_size // cfg.vision_config.patch_size + 1) // 2  # 27 -> 14 after 2x pooling
    n_video = frames * per * per + 1
    g = torch.Generator().manual_seed(0)
    pre = torch.randint(1000, 2000, (8,), generator=g).tolist()
    post = torch.randint(1000, 2000, (text,), generator=g).tolist()
    ids = torch.tensor([pre + [cfg.video_token_index] * n_video + post], device=device)
    video = torch.randn(1, frames, 3, 384, 384, generator=g).to(device=device, dtype=dtype)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": video}, n_video - 1


class _Timer:
    """Wall time of one module's forwards inside a call (synchronised on CUDA)."""

    def __init__(self, module, device):
        self.device, self.ms = device, 0.0
        self.h = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, *a):
        sync(self.device)
        self.t0 = time.perf_counter()

    def _post(self, *a):
        sync(self.device)
        self.ms += (time.perf_counter() - self.t0) * 1e3

    def remove(self):
        for h in self.h:
            h.remove()


def kv_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            total += t.numel() * t.element_size()
    return total


def measure_once(model, inputs, decode_tokens, device) -> dict:
    lm = model.model.language_model
    timer = _Timer(lm, device)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            out.logits[:, -1].argmax(-1)
        sync(device)
        ttft = (time.perf_counter() - t0) * 1e3
        prefill = timer.ms
        cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
        kv = kv_bytes(cache)
        # decode: greedy steps on the cache, as generate() does, timed alone
        mask = inputs["attention_mask"]
        nxt = out.logits[:, -1:].argmax(-1)
        sync(device)
        t1 = time.perf_counter()
        with torch.inference_mode():
            for _ in range(decode_tokens):
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
                step = model(input_ids=nxt, attention_mask=mask, cache=cache, use_cache=True)
                nxt = step.logits[:, -1:].argmax(-1)
        sync(device)
        decode_ms = (time.perf_counter() - t1) * 1e3
        del out, cache
    finally:
        timer.remove()
    peak = torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else None
    return {"ttft_ms": ttft, "prefill_ms": prefill, "decode_tok_s": decode_tokens / (decode_ms / 1e3),
            "kv_bytes": kv, "peak_bytes": peak}


SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
SDPA_ON_CPU = ("auto", "flash", "math")


def sdpa_backend(name: str, device):
    """A context that pins scaled_dot_product_attention to one kernel ("auto": torch's choice).
    On an H100 torch picks cuDNN for bf16, which builds an execution graph per new key length:
    a decode step of a reduced model (several key lengths) may pay that more often."""
    from contextlib import nullcontext
    valid = SDPA_ON_CPU if torch.device(device).type == "cpu" else SDPA_BACKENDS
    if name not in valid:
        raise ValueError(f"--sdpa {name!r} is not available on {device}; valid: {', '.join(valid)}")
    if name == "auto":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kinds = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([kinds[name]])


def bench_vlm(frames=8, vision_layers=27, llm_layers=24, policies=None, runs=3, warmup=1, decode_tokens=8,
              device="cpu", dtype="float32", sdpa="auto") -> dict:
    """policies: {name: spec}; the unreduced "baseline" is always measured (first). Policies the
    caller gave must all run (an error names the bad one); of the built-in DEFAULT_POLICIES, one
    whose method cannot run here (when installed, or on this input, e.g. --frames 1 for a method
    that prunes frames) is skipped with a message."""
    check_counts(frames=frames, vision_layers=vision_layers, layers=llm_layers, runs=runs, warmup=warmup,
                 decode_tokens=decode_tokens)
    check_device(device)
    sdpa_backend(sdpa, device)  # refuse a kernel the device lacks before building anything
    dt = getattr(torch, dtype)
    given = policies is not None
    policies = dict(DEFAULT_POLICIES if policies is None else policies)
    if str(policies.get("baseline", "") or "").strip().lower() not in ("", "none", "baseline"):
        raise ValueError(f"the policy name 'baseline' is kept for the unreduced model (got {policies['baseline']!r}); "
                         "give this policy another name")
    policies = {"baseline": "", **{k: v for k, v in policies.items() if k != "baseline"}}
    parsed = {}
    for name, spec in policies.items():  # parse every spec before building the model
        try:
            parsed[name] = tr.Policy.coerce(spec)
        except tr.TokenReduceError as exc:
            if given:
                raise ValueError(f"policy {name!r} ({spec!r}): {exc}") from None
            print(f"skipping {name}: {exc}")
    model = build(frames, vision_layers, llm_layers, device, dt)
    inputs, n_visual = make_inputs(model, frames, device, dt)
    available = {}
    for name, policy in parsed.items():
        try:
            # parsed once: every round installs the same reducers, so what they build lazily on
            # first use (a frame scorer, say) is built in the warm-up, not in each timed run
            tr.reduce(model, policy).remove()
            available[name] = policy
        except tr.TokenReduceError as exc:  # a method that cannot run here (e.g. not yet registered)
            if given:
                raise ValueError(f"policy {name!r} ({policies[name]!r}) cannot run on the LLaVA-OneVision-shaped "
                                 f"model: {exc}") from None
            print(f"skipping {name}: {exc}")
    samples = {n: [] for n in available}
    stats = {}
    for r in range(warmup + runs):
        for name, spec in list(available.items()):
            h = tr.reduce(model, spec) if spec else None
            try:
                with sdpa_backend(sdpa, device):
                    m = measure_once(model, inputs, decode_tokens, device)
                if h is not None:
                    stats[name] = h.stats
            except tr.TokenReduceError as exc:  # a method that cannot take this input (e.g. a single frame)
                if given:
                    raise ValueError(f"policy {name!r} ({policies[name]!r}) failed on the LLaVA-OneVision-shaped "
                                     f"model: {exc}") from None
                print(f"skipping {name}: {exc}")
                del available[name], samples[name]
                stats.pop(name, None)
                continue
            finally:
                if h is not None:
                    h.remove()
            if r >= warmup:
                samples[name].append(m)
    rows = {}
    for name, ms in samples.items():
        med = {k: (statistics.median(v[k] for v in ms) if ms[0][k] is not None else None) for k in ms[0]}
        st = stats.get(name, {})
        med["flops_fraction"] = st.get("flops_fraction", 1.0)
        med["llm_input_tokens"] = st.get("llm_input_tokens")
        med["reducer_ms"] = st.get("reducer_ms", 0.0)
        rows[name] = med
    base = rows["baseline"]
    for name, row in rows.items():
        row["prefill_speedup"] = base["prefill_ms"] / row["prefill_ms"]
        row["ttft_speedup"] = base["ttft_ms"] / row["ttft_ms"]
        row["decode_speedup"] = row["decode_tok_s"] / base["decode_tok_s"]
        # the spread of the speed-ups measured in the same round (methods run interleaved, so a
        # round shares the machine's state): a host-bound GPU prefill moves by a third between
        # rounds, and a median ratio alone hides that
        pairs = list(zip(samples["baseline"], samples[name]))
        for key, ratio in (("prefill", lambda b, m: b["prefill_ms"] / m["prefill_ms"]),
                           ("ttft", lambda b, m: b["ttft_ms"] / m["ttft_ms"]),
                           ("decode", lambda b, m: m["decode_tok_s"] / b["decode_tok_s"])):
            paired = [ratio(b, m) for b, m in pairs]
            row[f"{key}_speedup_range"] = [min(paired), max(paired)]
        row["kv_saving"] = 1.0 - row["kv_bytes"] / base["kv_bytes"]
        # the reducers run before the LLM too (projector.out, frames): a share of the time to first token
        row["reducer_share_of_ttft"] = row["reducer_ms"] / row["ttft_ms"]
    return {"benchmark": "vlm", "model": "LLaVA-OneVision-0.5B-shaped (random weights)", "frames": frames,
            "visual_tokens": n_visual, "vision_layers": vision_layers, "llm_layers": llm_layers, "device": device,
            "dtype": dtype, "sdpa": sdpa, "runs": runs, "decode_tokens": decode_tokens,
            "policies": {n: p.to_spec() for n, p in available.items()}, "results": rows,
            "machine": machine()}


def format_table(res: dict) -> str:
    lines = [f"{res['model']}: {res['frames']} frames, {res['visual_tokens']} visual tokens, vision {res['vision_layers']} "
             f"/ LLM {res['llm_layers']} layers, {res['device']} {res['dtype']}"
             f"{'' if res.get('sdpa', 'auto') == 'auto' else ', sdpa ' + res['sdpa']}, median of {res['runs']}, "
             f"load {res['machine']['loadavg']}",
             "| method | LLM tokens | prefill ms | prefill x | TTFT ms | TTFT x | decode tok/s | decode x | KV MB | "
             "KV saved | FLOPs frac | reducer % of TTFT |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(r, key):  # the median, and the range of the per-round ratios when there are several
        lo, hi = r.get(f"{key}_speedup_range", (None, None))
        return f"{r[f'{key}_speedup']:.2f}" + ("" if lo is None or res["runs"] < 2 else f" ({lo:.2f}-{hi:.2f})")
    for name, r in res["results"].items():
        toks = "-" if r["llm_input_tokens"] is None else f"{r['llm_input_tokens']:.0f}"
        lines.append(f"| {name} | {toks} | {r['prefill_ms']:.0f} | {ratio(r, 'prefill')} | {r['ttft_ms']:.0f} | "
                     f"{ratio(r, 'ttft')} | {r['decode_tok_s']:.1f} | {ratio(r, 'decode')} | "
                     f"{r['kv_bytes'] / 2**20:.1f} | {r['kv_saving']:.0%} | {r['flops_fraction']:.3f} | "
                     f"{100 * r['reducer_share_of_ttft']:.2f} |")
    if res["runs"] > 1:
        lines.append("x: speed-up, the baseline's median over the method's (in brackets: the lowest and highest "
                     "of the speed-ups measured within one round)")
    return "\n".join(lines)


def parse_policies(text: str) -> dict:
    """--policies: a JSON object {name: spec}."""
    try:
        pol = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f'--policies must be a JSON object {{name: spec}}, e.g. \'{{"fastv": '
                         f'"llm.layer.2=fastv(ratio=0.5)"}}\': {exc} in {text!r}') from None
    if not isinstance(pol, dict):
        raise ValueError(f"--policies must be a JSON object {{name: spec}}, got a JSON {type(pol).__name__}: {text!r}")
    bad = [k for k, v in pol.items() if not isinstance(v, str)]
    if bad:
        raise ValueError(f"--policies must be a JSON object {{name: spec}} with spec strings; not a string: "
                         f"{', '.join(repr(k) for k in bad)}")
    return pol


def main_from_args(args) -> dict:
    """`tokenreduce bench vlm`: --policy SPEC runs that policy against the baseline (default: every
    method of DEFAULT_POLICIES); the model is the OneVision-shaped one built here, batch 1."""
    unused = [flag for flag, given in (("--model", getattr(args, "model", None)), ("--image", getattr(args, "image", None)),
                                       ("--batch", (getattr(args, "batch", 1) or 1) != 1)) if given]
    if unused:
        raise ValueError(f"bench vlm builds its own LLaVA-OneVision-0.5B-shaped model at batch 1: {', '.join(unused)} "
                         "cannot apply; it takes --frames, --vision-layers, --layers, --policy, --policies, --runs, "
                         "--warmup, --decode-tokens, --sdpa, --device, --dtype, --threads, --json")
    policies = parse_policies(args.policies) if getattr(args, "policies", None) is not None else None
    if getattr(args, "policy", None):
        if policies is not None and "policy" in policies:
            raise ValueError("--policies already has a policy named 'policy'; put the --policy spec in --policies "
                             "under another name")
        policies = {**(policies or {}), "policy": args.policy}

    def arg(name, default):  # 0 is a value (refused by bench_vlm), not "use the default"
        value = getattr(args, name, None)
        return default if value is None else value
    res = bench_vlm(frames=arg("frames", 8), vision_layers=arg("vision_layers", 27), llm_layers=arg("layers", 24),
                    runs=args.runs, warmup=args.warmup, device=args.device, dtype=args.dtype,
                    decode_tokens=arg("decode_tokens", 8), policies=policies, sdpa=arg("sdpa", "auto"))
    print(format_table(res))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    from .cli import int_at_least
    pos = int_at_least(1)
    p.add_argument("--frames", type=pos, default=8)
    p.add_argument("--vision-layers", dest="vision_layers", type=pos, default=27)
    p.add_argument("--layers", type=pos, default=24, help="LLM layers")
    p.add_argument("--runs", type=pos, default=3)
    p.add_argument("--warmup", type=int_at_least(0), default=1)
    p.add_argument("--decode-tokens", dest="decode_tokens", type=pos, default=8)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--policies", default=None, help='JSON {"name": "spec", ...}')
    p.add_argument("--sdpa", default="auto", choices=SDPA_BACKENDS, help="attention kernel (default: torch's choice)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    res = main_from_args(args)
    if args.json:
        write_json(res, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
