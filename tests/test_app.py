"""app.py: the page's server (jobs, refusals, its temporary folder) over HTTP, and the page in a real browser."""
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlencode, urlsplit

import numpy as np
import pytest
from PIL import Image

import app
import infer
from conftest import ROOT, assert_one_line_error, run_main, smooth_image


@contextlib.contextmanager
def serving(*argv):
    """app.py serving in a thread on a free port, with `argv`; closed (its folder removed) after."""
    served = app.start(app.build_parser().parse_args(["--port", "0", *map(str, argv)]))
    thread = threading.Thread(target=served.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        served.server.shutdown()
        served.close()


def request(url: str, body: bytes | None = None) -> tuple[int, bytes]:
    """(status, body) of a GET, or of a POST where `body` is given, sent as the page sends it (its Origin)."""
    parts = urlsplit(url)
    headers = {} if body is None else {"Origin": f"{parts.scheme}://{parts.netloc}"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def submit(served, body: bytes, **query) -> tuple[int, dict]:
    code, reply = request(f"{served.url}jobs?{urlencode(query)}", body)
    return code, json.loads(reply)


def finished(served, job_id: int, timeout: float = 120) -> dict:
    """The job's status once it is done or failed."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = json.loads(request(f"{served.url}jobs/{job_id}")[1])
        if status["state"] in ("done", "failed"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {status['state']} after {timeout} s")


def infer_output(src, tmp_path, *flags) -> bytes:
    out = tmp_path / f"infer_{src.stem}_{flags[-1]}.png"  # flags end with the precision
    code, _, err = run_main(infer, src, "-o", out, *flags)
    assert code == 0, err
    return out.read_bytes()


def photo(path, height=24, width=32, seed=0, **save):
    Image.fromarray(smooth_image(np.random.default_rng(seed), height, width)).save(path, **save)
    return path


def test_two_queued_jobs_give_infer_outputs_byte_for_byte(tiny_checkpoint, tmp_path, capfd):
    png = photo(tmp_path / "a.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter: the output is upright, with the EXIF kept, as infer.py writes it
    jpeg = photo(tmp_path / "b.jpg", seed=1, exif=exif.tobytes())
    gray = tmp_path / "c.png"  # grayscale with alpha: stays so, as infer.py writes it
    Image.open(photo(tmp_path / "c_rgb.png", seed=2)).convert("LA").save(gray)
    with serving("--checkpoint", tiny_checkpoint) as served:
        page = request(served.url)[1].decode()
        assert "tiny.pt" in page and "{{CONFIG}}" not in page
        jobs = [submit(served, png.read_bytes(), name="a.png", network="tiny.pt", precision="fp32"),
                submit(served, jpeg.read_bytes(), name="b.jpg", network="tiny.pt", precision="bf16")]
        assert [code for code, _ in jobs] == [202, 202] and jobs[1][1]["id"] != jobs[0][1]["id"]
        a, b = (finished(served, job["id"]) for _, job in jobs)
        assert (a["state"], b["state"]) == ("done", "done") and a["download"] == "a_x4.png"
        assert "24x32 -> 96x128" in b["summary"] and "bf16" in b["summary"], b  # upright: 32 wide became 32 high
        assert request(served.url + a["result"].lstrip("/"))[1] == infer_output(png, tmp_path, "--checkpoint",
                                                                                tiny_checkpoint, "--precision", "fp32")
        assert request(served.url + b["result"].lstrip("/"))[1] == infer_output(jpeg, tmp_path, "--checkpoint",
                                                                                tiny_checkpoint, "--precision", "bf16")
        _, job = submit(served, gray.read_bytes(), name="c.png", network="tiny.pt", precision="fp32")
        c = finished(served, job["id"])
        assert request(served.url + c["result"].lstrip("/"))[1] == infer_output(gray, tmp_path, "--checkpoint",
                                                                                tiny_checkpoint, "--precision", "fp32")
        assert Image.open(served.folder / f"{c['id']}_result.png").mode == "LA"
        assert Image.open(served.folder / f"{a['id']}_input.png").size == (32, 24)  # the page's "before"
        folder = served.folder
    assert not folder.exists()
    out = capfd.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["job 1 a.png", "job 2 b.jpg", "job 3 c.png"], out  # one a job


def test_refusals_are_messages_not_tracebacks(tiny_checkpoint, tmp_path, capfd):
    png, small = photo(tmp_path / "big.png", height=40, width=40), photo(tmp_path / "small.png").read_bytes()
    with serving("--checkpoint", tiny_checkpoint, "--max_pixels", 1000) as served:
        code, reply = submit(served, b"hello", name="notes.txt")
        assert code == 400 and reply["error"].startswith("notes.txt: not a readable image"), reply
        code, reply = submit(served, png.read_bytes(), name="big.png")
        assert code == 400 and "big.png: 40x40 is 1,600 pixels, more than this server takes (1,000" in reply["error"]
        code, reply = submit(served, small, name="small.png", network="x9")
        assert code == 400 and "unknown network 'x9'" in reply["error"]
        code, reply = submit(served, b"", name="empty.png")
        assert code == 400 and "takes 1 to" in reply["error"]
        code, reply = submit(served, small[:len(small) // 2], name="cut.png")  # the header is whole
        assert code == 202, reply
        failed = finished(served, reply["id"])
        assert failed["state"] == "failed" and failed["error"].startswith("cut.png: not a readable image"), failed
        assert "result" not in failed and request(f"{served.url}jobs/{reply['id']}/result.png")[0] == 404
        assert list(served.folder.iterdir()) == []  # refused and failed uploads are not kept
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and err == "", err
    assert len(out.splitlines()) == 4, out  # three refusals (the empty one is not logged), one failed job


def test_port_in_use_is_a_one_line_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, _, err = run_main(app, "--port", taken.getsockname()[1])
    assert_one_line_error(code, err, "app.py: error: can't listen on 127.0.0.1:", "the port is in use")


@pytest.mark.slow
def test_sigterm_mid_job_stops_the_server_and_removes_its_folder(tmp_path):
    """The shipped x4 on 600x600 pixels runs for a while: SIGTERM comes while it works."""
    src = photo(tmp_path / "photo.png", height=600, width=600)
    server = subprocess.Popen([sys.executable, "app.py", "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        url, folder = re.search(r"serving (\S+) .*files in (\S+),", server.stdout.readline()).groups()
        code, reply = request(f"{url}jobs?name=photo.png&precision=fp32", src.read_bytes())
        assert code == 202 and os.path.isdir(folder), reply
        while json.loads(request(f"{url}jobs/{json.loads(reply)['id']}")[1])["state"] == "queued":
            time.sleep(0.1)
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=30)
    assert server.returncode == 0 and out.strip() == "stopped" and err == "", (out, err)
    assert not os.path.exists(folder)


# ---------------------------------------------------------------- in a browser

def chromium(download_dir, phone: bool = False):
    """Headless Chromium through Debian's chromedriver, downloading into `download_dir`; skips where missing.
    `phone`: as a phone 390 px wide shows pages (the viewport meta tag counts)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed "
                                    "(pip install -r requirements-optional.txt)")
    from selenium.webdriver.chrome.service import Service
    browser, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("chromium or chromedriver is not installed (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                              "download.prompt_for_download": False})
    if phone:
        options.add_experimental_option("mobileEmulation", {"deviceMetrics": {"width": 390, "height": 844,
                                                                              "pixelRatio": 3}})
        return webdriver.Chrome(service=Service(driver), options=options)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    frame = browser.execute_script("return window.outerHeight - window.innerHeight")
    browser.set_window_size(1200, 800 + frame)  # a page of 1200x800, the screenshot's size
    return browser


def downloaded(folder, name: str, timeout: float = 30) -> bytes:
    end = time.monotonic() + timeout
    while not (folder / name).is_file() and time.monotonic() < end:  # Chromium writes NAME.crdownload first
        time.sleep(0.1)
    return (folder / name).read_bytes()


@pytest.mark.slow
def test_page_in_a_browser_upscales_and_downloads_infer_output(tmp_path):
    (tmp_path / "downloads").mkdir()
    browser = chromium(tmp_path / "downloads")  # first: it skips where selenium is absent, before any import of it
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    src = ROOT / "show" / "coffee_lr.png"  # a photo, for the screenshot README shows (show/app.png)
    try:
        with serving() as served:
            browser.get(served.url)
            browser.find_element(By.ID, "file").send_keys(str(src))
            Select(browser.find_element(By.ID, "precision")).select_by_value("fp32")
            browser.find_element(By.ID, "go").click()
            WebDriverWait(browser, 120).until(lambda b: b.find_element(By.ID, "status").text.startswith(("done",
                                                                                                          "failed")))
            assert "150x100 -> 600x400, resshuffle x4, fp32" in browser.find_element(By.ID, "status").text
            browser.find_element(By.ID, "download").click()
            result = downloaded(tmp_path / "downloads", "coffee_lr_x4.png")
            assert result == infer_output(src, tmp_path, "--scale", "4", "--precision", "fp32")
            after = browser.find_element(By.ID, "after")
            assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].width]", after) == [600, 600]
            browser.execute_script("const s = document.getElementById('slider'); s.value = 30; "
                                   "s.dispatchEvent(new Event('input'))")
            assert after.value_of_css_property("clip-path") == "inset(0px 0px 0px 30%)"
            browser.execute_script("const s = document.getElementById('slider'); s.value = 50; "
                                   "s.dispatchEvent(new Event('input'))")
            browser.save_screenshot(str(tmp_path / "app.png"))
    finally:
        browser.quit()
