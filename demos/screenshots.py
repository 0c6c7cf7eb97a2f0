"""Start both demos, drive them in a headless Chromium (Playwright) and save screenshots.

    python demos/screenshots.py --out docs/              # best models available (DINOv2-S, trained embedded model)
    python demos/screenshots.py --out /tmp/shots --model tiny

Writes OUT/demo_image_tokens.png and OUT/demo_video_qa.png (palette PNGs, small enough to
commit). Uses Debian's Chromium at /usr/bin/chromium (`apt-get install chromium`); Playwright
never downloads a browser here. The same helpers drive the browser tests (tests/test_demos.py).
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

DEMOS = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
VIDEO_SPEC = "projector.out=uniform(keep=0.5); llm.layer.2=fastv(ratio=0.5)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_demo(script: str, *args: str, env: dict | None = None, log_path=None):
    """Start demos/<script> on a free 127.0.0.1 port without waiting: (process, url, log path)."""
    port = free_port()
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    log_path = Path(log_path or f"{tempfile.gettempdir()}/tokenreduce_demo_{Path(script).stem}_{port}.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(DEMOS / script), "--host", "127.0.0.1", "--port", str(port),
                                 *args], stdout=log, stderr=subprocess.STDOUT, env=full_env)
    return proc, f"http://127.0.0.1:{port}/", log_path


def wait_serving(proc, url: str, log_path, timeout: float = 180.0) -> None:
    """Wait until `url` answers 200. Raises RuntimeError with the end of the log when the
    process exits or does not serve in time (and stops it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the demo exited with {proc.returncode}:\n{Path(log_path).read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"{url}: the demo did not serve within {timeout:.0f} s:\n{Path(log_path).read_text()[-3000:]}")


def start_demo(script: str, *args: str, env: dict | None = None, timeout: float = 180.0):
    """Start demos/<script> on a free 127.0.0.1 port; return (process, url) once it serves."""
    proc, url, log_path = spawn_demo(script, *args, env=env)
    wait_serving(proc, url, log_path, timeout)
    return proc, url


def stop(proc) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def launch_browser(playwright):
    """Debian's Chromium, headless; never a browser Playwright downloads itself."""
    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(f"{CHROMIUM} not found; install it with: apt-get install chromium")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def _text(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").inner_text()


def run_and_wait(page, marker_id: str, marker_text: str, timeout_ms: int = 120_000) -> None:
    """Click Run, then wait until #marker_id contains marker_text or #status reports an error."""
    page.locator("#run").click()
    page.wait_for_function(
        """([id, text]) => {
            const m = document.getElementById(id), s = document.getElementById('status');
            return (m && m.innerText.includes(text)) || (s && s.innerText.includes('Error'));
        }""", arg=[marker_id, marker_text], timeout=timeout_ms)


def set_spec(page, spec: str) -> None:
    page.locator("#spec textarea").fill(spec)


def upload(page, path) -> None:
    """Put a file into the #upload component and wait until Gradio has taken it."""
    page.locator("#upload input[type=file]").set_input_files(str(path))
    page.locator("#upload").get_by_text(Path(path).name).first.wait_for(timeout=90_000)  # generous: the CI machine may be busy


def drive_image_demo(page, url: str, spec: str | None = None) -> dict:
    """Open the image demo, run the default sample, return the texts the page shows."""
    page.goto(url)
    page.locator("#run").wait_for()
    if spec:
        set_spec(page, spec)
    run_and_wait(page, "numbers", "GFLOPs")
    page.locator("#overlay img").first.wait_for()
    return {"status": _text(page, "status"), "numbers": _text(page, "numbers"),
            "overlay_src": page.locator("#overlay img").first.get_attribute("src") or ""}


def drive_video_demo(page, url: str, spec: str | None = VIDEO_SPEC, selection: str | None = None) -> dict:
    """Open the video demo, run the default sample clip, return the texts the page shows."""
    page.goto(url)
    page.locator("#run").wait_for()
    if spec:
        set_spec(page, spec)
    if selection:
        page.locator("#selection").get_by_text(selection, exact=True).click()
    run_and_wait(page, "numbers", "LLM input tokens")
    page.locator("#heatmap img").first.wait_for()
    return {"status": _text(page, "status"), "numbers": _text(page, "numbers"), "answer": _text(page, "answer"),
            "heatmap_src": page.locator("#heatmap img").first.get_attribute("src") or ""}


def save_screenshot(page, path, palette: bool = True, max_width: int = 1000) -> Path:
    """A full-page screenshot; palette=True scales it to at most max_width pixels and stores it
    as a 128-colour PNG (a fraction of the size: the docs screenshots stay small to commit)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    if palette:
        im = Image.open(path).convert("RGB")
        if im.width > max_width:
            im = im.resize((max_width, round(im.height * max_width / im.width)), Image.LANCZOS)
        im.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs", help="folder for demo_image_tokens.png and demo_video_qa.png")
    p.add_argument("--model", choices=("best", "tiny"), default="best")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--only", choices=("image", "video"), default=None)
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per side in the demos (median shown)")
    args = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    jobs = [("image_tokens.py", drive_image_demo, "demo_image_tokens.png"),
            ("video_qa.py", drive_video_demo, "demo_video_qa.png")]
    with sync_playwright() as pw:
        browser = launch_browser(pw)
        try:
            for script, drive, name in jobs:
                if args.only and not script.startswith(args.only):
                    continue
                proc, url = start_demo(script, "--model", args.model, "--repeats", str(args.repeats))
                try:
                    page = browser.new_page(viewport={"width": args.width, "height": 900})
                    texts = drive(page, url)
                    if "Error" in texts["status"]:
                        raise SystemExit(f"{script}: the page reports {texts['status']!r}")
                    path = save_screenshot(page, out / name)
                    print(f"{path} ({path.stat().st_size // 1024} KB): {texts['status']}")
                    page.close()
                finally:
                    stop(proc)
        finally:
            browser.close()


if __name__ == "__main__":
    main()
