"""Video QA with fewer tokens: a Gradio demo over the embedded video-QA model.

    python demos/video_qa.py                  # http://127.0.0.1:7860, the trained embedded model when present
    python demos/video_qa.py --model tiny     # random-init model, no weights needed (fast; also TOKENREDUCE_DEMO_MODEL=tiny)
    python demos/video_qa.py --weights DIR    # a directory written by python -m tokenreduce.eval.train_embedded
    python demos/video_qa.py --host 0.0.0.0 --port 8000 --max-file-mb 10 --max-seconds 60

Pick a bundled synthetic clip (rendered at start into a temporary directory by
`tokenreduce.eval.synthetic`, with its question and options) or upload a video and type a
question and options; choose a token policy (method + budget, or a one-line spec) and optional
frame selection. The page shows the frames selected, a heat map of the LLM tokens kept per
frame (which of each frame's 4x4 pooled tokens survived, from `handle.trace` at projector.out
and the llm.layer sites), the answer with and without reduction, and speed and token counts.

The model is the embedded LLaVA-OneVision (`tokenreduce.eval.embedded`): 64x64 frames, 16 LLM
tokens per frame, a word-level vocabulary covering the synthetic questions. Weights, in order:
--weights DIR, eval/assets/embedded_videoqa/ (shipped), /tmp/emb_run (a training run in
progress), else random init with an "UNTRAINED" notice (answers are then meaningless).

Frame selection runs before the model (`tokenreduce.eval.frame_select.select_frames`):
"uniform" spreads k frames evenly; "vlm" asks the unreduced model itself, frame by frame,
"Does this frame help answer the question?" (p(True); Hu et al., CVPR 2025). The answer
"without reduction" always sees every decoded frame and every token.
"""
from __future__ import annotations

import os
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DemoInputError, WithReference, parse_policy_text, base_parser, check_args, check_upload_size, error_markdown,  # noqa: E402
                     figure_to_array, interleaved_medians, launch, load_average, model_choice, model_lock,
                     upscale, use_agg)

TRAINING_RUN_DIR = Path("/tmp/emb_run")   # where a training run in progress writes its weights
DEFAULT_FRAMES = 8                        # the embedded model is trained on 8-frame clips
MAX_FRAMES_READ = 32
DEFAULT_MAX_SECONDS = 120.0
DEFAULT_MAX_TOTAL_FRAMES = 3600
MAX_FRAME_PIXELS = 3840 * 2160       # one frame: up to 4K UHD
MAX_DECODED_PIXELS = 100_000_000     # all frames read at once (about 300 MB as RGB)
MAX_QUESTION_CHARS = 300
SAMPLE_SEED = 2024
VIDEO_METHODS = ("none", "uniform", "random", "dycoke_ttm", "fastv", "framefusion", "atp")
METHOD_HELP = {
    "none": "the unreduced model",
    "uniform": "projector.out: a spatially even subset per frame",
    "random": "projector.out: a random subset",
    "dycoke_ttm": "projector.out: drop tokens similar to the same patch in the window's first frame "
                  "(frame 0 of each 4-frame window stays whole, so budgets below 0.25 keep 0.25)",
    "fastv": "llm.layer.2: drop the visual tokens the last token attends to least",
    "framefusion": "llm.layer.* (every layer, as the paper): merge similar tokens of consecutive frames, then "
                   "prune; budget = cost",
    "atp": "llm.layer.2: adaptive thresholds; the budget sets alpha = Phi^-1(1 - budget), so about that "
           "fraction is kept",
}
FRAME_SELECTION = ("off", "uniform", "vlm")


# -- model ---------------------------------------------------------------------------------------
@dataclass
class VideoModel(WithReference):
    model: object
    processor: object
    label: str
    trained: bool

    @property
    def tokens_per_frame(self) -> int:
        return self.processor.tokens_per_frame

    @property
    def vocabulary(self) -> set:
        return set(self.processor.tokenizer.get_vocab())


