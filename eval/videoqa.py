"""`tokenreduce eval videoqa`: multiple-choice video-QA accuracy and cost of a token-reduction policy.

    tokenreduce eval videoqa --model embedded --policy "llm.layer.2=fastv(ratio=0.5)" \
        --data synthetic.jsonl --frames 8 --out out/fastv
    accelerate launch --multi_gpu --num_processes 2 -m tokenreduce.eval.cli eval videoqa ...  # sharded

Data: the JSONL evaluation format read by `tokenreduce.eval.videoqa_data.load_records`
({id, video, question, options, answer (0-based), meta}); `tokenreduce convert` writes it from
public benchmarks' annotation files.

Per sample
  frames   `read_frames(video, num_frames=F)` (uniform, endpoints included), or with
           `--frame-select SCORER`: `--candidates N` uniform frames (default 4F, at most the
           video's length), of which `select_frames` keeps F for the question (Hu et al., CVPR
           2025, arXiv:2502.19680). The decoded frame indices are stored.
  scoring  (a) loglik: log p(continuation | prompt) summed over the continuation's tokens, argmax
           over the options (the lm-evaluation-harness / lmms-eval multiple-choice rule).
           Single-token continuations are read off one forward's next-token logits; longer ones
           take one batched forward of prompt + option per option. (b) generate: greedy decoding
           of `--max-new-tokens`, parsed into an option (`parse_choice`: a letter A-J, else an
           option's text, exact or as a prefix), -1 when nothing matches.
  cost     visual tokens (entering the model, entering the LLM, after each reducing site, after
           the last), the analytic FLOPs fraction (Handle.stats), prefill = wall time of one
           forward on the prompt (vision + projector + LLM; `llm_prefill_ms` is the LLM alone),
           TTFT and decode ms/token from the greedy generation (timestamps of each next-token
           step), KV-cache bytes, peak memory: torch.cuda.max_memory_allocated on CUDA
           (`peak_mem_kind` "cuda_max_allocated", reset per batch); on CPU the process's max
           RSS high-water mark (`peak_mem_kind` "cpu_max_rss": includes the model and Python,
           and never goes down, so it is a process figure, not a per-sample one).

Output directory
  run.json         the run's config; resuming a directory with another config (model, policy,
                   frames, data, scoring, frame selection, continuation, ...) is refused unless
                   --overwrite. A non-empty directory without run.json (not a run directory) is
                   refused unless --overwrite; --overwrite only ever deletes the run's own files
                   (run.json, results*.jsonl, summary.json, summary.md).
  results.jsonl    one line per sample, appended (flushed and fsync'ed) as each finishes; a rerun
                   skips the samples already there (error lines too, unless --retry-errors),
                   unless their record was edited since (each
                   line stores a hash of its record, `record_hash`; the redone line, appended
                   later, is the one counted); a truncated last line (a run killed mid-write) is
                   dropped and redone. Ctrl-C stops a run; rerunning the same command resumes it.
                   Bad inputs (missing / corrupt video, malformed record) are lines with "error"
                   and count as errors, never as correct. A dataset with no valid record is refused.
  run.lock         locked while a run writes (fcntl, released when the process ends, even when
                   killed): a second run into the same --out is refused, not mixed in; process
                   i > 0 of a sharded run holds run.rank{i}.lock (the files stay: deleting one
                   would let a waiting run lock another inode)
  summary.json / summary.md   accuracy overall and per category (meta.qtype / task / type /
                   task_type / duration / domain when present), errors, mean visual tokens
                   per site, FLOPs fraction, timings, peak memory, load average.
Under `accelerate launch --multi_gpu --num_processes N` or `torchrun --nproc_per_node N` (on
CPU too: accelerate's PartialState(cpu=True) then uses gloo; accelerate's own `--cpu` launch
starts one process unless MPI is set up), process i takes samples i::N and writes
results.rank{i}.jsonl; after all finish, the main process merges them into results.jsonl.

Batches (`--batch B`) share one forward: per-sample token counts are then the batch's means and
timings are the batch's (with `batch_size` stored).
"""
from __future__ import annotations

import argparse
import datetime
import json
import numbers
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cli import check_device
from .videoqa_results import (append_result, done_hashes, done_ids, error_ids, is_done, merge_results,  # noqa: F401
                              read_results, record_hash, repair_truncated, results_file, shard)
from .videoqa_summary import CATEGORY_KEYS, format_summary, summarise, write_summary  # noqa: F401

SCORINGS = ("loglik", "generate")
FRAME_SCORERS = ("uniform", "vlm", "head", "clip")
CONTINUATIONS = ("letter", "option", "letter_option")
# meta keys reported per category: the synthetic set's qtype, MVBench's task, NExT-QA's type,
# Video-MME's duration / domain / task_type (see videoqa_data)
CHOICE_LETTERS = "ABCDEFGHIJ"
MODEL_FORMS = "embedded, embedded:PATH (a trained embedded-model directory), hf:DIR (a local HF checkpoint + processor)"
HF_ANSWER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
# the config keys that make two runs' results comparable; anything else (limit, batch, device) may change on resume
IDENTITY_KEYS = ("model", "weights", "policy", "frames", "data", "video_root", "scoring", "frame_select",
                 "candidates", "scorer_args", "continuation", "max_new_tokens", "dtype", "seed")


