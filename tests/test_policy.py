"""Policy: every form round-trips; bad input names the valid choices."""
import json

import pytest
import torch

import tokenreduce as tr
from tokenreduce import Policy, Stage, make_reducer
from tokenreduce.errors import PolicyError, SiteError, UnknownMethodError, UnsupportedModelError

SPEC = ("vision.block.*=tome(r=13, inflection=-1.0, prop_attn=False); vision.block.4:8=vtc_cls(keep=0.5); "
        "vision.out=random(keep=64, seed=7); vision.block.-1=uniform(keep=0.25)")


def test_spec_round_trip():
    p = Policy.from_spec(SPEC)
    assert len(p) == 4
    assert Policy.from_spec(p.to_spec()) == p
    assert p.stages[0].reducer.r == 13 and p.stages[0].reducer.inflection == -1.0
    assert p.stages[2].site == "vision.out"


def test_spec_round_trip_of_awkward_values():
    """strings holding both quote kinds (a video question), escaped quotes written by hand, and
    infinite floats come back from to_spec() as they went in"""
    question = 'is it "red" or isn\'t it?'
    p = Policy([Stage("frames", make_reducer("frame_select", {"k": 4, "query": question})),
                Stage("vision.out", make_reducer("prumerge_plus", {"whisker": float("inf")})),
                Stage("frames", make_reducer("frame_select", {"scorer": "clip", "scorer_args": {"t": float("-inf")}}))])
    back = Policy.from_spec(p.to_spec())
    assert back == p and back.stages[0].reducer.query == question
    assert Policy.from_spec(r"frames=frame_select(query='isn\'t it; or=is it')").stages[0].reducer.query == \
        "isn't it; or=is it"


def test_policy_class_reads_a_spec_or_a_dict_as_coerce_does():
    spec = "vision.out=random(keep=64)"
    assert Policy(spec) == Policy.from_spec(spec)
    d = {"stages": [{"site": "vision.out", "method": "random", "keep": 64}]}
    assert Policy(d) == Policy.from_dict(d) == Policy(stages=spec)


def test_python_dict_yaml_json_round_trip(tmp_path):
    p = Policy([Stage("vision.block.*", make_reducer("tome", {"r": (8, -1)})),
                Stage("vision.out", tr.reducer_class("vtc_cls")(keep=64, layers=[3, 4]))])
    assert Policy.from_dict(p.to_dict()) == p
    assert Policy.from_dict(json.loads(p.to_json())) == p
    for name in ("p.yaml", "p.json"):
        p.save(tmp_path / name)
        assert Policy.from_file(tmp_path / name) == p
        assert Policy.coerce(str(tmp_path / name)) == p
    assert Policy.coerce(p.to_spec()) == p
    assert Policy.coerce(p.to_dict()) == p
    assert Policy.coerce(p.stages) == p


def test_stage_dict_forms():
    a = Policy.from_dict({"stages": [{"site": "vision.out", "method": "random", "params": {"keep": 4}}]})
    b = Policy.from_dict({"stages": [{"site": "vision.out", "method": "random", "keep": 4}]})
    c = Policy.from_dict({"stages": ["vision.out=random(keep=4)"]})
    assert a == b == c


def test_stage_dict_is_not_changed_and_conflicts_are_refused():
    params = {"ratio": 0.5}
    stage = {"site": "llm.layer.2", "method": "fastv", "params": params, "attended": "least"}
    assert Policy.from_dict({"stages": [stage]}).to_spec() == "llm.layer.2=fastv(attended='least')"
    assert params == {"ratio": 0.5} and "attended" not in params  # the caller's dict as given
    with pytest.raises(PolicyError, match="ratio given both in 'params' and beside them"):
        Policy.from_dict({"stages": [dict(stage, ratio=0.7)]})


def test_a_failed_reduce_leaves_the_installed_policy(vit_case):
    model = vit_case.build()
    h = tr.reduce(model, "vision.block.*=tome(r=2)")
    for bad in ("vision.block.99=tome(r=2)", "vision.out=tomee(r=1)", "vision.out=random(keep=1.5)"):
        with pytest.raises((SiteError, PolicyError)):
            tr.reduce(model, bad)
        assert not h.removed and model.__dict__[tr.api._ATTR] is h
    h.remove()


