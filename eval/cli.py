"""The `tokenreduce` command line.

    tokenreduce methods
    tokenreduce sites MODEL
    tokenreduce bench vit --model vit_base_patch16_224 --policy "vision.block.*=tome(r=13)"
    tokenreduce quality --out out/quality
    tokenreduce eval videoqa --model embedded --policy "llm.layer.2=fastv(ratio=0.5)" --data set.jsonl --out out/fastv
    tokenreduce eval sweep --model embedded --data set.jsonl --methods fastv,random --budgets 0.3,0.5 --out out/sweep
    tokenreduce eval report --out out/videoqa
    tokenreduce convert nextqa val.csv --videos NExTVideo --out nextqa.jsonl
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def int_at_least(low: int, meaning: str = ""):
    """An argparse type: an int >= low (`meaning` explains the lowest value, e.g. 0 = torch's default)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}{meaning}, got {value}")
        return value
    parse.__name__ = f"int >= {low}"
    return parse


THREADS = int_at_least(0, " (0 = torch's default)")


def float_in(low: float, high: float | None = None, *, low_open: bool = False):
    """An argparse type: a finite float >= low (> low with low_open), and <= high when given; the
    message names the range, e.g. "must be in (0, 1], got 1.5"."""
    if high is None:
        what = f"> {low:g}" if low_open else f">= {low:g}"
    else:
        what = f"in {'(' if low_open else '['}{low:g}, {high:g}]"

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {what}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    parse.__name__ = f"number {what}"
    return parse


def check_writable(path, flag: str, folder: bool = False) -> None:
    """Refuse, before any work, an output path that cannot be written: `folder` (a directory
    to create or fill) or a file whose folder is created if missing."""
    from pathlib import Path
    p = Path(os.path.expanduser(str(path)))
    if p.exists() and folder != p.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: " + ("exists and is not a folder" if folder else
                                                      "is a folder; give a file path"))
    anc = p if folder and p.exists() else p.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise ValueError(f"{flag} {str(path)!r}: {str(anc)!r} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(path)!r}: {str(anc)!r} is not writable")


def check_device(device) -> str:
    """`device` if it names a usable device (cpu, cuda, cuda:N, mps); a ValueError naming the valid
    forms if not (one check for eval and bench alike)."""
    import torch
    text = str(device)
    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown --device {text!r}; valid forms: cpu, cuda, cuda:N") from None
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {text}: MPS is not available on this machine; use --device cpu")
        return text
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text}: not supported here; valid forms: cpu, cuda, cuda:N (mps where available)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text}: CUDA is not available on this machine; use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"--device {text}: this machine has {n} CUDA device(s); valid: "
                             f"{', '.join(f'cuda:{i}' for i in range(n))}")
    return text


def cmd_methods(args) -> int:
    import tokenreduce as tr
    rows = []
    for name, cls in tr.methods().items():
        if name.endswith("_test"):
            continue
        rows.append((name, cls.summary, cls.paper, ", ".join(cls.site_families)))
    if args.json:
        print(json.dumps([dict(zip(("name", "summary", "paper", "sites"), r)) for r in rows], indent=2))
        return 0
    w = max(len(r[0]) for r in rows)
    for name, summary, paper, fams in rows:
        print(f"{name:<{w}}  {summary}\n{'':<{w}}  paper: {paper}\n{'':<{w}}  sites: {fams}")
    return 0


def cmd_sites(args) -> int:
    import tokenreduce as tr
    from tokenreduce.policy import describe_sites
    from .models import load_model
    model = load_model(args.model, meta=True)
    adapter = tr.find_adapter(model)
    sites = adapter(model).sites()
    if args.json:
        print(json.dumps({n: {"family": s.family, "index": s.index, "depth": s.depth,
                              "signals": sorted(s.signals), "structured": s.structured} for n, s in sites.items()},
                         indent=2))
        return 0
    print(f"{args.model}: adapter {adapter.name} ({adapter.family})")
    print(f"sites: {describe_sites(sites)}")
    seen = set()
    for s in sites.values():
        key = (s.family, tuple(sorted(s.signals)), s.structured)
        if key in seen:
            continue
        seen.add(key)
        extra = f"  ({s.note})" if s.note else ""
        print(f"  {s.family:<14} signals: {', '.join(sorted(s.signals)) or '-'}"
              f"{'  [structured plans only]' if s.structured else ''}{extra}")
    return 0


# flags of `bench` that only some benchmarks take: flag -> (attribute, the benchmarks that take it)
BENCH_ONLY = {"--frames": ("frames", ("vlm", "video")), "--layers": ("layers", ("vlm", "video")),
              "--vision-layers": ("vision_layers", ("vlm",)), "--decode-tokens": ("decode_tokens", ("vlm",)),
              "--policies": ("policies", ("vlm",)), "--sdpa": ("sdpa", ("vlm",)),
              "--cuda-graph": ("cuda_graph", ("vit",)), "--compile": ("compile", ("vit",))}