# -- configuration ------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    data: str
    out: str
    model: str = "embedded"
    policy: str = ""
    frames: int = 8
    limit: int | None = None
    scoring: tuple = SCORINGS
    frame_select: str | None = None
    candidates: int | None = None
    scorer_args: dict = field(default_factory=dict)
    continuation: str | None = None      # None: the model's default (embedded: option, hf: letter)
    max_new_tokens: int = 8
    batch: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    video_root: str | None = None
    overwrite: bool = False
    retry_errors: bool = False            # redo the samples whose latest row is an error (a video since fixed)
    progress: bool = True
    warmup: int = 1                       # untimed passes over the first batch (first-call overheads)
    stop_after: int | None = None         # test hook: simulate a kill after N results (see --stop-after)

    def __post_init__(self):
        if not isinstance(self.out, (str, os.PathLike)) or not str(self.out).strip():
            raise ValueError(f"--out must be a directory path, got {self.out!r}")
        if not isinstance(self.data, (str, os.PathLike)) or not str(self.data).strip():
            raise ValueError(f"--data must be the path of a JSONL dataset, got {self.data!r}")
        kind, _, path = str(self.model).partition(":")
        if kind not in ("embedded", "hf") or (kind == "hf" and not path):
            raise ValueError(f"unknown --model {self.model!r}; valid forms: {MODEL_FORMS}")
        if isinstance(self.scoring, str):
            self.scoring = tuple(s.strip() for s in self.scoring.split(",") if s.strip())
        if not isinstance(self.scoring, (tuple, list, set, frozenset)):
            raise ValueError(f"scoring must be a comma list or a sequence of: {', '.join(SCORINGS)}; "
                             f"got {self.scoring!r}")
        bad = [s for s in self.scoring if s not in SCORINGS]
        if bad or not self.scoring:
            raise ValueError(f"unknown scoring {bad or self.scoring!r}; choose from: {', '.join(SCORINGS)}")
        self.scoring = tuple(s for s in SCORINGS if s in self.scoring)
        if self.frame_select is not None and self.frame_select not in FRAME_SCORERS:
            raise ValueError(f"unknown frame scorer {self.frame_select!r}; choose one of: {', '.join(FRAME_SCORERS)}")
        if self.continuation is not None and self.continuation not in CONTINUATIONS:
            raise ValueError(f"unknown continuation {self.continuation!r}; choose one of: {', '.join(CONTINUATIONS)}")
        check_device(self.device)
        self.out, self.data = os.path.expanduser(self.out), os.path.expanduser(self.data)
        if self.video_root is not None:
            self.video_root = os.path.expanduser(self.video_root)
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of: float32, float16, bfloat16")
        for name, low, optional in INT_FIELDS:
            setattr(self, name, _check_int(name, getattr(self, name), low, optional))
        if self.candidates is not None and self.candidates < self.frames:
            raise ValueError(f"--candidates ({self.candidates}) must be >= --frames ({self.frames})")
        if not isinstance(self.scorer_args, dict):
            raise ValueError(f"--scorer-args must be a JSON object (a dict), got {self.scorer_args!r}")
        self.policy = normalise_policy(self.policy)

    def identity(self) -> dict:
        """What must match for a directory's results to be resumed (paths made absolute)."""
        d = asdict(self)
        d["data"] = str(Path(self.data).resolve())
        d["video_root"] = str(Path(self.video_root).resolve()) if self.video_root else None
        d["model"] = normalise_model_spec(self.model)
        d["weights"] = weights_fingerprint(self.model)
        d["scoring"] = list(self.scoring)
        d["candidates"] = self.candidates if self.frame_select else None
        d["scorer_args"] = self.scorer_args if self.frame_select else {}
        return {k: d[k] for k in IDENTITY_KEYS}


# integer options: (field, smallest valid value, None allowed)
INT_FIELDS = (("frames", 1, False), ("batch", 1, False), ("max_new_tokens", 1, False), ("limit", 0, True),
              ("candidates", 1, True), ("seed", 0, False), ("warmup", 0, False), ("stop_after", 0, True))


def _check_int(name: str, value, low: int, optional: bool = False):
    """value as an int >= low (None passes when optional); bools, floats and strings are refused."""
    if value is None and optional:
        return None
    flag = f"--{name.replace('_', '-')}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        what = f"an integer >= {low}" + (" or None" if optional else "")
        raise ValueError(f"{flag} must be {what}, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{flag} must be >= {low}, got {value}")
    return int(value)


def normalise_policy(policy) -> str:
    """'' / 'none' / 'baseline' -> '' (no reduction); otherwise the policy's canonical spec."""
    if policy is None or str(policy).strip().lower() in ("", "none", "baseline"):
        return ""
    from tokenreduce.policy import Policy
    return Policy.coerce(policy).to_spec()


_FINGERPRINTS: dict = {}  # (path, files' name/size/mtime) -> hash: one read per process unless a file changes


def weights_fingerprint(spec: str) -> str | None:
    """A short hash of the model directory's config.json and weight files, so that a run directory is
    not resumed after the weights changed (a retrained embedded model keeps its path): the whole
    content of files up to 64 MiB; name, size, modification time and the first and last 64 KiB of
    larger ones (hashing gigabytes at every start would cost seconds). None when the directory
    does not exist. Cached per process on the files' names, sizes and modification times."""
    import hashlib
    kind, _, path = str(spec).partition(":")
    if kind == "embedded" and not path:
        from .embedded import ASSET_DIR
        path = ASSET_DIR
    root = Path(path)
    if not root.is_dir():
        return None
    # the weights and the architecture only: training logs beside them may be edited freely
    files = sorted(p for p in root.iterdir()
                   if p.is_file() and (p.suffix in (".safetensors", ".bin") or p.name == "config.json"))
    stats = [(f, f.stat()) for f in files]
    key = (str(root.resolve()), tuple((f.name, st.st_size, st.st_mtime_ns) for f, st in stats))
    if key in _FINGERPRINTS:
        return _FINGERPRINTS[key]
    h = hashlib.sha256()
    for f, st in stats:
        h.update(f"{f.name}:{st.st_size}".encode())
        with open(f, "rb") as fh:
            if st.st_size <= 64 << 20:
                h.update(fh.read())
                continue
            h.update(f":{st.st_mtime_ns}".encode())
            h.update(fh.read(1 << 16))
            fh.seek(-(1 << 16), os.SEEK_END)
            h.update(fh.read())
    _FINGERPRINTS[key] = h.hexdigest()[:16]
    return _FINGERPRINTS[key]


def normalise_model_spec(spec: str) -> str:
    kind, _, path = spec.partition(":")
    if kind in ("embedded", "hf") and path:
        return f"{kind}:{Path(path).resolve()}"
    return spec