def load_video_model(choice: str = "best", weights: str | None = None) -> VideoModel:
    """The embedded model: --weights DIR, the shipped assets, a training run's output, or random init."""
    from tokenreduce.eval.embedded import (ASSET_DIR, EmbeddedProcessor, build_config, build_model,
                                           build_tokenizer, load_embedded)
    if choice != "tiny":
        candidates = [Path(weights)] if weights else [ASSET_DIR, TRAINING_RUN_DIR]
        for path in candidates:
            if (path / "model.safetensors").exists():
                model, processor = load_embedded(path)
                return VideoModel(model, processor, f"embedded video-QA model (trained, {path})", True)
        if weights:
            raise SystemExit(f"--weights {weights}: no model.safetensors there")
    tok = build_tokenizer()
    cfg = build_config(tok)
    return VideoModel(build_model(cfg).eval(), EmbeddedProcessor(tok, cfg),
                      "embedded video-QA model (random weights, UNTRAINED)", False)


# -- inputs --------------------------------------------------------------------------------------
def make_samples(out_dir) -> list:
    """One synthetic clip per question type, rendered into out_dir: [dict(name, video, question,
    options, answer)]."""
    import json

    from tokenreduce.eval.synthetic import QTYPES, write_dataset

    jsonl = write_dataset(out_dir, num=len(QTYPES), seed=SAMPLE_SEED, frames=DEFAULT_FRAMES, name="demo")
    out = []
    for line in Path(jsonl).read_text().splitlines():
        rec = json.loads(line)
        out.append(dict(name=f"{rec['meta']['qtype']}: {rec['question']}", video=str(Path(out_dir) / rec["video"]),
                        question=rec["question"], options=rec["options"], answer=rec["options"][rec["answer"]]))
    return out


def load_video(path: str, num_frames: int, max_bytes: int | None = None, max_seconds: float = DEFAULT_MAX_SECONDS,
               max_total_frames: int = DEFAULT_MAX_TOTAL_FRAMES):
    """(frames (T, H, W, 3) uint8, meta) of `num_frames` frames spread over the video, or a
    DemoInputError saying what is wrong (unreadable, too long, too large)."""
    from tokenreduce.eval.video import VideoDecodeError, read_frames, video_info

    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise DemoInputError(f"{name}: no such file")
    check_upload_size(path, max_bytes)
    if isinstance(num_frames, bool) or not 1 <= int(num_frames) <= MAX_FRAMES_READ:
        raise DemoInputError(f"frames to read must be between 1 and {MAX_FRAMES_READ}, got {num_frames!r}")
    try:
        info = video_info(path)
    except VideoDecodeError as exc:
        raise DemoInputError(f"{name} is not a video this demo can read: {_short(str(exc), path)}") from None
    total, fps = int(info.get("total") or 0), info.get("fps")
    seconds = total / fps if fps else None
    if total > max_total_frames or (seconds is not None and seconds > max_seconds):
        length = f"{total} frames" + (f" ({seconds:.1f} s)" if seconds is not None else "")
        raise DemoInputError(f"{name} is too long: {length}; this demo takes videos of at most {max_seconds:g} s "
                             f"and {max_total_frames} frames")
    size = _frame_size(path)
    n = min(int(num_frames), total) if total else int(num_frames)  # a short clip: its own frames, not repeats
    if size is not None:
        w, h = size
        if w * h > MAX_FRAME_PIXELS or n * w * h > MAX_DECODED_PIXELS:
            raise DemoInputError(f"{name} is {w} x {h} pixels per frame; this demo takes frames of at most "
                                 f"{MAX_FRAME_PIXELS / 1e6:.1f} megapixels and {MAX_DECODED_PIXELS // 10**6} "
                                 f"megapixels over all frames read ({n} here); the model sees 64 x 64")
    try:
        frames, meta = read_frames(path, num_frames=n)
    except VideoDecodeError as exc:
        raise DemoInputError(f"{name} could not be decoded: {_short(str(exc), path)}") from None
    return frames, meta


