"""The training scripts refuse bad numeric flags when they parse them (argparse: exit 2, the flag
and its valid range named), before any model is built."""
import pytest
import torch

from tokenreduce.eval import train_atp, train_embedded, train_frame_selector


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _no_run(*a, **kw):  # a flag that got past the parser would start a training run
    raise AssertionError("the script went on past its flags")


def _refused(capsys, main, argv) -> str:
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert torch.get_num_threads() == threads  # refused before torch was touched
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("script, stub, argv, expect", [
    (train_embedded, "build_tokenizer", ["--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (train_embedded, "build_tokenizer", ["--threads", "-1"], "argument --threads: must be >= 0 (0 = torch's default), got -1"),
    (train_embedded, "build_tokenizer", ["--frames", "1"], "argument --frames: must be >= 2"),
    (train_embedded, "build_tokenizer", ["--lr", "0"], "argument --lr: must be > 0, got 0"),
    (train_embedded, "build_tokenizer", ["--minutes", "nan"], "argument --minutes: must be > 0, got nan"),
    (train_embedded, "build_tokenizer", ["--warmup", "0"], "argument --warmup: must be >= 1"),
    (train_embedded, "build_tokenizer", ["--eval-samples", "0"], "argument --eval-samples: must be >= 1"),
    (train_embedded, "build_tokenizer", ["--aux-weight", "-0.5"], "argument --aux-weight: must be >= 0"),
    (train_embedded, "build_tokenizer", ["--background-dropout", "1.5"], "argument --background-dropout: must be in [0, 1], got 1.5"),
    (train_embedded, "build_tokenizer", ["--text-layers", "0"], "argument --text-layers: must be >= 1"),
    (train_embedded, "build_tokenizer", ["--text-hidden", "100"], "--text-hidden 100 must be a multiple of --text-heads 6"),
    (train_embedded, "build_tokenizer", ["--attention-aux", "1", "--attention-aux-layer", "4"], "--attention-aux-layer 4"),
    (train_embedded, "build_tokenizer", ["--frame-aux", "1", "--frame-aux-layer", "5"], "give 0..4"),
    (train_atp, "train", ["--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (train_atp, "train", ["--target", "1.5"], "argument --target: must be in (0, 1], got 1.5"),
    (train_atp, "train", ["--target", "0"], "argument --target: must be in (0, 1], got 0"),
    (train_atp, "train", ["--steps", "0"], "argument --steps: must be >= 1"),
    (train_atp, "train", ["--depth", "1"], "argument --depth: must be >= 2"),
    (train_atp, "train", ["--lr", "-1"], "argument --lr: must be > 0"),
    (train_atp, "train", ["--lambda-atp", "-1"], "argument --lambda-atp: must be >= 0"),
    (train_atp, "train", ["--threads", "-1"], "argument --threads: must be >= 0"),
    (train_atp, "train", ["--batch", "two"], "argument --batch: expected a whole number >= 1, got 'two'"),
    (train_atp, "train_on_embedded", ["--model", "embedded", "--target", "0.5"], "--target and --depth belong to --model tiny"),
    (train_atp, "train_on_embedded", ["--model", "embedded", "--budget", "0"], "argument --budget: must be in (0, 1]"),
    (train_atp, "train", ["--budget", "0.5"], "--budget belongs to --model embedded"),
    (train_frame_selector, "train", ["--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (train_frame_selector, "train", ["--frames", "0"], "argument --frames: must be >= 1"),
    (train_frame_selector, "train", ["--k", "0"], "argument --k: must be >= 1"),
    (train_frame_selector, "train", ["--lr", "inf"], "argument --lr: must be > 0, got inf"),
    (train_frame_selector, "train", ["--k", "40", "--frames", "32"], "--k 40 is more than --frames 32"),
], ids=lambda v: v.__name__.rsplit(".", 1)[-1] if hasattr(v, "__name__") else None)
def test_training_scripts_refuse_bad_flags_at_parse_time(tmp_path, capsys, monkeypatch, script, stub, argv, expect):
    monkeypatch.setattr(script, stub, _no_run)  # a run the flags let through fails the test at once
    out = tmp_path / "sub" / "out"
    err = _refused(capsys, script.main, ["--out", str(out), *argv])
    assert expect in err
    assert not out.parent.exists()
