"""The Gradio demos (demos/): their logic as plain functions, then both apps in a real headless
Chromium (Playwright, Debian's /usr/bin/chromium; skipped with the reason when it is missing).

Models are the fast ones (--model tiny: a random-init ViT-Ti-shaped DINOv2 and a random-init
embedded video-QA model). Screenshots go to out/screenshots/ (their paths are printed).
"""
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMOS = ROOT / "demos"
SHOTS = ROOT / "out" / "screenshots"
sys.path.insert(0, str(DEMOS))

pytest.importorskip("transformers")
pytest.importorskip("PIL")

import image_tokens as it  # noqa: E402
import video_qa as vq  # noqa: E402
from _common import DemoInputError  # noqa: E402

import tokenreduce  # noqa: E402


# -- image demo: logic --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_vit():
    return it.get_model(it.TINY)


def _trace(m, spec, img=None):
    x = it.to_pixels(it.center_crop(it.procedural_image() if img is None else img))
    with tokenreduce.reduce(m.model, it.build_policy(spec)) as h, torch.no_grad():
        m.model(pixel_values=x)
        return dict(h.trace), h.stats


def test_tome_groups_from_trace_cover_every_patch_once(tiny_vit):
    m = tiny_vit
    n = m.grid * m.grid
    trace, stats = _trace(m, "vision.block.*=tome(r=10)")
    assert len(trace) == m.depth and stats["tokens"][-1] == 1 + n - 10 * m.depth
    for site, tr in trace.items():
        owner = it.patch_groups(tr["pos"][0].numpy(), tr["size"][0].numpy(), tr["source"][0].numpy(), m.num_prefix, n)
        assert (owner >= 0).all(), site  # merging drops nothing
        # every surviving patch token owns exactly as many patches as its trace size says
        patch_tokens = (tr["pos"][0] >= m.num_prefix).nonzero().squeeze(1).numpy()
        counts = np.bincount(owner, minlength=tr["pos"].shape[1])
        assert np.array_equal(counts[patch_tokens], tr["size"][0].numpy()[patch_tokens].astype(int)), site
        assert len(np.unique(owner)) == len(patch_tokens), site
    img = it.center_crop(it.procedural_image())
    overlays = it.site_overlays(img, trace, m.num_prefix, m.grid)
    assert len(overlays) == m.depth and overlays[-1][0].shape == (2 * it.IMAGE_SIZE, 2 * it.IMAGE_SIZE, 3)
    assert "merged groups" in overlays[-1][1]


@pytest.mark.parametrize("spec", ["vision.out=visionzip(keep=0.25)", "vision.out=prumerge_plus()"])
def test_merging_at_vision_out_shows_groups_not_dropped_patches(tiny_vit, spec):
    """VisionZip / PruMerge+ merge the tokens they do not keep: the overlay's owners come from the
    traced sources, so no merged patch is shown as dropped"""
    m = tiny_vit
    n = m.grid * m.grid
    trace, _ = _trace(m, spec)
    tr = trace["vision.out"]
    owner = it.patch_groups(tr["pos"][0].numpy(), tr["size"][0].numpy(), tr["source"][0].numpy(), m.num_prefix, n)
    dropped = n + m.num_prefix - int(tr["size"][0].sum())
    assert int((owner < 0).sum()) == dropped


