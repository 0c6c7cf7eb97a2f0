"""`tokenreduce eval sweep`: the baseline and every method at every budget on one video-QA set.

    tokenreduce eval sweep --model embedded --data set.jsonl --frames 8 --out out/sweep \
        --methods fastv,random,uniform,dycoke_ttm,framefusion,frames --budgets 0.25,0.5
    tokenreduce eval sweep ... --policies policies.json      # {"label": "spec", ...} as well / instead

A budget is the fraction of the visual tokens KEPT. `SWEEP_METHODS` maps each method to its
policy at a budget on a LLaVA-OneVision-style model (sites: frames, projector.out, llm.layer.k);
it is the one table other code should import. Methods that have no budget parameter run once.
Each run is a `tokenreduce eval videoqa` run in its own subdirectory (baseline/, fastv_b0.5/,
...), so a sweep resumes like a single run. Then:

  sweep.md / sweep.json      method, budget, accuracy (loglik, generated), visual tokens entering
                             the LLM and after the last reducing site, FLOPs fraction, prefill and
                             TTFT ms
  accuracy_vs_tokens.png     accuracy vs visual tokens after the last reducing site
  speed_vs_tokens.png        TTFT and prefill ms vs the same tokens
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Callable

from tokenreduce.errors import choices


@dataclass(frozen=True)
class SweepMethod:
    """How a method becomes a policy at a budget (fraction of visual tokens kept) and `frames`
    input frames. spec(budget, frames) -> policy string; budgeted=False: one run, budget ignored."""
    spec_at: Callable
    note: str
    budgeted: bool = True

    def spec(self, budget: float | None, frames: int) -> str:
        if self.budgeted and (budget is None or not 0.0 < budget <= 1.0):
            raise ValueError(f"a budget is the fraction of visual tokens kept, in (0, 1]; got {budget!r}")
        return self.spec_at(budget, frames)


def _r(x: float) -> float:
    return round(float(x), 4)


# DyCoke keeps frame 0 of every 4-frame window (a trailing partial window too) whole and prunes
# `ratio` of the others' tokens, so with T frames, w = ceil(T / 4) of them whole, keeping b of
# all tokens needs ratio = (1 - b) * T / (T - w) (reachable down to b = w / T: 1/4 at 8 frames)
def _dycoke(b, frames):
    frames = int(frames)
    whole = -(-frames // 4)
    ratio = 0.0 if frames <= whole else min(1.0, (1.0 - b) * frames / (frames - whole))
    return f"projector.out=dycoke_ttm(ratio={_r(ratio)})"


# ATP's fixed rule keeps the visual tokens whose standardised log redundancy score z exceeds
# alpha: with z about normal, alpha = Phi^-1(1 - b) keeps b of them on average (alpha = 0: half)
def atp_alpha(budget: float) -> float:
    return _r(NormalDist().inv_cdf(1.0 - budget))


def _atp(b, _frames):
    return f"llm.layer.2=atp(alpha={atp_alpha(b)})" if b < 1 else ""


SWEEP_METHODS = {
    "fastv": SweepMethod(lambda b, f: f"llm.layer.2=fastv(ratio={_r(1.0 - b)})" if b < 1 else "",
                         "FastV (Chen et al., ECCV 2024): drops 1 - budget of the visual tokens after LLM layer 2 "
                         "(layers 0-1 see all of them)"),
    "random": SweepMethod(lambda b, f: f"projector.out=random(keep={_r(b)})", "random visual tokens after the projector"),
    "uniform": SweepMethod(lambda b, f: f"projector.out=uniform(keep={_r(b)})",
                           "a spatially even lattice per frame after the projector"),
    "dycoke_ttm": SweepMethod(_dycoke, "DyCoke TTM (Tao et al., CVPR 2025) after the projector; budgets below "
                                       "ceil(T/4)/T are not reachable (frame 0 of each 4-frame window stays; "
                                       "0.25 at 8 frames)"),
    "framefusion": SweepMethod(lambda b, f: f"llm.layer.*=framefusion(cost={_r(b)})",
                               "FrameFusion (Fu et al., ICCV 2025): the budget is its compute `cost` "
                               "(fraction of LLM FLOPs), which it meets by merging and pruning tokens"),
    "frames": SweepMethod(lambda b, f: f"frames=frame_select(k={max(1, round(b * f))}, scorer='uniform')",
                          "fewer frames: round(budget * frames) of the input frames, uniformly (frame_select "
                          "at the `frames` site)"),
    "atp": SweepMethod(_atp,
                       "ATP-LLaVA (Ye et al., CVPR 2025) after LLM layer 2, fixed thresholds: alpha = "
                       "Phi^-1(1 - budget), so the redundancy rule keeps about the budget on average (each "
                       "instance its own count) and the spatial grid adds a few"),
}

# registered methods that cannot run on a LLaVA-OneVision (SigLIP tower: no [CLS]; the adapter
# offers frames / projector.out / llm.layer.k only)
NOT_APPLICABLE = {
    "visionzip": "needs [CLS] attention at vision.out (SigLIP has no [CLS]; no vision.out site on LLaVA-OneVision)",
    "prumerge_plus": "needs [CLS] attention at vision.out (SigLIP has no [CLS]; no vision.out site on LLaVA-OneVision)",
    "vtc_cls": "needs [CLS] attention at vision.out (SigLIP has no [CLS]; no vision.out site on LLaVA-OneVision)",
    "tome": "a ViT-block merger (vision.block sites, not offered for LLaVA-OneVision)",
    "sta": "a video-ViT method (VideoMAE vision.layer sites)",
    "sta_slices": "a VideoSwin method (stage sites)",
}


def plan_runs(methods, budgets, frames: int, policies: dict | None = None, baseline: bool = True) -> list:
    """[(label, method, budget, spec)] in run order: baseline, methods x budgets, custom policies."""
    runs = [("baseline", "baseline", None, "")] if baseline else []
    for m in methods:
        if m not in SWEEP_METHODS:
            why = f" ({NOT_APPLICABLE[m]})" if m in NOT_APPLICABLE else ""
            raise ValueError(f"method {m!r} has no sweep entry{why}; valid: {choices(SWEEP_METHODS)}")
        sm = SWEEP_METHODS[m]
        if not sm.budgeted:
            runs.append((m, m, None, sm.spec(None, frames)))
            continue
        if not budgets:
            raise ValueError(f"{m} needs --budgets (fractions of visual tokens kept, e.g. 0.25,0.5)")
        for b in budgets:
            runs.append((f"{m}_b{b:g}", m, float(b), sm.spec(float(b), frames)))
    for label, spec in (policies or {}).items():
        runs.append((label, label, None, spec))
    runs = [(label, method, budget, _checked_spec(label, spec)) for label, method, budget, spec in runs]
    labels = [r[0] for r in runs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"duplicate run label(s) {dup}: give each policy a distinct label")
    # each run has its own directory under --out: labels must stay apart once made file-safe
    dirs = {}
    for label in labels:
        d = _dirname(label)
        if d in OUTPUT_NAMES:
            raise ValueError(f"run label {label!r} would use the name {d!r}, which the sweep writes itself "
                             f"({', '.join(repr(n) for n in sorted(OUTPUT_NAMES) if n)}); give another label")
        if d in (".", "..") or d in dirs:
            other = f" and {dirs[d]!r}" if d in dirs else ""
            raise ValueError(f"run label {label!r}{other} would use the directory {d!r}; give labels that differ "
                             "in letters, digits, '_', '.', '=' or '-'")
        dirs[d] = label
    return runs


def _checked_spec(label: str, spec) -> str:
    """The run's policy in canonical form (what eval videoqa stores), or a ValueError naming the run."""
    from tokenreduce.errors import TokenReduceError

    from .videoqa import normalise_policy
    try:
        return normalise_policy(spec)
    except (TokenReduceError, ValueError, TypeError) as exc:
        raise ValueError(f"run {label!r}: policy {spec!r}: {exc}") from None


