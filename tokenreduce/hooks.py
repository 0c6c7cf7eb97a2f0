"""Model-agnostic plumbing that adapters share: a set of undoable hooks, running the stages of
one site, and the per-forward record behind `Handle.stats`."""
from __future__ import annotations

import functools
import threading
import time
from dataclasses import dataclass, field

import torch

from .errors import SiteError, TokenReduceError
from .stream import Plan, TokenStream, apply_plan

COPY_REFUSED = ("a model with a tokenreduce reduction installed cannot be copied or pickled: its hooks point at this "
                "model. Copy (or save) it before reduce(), or remove the reduction (handle.remove() / "
                "tokenreduce.unreduce(model)), copy, and reduce the copy")


class InstalledHook:
    """A function tokenreduce installs on a model (hook or instance attribute), called as itself.
    Pickling it (torch.save(model), pickle.dumps) raises COPY_REFUSED: a closure's own error
    ("Can't pickle local object") names neither the cause nor the fix. So does deepcopy: a deep
    copy of a reduced model's submodule (an EMA or teacher copy of its blocks) would carry hooks
    that still point at the original model and that remove() never takes off the copy. A shallow
    copy shares the hook dictionaries with the original, so it gives the same object back."""

    def __init__(self, fn):
        self.fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        raise TokenReduceError(COPY_REFUSED)

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        raise TokenReduceError(COPY_REFUSED)


class HookSet:
    """Every hook and attribute change an adapter makes, undone in reverse order by `remove()`."""

    def __init__(self):
        self._undo = []

    def pre(self, module, fn, *, with_kwargs=False, prepend=True):
        h = module.register_forward_pre_hook(InstalledHook(fn), with_kwargs=with_kwargs, prepend=prepend)
        self._undo.append(h.remove)
        return h

    def post(self, module, fn, *, with_kwargs=False, prepend=True):
        h = module.register_forward_hook(InstalledHook(fn), with_kwargs=with_kwargs, prepend=prepend)
        self._undo.append(h.remove)
        return h

    def setattr(self, obj, name, value):
        """Set a plain attribute on one object (an instance, never a class) and restore it later."""
        if isinstance(obj, type):
            raise TypeError("tokenreduce never patches a class; set attributes on instances")
        inst = vars(obj)
        had, old = name in inst, inst.get(name)
        if callable(value) and not isinstance(value, (torch.nn.Module, type)):
            value = InstalledHook(value)
        setattr(obj, name, value)

        def undo():
            if had:
                setattr(obj, name, old)
            elif name in vars(obj):
                delattr(obj, name)  # the class attribute shows through again
        self._undo.append(undo)

    def on_remove(self, fn):
        self._undo.append(fn)

    def remove(self):
        while self._undo:
            self._undo.pop()()


@dataclass
class SiteRecord:
    tokens_in: float = 0.0
    tokens_out: float = 0.0
    ms: float = 0.0
    calls: int = 0
    rows: int = 0  # samples (or items) the calls covered: tokens_in / rows is the mean per row


@dataclass
class PassRecord:
    """What happened during one forward of the reduced part of the model."""

    sites: dict = field(default_factory=dict)     # site -> SiteRecord
    layers: dict = field(default_factory=dict)    # layer key -> (tokens_in, tokens_out) per sample
    trace: dict = field(default_factory=dict)     # site -> {"pos", "size", "source"} tensors
    extra: dict = field(default_factory=dict)

    def resolve(self) -> "PassRecord":
        """Counts recorded as device scalars (a mean over padded rows) read back as floats, once,
        when the statistics are read: recording them did not stop the forward for a device sync."""
        for r in self.sites.values():
            r.tokens_in, r.tokens_out = _as_float(r.tokens_in), _as_float(r.tokens_out)
        for counts in self.layers.values():
            counts[:] = [_as_float(v) for v in counts]
        for key, v in self.extra.items():  # per-forward counts (prompt tokens) as device scalars too
            if torch.is_tensor(v) and v.dim() == 0:
                self.extra[key] = float(v)
        return self


def _as_float(v):
    return float(v) if torch.is_tensor(v) else v


class Recorder:
    """Collects per-forward statistics; adapters call `begin()` at the start of each pass.

    The record being written is per thread (two threads running one reduced model each write
    their own); `last` read from a thread that has run no forward gives the latest of any."""

    def __init__(self):
        self._local = threading.local()
        self._latest = PassRecord()
        self.forwards = 0
        self.trace_enabled = True

    @property
    def last(self) -> PassRecord:
        return getattr(self._local, "record", None) or self._latest

    @last.setter
    def last(self, record: PassRecord) -> None:
        self._local.record = self._latest = record

    def begin(self) -> PassRecord:
        self.last = PassRecord()
        if not torch.compiler.is_compiling():
            # compiled code would hold the count as a constant and recompile at every forward;
            # `forwards` counts the eager ones
            self.forwards += 1
        return self.last

    def site(self, name, n_in, n_out, ms, rows: int = 1):
        """One call of a site: n_in / n_out tokens per row (mean) over `rows` rows. A site called
        more than once in a pass (items of different sizes run as separate groups) averages
        over all the rows, not over the calls."""
        r = self.last.sites.setdefault(name, SiteRecord())
        r.tokens_in += n_in * rows
        r.tokens_out += n_out * rows
        r.ms += ms
        r.calls += 1
        r.rows += rows

    def layer(self, key, n_in, n_out=None):
        """Tokens into (and out of) one layer; a layer that runs again in the pass keeps the last."""
        self.last.layers[key] = [n_in, n_in if n_out is None else n_out]


def tokens_per_sample(stream: TokenStream):
    """Mean number of (valid) tokens per sample: a float, or with padding a device scalar that
    `PassRecord.resolve` reads back when the statistics are read (no sync inside the forward)."""
    if stream.valid is None:
        return float(stream.num_tokens)
    return stream.valid.sum(1).float().mean()


def _clock() -> float:
    # torch.compile cannot trace the wall clock (a graph break at every site): a compiled forward
    # records no reducer time
    return 0.0 if torch.compiler.is_compiling() else time.perf_counter()


def run_stages(stream: TokenStream, reducers, recorder: Recorder | None = None) -> tuple:
    """Run the reducers of one site in order. Returns (stream, [applied plans])."""
    plans = []
    t0 = _clock()
    n_in = tokens_per_sample(stream) if recorder is not None else None
    for red in reducers:
        try:
            with torch.set_grad_enabled(torch.is_grad_enabled() and red.differentiable):
                plan = red.plan(stream)
            if plan is not None:
                if not isinstance(plan, Plan):
                    raise TypeError(f"{red.name}.plan() must return a Plan or None, got {type(plan).__name__}")
                stream, plan = apply_plan(stream, plan)
                plans.append(plan)
        except (RuntimeError, NotImplementedError) as exc:
            if not stream.x.is_meta:
                raise
            # torch's own words ("Tensor.item() cannot be called on meta tensors") name no cause
            raise SiteError(f"{stream.site}: {red.name} needs concrete values (token counts, scores), which a "
                            f"forward on the meta device does not have; run it on real tensors ({exc})") from None
    if recorder is not None:
        recorder.site(stream.site, n_in, tokens_per_sample(stream) if plans else n_in,
                      (_clock() - t0) * 1e3, rows=int(stream.pos.shape[0]))
        if recorder.trace_enabled:
            recorder.last.trace[stream.site] = {"pos": stream.pos, "size": stream.size, "source": stream.source,
                                                "frame": stream.frame, "valid": stream.valid}
    return stream, plans
