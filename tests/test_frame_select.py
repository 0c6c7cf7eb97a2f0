"""Frame selection: greedy temporal suppression, scorers (uniform, CLIP, VLM p(True), trained head),
the `frame_select` reducer at a video model's frames site, and select_frames()."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

import tokenreduce
from tokenreduce import Policy, PolicyError, Stage
from tokenreduce.eval.video import uniform_indices
from tokenreduce.reducers.frame_select import FrameSelect, suppress_select


# -- greedy suppression ----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_suppression_n128_k8(seed):
    scores = torch.rand(128, generator=torch.Generator().manual_seed(seed))
    idx = suppress_select(scores, 8)
    assert idx.shape == (8,)
    assert bool((idx[1:] > idx[:-1]).all())  # sorted, distinct
    gaps = (idx[None] - idx[:, None]).abs() + torch.eye(8, dtype=torch.long) * 1000
    assert int(gaps.min()) > 4  # delta = int(128 / 32) = 4
    assert int(idx[0]) >= 0 and int(idx[-1]) < 128


def test_suppression_is_greedy_not_topk():
    s = torch.zeros(128)
    s[10:14] = torch.tensor([0.9, 1.0, 0.95, 0.97])  # a bump: top-k would take all four
    s[60] = 0.5
    idx = suppress_select(s, 2).tolist()
    assert idx == [11, 60]
    # batched, numpy input, ties go to the earliest frame
    b = suppress_select(np.stack([np.zeros(16), np.arange(16.0)]), 2)
    assert b.tolist() == [[0, 3], [12, 15]]  # delta = int(16 / 8) = 2


def test_suppression_edge_cases():
    assert suppress_select(torch.arange(5.0), 5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="k=6"):
        suppress_select(torch.zeros(5), 6)
    with pytest.raises(ValueError, match="k must be"):
        suppress_select(torch.zeros(5), 0)


def test_uniform_scorer_gives_uniform_sampling():
    from tokenreduce.eval.frame_scorers import UniformScorer
    for n, k in [(128, 8), (16, 8), (9, 8), (100, 7)]:
        s = UniformScorer()(torch.zeros(1, n, 3, 4, 4), None, k=k)
        assert suppress_select(s[0], k).tolist() == uniform_indices(n, k).tolist()


def test_reducer_parameters():
    with pytest.raises(PolicyError, match="k must be"):
        FrameSelect(k=0)
    with pytest.raises(PolicyError, match="valid scorers: .*clip.*head.*uniform.*vlm"):
        FrameSelect(scorer="nope")
    assert tokenreduce.parse_spec("frames=frame_select(k=4, scorer='clip', query='a dog')").to_spec() == \
        "frames=frame_select(k=4, scorer='clip', query='a dog')"
    assert "frame_select" in tokenreduce.reducer_names() and FrameSelect.structured


# -- select_frames --------------------------------------------------------------------------------------
def test_select_frames_plain_function():
    from tokenreduce.eval import select_frames
    frames = np.random.default_rng(0).integers(0, 256, (32, 8, 8, 3), dtype=np.uint8)
    picked, idx = select_frames(frames, None, 4)
    assert idx.tolist() == uniform_indices(32, 4).tolist()
    assert np.array_equal(picked, frames[idx])
    t = torch.from_numpy(frames).permute(0, 3, 1, 2)
    picked_t, idx_t = select_frames(t, "q", 4, scorer="uniform")
    assert torch.equal(picked_t, t[torch.as_tensor(idx)]) and idx_t.tolist() == idx.tolist()
    with pytest.raises(ValueError, match="k must be"):
        select_frames(frames, None, 33)


# -- CLIP ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(0)
    return open_clip.CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
                          text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)).eval()


def test_clip_scorer_is_cosine_similarity(tiny_clip):
    import open_clip
    from tokenreduce.eval.frame_scorers import OPENAI_MEAN, OPENAI_STD, ClipScorer
    sc = ClipScorer(model=tiny_clip)
    pix = torch.rand(2, 6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    qs = ["a red ball", "a dog running"]
    s = sc(pix, qs)
    with torch.no_grad():
        img = (pix.flatten(0, 1) - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
        fi = torch.nn.functional.normalize(tiny_clip.encode_image(img), dim=-1).reshape(2, 6, -1)
        ft = torch.nn.functional.normalize(tiny_clip.encode_text(open_clip.get_tokenizer("ViT-B-32")(qs)), dim=-1)
    assert torch.allclose(s, torch.einsum("btd,bd->bt", fi, ft), atol=1e-5)
    with pytest.raises(ValueError, match="needs a question"):
        sc(pix, None)
    # undoing a processor's normalisation recovers the same scores
    mean, std = [0.5] * 3, [0.25] * 3
    normed = (pix - 0.5) / 0.25
    assert torch.allclose(ClipScorer(model=tiny_clip, pixel_mean=mean, pixel_std=std)(normed, qs), s, atol=1e-5)


def test_clip_scorer_at_videoswin_frames_site(tiny_clip):
    from torchvision.models.video.swin_transformer import SwinTransformer3d
    from tokenreduce.eval.frame_scorers import ClipScorer
    torch.manual_seed(0)
    m = SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[8, 7, 7],
                          stochastic_depth_prob=0.0, num_classes=10).eval()
    x = torch.rand(1, 3, 16, 32, 32, generator=torch.Generator().manual_seed(2))
    sc = ClipScorer(model=tiny_clip)
    red = FrameSelect(k=4, scorer=sc)
    with tokenreduce.reduce(m, Policy([Stage("frames", red)])) as h, torch.no_grad():
        with pytest.raises(ValueError, match="needs a question"):
            m(x)
        h.context["question"] = "a red ball"
        out = m(x)
        kept = h.stats["kept_frames"][0]
    expect = suppress_select(sc(x.permute(0, 2, 1, 3, 4), ["a red ball"])[0], 4)
    assert kept.tolist() == expect.tolist()
    with torch.no_grad():
        assert torch.equal(out, m(x[:, :, kept]))


# -- VLM p(True) ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llava_ov():
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessor,
                              LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor, PreTrainedTokenizerFast,
                              Qwen2Config, SiglipVisionConfig)
    words = ["<pad>", "<unk>", "<image>", "<video>", "True", "False", "USER", ":", "ASSISTANT", "Does", "this",
             "frame", "help", "answer", "the", "question", "?", "Answer", "or", ".", "what", "is", "red", "a"]
    vocab = {w: i for i, w in enumerate(words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                  extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    proc = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size={"height": 28, "width": 28}, image_grid_pinpoints=[[28, 28]]),
        tokenizer=tok, video_processor=LlavaOnevisionVideoProcessor(size={"height": 28, "width": 28}),
        num_image_tokens=16, vision_feature_select_strategy="full")
    torch.manual_seed(0)
    cfg = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                         image_size=28, patch_size=7),
        text_config=Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=1, vocab_size=len(words), max_position_embeddings=256),
        image_token_index=vocab["<image>"], video_token_index=vocab["<video>"], image_grid_pinpoints=[[28, 28]],
        vision_feature_select_strategy="full", vision_feature_layer=-1)
    return LlavaOnevisionForConditionalGeneration(cfg).eval(), proc, vocab


def test_vlm_scorer_is_p_true(tiny_llava_ov):
    from tokenreduce.eval.frame_scorers import VLMScorer
    model, proc, vocab = tiny_llava_ov
    sc = VLMScorer(model=model, processor=proc)
    pix = torch.rand(1, 3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    s = sc(pix, ["what is red?"])
    assert s.shape == (1, 3) and bool(((s > 0) & (s < 1)).all())
    assert not torch.allclose(s[0, 0], s[0, 1])  # frames are scored separately
    frame = (pix[0, 1] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    text = "USER: <image>\nDoes this frame help answer the question: what is red? Answer True or False. ASSISTANT:"
    with torch.no_grad():
        logits = model(**proc(images=frame, text=text, return_tensors="pt")).logits[0, -1]
    p = logits[[vocab["True"], vocab["False"]]].softmax(-1)
    assert float(s[0, 1]) == pytest.approx(float(p[0] / p.sum()), abs=1e-5)
    # as a frame_select scorer, by name with its constructor arguments
    red = FrameSelect(k=2, scorer="vlm", scorer_args={"model": model, "processor": proc}, query="what is red")
    from tokenreduce.stream import TokenStream
    st = TokenStream.start(pix.mean((-2, -1)), grid=(3, 1, 1), order="sequence")
    st.signals.put("pixels", None, st.pos, pix)
    plan = red.plan(st)
    assert plan.keep.tolist() == [suppress_select(s[0], 2).tolist()]
    assert red.get_scorer() is red.get_scorer()  # built once, cached on the instance


# -- trainable head --------------------------------------------------------------------------------------------
def test_selector_head_trains_saves_and_loads(tmp_path):
    from tokenreduce.eval.frame_scorers import FrameSelectorHead, HeadScorer
    from tokenreduce.eval.train_frame_selector import evaluate, synthetic_batch, train
    head, hist = train(steps=30, batch=8, frames=16, log_every=10, verbose=False)
    assert hist[-1]["loss"] < hist[0]["loss"]
    path = tmp_path / "sel.safetensors"
    head.save(path)
    loaded = FrameSelectorHead.load(path)
    pix, qs, _ = synthetic_batch(2, 16, generator=torch.Generator().manual_seed(5))
    a = HeadScorer(head=head)(pix, qs)
    b = tokenreduce.registry.scorer_factory("head")(path=str(path))(pix, qs)
    assert torch.equal(a, b) and a.shape == (2, 16)
    assert loaded.config == head.config
    red = tokenreduce.parse_spec(f"frames=frame_select(k=3, scorer='head', scorer_args={{'path': {str(path)!r}}})")
    assert red.stages[0].reducer.get_scorer().head.config == head.config
    rep = evaluate(head, clips=8, frames=16, k=2)
    assert set(rep) >= {"precision_at_k", "uniform_precision_at_k", "hit_rate"}
    with pytest.raises(FileNotFoundError, match="train_frame_selector"):
        FrameSelectorHead.load(tmp_path / "missing.safetensors")


@pytest.mark.slow
def test_selector_head_learns_the_synthetic_task(tmp_path):
    from tokenreduce.eval.train_frame_selector import main
    rep = main(["--out", str(tmp_path / "sel.safetensors"), "--steps", "250"])
    assert rep["hit_rate"] > 0.9 > rep["uniform_hit_rate"]
    assert rep["precision_at_k"] > 2 * rep["uniform_precision_at_k"]


def test_frame_select_at_llava_onevision_frames_site():
    """The same reducer at an M-LLM's frames site (the paper's setting), question from handle.context."""
    pytest.importorskip("transformers")
    import vlm_models as V
    case = V.llava_onevision("sdpa")
    batch = dict(case.batch)
    seen = {}

    def scorer(pixels, questions, k=None):
        seen["q"], seen["shape"] = questions, tuple(pixels.shape)
        return torch.arange(pixels.shape[1], dtype=torch.float32).expand(pixels.shape[0], -1)  # later = better

    with tokenreduce.reduce(case.model, Policy([Stage("frames", FrameSelect(k=2, scorer=scorer))])) as h:
        h.context["question"] = ["what happens?", "who is there?"]
        with torch.no_grad():
            out = case.model.generate(**batch, max_new_tokens=2, do_sample=False)
        assert h.stats["sites"]["frames"]["tokens_out"] == 2
        assert h.stats["sites"]["frames"]["tokens_in"] == 4
    assert seen["q"] == ["what happens?", "who is there?"] and seen["shape"][:2] == (2, 4)
    assert out.shape[0] == 2


def test_vlm_scorer_sums_both_spellings_of_true_and_false():
    """a BPE tokenizer has "True" and " True" (after "ASSISTANT:") as different tokens: p(True)
    counts both, as p(False) does"""
    from types import SimpleNamespace

    from tokenreduce.eval.frame_scorers import VLMScorer
    ids = {"True": [5], " True": [6], "False": [7], " False": [8]}
    tok = SimpleNamespace(encode=lambda text, add_special_tokens=False: ids[text])
    logits = torch.full((1, 1, 10), -30.0)
    logits[0, 0, [5, 6, 7, 8]] = torch.tensor([0.0, 1.0, 0.5, -1.0])

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, **_):
            return SimpleNamespace(logits=logits)
    proc = lambda **_: {}  # noqa: E731
    proc.tokenizer = tok
    sc = VLMScorer(model=Model(), processor=proc, use_chat_template=False)
    assert sc.true_ids == [5, 6] and sc.false_ids == [7, 8]
    p = logits[0, 0, [5, 6, 7, 8]].softmax(-1)
    want = float((p[0] + p[1]) / p.sum())
    assert sc.score_frame(np.zeros((4, 4, 3), np.uint8), "what is red?") == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("steps", [1, 2, 20])
def test_selector_trains_for_any_number_of_steps(steps):
    """OneCycleLR divided by a zero-length warm-up at steps=20 (5% of 20 = 1 step ends at 0)"""
    from tokenreduce.eval.train_frame_selector import train
    _, hist = train(steps=steps, batch=2, frames=8, log_every=1, verbose=False)
    assert len(hist) >= 1


# -- handle.context per thread -------------------------------------------------------------------------------
def _question_scorer(pixels, questions, k=None):
    """Frame t scores high when the question names t: the kept frames say which question a forward saw."""
    T = pixels.shape[1]
    want = [{int(w) for w in q.split() if w.isdigit()} for q in questions]
    return torch.tensor([[1.0 if t in w else 0.0 for t in range(T)] for w in want])


def test_threads_give_their_own_question_to_their_own_forward():
    """Two threads set handle.context['question'] and run one reduced model at once: each forward
    selects the frames its own thread asked for (a shared dict let one thread's question reach the
    other's forward)."""
    from concurrency import failures_in_threads
    from torchvision.models.video.swin_transformer import SwinTransformer3d
    torch.manual_seed(0)
    m = SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[8, 7, 7],
                          stochastic_depth_prob=0.0, num_classes=10).eval()
    x = torch.rand(1, 3, 16, 32, 32, generator=torch.Generator().manual_seed(2))
    questions = ["frames 0 2 4 6", "frames 9 11 13 15"]
    with torch.no_grad():
        want = [m(x[:, :, [int(w) for w in q.split()[1:]]]) for q in questions]
    with tokenreduce.reduce(m, Policy([Stage("frames", FrameSelect(k=4, scorer=_question_scorer))])) as h:
        h.context["question"] = "frames 1 3 5 7"  # the creating thread's default, which each thread overrides

        def run(q):
            h.context["question"] = q
            with torch.no_grad():
                return m(x)
        assert failures_in_threads(run, questions, want, torch.equal, reps=8) == []
        assert h.context["question"] == "frames 1 3 5 7"  # the threads' questions stayed theirs


