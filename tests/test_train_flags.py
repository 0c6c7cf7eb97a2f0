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


@pytest.mark.parametrize("argv, expect", [
    (["--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (["--threads", "-1"], "argument --threads: must be >= 0 (0 = torch's default), got -1"),
    (["--frames", "1"], "argument --frames: must be >= 2"),
    (["--lr", "0"], "argument --lr: must be > 0, got 0"),
    (["--minutes", "nan"], "argument --minutes: must be > 0, got nan"),
    (["--warmup", "0"], "argument --warmup: must be >= 1"),
    (["--eval-samples", "0"], "argument --eval-samples: must be >= 1"),
    (["--aux-weight", "-0.5"], "argument --aux-weight: must be >= 0"),
    (["--background-dropout", "1.5"], "argument --background-dropout: must be in [0, 1], got 1.5"),
    (["--text-layers", "0"], "argument --text-layers: must be >= 1"),
    (["--text-hidden", "100"], "--text-hidden 100 must be a multiple of --text-heads 6"),
    (["--attention-aux", "1", "--attention-aux-layer", "4"], "--attention-aux-layer 4"),
    (["--frame-aux", "1", "--frame-aux-layer", "5"], "give 0..4"),
])
def test_train_embedded_refuses_bad_flags_at_parse_time(tmp_path, capsys, monkeypatch, argv, expect):
    monkeypatch.setattr(train_embedded, "build_tokenizer", _no_run)
    out = tmp_path / "o"
    err = _refused(capsys, train_embedded.main, ["--out", str(out), *argv])
    assert expect in err
    assert not out.exists()


@pytest.mark.parametrize("argv, expect", [
    (["--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (["--target", "1.5"], "argument --target: must be in (0, 1], got 1.5"),
    (["--target", "0"], "argument --target: must be in (0, 1], got 0"),
    (["--steps", "0"], "argument --steps: must be >= 1"),
    (["--depth", "1"], "argument --depth: must be >= 2"),
    (["--lr", "-1"], "argument --lr: must be > 0"),
    (["--lambda-atp", "-1"], "argument --lambda-atp: must be >= 0"),
    (["--threads", "-1"], "argument --threads: must be >= 0"),
    (["--batch", "two"], "argument --batch: expected a whole number >= 1, got 'two'"),
])
def test_train_atp_refuses_bad_flags_at_parse_time(tmp_path, capsys, monkeypatch, argv, expect):
    monkeypatch.setattr(train_atp, "train", _no_run)
    out = tmp_path / "o"
    err = _refused(capsys, train_atp.main, ["--out", str(out), *argv])
    assert expect in err
    assert not out.exists()


@pytest.mark.parametrize("argv, expect", [
    (["--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (["--frames", "0"], "argument --frames: must be >= 1"),
    (["--k", "0"], "argument --k: must be >= 1"),
    (["--lr", "inf"], "argument --lr: must be > 0, got inf"),
    (["--k", "40", "--frames", "32"], "--k 40 is more than --frames 32"),
])
def test_train_frame_selector_refuses_bad_flags_before_training(tmp_path, capsys, monkeypatch, argv, expect):
    monkeypatch.setattr(train_frame_selector, "train", _no_run)
    out = tmp_path / "sub" / "sel.safetensors"
    err = _refused(capsys, train_frame_selector.main, ["--out", str(out), *argv])
    assert expect in err
    assert not out.parent.exists()
