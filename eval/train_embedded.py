"""Train the embedded video-QA model (see embedded.py) on synthetic clips, on a CPU (or a GPU: --device).

    python -m tokenreduce.eval.train_embedded --out /tmp/stage1 --minutes 65 --lr 8e-4 \
        --qtype-weights start_end=1.5,region_color=1.3 --position-aux 0.2 --frame-aux 0.2 --attention-aux 1
    python -m tokenreduce.eval.train_embedded --out eval/assets/embedded_videoqa --init /tmp/stage1 \
        --minutes 14 --lr 3e-4 --warmup 20 --qtype-weights count=2.5,start_end=1.5,region_color=1.3 \
        --position-aux 0.2 --frame-aux 0.2 --attention-aux 1 --eval-every 280 \
        --attention-aux-types region_color,first_color,start_end,brief_color

(the shipped weights: 79 minutes on a 2-core CPU; stage 2 oversamples counting and stops
supervising its attention, see answer_objects)

Losses, summed each step:
  answer      cross-entropy of the answer word at the last prompt position (full vocabulary)
  patches     auxiliary dense supervision: linear heads on the projector output of every 8x8
              patch predict the colour and the shape covering it (a vision pre-training signal
              given all along; the heads are thrown away, the shipped model is plain
              LlavaOnevisionForConditionalGeneration); --position-aux adds the patch's grid
              position, --frame-aux each visual token's frame index read from the LLM hidden
              state after --frame-aux-layer layers (1-D RoPE over one run of video tokens makes
              "which frame" implicit; without it the model learned no start/end questions)
  attention   --attention-aux: grounding supervision of where the answer position looks. In LLM
              layer --attention-aux-layer (default the last), -log of the attention mass (mean
              over heads) the last position puts on the tokens that show what the question is
              about (answer_objects: the asked object at the asked moment, the first object where
              it pops in, the cross, the counted shapes). Without it, four runs up to 42 minutes
              never learned "where is the red shape" or "colour in the top-left at the start",
              and a single-frame probe stayed at chance for 38k samples; with it the single-frame
              probe reached 81% in 200 steps. FastV reads layer K-1 = 1, not the supervised
              layer, so its ranking is the model's own.
  relevance   every `--relevance-every` steps, single frames with the frame-selection prompt
              (embedded.RELEVANCE_PROMPT): "True" when the frame shows what the question asks
              about (the brief cross), so VLMScorer works with this model
--background-dropout (not used for the shipped weights) hides a random share of the frame tokens
that show only clutter (an attention mask with the positions kept: the same as removing them
before layer 0). As a third 16-minute stage it made counting independent of how much background
the model sees (under FrameFusion at cost 0.3 counting kept 64% of 66%, where the shipped model
falls from 64% to 52%), but the unreduced accuracy on the report set fell to 89.6%; README
"Results on the embedded model" has the numbers.

The learning rate follows a warm-up and a cosine over the time budget; held-out accuracy per
question type is printed as it trains and saved in training.json next to the weights.

At each evaluation (and every --checkpoint-every steps) the run writes --out/checkpoint/: the
model, the auxiliary heads, AdamW's state, the random states of the data and of torch, the step,
samples seen and training time, and the flags. --resume (the same command plus --resume) goes on
with a killed run from there: with --max-steps it ends with the weights of a run never stopped,
bit for bit on the same device and --threads. Explicit, not automatic: a run over an --out that
holds a checkpoint is refused instead of silently resuming or overwriting it. --init is something
else: a new stage (fresh warm-up, schedule and optimizer) from a finished model.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .embedded import (DEFAULT_SIZES, RELEVANCE_PROMPT, EmbeddedProcessor, build_config, build_model,
                       build_tokenizer, config_sizes)
from .synthetic import COLOR_CLASSES, QTYPES, SHAPE_CLASSES, VideoQAGenerator, patch_labels


def make_batch(gen, proc, n, qtype=None, with_labels=True, weights=None):
    """n samples; `weights` ({qtype: weight}) oversamples question types"""
    if weights:
        names = list(weights)
        p = np.array([weights[k] for k in names], float)
        picks = gen.rng.choice(len(names), n, p=p / p.sum())
        samples = [gen.sample(names[i]) for i in picks]
    else:
        samples = [gen.sample(qtype) for _ in range(n)]
    vids, cols, shps, cmaps = [], [], [], []
    for s in samples:
        v, c, sh = gen.render(s, with_labels=True)
        vids.append(v)
        cmaps.append(c)
        if with_labels:
            p = proc.config.vision_config.patch_size
            cols.append(patch_labels(c, p))
            shps.append(patch_labels(sh, p))
    inputs = proc(text=[proc.prompt(s["question"], s["options"]) for s in samples], videos=vids)
    tok = proc.tokenizer
    answers = torch.tensor([tok.convert_tokens_to_ids(s["answer"]) for s in samples])
    options = torch.tensor([tok.convert_tokens_to_ids(s["options"]) for s in samples])
    labels = (torch.as_tensor(np.stack(cols)), torch.as_tensor(np.stack(shps))) if with_labels else None
    return samples, inputs, answers, options, labels, cmaps


def answer_objects(sample) -> tuple:
    """(colours, frames) of the objects a question is about: the asked object at the asked moment
    (region_color, start_end), the first object at its first frame (first_color), the cross where
    it shows (brief_color), every object of the counted shape in every frame (count; none for
    zero: the loss skips samples without targets). The shipped model's second stage leaves count
    out (--attention-aux-types): attention spread evenly over k objects reads the same for every
    k, so pinning the mass on them works against counting."""
    qt, objs, meta = sample["qtype"], sample["objects"], sample["meta"]
    if qt in ("region_color", "start_end"):
        return {objs[0]["color"]}, meta["frames"]
    if qt in ("first_color", "brief_color"):
        return {sample["answer"]}, meta["frames"]
    if qt == "count":
        shape = sample["question"].split()[2][:-1]  # "how many circles are there ?"
        return {o["color"] for o in objs if o["shape"] == shape}, meta["frames"]
    raise ValueError(f"unknown question type {qt!r}; valid: {', '.join(QTYPES)}")


def attention_targets(samples, color_maps, cell: int, min_pixels: int = 10, qtypes=QTYPES) -> torch.Tensor:
    """(B, T * cells) bool: the LLM tokens (one per `cell`-pixel square of a frame, as the
    projector's 2x2 pooling lays them out) that show what each question is about; none for the
    question types not in `qtypes`"""
    out = []
    for s, cm in zip(samples, color_maps):
        T, S, _ = cm.shape
        g = S // cell
        colours, frames = answer_objects(s) if s["qtype"] in qtypes else (set(), [])
        ids = [COLOR_CLASSES.index(c) for c in colours]
        hit = np.isin(cm, ids) if ids else np.zeros_like(cm, bool)
        per_cell = hit.reshape(T, g, cell, g, cell).sum((2, 4)).reshape(T, g * g) >= min_pixels
        keep = np.zeros(T, bool)
        keep[list(frames)] = True
        out.append(torch.as_tensor(per_cell & keep[:, None]).flatten())
    return torch.stack(out)


def on_sequence(input_ids, per_token, video_token_id: int) -> torch.Tensor:
    """(B, N) bool: a (B, T * cells) mask over the frame tokens (as attention_targets lays them
    out) placed on the sequence's video placeholders; the trailing newline and text are False"""
    is_video = input_ids == video_token_id
    rank = is_video.long().cumsum(-1) - 1
    frame_tok = is_video & (rank < per_token.shape[1])  # every video token but the trailing newline
    full = torch.zeros_like(is_video)
    full[frame_tok] = per_token.flatten().to(full.device)
    return full


def attention_loss(attn, input_ids, targets, video_token_id: int) -> torch.Tensor:
    """-log of the attention mass (mean over heads) the last position puts on the target tokens,
    averaged over the samples that have targets; attn (B, H, N, N) of one layer"""
    full = on_sequence(input_ids, targets, video_token_id)
    mass = (attn[:, :, -1, :] * full[:, None].to(attn.dtype)).sum(-1).mean(1)
    has = targets.any(1)
    if not bool(has.any()):
        return attn.new_zeros(())
    return -torch.log(mass[has] + 1e-6).mean()


def background_tokens(color_maps, cell: int) -> torch.Tensor:
    """(B, T * cells) bool: the frame tokens (as attention_targets lays them out) whose square
    holds no object pixel at all, only the grey clutter"""
    out = []
    for cm in color_maps:
        T, S, _ = cm.shape
        g = S // cell
        objects = (cm > 0).reshape(T, g, cell, g, cell).sum((2, 4)).reshape(T * g * g)
        out.append(torch.as_tensor(objects == 0))
    return torch.stack(out)


def background_dropout(input_ids, background, max_rate: float, rng, video_token_id: int) -> torch.Tensor:
    """(B, N) bool: the tokens to hide from every query. Half the samples hide nothing; the
    others hide each of their background tokens with a probability drawn from U(0, max_rate).
    Why: every clip has the same 128 frame tokens, so the model learned to count relative to how
    much background it sees, and removing clutter tokens (what a good reducer removes) changed
    its counts; real video LLMs see varying amounts of background (frame counts, resolutions)."""
    B = background.shape[0]
    rate = np.where(rng.random(B) < 0.5, 0.0, rng.uniform(0.0, max_rate, B))
    hide = background & (torch.as_tensor(rng.random(background.shape)) < torch.as_tensor(rate)[:, None])
    return on_sequence(input_ids, hide, video_token_id)


def relevance_batch(gen, proc, n):
    """single frames of brief-appearance clips; half show the cross"""
    frames, texts, target = [], [], []
    for _ in range(n):
        s = gen.sample("brief_color")
        v = gen.render(s)
        shown = s["meta"]["frames"]
        want = gen.rng.random() < 0.5
        others = [t for t in range(len(v)) if t not in shown]
        pool = shown if want or not others else others  # a short clip may show the cross in every frame
        t = int(gen.rng.choice(pool))
        frames.append(v[t][None])
        q = RELEVANCE_PROMPT.format(question=s["question"].strip().rstrip("?"))
        texts.append(f"USER: <image>\n{q} ASSISTANT:")
        target.append("True" if t in shown else "False")
    inputs = proc(text=texts, videos=frames)
    return inputs, torch.tensor([proc.tokenizer.convert_tokens_to_ids(x) for x in target])


def forward_last(model, inputs, hidden_layer=None, attention_layer=None, hide=None):
    """(next-token logits at the last position, the LLM hidden states after `hidden_layer` layers
    or None, layer `attention_layer`'s attention probabilities (eager attention) or None).
    `hide` ((B, N) bool): tokens no query may attend to, the others keeping their position ids;
    the same as removing them from the sequence before the first layer."""
    pos = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    if hide is not None:
        inputs = dict(inputs, attention_mask=inputs["attention_mask"] * ~hide)
    out = model(**inputs, position_ids=pos, logits_to_keep=1, output_hidden_states=hidden_layer is not None,
                output_attentions=attention_layer is not None)
    return (out.logits[:, -1], None if hidden_layer is None else out.hidden_states[hidden_layer],
            None if attention_layer is None else out.attentions[attention_layer])


def last_logits(model, inputs):
    """next-token logits at the last position"""
    return forward_last(model, inputs)[0]


def frame_index_targets(input_ids, video_token_id: int, tokens_per_frame: int):
    """(mask of the frame tokens, their frame index): every video placeholder but the trailing
    image_newline, in order"""
    is_video = input_ids == video_token_id
    rank = is_video.long().cumsum(-1) - 1
    n = is_video.sum(-1, keepdim=True)
    mask = is_video & (rank < n - 1)
    return mask, (rank // tokens_per_frame)[mask]


@torch.no_grad()
def to_device(tensors, device):
    """a dict (model inputs) or a tuple/list of tensors, moved to `device`"""
    if isinstance(tensors, dict):
        return {k: v.to(device) for k, v in tensors.items()}
    return type(tensors)(t.to(device) for t in tensors)


def resolve_device(name: str) -> torch.device:
    """--device: auto (CUDA when available, else the CPU), cpu, cuda or cuda:N"""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise ValueError(f"--device {name!r}: valid are auto, cpu, cuda, cuda:N")
    if name != "cpu" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu (or auto)")
    return torch.device(name)


def evaluate(model, proc, samples, videos, bs=50):
    """accuracy per question type: the option with the highest answer logit"""
    model.eval()
    tok = proc.tokenizer
    device = next(model.parameters()).device
    hits = {}
    for i in range(0, len(samples), bs):
        ss = samples[i:i + bs]
        inputs = proc(text=[proc.prompt(s["question"], s["options"]) for s in ss], videos=videos[i:i + bs])
        lg = last_logits(model, to_device(inputs, device)).cpu()
        opts = torch.tensor([tok.convert_tokens_to_ids(s["options"]) for s in ss])
        pick = lg.gather(1, opts).argmax(1)
        for s, p in zip(ss, pick.tolist()):
            hits.setdefault(s["qtype"], []).append(s["options"][p] == s["answer"])
    model.train()
    acc = {q: float(np.mean(h)) for q, h in sorted(hits.items())}
    acc["all"] = float(np.mean([x for h in hits.values() for x in h]))
    return acc


def training_totals(init, info: dict) -> dict:
    """stages / total_train_seconds / total_samples_seen over this run and the runs it continues
    (--init DIR with its training.json), so a continued model reports its whole training"""
    def stage(d):
        return {k: d.get(k) for k in ("train_seconds", "samples_seen", "steps", "args", "held_out")}
    prior = {}
    if init and (Path(init) / "training.json").exists():
        prior = json.loads((Path(init) / "training.json").read_text())
    stages = list(prior.get("stages") or ([stage(prior)] if prior else [])) + [stage(info)]
    return dict(stages=stages, total_train_seconds=sum(int(st["train_seconds"] or 0) for st in stages),
                total_samples_seen=sum(int(st["samples_seen"] or 0) for st in stages))


CHECKPOINT = "checkpoint"
TRAINER_STATE = "trainer_state.json"  # written last: a checkpoint folder without it is incomplete
TRAINING_STATE = "training_state.pt"
# flags that say where and how the run is carried out and reported, not what it trains: a resumed run
# may give others (--threads and --device can change the last bits of the sums: for bit-exact weights
# keep them too); every other flag must be the checkpoint's
RESUME_MAY_CHANGE = ("out", "resume", "threads", "device", "eval_every", "checkpoint_every")


def run_args(args) -> dict:
    """the flags as recorded in training.json and in a checkpoint's trainer_state.json"""
    return {k: v for k, v in vars(args).items() if k != "qtype_weight_map"}


def find_checkpoint(out) -> Path | None:
    """the complete interval checkpoint in `out`, or None. `checkpoint.prev` is the one before,
    kept only while its successor is renamed into place: a kill then leaves it as the newest."""
    for name in (CHECKPOINT, CHECKPOINT + ".prev"):
        if (Path(out) / name / TRAINER_STATE).is_file():
            return Path(out) / name
    return None


def save_checkpoint(out: Path, model, tok, heads: dict, opt, state: dict) -> None:
    """the interval checkpoint: the model and tokenizer (a loadable --init folder) and what --resume
    needs to go on as if never stopped (the auxiliary heads, AdamW's moments, the random states, the
    step, samples seen, training time and the flags). Written beside the last one and renamed into
    place, so a kill while writing leaves the previous checkpoint whole."""
    tmp, final, prev = (out / (CHECKPOINT + s) for s in (".tmp", "", ".prev"))
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    rng = dict(torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(dict(optimizer=opt.state_dict(), heads={k: h.state_dict() for k, h in heads.items()}, rng=rng),
               tmp / TRAINING_STATE)
    (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
    if final.exists():
        shutil.rmtree(prev, ignore_errors=True)
        os.replace(final, prev)
    os.replace(tmp, final)
    shutil.rmtree(prev, ignore_errors=True)


MISSING = "(not recorded)"


def resume_conflicts(args, recorded: dict) -> list:
    """(flag, the checkpoint's value, this run's value) for every flag that changes what is trained
    and differs from the one the checkpoint was written with"""
    here = json.loads(json.dumps(run_args(args)))  # as a JSON round trip gives them back
    return [(k, recorded.get(k, MISSING), here.get(k, MISSING)) for k in sorted(set(here) | set(recorded))
            if k not in RESUME_MAY_CHANGE and recorded.get(k, MISSING) != here.get(k, MISSING)]


def check_resume(parser, args) -> None:
    """--resume needs a checkpoint written with the same flags; a run without --resume into an --out
    holding one is refused too: its first interval would overwrite the killed run's progress"""
    ckpt = find_checkpoint(args.out)
    old = (Path(args.out) / CHECKPOINT / "config.json").is_file() and ckpt is None
    if not args.resume:
        if ckpt is not None:
            step = json.loads((ckpt / TRAINER_STATE).read_text())["step"]
            parser.error(f"--out {args.out}: holds {ckpt.name}/ of a run stopped at step {step}; pass --resume "
                         f"to go on with it, or remove {ckpt} to start afresh")
        if old:  # weights only, from an earlier version of this script: the new run would overwrite them
            parser.error(f"--out {args.out}: holds the checkpoint/ (weights only) of a run an earlier version of this "
                         f"script was killed in; start a new stage from it with --init {Path(args.out) / CHECKPOINT} "
                         "and another --out, or remove it to start afresh")
        return
    if ckpt is None:
        parser.error(f"--resume: --out {args.out} holds no checkpoint to resume ("
                     + ("its checkpoint/ has weights only, from an earlier version of this script: start a new "
                        f"stage from them with --init {Path(args.out) / CHECKPOINT}" if old else
                        "a finished run removes it: --init starts a new stage from a finished model")
                     + "); drop --resume for a new run")
    state = json.loads((ckpt / TRAINER_STATE).read_text())
    differ = resume_conflicts(args, state["args"])
    if differ:
        def name(k):
            return "--" + k.replace("_", "-")

        def shown(v):
            return "not given" if v is None else shlex.quote(str(v))
        fix = [f"{name(k)} {shown(a)}" if a is not None else f"drop {name(k)}" for k, a, _ in differ if a != MISSING]
        parser.error(f"--resume: {ckpt} was written with other flags ("
                     + ", ".join(f"{name(k)} {shown(a)} there, {shown(b)} here" for k, a, b in differ) + ")"
                     + ("; resume with the checkpoint's: " + " ".join(fix) if fix else "")
                     + f" (only {', '.join(name(k) for k in RESUME_MAY_CHANGE if k not in ('out', 'resume'))} "
                       "may change)")


MIN_IMAGE_SIZE = 48  # the generator's counting scenes need room for their objects (radius 7)


def parse_qtype_weights(text: str) -> dict | None:
    """'count=2.5,start_end=1.5' -> a weight per question type (1 for the others); ValueError
    naming the valid form"""
    if not text:
        return None
    weights = {q: 1.0 for q in QTYPES}
    for item in text.split(","):
        k, eq, v = (x.strip() for x in item.partition("="))
        if k not in QTYPES:
            raise ValueError(f"--qtype-weights: unknown question type {k!r}; valid: {', '.join(QTYPES)}")
        try:
            weights[k] = float(v)
        except ValueError:
            raise ValueError(f"--qtype-weights: {item.strip()!r} needs a number, e.g. {k}=2.5") from None
        if not eq or not math.isfinite(weights[k]) or weights[k] < 0:
            raise ValueError(f"--qtype-weights: {item.strip()!r}: the weight must be a number >= 0, e.g. {k}=2.5")
    if not sum(weights.values()) > 0:
        raise ValueError("--qtype-weights: at least one question type needs a weight > 0")
    return weights


def check_layers(error, args, layers: int, where: str) -> None:
    """the auxiliary losses' LLM layers within the model's `layers` (`where`: which flag says so)"""
    if args.frame_aux and args.frame_aux_layer > layers:
        error(f"--frame-aux-layer {args.frame_aux_layer}: the LLM has {layers} layers ({where}); give 0..{layers}")
    if args.attention_aux and not -layers <= args.attention_aux_layer < layers:
        error(f"--attention-aux-layer {args.attention_aux_layer}: the LLM has {layers} layers ({where}); give "
              f"{-layers}..{layers - 1} (-1 = the last)")


def check_flags(parser, args):
    """the checks that span flags, before any model is built (parser.error: exit 2)"""
    for whole, part in (("vision_hidden", "vision_heads"), ("text_hidden", "text_heads"),
                        ("text_heads", "text_kv_heads")):
        if getattr(args, whole) % getattr(args, part):
            parser.error(f"--{whole.replace('_', '-')} {getattr(args, whole)} must be a multiple of "
                         f"--{part.replace('_', '-')} {getattr(args, part)}")
    if args.image_size < MIN_IMAGE_SIZE:
        parser.error(f"--image-size {args.image_size}: the clips need at least {MIN_IMAGE_SIZE} pixels "
                     "(room for the counting scenes' objects)")
    if args.image_size % args.patch_size:
        parser.error(f"--patch-size {args.patch_size} must divide --image-size {args.image_size} "
                     "(the patch labels tile the frame)")
    try:
        args.qtype_weight_map = parse_qtype_weights(args.qtype_weights)
    except ValueError as exc:
        parser.error(str(exc))
    unknown = sorted({q.strip() for q in args.attention_aux_types.split(",") if q.strip()} - set(QTYPES))
    if unknown:
        parser.error(f"--attention-aux-types: unknown {unknown}; valid: {', '.join(QTYPES)}")
    from .cli import check_writable
    try:
        check_writable(args.out, "--out", folder=True)
    except ValueError as exc:
        parser.error(str(exc))
    check_resume(parser, args)
    if args.init:  # the checkpoint's own sizes and depth are checked once it is loaded
        if not (Path(args.init) / "config.json").is_file():
            parser.error(f"--init {args.init}: not a trained model folder (no config.json); give a previous --out")
        return
    check_layers(parser.error, args, args.text_layers, "--text-layers")


def main(argv=None):
    from .cli import THREADS, float_in, int_at_least
    pos, nonneg, positive, weight = int_at_least(1), int_at_least(0), float_in(0, low_open=True), float_in(0)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=positive, default=80.0, help="training time budget (evaluation excluded)")
    p.add_argument("--batch", type=pos, default=32)
    p.add_argument("--lr", type=positive, default=1.5e-3)
    p.add_argument("--frames", type=int_at_least(2, " (the questions ask about time)"), default=8)
    p.add_argument("--threads", type=THREADS, default=2,
                   help="CPU threads (rendering, and the model on the CPU; 0 = torch's default)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when available, else the CPU), cpu, cuda or cuda:N; clips are rendered on the CPU")
    p.add_argument("--seed", type=nonneg, default=1)
    p.add_argument("--eval-every", type=positive, default=300.0, help="seconds")
    p.add_argument("--eval-samples", type=pos, default=500)
    p.add_argument("--aux-weight", type=weight, default=0.5)
    p.add_argument("--relevance-every", type=nonneg, default=4, help="steps between relevance batches (0 = none)")
    p.add_argument("--max-steps", type=nonneg, default=0, help="stop after this many steps (0 = time budget only)")
    p.add_argument("--init", default=None,
                   help="start a new stage from the weights in this directory (a previous --out): a fresh warm-up "
                        "and schedule; --resume goes on with a killed run instead")
    p.add_argument("--resume", action="store_true",
                   help="go on with the run killed in --out from its checkpoint/ (the same flags: weights, optimizer, "
                        "schedule, step, time spent and data stream as they were; with --max-steps the same final "
                        "weights as a run never stopped)")
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=nonneg, default=0,
                   help="also write the --out/checkpoint/ that --resume reads every this many steps (0 = only at "
                        "each evaluation, every --eval-every seconds)")
    p.add_argument("--warmup", type=pos, default=100, help="warm-up steps")
    p.add_argument("--qtype-weights", dest="qtype_weights", default="",
                   help="oversample question types, e.g. start_end=3,region_color=2 (others 1)")
    p.add_argument("--position-aux", dest="position_aux", type=weight, default=0.0,
                   help="weight of an auxiliary head predicting each patch's grid position from its projector "
                        "output (keeps 'where' linearly readable for the LLM)")
    p.add_argument("--frame-aux", dest="frame_aux", type=weight, default=0.0,
                   help="weight of an auxiliary head predicting each visual token's frame index from the LLM "
                        "hidden state after --frame-aux-layer layers (1-D RoPE gives 'when' only implicitly)")
    p.add_argument("--frame-aux-layer", dest="frame_aux_layer", type=nonneg, default=2,
                   help="LLM layers before the hidden state --frame-aux reads (0..--text-layers)")
    p.add_argument("--attention-aux", dest="attention_aux", type=weight, default=0.0,
                   help="weight of a loss on the last position's attention (mean over heads) in LLM layer "
                        "--attention-aux-layer: -log of its mass on the tokens that show what the question asks "
                        "about (grounding supervision; without it the model never learned 'where is the red "
                        "shape' even on single frames)")
    p.add_argument("--attention-aux-types", dest="attention_aux_types", default=",".join(QTYPES),
                   help="question types whose attention is supervised (comma-separated; default all)")
    p.add_argument("--attention-aux-layer", dest="attention_aux_layer", type=int, default=-1,
                   help="LLM layer whose attention --attention-aux supervises (-1 = the last)")
    p.add_argument("--background-dropout", dest="background_dropout", type=float_in(0, 1), default=0.0,
                   help="hide a random share (up to this fraction, drawn per sample; half the samples hide "
                        "nothing) of the frame tokens that show no object, so the answers do not depend on how "
                        "much clutter the model sees")
    for k, v in DEFAULT_SIZES.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=pos, default=v)
    args = p.parse_args(argv)
    check_flags(p, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    out = Path(args.out)

    tok = build_tokenizer()
    cfg = build_config(tok, **{k: getattr(args, k) for k in DEFAULT_SIZES})
    ckpt = find_checkpoint(out) if args.resume else None  # check_flags found it and its flags the same
    if ckpt is not None:
        from transformers import LlavaOnevisionForConditionalGeneration
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(str(ckpt), attn_implementation="sdpa")
        cfg = model.config
    elif not args.init:
        model = build_model(cfg, seed=args.seed)
    else:
        # from_pretrained, not a raw state dict: save_pretrained writes the checkpoint's legacy key names
        from transformers import LlavaOnevisionForConditionalGeneration
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(args.init, attn_implementation="sdpa")
        have = config_sizes(model.config)
        differ = [k for k in DEFAULT_SIZES if have[k] != getattr(args, k)]
        if differ:
            p.error(f"--init {args.init}: the checkpoint's sizes differ from this run's size flags ("
                    + ", ".join(f"{k} {have[k]} there, {getattr(args, k)} here" for k in differ)
                    + "); pass " + " ".join(f"--{k.replace('_', '-')} {have[k]}" for k in differ))
        check_layers(p.error, args, have["text_layers"], f"--init {args.init}")
        cfg = model.config
        torch.manual_seed(args.seed)  # the auxiliary heads below: seeded as after build_model
        print(f"continuing from {args.init}", flush=True)
    out.mkdir(parents=True, exist_ok=True)  # after the checks: a refused run leaves no folder
    att_layer = args.attention_aux_layer % cfg.text_config.num_hidden_layers
    att_types = [q.strip() for q in args.attention_aux_types.split(",") if q.strip()]
    # eager attention returns the probabilities --attention-aux supervises
    model.config.text_config._attn_implementation = "eager" if args.attention_aux else "sdpa"
    proc = EmbeddedProcessor(tok, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params} (vision {sum(p.numel() for p in model.model.vision_tower.parameters())}, "
          f"llm {sum(p.numel() for p in model.model.language_model.parameters())})", flush=True)

    # auxiliary patch heads on the projector output (not part of the shipped model)
    captured = {}
    hook = model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: captured.__setitem__("x", o))
    D = cfg.text_config.hidden_size
    color_head, shape_head = torch.nn.Linear(D, len(COLOR_CLASSES)), torch.nn.Linear(D, len(SHAPE_CLASSES))
    n_patches = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    position_head = torch.nn.Linear(D, n_patches)
    frame_head = torch.nn.Linear(D, args.frames)
    for module in (model, color_head, shape_head, position_head, frame_head):
        module.to(device)
    heads = dict(color=color_head, shape=shape_head, position=position_head, frame=frame_head)
    params = [*model.parameters(), *color_head.parameters(), *shape_head.parameters(), *position_head.parameters(),
              *frame_head.parameters()]
    weights = args.qtype_weight_map
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))

    gen = VideoQAGenerator(frames=args.frames, size=args.image_size, seed=args.seed)
    egen = VideoQAGenerator(frames=args.frames, size=args.image_size, seed=12345)
    eval_samples = [egen.sample(QTYPES[i % len(QTYPES)]) for i in range(args.eval_samples)]
    eval_videos = [egen.render(s) for s in eval_samples]

    budget = args.minutes * 60.0
    warmup = args.warmup
    log, step, seen = [], 0, 0
    t0 = time.time()
    last_eval = 0.0
    ema = {}
    resumed_at = []
    if ckpt is not None:
        state = json.loads((ckpt / TRAINER_STATE).read_text())
        saved = torch.load(ckpt / TRAINING_STATE, map_location="cpu", weights_only=True)
        for name, head in heads.items():
            head.load_state_dict(saved["heads"][name])
        opt.load_state_dict(saved["optimizer"])  # AdamW's moments and step counts, on the parameters' device
        gen.rng.bit_generator.state = state["data_rng"]  # the clips the killed run would have drawn next
        log, step, seen, ema, last_eval = state["log"], state["step"], state["seen"], state["ema"], state["last_eval"]
        resumed_at = state["resumed_at"] + [step]
        t0 -= state["train_seconds"]  # the --minutes budget and a time-based schedule go on where they were
        # last, as building the heads above drew from torch's generator; no step draws from it today (the
        # model has no dropout), so this keeps a loss that will draw exact too
        torch.set_rng_state(saved["rng"]["torch"])
        if "cuda" in saved["rng"] and device.type == "cuda":
            torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
        print(f"resuming {ckpt} at step {step} ({state['train_seconds']:.0f}s of training)", flush=True)
    model.train()
    while True:
        elapsed = time.time() - t0
        if elapsed > budget or (args.max_steps and step >= args.max_steps):
            break
        # the cosine runs over --max-steps when given (the same steps give the same weights on any
        # machine; the time budget still stops the run), else over the time budget
        progress = step / args.max_steps if args.max_steps else elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
        for g in opt.param_groups:
            g["lr"] = lr
        samples, inputs, answers, _, (cols, shps), cmaps = make_batch(gen, proc, args.batch, weights=weights)
        inputs, (answers, cols, shps) = to_device(inputs, device), to_device((answers, cols, shps), device)
        hide = None
        if args.background_dropout:
            hide = background_dropout(inputs["input_ids"], background_tokens(cmaps, 2 * cfg.vision_config.patch_size),
                                      args.background_dropout, gen.rng, cfg.video_token_id)
        logits, hidden, attn = forward_last(model, inputs, hidden_layer=args.frame_aux_layer if args.frame_aux else None,
                                            attention_layer=att_layer if args.attention_aux else None, hide=hide)
        loss_answer = F.cross_entropy(logits, answers)
        feats = captured.pop("x")  # (B*T, patches, D)
        loss_aux = (F.cross_entropy(color_head(feats).flatten(0, 1), cols.flatten())
                    + F.cross_entropy(shape_head(feats).flatten(0, 1), shps.flatten()))
        loss = loss_answer + args.aux_weight * loss_aux
        losses = {"answer": loss_answer.item(), "aux": loss_aux.item()}
        if args.frame_aux:
            mask, frame_idx = frame_index_targets(inputs["input_ids"], cfg.video_token_id, proc.tokens_per_frame)
            loss_frame = F.cross_entropy(frame_head(hidden[mask]), frame_idx)
            loss = loss_frame * args.frame_aux + loss
            losses["frame"] = loss_frame.item()
        if args.attention_aux:
            targets = attention_targets(samples, cmaps, cell=2 * cfg.vision_config.patch_size,
                                        qtypes=att_types).to(device)
            loss_att = attention_loss(attn, inputs["input_ids"], targets, cfg.video_token_id)
            loss = loss + args.attention_aux * loss_att
            losses["attention"] = loss_att.item()
        if args.position_aux:
            where = torch.arange(feats.shape[1], device=device).repeat(feats.shape[0])
            loss_pos = F.cross_entropy(position_head(feats).flatten(0, 1), where)
            loss = loss + args.position_aux * loss_pos
            losses["position"] = loss_pos.item()
        if args.relevance_every and step % args.relevance_every == 0:
            r_inputs, r_target = relevance_batch(gen, proc, args.batch)
            loss_rel = F.cross_entropy(last_logits(model, to_device(r_inputs, device)), r_target.to(device))
            captured.pop("x", None)
            loss = loss + loss_rel
            losses["relevance"] = loss_rel.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        seen += args.batch
        for k, v in losses.items():
            ema[k] = v if k not in ema else 0.95 * ema[k] + 0.05 * v
        if step % 25 == 0:
            print(f"step {step} t={time.time() - t0:.0f}s lr={lr:.2e} " +
                  " ".join(f"{k}={v:.3f}" for k, v in ema.items()), flush=True)
        te = time.time()
        evaluating = te - t0 - last_eval > args.eval_every
        if evaluating:
            acc = evaluate(model, proc, eval_samples, eval_videos)
            last_eval = te - t0
            print(f"EVAL t={last_eval:.0f}s step={step} seen={seen} " + json.dumps({k: round(v, 3) for k, v in acc.items()}),
                  flush=True)
            log.append(dict(t=round(last_eval), step=step, seen=seen, **{k: round(v, 4) for k, v in ema.items()}, acc=acc))
        if evaluating or (args.checkpoint_every and step % args.checkpoint_every == 0):
            # a kill loses at most one interval; the state is the one after this step, so --resume
            # starts with the step an uninterrupted run would take next
            save_checkpoint(out, model, tok, heads, opt, dict(
                step=step, seen=seen, train_seconds=te - t0, last_eval=last_eval, ema=ema, log=log,
                resumed_at=resumed_at, data_rng=gen.rng.bit_generator.state, args=run_args(args)))
            t0 += time.time() - te  # evaluation and checkpoint writing are not training time
    hook.remove()
    train_seconds = time.time() - t0
    acc = evaluate(model, proc, eval_samples, eval_videos)
    print(f"FINAL step={step} seen={seen} train_time={train_seconds:.0f}s " + json.dumps({k: round(v, 3) for k, v in acc.items()}),
          flush=True)
    log.append(dict(t=round(train_seconds), step=step, seen=seen, acc=acc))
    model.to("cpu").save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    info = dict(params=n_params, steps=step, samples_seen=seen, train_seconds=round(train_seconds),
                threads=torch.get_num_threads(), device=str(device), load_average=os.getloadavg(), args=run_args(args),
                held_out=acc, held_out_samples=args.eval_samples, held_out_seed=12345, log=log, resumed_at=resumed_at)
    info.update(training_totals(args.init, info))
    (out / "training.json").write_text(json.dumps(info, indent=1))
    for name in (CHECKPOINT, CHECKPOINT + ".tmp", CHECKPOINT + ".prev"):  # superseded by the final weights
        shutil.rmtree(out / name, ignore_errors=True)
    print(f"saved {out} ({(out / 'model.safetensors').stat().st_size / 1e6:.1f} MB)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