def test_literals_are_parsed_never_evaluated():
    with pytest.raises(PolicyError, match="must be a Python literal"):
        Policy.from_spec("vision.out=random(keep=__import__('os').getpid())")


def test_unknown_method_names_valid_ones():
    with pytest.raises(UnknownMethodError, match=r"unknown method 'tomee'.*valid methods:.*tome.*vtc_cls"):
        Policy.from_spec("vision.out=tomee(r=1)")


def test_unknown_parameter_names_valid_ones():
    with pytest.raises(PolicyError, match=r"tome: unknown parameter\(s\) rr; valid parameters: r, inflection, prop_attn, trace_source"):
        Policy.from_spec("vision.block.*=tome(rr=1)")


@pytest.mark.parametrize("spec,match", [
    ("vision.out=vtc_cls(keep=1.5)", "fraction must lie in"),
    ("vision.out=vtc_cls(keep=-3)", "must be >= 0"),
    ("vision.out=vtc_cls(ensemble='avg')", "choose one of: sum, mean, max, min"),
    ("vision.block.*=tome(r='a')", "r must be an int"),
    ("vision.out=random(4)", "arguments must be named"),
    ("vision.out random(keep=4)", "expected SITE=METHOD"),
    ("vision.out=random(keep=4", "unbalanced"),
    ("vision..out=random", "malformed site"),
    # only one plain call is a method: nothing after it is silently dropped or taken instead
    ("vision.out=vtc_cls(keep=64)(keep=32)", "malformed method call"),
    ("vision.out=vtc_cls(keep=64).x(keep=8)", "malformed method call"),
    ("vision.out=vtc_cls(keep=64), fastv(ratio=0.5)", "malformed method call"),
    ("vision.out=vtc_cls(keep=64)+(1)", "malformed method call"),
    ("llm.layer.2=fastv(ratio=0.5, ratio=0.7)", "'ratio' is given twice"),
    ("vision.block.*=tome(r=(8, -1), inflection=0.5)", "r=\\(8, -1\\) already gives the inflection"),
    ("projector.out=dycoke_ttm(k=0.7, ratio=0.5)", "k and ratio name the same number"),
    ("vision.block.-:2=random(keep=4)", "malformed site"),  # a lone minus is not an index
    ("vision.block.1:-=random(keep=4)", "malformed site"),
    ("vision.out=random(keep=4) vision.block.1=tome(r=1)", "separate stages with ';'"),
    ("vision.out=random(keep=4), vision.block.-1=tome(r=1)", "separate stages with ';'"),
])
def test_bad_values(spec, match):
    with pytest.raises(PolicyError, match=match):
        Policy.from_spec(spec)


def test_unknown_site_names_valid_ones(vit_case):
    model = vit_case.build()
    with pytest.raises(SiteError, match=r"unknown site 'vision.blok.1'; valid sites: vision.layer.\{0..\d+\}, "
                                        r"vision.block.\{0..\d+\}, vision.out"):
        tr.reduce(model, "vision.blok.1=random(keep=4)")
    with pytest.raises(SiteError, match=r"vision.block has indices 0..\d+"):
        tr.reduce(model, "vision.block.99=random(keep=4)")
    with pytest.raises(SiteError, match="tome cannot run at site 'vision.out'; it runs at: vision.block.{i}, vision.layer.{i}"):
        tr.reduce(model, "vision.out=tome(r=2)")


def test_site_patterns_expand(vit_case):
    model = vit_case.build()
    sites = tr.sites(model)
    depth = sites["vision.out"].depth
    p = Policy.from_spec("vision.block.*=tome(r=1); vision.block.1:3=random(keep=0.9); vision.block.-1=uniform(keep=0.9)")
    resolved = [s for s, _ in p.resolve(sites)]
    assert resolved == [f"vision.block.{i}" for i in range(depth)] + ["vision.block.1", "vision.block.2",
                                                                       f"vision.block.{depth - 1}"]