def check_policies_fit(model, runs: list) -> None:
    """Install and remove every run's policy on the model before the first run starts, so a spec
    naming a site the model lacks (or a method its sites cannot host) is refused up front, not
    found as a failed row after the runs before it took their time."""
    import tokenreduce as tr
    from tokenreduce.errors import TokenReduceError
    bad = []
    for label, _method, _budget, spec in runs:
        try:
            tr.reduce(model, spec).remove()
        except TokenReduceError as exc:
            bad.append(f"run {label!r}: policy {spec!r}: {exc}")
    if bad:
        raise ValueError("policies that do not fit the model (nothing was run):\n  " + "\n  ".join(bad))


# what the sweep writes at the top of --out ("" is --out itself): no run directory may take these names
OUTPUT_NAMES = {"", "sweep.md", "sweep.json", "accuracy_vs_tokens.png", "speed_vs_tokens.png", "run.lock"}


def _dirname(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label)


def run_sweep(base_cfg, runs: list, out, qa=None) -> list:
    """Run every (label, method, budget, spec) as an eval videoqa run under out/<label>; returns rows."""
    from .videoqa import EvalConfig, load_dataset, load_qa_model, lock_run_dir, process_state
    state = process_state(base_cfg.get("device", "cpu"))
    out = Path(out)
    if not runs:
        return []
    first = EvalConfig(**{**base_cfg, "out": str(out / _dirname(runs[0][0]))})
    load_dataset(first.data, first.video_root)  # a missing or empty dataset stops the sweep before the model loads
    if qa is None:
        qa = load_qa_model(first.model, first.device, first.dtype)
    check_policies_fit(qa.model, runs)
    # the whole sweep holds OUT/run.lock: a second sweep into the same --out is refused up front,
    # rather than its runs being refused one by one as failed rows
    lock = lock_run_dir(out, state.process_index)
    try:
        return _run_all(base_cfg, runs, out, qa, state)
    finally:
        lock.close()


