"""`pip install .` gives a working package: adapters/ and eval/ ship as tokenreduce.adapters and
tokenreduce.eval, nothing named `adapters` or `eval` lands at the top of site-packages, and the
entry points find the first-party reducers and adapters."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True)
    return next(out.glob("tokenreduce-*.whl"))


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"tokenreduce"}
    for required in ("tokenreduce/adapters/timm_vit.py", "tokenreduce/adapters/hf_vision.py",
                     "tokenreduce/eval/cli.py", "tokenreduce/reducers/tome.py"):
        assert required in names
    assert not any(n.startswith(("adapters/", "eval/", "demos/", "tests/")) for n in names)


def test_installed_wheel_works(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = (
        "import tokenreduce, timm, torch\n"
        "from tokenreduce.adapters import timm_vit\n"
        f"assert tokenreduce.__file__.startswith({str(target)!r}), tokenreduce.__file__\n"
        "m = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=64).eval()\n"
        "h = tokenreduce.reduce(m, 'vision.block.*=tome(r=2)')\n"
        "m(torch.randn(1, 3, 64, 64))\n"
        "print(h.adapter.name, h.stats['tokens'][-1])\n"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    # 17 tokens, r=2 per block until the clamp (N - 1) // 2 stops merging at CLS + 1
    assert res.stdout.split() == ["timm_vit", "2"]