def _frame_size(path: str):
    """(width, height) of the video's frames from its stream header (nothing decoded), or None"""
    try:
        import av

        from tokenreduce.eval.video import _video_stream
        with av.open(path) as c:
            st = _video_stream(c)
            return int(st.codec_context.width), int(st.codec_context.height)
    except Exception:  # noqa: BLE001 - the decoder reports unreadable files itself
        return None


def _short(message: str, path: str) -> str:
    """A decoder message without the server's temporary path."""
    return message.replace(repr(str(path)), repr(os.path.basename(path))).replace(str(path), os.path.basename(path))


def parse_options(text, vocabulary: set) -> list:
    """'red, green, blue' -> ['red', 'green', 'blue']; each option must be one word the model knows."""
    opts = [o.strip() for o in (text if isinstance(text, list) else str(text or "").split(",")) if o.strip()]
    if not 2 <= len(opts) <= 5:
        raise DemoInputError(f"give 2 to 5 answer options separated by commas, got {len(opts)}")
    twice = [o for o in dict.fromkeys(opts) if opts.count(o) > 1]
    if twice:  # equal options score equally: which twin "wins" would be the order, not the model
        raise DemoInputError(f"option(s) {', '.join(map(repr, twice))} given twice; options must differ")
    unknown = [o for o in opts if o not in vocabulary]
    if unknown:
        from tokenreduce.eval.synthetic import COLOR_NAMES, NUMBERS, QUADRANTS
        raise DemoInputError(f"option(s) {', '.join(map(repr, unknown))} are not words the embedded model knows; "
                             f"it answers with one word, e.g. a colour ({', '.join(COLOR_NAMES)}), a quadrant "
                             f"({', '.join(QUADRANTS)}) or a number ({', '.join(NUMBERS)})")
    return opts


