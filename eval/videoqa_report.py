"""The main command: video-QA on the embedded model for the baseline and every method that runs
on it, at two budgets, plus the checks that show the model tells methods apart.

    tokenreduce eval report --out out/videoqa            # about 6 min on a 2-core CPU

Data: the held-out synthetic set the embedded model was scored on while training (seed 12345,
question types in turn, 8 frames) and a set of 32-frame brief-appearance clips (seed 777) for
frame selection, both rendered deterministically into OUT/data (lossless MP4 + JSONL).
Runs (each an `eval videoqa` directory, so a rerun resumes):
  sweep/          baseline + every SWEEP_METHODS entry at --budgets, plus the controls:
                  FastV keeping the LEAST-attended half, FastV and random at 25% and 10% kept
  frames/         brief-appearance clips, 8 of 32 frames: uniform sampling vs query-aware
                  frame selection (VLMScorer: the model's own p(True) per frame, Hu et al. 2025)
Writes OUT/report.md + report.json (the targets, met or not, with the numbers), the sweep table
and plots (sweep/sweep.md, accuracy_vs_tokens.png, speed_vs_tokens.png).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .sweep import SWEEP_METHODS, plan_runs, run_sweep, write_outputs
from .synthetic import QTYPES, write_dataset

HELD_OUT_SEED = 12345   # the seed train_embedded scores its held-out accuracy on
BRIEF_SEED = 777
CONTROLS = {
    "fastv_least_b0.5": "llm.layer.2=fastv(ratio=0.5, attended='least')",
    "fastv_b0.25": "llm.layer.2=fastv(ratio=0.75)",
    "random_b0.25": "projector.out=random(keep=0.25)",
    "fastv_b0.1": "llm.layer.2=fastv(ratio=0.9)",
    "random_b0.1": "projector.out=random(keep=0.1)",
}


def report_runs(budgets: str) -> list:
    """The sweep's runs for --budgets "0.3,0.5": baseline, every method at each budget, and the
    controls the target checks need unless a budget already gives them (--budgets 0.25 runs
    fastv_b0.25 once)."""
    try:
        values = [float(b) for b in budgets.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--budgets {budgets!r}: give fractions of the visual tokens kept, e.g. 0.3,0.5") from None
    have = {label for label, *_ in plan_runs(list(SWEEP_METHODS), values, 8)}
    return plan_runs(list(SWEEP_METHODS), values, 8, {k: v for k, v in CONTROLS.items() if k not in have})


def ensure_dataset(root: Path, name: str, num: int, seed: int, frames: int, qtypes) -> Path:
    """render the set once; reuse it when the JSONL already has `num` records"""
    path = root / f"{name}.jsonl"
    if path.exists() and sum(1 for _ in open(path)) == num:
        return path
    return write_dataset(root, num, seed=seed, frames=frames, qtypes=list(qtypes), name=name)


def _row(rows, label):
    return next((r for r in rows if r["label"] == label and "failed" not in r), None)


def _acc(row, key="acc_loglik"):
    return None if row is None else row.get(key)


def check_targets(rows: list, frame_rows: dict, baseline_summary: dict) -> list:
    """[(target, met: bool | None, detail)] for the issue's targets"""
    out = []
    base = _acc(_row(rows, "baseline"))
    by_type = {k: v["loglik"] for k, v in baseline_summary.get("by_category", {}).get("qtype", {}).items()}
    out.append(("unreduced held-out accuracy >= 90%", base is not None and base >= 0.9,
                f"{base:.1%} overall; " + ", ".join(f"{k} {v:.1%}" for k, v in by_type.items()) if base is not None
                else "baseline missing"))
    most, least = _acc(_row(rows, "fastv_b0.5")), _acc(_row(rows, "fastv_least_b0.5"))
    out.append(("least-attended half scores clearly below FastV's half (>= 5 points)",
                None if None in (most, least) else most - least >= 0.05,
                f"FastV {most:.1%} vs least-attended {least:.1%}" if None not in (most, least) else "missing"))
    for b, pruned in (("0.25", "75%"), ("0.1", "90%")):
        f, r = _acc(_row(rows, f"fastv_b{b}")), _acc(_row(rows, f"random_b{b}"))
        out.append((f"FastV beats random at {pruned} pruning", None if None in (f, r) else f > r,
                    f"FastV {f:.1%} vs random {r:.1%}" if None not in (f, r) else "missing"))
    u, q = frame_rows.get("uniform"), frame_rows.get("query")
    out.append(("query-aware frame selection beats uniform at 8 of 32 frames (brief-appearance questions)",
                None if None in (u, q) else q > u,
                f"query-aware (vlm) {q:.1%} vs uniform {u:.1%}" if None not in (u, q) else "missing"))
    ff = _acc(_row(rows, "framefusion_b0.3"))
    out.append(("FrameFusion at cost 0.3 keeps >= 97% of the unreduced accuracy",
                None if None in (ff, base) else ff >= 0.97 * base,
                f"{ff:.1%} = {ff / base:.1%} of {base:.1%}" if None not in (ff, base) and base else "missing"))
    return out