def cmd_bench(args) -> int:
    import torch

    unused = [flag for flag, (attr, takers) in BENCH_ONLY.items()
              if args.what not in takers and getattr(args, attr, None) is not None]
    if unused:
        takes = ["--model", "--policy", "--batch", "--image", "--runs", "--warmup", "--device", "--dtype",
                 "--threads", "--json"] + [f for f, (_, takers) in BENCH_ONLY.items() if args.what in takers]
        raise ValueError(f"bench {args.what}: {', '.join(unused)} cannot apply "
                         f"({'; '.join(f'{f} is for bench ' + ' / '.join(BENCH_ONLY[f][1]) for f in unused)}); "
                         f"it takes {', '.join(takes)}")
    check_device(args.device)
    if args.json:
        check_writable(args.json, "--json")
    if args.policy is not None and not str(args.policy).strip():
        raise ValueError(f"bench {args.what}: --policy is empty; give a spec (e.g. \"vision.block.*=tome(r=13)\"), "
                         "or leave --policy out for the default")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "vit":
        from .bench import bench_vit, format_vit, write_json
        res = bench_vit(args.model or "vit_base_patch16_224", args.policy or "vision.block.*=tome(r=13)",
                        batch=8 if args.batch is None else args.batch, runs=args.runs, warmup=args.warmup,
                        device=args.device, dtype=args.dtype, image=args.image, cuda_graph=bool(args.cuda_graph),
                        compile=args.compile or False)
        print(format_vit(res))
    else:
        try:
            import importlib
            mod = importlib.import_module(f"tokenreduce.eval.bench_{args.what}")
        except ImportError:
            print(f"benchmark {args.what!r} is not available; valid: vit, vlm, video", file=sys.stderr)
            return 2
        if args.batch is None:
            args.batch = 1
        res = mod.main_from_args(args)
        from .bench import write_json
    if args.json:
        write_json(res, args.json)
        print(f"wrote {args.json}")
    return 0


def cmd_quality(argv) -> int:
    """its own parser (eval/quality.py) takes every option; --out defaults to out/quality"""
    from . import quality
    return quality.main(list(argv), prog="tokenreduce quality", default_out="out/quality")


