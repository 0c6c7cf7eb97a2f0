"""torch.compile of reduced ViTs: one graph per forward, the eager output, no recompilation per
forward, and reduce() / remove() respected once dynamo guards on module hooks."""
import copy

import pytest
import torch

import tokenreduce as tr
from tokenreduce.eval.bench import bench_vit
from tokenreduce.hooks import PassRecord

from test_vit_invariants import _tiny_timm

dynamo = pytest.importorskip("torch._dynamo")


def _vit(**kw):
    return _tiny_timm(depth=3, embed_dim=48, num_heads=3, img_size=48, patch_size=8, **kw)


def _x(batch=2):
    return torch.randn(batch, 3, 48, 48, generator=torch.Generator().manual_seed(1))


POOLS = {"cls": {}, "avg": dict(global_pool="avg", class_token=False), "avgmax": dict(global_pool="avgmax"),
         "map": dict(global_pool="map"), "registers+avg": dict(global_pool="avg", reg_tokens=2)}


SPECS = ["vision.block.*=tome(r=3)", "vision.block.1=vtc_cls(keep=0.5)", "vision.block.1=tome(r=4, prop_attn=False)",
         "vision.block.1=uniform(keep=0.5)", "vision.block.1=random(keep=0.5)", "vision.block.*=random(keep=0.8, shared=True)"]


@pytest.mark.parametrize("pool, spec", [(p, s) for p in POOLS for s in SPECS
                                        if not (s.startswith("vision.block.1=vtc_cls") and p == "avg")])  # no CLS
def test_reduced_vit_traces_as_one_graph(pool, spec):
    """Nothing in a fixed-budget reducer's forward breaks dynamo's graph, whatever the ViT pools:
    the reducers' wall clock broke it twice at every site, the size-weighted average / attention
    pool compared the pooled tokens on the host, and so did the prefix-order check of a plan
    with several protected tokens (registers); uniform on whole frames read patch indices back."""
    model = _vit(**POOLS[pool])
    tr.reduce(model, spec)
    dynamo.reset()
    with torch.no_grad():
        want = model(_x())
        explained = dynamo.explain(model)(_x())
        got = torch.compile(model, backend="eager", fullgraph=True)(_x())
    dynamo.reset()
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("spec", ["vision.block.*=tome(r=3)", "vision.block.1=uniform(keep=0.5)"])
def test_reduced_vit_recompiles_once_for_a_new_batch_size(spec):
    """A second batch size makes dynamo recompile with the batch as a symbol (automatic dynamic
    shapes); the reducers' host arithmetic must trace on it too, as one graph, and a third size
    reuses that code."""
    model = _vit(global_pool="avg", reg_tokens=2)
    tr.reduce(model, spec)
    dynamo.reset()
    frames = []
    def count(gm, example_inputs):
        frames.append(gm)
        return gm.forward
    compiled = torch.compile(model, backend=count, fullgraph=True)
    with torch.no_grad():
        for batch in (2, 3, 4):
            torch.testing.assert_close(compiled(_x(batch)), model(_x(batch)))
    dynamo.reset()
    assert len(frames) == 2  # batch 2 (static), batch 3 (symbolic batch); batch 4 reuses it


@pytest.mark.parametrize("pool, spec, one_graph", [
    ("registers+avg", "vision.block.*=tome(r=3, inflection=-1)", True),
    ("cls", "vision.block.*=vtc_cls(keep=0.8)", True),
    ("cls", "vision.block.1=uniform(keep=0.5)", True),  # its lattice picks: the grid is fixed too
    ("cls", "vision.block.1=tome(r=3); vision.block.2=uniform(keep=0.5)", False)])  # reads counts back
def test_dynamic_true_keeps_the_token_counts_plain_ints(pool, spec, one_graph):
    """torch.compile(dynamic=True) makes a reducer's float (ToMe's inflection, a keep fraction)
    and a count read back from the device symbols; the token counts derived from them nested
    into expressions (37 - Max(0, TruncToInt(3.0 - 3.0*zf88)) after one ToMe block) that sympy
    took about 5.5 minutes over on this 3-block ViT. The schedule is now worked out when the
    stage is installed and the others are fixed (guarded) where they are read: every token
    count in the graphs is a plain int, the batch stays a symbol, the output is eager's, and a
    fixed-budget stage is one graph (uniform's lattice picks had broken it on symbolic grids)."""
    import re
    model = _vit(**POOLS[pool])
    tr.reduce(model, spec)
    shapes = []

    def backend(gm, example_inputs):
        shapes.extend(tuple(n.meta["example_value"].shape) for n in gm.graph.nodes
                      if isinstance(n.meta.get("example_value"), torch.Tensor))
        return gm.forward
    dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=True, fullgraph=one_graph)
    with torch.no_grad():
        for batch in (2, 3):
            torch.testing.assert_close(compiled(_x(batch)), model(_x(batch)), rtol=0, atol=0)
    dynamo.reset()
    assert shapes
    float_sized = [s for s in shapes if re.search(r"zf|ToInt|sqrt", str(s))]
    assert not float_sized, float_sized[:3]
    assert any("s" in str(s[0]) for s in shapes if s)  # the batch is a symbol: dynamic shapes were on