def test_pruning_overlay_greys_out_exactly_the_dropped_patches(tiny_vit):
    m = tiny_vit
    n = m.grid * m.grid
    trace, _ = _trace(m, "vision.block.3=uniform(keep=0.25)")
    tr = trace["vision.block.3"]
    owner = it.patch_groups(tr["pos"][0].numpy(), None, None, m.num_prefix, n)
    kept = int((owner >= 0).sum())
    assert kept == round(0.25 * n) == int((tr["pos"][0] >= m.num_prefix).sum())
    img = np.full((it.IMAGE_SIZE, it.IMAGE_SIZE, 3), (200, 40, 40), np.uint8)  # saturated red everywhere
    ov = it.render_overlay(img, m.grid, owner, scale=1)
    p = it.IMAGE_SIZE // m.grid
    centres = ov[p // 2::p, p // 2::p][:m.grid, :m.grid].reshape(n, 3).astype(int)
    grey = np.abs(centres[:, 0] - centres[:, 1]) < 5
    assert np.array_equal(grey, owner < 0)  # dropped -> grey, kept -> still red


def test_policy_from_controls():
    assert it.policy_spec("tome", 0.4, 12, 196) == "vision.block.*=tome(r=10)"
    assert it.policy_spec("uniform", 0.5, 12, 196) == "vision.block.3=uniform(keep=0.5)"
    assert it.policy_spec("none", 0.5, 12, 196) == ""
    with pytest.raises(DemoInputError, match="valid: tome, vtc_cls"):
        it.policy_spec("tomee", 0.5, 12, 196)
    with pytest.raises(DemoInputError, match="bad policy"):
        it.build_policy("vision.block.*=tome(r=")
    assert [s.reducer.trace_source for s in it.build_policy("vision.block.*=tome(r=2)").stages] == [True]


def test_run_image_numbers(tiny_vit):
    res = it.run_image(tiny_vit, it.procedural_image(), "vision.block.3=random(keep=0.5)", repeats=1)
    assert res.tokens_reduced[-1] == 1 + 98 and res.tokens_full[-1] == 197
    assert 0.3 < res.flops / res.flops_unreduced < 0.8 and res.ms_full > 0 and res.ms_reduced > 0
    assert "GFLOPs" in res.numbers_markdown(tiny_vit) and "Random weights" in res.numbers_markdown(tiny_vit)
    with pytest.raises(DemoInputError, match=r"indices 0..11"):
        it.run_image(tiny_vit, it.procedural_image(), "vision.block.40=random(keep=0.5)", repeats=1)


def test_thin_and_rotated_uploads(tmp_path):
    """a very thin image is cropped before it is resized (it used to grow into a 224 x 3.36M
    intermediate); a phone photo's EXIF orientation is applied, as a browser shows it"""
    from PIL import Image
    thin = np.zeros((8, 120000, 3), np.uint8)
    thin[:, 60000 - 4:60000 + 4] = 255  # the centre square is white
    out = it.center_crop(thin)
    assert out.shape == (it.IMAGE_SIZE, it.IMAGE_SIZE, 3) and out.min() > 200
    photo = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (100, 200)).save(photo, exif=exif)
    assert it.load_image(str(photo)).shape[:2] == (100, 200)


def test_frame_strip_stays_under_the_webp_limit():
    """an HD clip's strip (8 x 1280 px frames at 2x was 20568 px wide) is shrunk to fit"""
    strip = vq.frames_strip(np.zeros((8, 720, 1280, 3), np.uint8), [0, 3])
    assert strip.shape[1] <= vq.STRIP_MAX_WIDTH
    small = vq.frames_strip(np.zeros((8, 64, 64, 3), np.uint8), [0])
    assert small.shape[:2] == (2 * 64 + 8, 8 * (2 * 64 + 8 + 3))  # small frames are still upscaled 2x


def test_load_image_says_what_is_wrong(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("this is text, not a picture\n")
    with pytest.raises(DemoInputError, match="notes.png is not an image"):
        it.load_image(str(fake))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DemoInputError, match="empty"):
        it.load_image(str(empty))
    from PIL import Image
    good = tmp_path / "ok.png"
    Image.fromarray(it.procedural_image(64)).save(good)
    assert it.load_image(str(good)).shape == (64, 64, 3)
    with pytest.raises(DemoInputError, match="limit is"):
        it.load_image(str(good), max_bytes=100)


# -- video demo: logic --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_vqa():
    return vq.load_video_model("tiny")


@pytest.fixture(scope="module")
def clip():
    from tokenreduce.eval.synthetic import VideoQAGenerator
    g = VideoQAGenerator(frames=8, seed=3)
    s = g.sample("region_color")
    return g.render(s), s


def _video_trace(vm, frames, question, spec):
    proc = vm.processor
    inputs = proc(text=[proc.prompt(question, ["red", "green", "blue", "cyan"])], videos=[frames])
    with tokenreduce.reduce(vm.model, spec) as h, torch.no_grad():
        h.context["question"] = [question]
        vm.model(**inputs)
        trace = dict(h.trace)
    offset = int((inputs["input_ids"][0] == vm.model.config.video_token_id).nonzero()[0, 0])
    return trace, offset