# -- models: prompt + scoring conventions per model family -------------------------------------
class QAModel:
    """A video-QA model with its processor: builds prompts, model inputs and answer continuations.

    Subclasses hold the model-specific conventions; scoring (`score_batch`) is shared."""

    default_continuation = "letter"

    def __init__(self, model, processor, name: str, device="cpu"):
        self.model, self.processor, self.name = model, processor, name
        self.device = torch.device(device)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.video_token_id = getattr(model.config, "video_token_id", None)
        if self.video_token_id is None:
            self.video_token_id = getattr(model.config, "video_token_index", None)

    def prompt(self, question: str, options: list) -> str:
        raise NotImplementedError

    #: extra processor arguments (HF checkpoints: left padding, see HFQA)
    processor_kwargs: dict = {}

    def inputs(self, prompts: list, videos: list) -> dict:
        enc = self.processor(text=prompts, videos=videos, return_tensors="pt", padding=True, **self.processor_kwargs)
        dt = next(self.model.parameters()).dtype
        return {k: (v.to(self.device, dtype=dt) if torch.is_floating_point(v) else v.to(self.device))
                for k, v in dict(enc).items() if torch.is_tensor(v)}

    def continuation(self, options: list, index: int, how: str) -> str:
        letter = CHOICE_LETTERS[index]
        return {"letter": letter, "option": str(options[index]),
                "letter_option": f"{letter}. {options[index]}"}[how]

    def check_options(self, options: list) -> None:
        if not 2 <= len(options) <= len(CHOICE_LETTERS):
            raise ValueError(f"{len(options)} options; this runner letters 2..{len(CHOICE_LETTERS)} options (A-J)")

    def relevance_scorer(self):
        """The frame scorer for --frame-select vlm: this model asked True/False about each frame."""
        from .frame_scorers import VLMScorer
        return VLMScorer(self.model, self.processor)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()


class EmbeddedQA(QAModel):
    """The embedded LLaVA-OneVision (eval/embedded.py): its training prompt; the answer is the
    option word itself, so the default continuation is the option text (one token)."""

    default_continuation = "option"

    def prompt(self, question, options):
        from .embedded import LETTERS
        if len(options) > len(LETTERS):
            raise ValueError(f"{len(options)} options; the embedded model was trained with at most {len(LETTERS)}")
        return self.processor.prompt(question, options)

    def decode(self, ids) -> str:
        return self.processor.decode(ids)


class HFQA(QAModel):
    """A Hugging Face LLaVA-family checkpoint with its AutoProcessor: the processor's chat template,
    options lettered "A. ...", and the lmms-eval instruction to answer with the letter."""

    # scoring reads each row's last position, so batches are padded on the left whatever the
    # checkpoint's tokenizer defaults to (the transformers docs ask the same for batched generation)
    processor_kwargs = {"padding_side": "left"}

    def prompt(self, question, options):
        body = "\n".join([question.strip()] + [f"{CHOICE_LETTERS[i]}. {o}" for i, o in enumerate(options)]
                         + [HF_ANSWER_INSTRUCTION])
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": body}]}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        token = getattr(self.processor, "video_token", "<video>")
        return f"USER: {token}\n{body} ASSISTANT:"


def load_qa_model(spec: str, device="cpu", dtype="float32") -> QAModel:
    kind, _, path = spec.partition(":")
    dt = getattr(torch, dtype)
    if kind == "embedded":
        from .embedded import load_embedded
        model, proc = load_embedded(path or None, device=device, dtype=dt)
        return EmbeddedQA(model, proc, normalise_model_spec(spec), device)
    if kind == "hf" and path:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--model hf:{path}: no such directory (a local checkpoint with its processor)")
        from transformers import AutoModelForImageTextToText, AutoProcessor
        proc = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dt).to(device).eval()
        return HFQA(model, proc, normalise_model_spec(spec), device)
    raise ValueError(f"unknown --model {spec!r}; valid forms: {MODEL_FORMS}")


# -- answers --------------------------------------------------------------------------------------
_LETTER = re.compile(r"^\(?([A-J])(?:[\).:,\s]|$)")


def parse_choice(text: str, options: list) -> int:
    """Option index of a generated answer, -1 when unparseable: an option's text (two characters or
    more) matched case-insensitively, exactly or as the start of the answer (followed by a
    non-word character), the longest matching option winning; else a leading letter ("B", "(B)",
    "B. red"). Text first, so "A man is running." picks the option "a man is running", not A."""
    t = text.strip()
    low = t.lower()
    starting = []  # (length, index) of the options the answer starts with
    for i, o in enumerate(options):
        o = str(o).strip().lower()
        if o and (low == o or (low.startswith(o) and not low[len(o):len(o) + 1].isalnum())):
            starting.append((len(o), -i))
    longest = max(starting, default=None)
    if longest is not None and longest[0] >= 2:
        return -longest[1]
    m = _LETTER.match(t)
    if m and CHOICE_LETTERS.index(m.group(1)) < len(options):
        return CHOICE_LETTERS.index(m.group(1))
    return -longest[1] if longest is not None else -1  # one-character options ("A", "1") last