@pytest.mark.parametrize("spec", ["vision.block.1=random(keep=0.5)",
                                  "vision.block.1=tome(r=3); vision.block.2=uniform(keep=0.5)"])
def test_a_stage_that_breaks_the_graph_still_runs_under_torch_compile_defaults(spec):
    """torch.compile with torch's own settings (no hook guards asked for) on a model whose stage
    breaks the graph (uniform after a merge reads indices; random, once the batch is a symbol,
    draws outside it): each block is then compiled as its own frame, and without guards on
    hooks a reduced block ran the code compiled for an unhooked one, so the compiled model ran
    unreduced (max |diff| to the unreduced output 0.0). reduce() turns hook guards on while
    it is installed and the last remove() restores the user's setting."""
    import gc

    from tokenreduce import api
    gc.collect()  # reductions earlier tests left on models now gone
    # the user's own setting: saved by the reductions still installed, if any
    user = api._SAVED_HOOK_GUARDS[0] if api._SAVED_HOOK_GUARDS else dynamo.config.skip_nnmodule_hook_guards
    model = _vit()
    with torch.no_grad():
        unreduced = model(_x(3))
    h = tr.reduce(model, spec)
    assert dynamo.config.skip_nnmodule_hook_guards is False
    dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        for batch in (2, 3, 4):
            got, want = compiled(_x(batch)), model(_x(batch))
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert (compiled(_x(3)) - unreduced).abs().max() > 1e-3
    other = tr.reduce(_vit(), "vision.block.*=tome(r=2)")
    h.remove()
    assert dynamo.config.skip_nnmodule_hook_guards is False  # another reduction is still installed
    other.remove()
    assert dynamo.config.skip_nnmodule_hook_guards is (False if api._installed() else user)
    dynamo.reset()


def test_code_compiled_before_reduce_for_the_same_class_is_not_reused():
    """A baseline copy compiled first left code for VisionTransformer.forward that guards on no
    hooks: the reduced copy, compiled after reduce(), ran it and gave the baseline's output
    (max |diff| 0.0). reduce() drops that code; both models then recompile and run their own
    forward."""
    base = _vit()
    red = copy.deepcopy(base)
    dynamo.reset()
    with torch.no_grad():
        compiled_base = torch.compile(base, backend="eager")
        before = compiled_base(_x())
        tr.reduce(red, "vision.block.*=tome(r=3)")
        got = torch.compile(red, backend="eager")(_x())
        torch.testing.assert_close(got, red(_x()), rtol=0, atol=0)
        assert (got - before).abs().max() > 1e-3
        torch.testing.assert_close(compiled_base(_x()), base(_x()), rtol=0, atol=0)
    dynamo.reset()


@pytest.mark.parametrize("name", ["hf:tiny-clip", "hf:tiny-siglip", "hf:tiny-dinov2"])
def test_reduced_hf_towers_trace_as_one_graph(name):
    from tokenreduce.eval.bench import call_vision, image_size
    from tokenreduce.eval.models import load_model
    model = load_model(name).eval()
    size = image_size(model)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    tr.reduce(model, "vision.block.*=tome(r=2)")
    dynamo.reset()
    with torch.no_grad():
        explained = dynamo.explain(lambda: call_vision(model, x))()
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]


def test_compiled_reduction_matches_eager_compiles_once_and_is_removable():
    base = _vit()
    reduced = copy.deepcopy(base)
    handle = tr.reduce(reduced, "vision.block.*=tome(r=3)")
    x = _x()
    with torch.no_grad():
        want_reduced, want_base = reduced(x), base(x)
        tokens = handle.stats["tokens"]
        assert not torch.allclose(want_reduced, want_base, atol=1e-3)  # the reduction shows
        dynamo.reset()
        compiled_reduced = torch.compile(reduced, backend="eager")
        compiled_base = torch.compile(base, backend="eager")
        handle.recorder.last = PassRecord()  # the eager forward's record, cleared
        assert "tokens" not in handle.stats
        torch.testing.assert_close(compiled_reduced(x), want_reduced)
        assert handle.stats["tokens"] == tokens  # the statistics are recorded in compiled code too
        # the recorder's forward count once made every forward recompile
        with dynamo.config.patch(error_on_recompile=True):
            for _ in range(3):
                torch.testing.assert_close(compiled_reduced(x), want_reduced)
        # a model of the same class compiled without hooks does not lend its graph to the reduced one
        torch.testing.assert_close(compiled_base(x), want_base)
        torch.testing.assert_close(compiled_reduced(x), want_reduced)
        handle.remove()
        torch.testing.assert_close(compiled_reduced(x), want_base)
    dynamo.reset()


