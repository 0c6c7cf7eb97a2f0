"""An lmms-eval model (`--model tokenreduce`) that runs an HF LLaVA-family model under a
tokenreduce policy, so every lmms-eval video / image task can measure a reduction.

    pip install lmms-eval            # optional: tokenreduce never needs it otherwise
    python -m lmms_eval --model tokenreduce \
        --model_args pretrained=llava-hf/llava-onevision-qwen2-0.5b-ov-hf,policy=policy.yaml,num_frames=16 \
        --tasks videomme --batch_size 1

How lmms-eval finds it (read from EvolvingLMMs-Lab/lmms-eval, lmms_eval/models/registry_v2.py
and models/__init__.py, 2026-08): at import, `lmms_eval.models` loads every entry point of the
group `lmms_eval.models`; a payload may be a `ModelManifest`, a list of them, or a callable
returning either. tokenreduce's pyproject declares

    [project.entry-points."lmms_eval.models"]
    tokenreduce = "tokenreduce.eval.lmms_plugin:lmms_eval_manifest"

and the manifest points at `tokenreduce.eval.lmms_plugin.TokenReduceLMM`, a "simple" model
(`is_simple = True`): lmms-eval hands it `Instance`s whose `.args` are
`(context, gen_kwargs, doc_to_visual, doc_id, task, split)` for generate_until and
`(context, doc_to_target, doc_to_visual, doc_id, task, split)` for loglikelihood, and the
model calls `doc_to_visual(self.task_dict[task][split][doc_id])` for the media (video paths,
PIL images). (`--include_path` only adds task YAML folders; it does not register models.)

lmms-eval is imported only when `TokenReduceLMM` is first accessed. The request handling is in
plain functions and `ReducedVLM`, which need neither lmms-eval nor a GPU, so they are tested
on the embedded model.

model_args: pretrained (an HF id or folder; "embedded" for the model shipped with tokenreduce,
"embedded:DIR" for another trained copy, "embedded-random" for a random-init one: plumbing
checks only), policy (a one-line spec or a YAML/JSON path; quote a spec that has commas:
policy='llm.layer.2=fastv(ratio=0.75)'), num_frames (default 8), device, dtype (float32,
float16, bfloat16, auto), max_new_tokens (default when a task gives none: 32).
"""
from __future__ import annotations

import logging
import math
import os

import numpy as np
import torch

log = logging.getLogger(__name__)

MODEL_NAME = "tokenreduce"
CLASS_PATH = "tokenreduce.eval.lmms_plugin.TokenReduceLMM"
INSTALL_HINT = "pip install lmms-eval"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
EMBEDDED = ("embedded", "embedded-random")


# -- model and inputs ---------------------------------------------------------------------------
def load_model(pretrained: str, device: str = "cpu", dtype="float32"):
    """(model, processor) for `pretrained`: "embedded", "embedded:DIR", "embedded-random", or an
    HF LLaVA-family checkpoint (id or folder) loaded with AutoModelForImageTextToText."""
    if dtype != "auto" and dtype not in DTYPES and not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; valid: auto, {', '.join(DTYPES)}")
    dt = DTYPES.get(dtype, dtype) if dtype != "auto" else None
    pretrained = str(pretrained)
    if pretrained == "embedded-random":
        from .embedded import EmbeddedProcessor, build_config, build_model, build_tokenizer
        tok = build_tokenizer()
        cfg = build_config(tok)
        model = build_model(cfg).eval().to(device=device, dtype=dt or torch.float32)
        return model, EmbeddedProcessor(tok, cfg)
    if pretrained == "embedded" or pretrained.startswith("embedded:"):
        from .embedded import load_embedded
        path = pretrained.split(":", 1)[1] if ":" in pretrained else None
        return load_embedded(path, device=device, dtype=dt or torch.float32)
    from transformers import AutoModelForImageTextToText, AutoProcessor
    processor = AutoProcessor.from_pretrained(pretrained)
    kw = {"dtype": dt} if dt is not None else {"dtype": "auto"}
    model = AutoModelForImageTextToText.from_pretrained(pretrained, **kw).to(device).eval()
    return model, processor