# -- measurement ----------------------------------------------------------------------------------
class _StepClock:
    """A logits processor that only timestamps each generation step: the first call comes right
    after the prefill's logits (time to first token), the others after each decode step."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores):
        from .bench import sync
        sync(scores.device)
        self.stamps.append(time.perf_counter())
        return scores


def _peak_memory(device) -> tuple:
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    try:
        import resource
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_max_rss"  # Linux: KiB
    except ImportError:  # pragma: no cover - not on Windows
        return None, None


def visual_token_counts(stats: dict, n_visual: float) -> dict:
    """Visual tokens per site from Handle.stats. LLM-layer sites count the whole sequence, so the
    text tokens (prompt tokens - visual placeholders) are subtracted; `frames` sites count frames."""
    text = stats.get("prompt_tokens", n_visual) - n_visual
    llm_input = stats.get("llm_input_tokens", stats.get("prompt_tokens", n_visual)) - text
    sites, final = {}, llm_input
    for name, s in stats.get("sites", {}).items():
        if name == "frames":
            sites[name] = {"frames_in": s["tokens_in"], "frames_out": s["tokens_out"]}
        elif name.startswith("llm."):
            sites[name] = {"visual_in": s["tokens_in"] - text, "visual_out": s["tokens_out"] - text}
            final = sites[name]["visual_out"]  # stats keep the sites in forward order
        else:
            sites[name] = {"visual_in": s["tokens_in"], "visual_out": s["tokens_out"]}
    return {"input": float(n_visual), "llm_input": float(llm_input), "final": float(final), "sites": sites}


def score_batch(qa: QAModel, items: list, cfg: EvalConfig, handle) -> list:
    """Score prepared samples (dicts with question, options, frames) in one batch. Returns one
    result dict per item (predictions + measurements)."""
    from .bench import sync
    from .bench_vlm import _Timer, kv_bytes
    model, dev = qa.model, qa.device
    how = cfg.continuation or qa.default_continuation
    prompts = [qa.prompt(it["question"], it["options"]) for it in items]
    inputs = qa.inputs(prompts, [it["frames"] for it in items])
    n_visual = (inputs["input_ids"] == qa.video_token_id).sum(1).float().mean().item()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # prefill: one forward on the prompt (its stats are the reduction's for this batch)
    timer = _Timer(model.model.language_model, dev)
    try:
        sync(dev)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model(**inputs, use_cache=False)
        sync(dev)
        prefill_ms = (time.perf_counter() - t0) * 1e3
    finally:
        timer.remove()
    stats = handle.stats if handle is not None else {}
    # batch (the run's --batch) and device say which rows' timings compare (see summarise)
    res = [{"batch_size": len(items), "batch": cfg.batch, "device": dev.type, "prefill_ms": prefill_ms,
            "llm_prefill_ms": timer.ms, "visual_tokens": visual_token_counts(stats, n_visual),
            "flops_fraction": stats.get("flops_fraction", 1.0)} for _ in items]
    if "loglik" in cfg.scoring:
        conts = [[qa.continuation(it["options"], j, how) for j in range(len(it["options"]))] for it in items]
        scores = option_logliks(qa, inputs, out.logits, prompts, conts, items, handle)
        for r, it, sc, cs in zip(res, items, scores, conts):
            pred = int(np.argmax(sc))
            r.update(loglik_continuations=cs, loglik_scores=[round(float(s), 5) for s in sc], loglik_pred=pred,
                     loglik_correct=pred == it["answer"])
    del out
    if "generate" in cfg.scoring:
        clock = _StepClock()
        from transformers import LogitsProcessorList
        sync(dev)
        t0 = time.perf_counter()
        with torch.inference_mode():
            gen = model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                 logits_processor=LogitsProcessorList([clock]), return_dict_in_generate=True,
                                 pad_token_id=qa.tokenizer.pad_token_id)
        steps = clock.stamps
        ttft = (steps[0] - t0) * 1e3 if steps else None
        per_tok = (steps[-1] - steps[0]) * 1e3 / (len(steps) - 1) if len(steps) > 1 else None
        cache = getattr(gen, "cache", None) or getattr(gen, "past_key_values", None)
        # the batch's cache (padding included) shared out per sample, so --batch does not scale it
        kv = kv_bytes(cache) / len(items) if cache is not None and hasattr(cache, "layers") else None
        L = inputs["input_ids"].shape[1]
        for b, (r, it) in enumerate(zip(res, items)):
            text = qa.decode(gen.sequences[b, L:])
            pred = parse_choice(text, it["options"])
            r.update(generated=text, generated_pred=pred, generated_correct=pred == it["answer"],
                     ttft_ms=ttft, decode_ms_per_token=per_tok, generated_steps=len(steps), kv_bytes=kv)
        del gen
    peak, kind = _peak_memory(dev)
    for r in res:
        r.update(peak_mem_bytes=peak, peak_mem_kind=kind)
    return res


def option_logliks(qa: QAModel, inputs: dict, logits, prompts: list, conts: list, items: list,
                   handle=None) -> list:
    """log p(continuation | prompt) per option, summed over the continuation's tokens.

    The continuation's tokens are those of tokenize(prompt + continuation) beyond tokenize(prompt)
    (as lm-evaluation-harness, so merges across the boundary are scored as the model sees them).
    When the prompt's own last token would merge into the continuation (a prompt ending in a
    space, with a BPE tokenizer), the trailing whitespace moves into the continuation, as
    lm-evaluation-harness does. When every continuation of a sample is one token, the prefill's
    last-position logits give all options at once; otherwise one batched forward scores prompt +
    option for all options. On that path the reduction runs on prompt + option: methods that
    look at the last token (FastV, FrameFusion) or draw per row (random without shared=True) then
    see the option; single-token continuations (the defaults: letters, the embedded model's
    one-word options) and generated answers do not."""
    tok = qa.tokenizer
    out = []
    for b, (prompt, cs) in enumerate(zip(prompts, conts)):
        texts = [prompt + _joiner(prompt, c) + c for c in cs]
        p_ids = _text_ids(tok, prompt)
        full = [_text_ids(tok, t) for t in texts]
        reuse_prefill = True
        if any(f[:len(p_ids)] != p_ids for f in full):  # the boundary merges: score from the stripped prompt
            p_ids, reuse_prefill = _text_ids(tok, prompt.rstrip()), False
        c_ids = [f[len(p_ids):] for f in full]
        if any(not c for c in c_ids):
            raise ValueError(f"an option's continuation tokenizes to nothing: {cs!r}")
        if reuse_prefill and all(len(c) == 1 for c in c_ids):
            lp = torch.log_softmax(logits[b, -1].float(), -1)
            out.append([float(lp[c[0]]) for c in c_ids])
            continue
        batch = qa.inputs(texts, [items[b]["frames"]] * len(cs))
        saved = handle.context.get("question") if handle is not None else None
        try:
            if handle is not None:  # one row per option, all of this sample's question
                handle.context["question"] = [items[b]["question"]] * len(cs)
            with torch.inference_mode():
                lg = qa.model(**batch, use_cache=False).logits.float()
        finally:
            if handle is not None:
                handle.context["question"] = saved
        lps = torch.log_softmax(lg, -1)
        L = lg.shape[1]
        scores = []
        for j, c in enumerate(c_ids):  # left padding: every row ends at L - 1
            pos = torch.arange(L - len(c) - 1, L - 1)
            scores.append(float(lps[j, pos, torch.tensor(c)].sum()))
        out.append(scores)
    return out


def _joiner(prompt: str, cont: str) -> str:
    # word-level prompts end in a word ("answer :"), chat templates in a newline: add a space
    # only where the prompt does not already end in whitespace
    return "" if not prompt or prompt[-1].isspace() else " "


def _text_ids(tok, text: str) -> list:
    return list(tok(text, add_special_tokens=False)["input_ids"])


# -- results files --------------------------------------------------------------------------------
# -- run directory ------------------------------------------------------------------------------
# the files a run writes in its directory: the only ones --overwrite deletes
RUN_FILES = ("run.json", "results.jsonl", "summary.json", "summary.md", "results.jsonl.tmp", "run.json.tmp")
# lock_run_dir's files (run.lock, run.rank{i}.lock): never deleted (--overwrite included), ignored
# when telling a run directory apart
LOCK_RE = re.compile(r"run(\.rank\d+)?\.lock")


def read_run_json(path) -> dict:
    """The config stored in a run directory's run.json; ValueError when it is damaged."""
    path = Path(path)
    hint = "use another --out or --overwrite"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a tokenreduce run.json ({_describe(exc)}); {hint}") from None
    if not isinstance(data, dict) or not isinstance(data.get("config", {}), dict):
        raise ValueError(f"{path}: not a tokenreduce run.json (expected an object with a \"config\" object, "
                         f"got {type(data).__name__}); {hint}")
    return data.get("config", {})