def test_kept_tokens_per_frame_follow_the_trace(tiny_vqa, clip):
    vm, (frames, s) = tiny_vqa, clip
    tpf = vm.tokens_per_frame
    trace, off = _video_trace(vm, frames, s["question"], "projector.out=uniform(keep=0.5); llm.layer.2=fastv(ratio=0.5)")
    proj = vq.kept_tokens_per_frame(trace, 8, tpf, off, site="projector.out")
    llm = vq.kept_tokens_per_frame(trace, 8, tpf, off)  # the last site: llm.layer.2
    n_proj = int((trace["projector.out"]["frame"][0] >= 0).sum())
    n_llm = int((trace["llm.layer.2"]["frame"][0] >= 0).sum())
    assert (proj > 0).sum() == n_proj == 64 and (llm > 0).sum() == n_llm < n_proj
    assert ((llm > 0) <= (proj > 0)).all()  # the LLM can only drop what projector.out kept
    assert (proj == proj[0]).all()  # uniform: the same spatial cells in every frame
    # fastv alone: llm positions map straight to (frame, cell)
    trace, off = _video_trace(vm, frames, s["question"], "llm.layer.1=fastv(keep=20)")
    grid = vq.kept_tokens_per_frame(trace, 8, tpf, off)
    tr = trace["llm.layer.1"]
    vis = tr["frame"][0] >= 0
    v = tr["pos"][0][vis] - off
    expect = np.zeros((8, tpf))
    expect[(v // tpf).numpy(), (v % tpf).numpy()] = 1
    assert (grid > 0).sum() == 20 and np.array_equal(grid > 0, expect > 0)
    # framefusion from the controls: budget 0.3 keeps 30% of the frame tokens, the rest merged into them
    trace, off = _video_trace(vm, frames, s["question"], vq.policy_spec("framefusion", 0.3))
    grid = vq.kept_tokens_per_frame(trace, 8, tpf, off)
    assert (grid > 0).sum() == 8 * tpf - int(0.7 * 8 * tpf) and grid.sum() == 8 * tpf
    # frames selected inside the model: whole frames gone
    trace, off = _video_trace(vm, frames, s["question"], "frames=frame_select(k=4)")
    assert (vq.kept_tokens_per_frame(trace, 8, tpf, off).sum(1) > 0).tolist() == [True, False, True, False,
                                                                                   False, True, False, True]


@pytest.mark.parametrize("method", [m for m in vq.VIDEO_METHODS if m not in ("none", "atp")])
@pytest.mark.parametrize("budget", [0.3, 0.5])
def test_budget_is_the_fraction_of_frame_tokens_kept(tiny_vqa, clip, method, budget):
    """the demo's budget means what the eval sweep's does (its specs are the sweep's)"""
    from tokenreduce.eval.sweep import SWEEP_METHODS
    vm, (frames, s) = tiny_vqa, clip
    spec = vq.policy_spec(method, budget)
    assert spec == SWEEP_METHODS[method].spec(budget, vq.DEFAULT_FRAMES)
    trace, off = _video_trace(vm, frames, s["question"], spec)
    kept = int((vq.kept_tokens_per_frame(trace, 8, vm.tokens_per_frame, off) > 0).sum())
    assert abs(kept - budget * 8 * vm.tokens_per_frame) <= 3, (spec, kept)


@pytest.mark.parametrize("H,W", [(240, 320), (320, 180)])
def test_heat_map_cells_follow_the_frame_shape(H, W):
    """the model squeezes a frame to a square: token (row 0, col 3) of the 4x4 grid is the top
    quarter of the rows and the right quarter of the columns, in landscape and portrait alike"""
    kept = np.zeros((1, 16), np.float32)
    kept[0, 3] = 1.0
    fig = vq.heatmap_figure(np.full((1, H, W, 3), 200, np.uint8), [0], kept, "projector.out")
    bright = np.asarray(fig.axes[0].images[0].get_array())[..., 0] > 100
    ys, xs = np.nonzero(bright)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (0, H // 4 - 1, W - W // 4, W - 1)


def test_run_video_qa_with_frame_selection(tiny_vqa, clip):
    vm, (frames, s) = tiny_vqa, clip
    r = vq.run_video_qa(vm, frames, s["question"], s["options"], "projector.out=random(keep=0.25)", "uniform", 4,
                        repeats=1)
    assert r.selected.tolist() == [0, 2, 5, 7] and r.kept.shape == (4, 16)
    assert (r.kept > 0).sum() == 16 and r.tokens["frames"] == (8, 4)
    assert r.tokens["visual tokens into the LLM"] == (129, 17)  # 4 x 16 x 0.25 + the image_newline token
    assert r.answer_full in s["options"] and abs(r.probs_reduced.sum() - 1) < 1e-5
    assert r.flops_fraction < 0.5  # half the frames, a quarter of their tokens: against all 8 frames
    text = vq.numbers_markdown(r)
    assert "LLM input tokens" in text and "frame selection (uniform" in text
    heat = vq.figure_to_array(vq.heatmap_figure(r.frames, r.selected, r.kept, r.kept_site))
    assert heat.ndim == 3 and heat.shape[1] > heat.shape[0]
    with pytest.raises(DemoInputError, match="cannot run on this input: .*single frame"):
        vq.run_video_qa(vm, frames, s["question"], s["options"], "projector.out=dycoke_ttm()", "uniform", 1, repeats=1)
    with pytest.raises(DemoInputError, match="between 1 and 8"):
        vq.run_video_qa(vm, frames, s["question"], s["options"], "", "uniform", 9, repeats=1)


def test_video_inputs_say_what_is_wrong(tmp_path, tiny_vqa):
    fake = tmp_path / "clip.mp4"
    fake.write_text("not a video at all\n")
    with pytest.raises(DemoInputError, match="clip.mp4 is not a video"):
        vq.load_video(str(fake), 8)
    from tokenreduce.eval.synthetic import write_video
    long = tmp_path / "long.mp4"
    write_video(long, np.zeros((20, 16, 16, 3), np.uint8), fps=4)  # 5 s
    with pytest.raises(DemoInputError, match=r"too long: 20 frames \(5.0 s\)"):
        vq.load_video(str(long), 8, max_seconds=2)
    assert vq.load_video(str(long), 8)[0].shape == (8, 16, 16, 3)
    with pytest.raises(DemoInputError, match="between 1 and 32"):
        vq.load_video(str(long), 0)
    with pytest.raises(DemoInputError, match="'dog' are not words"):
        vq.parse_options("red, dog", tiny_vqa.vocabulary)
    assert vq.parse_options("red, top-left", tiny_vqa.vocabulary) == ["red", "top-left"]
    with pytest.raises(DemoInputError, match="valid: none, uniform"):
        vq.policy_spec("fastvv", 0.5)
    tok = tiny_vqa.processor.tokenizer
    assert vq.parse_question("  What colour is the cross?", tok) == "what colour is the cross?"
    with pytest.raises(DemoInputError, match="does not know 'zzz', 'dog'; .*e.g. how many circles are there"):
        vq.parse_question("zzz colour is the dog ?", tok)
    with pytest.raises(DemoInputError, match="does not know '<video>'"):
        vq.parse_question("where is the <video> ?", tok)


def test_demo_inputs_found_by_the_browser_audit(tmp_path, tiny_vqa, monkeypatch):
    """repeated options, a question far longer than the model's, a 1-frame clip shown as 8 repeats,
    frames too large to decode at once, and an error message the page rendered as Markdown"""
    from PIL import Image

    from _common import error_markdown
    from tokenreduce.eval.synthetic import write_video
    with pytest.raises(DemoInputError, match="'red' given twice"):
        vq.parse_options("red, green, red", tiny_vqa.vocabulary)
    with pytest.raises(DemoInputError, match="at most 300"):
        vq.parse_question("how many circles are there ? " * 20, tiny_vqa.processor.tokenizer)
    one = tmp_path / "one.mp4"
    write_video(one, np.zeros((1, 16, 16, 3), np.uint8), fps=4)
    frames, meta = vq.load_video(str(one), 8)
    assert frames.shape[0] == 1 and meta["indices"] == [0]
    clip = tmp_path / "clip.mp4"
    write_video(clip, np.zeros((8, 32, 48, 3), np.uint8), fps=4)
    monkeypatch.setattr(vq, "MAX_DECODED_PIXELS", 8 * 32 * 48 - 1)
    with pytest.raises(DemoInputError, match=r"clip.mp4 is 48 x 32 pixels per frame"):
        vq.load_video(str(clip), 8)
    assert vq.load_video(str(clip), 7)[0].shape == (7, 32, 48, 3)
    # as typed on the page: no Markdown emphasis, no HTML tag swallowing the rest
    md = error_markdown(ValueError("does not know '<video>'; bad policy 'vision.block.*=tome(r=' in __init__.mp4"))
    assert "&lt;video&gt;" in md and "vision.block.\\*=tome\\(r=" in md and "\\_\\_init\\_\\_" in md
    # a 16-bit PNG is scaled to 8 bits (convert("RGB") clipped it to white), and a refusal keeps its words
    g16 = tmp_path / "gray16.png"
    Image.fromarray(np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))).save(g16)
    img = it.load_image(str(g16))
    assert img[0, 0, 0] == 0 and img[0, -1, 0] == 255 and 100 < img[0, 32, 0] < 160
    monkeypatch.setattr(it, "MAX_PIXELS", 100)
    with pytest.raises(DemoInputError, match=r"^gray16.png is 64 x 64 pixels; the limit"):
        it.load_image(str(g16))


# -- both apps in a headless browser ------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"
browser_reason = None
if not Path(CHROMIUM).exists():
    browser_reason = f"{CHROMIUM} is missing (apt-get install chromium; .ci/run installs it)"
elif importlib.util.find_spec("playwright") is None:
    browser_reason = "playwright (python) is not installed: pip install playwright"
needs_browser = pytest.mark.skipif(browser_reason is not None, reason=browser_reason or "")


@pytest.fixture(scope="module")
def servers():
    """Both demos started at once (their start-ups overlap), on free 127.0.0.1 ports, fast models."""
    import screenshots as sh
    env = {"TOKENREDUCE_DEMO_MODEL": "tiny", "OMP_NUM_THREADS": "1"}
    # a 0.05 MB upload cap, so that the test can exceed it cheaply
    started = {name: sh.spawn_demo(f"{name}.py", "--repeats", "1", "--max-file-mb", "0.05", env=env)
               for name in ("image_tokens", "video_qa")}
    try:
        for proc, url, log in started.values():
            sh.wait_serving(proc, url, log, timeout=300)
        yield {name: url for name, (_, url, _) in started.items()}
    finally:
        for proc, _, _ in started.values():
            sh.stop(proc)


@pytest.fixture(scope="module")
def browser():
    import screenshots as sh
    from playwright.sync_api import sync_playwright
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    with sync_playwright() as pw:
        b = sh.launch_browser(pw)
        yield b
        b.close()


def _bad_upload(page, path, expect: str) -> str:
    import screenshots as sh
    sh.upload(page, path)
    sh.run_and_wait(page, "status", "Error")
    status = page.locator("#status").inner_text()
    assert "Error" in status and expect in status, status
    return status


@needs_browser
def test_image_demo_in_browser(servers, browser, tmp_path):
    import screenshots as sh
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    texts = sh.drive_image_demo(page, servers["image_tokens"], spec="vision.block.*=tome(r=10)")
    assert "Error" not in texts["status"] and "UNTRAINED" in texts["status"]
    assert texts["overlay_src"]  # the overlay image is on the page
    assert "GFLOPs" in texts["numbers"] and "ms" in texts["numbers"]
    assert "77" in texts["numbers"]  # 197 tokens - 12 blocks x r=10
    assert page.locator("#sites img").count() == 12  # one overlay per reduced block
    path = sh.save_screenshot(page, SHOTS / "image_tokens.png", palette=False)
    print(f"\nscreenshot: {path}")
    fake = tmp_path / "holiday.png"
    fake.write_text("plain text pretending to be a PNG\n")
    _bad_upload(page, fake, "holiday.png is not an image")
    page.close()
    # over the upload cap: Gradio refuses the file and says so
    from PIL import Image
    big = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 0.05 * 2**20
    page = browser.new_page()
    page.goto(servers["image_tokens"])
    page.locator("#upload input[type=file]").set_input_files(str(big))
    page.get_by_text("exceed the maximum allowed size").first.wait_for(timeout=60_000)
    page.close()


@needs_browser
def test_video_demo_in_browser(servers, browser, tmp_path):
    import screenshots as sh
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    texts = sh.drive_video_demo(page, servers["video_qa"], selection="uniform")
    assert "Error" not in texts["status"], texts["status"]
    assert texts["heatmap_src"] and page.locator("#frames_strip img").count() == 1
    assert "LLM input tokens" in texts["numbers"] and "frame selection (uniform" in texts["numbers"]
    assert "without reduction" in texts["answer"] and "Correct answer" in texts["answer"]
    path = sh.save_screenshot(page, SHOTS / "video_qa.png", palette=False)
    print(f"\nscreenshot: {path}")
    fake = tmp_path / "movie.mp4"
    fake.write_text("plain text pretending to be an MP4\n")
    _bad_upload(page, fake, "movie.mp4 is not a video")
    page.close()


@pytest.mark.parametrize("argv,msg", [
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--max-file-mb", "0"], "--max-file-mb must be > 0"),
    (["--max-seconds", "-1"], "--max-seconds must be > 0"),
    (["--model", "tiny", "--weights", "somewhere"], "--weights applies to --model best"),
])
def test_demo_flags_are_checked_before_the_model_loads(monkeypatch, argv, msg):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")
    monkeypatch.setattr(vq, "load_video_model", no_model)
    monkeypatch.setattr(it, "build_demo", no_model)
    with pytest.raises(SystemExit, match=msg):
        vq.main(argv)
    if "--max-seconds" not in argv and "--weights" not in argv:
        with pytest.raises(SystemExit, match=msg):
            it.main(argv)