def _run_all(base_cfg, runs, out, qa, state) -> list:
    from .videoqa import EvalConfig, run_eval
    rows = []
    for label, method, budget, spec in runs:
        cfg = EvalConfig(**{**base_cfg, "out": str(out / _dirname(label)), "policy": spec})
        row = {"label": label, "method": method, "budget": budget, "policy": cfg.policy}
        try:
            s = run_eval(cfg, qa=qa, state=state)
        except Exception as exc:  # noqa: BLE001 - one method failing should not lose the others
            row["failed"] = f"{type(exc).__name__}: {exc}"
            print(f"sweep: {label} failed: {row['failed']}")
            rows.append(row)
            continue
        if s is not None:
            row.update(_summary_fields(s))
        rows.append(row)
    return rows


def _summary_fields(s: dict) -> dict:
    """A sweep row's numbers from a run's summary (run_eval's return value / summary.json)."""
    vt = s["visual_tokens"]
    run = s.get("config") or {}
    return dict(data=run.get("data"), frames=run.get("frames"), n=s["n"], errors=s["errors"],
                acc_loglik=s["loglik"], acc_generated=s["generated"],
                visual_tokens_llm_input=vt["llm_input"], visual_tokens_final=vt["final"],
                flops_fraction=s["flops_fraction"], prefill_ms=s["prefill_ms"], ttft_ms=s["ttft_ms"],
                decode_ms_per_token=s["decode_ms_per_token"], loadavg=s["loadavg_end"])


def _f(v, spec):
    return "-" if v is None else format(v, spec)


def format_table(rows: list) -> str:
    lines = ["| method | budget | n | acc loglik | acc generated | visual tokens LLM in | visual tokens final | "
             "FLOPs frac | prefill ms | TTFT ms | errors | policy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['method']} | {_f(r['budget'], 'g')} | | failed: {r['failed']} | | | | | | | | "
                         f"`{r['policy']}` |")
            continue
        lines.append(f"| {r['method']} | {_f(r['budget'], 'g')} | {r.get('n', '-')} | "
                     f"{_f(r.get('acc_loglik'), '.1%')} | "
                     f"{_f(r.get('acc_generated'), '.1%')} | {_f(r.get('visual_tokens_llm_input'), '.1f')} | "
                     f"{_f(r.get('visual_tokens_final'), '.1f')} | {_f(r.get('flops_fraction'), '.3f')} | "
                     f"{_f(r.get('prefill_ms'), '.1f')} | {_f(r.get('ttft_ms'), '.1f')} | {r.get('errors', '-')} | "
                     f"`{r['policy'] or 'none'}` |")
    mixed = mixed_runs(rows)
    if mixed:
        lines += ["", f"Note: these runs are not on the same samples, so their numbers do not compare: {mixed}."]
    return "\n".join(lines)


def mixed_runs(rows: list) -> str:
    """'' when every finished row ran on the same data, frames and number of samples; else which
    differ (an earlier sweep into the same --out with other settings left its runs there)"""
    ok = [r for r in rows if "failed" not in r]
    parts = []
    for key in ("data", "frames", "n"):
        seen = {}
        for r in ok:
            if r.get(key) is not None:
                seen.setdefault(str(r[key]), []).append(str(r["label"]))
        if len(seen) > 1:
            parts.append(f"{key}: " + "; ".join(f"{v} ({', '.join(labels)})" for v, labels in seen.items()))
    return " / ".join(parts)