def check_out_dir(cfg: EvalConfig) -> None:
    """Refuse a directory holding another run, a damaged run.json, a non-empty directory that is
    not a run directory (no run.json), or a path that is a file (read-only, so every process
    can check it)."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a directory; give a directory path")
    if cfg.overwrite or not out.exists():
        return
    run_json = out / "run.json"
    if not run_json.exists():
        # run.json.tmp: another process of this run is writing run.json right now
        if any(p.name != "run.json.tmp" and not LOCK_RE.fullmatch(p.name) for p in out.iterdir()):
            raise ValueError(f"{str(out)!r} is not empty and has no run.json, so it is not a tokenreduce run "
                             f"directory and its files ({', '.join(RUN_FILES[1:4])}) could be overwritten; "
                             "use a new or empty --out, or --overwrite to use it anyway (only those files "
                             "are replaced)")
        return
    old = read_run_json(run_json)
    if not any(p.stat().st_size for p in out.glob("results*.jsonl")):
        return  # no results yet (e.g. a run that failed to start): nothing to protect
    ident = cfg.identity()
    old_eff, now_eff = _effective(old), _effective(ident)
    diff = [k for k in IDENTITY_KEYS if old_eff.get(k) != now_eff.get(k)]
    if diff:
        detail = "; ".join(f"{k}: {old_eff.get(k)!r} there, {now_eff.get(k)!r} now" for k in diff)
        raise ValueError(f"{str(out)!r} holds a run with another config ({detail}); use another --out, "
                         "or --overwrite to discard its results")


def default_candidates(frames: int) -> int:
    """--candidates' default: 4 x --frames uniform frames to select from"""
    return 4 * frames


def _effective(ident: dict) -> dict:
    """A stored config as it ran: the defaults of --continuation (embedded: option, hf: letter) and
    --candidates (4 x --frames) spelled out, settings the scoring does not use dropped, so spelling
    out a default or changing an unused setting on a rerun is not "another config"."""
    d = dict(ident)
    scoring = d.get("scoring") or ()
    if "loglik" in scoring:
        if d.get("continuation") is None:
            qa_class = HFQA if str(d.get("model") or "").startswith("hf:") else EmbeddedQA
            d["continuation"] = qa_class.default_continuation
    else:
        d["continuation"] = None
    if "generate" not in scoring:
        d["max_new_tokens"] = None
    if d.get("frame_select") and d.get("candidates") is None and isinstance(d.get("frames"), int):
        d["candidates"] = default_candidates(d["frames"])
    return d


def make_out_dir(out) -> Path:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way (the path or one of its parents), no permission, ...
        raise ValueError(f"--out {str(out)!r}: cannot create the directory ({_describe(exc)})") from None
    return out


def prepare_out_dir(cfg: EvalConfig) -> None:
    """Create the directory and its run.json (after check_out_dir); --overwrite clears the run's
    own files (RUN_FILES and results.rank*.jsonl), never anything else."""
    out = make_out_dir(cfg.out)
    run_json = out / "run.json"
    if cfg.overwrite:
        for p in [*(out / name for name in RUN_FILES), *out.glob("results.rank*.jsonl")]:
            if p.is_file() or p.is_symlink():
                p.unlink()
    ident = cfg.identity()
    if not run_json.exists() or read_run_json(run_json) != ident:
        tmp = out / "run.json.tmp"  # written whole, then renamed: other processes never read half of it
        tmp.write_text(json.dumps({"config": ident, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                   "argv": sys.argv}, indent=2))
        os.replace(tmp, run_json)
    repair_truncated(out / "results.jsonl")
    # shard files an interrupted sharded run left behind hold rows OLDER than anything this run
    # appends: fold them into results.jsonl now, so "the last row per id wins" stays true when the
    # number of processes changes between runs
    for p in out.glob("results.rank*.jsonl"):
        repair_truncated(p)
    merge_results(out)


class _LocalState:
    """One process: what accelerate's PartialState offers, for runs without `accelerate launch`."""
    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self):
        pass


