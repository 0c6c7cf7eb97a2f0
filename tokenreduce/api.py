"""reduce(model, policy) -> Handle."""
from __future__ import annotations

import weakref

from .errors import SiteError, TokenReduceError
from .hooks import COPY_REFUSED, Recorder
from .policy import Policy, describe_sites
from .registry import find_adapter

_ATTR = "_tokenreduce_handle"
_ACTIVE: "weakref.WeakSet[Handle]" = weakref.WeakSet()  # installed handles, to find nested ones
_SAVED_HOOK_GUARDS = []  # the user's skip_nnmodule_hook_guards while any reduction is installed


def _installed() -> bool:
    return any(not h.removed for h in _ACTIVE)


def _guard_hooks_while_reduced(installing: bool) -> None:
    """torch.compile (dynamo) does not guard on module hooks by default: code compiled for one
    block runs for any other block of its class, whatever hooks that one has. Where a reducer's
    stage breaks the graph (a value read back, random's CPU draw), each block is compiled as its
    own frame and a reduced block reused the code of an unhooked one: the compiled model ran
    unreduced, silently (measured). So while any reduction is installed dynamo guards on hooks
    (code compiled from then on recompiles where hooks differ); the last remove(), or the
    collection of the last reduced model, restores the user's setting. Code compiled before
    reduce() carries no such guards: reduce() drops it (_drop_code_compiled_without_hooks)."""
    import torch._dynamo
    cfg = torch._dynamo.config
    if installing and not _SAVED_HOOK_GUARDS:
        _SAVED_HOOK_GUARDS.append(cfg.skip_nnmodule_hook_guards)
        cfg.skip_nnmodule_hook_guards = False
    elif not installing and _SAVED_HOOK_GUARDS and not _installed():
        cfg.skip_nnmodule_hook_guards = _SAVED_HOOK_GUARDS.pop()


def _drop_code_compiled_without_hooks(model) -> None:
    """Code torch.compile made before this reduction for the forward of one of the model's
    classes (a baseline copy compiled first, say) guards on no hooks, so it ran in place of the
    reduced forward: the compiled reduced model gave the baseline's output (measured). Dropping
    those entries makes the next compiled call of either model recompile, now guarding hooks."""
    import torch._dynamo
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo import external_utils
    # the frames torch.compile's wrapper or Module.compile() may compile on top of the forward
    # (which one depends on torch's version and config.wrap_top_frame); they are shared by every
    # module, so a compiled module elsewhere recompiles once too
    tops = [torch.nn.Module._call_impl, torch.nn.Module._wrapped_call_impl]
    if hasattr(external_utils, "wrap_inline"):
        tops.append(external_utils.wrap_inline(len))  # its inner function's code
    seen = set()
    for fn in tops + [getattr(type(module), "forward", None) for module in model.modules()]:
        while fn is not None:  # a decorated forward: the wrapper's code and each one inside it
            code = getattr(fn, "__code__", None)
            if code is not None and code not in seen:
                seen.add(code)
                if _debug_get_cache_entry_list(code):
                    torch._dynamo.reset_code(code)
            fn = getattr(fn, "__wrapped__", None)


class Handle:
    """A reduction installed on a model. `.remove()` (or leaving a `with` block) undoes it exactly.

    stats: what the last forward did (tokens in/out per site, time in reducers, tokens per
    layer, analytic FLOPs and their fraction of the unreduced model). trace: per site, the
    original positions (and sizes, sources) of the surviving tokens in the last forward.
    """

    def __init__(self, model, policy: Policy, adapter, stages):
        self.model = model
        self.policy = policy
        self.adapter = adapter
        self.stages = stages
        self.recorder = Recorder()
        self.removed = False

    @property
    def context(self):
        """Inputs for reducers that the model's forward does not carry, e.g.
        handle.context["question"] = ["what colour ..."] for frame selection. Per thread: what
        the thread that called reduce() sets is every thread's default; what another thread sets
        is its own (tokenreduce.context.ThreadContext)."""
        return self.adapter.context

    @context.setter
    def context(self, values) -> None:
        self.adapter.context.replace(values)  # in place: the adapter's hooks hold this object

    # -- information --------------------------------------------------------------------------
    @property
    def sites(self) -> list:
        return list(self.adapter.sites())

    @property
    def trace(self) -> dict:
        return self.recorder.last.trace

    @property
    def stats(self) -> dict:
        rec = self.recorder.last.resolve()
        sites = {k: {"tokens_in": v.tokens_in / max(v.rows, 1), "tokens_out": v.tokens_out / max(v.rows, 1),
                     "reducer_ms": v.ms, "calls": v.calls}
                 for k, v in rec.sites.items()}
        out = {"forwards": self.recorder.forwards, "sites": sites,
               "reducer_ms": sum(v.ms for v in rec.sites.values()),
               "tokens_per_layer": {k: v[0] for k, v in rec.layers.items()}}
        if rec.layers and "tokens_start" in rec.extra:
            # token count at the start and after each layer: ToMe's 197, 181, ..., 11
            out["tokens"] = [rec.extra["tokens_start"]] + [v[1] for v in rec.layers.values()]
        flops = self.adapter.flops(rec)
        if flops is not None:
            reduced, full = flops
            out.update(flops=reduced, flops_unreduced=full, flops_fraction=reduced / full if full else 1.0)
        out.update(rec.extra)
        return out

    # -- lifetime -----------------------------------------------------------------------------
    def remove(self) -> None:
        if self.removed:
            return
        self.adapter.remove()
        if self.model.__dict__.get(_ATTR) is self:
            del self.model.__dict__[_ATTR]
        self.removed = True
        _guard_hooks_while_reduced(installing=False)

    def _refuse_copy(self, *_):
        raise TokenReduceError(COPY_REFUSED)

    __deepcopy__ = __copy__ = __reduce_ex__ = _refuse_copy

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def __repr__(self):
        state = "removed" if self.removed else "active"
        return f"<tokenreduce.Handle {self.adapter.name} [{state}] {self.policy.to_spec(strict=False) or 'no stages'}>"