def _line_of(method: str) -> str:
    """The plot line of a run: an extra policy labelled like a method's own runs ('fastv_b0.25')
    joins that method's line."""
    m = re.fullmatch(r"(.+)_b[0-9.]+", method)
    return m.group(1) if method not in SWEEP_METHODS and m and m.group(1) in SWEEP_METHODS else method


def plot(rows: list, out) -> list:
    """accuracy_vs_tokens.png and speed_vs_tokens.png; one line per method over its budgets."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = Path(out)
    ok = [r for r in rows if "failed" not in r and r.get("visual_tokens_final") is not None]
    groups = {}
    for r in ok:
        groups.setdefault(_line_of(r["method"]), []).append(r)
    palette = plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors
    colors = dict(zip([g for g in groups if g != "baseline"], palette * (1 + len(groups) // len(palette))))
    paths = []
    panels = {"accuracy_vs_tokens.png": [("acc_loglik", "accuracy (option log-likelihood)"),
                                         ("acc_generated", "accuracy (generated answer)")],
              "speed_vs_tokens.png": [("ttft_ms", "time to first token (ms)"), ("prefill_ms", "prefill (ms)")]}
    for name, metrics in panels.items():
        fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), squeeze=False)
        for ax, (key, ylabel) in zip(axes[0], metrics):
            for method, rs in groups.items():
                pts = sorted((r["visual_tokens_final"], r[key]) for r in rs if r.get(key) is not None)
                if not pts:
                    continue
                x, y = zip(*pts)
                style = dict(marker="*", markersize=12, linestyle="none", color="black") if method == "baseline" \
                    else dict(marker="o", color=colors[method])
                ax.plot(x, y, label=method, **style)
            ax.set_xlabel("visual tokens after the last reducing site (mean)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if key.startswith("acc"):
                ax.set_ylim(-0.02, 1.02)
        labelled = [ax for ax in axes[0] if ax.get_legend_handles_labels()[0]]
        if labelled:
            labelled[0].legend(fontsize=8)
        failed = [str(r["label"]) for r in rows if "failed" in r]
        fig.tight_layout()
        if failed:  # not drawn: say so, rather than let a method vanish
            fig.subplots_adjust(bottom=0.2)
            fig.text(0.01, 0.01, "failed, not drawn: " + ", ".join(failed), fontsize=8, color="firebrick")
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)
    return paths


def load_policies(arg: str | None) -> dict:
    """--policies: a JSON file or an inline JSON object {label: spec}."""
    if not arg:
        return {}
    path = Path(arg)
    if path.is_file():
        text = path.read_text()
    elif path.is_dir():
        raise ValueError(f"--policies {arg}: is a directory; give a JSON file or an inline JSON object {{label: spec}}")
    elif not arg.lstrip().startswith("{") and (arg.endswith((".json", ".yaml", ".yml")) or "/" in arg or "\\" in arg):
        raise FileNotFoundError(f"--policies {arg}: no such file; give a JSON file or an inline JSON object "
                                "{label: spec}")
    else:
        text = arg
    try:
        pol = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f" (file {arg})" if path.is_file() else ""
        raise ValueError(f"--policies must be a JSON file or object {{label: spec}}{where}: {exc}") from None
    if not isinstance(pol, dict) or not all(isinstance(v, str) for v in pol.values()):
        raise ValueError("--policies must map labels to policy spec strings")
    return pol


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .videoqa import add_arguments as videoqa_arguments
    videoqa_arguments(p, single=False)
    p.add_argument("--methods", default="", help=f"comma list of: {', '.join(SWEEP_METHODS)}")
    p.add_argument("--budgets", default="", help="comma list of fractions of visual tokens kept, e.g. 0.25,0.5")
    p.add_argument("--policies", default=None, help="JSON file (or inline object) {label: policy spec}")
    p.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the unreduced run")


def main_from_args(args) -> int:
    from .videoqa import base_config_from_args
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--budgets must be comma-separated numbers in (0, 1], got {args.budgets!r}") from None
    runs = plan_runs(methods, budgets, args.frames, load_policies(args.policies), baseline=args.baseline)
    if not runs:
        raise ValueError("nothing to run: give --methods (with --budgets) and/or --policies")
    rows = run_sweep(base_config_from_args(args), runs, args.out)
    from .videoqa import process_state
    if not process_state(args.device).is_main_process:
        return 0
    write_outputs(rows, args.out)
    failed = [r["label"] for r in rows if "failed" in r]
    if failed:
        print(f"sweep: {len(failed)} of {len(rows)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _label_of_dir(name: str) -> tuple:
    """(method, budget) of a run directory's label, as plan_runs names them."""
    if name == "baseline":
        return "baseline", None
    m = re.fullmatch(r"(.+)_b([0-9.eE+-]+)", name)
    if m and m.group(1) in SWEEP_METHODS:
        try:
            return m.group(1), float(m.group(2))
        except ValueError:
            pass
    return name, None