def test_context_is_a_dict_per_thread_with_the_creators_defaults():
    import threading
    from tokenreduce.context import ThreadContext
    ctx = ThreadContext({"question": "main", "lang": "en"})
    seen = {}

    def worker():
        seen["start"] = dict(ctx)             # the creating thread's values are the defaults
        ctx["question"] = "mine"
        del ctx["lang"]                       # hidden for this thread only
        seen["after"] = dict(ctx)
        try:
            del ctx["lang"]
        except KeyError:
            seen["second del"] = "KeyError"   # checked below: an assertion in a thread only warns
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"start": {"question": "main", "lang": "en"}, "after": {"question": "mine"},
                    "second del": "KeyError"}
    assert dict(ctx) == {"question": "main", "lang": "en"} and len(ctx) == 2
    ctx.replace({"question": "new"})
    assert dict(ctx) == {"question": "new"} and "lang" not in ctx and ctx.get("lang") is None
    # a plain dict where one was expected before (handle.context was a dict): copy(), | both ways
    assert type(ctx.copy()) is dict and ctx.copy() == {"question": "new"}
    assert ctx | {"k": 1} == {"question": "new", "k": 1} and {"k": 1} | ctx == {"k": 1, "question": "new"}


def test_assigning_handle_context_reaches_the_reducer():
    """`handle.context = {...}` replaces the values the hooks read (a new dict on the handle alone
    would have been ignored)."""
    from torchvision.models.video.swin_transformer import SwinTransformer3d
    torch.manual_seed(0)
    m = SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[8, 7, 7],
                          stochastic_depth_prob=0.0, num_classes=10).eval()
    x = torch.rand(1, 3, 16, 32, 32, generator=torch.Generator().manual_seed(2))
    with tokenreduce.reduce(m, Policy([Stage("frames", FrameSelect(k=2, scorer=_question_scorer))])) as h:
        h.context = {"question": "frames 3 12"}
        with torch.no_grad():
            m(x)
        assert h.stats["kept_frames"][0].tolist() == [3, 12]
        with pytest.raises(TypeError, match="mapping"):
            h.context = "frames 3 12"
        assert h.context["question"] == "frames 3 12"


