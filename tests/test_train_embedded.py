"""The embedded model's trainer (eval/train_embedded.py): the grounding targets of the attention
loss, the loss itself, and a two-step run that writes a loadable checkpoint."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenreduce.eval.synthetic import QTYPES, VideoQAGenerator  # noqa: E402
from tokenreduce.eval.train_embedded import (answer_objects, attention_loss, attention_targets,  # noqa: E402
                                             background_dropout, background_tokens, forward_last, main)

CELL = 16  # 64 px frames, patch 8, the projector's 2x2 pooling: one LLM token per 16x16 square


def _cell_of(xy) -> int:
    x, y = (int(v) // CELL for v in xy)
    return y * (64 // CELL) + x


@pytest.mark.parametrize("qtype", ["region_color", "start_end", "brief_color", "first_color"])
def test_attention_targets_mark_the_asked_object_at_the_asked_frames(qtype):
    gen = VideoQAGenerator(seed=11)
    for _ in range(5):
        s = gen.sample(qtype)
        _, colours, _ = gen.render(s, with_labels=True)
        targets = attention_targets([s], [colours], cell=CELL)[0].view(gen.T, -1)
        frames = s["meta"]["frames"]
        assert targets.any(1).nonzero().flatten().tolist() == sorted(frames)  # only the asked frames
        colour, _ = answer_objects(s)
        (obj,) = [o for o in s["objects"] if o["color"] in colour]
        for t in frames:
            assert targets[t, _cell_of(obj["pos"][t])], (qtype, t)  # the object's centre cell is a target
            assert int(targets[t].sum()) <= 4  # an object of radius 7 covers at most 2x2 cells


def test_count_targets_every_object_of_the_shape_and_none_for_zero():
    gen = VideoQAGenerator(seed=5)
    seen_zero = False
    for _ in range(12):
        s = gen.sample("count")
        _, colours, _ = gen.render(s, with_labels=True)
        targets = attention_targets([s], [colours], cell=CELL)[0].view(gen.T, -1)
        k = ["zero", "one", "two", "three"].index(s["answer"])
        seen_zero |= k == 0
        assert bool(targets.any()) == (k > 0)
        unsupervised = attention_targets([s], [colours], cell=CELL, qtypes=[q for q in QTYPES if q != "count"])
        assert not unsupervised.any()  # --attention-aux-types without count
        if k:
            shape = s["question"].split()[2][:-1]
            for o in (o for o in s["objects"] if o["shape"] == shape):
                assert targets[0, _cell_of(o["pos"][0])]
    assert seen_zero
    with pytest.raises(ValueError, match="valid: " + ", ".join(QTYPES)):
        answer_objects({"qtype": "colour", "objects": [], "meta": {}})


def test_attention_loss_is_small_on_the_targets_and_large_elsewhere():
    video_id, n_vis = 7, 9  # 8 frame tokens + the newline
    ids = torch.tensor([[1, 2] + [video_id] * n_vis + [3, 4]])
    N = ids.shape[1]
    targets = torch.zeros(1, 8, dtype=torch.bool)
    targets[0, [1, 5]] = True
    on = torch.zeros(1, 2, N, N)
    on[:, :, -1, 2 + 1] = on[:, :, -1, 2 + 5] = 0.5
    assert float(attention_loss(on, ids, targets, video_id)) == pytest.approx(0.0, abs=1e-4)
    uniform = torch.full((1, 2, N, N), 1.0 / N)
    assert float(attention_loss(uniform, ids, targets, video_id)) == pytest.approx(-math.log(2 / N), rel=1e-4)
    newline = torch.zeros(1, 2, N, N)
    newline[:, :, -1, 2 + 8] = 1.0  # the trailing newline is never a target
    assert float(attention_loss(newline, ids, targets, video_id)) > 10
    # a batch with no targets (a "zero" count) adds nothing
    assert float(attention_loss(uniform, ids, torch.zeros(1, 8, dtype=torch.bool), video_id)) == 0.0


def test_background_dropout_hides_clutter_only_and_equals_removing_those_tokens():
    from tokenreduce.eval.embedded import EmbeddedProcessor, build_config, build_model, build_tokenizer
    tok = build_tokenizer()
    cfg = build_config(tok)
    model, proc = build_model(cfg, seed=0).eval(), EmbeddedProcessor(tok, cfg)
    gen = VideoQAGenerator(seed=3)
    samples = [gen.sample(q) for q in ("count", "region_color", "brief_color")]
    rendered = [gen.render(s, with_labels=True) for s in samples]
    background = background_tokens([r[1] for r in rendered], CELL)
    objects = torch.stack([attention_targets([s], [r[1]], cell=CELL, min_pixels=1)[0] for s, r in zip(samples, rendered)])
    assert background.shape == (3, 8 * 16) and not (background & objects).any() and background.any(1).all()
    inputs = proc(text=[proc.prompt(s["question"], s["options"]) for s in samples], videos=[r[0] for r in rendered])
    video = inputs["input_ids"] == cfg.video_token_id
    hidden = [background_dropout(inputs["input_ids"], background, 1.0, np.random.default_rng(seed), cfg.video_token_id)
              for seed in range(6)]
    for hide in hidden:
        assert not (hide & ~video).any()  # text and the trailing newline stay
        for b in range(3):  # the hidden tokens are background tokens, in frame order
            assert set(torch.nonzero(hide[b][video[b]][:128]).flatten().tolist()) <= set(
                torch.nonzero(background[b]).flatten().tolist())
    counts = torch.stack([h.sum(1) for h in hidden])
    assert (counts == 0).any() and (counts > 0).any()  # some samples hide nothing, others something
    hide = max(hidden, key=lambda h: int((h.sum(1) > 0).sum()))
    captured = {}
    handle = model.model.language_model.register_forward_pre_hook(lambda m, a, k: captured.update(k), with_kwargs=True)
    with torch.no_grad():
        masked = forward_last(model, inputs, hide=hide)[0]
        handle.remove()
        pos = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        for b in range(3):  # hiding = removing the tokens before layer 0, the others keeping their positions
            keep = (inputs["attention_mask"][b] > 0) & ~hide[b]
            out = model.model.language_model(inputs_embeds=captured["inputs_embeds"][b:b + 1, keep],
                                             position_ids=pos[b:b + 1, keep])
            torch.testing.assert_close(model.lm_head(out.last_hidden_state[:, -1])[0], masked[b], atol=1e-4, rtol=1e-4)


def test_two_training_steps_write_a_loadable_model(tmp_path, capsys):
    from tokenreduce.eval.embedded import load_embedded
    out = tmp_path / "run"
    assert main(["--out", str(out), "--max-steps", "2", "--batch", "4", "--eval-samples", "5", "--frames", "4",
                 "--threads", "1", "--relevance-every", "2", "--position-aux", "0.2", "--frame-aux", "0.2",
                 "--attention-aux", "1", "--eval-every", "0.001"]) == 0
    info = json.loads((out / "training.json").read_text())
    assert len(info["log"]) > 1 and not (out / "checkpoint").exists()  # interval copies removed at the end
    assert info["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto
    assert info["steps"] == 2 and info["samples_seen"] == 8 and set(info["held_out"]) == set(QTYPES) | {"all"}
    model, proc = load_embedded(out)
    frames = np.zeros((4, 64, 64, 3), np.uint8)
    with torch.no_grad():
        logits = model(**proc(text=proc.prompt("how many circles are there ?", ["zero", "one"]), videos=[frames])).logits
    assert torch.isfinite(logits).all()
    # a continuation (--init) reports its whole training: both stages and their totals
    out2 = tmp_path / "run2"
    assert main(["--out", str(out2), "--init", str(out), "--max-steps", "1", "--batch", "4", "--eval-samples", "5",
                 "--frames", "4", "--threads", "1", "--attention-aux", "1",
                 "--attention-aux-types", "region_color,start_end", "--background-dropout", "1"]) == 0
    info2 = json.loads((out2 / "training.json").read_text())
    # a continuation is as deterministic as a fresh run (its auxiliary heads were drawn unseeded)
    out3 = tmp_path / "run3"
    assert main(["--out", str(out3), "--init", str(out), "--max-steps", "1", "--batch", "4", "--eval-samples", "5",
                 "--frames", "4", "--threads", "1", "--attention-aux", "1",
                 "--attention-aux-types", "region_color,start_end", "--background-dropout", "1"]) == 0
    from safetensors.torch import load_file
    a, b = load_file(out2 / "model.safetensors"), load_file(out3 / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [st["steps"] for st in info2["stages"]] == [2, 1]
    assert info2["total_samples_seen"] == 12
    assert info2["total_train_seconds"] == info["train_seconds"] + info2["train_seconds"]
    # a continuation runs on the checkpoint's own sizes: flags that say otherwise are refused, not ignored
    for extra, expect in ((["--text-layers", "2"], "text_layers 4 there, 2 here); pass --text-layers 4"),
                          (["--frame-aux", "1", "--frame-aux-layer", "7"], "the LLM has 4 layers (--init")):
        with pytest.raises(SystemExit) as e:
            main(["--out", str(tmp_path / "bad"), "--init", str(out), "--max-steps", "1", *extra])
        assert e.value.code == 2 and expect in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("argv, expect", [
    (["--attention-aux", "1", "--attention-aux-types", "region_colour"], "valid: " + ", ".join(QTYPES)),
    (["--qtype-weights", "count"], "'count' needs a number, e.g. count=2.5"),
    (["--qtype-weights", "count=-1"], "the weight must be a number >= 0"),
    (["--patch-size", "7"], "--patch-size 7 must divide --image-size 64"),
    (["--image-size", "32"], "--image-size 32: the clips need at least 48 pixels"),
    (["--init", "nowhere"], "--init nowhere: not a trained model folder"),
])
def test_flags_that_failed_mid_run_are_refused_up_front(tmp_path, capsys, argv, expect):
    out = tmp_path / "sub" / "out"
    with pytest.raises(SystemExit) as e:
        main(["--out", str(out), "--max-steps", "1", *argv])
    assert e.value.code == 2 and expect in capsys.readouterr().err and not out.parent.exists()


def test_an_output_path_under_a_file_is_refused_before_training(tmp_path, capsys):
    from tokenreduce.eval import train_atp
    (tmp_path / "afile").write_text("x")
    for script, argv in ((main, ["--max-steps", "1"]), (train_atp.main, ["--steps", "1"])):
        with pytest.raises(SystemExit) as e:
            script(["--out", str(tmp_path / "afile" / "x"), *argv])
        assert e.value.code == 2 and "afile' is a file, not a folder" in capsys.readouterr().err


def test_bad_device_names_the_valid_choices(tmp_path):
    with pytest.raises(ValueError, match="valid are auto, cpu, cuda, cuda:N"):
        main(["--out", str(tmp_path / "bad"), "--max-steps", "1", "--device", "gpu"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            main(["--out", str(tmp_path / "bad"), "--max-steps", "1", "--device", "cuda"])


def test_max_steps_schedule_follows_the_steps_not_the_clock(monkeypatch, tmp_path):
    """with --max-steps the learning-rate cosine is step-based: a slow machine (the clock far ahead)
    gives the same rates, so the same seed and steps give the same weights"""
    import tokenreduce.eval.train_embedded as te
    rates = {}
    real = torch.optim.AdamW.step
    for label, speed in (("fast", 1e-6), ("slow", 1.0)):  # seconds per clock reading; the budget is 60 s
        clock = iter(range(10 ** 6))
        monkeypatch.setattr(te.time, "time", lambda: next(clock) * speed)
        seen = []

        def spy(opt, *a, **kw):
            seen.append(opt.param_groups[0]["lr"])
            return real(opt, *a, **kw)
        monkeypatch.setattr(torch.optim.AdamW, "step", spy)
        main(["--out", str(tmp_path / label), "--max-steps", "3", "--minutes", "1", "--batch", "2",
              "--eval-samples", "5", "--frames", "4", "--threads", "1", "--relevance-every", "0", "--warmup", "1"])
        rates[label] = seen
    assert rates["fast"] == rates["slow"] and len(rates["fast"]) == 3 and rates["fast"][0] > rates["fast"][-1]


# a model small enough that a few steps take a second; every loss and random draw of the trainer on
TINY = ["--image-size", "48", "--vision-hidden", "16", "--vision-layers", "1", "--vision-heads", "2",
        "--text-hidden", "16", "--text-layers", "2", "--text-heads", "2", "--text-kv-heads", "1", "--frames", "4",
        "--batch", "2", "--eval-samples", "5", "--threads", "1", "--warmup", "2", "--relevance-every", "3",
        "--qtype-weights", "count=2", "--background-dropout", "0.5", "--position-aux", "0.2", "--frame-aux", "0.2",
        "--attention-aux", "1"]


class Killed(BaseException):
    """what a kill does to the process: it ends mid-step, past its last checkpoint"""


def _killed_run(monkeypatch, out, flags, after_steps):
    """run main until `after_steps` steps are done (the next batch is being drawn), then die"""
    import tokenreduce.eval.train_embedded as te
    real, calls = te.make_batch, []

    def make_batch(*a, **kw):
        calls.append(1)
        if len(calls) > after_steps:
            raise Killed
        return real(*a, **kw)
    monkeypatch.setattr(te, "make_batch", make_batch)
    with pytest.raises(Killed):
        main(["--out", str(out), *flags])
    monkeypatch.setattr(te, "make_batch", real)


def test_a_killed_run_resumed_from_its_checkpoint_ends_with_the_same_weights(tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file
    flags = ["--max-steps", "5", "--checkpoint-every", "2", *TINY]
    whole = tmp_path / "whole"
    assert main(["--out", str(whole), *flags]) == 0
    out = tmp_path / "killed"
    _killed_run(monkeypatch, out, flags, after_steps=3)  # checkpoint at step 2; step 3's update is lost
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 2 and not (out / "model.safetensors").exists()
    before = {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()}
    # refused up front (exit 2), the checkpoint untouched: a new run over it, other flags, nothing to resume
    for argv, expect in (
            ([*flags], "holds checkpoint/ of a run stopped at step 2; pass --resume"),
            ([*flags, "--resume", "--lr", "2e-3", "--seed", "3"],
             "(--lr 0.0015 there, 0.002 here, --seed 1 there, 3 here); "
             "resume with the checkpoint's: --lr 0.0015 --seed 1"),
            ([*flags, "--resume", "--init", str(whole)],
             f"--init not given there, {whole} here); resume with the checkpoint's: drop --init"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["--out", str(out), *argv])
        assert e.value.code == 2 and expect in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()} == before
    with pytest.raises(SystemExit) as e:
        main(["--out", str(whole), *flags, "--resume"])  # a finished run removed its checkpoint
    assert e.value.code == 2 and "holds no checkpoint to resume" in capsys.readouterr().err
    # a new process: nothing of the killed run's memory (torch's and numpy's global generators scrambled)
    torch.manual_seed(999)
    np.random.seed(999)
    assert main(["--out", str(out), *flags, "--resume", "--eval-every", "1000"]) == 0  # reporting may change
    assert "resuming" in capsys.readouterr().out
    a, b = load_file(whole / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-exact
    info, whole_info = (json.loads((d / "training.json").read_text()) for d in (out, whole))
    assert (info["steps"], info["samples_seen"], info["resumed_at"]) == (5, 10, [2]) and whole_info["resumed_at"] == []
    assert info["held_out"] == whole_info["held_out"]
    assert not any(p.name.startswith("checkpoint") for p in out.iterdir())


def test_a_resumed_run_counts_the_time_already_spent_and_survives_a_kill_while_checkpointing(tmp_path, monkeypatch):
    from safetensors.torch import load_file
    # the budget is reached first; --max-steps only makes a resume that forgets the time fail fast
    flags = ["--checkpoint-every", "2", "--minutes", "5", "--max-steps", "6", *TINY]
    out = tmp_path / "run"
    _killed_run(monkeypatch, out, flags, after_steps=3)
    ckpt = out / "checkpoint"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["train_seconds"] = 5 * 60 + 1  # the killed run had spent its budget
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    weights = load_file(ckpt / "model.safetensors")
    # killed between renaming the last checkpoint aside and the new one into place
    ckpt.rename(out / "checkpoint.prev")
    (out / "checkpoint.tmp").mkdir()
    (out / "checkpoint.tmp" / "model.safetensors").write_bytes(b"half written")
    assert main(["--out", str(out), *flags, "--resume"]) == 0
    info = json.loads((out / "training.json").read_text())
    assert info["steps"] == 2 and info["train_seconds"] >= 5 * 60  # no step past the budget
    final = load_file(out / "model.safetensors")
    assert all(torch.equal(final[k], weights[k]) for k in weights)
    assert not any(p.name.startswith("checkpoint") for p in out.iterdir())


def test_relevance_batch_on_clips_showing_the_cross_in_every_frame():
    """with 2 frames the cross may be visible in both: such a clip gives a True frame (choosing a
    False frame among none crashed `--frames 2` training at its first relevance batch)"""
    from types import SimpleNamespace

    from tokenreduce.eval.train_embedded import relevance_batch
    gen = VideoQAGenerator(frames=2, seed=0)
    proc = lambda text, videos: dict(text=text, videos=videos)  # noqa: E731
    proc.tokenizer = SimpleNamespace(convert_tokens_to_ids=lambda w: {"True": 1, "False": 0}[w])
    inputs, target = relevance_batch(gen, proc, 64)
    assert len(inputs["videos"]) == 64 and set(target.tolist()) == {0, 1}
    again = VideoQAGenerator(frames=2, seed=0)
    whole = [s for s in (again.sample("brief_color") for _ in range(64)) if len(s["meta"]["frames"]) == 2]
    assert whole  # the case this test is about occurs at this seed


def test_a_weights_only_checkpoint_of_an_earlier_version_is_not_overwritten(tmp_path, capsys):
    """an --out holding the weights-only checkpoint/ the script wrote before --resume existed: a new
    run there would have trained over it and removed it; both a new run and --resume are refused,
    naming --init"""
    out = tmp_path / "killed"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "config.json").write_text("{}")
    for extra in ([], ["--resume"]):
        with pytest.raises(SystemExit) as e:
            main(["--out", str(out), "--max-steps", "1", *TINY, *extra])
        assert e.value.code == 2 and f"--init {out / 'checkpoint'}" in capsys.readouterr().err
    assert (out / "checkpoint" / "config.json").read_text() == "{}"