def test_policy_file_path_in_reduce(tmp_path, vit_case):
    model = vit_case.build()
    path = tmp_path / "policy.yaml"
    path.write_text("stages:\n  - site: vision.block.0\n    method: tome\n    params: {r: 2}\n")
    with tr.reduce(model, str(path)) as h:
        vit_case.run(model, vit_case.inputs())
        assert h.stats["tokens_per_layer"][1] == h.stats["tokens_start"] - 2
    with pytest.raises(PolicyError, match="not found"):
        tr.reduce(model, str(tmp_path / "missing.yaml"))


def test_unsupported_model_lists_families():
    import torch
    with pytest.raises(UnsupportedModelError, match=r"no adapter recognises torch.nn.modules.linear.Linear; supported families:.*timm"):
        tr.reduce(torch.nn.Linear(2, 2), "vision.out=random(keep=1)")


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_a_reduce_that_fails_while_installing_takes_its_hooks_off(vit_case):
    """an adapter that fails half-way through install (after some hooks are in) leaves the model
    exactly as unreduced as it found it"""
    import torch
    model = vit_case.build()
    x = vit_case.inputs()
    base, hooks = vit_case.run(model, x), _hook_count(model)
    adapter_cls = tr.registry.find_adapter(model)

    class FailsLate(adapter_cls):
        def install(self, stages, recorder, *args, **kw):
            super().install(stages, recorder, *args, **kw)
            assert _hook_count(model) > hooks
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        tr.reduce(model, "vision.out=random(keep=4)", adapter=FailsLate)
    assert _hook_count(model) == hooks and not tr.unreduce(model)
    assert torch.equal(vit_case.run(model, x), base)


@pytest.mark.parametrize("build,match", [
    # post-norm: norm2 runs after the MLP, so it is not the MLP's input
    (lambda: _timm_model("vit_base_patch16_rpn_224", img_size=32, embed_dim=32, depth=2, num_heads=2),
     "ResPostBlock.*supports timm's pre-norm Block"),
    # qk_norm / scaled_cosine_attn blocks carry open_clip's own Attention, not nn.MultiheadAttention
    (lambda: _open_clip_custom(), "CustomResidualAttentionBlock, attention Attention.*nn.MultiheadAttention"),
])
def test_blocks_the_adapters_cannot_hook_are_refused(build, match):
    with pytest.raises(UnsupportedModelError, match=match):
        tr.reduce(build(), "vision.out=random(keep=4)")


def _timm_model(name, **kw):
    timm = pytest.importorskip("timm")
    return timm.create_model(name, pretrained=False, **kw).eval()


def _open_clip_custom():
    pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer
    return VisionTransformer(image_size=32, patch_size=16, width=32, layers=2, heads=2, mlp_ratio=2.0,
                             output_dim=16, qk_norm=True).eval()