def test_select_frames_takes_grey_frames_and_names_a_channels_last_tensor():
    """(T, H, W, 1) numpy frames passed the input check but crashed the head scorer (a 9- vs
    27-feature matmul); a channels-last tensor failed inside the scorers' convolutions"""
    from tokenreduce.eval import select_frames
    from tokenreduce.eval.frame_scorers import FrameSelectorHead, HeadScorer
    torch.manual_seed(0)
    sc = HeadScorer(head=FrameSelectorHead())
    rgb = np.random.default_rng(0).integers(0, 256, (7, 24, 24, 3), dtype=np.uint8)
    grey = rgb[..., :1]
    picked, idx = select_frames(grey, "what is red", 3, scorer=sc)
    _, same = select_frames(np.repeat(grey, 3, axis=-1), "what is red", 3, scorer=sc)
    assert idx.tolist() == same.tolist() and picked.shape == (3, 24, 24, 1)  # the caller's frames back
    with pytest.raises(ValueError, match=r"channels-last: pass frames.permute\(0, 3, 1, 2\)"):
        select_frames(torch.from_numpy(rgb), "what is red", 3, scorer=sc)
    rgba = torch.cat([torch.from_numpy(rgb).permute(0, 3, 1, 2), torch.full((7, 1, 24, 24), 255, dtype=torch.uint8)], 1)
    _, with_alpha = select_frames(rgba, "what is red", 3, scorer=sc)  # as the numpy RGBA frames are read
    assert with_alpha.tolist() == same.tolist()