def parse_question(text, tokenizer) -> str:
    """The question in the model's words: lower-cased (the vocabulary is), every word known; the
    embedded model reads unknown words as <unk>, so they are named instead of silently dropped."""
    q = str(text or "").strip().lower()
    if not q:
        raise DemoInputError("type a question")
    if len(q) > MAX_QUESTION_CHARS:  # the model's questions are a few words; a long one only blocks the queue
        raise DemoInputError(f"the question is {len(q)} characters; this demo takes at most {MAX_QUESTION_CHARS}")
    enc = tokenizer(q, add_special_tokens=False, return_offsets_mapping=True)
    unknown = [q[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == tokenizer.unk_token_id]
    specials = [t for t in ("<video>", "<image>") if t in q]
    if unknown or specials:
        from tokenreduce.eval.synthetic import VideoQAGenerator
        examples = sorted({VideoQAGenerator(seed=i).sample(qt)["question"]
                           for i, qt in enumerate(("region_color", "first_color", "start_end", "count", "brief_color"))})
        bad = ", ".join(map(repr, dict.fromkeys(unknown + specials)))
        raise DemoInputError(f"the embedded model does not know {bad}; it reads only the synthetic questions' "
                             f"words, e.g. {'; '.join(examples)}")
    return q


def policy_spec(method: str, keep: float) -> str:
    """The one-line spec for a method and a budget (`keep`: fraction of the visual tokens kept):
    the eval sweep's own mapping (tokenreduce.eval.sweep.SWEEP_METHODS), so a budget means the same
    here as in the report (DyCoKe's ratio solved for the budget, FrameFusion at every layer)."""
    from tokenreduce.eval.sweep import SWEEP_METHODS
    if method not in VIDEO_METHODS:
        raise DemoInputError(f"unknown method {method!r}; valid: {', '.join(VIDEO_METHODS)}")
    if not 0.0 < float(keep) <= 1.0:
        raise DemoInputError(f"budget must be a fraction in (0, 1] of the visual tokens kept, got {keep!r}")
    if method == "none":
        return ""
    return SWEEP_METHODS[method].spec(round(float(keep), 3), DEFAULT_FRAMES)


build_policy = parse_policy_text


# -- trace -> kept tokens per frame --------------------------------------------------------------
def _site_key(site: str) -> tuple:
    parts = site.split(".")
    if site == "frames":
        return (0, 0)
    if site == "projector.out":
        return (1, 0)
    if parts[0] == "llm":
        return (2, int(parts[2]))
    return (3, 0)


def kept_tokens_per_frame(trace: dict, n_frames: int, tokens_per_frame: int, video_offset: int,
                          site: str | None = None) -> np.ndarray:
    """(n_frames, tokens_per_frame) float: at `site` (default: the last reducing site), the size
    of the surviving token at each frame's pooled-token cell; 0 = dropped. Sample 0 of the batch.

    Positions in the trace: at `projector.out`, the index among the video's visual tokens
    (frame-major, then one image_newline token, whose frame is -1); at `llm.layer.K`, the
    position in the LLM's input sequence, which is shorter when projector.out reduced first
    (then that index runs over projector.out's survivors). `frame` always names the frame of the
    video the model received (after an in-model `frames` selection: that video's frame index).
    """
    grid = np.zeros((n_frames, tokens_per_frame), np.float32)
    if not trace:
        grid[:] = 1.0
        return grid
    site = site or max(trace, key=_site_key)
    if site not in trace:
        raise KeyError(f"site {site!r} not in the trace; traced: {', '.join(trace)}")
    tr = trace[site]
    if site == "frames":
        for f in tr["pos"][0].tolist():
            grid[f] = 1.0
        return grid
    pos = tr["pos"][0].cpu().numpy()
    frame = tr["frame"][0].cpu().numpy()
    size = tr["size"][0].float().cpu().numpy()
    ok = frame >= 0
    if tr.get("valid") is not None:
        ok &= tr["valid"][0].cpu().numpy().astype(bool)
    pos, frame, size = pos[ok], frame[ok], size[ok]
    if site.startswith("llm."):
        v = pos - video_offset
        if "projector.out" in trace:
            v = trace["projector.out"]["pos"][0].cpu().numpy()[v]
        pos = v
    patch = pos % tokens_per_frame
    grid[frame, patch] = size
    return grid


# -- running -------------------------------------------------------------------------------------
@dataclass
class VideoResult:
    spec: str
    frames: np.ndarray                  # every decoded frame (T, H, W, 3)
    selected: np.ndarray                # indices (into frames) the model saw with reduction
    kept: np.ndarray                    # (len(selected), tokens_per_frame) sizes, 0 = dropped
    kept_site: str
    options: list
    probs_full: np.ndarray
    probs_reduced: np.ndarray
    word_full: str
    word_reduced: str
    tokens: dict = field(default_factory=dict)
    flops_fraction: float = 1.0
    ms_full: float = 0.0
    ms_reduced: float = 0.0
    ms_select: float = 0.0
    selection: str = "off"
    load: str = ""

    @property
    def answer_full(self) -> str:
        return self.options[int(np.argmax(self.probs_full))]

    @property
    def answer_reduced(self) -> str:
        return self.options[int(np.argmax(self.probs_reduced))]


def _fraction(flops, flops_full) -> float:
    """Reduced FLOPs over the unreduced model's on every decoded frame (the stats' own
    flops_fraction is relative to the frames the reduced run received, after selection)."""
    return float(flops) / float(flops_full) if flops and flops_full else 1.0


def _option_probs(logits, option_ids) -> np.ndarray:
    import torch
    return torch.softmax(logits[option_ids].float(), -1).cpu().numpy()


def run_video_qa(vm: VideoModel, frames: np.ndarray, question: str, options: list, spec: str,
                 selection: str = "off", k: int = 4, repeats: int = 3) -> VideoResult:
    """Answer with the unreduced model on every frame, then with frame selection + the policy;
    time both (interleaved medians of the prefill, which produces the answer word)."""
    import time

    import torch

    import tokenreduce
    from tokenreduce.errors import TokenReduceError
    from tokenreduce.eval.frame_scorers import VLMScorer
    from tokenreduce.eval.frame_select import select_frames

    question = parse_question(question, vm.processor.tokenizer)
    if selection not in FRAME_SELECTION:
        raise DemoInputError(f"unknown frame selection {selection!r}; valid: {', '.join(FRAME_SELECTION)}")
    T = len(frames)
    if selection != "off" and not (isinstance(k, (int, np.integer)) and 1 <= k <= T):
        raise DemoInputError(f"frames to keep must be between 1 and {T} (the frames read), got {k!r}")
    policy = build_policy(spec)
    proc, model = vm.processor, vm.model
    tok = proc.tokenizer
    option_ids = tok.convert_tokens_to_ids(options)
    prompt = proc.prompt(question, options)

    with model_lock(), torch.no_grad():
        reference = vm.reference  # copied before any reduction is installed on `model`
        full_inputs = proc(text=[prompt], videos=[frames])
        with tokenreduce.reduce(model, "") as empty:  # no stages: only counts the unreduced model's FLOPs
            full_logits = model(**full_inputs).logits[0, -1]
            flops_full = empty.stats.get("flops")
        t0 = time.perf_counter()
        if selection == "off":
            idx = np.arange(T)
        else:
            scorer = "uniform" if selection == "uniform" else VLMScorer(model, proc, pixel_mean=None, pixel_std=None)
            _, idx = select_frames(frames, question, int(k), scorer=scorer)
        ms_select = (time.perf_counter() - t0) * 1e3
        red_inputs = proc(text=[prompt], videos=[frames[idx]])
        try:
            handle = tokenreduce.reduce(model, policy)
        except Exception as exc:  # noqa: BLE001 - the library's message names the valid sites / methods
            raise DemoInputError(f"policy {policy.to_spec()!r} does not fit the embedded model: {exc}") from None
        try:
            handle.context["question"] = [question]
            try:
                red_logits = model(**red_inputs).logits[0, -1]
            except TokenReduceError as exc:  # e.g. dycoke_ttm on a single frame: the message says what to do
                raise DemoInputError(f"policy {policy.to_spec()!r} cannot run on this input: {exc}") from None
            stats, trace = handle.stats, dict(handle.trace)
            ms_full, ms_reduced = interleaved_medians(lambda: reference(**full_inputs), lambda: model(**red_inputs),
                                                      repeats)
        finally:
            handle.remove()

    ids = red_inputs["input_ids"][0]
    video_offset = int((ids == model.config.video_token_id).nonzero()[0, 0])
    kept = kept_tokens_per_frame(trace, len(idx), vm.tokens_per_frame, video_offset)
    kept_site = max(trace, key=_site_key) if trace else "(none)"
    if "frames" in trace:  # a frames=... stage in the spec selected frames inside the model as well
        inside = trace["frames"]["pos"][0].cpu().numpy()
        idx, kept = np.asarray(idx)[inside], kept[inside]
    n_vis_full = T * vm.tokens_per_frame + 1
    n_vis_red = len(idx) * vm.tokens_per_frame + 1  # the placeholder run: frames x tokens + image_newline
    proj = stats["sites"].get("projector.out")
    llm_in_full = int(full_inputs["input_ids"].shape[1])
    tokens = {
        "frames": (T, len(idx)),
        "visual tokens into the LLM": (n_vis_full, proj["tokens_out"] if proj else n_vis_red),
        "LLM input tokens": (llm_in_full, stats.get("llm_input_tokens", red_inputs["input_ids"].shape[1])),
    }
    n_layers = model.config.text_config.num_hidden_layers
    per_layer = {key[1]: v for key, v in stats.get("tokens_per_layer", {}).items() if key[0] == "llm"}
    start = tokens["LLM input tokens"][1]
    red_layers, last = [], start
    for layer in range(n_layers):
        last = per_layer.get(layer, last)
        red_layers.append(last)
    tokens["KV cache entries (all layers)"] = (llm_in_full * n_layers, sum(red_layers))
    tokens["tokens per LLM layer"] = ([llm_in_full] * n_layers, red_layers)
    return VideoResult(spec=(spec or "").strip(), frames=frames, selected=np.asarray(idx), kept=kept, kept_site=kept_site,
                       options=list(options), probs_full=_option_probs(full_logits, option_ids),
                       probs_reduced=_option_probs(red_logits, option_ids),
                       word_full=tok.convert_ids_to_tokens(int(full_logits.argmax())),
                       word_reduced=tok.convert_ids_to_tokens(int(red_logits.argmax())),
                       tokens=tokens, flops_fraction=_fraction(stats.get("flops"), flops_full),
                       ms_full=ms_full, ms_reduced=ms_reduced, ms_select=ms_select, selection=selection,
                       load=load_average())


# -- rendering -----------------------------------------------------------------------------------
STRIP_MAX_WIDTH = 4096  # pixels; Gradio sends images as WebP, which stops at 16383


def frames_strip(frames: np.ndarray, selected, scale: int = 2) -> np.ndarray:
    """Every decoded frame side by side; frames the model saw with reduction get a green
    border, the others are dimmed with a grey one. Frames are upscaled `scale` times when small
    and shrunk when the strip would pass STRIP_MAX_WIDTH (an HD clip, or many frames)."""
    sel = set(int(i) for i in selected)
    n, h, w = len(frames), frames.shape[1], frames.shape[2]
    fit = (STRIP_MAX_WIDTH - 11 * n) / max(1, n * w)  # 11 px of border and gap per tile
    tiles = []
    for i, f in enumerate(frames):
        if fit < scale:  # shrink (or upscale less): nearest-neighbour, as upscale() does
            tw, th = max(1, int(w * fit)), max(1, int(h * fit))
            f = f[(np.arange(th) * h // th)[:, None], (np.arange(tw) * w // tw)[None, :]]
            t = f.astype(np.float32)
        else:
            t = upscale(f, scale).astype(np.float32)
        if i not in sel:
            t = t * 0.35 + 40
        t = t.clip(0, 255).astype(np.uint8)
        t = np.pad(t, ((4, 4), (4, 4), (0, 0)), constant_values=0)
        colour = (40, 200, 60) if i in sel else (90, 90, 90)
        t[:4], t[-4:], t[:, :4], t[:, -4:] = colour, colour, colour, colour
        tiles.append(np.pad(t, ((0, 0), (0, 3), (0, 0)), constant_values=255))
    return np.concatenate(tiles, axis=1)


def heatmap_figure(frames: np.ndarray, selected, kept: np.ndarray, site: str):
    """Top row: each frame the model saw, cells of dropped LLM tokens darkened; bottom row: the
    per-frame 4x4 grid of kept tokens (0 dropped, 1 kept, >1 a token that absorbed others)."""
    use_agg()
    import matplotlib.pyplot as plt

    n = len(selected)
    side = int(round(kept.shape[1] ** 0.5))
    fig, axes = plt.subplots(2, n, figsize=(1.45 * n + 0.6, 3.3), dpi=100, squeeze=False)
    vmax = max(2.0, float(kept.max()))
    im = None
    for j, i in enumerate(selected):
        f = frames[int(i)].astype(np.float32)
        H, W = f.shape[:2]
        # the model squeezes the whole frame to a square, so a token covers H/side x W/side pixels
        rows = np.minimum(np.arange(H) * side // H, side - 1)
        cols = np.minimum(np.arange(W) * side // W, side - 1)
        mask = (kept[j] > 0).reshape(side, side)[rows[:, None], cols[None, :]][..., None].astype(np.float32)
        shown = f * (0.25 + 0.75 * mask)
        axes[0, j].imshow(shown.clip(0, 255).astype(np.uint8), interpolation="nearest")
        axes[0, j].set_title(f"frame {int(i)}: {int((kept[j] > 0).sum())}/{kept.shape[1]}", fontsize=8)
        im = axes[1, j].imshow(kept[j].reshape(side, side), cmap="viridis", vmin=0, vmax=vmax)
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"LLM tokens kept per frame at {site}", fontsize=10)
    fig.colorbar(im, ax=axes[1, :].tolist(), fraction=0.02, pad=0.01, label="size")
    return fig


def answer_markdown(r: VideoResult, correct: str | None) -> str:
    def row(name, probs, word):
        best = r.options[int(np.argmax(probs))]
        mark = "" if correct is None else (" (right)" if best == correct else " (wrong)")
        dist = ", ".join(f"{o} {p:.2f}" for o, p in zip(r.options, probs))
        return f"| {name} | **{best}**{mark} | {dist} | {word} |"

    lines = ["| | answer | p(option) | top word |", "|---|---|---|---|",
             row("without reduction", r.probs_full, r.word_full),
             row("with reduction", r.probs_reduced, r.word_reduced)]
    if correct is not None:
        lines.append(f"\nCorrect answer: **{correct}**")
    return "\n".join(lines)


def numbers_markdown(r: VideoResult) -> str:
    speed = r.ms_full / r.ms_reduced if r.ms_reduced else float("nan")
    lines = [f"**Policy:** `{r.spec or '(none)'}`; tokens shown at `{r.kept_site}`", "",
             "| | without reduction | with reduction |", "|---|---:|---:|"]
    for name, (a, b) in r.tokens.items():
        if isinstance(a, list):
            lines.append(f"| {name} | {', '.join(f'{x:g}' for x in a)} | {', '.join(f'{x:g}' for x in b)} |")
        else:
            lines.append(f"| {name} | {a:g} | {b:g} |")
    lines += [f"| FLOPs (analytic, vision + LLM, prefill) | 100% | {r.flops_fraction:.1%} |",
              f"| time to the answer (prefill, median) | {r.ms_full:.1f} ms | {r.ms_reduced:.1f} ms ({speed:.2f}x) |"]
    if r.selection != "off":
        lines.append(f"| frame selection ({r.selection}, once) | – | {r.ms_select:.1f} ms |")
    lines.append(f"\nCPU, batch 1, load average {r.load}.")
    return "\n".join(lines)


# -- the Gradio layer ----------------------------------------------------------------------------
def build_demo(vm: VideoModel, samples: list, repeats: int = 3, max_bytes: int | None = None,
               max_seconds: float = DEFAULT_MAX_SECONDS):
    import gradio as gr

    by_name = {s["name"]: s for s in samples}
    notice = ("" if vm.trained else "**UNTRAINED model (random weights):** answers are meaningless until the "
              "trained weights exist (eval/assets/embedded_videoqa/); token counts and timings are real.")

    def on_sample(name):
        s = by_name.get(name)
        if s is None:
            return gr.update(), gr.update()
        return s["question"], ", ".join(s["options"])

    def on_run(name, upload, question, options_text, n_frames, method, keep, spec, selection, k):
        try:
            if upload:
                path, correct = upload, None
            elif name in by_name:
                path, correct = by_name[name]["video"], by_name[name]["answer"]
            else:
                raise DemoInputError("choose a sample or upload a video")
            options = parse_options(options_text, vm.vocabulary)
            if correct is not None and ((question or "").strip() != by_name[name]["question"]
                                        or options != list(by_name[name]["options"])):
                correct = None  # the user changed the sample's question or options: its answer no longer applies
            frames, _ = load_video(path, int(n_frames), max_bytes, max_seconds)
            spec = (spec or "").strip() or policy_spec(method, keep)
            r = run_video_qa(vm, frames, question, options, spec, selection, int(k), repeats)
            heat = figure_to_array(heatmap_figure(r.frames, r.selected, r.kept, r.kept_site))
        except DemoInputError as exc:
            return None, None, "", "", error_markdown(exc)
        except Exception as exc:  # noqa: BLE001 - e.g. a reducer refusing this input: say so in the page, log the rest
            traceback.print_exc()
            return None, None, "", "", error_markdown(f"{type(exc).__name__}: {exc}")
        status = f"Done on {vm.label}." + ("" if vm.trained else " UNTRAINED: answers are meaningless.")
        return (frames_strip(r.frames, r.selected), heat, answer_markdown(r, correct),
                numbers_markdown(r), status)

    first = samples[0]
    with gr.Blocks(title="tokenreduce: video QA with fewer tokens") as demo:
        gr.Markdown("# Video QA with fewer tokens\nThe embedded LLaVA-OneVision answers a question about a clip, "
                    "with and without token reduction (`tokenreduce`).")
        gr.Markdown(notice, elem_id="notice")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            with gr.Column(scale=1):
                sample = gr.Dropdown(list(by_name), value=first["name"], label="sample clip", elem_id="sample")
                upload = gr.File(label="or upload a video" + (f" (at most {max_bytes / 2**20:g} MB, {max_seconds:g} s)"
                                                              if max_bytes else f" (at most {max_seconds:g} s)"),
                                 file_types=["video"], type="filepath", elem_id="upload")
                question = gr.Textbox(first["question"], label="question", elem_id="question")
                options = gr.Textbox(", ".join(first["options"]), label="options (comma-separated, one word each)",
                                     elem_id="options")
                n_frames = gr.Slider(2, MAX_FRAMES_READ, value=DEFAULT_FRAMES, step=1, label="frames to read",
                                     elem_id="frames")
                method = gr.Dropdown(list(VIDEO_METHODS), value="fastv", label="token method", elem_id="method",
                                     info="uniform / random / dycoke_ttm act at projector.out, fastv / framefusion / "
                                          "atp inside the LLM")
                method_help = gr.Markdown(METHOD_HELP["fastv"], elem_id="method_help")
                keep = gr.Slider(0.05, 1.0, value=0.3, step=0.05, label="budget: fraction of visual tokens kept",
                                 elem_id="budget")
                spec = gr.Textbox(label="or a one-line policy spec (overrides method and budget)",
                                  placeholder="projector.out=uniform(keep=0.5); llm.layer.2=fastv(ratio=0.5)",
                                  elem_id="spec")
                selection = gr.Radio(list(FRAME_SELECTION), value="off", label="frame selection", elem_id="selection")
                k = gr.Slider(1, MAX_FRAMES_READ, value=4, step=1, label="frames to keep", elem_id="keep_frames")
                run = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                strip = gr.Image(label="frames read (green: seen with reduction)", type="numpy", interactive=False,
                                 elem_id="frames_strip", height=170)
                heat = gr.Image(label="LLM tokens kept per frame", type="numpy", interactive=False,
                                elem_id="heatmap")
                answer = gr.Markdown(elem_id="answer")
                numbers = gr.Markdown(elem_id="numbers")
        method.change(lambda m: METHOD_HELP.get(m, ""), inputs=method, outputs=method_help)
        sample.change(on_sample, inputs=sample, outputs=[question, options])
        run.click(on_run, inputs=[sample, upload, question, options, n_frames, method, keep, spec, selection, k],
                  outputs=[strip, heat, answer, numbers, status])
    return demo


def main(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="a directory with the embedded model's model.safetensors")
    p.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
                   help=f"longest video accepted, in seconds (default {DEFAULT_MAX_SECONDS:g})")
    args = p.parse_args(argv)
    check_args(args)
    if args.max_seconds <= 0:
        raise SystemExit(f"--max-seconds must be > 0, got {args.max_seconds}")
    choice = model_choice(args.model)
    if choice == "tiny" and args.weights:
        raise SystemExit("--weights applies to --model best; --model tiny builds a random-init model")
    vm = load_video_model(choice, args.weights)
    sample_dir = tempfile.mkdtemp(prefix="tokenreduce_video_demo_")
    samples = make_samples(sample_dir)
    print(f"model: {vm.label}; samples in {sample_dir}", flush=True)
    demo = build_demo(vm, samples, args.repeats, int(args.max_file_mb * 1024 * 1024), args.max_seconds)
    launch(demo, args)


if __name__ == "__main__":
    main()
