"""The line dashboard in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium)
while results, frames and dead letters flow through a real Redis/Valkey server."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from consumers.dashboard.app import Auth
from crd_model.stream import ErrorInfo, Region, Result, Timings, encode_map, make_frame, pack_frame, pack_result
from crd_model.stream.settings import DashboardSettings, Settings
from tests.plc_sims import free_port, wait_for

try:
    from selenium.common.exceptions import StaleElementReferenceException
except ImportError:  # without selenium the browser test is skipped (or fails in CI): see _needs_browser

    class StaleElementReferenceException(Exception):  # type: ignore[no-redef]
        pass


ROOT = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TOKEN = "test-token-0123456789"
MODEL = "disc-crd-0123456789ab"
H, W = 120, 160


def _needs_browser() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium")
    if missing:
        msg = f"missing {missing}: apt-get install chromium chromium-driver; pip install 'crd-inspect[test]'"
        if os.environ.get("CI"):
            pytest.fail(msg)  # CI installs them (.ci/run): a missing browser there is a broken CI, not a skip
        pytest.skip(msg)


class Line:
    """Feeds a line like producers + workers do: a frame, then its result (sometimes a dead letter)."""

    def __init__(self, r, s: Settings):
        self.r, self.s = r, s
        self.keys = {k: s.streams.key(s.line, k) for k in ("frames", "results", "dead")}
        self.rng = np.random.default_rng(7)
        self.n = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        # As on a real line: the workers' group on frames, a PLC bridge's group on results.
        r.xgroup_create(self.keys["frames"], s.streams.group, id="$", mkstream=True)
        r.xgroup_create(self.keys["results"], "plc-bridge", id="$", mkstream=True)

    def _image(self, cx: float, cy: float, defect: bool) -> np.ndarray:
        yy, xx = np.mgrid[0:H, 0:W]
        disc = ((xx - W / 2) ** 2 + (yy - H / 2) ** 2) < (0.42 * H) ** 2
        img = np.full((H, W, 3), 40, np.uint8)
        img[disc] = (150, 150, 160)
        img = (img + self.rng.integers(0, 12, img.shape)).clip(0, 255).astype(np.uint8)
        if defect:
            img[((xx - cx) ** 2 + (yy - cy) ** 2) < 36] = (90, 70, 60)
        return img

    def one(self) -> str:
        i = self.n
        self.n += 1
        verdict = "anomalous" if i % 4 == 1 else "error" if i % 9 == 4 else "ok"
        cx, cy = float(self.rng.uniform(50, 110)), float(self.rng.uniform(35, 85))
        fid = f"cam1:{i}"
        captured = time.time() - 0.08
        frame = make_frame(self._image(cx, cy, verdict == "anomalous"), np.zeros((H, W, 3), np.float32), frame_id=fid,
                           line=self.s.line, camera="cam1", seq=i, category="disc", captured_at=captured,
                           meta={"part_id": f"P-{1000 + i}", "shift": "B"})  # fmt: skip
        self.r.xadd(self.keys["frames"], {b"frame_id": fid.encode(), b"v": b"1", b"payload": pack_frame(frame)})
        for eid, _ in self.r.xreadgroup(self.s.streams.group, "gpu-0", {self.keys["frames"]: ">"}, count=1)[0][1]:
            self.r.xack(self.keys["frames"], self.s.streams.group, eid)  # the worker's read + ack
        yy, xx = np.mgrid[0:H, 0:W]
        score = float(self.rng.normal(0.3, 0.06))
        amap = 0.3 * np.exp(-(((xx - 80) ** 2 + (yy - 60) ** 2) / 4000.0))
        regions: list[Region] = []
        if verdict == "anomalous":
            score = float(self.rng.uniform(0.62, 0.95))
            amap = amap + score * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / 60.0))
            regions = [Region(x=int(cx) - 8, y=int(cy) - 8, w=17, h=17, area=200, peak=score)]
        result = Result(
            frame_id=fid, line=self.s.line, camera="cam1", seq=i, category="disc", verdict=verdict,
            score=None if verdict == "error" else score, threshold=0.5,
            anomaly_map=None if verdict == "error" else encode_map(amap.astype(np.float32), max_side=64),
            regions=regions, model_id=MODEL,
            timings=Timings(captured_at=captured, finished_at=captured + float(self.rng.uniform(0.05, 0.12))),
            error=ErrorInfo(code="bad_rgb", message="png does not decode") if verdict == "error" else None,
            worker="gpu-0", meta=frame.meta,
        )  # fmt: skip
        self.r.xadd(self.keys["results"], {b"frame_id": fid.encode(), b"verdict": verdict.encode(),
                                           b"payload": pack_result(result)})  # fmt: skip
        if verdict == "error":
            self.r.xadd(self.keys["dead"], {b"frame_id": fid.encode(), b"reason": b"bad_rgb",
                                            b"message": b"png does not decode", b"source_id": b"1-0",
                                            b"deliveries": b"1", b"worker": b"gpu-0", b"payload": b"x"})  # fmt: skip
        return fid

    def _run(self) -> None:
        while not self.stop.is_set():
            self.one()
            self.stop.wait(0.1)


def _spawn_dashboard(s: Settings, port: int, log_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRD_") and k != "REDIS_URL"}
    env.update(PYTHONPATH=str(ROOT), REDIS_URL=s.redis.url, CRD_DASHBOARD__AUTH_TOKEN=TOKEN,
               CRD_DASHBOARD__REFRESH_S="0.3", CRD_DASHBOARD__POLL_S="0.5")  # fmt: skip
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "crd_model.cli", "dashboard", "--line", s.line, "--port", str(port),
             "--plain-logs"], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


@pytest.fixture
def browser(tmp_path):
    _needs_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,1050",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):  # fmt: skip
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def _retry_stale(fn, attempts: int = 20):
    """Run `fn` again when the element it read was re-rendered underneath (a live page)."""
    for _ in range(attempts - 1):
        try:
            return fn()
        except StaleElementReferenceException:
            time.sleep(0.1)
    return fn()


def test_dashboard_in_a_real_browser_while_results_flow(settings, r, browser, tmp_path):
    port = free_port()
    line = Line(r, settings)
    proc = _spawn_dashboard(settings, port, tmp_path / "dashboard.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _get(f"{base}/api/lines?token={TOKEN}")[0] == 200, 20, "dashboard up")
        # Auth: nothing without the token (page, API, images), a wrong one is refused too.
        assert _get(f"{base}/")[0] == 401 and _get(f"{base}/api/lines/{settings.line}/snapshot")[0] == 401
        assert _get(f"{base}/?token=wrong")[0] == 401
        assert _get(f"{base}/api/lines", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        line.one()  # a result from before the page opened: the history is read once at start
        line.thread.start()
        browser.get(f"{base}/?token={TOKEN}")
        b = browser

        def text(el_id: str) -> str:
            return b.find_element("id", el_id).text

        wait_for(lambda: text("count-total").isdigit() and int(text("count-total")) >= 3, 20, "counts")
        first = int(text("count-total"))
        wait_for(lambda: int(text("count-total")) >= first + 5, 20, "counts updating")
        assert int(text("count-ok")) > 0 and int(text("count-anomalous")) > 0 and int(text("count-error")) > 0
        assert text("reject-rate").endswith("%") and text("latency-p50") != "–" and text("latency-p99") != "–"
        # The plot: drawn points and the threshold line, and real pixels on the canvas.
        plot = b.find_element("id", "score-plot")
        points = int(wait_for(lambda: plot.get_attribute("data-points"), 5, "plot"))
        assert points >= 3 and float(plot.get_attribute("data-threshold")) == 0.5
        wait_for(lambda: int(plot.get_attribute("data-points")) > points, 10, "plot updating")
        orange = b.execute_script(
            "const c = document.getElementById('score-plot'); const d = c.getContext('2d')"
            ".getImageData(0, 0, c.width, c.height).data; let n = 0;"
            "for (let i = 0; i < d.length; i += 4) if (d[i] > 200 && d[i+1] > 130 && d[i+1] < 190 && d[i+2] < 120) n++;"
            "return n;"
        )
        assert orange > 100, "no threshold line drawn"
        # Thumbnails of anomalous frames: overlay images that loaded, with the frame's own RGB.
        loaded = (
            "return [...document.querySelectorAll('#anomalies img.overlay')]"
            ".filter(i => i.complete && i.naturalWidth > 0 && i.src.includes('v=1')).length"
        )
        wait_for(lambda: b.execute_script(loaded) >= 2, 20, "overlay thumbnails")
        # What the overlay shows: the map's hot spot in red and the region box in green.
        fid = _retry_stale(lambda: b.find_element("css selector", "#anomalies .thumb").get_attribute("data-frame"))
        status, png = _get(f"{base}/api/lines/{settings.line}/frames/{fid}/overlay.png?size=full&token={TOKEN}")
        img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
        assert status == 200 and img.shape[:2] == (H, W)
        assert ((img[..., 0] > 170) & (img[..., 1] < 90)).sum() > 10  # red above the threshold
        assert ((img[..., 1] > 200) & (img[..., 0] < 60) & (img[..., 2] < 60)).sum() > 20  # region outline
        # Dead letters with their reasons.
        wait_for(lambda: "bad_rgb" in text("dead"), 10, "dead letters")
        assert "bad_rgb" in text("errors")
        wait_for(lambda: text("workers") == "1" and text("group-lag") == "0", 10, "workers' group")
        wait_for(lambda: "plc-bridge: lag" in text("plant-groups"), 10, "plant consumer group")
        if os.environ.get("CRD_DASHBOARD_SCREENSHOT"):
            wait_for(lambda: int(text("count-total")) >= 60, 30, "a fuller plot for the docs")
        shot = tmp_path / "dashboard.png"
        b.save_screenshot(str(shot))
        if os.environ.get("CRD_DASHBOARD_SCREENSHOT"):
            shutil.copy(shot, os.environ["CRD_DASHBOARD_SCREENSHOT"])
        assert Image.open(shot).size[0] >= 1000
        # Click a thumbnail: full image, map, overlay, score, model id and meta. The list re-renders
        # live, so a thumbnail found may be replaced before it is clicked: find it again then.
        clicked: list[str] = []

        def click_thumbnail() -> bool:
            try:
                thumb = b.find_element("css selector", "#anomalies .thumb")
                fid = thumb.get_attribute("data-frame")
                thumb.click()
            except StaleElementReferenceException:
                return False
            clicked.append(fid)
            return True

        wait_for(click_thumbnail, 10, "a thumbnail to click")
        fid = clicked[-1]
        wait_for(lambda: b.find_element("id", "modal").get_attribute("open") is not None, 5, "modal")
        wait_for(lambda: text("modal-model") == MODEL, 5, "modal filled")
        detail = json.loads(_get(f"{base}/api/lines/{settings.line}/frames/{fid}?token={TOKEN}")[1])
        assert text("modal-title") == fid and text("modal-score") == f"{detail['score']:.4f}"
        assert detail["meta"]["part_id"] in text("modal-meta") and "17×17" in text("modal-regions")
        for img_id in ("modal-overlay", "modal-image", "modal-map"):
            js = f"const i = document.getElementById('{img_id}'); return i.complete && i.naturalWidth > 0"
            wait_for(lambda js=js: b.execute_script(js), 10, img_id)
        # The page keeps updating underneath.
        now = int(text("count-total"))
        wait_for(lambda: int(text("count-total")) > now, 10, "still live")
    finally:
        line.stop.set()
        proc.terminate()
        assert proc.wait(timeout=20) == 0, (tmp_path / "dashboard.log").read_text()[-3000:]
        for key in line.keys.values():
            r.delete(key)


def test_auth_token_and_basic():
    assert not Auth(None, None).enabled

    def scope(headers: dict[str, str], query: str = "") -> dict:
        return {"type": "http", "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
                "query_string": query.encode(), "path": "/", "method": "GET"}  # fmt: skip

    basic = "Basic " + base64.b64encode(b"floor:s3cret").decode()
    auth = Auth("tok", ("floor", "s3cret"))
    assert auth.allows(scope({}, "token=tok")) and auth.allows(scope({"Authorization": "Bearer tok"}))
    assert auth.allows(scope({"Authorization": basic}))
    assert not auth.allows(scope({})) and not auth.allows(scope({}, "token=tok2"))
    assert not auth.allows(scope({"Authorization": "Basic " + base64.b64encode(b"floor:wrong").decode()}))
    assert not auth.allows(scope({"Authorization": "Basic !!!"}))


def test_dashboard_defaults_to_localhost_and_reads_secrets_from_files(tmp_path, monkeypatch):
    assert DashboardSettings().host == "127.0.0.1"
    (tmp_path / "token").write_text("from-a-file\n")
    monkeypatch.setenv("CRD_DASHBOARD__AUTH_TOKEN_FILE", str(tmp_path / "token"))
    s = Settings()
    assert s.dashboard.token() == "from-a-file"
    with pytest.raises(ValueError):
        DashboardSettings(basic_username="floor")  # a user without a password
    assert "from-a-file" not in repr(s)
    assert "s3cret" not in repr(DashboardSettings(basic_username="a", basic_password="s3cret"))
