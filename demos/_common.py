"""What both demos share: command-line flags, input errors shown in the page, interleaved
timing, colours and figure rendering. No Gradio here except in `launch` (the Gradio layer of
each demo stays a thin shell over plain, unit-tested functions)."""
from __future__ import annotations

import argparse
import colorsys
import html
import io
import os
import re
import statistics
import threading
import time

import numpy as np

#: env var that forces the fast path (tiny / random-init models), e.g. for tests
MODEL_ENV = "TOKENREDUCE_DEMO_MODEL"
MODEL_CHOICES = ("best", "tiny")
DEFAULT_HOST = "127.0.0.1"  # never listen on every interface unless asked to (--host 0.0.0.0)
DEFAULT_MAX_FILE_MB = 20


class WithReference:
    """Mixin for the demos' model records (dataclasses with a `model` field): `reference` is an
    unreduced copy built on first use, so the timed reduced model keeps its hooks installed
    instead of installing them on every call."""

    @property
    def reference(self):
        ref = getattr(self, "_reference_copy", None)
        if ref is None:
            import copy
            ref = copy.deepcopy(self.model)
            object.__setattr__(self, "_reference_copy", ref)
        return ref


def parse_policy_text(spec: str):
    """A Policy from the spec a user typed; a bad one becomes a DemoInputError shown in the page.
    Parsed as a spec string only: never read as a file path, whatever is typed."""
    from tokenreduce.errors import TokenReduceError
    from tokenreduce.policy import parse_spec
    try:
        return parse_spec((spec or "").strip())
    except (TokenReduceError, ValueError, SyntaxError) as exc:
        raise DemoInputError(f"bad policy {spec!r}: {exc}") from None


class DemoInputError(ValueError):
    """Something the user gave is unusable; the message is shown in the page as is."""


def model_choice(cli_value: str | None) -> str:
    """--model, else $TOKENREDUCE_DEMO_MODEL, else 'best'; validated."""
    value = cli_value or os.environ.get(MODEL_ENV) or "best"
    if value not in MODEL_CHOICES:
        raise SystemExit(f"unknown model choice {value!r} (from --model or ${MODEL_ENV}); "
                         f"valid: {', '.join(MODEL_CHOICES)}")
    return value


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: Gradio's 7860, or the next free one)")
    p.add_argument("--model", choices=MODEL_CHOICES, default=None,
                   help=f"'best': the best model available offline; 'tiny': a small random-init model "
                        f"(fast; also ${MODEL_ENV}=tiny)")
    p.add_argument("--max-file-mb", type=float, default=DEFAULT_MAX_FILE_MB,
                   help=f"largest upload accepted, in MB (default {DEFAULT_MAX_FILE_MB})")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed forwards per side (median reported; default 3)")
    return p


def check_args(args) -> None:
    """The numbers base_parser takes, checked before a model is loaded."""
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    if args.max_file_mb <= 0:
        raise SystemExit(f"--max-file-mb must be > 0, got {args.max_file_mb}")


def launch(demo, args) -> None:
    """Serve `demo` on args.host:args.port with the upload cap; blocks."""
    check_args(args)
    demo.queue(default_concurrency_limit=1)  # one model, hooks installed in place: one run at a time
    demo.launch(server_name=args.host, server_port=args.port, max_file_size=int(args.max_file_mb * 1024 * 1024),
                show_error=True, footer_links=[], quiet=False)


def error_markdown(exc: BaseException) -> str:
    """The text of the page's status area for an error: the message escaped, so the names it
    quotes (a spec with `*`, a word like `<video>`, a file `__init__.mp4`) show as typed, not as
    Markdown or HTML."""
    text = html.escape(str(exc), quote=False)
    text = re.sub(r"([\\`*_{}\[\]()#+!|~-])", r"\\\1", text)
    return f"**Error:** {text}"


def check_upload_size(path: str, max_bytes: int | None) -> None:
    """Gradio enforces the cap on upload; this repeats it for files reaching the functions
    another way (the command line, tests)."""
    if max_bytes is not None and os.path.getsize(path) > max_bytes:
        raise DemoInputError(f"{os.path.basename(path)} is {os.path.getsize(path) / 2**20:.1f} MB; "
                             f"the limit is {max_bytes / 2**20:.1f} MB")


# -- timing --------------------------------------------------------------------------------------
_MODEL_LOCK = threading.Lock()


def model_lock() -> threading.Lock:
    """Held while a model runs: reductions are installed on the shared model in place."""
    return _MODEL_LOCK


def interleaved_medians(run_a, run_b, repeats: int) -> tuple[float, float]:
    """Median wall-clock ms of run_a() and run_b(), called alternately `repeats` times each after
    one untimed warm-up of each, so that both sides see the same machine load."""
    run_a()
    run_b()
    ta, tb = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_a()
        ta.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        run_b()
        tb.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ta), statistics.median(tb)


def load_average() -> str:
    try:
        return ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


# -- colours and figures -------------------------------------------------------------------------
def palette(n: int) -> np.ndarray:
    """n distinct saturated colours (n, 3) uint8: hues stepped by the golden ratio."""
    out = np.zeros((max(n, 0), 3), np.uint8)
    for i in range(n):
        h = (i * 0.6180339887) % 1.0
        s = 0.85 if i % 2 == 0 else 0.65
        out[i] = np.array(colorsys.hsv_to_rgb(h, s, 1.0)) * 255
    return out


def upscale(img: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of an (H, W, C) image by an integer factor."""
    return np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)


def figure_to_array(fig) -> np.ndarray:
    """Render a matplotlib figure to an (H, W, 3) uint8 array and close it."""
    import matplotlib.pyplot as plt
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight")
    plt.close(fig)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def use_agg() -> None:
    """Headless matplotlib (the demos run as servers)."""
    import matplotlib
    matplotlib.use("Agg")
