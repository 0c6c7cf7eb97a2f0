"""Train the small frame-selector head (`head` scorer) on synthetic question-video pairs, on CPU.

    python -m tokenreduce.eval.train_frame_selector --out selector.safetensors --steps 400

What it is, honestly: a miniature of the paper's selector (Hu et al., CVPR 2025) trained on a
synthetic task, so the whole pipeline (features -> head -> BCE on frame labels -> safetensors ->
`HeadScorer` -> `frame_select`) can be built and checked offline in about a minute. Each clip
has n frames of noise with one coloured square per frame; the question names a colour
("when does the red square appear?"); a frame's label is 1 when its square has that colour.
The paper's labels come from an M-LLM (spatial p(True)) and GPT-4o-mini over captions
(temporal); its features from SigLIP + a 1.5B LLM. Plugging real features and labels into the
same head is a matter of passing `frame_encoder` / `text_encoder` to HeadScorer and training on
them with `train(...)`'s loop; nothing here pretends the synthetic head understands real video.

Reports the precision of the k selected frames (greedy suppression) against uniform sampling
on held-out synthetic clips.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tokenreduce.reducers.frame_select import suppress_select

from .frame_scorers import FrameSelectorHead, hashed_text_features, pooled_frame_features
from .video import uniform_indices

COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.1, 0.2, 1.0), "yellow": (1.0, 1.0, 0.1),
           "cyan": (0.1, 1.0, 1.0), "magenta": (1.0, 0.1, 1.0), "white": (1.0, 1.0, 1.0), "orange": (1.0, 0.55, 0.0)}
TEMPLATES = ("when does the {c} square appear?", "find the frames with a {c} object",
             "which moments show something {c}?", "is there a {c} shape? show me where")


def synthetic_batch(batch: int, frames: int, size: int = 24, generator: torch.Generator | None = None):
    """(pixels (B, T, 3, size, size) in [0, 1], questions [B], labels (B, T) float)."""
    g = generator or torch.Generator().manual_seed(0)
    names = list(COLOURS)
    pal = torch.tensor([COLOURS[n] for n in names])
    target = torch.randint(len(names), (batch,), generator=g)
    colours = torch.randint(len(names), (batch, frames), generator=g)
    colours = torch.where(colours == target[:, None], (target[:, None] + 1) % len(names), colours)
    # one or two short segments per clip carry the target colour
    t = torch.arange(frames)
    for _ in range(2):
        length = torch.randint(1, max(2, frames // 6), (batch,), generator=g)
        start = (torch.rand(batch, generator=g) * (frames - length + 1)).long()
        on = (t[None] >= start[:, None]) & (t[None] < (start + length)[:, None])
        if _ == 1:  # the second segment only in about half of the clips
            on &= (torch.rand(batch, generator=g) < 0.5)[:, None]
        colours = torch.where(on, target[:, None], colours)
    labels = (colours == target[:, None]).float()
    # noise background with one coloured square per frame
    side = torch.randint(size // 3, size // 2 + 1, (batch, frames), generator=g)
    y0 = (torch.rand(batch, frames, generator=g) * (size - side + 1)).long()
    x0 = (torch.rand(batch, frames, generator=g) * (size - side + 1)).long()
    r = torch.arange(size)
    rows = (r >= y0[..., None]) & (r < (y0 + side)[..., None])
    cols = (r >= x0[..., None]) & (r < (x0 + side)[..., None])
    mask = rows[..., :, None] & cols[..., None, :]  # (B, T, size, size)
    pix = torch.rand(batch, frames, 3, size, size, generator=g) * 0.35 + 0.2
    pix = torch.where(mask[:, :, None], pal[colours][..., None, None], pix)
    tmpl = torch.randint(len(TEMPLATES), (batch,), generator=g)
    questions = [TEMPLATES[int(i)].format(c=names[int(c)]) for i, c in zip(tmpl, target)]
    return pix, questions, labels


def features(pixels, questions, text_dim: int = 64):
    return pooled_frame_features(pixels, 3), hashed_text_features(questions, text_dim)


@torch.no_grad()
def evaluate(head: FrameSelectorHead, clips: int = 64, frames: int = 32, k: int = 4, seed: int = 1234) -> dict:
    """Precision of the k selected frames (greedy suppression) vs uniform sampling, held-out clips."""
    head.eval()
    g = torch.Generator().manual_seed(seed)
    pix, qs, lab = synthetic_batch(clips, frames, generator=g)
    logits = head(*features(pix, qs, head.config["text_dim"]))
    sel = suppress_select(torch.sigmoid(logits), k)
    prec = float(lab.gather(1, sel).mean())
    uni = torch.as_tensor(uniform_indices(frames, k))
    prec_uni = float(lab[:, uni].mean())
    hit = float((lab.gather(1, sel).amax(1)).mean())
    hit_uni = float(lab[:, uni].amax(1).mean())
    oracle = float(lab.gather(1, suppress_select(lab + 1e-3 * torch.rand(lab.shape, generator=g), k)).mean())
    bce = float(F.binary_cross_entropy_with_logits(logits, lab))
    return {"precision_at_k": prec, "uniform_precision_at_k": prec_uni, "oracle_precision_at_k": oracle,
            "hit_rate": hit, "uniform_hit_rate": hit_uni, "bce": bce, "k": k, "frames": frames}


def train(steps: int = 400, batch: int = 32, frames: int = 32, lr: float = 2e-3, seed: int = 0,
          width: int = 64, depth: int = 2, log_every: int = 50, verbose: bool = True):
    """Train a FrameSelectorHead from scratch; returns (head, history)."""
    torch.manual_seed(seed)
    head = FrameSelectorHead(frame_dim=27, text_dim=64, width=width, depth=depth)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    # OneCycleLR divides by each phase's length: the warm-up must end at step >= 1 and before the
    # last (steps=20 made it 0); 5% from 40 steps on, as before
    pct = 0.75 if steps <= 2 else max(0.05, 2.0 / steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=pct)
    g = torch.Generator().manual_seed(seed + 1)
    history = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        head.train()
        pix, qs, lab = synthetic_batch(batch, frames, generator=g)
        # positives are rare: weight them up so the head does not settle on "never"
        pos_weight = ((lab.numel() - lab.sum()) / lab.sum().clamp(min=1)).clamp(max=10.0)
        loss = F.binary_cross_entropy_with_logits(head(*features(pix, qs)), lab, pos_weight=pos_weight)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            rec = {"step": step, "loss": float(loss.detach()), "seconds": round(time.perf_counter() - t0, 1)}
            history.append(rec)
            if verbose:
                print(json.dumps(rec), flush=True)
    return head.eval(), history


def main(argv=None):
    from .cli import float_in, int_at_least
    pos = int_at_least(1)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="frame_selector.safetensors",
                    help="the safetensors FILE to save the head to (its folder is created)")
    ap.add_argument("--steps", type=pos, default=400)
    ap.add_argument("--batch", type=pos, default=32)
    ap.add_argument("--frames", type=pos, default=32, help="candidate frames per synthetic clip")
    ap.add_argument("--lr", type=float_in(0, low_open=True), default=2e-3)
    ap.add_argument("--seed", type=int_at_least(0), default=0)
    ap.add_argument("--k", type=pos, default=4, help="frames selected in the evaluation (at most --frames)")
    args = ap.parse_args(argv)
    if args.k > args.frames:  # before training, not after it
        ap.error(f"--k {args.k} is more than --frames {args.frames}: the evaluation selects k of the clip's frames; "
                 f"give --k 1..{args.frames}")
    if Path(args.out).is_dir():
        raise SystemExit(f"--out {args.out} is a folder; give the file to write, e.g. {Path(args.out) / 'selector.safetensors'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)  # before training, not after it
    head, _ = train(steps=args.steps, batch=args.batch, frames=args.frames, lr=args.lr, seed=args.seed)
    head.save(args.out)
    report = evaluate(head, frames=args.frames, k=args.k)
    report["saved"] = args.out
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