def load_visuals(visuals, num_frames: int):
    """lmms-eval's doc_to_visual output -> (kind, data).

    [] or None -> ("text", None); video paths (str) -> ("video", [frames (T,H,W,3) uint8, ...])
    decoded with tokenreduce.eval.video.read_frames (uniform, endpoints included, as lmms-eval);
    PIL images or (H,W,3) uint8 arrays -> ("image", [arrays]). Raises ValueError for anything
    else and VideoDecodeError for an unreadable video."""
    visuals = [] if visuals is None else list(visuals)
    if not visuals:
        return "text", None
    if all(isinstance(v, str) for v in visuals):
        from .video import read_frames
        return "video", [read_frames(v, num_frames=num_frames)[0] for v in visuals]
    images = []
    for v in visuals:
        if isinstance(v, np.ndarray) and v.ndim == 3:
            images.append(v)
        elif hasattr(v, "convert") and hasattr(v, "size"):  # a PIL image, without importing PIL
            images.append(np.asarray(v.convert("RGB")))
        else:
            raise ValueError(f"unsupported visual {type(v).__name__}; the tokenreduce lmms-eval model takes video paths "
                             "(str), PIL images or (H, W, 3) uint8 arrays, not a mix of videos and images")
    return "image", images


def build_prompt(context: str, processor, kind: str, count: int = 1) -> str:
    """The model's text for an lmms-eval context with `count` videos / images.

    A processor with a chat template gets a user turn [media..., text] and the generation
    prompt; one without (the embedded model) gets the placeholders before the context. A
    context that already holds the processor's placeholder is used as it is."""
    if kind not in ("video", "image", "text"):
        raise ValueError(f"unknown visual kind {kind!r}; valid: video, image, text")
    token = getattr(processor, f"{kind}_token", None) if kind != "text" else None
    if token and token in context:
        return context
    if getattr(processor, "chat_template", None):
        content = [{"type": kind} for _ in range(count if kind != "text" else 0)]
        content.append({"type": "text", "text": context})
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    if kind == "text":
        return context
    if not token:
        raise ValueError(f"processor {type(processor).__name__} has neither a chat template nor a {kind}_token")
    return " ".join([token] * count) + " " + context