def process_state(device: str = "cpu"):
    """accelerate's PartialState under `accelerate launch` / torchrun (WORLD_SIZE > 1), else one
    process. On CPU it must be told so (cpu=True), or it would not set up the gloo group."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState
        # a long collective timeout: the final barrier waits for the slowest shard's samples (the
        # default, 30 min for gloo / 10 for NCCL, would abort a long run before its summary)
        return PartialState(cpu=torch.device(device).type == "cpu", timeout=datetime.timedelta(hours=24))
    return _LocalState()


# -- the run --------------------------------------------------------------------------------------
def _error_row(sample_id, error: str, **extra) -> dict:
    return {"id": sample_id, "error": error, **extra}


def _frame_rate(rec: dict):
    """meta.fps: the frame rate of a record whose video is a folder of frames (MVBench's TVQA
    clips, 3 fps); a video file's own rate is read from the file"""
    return (rec.get("meta") or {}).get("fps")


def _clip_window(rec: dict):
    """(first, last) frame index of the record's meta.start / meta.end (seconds; MVBench's clip
    bounds), or None when it has none"""
    import numpy as np

    from .video import frame_times, video_info
    meta = rec.get("meta") or {}
    if meta.get("start") is None and meta.get("end") is None:
        return None
    info = video_info(rec["video"], frame_rate=_frame_rate(rec))
    total, fps = info["total"], info["fps"]
    if not fps:
        folder = info.get("backend") == "frames"
        raise ValueError("meta start / end are in seconds, but the video reports no frame rate"
                         + (" (a folder of frames: give its rate as meta.fps)" if folder else ""))
    start, end = float(meta.get("start") or 0.0), meta.get("end")
    ts = frame_times(rec["video"], info=info)
    if ts is not None:  # variable frame rate: the frames shown from start to end, by their own times
        first = max(0, int(np.searchsorted(ts, start + 1e-6, side="right")) - 1)  # the frame shown at start
        last = total - 1 if end is None else min(total - 1, int(np.searchsorted(ts, float(end) + 1e-6, side="right")) - 1)
    else:
        first = max(0, round(start * fps))
        last = total - 1 if end is None else min(total - 1, round(float(end) * fps))
    if first > last:
        raise ValueError(f"meta start {meta.get('start')} s / end {meta.get('end')} s select no frame of a "
                         f"{total}-frame video at {fps:g} fps")
    return first, last


def _read_uniform(rec: dict, k: int, window) -> tuple:
    """k frames spread evenly over the clip (endpoints included), or over its window"""
    from .video import read_frames, uniform_indices
    if window is None:
        return read_frames(rec["video"], num_frames=k, frame_rate=_frame_rate(rec))
    first, last = window
    return read_frames(rec["video"], indices=(first + uniform_indices(last - first + 1, k)).tolist(),
                       frame_rate=_frame_rate(rec))


def _load_frames(rec: dict, cfg: EvalConfig, qa: QAModel, scorer, handle_ctl) -> tuple:
    """(frames, frame info) for one record, uniform or selected for its question, within its
    meta.start / meta.end bounds when it has them."""
    from .video import video_info
    window = _clip_window(rec)
    bounds = {} if window is None else {"window": list(window)}
    if not cfg.frame_select:
        frames, meta = _read_uniform(rec, cfg.frames, window)
        return frames, {"indices": meta["indices"], "total": meta["total"], **bounds}
    total = video_info(rec["video"], frame_rate=_frame_rate(rec))["total"]
    span = total if window is None else window[1] - window[0] + 1
    n_cand = min(cfg.candidates or default_candidates(cfg.frames), span)
    if n_cand <= cfg.frames:  # nothing to choose from: uniform (repeating frames if the video is short)
        frames, meta = _read_uniform(rec, cfg.frames, window)
        return frames, {"indices": meta["indices"], "total": total, "selected_by": "uniform (too few frames)",
                        **bounds}
    cand, meta = _read_uniform(rec, n_cand, window)
    from .frame_select import select_frames
    with handle_ctl.suspended(cfg.frame_select == "vlm"):  # the scorer asks the plain model
        picked, idx = select_frames(cand, rec["question"], k=cfg.frames, scorer=scorer)
    return picked, {"indices": [meta["indices"][i] for i in idx.tolist()], "total": total,
                    "candidates": meta["indices"], "selected_by": cfg.frame_select, **bounds}


class _HandleControl:
    """Owns the policy's Handle; can take it off the model for a moment (frame scoring with the
    same model must see the unreduced model) and put it back."""

    def __init__(self, model, policy: str):
        import tokenreduce as tr
        self.tr, self.model, self.policy = tr, model, policy
        self.handle = tr.reduce(model, policy)  # "" installs no stages but still reports token counts / FLOPs

    def suspended(self, active: bool):
        ctl = self

        class _Ctx:
            def __enter__(self):
                if active:
                    ctl.handle.remove()

            def __exit__(self, *exc):
                if active:
                    ctl.handle = ctl.tr.reduce(ctl.model, ctl.policy)
                return False
        return _Ctx()

    def remove(self):
        self.handle.remove()


def build_frame_scorer(cfg: EvalConfig, qa: QAModel):
    if not cfg.frame_select:
        return None
    if cfg.frame_select == "vlm":
        return qa.relevance_scorer()
    from tokenreduce.registry import scorer_factory
    return scorer_factory(cfg.frame_select)(**cfg.scorer_args)


def load_dataset(data, video_root=None) -> tuple:
    """(records, problems) of an evaluation JSONL; ValueError when nothing in it can be evaluated
    (say why rather than finish with n 0)"""
    from tokenreduce.eval.videoqa_data import load_records
    records, problems = load_records(data, video_root=video_root)
    if not records:
        if not problems:
            raise ValueError(f"{data}: no records (the file is empty)")
        first = "; ".join(f"line {p.get('line')}: {p.get('error')}" for p in problems[:3])
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ValueError(f"{data}: no valid records; {len(problems)} malformed line(s): {first}{more}")
    return records, problems