def earlier_rows(out, skip=()) -> list:
    """Rows of runs already under `out`: those listed in its sweep.json whose directory is still there,
    then finished run directories (summary.json) that it does not list, except the directories in
    `skip` (this invocation's runs: their rows come in its own order)."""
    out = Path(out)
    rows = []
    listed = out / "sweep.json"
    if listed.is_file():
        try:
            old = json.loads(listed.read_text())
        except json.JSONDecodeError as exc:
            print(f"sweep: ignoring the unreadable {listed} ({exc}); its runs are read from their directories")
            old = []
        for r in old if isinstance(old, list) else []:
            if not (isinstance(r, dict) and "label" in r):
                continue
            run = out / _dirname(str(r["label"]))
            if (run / "summary.json").is_file():
                # its numbers from the run's own summary: the run may have been extended or
                # redone since (e.g. a larger --limit) and the listed row be stale
                row = _row_of_run(run, r["label"], r.get("method"), r.get("budget"))
                if row is not None:
                    rows.append(row)
            elif run.is_dir():
                rows.append(r)  # a failed row: its directory holds no summary
    dirs = {_dirname(str(r["label"])) for r in rows} | set(skip)
    for summary in sorted(out.glob("*/summary.json")):
        name = summary.parent.name
        if name not in dirs:
            row = _row_of_run(summary.parent, name, *_label_of_dir(name))
            if row is not None:
                rows.append(row)
    return rows


def _row_of_run(run: Path, label: str, method, budget) -> dict | None:
    """A table row from a finished run directory (summary.json, run.json), or None (with a note)
    when it is not one."""
    try:
        s = json.loads((run / "summary.json").read_text())
        run_cfg = json.loads((run / "run.json").read_text()).get("config", {}) if (run / "run.json").is_file() else {}
        row = {"label": label, "method": method, "budget": budget,
               "policy": run_cfg.get("policy", s.get("policy", ""))}
        row.update(_summary_fields(s))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        print(f"sweep: {run} is not a finished run ({type(exc).__name__}: {exc}); left out of the table")
        return None
    return row


def merge_rows(old: list, new: list, finished=lambda label: False) -> list:
    """`old` with each row of `new` in place of the old row with its label; new labels appended.
    A new failed row does not replace an earlier one whose run is still `finished` (its
    directory still holds its summary): a refused rerun (another config, a lock) left it as it
    was. A rerun that cleared the directory (--overwrite) and then failed does replace it."""
    merged = list(old)
    index = {r["label"]: i for i, r in enumerate(merged)}
    for r in new:
        if r["label"] in index:
            if "failed" in r and "failed" not in merged[index[r["label"]]] and finished(r["label"]):
                continue
            merged[index[r["label"]]] = r
        else:
            index[r["label"]] = len(merged)
            merged.append(r)
    return merged


def write_outputs(rows: list, out) -> list:
    """sweep.md / sweep.json / plots of every run under `out`: `rows` (this invocation's runs) merged
    into the rows of runs an earlier sweep left there. Returns the merged rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = merge_rows(earlier_rows(out, skip={_dirname(str(r["label"])) for r in rows}), rows,
                      finished=lambda label: (out / _dirname(str(label)) / "summary.json").is_file())
    table = format_table(rows)
    (out / "sweep.md").write_text(table + "\n")
    (out / "sweep.json").write_text(json.dumps(rows, indent=2))
    paths = plot(rows, out)
    print(table)
    if mixed_runs(rows):
        print("sweep: warning: the runs under this --out differ in data, frames or samples (see the note "
              "under the table); use a new --out to compare methods", file=sys.stderr)
    print(f"wrote {out / 'sweep.md'}, " + ", ".join(str(p) for p in paths))
    return rows