def model_inputs(processor, prompt: str, kind: str, data, model) -> dict:
    """processor(text=[prompt], videos= / images=data) on the model's device, floats in its dtype."""
    if kind == "video":
        enc = processor(text=[prompt], videos=data, return_tensors="pt")
    elif kind == "image":
        enc = processor(text=[prompt], images=data, return_tensors="pt")
    else:
        enc = processor(text=[prompt], return_tensors="pt")
    p = next(model.parameters())
    return {k: (v.to(p.device, p.dtype) if v.is_floating_point() else v.to(p.device)) if torch.is_tensor(v) else v
            for k, v in dict(enc).items()}


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def continuation_ids(processor, continuation: str) -> list:
    """Token ids of `continuation`, encoded alone (as lm-eval does: context and continuation are
    tokenized separately, so a context's expanded visual tokens cannot merge with it)."""
    ids = _tokenizer(processor)(continuation, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    return list(ids)


@torch.inference_mode()
def continuation_logprob(model, inputs: dict, cont_ids) -> tuple:
    """(sum of log p(continuation tokens | inputs, earlier continuation tokens), is_greedy).

    The logits are read from the end of the output: reducers inside the LLM drop visual
    positions, never the trailing text, so the last len(cont)+1 positions stay aligned."""
    cont = torch.as_tensor(cont_ids, dtype=torch.long, device=inputs["input_ids"].device)[None]
    feed = dict(inputs)
    feed["input_ids"] = torch.cat([inputs["input_ids"], cont], dim=1)
    if inputs.get("attention_mask") is not None:
        feed["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(cont)], dim=1)
    logits = model(**feed).logits[0, -(cont.shape[1] + 1):-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, cont[0, :, None])[:, 0]
    return float(logp.sum()), bool((logits.argmax(-1) == cont[0]).all())


@torch.inference_mode()
def generate_text(model, processor, inputs: dict, gen_kwargs: dict | None = None, default_max_new_tokens: int = 32) -> str:
    """Greedy or sampled generation, cut at the first `until` string. A task's `do_sample`
    decides (tasks such as mmvet give temperature 0.2 with do_sample false: greedy); without it,
    temperature > 0 samples."""
    gk = dict(gen_kwargs or {})
    until = gk.pop("until", None)
    until = [until] if isinstance(until, str) else list(until or [])
    temperature = float(gk.get("temperature", 0) or 0)
    sample = bool(gk["do_sample"]) if gk.get("do_sample") is not None else temperature > 0
    kw = dict(max_new_tokens=int(gk.get("max_new_tokens", default_max_new_tokens)), do_sample=sample)
    if sample:
        if temperature > 0:
            kw["temperature"] = temperature
        if gk.get("top_p") is not None:
            kw["top_p"] = float(gk["top_p"])
    tok = _tokenizer(processor)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = model.generate(**inputs, pad_token_id=pad, **kw)
    text = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    for stop in until:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text


class ReducedVLM:
    """A VLM under a tokenreduce policy, answering lmms-eval-style requests one at a time.

    model, processor: as from `load_model`; policy: anything `tokenreduce.reduce` takes, or None
    for the unreduced model. Each request sets handle.context["question"] to its context (for
    query-aware reducers such as frame_select with the vlm scorer) and appends
    {tokens per site, flops_fraction} of its forward to `self.stats`."""

    def __init__(self, model, processor, policy=None, num_frames: int = 8, max_new_tokens: int = 32):
        if int(num_frames) < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.model, self.processor = model, processor
        self.num_frames, self.max_new_tokens = int(num_frames), int(max_new_tokens)
        self.handle = None
        if policy not in (None, "", "none"):
            import tokenreduce
            for stage in tokenreduce.Policy.coerce(policy).stages:
                if stage.reducer.name == "frame_select" and getattr(stage.reducer, "scorer", None) == "vlm":
                    # its scorer is the model itself, run unreduced per frame: the eval runner does that
                    # (tokenreduce eval videoqa --frame-select vlm); a policy string cannot hand it the model
                    raise ValueError("frame_select(scorer='vlm') needs the model as its scorer, which a policy in "
                                     "model_args cannot give it; use scorer='clip', 'head' or 'uniform' here, or "
                                     "`tokenreduce eval videoqa --frame-select vlm`")
            self.handle = tokenreduce.reduce(model, policy)
        self.stats: list = []

    def _inputs(self, context: str, visuals):
        kind, data = load_visuals(visuals, self.num_frames)
        prompt = build_prompt(context, self.processor, kind, count=len(data) if data else 0)
        if self.handle is not None:
            self.handle.context["question"] = context
        return model_inputs(self.processor, prompt, kind, data, self.model)

    def _record(self):
        if self.handle is not None:
            s = self.handle.stats
            self.stats.append({"sites": {k: v["tokens_out"] for k, v in s.get("sites", {}).items()},
                               "flops_fraction": s.get("flops_fraction")})

    def answer(self, context: str, visuals, gen_kwargs: dict | None = None) -> str:
        text = generate_text(self.model, self.processor, self._inputs(context, visuals), gen_kwargs,
                             self.max_new_tokens)
        self._record()
        return text

    def score(self, context: str, continuation: str, visuals) -> tuple:
        """(log-likelihood of `continuation` after the context and visuals, is_greedy)"""
        result = continuation_logprob(self.model, self._inputs(context, visuals),
                                      continuation_ids(self.processor, continuation))
        self._record()
        return result

    def close(self):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def _strip_quotes(s):
    if isinstance(s, str) and len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
        return s[1:-1]
    return s


# -- lmms-eval task functions for tokenreduce JSONL datasets -----------------------------------
# A task YAML with `dataset_path: json` and `data_files` pointing at a JSONL written by
# `tokenreduce convert` (absolute video paths) can use these through a two-line utils.py; see
# docs/videoqa_data.md. They take the record as lmms-eval's `doc`.
LETTER_POST_PROMPT = "Answer with the option's letter from the given choices directly."


def doc_to_visual(doc) -> list:
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None) -> str:
    """style "letters" (default): question, "A. option" lines, post_prompt; style "embedded":
    the embedded model's training prompt without its <video> placeholder."""
    kw = lmms_eval_specific_kwargs or {}
    style = kw.get("style", "letters")
    if style == "embedded":
        from .embedded import EmbeddedProcessor
        return EmbeddedProcessor.prompt(doc["question"], doc["options"]).replace("<video> ", "", 1)
    if style != "letters":
        raise ValueError(f"unknown prompt style {style!r}; valid: letters, embedded")
    from .videoqa_data import LETTERS
    lines = [f"{LETTERS[i]}. {o}" for i, o in enumerate(doc["options"])]
    return (kw.get("pre_prompt", "") + doc["question"] + "\n" + "\n".join(lines) + "\n"
            + kw.get("post_prompt", LETTER_POST_PROMPT))


def doc_to_target(doc) -> str:
    return doc["options"][doc["answer"]]


def parse_choice(prediction: str, options) -> int | None:
    """The option a free-form answer picks: an option text equal to the answer, else a leading
    letter ("B", "B.", "(B) ..."), else the one option contained as a phrase in the answer; None
    if neither. Stricter than the runner's parse_choice, which takes an option that merely starts
    the answer: "one or two" is None here. Trailing punctuation is ignored on both sides
    (Video-MME's options end in a full stop)."""
    import re

    from .videoqa_data import LETTERS
    text = prediction.strip()

    def norm(t):
        return re.sub(r"[\s.,;:!?]+$", "", str(t).strip().lower())
    low = norm(text)
    exact = [i for i, o in enumerate(options) if norm(o) and norm(o) == low]
    if len(exact) == 1:  # before the letter: "A man is running." is an option's text, not A
        return exact[0]
    m = re.match(r"^\(?([A-J])(?:[.):]|\s|$)", text)
    if m and LETTERS.index(m.group(1)) < len(options):
        return LETTERS.index(m.group(1))
    inside = [i for i, o in enumerate(options)
              if norm(o) and re.search(rf"(?<!\w){re.escape(norm(o))}(?!\w)", low)]
    return inside[0] if len(inside) == 1 else None


def process_results(doc, results) -> dict:
    """{"accuracy": 1.0 or 0.0} for lmms-eval's `mean` aggregation."""
    return {"accuracy": float(parse_choice(results[0], doc["options"]) == doc["answer"])}


# -- lmms-eval glue -----------------------------------------------------------------------------
def lmms_eval_manifest():
    """Entry-point payload for the `lmms_eval.models` group (lmms-eval's ModelRegistryV2)."""
    try:
        from lmms_eval.models.registry_v2 import ModelManifest
    except ImportError as exc:
        raise ImportError(f"the tokenreduce lmms-eval plugin needs lmms-eval: {INSTALL_HINT} ({exc})") from exc
    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def _build_lmms_class():
    try:
        from lmms_eval.api.model import lmms
        from lmms_eval.api.registry import register_model
    except ImportError as exc:
        raise ImportError(f"tokenreduce.eval.lmms_plugin.TokenReduceLMM needs lmms-eval: {INSTALL_HINT} "
                          f"({exc}); the rest of tokenreduce works without it") from exc
    from tokenreduce.errors import TokenReduceError

    from .video import VideoDecodeError
    # what one request's input can cause (an unreadable video, two videos in one document for a
    # model that takes one, a reducer refusing an image): that sample fails, the run goes on
    REQUEST_ERRORS = (VideoDecodeError, ValueError, TokenReduceError)

    class TokenReduceLMM(lmms):
        """lmms-eval "simple" model: an HF LLaVA-family VLM (or the embedded model) under a
        tokenreduce policy. See the module docstring for model_args."""

        is_simple = True
        MODEL_ARGS = ("pretrained", "policy", "num_frames", "device", "dtype", "max_new_tokens", "batch_size",
                      "max_batch_size")

        def __init__(self, pretrained: str = "embedded", policy=None, num_frames: int = 8, device=None,
                     dtype: str = "float32", max_new_tokens: int = 32, batch_size=1, max_batch_size=None, **kwargs):
            super().__init__()
            if kwargs:
                raise ValueError(f"unknown model_args {sorted(kwargs)}; valid: {', '.join(self.MODEL_ARGS)}")
            if str(batch_size).strip() not in ("1", "1.0"):  # "auto" and the like included
                raise ValueError(f"the tokenreduce model runs one request at a time: batch_size must be 1, "
                                 f"got {batch_size!r}")
            if device is None:  # under accelerate launch each process takes its own GPU
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
            self._device = torch.device(device)
            model, processor = load_model(pretrained, device=device, dtype=dtype)
            self.runner = ReducedVLM(model, processor, _strip_quotes(policy), num_frames=num_frames,
                                     max_new_tokens=max_new_tokens)
            self.failures: list = []

        @property
        def device(self):  # lmms-eval's evaluator reads it when WORLD_SIZE > 1
            return self._device

        def _visuals(self, doc_to_visual, doc_id, task, split):
            return doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []

        def generate_until(self, requests) -> list:
            out = []
            for req in requests:
                context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
                try:
                    text = self.runner.answer(context, self._visuals(doc_to_visual, doc_id, task, split), gen_kwargs)
                except REQUEST_ERRORS as exc:  # one bad sample must not end a benchmark run
                    log.warning("%s/%s doc %s: %s", task, split, doc_id, exc)
                    self.failures.append({"task": task, "doc_id": doc_id, "error": str(exc)})
                    text = ""
                out.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            return out

        def loglikelihood(self, requests) -> list:
            out = []
            for req in requests:
                context, doc_to_target, doc_to_visual, doc_id, task, split = req.args
                cont = doc_to_target if isinstance(doc_to_target, str) else \
                    doc_to_target(self.task_dict[task][split][doc_id])
                try:
                    res = self.runner.score(context, cont, self._visuals(doc_to_visual, doc_id, task, split))
                except REQUEST_ERRORS as exc:
                    log.warning("%s/%s doc %s: %s", task, split, doc_id, exc)
                    self.failures.append({"task": task, "doc_id": doc_id, "error": str(exc)})
                    res = (-math.inf, False)
                out.append(res)
                self.cache_hook.add_partial("loglikelihood", (context, cont), res)
            return out

        def generate_until_multi_round(self, requests) -> list:
            raise NotImplementedError("the tokenreduce lmms-eval model does not do multi-round generation; "
                                      "use single-round tasks (generate_until / loglikelihood)")

    TokenReduceLMM.__module__ = __name__
    TokenReduceLMM.__qualname__ = "TokenReduceLMM"
    register_model(MODEL_NAME)(TokenReduceLMM)
    return TokenReduceLMM


def __getattr__(name):
    # built on first access so that importing this module never needs lmms-eval
    if name == "TokenReduceLMM":
        cls = _build_lmms_class()
        globals()["TokenReduceLMM"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