def run_eval(cfg: EvalConfig, qa: QAModel | None = None, state=None) -> dict | None:
    """Run (or resume) one evaluation; returns the summary on the main process (None elsewhere)."""
    state = state or process_state(cfg.device)
    rank, world = state.process_index, state.num_processes
    if world > 1 and torch.device(cfg.device).type == "cuda":
        cfg.device = f"cuda:{getattr(state, 'local_process_index', rank)}"  # one GPU per process
    records, problems = load_dataset(cfg.data, cfg.video_root)
    check_out_dir(cfg)  # every process, before the barrier: a refusal must not leave the others waiting
    # a fresh single-process run that fails before its first result (a model or policy that does
    # not load) takes its run.json away again, so the corrected command is not refused as "another config"
    fresh = world == 1 and not (Path(cfg.out) / "run.json").exists()
    made_dir = fresh and not Path(cfg.out).exists()
    lock = lock_run_dir(cfg.out, rank)  # every process, before the barrier, as check_out_dir
    try:
        return _run_locked(cfg, qa, state, records, problems, fresh, made_dir)
    finally:
        lock.close()  # releases the lock; the file stays (deleting it would let a waiting run lock another inode)


def lock_run_dir(out, rank: int = 0):
    """An exclusive lock on OUT/run.lock (process `rank` of a sharded run: run.rank{rank}.lock),
    held while the run writes: a second run into the same --out would append to the same files
    and rewrite results.jsonl under the first one. Returns the open lock file (close it to
    release; the OS releases it when the process dies, so a killed run leaves no stale lock).
    Where fcntl does not exist (Windows) nothing is locked."""
    out = make_out_dir(out)
    path = out / ("run.lock" if rank == 0 else f"run.rank{rank}.lock")
    f = open(path, "a+")
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise ValueError(f"{str(out)!r} is in use by another run{f' (pid {holder})' if holder.isdigit() else ''}; "
                         "wait for it to finish, or use another --out") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def _run_locked(cfg: EvalConfig, qa, state, records: list, problems: list, fresh: bool, made_dir: bool):
    """run_eval's work once check_out_dir passed and the run directory is locked"""
    from tqdm.auto import tqdm
    rank, world = state.process_index, state.num_processes
    if state.is_main_process:
        prepare_out_dir(cfg)
    state.wait_for_everyone()
    if cfg.limit is not None:
        records = records[:cfg.limit]
    order = [r["id"] for r in records] + [_problem_id(p) for p in problems]
    done = done_hashes(cfg.out)  # id -> the record hash its latest row was written for
    retry = error_ids(cfg.out) if cfg.retry_errors else set()  # records only: a malformed line stays malformed
    pending = [r for r in records if not is_done(done, r["id"], record_hash(r)) or r["id"] in retry]
    pending_problems = [p for p in problems if not is_done(done, _problem_id(p), _problem_hash(p))]
    # every process has read the same rows before any process writes one, so all split the same
    # pending list: the work left is shared evenly (a resume after one shard died would otherwise
    # leave all of it to that shard while the others wait at the final barrier)
    state.wait_for_everyone()
    todo = shard(pending, rank, world)
    my_problems = pending_problems if state.is_main_process else []
    n_total = len(records) + len(problems)
    n_before = n_total - len(pending) - len(pending_problems)
    torch.manual_seed(cfg.seed)
    own = qa is None
    load_avg_start = os.getloadavg()
    t_start = time.perf_counter()
    path = results_file(cfg.out, rank, world)
    repair_truncated(path)
    written = 0
    try:
        with open(path, "a") as f:
            def write(row):
                nonlocal written
                if cfg.stop_after is not None and written >= cfg.stop_after:
                    # test hook: die in the middle of a write, as a kill would
                    f.write(json.dumps(row)[:25])
                    f.flush()
                    os._exit(3)
                append_result(f, row)
                written += 1

            for p in my_problems:
                write(_error_row(_problem_id(p), f"malformed record (line {p.get('line')}): {p.get('error')}",
                                 line=p.get("line"), record_id=p.get("id"), record_hash=_problem_hash(p)))
            if todo:
                if own:
                    qa = load_qa_model(cfg.model, cfg.device, cfg.dtype)
                ctl = _HandleControl(qa.model, cfg.policy)
                scorer = build_frame_scorer(cfg, qa)
                warmup_left = cfg.warmup
                bar = tqdm(total=len(todo), desc=f"videoqa{'' if world == 1 else f' [{rank}/{world}]'}",
                           disable=not cfg.progress, position=rank, dynamic_ncols=True)
                try:
                    for start in range(0, len(todo), cfg.batch):
                        ready = []
                        for rec in todo[start:start + cfg.batch]:
                            base = {"id": rec["id"], "question": rec["question"], "options": rec["options"],
                                    "answer": rec["answer"], "meta": rec.get("meta") or {},
                                    "record_hash": record_hash(rec)}
                            try:
                                qa.check_options(rec["options"])
                                frames, finfo = _load_frames(rec, cfg, qa, scorer, ctl)
                            except Exception as exc:  # noqa: BLE001 - a bad sample is reported, the run goes on
                                write({**base, "error": _describe(exc)})
                                bar.update(1)
                                continue
                            ready.append((base, {**rec, "frames": frames}, finfo))
                        if not ready:
                            continue
                        try:
                            ctl.handle.context["question"] = [it["question"] for _, it, _ in ready]
                            for _ in range(warmup_left):  # lazy inits and allocator growth out of the timings
                                score_batch(qa, [it for _, it, _ in ready], cfg, ctl.handle)
                            warmup_left = 0
                            scored = score_batch(qa, [it for _, it, _ in ready], cfg, ctl.handle)
                        except Exception as exc:  # noqa: BLE001
                            if len(ready) == 1 or isinstance(exc, (torch.cuda.OutOfMemoryError,)):
                                scored = [{"error": _describe(exc)}] * len(ready)
                            else:  # find the bad one: score the batch's samples one by one
                                scored = []
                                for _, it, _ in ready:
                                    try:
                                        ctl.handle.context["question"] = [it["question"]]
                                        scored += score_batch(qa, [it], cfg, ctl.handle)
                                    except Exception as exc1:  # noqa: BLE001
                                        scored.append({"error": _describe(exc1)})
                        for (base, _, finfo), r in zip(ready, scored):
                            write({**base, "frames": finfo, **r, "rank": rank})
                            bar.update(1)
                finally:
                    bar.close()
                    ctl.remove()
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            mine = "" if world == 1 else f" (this process's {written}; the others' not counted)"
            print(f"interrupted: {n_before + written} of {n_total} results written{mine} "
                  f"to {cfg.out}; rerun the same command to resume", file=sys.stderr, flush=True)
        if fresh and written == 0:
            _remove_empty_run(Path(cfg.out), made_dir)
        raise
    wall = time.perf_counter() - t_start
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    rows = merge_results(cfg.out, order)
    # the summary covers this run's records only: rows of an earlier run with a larger --limit, or
    # of a line since fixed or removed, stay in results.jsonl (a later run may resume them) but
    # are not counted
    wanted = {i: n for n, i in enumerate(order)}
    rows = sorted((r for r in rows if r.get("id") in wanted), key=lambda r: wanted[r["id"]])
    summary = summarise(rows, cfg, wall_s=wall, loadavg_start=load_avg_start)
    write_summary(cfg.out, summary)
    return summary