def format_report(targets, rows, frame_rows, baseline_summary, info) -> str:
    lines = ["# Video-QA on the embedded model", "",
             f"Model: {info.get('params', '?')} parameters, trained "
             f"{info.get('total_train_seconds', info.get('train_seconds', '?'))} s "
             f"({info.get('total_samples_seen', info.get('samples_seen', '?'))} samples"
             f"{', %d stages' % len(info['stages']) if len(info.get('stages') or []) > 1 else ''}); "
             f"held-out accuracy at the end of training: "
             f"{info.get('held_out', {}).get('all', float('nan')):.1%}.", "",
             "## Targets", "", "| target | met | measured |", "|---|---|---|"]
    for name, met, detail in targets:
        lines.append(f"| {name} | {'yes' if met else ('no' if met is not None else '?')} | {detail} |")
    lines += ["", "## Sweep (option log-likelihood and generated-answer accuracy)", "",
              (Path(info["sweep_dir"]) / "sweep.md").read_text().strip(), "",
              "## Frame selection: brief-appearance clips, 8 of 32 frames", "",
              "| sampling | accuracy |", "|---|---|"]
    for k, v in frame_rows.items():
        lines.append(f"| {k} | {'-' if v is None else f'{v:.1%}'} |")
    lines += ["", f"load average at the end: {[round(x, 2) for x in os.getloadavg()]}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    from .cli import THREADS, int_at_least
    p = argparse.ArgumentParser(prog="tokenreduce eval report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/videoqa")
    p.add_argument("--model", default="embedded")
    p.add_argument("--per-type", dest="per_type", type=int_at_least(1), default=50,
                   help="held-out samples per question type")
    p.add_argument("--brief", type=int_at_least(1), default=100,
                   help="32-frame brief-appearance clips for frame selection")
    p.add_argument("--budgets", default="0.3,0.5", help="fractions of the visual tokens kept")
    p.add_argument("--threads", type=THREADS, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--overwrite", action="store_true",
                   help="discard earlier results under --out (needed after the model's weights changed: runs "
                        "are only resumed with the same weights)")
    args = p.parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from .embedded import embedded_info
    from .videoqa import EvalConfig, load_qa_model, run_eval

    runs = report_runs(args.budgets)  # checked before anything is rendered or loaded
    out = Path(args.out)
    data = out / "data"
    held_out = ensure_dataset(data, "heldout", args.per_type * len(QTYPES), HELD_OUT_SEED, 8, QTYPES)
    brief = ensure_dataset(data, "brief32", args.brief, BRIEF_SEED, 32, ["brief_color"])
    qa = load_qa_model(args.model)
    # the embedded model answers with one word: 3 new tokens give the answer plus a decode-time figure
    base = dict(data=str(held_out), model=args.model, frames=8, progress=args.progress, max_new_tokens=3,
                overwrite=args.overwrite)
    rows = run_sweep(base, runs, out / "sweep", qa=qa)
    write_outputs(rows, out / "sweep")
    baseline_summary = json.loads((out / "sweep" / "baseline" / "summary.json").read_text())

    frame_rows = {}
    for label, extra in (("uniform", {}), ("query", dict(frame_select="vlm", candidates=32))):
        cfg = EvalConfig(**{**base, "data": str(brief), "out": str(out / "frames" / label), **extra})
        s = run_eval(cfg, qa=qa)
        frame_rows[label] = s["loglik"]
    targets = check_targets(rows, frame_rows, baseline_summary)
    info = {**embedded_info(), "sweep_dir": str(out / "sweep")}
    report = format_report(targets, rows, frame_rows, baseline_summary, info)
    (out / "report.md").write_text(report + "\n")
    (out / "report.json").write_text(json.dumps(
        {"targets": [dict(target=t, met=m, measured=d) for t, m, d in targets], "sweep": rows,
         "frame_selection": frame_rows, "baseline": baseline_summary}, indent=2))
    print(report)
    print(f"wrote {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