def _unwrap_compiled(model):
    """torch.compile's wrapper (OptimizedModule) holds the module it compiles in `_orig_mod` and
    calls that module, so reducing it means reducing the module inside. Its code, like that of a
    module whose `.compile()` ran, was compiled without the hooks reduce() adds and guards on none:
    reduce() drops it (_drop_code_compiled_without_hooks), so the next call recompiles with them."""
    inner = getattr(model, "_orig_mod", None)
    if inner is not None and type(model).__name__ == "OptimizedModule":
        return _unwrap_compiled(inner)
    return model


def reduce(model, policy, *, adapter=None, **adapter_options) -> Handle:
    """Install `policy` on `model` in place and return a Handle.

    policy: a Policy, a dict, a one-line spec string or a path to a YAML/JSON file.
    adapter: an adapter class to use instead of the one the registry finds.
    Reducing an already reduced model replaces the previous policy (only once the new one is
    known to be valid: a policy that fails to parse or resolve leaves the old one installed; one
    that fails while installing takes its own hooks off again and leaves the model unreduced).
    model may be torch.compile's wrapper (the module inside it is reduced) or a module whose
    .compile() ran. While any reduction is installed, torch.compile guards on module hooks
    (torch._dynamo.config.skip_nnmodule_hook_guards = False; the last remove(), or the garbage
    collection of the last reduced model, restores the setting), and code torch.compile made
    earlier for the model's classes is dropped (it would run without the hooks; the model, and a
    baseline compiled before, recompile once).
    """
    model = _unwrap_compiled(model)
    policy = Policy.coerce(policy)
    adapter_cls = adapter or find_adapter(model)
    ad = _make_adapter(adapter_cls, model, adapter_options)
    sites = ad.sites()
    stages = policy.resolve(sites)
    for site, red in stages:
        red.check_site(sites[site])
    for other in list(_ACTIVE):  # a reduction on a module inside this one, or around it
        if other.removed or other.model is model:
            continue
        inner = any(m is other.model for m in model.modules())
        if inner or any(m is model for m in other.model.modules()):
            spec = other.policy.to_spec(strict=False) or "no stages"
            raise SiteError(f"{type(other.model).__name__} {'inside' if inner else 'around'} this "
                            f"{type(model).__name__} is already reduced ({spec}); "
                            "remove that reduction first (handle.remove() or tokenreduce.unreduce(that module))")
    old = model.__dict__.get(_ATTR)
    if old is not None:
        old.remove()
    handle = Handle(model, policy, ad, stages)
    try:
        ad.install(stages, handle.recorder)
    except BaseException:
        ad.remove()  # the hooks placed before the failure: the model is left unreduced, as it was
        raise
    model.__dict__[_ATTR] = handle  # plain attribute: not a submodule, not in state_dict
    _ACTIVE.add(handle)
    _guard_hooks_while_reduced(installing=True)
    # a model dropped without remove() takes its hooks with it: the setting then follows the
    # reductions still installed (weakrefs to the dead handle are cleared before this runs)
    weakref.finalize(handle, _guard_hooks_while_reduced, installing=False)
    _drop_code_compiled_without_hooks(model)
    return handle


def unreduce(model) -> bool:
    """Remove whatever reduction is installed on `model`. Returns True if there was one."""
    h = _unwrap_compiled(model).__dict__.get(_ATTR)
    if h is None:
        return False
    h.remove()
    return True


def sites(model, **adapter_options) -> dict:
    """The sites `model` publishes: name -> SiteInfo."""
    model = _unwrap_compiled(model)
    return _make_adapter(find_adapter(model), model, adapter_options).sites()


def _make_adapter(adapter_cls, model, options: dict):
    """adapter_cls(model, **options), with unknown options named against the ones it takes"""
    import inspect
    params = inspect.signature(adapter_cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        valid = [n for n, p in params.items() if n not in ("self", "model") and p.kind is not p.VAR_POSITIONAL]
        bad = sorted(set(options) - set(valid))
        if bad:
            raise TypeError(f"{adapter_cls.__name__} has no option(s) {', '.join(bad)}; valid: "
                            f"{', '.join(valid) or 'none'}")
    return adapter_cls(model, **options)


def describe(model) -> str:
    return describe_sites(sites(model))