def _remove_empty_run(out: Path, made_dir: bool) -> None:
    """Undo prepare_out_dir for a run that wrote nothing: run.json, an empty results.jsonl, and the
    directory itself when this run made it and nothing else is in it."""
    results = out / "results.jsonl"
    if results.is_file() and results.stat().st_size == 0:
        results.unlink()
    if not results.exists():
        (out / "run.json").unlink(missing_ok=True)
    if made_dir and out.is_dir() and all(LOCK_RE.fullmatch(p.name) for p in out.iterdir()):
        for p in out.iterdir():
            p.unlink()  # this run's own lock (still held: unlinking an open file is fine on POSIX)
        out.rmdir()


def _problem_id(p: dict) -> str:
    """A results id for a malformed line; the line number keeps it apart from a valid record with
    the same id (a duplicate id is one of the problems)."""
    return f"{p['id']}@line{p.get('line')}" if p.get("id") not in (None, "") else f"line-{p.get('line')}"


def _problem_hash(p: dict) -> str:
    """The record hash of a malformed line's error row: its line and error (an edited line that is
    still malformed gets its new error)."""
    return record_hash({"id": _problem_id(p), "meta": {"line": p.get("line"), "error": p.get("error")}})


def _describe(exc: BaseException) -> str:
    msg = str(exc).strip()
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


# -- command line ---------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser, single: bool = True) -> None:
    """The options of one run (single=False: all but --policy, for `eval sweep`)."""
    from .cli import THREADS
    p.add_argument("--model", default="embedded", help=f"one of: {MODEL_FORMS} (default: embedded)")
    if single:
        p.add_argument("--policy", default="", help='tokenreduce policy spec; "" or "none" = baseline')
    p.add_argument("--data", required=True, help="JSONL in the evaluation format (tokenreduce convert writes it)")
    p.add_argument("--video-root", dest="video_root", default=None, help="directory relative video paths are under")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--out", required=True, help="output directory (rerun with the same one to resume)")
    p.add_argument("--limit", type=int, default=None, help="the first N valid records only (malformed lines are reported whatever N)")
    p.add_argument("--scoring", default="loglik,generate", help="comma list of: loglik, generate")
    p.add_argument("--frame-select", dest="frame_select", default=None, choices=FRAME_SCORERS,
                   help="pick --frames of --candidates frames per question with this scorer")
    p.add_argument("--candidates", type=int, default=None, help="candidate frames for --frame-select (default 4x --frames)")
    p.add_argument("--scorer-args", dest="scorer_args", default="{}",
                   help='JSON keyword arguments for the head / clip scorer, e.g. {"path": "selector.safetensors"}')
    p.add_argument("--continuation", default=None, choices=CONTINUATIONS,
                   help="what loglik scores after the prompt (default: option for embedded, letter for hf)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=THREADS, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes over the first batch (default 1)")
    p.add_argument("--overwrite", action="store_true", help="discard the results already in --out")
    p.add_argument("--retry-errors", dest="retry_errors", action="store_true",
                   help="on resume, redo the samples whose result is an error (a missing video since copied "
                        "in, an out-of-memory); the others stay done")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--stop-after", dest="stop_after", type=int, default=None, help=argparse.SUPPRESS)


def check_threads(threads) -> int:
    """--threads as an int >= 0 (0 = torch's default), else ValueError."""
    return _check_int("threads", threads, 0)


def base_config_from_args(args) -> dict:
    """EvalConfig keyword arguments from the command line, all but `policy`."""
    try:
        scorer_args = json.loads(args.scorer_args) if isinstance(args.scorer_args, str) else dict(args.scorer_args)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--scorer-args must be a JSON object: {exc}") from None
    if not isinstance(scorer_args, dict):
        raise ValueError(f"--scorer-args must be a JSON object, got {args.scorer_args!r}")
    return dict(data=args.data, out=args.out, model=args.model, frames=args.frames, limit=args.limit,
                scoring=args.scoring, frame_select=args.frame_select, candidates=args.candidates,
                scorer_args=scorer_args, continuation=args.continuation, max_new_tokens=args.max_new_tokens,
                batch=args.batch, device=args.device, dtype=args.dtype, seed=args.seed, video_root=args.video_root,
                overwrite=args.overwrite, retry_errors=args.retry_errors, progress=args.progress,
                stop_after=args.stop_after, warmup=args.warmup)


def config_from_args(args) -> EvalConfig:
    return EvalConfig(**base_config_from_args(args), policy=args.policy)


def main_from_args(args) -> int:
    threads = check_threads(getattr(args, "threads", 0) or 0)
    if threads:
        torch.set_num_threads(threads)
    try:
        summary = run_eval(config_from_args(args))
    except KeyboardInterrupt:  # run_eval said how far it got; no traceback
        return 130
    if summary is not None:
        print(format_summary(summary))
        print(f"wrote {Path(args.out) / 'summary.md'}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tokenreduce eval videoqa", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return main_from_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