@pytest.mark.parametrize("spec", ["vision.block.*=tome(r=3)", "vision.block.1=random(keep=0.5)"])
@pytest.mark.parametrize("how", ["torch.compile", "Module.compile"])
def test_a_model_compiled_before_reduce_runs_the_reduction_and_the_removal(how, spec):
    """torch.compile's wrapper and a module whose .compile() ran: reduce() reduces the module
    (inside the wrapper), and the code compiled before, which guards on no hooks, is dropped,
    so the compiled model runs the reduced forward, then the unreduced one after remove()."""
    from tokenreduce import api
    model = _vit()
    reference = copy.deepcopy(model)
    tr.reduce(reference, spec)
    dynamo.reset()
    with torch.no_grad():
        base = model(_x())
        want = reference(_x())
        if how == "torch.compile":
            compiled = torch.compile(model, backend="eager")
        else:
            model.compile(backend="eager")
            compiled = model
        torch.testing.assert_close(compiled(_x()), base, rtol=0, atol=0)  # compiled unreduced
        handle = tr.reduce(compiled, spec)
        assert handle.model is model and model.__dict__[api._ATTR] is handle
        assert set(tr.sites(compiled)) == set(tr.sites(model))
        got = compiled(_x())
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert (got - base).abs().max() > 1e-3
        assert handle.stats["sites"]  # the hooks ran
        assert tr.unreduce(compiled)
        torch.testing.assert_close(compiled(_x()), base, rtol=0, atol=0)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    dynamo.reset()


def test_a_reduced_model_collected_without_remove_gives_the_hook_guard_setting_back(monkeypatch):
    """The last reduction restores the user's skip_nnmodule_hook_guards when removed, and also
    when its model is garbage-collected without remove() (its hooks went with it)."""
    import gc
    import weakref

    from tokenreduce import api
    gc.collect()
    monkeypatch.setattr(api, "_ACTIVE", weakref.WeakSet())  # reductions other tests left installed
    monkeypatch.setattr(api, "_SAVED_HOOK_GUARDS", [])
    with dynamo.config.patch(skip_nnmodule_hook_guards=True):
        first, second = _vit(), _vit()
        tr.reduce(first, "vision.block.*=tome(r=2)")
        tr.reduce(second, "vision.block.*=tome(r=2)")
        assert dynamo.config.skip_nnmodule_hook_guards is False
        del first
        gc.collect()
        assert dynamo.config.skip_nnmodule_hook_guards is False  # the second is still reduced
        del second
        gc.collect()
        assert dynamo.config.skip_nnmodule_hook_guards is True
        assert api._SAVED_HOOK_GUARDS == []


@pytest.mark.slow
def test_bench_vit_compile_times_both_models_compiled():
    """`bench vit --compile` (inductor): the reduced model's compiled output is its eager one, and
    the report says the reducers are not timed in compiled code."""
    dynamo.reset()
    res = bench_vit(_vit(), "vision.block.*=tome(r=3)", batch=2, runs=2, warmup=1, compile="reduce-overhead")
    dynamo.reset()
    assert res["compile"] == "reduce-overhead" and res["graph_vs_eager_max_abs"] < 1e-4
    assert res["reducer_ms"] is None and res["tokens"] == [37, 34, 31, 28]
    assert res["baseline_ms"] > 0 and res["reduced_ms"] > 0


def test_bench_vit_compile_flags():
    """--cuda-graph and --compile exclude each other; --compile alone is torch's default mode and
    an unknown mode is refused naming the valid ones"""
    from tokenreduce.eval.cli import build_parser
    with pytest.raises(ValueError, match="--cuda-graph or --compile, not both"):
        bench_vit(_vit(), "vision.block.*=tome(r=3)", device="cuda", cuda_graph=True, compile=True)
    with pytest.raises(ValueError, match="--compile 'fast': not a torch.compile mode; valid: default, reduce-overhead"):
        bench_vit(_vit(), "vision.block.*=tome(r=3)", compile="fast")
    parse = build_parser().parse_args
    assert parse(["bench", "vit", "--compile"]).compile == "default"
    assert parse(["bench", "vit", "--compile", "reduce-overhead"]).compile == "reduce-overhead"
    assert parse(["bench", "vit"]).compile is None
