"""The summary of a video-QA run: accuracy overall and per category, visual tokens per site,
FLOPs, timings, memory and load average (summary.json), and its Markdown table (summary.md)."""
from __future__ import annotations

import json
import os
from pathlib import Path

# meta keys whose values group the accuracy table (the converters and the synthetic set write them)
CATEGORY_KEYS = ("qtype", "task", "type", "task_type", "duration", "domain")


def _mean(values) -> float | None:
    v = [float(x) for x in values if x is not None]
    return sum(v) / len(v) if v else None


def _accuracy(rows: list, scoring=("loglik", "generate")) -> dict:
    ok = [r for r in rows if "error" not in r]
    out = {"n": len(rows), "scored": len(ok), "errors": len(rows) - len(ok)}
    for key, how, flag in (("loglik", "loglik", "loglik_correct"), ("generated", "generate", "generated_correct")):
        # errors count as wrong: accuracy is over every sample, not only the scored ones (a run
        # whose every sample failed scores 0, not "-"); None only for a scoring not asked for
        asked = how in scoring or any(flag in r for r in ok)
        out[key] = (sum(bool(r.get(flag)) for r in ok) / len(rows)) if asked and rows else None
    return out


def _ran_like(row: dict, cfg) -> bool:
    """whether a result row was timed with this run's --batch and device type (a row written before
    rows recorded them: its memory kind says the device; its --batch is unknown, so it counts)"""
    import torch
    kind = row.get("peak_mem_kind") or ""
    device = row.get("device") or ("cuda" if kind.startswith("cuda") else "cpu" if kind.startswith("cpu") else None)
    return row.get("batch", cfg.batch) == cfg.batch and device in (None, torch.device(cfg.device).type)


def summarise(rows: list, cfg, wall_s: float | None = None, loadavg_start=None) -> dict:
    ok = [r for r in rows if "error" not in r]
    summary = {"config": cfg.identity(), **_accuracy(rows, cfg.scoring)}
    cats = {}
    for key in CATEGORY_KEYS:
        groups = {}
        for r in rows:
            v = (r.get("meta") or {}).get(key)
            if v is not None:
                groups.setdefault(str(v), []).append(r)
        if groups:
            cats[key] = {k: _accuracy(g, cfg.scoring) for k, g in sorted(groups.items())}
    summary["by_category"] = cats
    vt = [r["visual_tokens"] for r in ok if "visual_tokens" in r]
    site_names = list(dict.fromkeys(s for v in vt for s in v["sites"]))
    summary["visual_tokens"] = {
        **{k: _mean(v[k] for v in vt) for k in ("input", "llm_input", "final")},
        "sites": {s: {m: _mean(v["sites"][s].get(m) for v in vt if s in v["sites"])
                      for m in ("visual_in", "visual_out", "frames_in", "frames_out")
                      if any(m in v["sites"].get(s, {}) for v in vt)} for s in site_names}}
    summary["flops_fraction"] = _mean(r.get("flops_fraction") for r in ok)
    # times and memory only from rows run like this run: a resume with another --batch or device
    # would mix per-batch with per-sample times, or CPU RSS with CUDA allocations
    timed = [r for r in ok if _ran_like(r, cfg)]
    summary["timed_rows"] = len(timed)
    summary["timed_with"] = {"batch": cfg.batch, "device": str(cfg.device)}
    for k in ("prefill_ms", "llm_prefill_ms", "ttft_ms", "decode_ms_per_token", "kv_bytes"):
        summary[k] = _mean(r.get(k) for r in timed)
    peaks = [r["peak_mem_bytes"] for r in timed if r.get("peak_mem_bytes") is not None]
    summary["peak_mem_bytes"] = max(peaks) if peaks else None
    summary["peak_mem_kind"] = next((r["peak_mem_kind"] for r in timed if r.get("peak_mem_kind")), None)
    from .bench import machine
    summary["machine"] = machine()
    summary["loadavg_start"] = [round(v, 2) for v in loadavg_start] if loadavg_start else None
    summary["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    summary["wall_s_this_run"] = wall_s
    return summary


def _fmt(v, spec=".1f", scale=1.0):
    return "-" if v is None else format(v * scale, spec)


def format_summary(s: dict) -> str:
    c = s["config"]
    vt = s["visual_tokens"]
    mem = "-" if s["peak_mem_bytes"] is None else f"{s['peak_mem_bytes'] / 2**20:.0f} MiB ({s['peak_mem_kind']})"
    lines = [f"video-QA: model {c['model']}, policy `{c['policy'] or 'none (baseline)'}`, {c['frames']} frames"
             f"{', frame selection ' + c['frame_select'] if c['frame_select'] else ''}, data {c['data']}",
             "",
             "| n | errors | acc loglik | acc generated | visual tokens in / LLM / final | FLOPs frac | "
             "prefill ms | TTFT ms | decode ms/tok | peak mem |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| {s['n']} | {s['errors']} | {_fmt(s['loglik'], '.1%')} | {_fmt(s['generated'], '.1%')} | "
             f"{_fmt(vt['input'], '.0f')} / {_fmt(vt['llm_input'], '.0f')} / {_fmt(vt['final'], '.0f')} | "
             f"{_fmt(s['flops_fraction'], '.3f')} | {_fmt(s['prefill_ms'])} | {_fmt(s['ttft_ms'])} | "
             f"{_fmt(s['decode_ms_per_token'], '.2f')} | {mem} |"]
    if vt["sites"]:
        lines += ["", "| site | visual in | visual out | frames in | frames out |", "|---|---|---|---|---|"]
        for name, m in vt["sites"].items():
            lines.append(f"| {name} | {_fmt(m.get('visual_in'))} | {_fmt(m.get('visual_out'))} | "
                         f"{_fmt(m.get('frames_in'))} | {_fmt(m.get('frames_out'))} |")
    for key, groups in s["by_category"].items():
        lines += ["", f"| {key} | n | errors | acc loglik | acc generated |", "|---|---|---|---|---|"]
        for name, a in groups.items():
            lines.append(f"| {name} | {a['n']} | {a['errors']} | {_fmt(a['loglik'], '.1%')} | "
                         f"{_fmt(a['generated'], '.1%')} |")
    scored = s.get("scored", s["n"] - s["errors"])
    timed = s.get("timed_rows", scored)
    w = s.get("timed_with") or {}
    lines += ["", f"load average {s['loadavg_start']} -> {s['loadavg_end']}; torch threads "
                  f"{s['machine']['torch_threads']}; accuracy counts errors as wrong"
                  + (f"; times and memory over the {timed} of {scored} scored samples run with batch "
                     f"{w.get('batch', '?')} on {w.get('device', '?')} (earlier runs of this directory used other "
                     "settings)" if timed != scored else "")]
    return "\n".join(lines)


def write_summary(out, summary: dict) -> None:
    out = Path(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(format_summary(summary) + "\n")