def cmd_eval(args) -> int:
    import torch
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    if args.what == "videoqa":
        from . import videoqa
        return videoqa.main_from_args(args)
    from . import sweep
    return sweep.main_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenreduce", description="Visual-token reduction for ViTs, VLMs and video models.")
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("methods", help="list the registered reduction methods")
    m.add_argument("--json", action="store_true")
    m.set_defaults(fn=cmd_methods)
    from .models import MODEL_SPEC_FORMS
    s = sub.add_parser("sites", help="list the sites of a model", description=f"MODEL: {MODEL_SPEC_FORMS}")
    s.add_argument("model")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_sites)
    b = sub.add_parser("bench", help="baseline vs reduced wall-clock benchmark",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Baseline vs reduced wall-clock medians (interleaved rounds), the analytic FLOPs "
                                   "fraction and the load average.\n"
                                   "  vit    a timm ViT (random weights), --policy against the unreduced model\n"
                                   "  vlm    a LLaVA-OneVision-0.5B-shaped model (random weights, batch 1): prefill, "
                                   "TTFT, decode, KV bytes\n"
                                   "         for --policy, or for fastv / framefusion / dycoke_ttm / random / uniform "
                                   "at a 70% cut\n"
                                   "  video  STA on a VideoMAE-B-shaped model and sta_slices on swin3d_t "
                                   "(--model videomae or swin: one of them)")
    b.add_argument("what", choices=["vit", "vlm", "video"])
    b.add_argument("--model", default=None,
                   help="vit: a timm model name (default vit_base_patch16_224); video: videomae or swin (default "
                        "both); vlm builds its own")
    b.add_argument("--policy", default=None,
                   help="default: vision.block.*=tome(r=13) (vit), the method list (vlm), each model's STA "
                        "policies (video)")
    pos = int_at_least(1)
    b.add_argument("--batch", type=pos, default=None, help="batch size (default: 8 for vit, 1 for vlm / video)")
    b.add_argument("--image", type=pos, default=None, help="input resolution (default: the model's)")
    b.add_argument("--runs", type=pos, default=10, help="timed rounds (default: %(default)s)")
    b.add_argument("--warmup", type=int_at_least(0), default=3, help="untimed rounds first (default: %(default)s)")
    b.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    b.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    b.add_argument("--threads", type=THREADS, default=0, help="torch threads (0 = torch's default)")
    b.add_argument("--json", default=None, help="write the result as JSON here")
    b.add_argument("--frames", type=pos, default=None, help="video frames (vlm, video)")
    b.add_argument("--layers", type=pos, default=None, help="LLM layers (vlm) / encoder layers (video)")
    b.add_argument("--vision-layers", dest="vision_layers", type=pos, default=None, help="vision tower layers (vlm)")
    b.add_argument("--decode-tokens", dest="decode_tokens", type=pos, default=None,
                   help="tokens to decode (vlm; default 8)")
    b.add_argument("--policies", default=None, help='JSON {"name": "spec", ...} (vlm; default: fastv, framefusion, dycoke_ttm, random, uniform at a 70%% cut)')
    b.add_argument("--cuda-graph", dest="cuda_graph", action="store_const", const=True, default=None,
                   help="vit: time both models as CUDA-graph replays (no Python or launch overhead; for a "
                        "forward that reads nothing back to the host: ToMe with a fixed r, vtc_cls with a fixed keep, "
                        "uniform on whole frames, random)")
    b.add_argument("--sdpa", default=None, choices=["auto", "flash", "efficient", "cudnn", "math"],
                   help="vlm: pin the attention kernel (default auto, torch's choice; a CPU has flash and math)")
    b.add_argument("--compile", dest="compile", nargs="?", const="default", default=None, metavar="MODE",
                   help="vit: time both models under torch.compile, MODE default, reduce-overhead (CUDA "
                        "graphs on a GPU), max-autotune or max-autotune-no-cudagraphs (the reduction makes "
                        "torch.compile guard on module hooks, so the baseline's compiled code is not reused "
                        "for the reduced model)")
    b.set_defaults(fn=cmd_bench)
    sub.add_parser("quality", add_help=False,
                   help="real DINOv2-S: linear-probe accuracy / CLS cosine / FLOPs / speed per policy "
                        "(tokenreduce quality --help)")
    e = sub.add_parser("eval", help="video-QA accuracy and cost of a policy (videoqa), or of many (sweep)")
    esub = e.add_subparsers(dest="what", required=True)
    from . import sweep, videoqa  # their parsers; models and data load only when a run starts
    v = esub.add_parser("videoqa", help="one policy on a video-QA JSONL (resumable)",
                        description=videoqa.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    videoqa.add_arguments(v)
    v.set_defaults(fn=cmd_eval)
    w = esub.add_parser("sweep", help="baseline + methods x budgets, table and plots",
                        description=sweep.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_arguments(w)
    w.set_defaults(fn=cmd_eval)
    esub.add_parser("report", add_help=False,
                    help="the main command: every method on the embedded model + the target checks "
                         "(tokenreduce eval report --help)")
    sub.add_parser("convert", add_help=False,
                   help="convert NExT-QA / MVBench / Video-MME / EgoSchema annotations to the video-QA JSONL "
                        "(tokenreduce convert --help)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["convert"]:  # its own parser (eval/videoqa_data.py) takes everything after the word
            from .videoqa_data import convert_main
            return convert_main(argv[1:])
        if argv[:1] == ["quality"]:
            return cmd_quality(argv[1:])
        if argv[:2] == ["eval", "report"]:  # its own parser (eval/videoqa_report.py)
            from .videoqa_report import main as report_main
            return report_main(argv[2:])
        args = build_parser().parse_args(argv)
        return args.fn(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # show a user error as one line, not a traceback
        from tokenreduce.errors import TokenReduceError
        if isinstance(exc, ModuleNotFoundError) and exc.name and not exc.name.startswith("tokenreduce"):
            extra = _EXTRAS.get(exc.name.split(".")[0])
            hint = f"pip install 'tokenreduce[{extra}]'" if extra else f"pip install {exc.name.split('.')[0]}"
            print(f"tokenreduce: error: this command needs {exc.name.split('.')[0]}, which is not installed "
                  f"({hint}; 'tokenreduce[all]' has every extra)", file=sys.stderr)
            return 2
        if isinstance(exc, (TokenReduceError, ValueError, OSError)):
            print(f"tokenreduce: error: {exc}", file=sys.stderr)
            return 2
        raise


# an optional dependency's module -> the extra (pyproject.toml) that installs it
_EXTRAS = {"transformers": "hf", "timm": "timm", "torchvision": "timm", "open_clip": "clip", "decord": "video",
           "av": "video", "gradio": "demo", "PIL": "demo", "accelerate": "eval", "matplotlib": "eval",
           "tqdm": "eval", "sklearn": "eval", "skimage": "eval", "pandas": "eval", "pyarrow": "eval",
           "onnxruntime": "eval", "lmms_eval": "lmms"}


if __name__ == "__main__":
    sys.exit(main())