def test_malformed_policy_files_and_dicts_are_policy_errors(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("stages: [vision.out=random(keep=4)\n")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{stages: ")
    for path in (bad_yaml, bad_json):
        with pytest.raises(PolicyError, match=f"policy file '{path}' does not parse"):
            Policy.coerce(str(path))
    (tmp_path / "empty.yaml").write_text("\n")
    with pytest.raises(PolicyError, match="policy file '.*empty.yaml' is empty"):
        Policy.coerce(str(tmp_path / "empty.yaml"))
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(PolicyError, match="policy file '.*dir.yaml' is a directory"):
        Policy.coerce(str(tmp_path / "dir.yaml"))
    with pytest.raises(PolicyError, match="'params' must be a mapping"):
        Policy.from_dict({"stages": [{"site": "vision.out", "method": "random", "params": [1]}]})
    with pytest.raises(PolicyError, match="'stages' must be a list"):
        Policy.from_dict({"stages": "vision.out=random"})


def test_a_reduced_model_refuses_to_be_copied(vit_case):
    import copy
    import io
    import pickle
    model = vit_case.build()
    with tr.reduce(model, "vision.block.*=tome(r=1)"):
        with pytest.raises(tr.TokenReduceError, match="cannot be copied or pickled"):
            copy.deepcopy(model)
        for save in (pickle.dumps, lambda m: torch.save(m, io.BytesIO())):  # not "Can't pickle local object"
            with pytest.raises(tr.TokenReduceError, match="cannot be copied or pickled"):
                save(model)
        # a submodule's deep copy (an EMA / teacher copy of the blocks) would keep hooks that point
        # at this model and that remove() never takes off the copy
        first = next(m for m in model.modules() if m is not model and m._forward_pre_hooks)
        with pytest.raises(tr.TokenReduceError, match="cannot be copied or pickled"):
            copy.deepcopy(first)
    pickle.loads(pickle.dumps(model))
    twin = copy.deepcopy(model)  # removed: an ordinary module again
    x = vit_case.inputs()
    assert torch.equal(vit_case.run(twin, x), vit_case.run(model, x))


def test_a_broken_plugin_does_not_hide_the_other_methods(monkeypatch):
    """an entry point that fails to load (any error) or whose name differs from its class's name is
    skipped; looking it up says why; every other method stays usable"""
    from importlib.metadata import EntryPoint

    from tokenreduce import registry
    eps = [EntryPoint("broken", "tokenreduce.reducers.random:DoesNotExist", registry.REDUCER_GROUP),
           EntryPoint("renamed", "tokenreduce.reducers.random:RandomPrune", registry.REDUCER_GROUP)]
    registry.reducer_names()  # the real registry loaded, then a copy of it re-reads the fake entry points
    monkeypatch.setattr(registry, "_reducers", {k: v for k, v in registry._reducers.items() if k != "__failed__"})
    monkeypatch.setattr(registry, "_loaded", {"reducers": False, "adapters": True})
    monkeypatch.setattr(registry, "entry_points", lambda group: eps if group == registry.REDUCER_GROUP else [])
    assert "tome" in registry.reducer_names() and "broken" not in registry.reducer_names()
    with pytest.raises(UnknownMethodError, match="broken is installed but failed to load: .*DoesNotExist"):
        registry.reducer_class("broken")
    with pytest.raises(UnknownMethodError, match="whose name is 'random'; the two must be equal"):
        registry.reducer_class("renamed")


@pytest.fixture
def scratch_registry(monkeypatch):
    """the reducer registry, loaded, on a copy this test may change"""
    from tokenreduce import registry
    registry.reducer_names()
    monkeypatch.setattr(registry, "_reducers", dict(registry._reducers))
    return registry


def test_a_users_reducer_wins_a_name_clash_with_a_built_in_whenever_it_registers(scratch_registry):
    import dataclasses

    from tokenreduce.reducers.base import Reducer
    from tokenreduce.reducers.tome import ToMe
    registry = scratch_registry

    @dataclasses.dataclass
    class MyToMe(Reducer):
        name = "tome"
    MyToMe.__module__ = "myplugin.reducers"
    with pytest.warns(UserWarning, match="'tome' is taken by both tokenreduce.reducers.tome.ToMe and "
                                         "myplugin.reducers.*MyToMe; using myplugin"):
        registry.register_reducer(MyToMe)
    with pytest.warns(UserWarning, match="using myplugin"):  # the built-in module loading later
        registry.register_reducer(ToMe)
    assert registry.reducer_class("tome") is MyToMe


def test_a_reducer_name_must_be_writable_in_a_spec(scratch_registry):
    import dataclasses

    from tokenreduce.reducers.base import Reducer
    registry = scratch_registry

    @dataclasses.dataclass
    class Dashed(Reducer):
        name = "my-reducer"
    with pytest.raises(ValueError, match="'my-reducer' must be an identifier.*'my_reducer'"):
        registry.register_reducer(Dashed)
    assert "my-reducer" not in registry._reducers


def test_a_plan_keeping_a_token_twice_is_refused():
    """sizes must keep summing to the original count: a duplicated keep index would break it"""
    from tokenreduce import Plan, TokenStream, apply_plan
    s = TokenStream.start(torch.randn(1, 5, 4), num_prefix=1)
    with pytest.raises(ValueError, match="must not name a token twice"):
        apply_plan(s, Plan(keep=torch.tensor([[0, 1, 1, 2]])))
    out, _ = apply_plan(s, Plan(keep=torch.tensor([[0, 1, 2]])))
    assert out.size.sum() == 3


def test_random_draws_differ_between_sites_with_names_of_equal_length():
    """the seed mixes a hash of the site's name: vision.layer.3 and vision.block.3 (same length,
    same layer) used to draw the same pattern"""
    from tokenreduce.reducers.random import RandomPrune
    from tokenreduce.stream import TokenStream

    def kept(site):
        s = TokenStream.start(torch.zeros(1, 64, 4))
        s.site, s.layer = site, 3
        return RandomPrune(keep=0.5).plan(s).keep.tolist()

    assert kept("vision.block.3") == kept("vision.block.3")
    assert kept("vision.block.3") != kept("vision.layer.3")


def test_unknown_adapter_options_are_named(vit_case):
    model = vit_case.build()
    with pytest.raises(TypeError, match="has no option\\(s\\) foo; valid: "):
        tr.reduce(model, "vision.out=random(keep=4)", foo=1)
    with pytest.raises(TypeError, match="has no option\\(s\\) foo"):
        tr.sites(model, foo=1)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# -- bad inputs found by the core audit -------------------------------------------------------------
def _timm_small():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2, num_classes=10).eval()


def test_any_int_seed_and_count_runs():
    """a seed such as time.time_ns() overflowed the generator; a count beyond int64 overflowed the
    budget: both raised raw errors in the forward"""
    m = _timm_small()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        for spec in ("vision.out=random(keep=3, seed=1795788636507652941)", "vision.out=random(keep=10**20)"):
            spec = spec.replace("10**20", str(10 ** 20))
            with tr.reduce(m, spec) as h:
                m(x)
                assert h.stats["sites"]["vision.out"]["tokens_out"] == (4 if "seed" in spec else 17)


def test_a_method_that_is_not_a_name_is_a_policy_error():
    for method in (["random"], {"name": "random"}):
        with pytest.raises(UnknownMethodError, match=r"a method is named by a string.*valid methods: .*random"):
            Policy.coerce({"stages": [{"site": "vision.out", "method": method}]})


def test_register_reducer_refuses_classes_that_cannot_take_policy_parameters():
    import dataclasses

    from tokenreduce import Reducer, register_reducer

    class NotDataclass(Reducer):
        name = "not_a_dataclass_test"

        def __init__(self, k=1):
            self.k = k
    with pytest.raises(TypeError, match="must be a dataclass"):
        register_reducer(NotDataclass)
    with pytest.raises(TypeError, match="not a subclass of tokenreduce.Reducer"):
        register_reducer(type("Junk", (), {"name": "junk_test"}))
    with pytest.raises(ValueError, match="e.g. '_1x'"):
        register_reducer(dataclasses.dataclass(type("X", (Reducer,), {"name": "1x"})))
    assert "not_a_dataclass_test" not in tr.registry.reducer_names()


def test_a_plan_assigning_outside_the_kept_slots_is_refused():
    from tokenreduce.stream import Plan, TokenStream, apply_plan
    st = TokenStream.start(torch.randn(1, 5, 4))
    assign = torch.tensor([[0, 1, 2, 7, -1]])
    with pytest.raises(ValueError, match=r"plan.assign names slots outside -1..2"):
        apply_plan(st, Plan(keep=torch.tensor([[0, 1, 2]]), assign=assign))


@pytest.mark.parametrize("spec", ["tome(r=(13.9, -1))", "tome(r=('13', 0))", "tome(r=(True, 0))", "tome(r=(13, 'x'))",
                                  "tome(inflection=True)"])
def test_tome_tuple_form_is_checked_like_its_parts(spec):
    with pytest.raises(PolicyError, match="tome: (r as a tuple must be|inflection must lie)"):
        Policy.from_spec("vision.block.*=" + spec)


def test_a_policy_holding_a_python_function_says_it_cannot_be_saved():
    def my_scorer(frames, question, k):
        return None
    p = Policy([Stage("frames", make_reducer("frame_select", {"k": 2, "scorer": my_scorer}))])
    for write in (p.to_spec, p.to_json, p.to_yaml):
        with pytest.raises(PolicyError, match="cannot be written as a spec, JSON or YAML"):
            write()
    assert "frames=frame_select(" in str(p) and "my_scorer" in str(p)  # messages still show it


def test_yaml_exponents_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads 5e-1 as a string"""
    f = tmp_path / "p.yaml"
    f.write_text("stages:\n  - {site: vision.out, method: random, params: {keep: 25e-2, seed: 3}}\n")
    assert Policy.coerce(str(f)).to_spec() == "vision.out=random(keep=0.25, seed=3)"
