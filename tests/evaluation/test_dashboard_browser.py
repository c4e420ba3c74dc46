"""The drift dashboard in a real headless Chromium (Debian's `chromium`, which `.ci/run` installs): served on
127.0.0.1, its plots decode at their PNG size and its rollout videos load at their frame size and length."""

from __future__ import annotations

import functools
import http.server
import re
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from evaluation import drift
from pipelines.shapes_world import render, sample_clip
from pipelines.video import encode_mp4

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not at /usr/bin/chromium (.ci/run installs it)")

SIZE, FPS, SECONDS = 64, 12, 2.0
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
)
# The dashboard in a frame of a probe page, whose script writes what the browser made of each image and video.
PROBE = """<!doctype html><html><body><iframe id="page" src="dashboard.html" width="1200" height="2000"></iframe>
<pre id="result">pending</pre><script>
const frame = document.getElementById("page");
frame.addEventListener("load", async () => {
  const doc = frame.contentDocument;
  const images = [...doc.images].map(img => img.decode().then(
    () => `img ${img.alt} ${img.naturalWidth}x${img.naturalHeight}`, () => `img ${img.alt} failed`));
  const videos = [...doc.querySelectorAll("video")].map(video => new Promise(done => {
    const report = () => done(`video ${video.videoWidth}x${video.videoHeight} ${video.duration.toFixed(2)}s`);
    if (video.readyState >= 1) report(); else video.addEventListener("loadedmetadata", report);
    video.addEventListener("error", () => done(`video failed ${video.error && video.error.code}`));
  }));
  document.getElementById("result").textContent = (await Promise.all([...images, ...videos])).join("\\n");
});
</script></body></html>"""


def png_size(path: Path) -> tuple[int, int]:
    width, height = struct.unpack(">II", path.read_bytes()[16:24])
    return width, height


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """`tmp_path/site` over HTTP on 127.0.0.1; yields the base URL and the paths the server was asked for."""
    site = tmp_path / "site"
    site.mkdir()
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            requested.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requested
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_the_dashboard_s_plots_and_videos_load_in_chromium(served: tuple[str, list[str]], tmp_path: Path) -> None:
    url, requested = served
    site = tmp_path / "site"
    per_second = {
        "teacher": {"sharpness": [5.0, 4.0, 3.0], "color_acc": [1.0, 0.5, 0.25]},
        "dmd_student": {"sharpness": [5.0, 5.0, 5.0], "color_acc": [1.0, 1.0, 0.75]},
    }
    plots = drift.plot_all(per_second, tmp_path / "plots")
    videos = []
    for index, model in enumerate(per_second):
        video = tmp_path / "videos" / f"{model}_000.mp4"
        video.parent.mkdir(exist_ok=True)
        video.write_bytes(encode_mp4(render(sample_clip(0, index), SIZE, FPS, SECONDS), FPS))
        videos.append(video)
    summary = {"models": {m: {"color_acc": 0.75, "drift_ratio": {"sharpness": 1.0}} for m in per_second}}
    drift.write_dashboard([{"name": "eval-1", "summary": summary, "plots": plots, "videos": videos}], site / "dashboard.html")
    (site / "probe.html").write_text(PROBE)

    browser = subprocess.run(
        [str(CHROMIUM), *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
         f"{url}/probe.html"],
        capture_output=True, text=True, timeout=60,
    )
    assert browser.returncode == 0, browser.stderr[-2000:]
    [result] = re.findall(r'<pre id="result">(.*?)</pre>', browser.stdout, re.DOTALL)
    expected = [f"img {p.stem} {'x'.join(map(str, png_size(p)))}" for p in plots]
    expected += [f"video {SIZE}x{SIZE} {SECONDS:.2f}s"] * len(videos)
    assert result.splitlines() == expected
    assert {"/probe.html", "/dashboard.html"} <= set(requested)
