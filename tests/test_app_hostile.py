"""app.py against a hostile web page and hostile clients (issue 34): other host names, other origins,
full queues, idle, slow and many connections, odd headers, names that are terminal escapes, a closed
stdout, a kill, a hang-up; and the page on a phone."""
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest

import app
import test_app
from conftest import ROOT
from test_app import finished, photo, request, serving, submit


def raw(served, data: bytes, timeout: float = 10) -> bytes:
    """What the server answers `data` sent as is on one connection, until it closes it."""
    with socket.create_connection(served.server.server_address[:2], timeout=timeout) as s:
        s.sendall(data)
        return read_all(s)


def read_all(s: socket.socket) -> bytes:
    reply = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            reply += chunk
    return reply


def status_of(reply: bytes) -> int:
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", reply)
    assert match, reply[:200]
    return int(match[1])


def origin(served) -> str:
    return served.url.rstrip("/")


def post(served, body: bytes, headers: dict, query: str = "name=a.png") -> tuple[int, bytes]:
    lines = [f"POST /jobs?{query} HTTP/1.1", f"Host: {origin(served)[7:]}", f"Content-Length: {len(body)}",
             *(f"{k}: {v}" for k, v in headers.items())]
    reply = raw(served, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return status_of(reply), reply


@contextlib.contextmanager
def worker_held(monkeypatch):
    """The worker waits before each job until the block ends, so that jobs stay queued meanwhile."""
    go, run = threading.Event(), app.App.run
    monkeypatch.setattr(app.App, "run", lambda self, job: go.wait(60) and run(self, job))
    try:
        yield
    finally:
        go.set()


# ---------------------------------------------------------------- 4, 11: the log

def test_names_reach_the_log_escaped(tiny_checkpoint, tmp_path, capfd):
    name = "\x1b]52;c;aGVsbG8=\x07\x1b[31mred\njob 99 x.png: done.png"
    png = photo(tmp_path / "a.png").read_bytes()
    with serving("--checkpoint", tiny_checkpoint) as served:
        finished(served, submit(served, png, name=name)[1]["id"])
        assert submit(served, b"hello", name=name)[0] == 400
    out = capfd.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and len(out.splitlines()) == 2, out
    assert all("\\x1b]52;c;aGVsbG8=\\x07\\x1b[31mred\\x0ajob 99" in line for line in out.splitlines()), out


class ClosedPipe:
    """stdout after `app.py | head -1` has read its line and gone."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        raise BrokenPipeError(32, "Broken pipe")


def test_the_worker_outlives_a_closed_stdout(tiny_checkpoint, tmp_path, monkeypatch):
    png = photo(tmp_path / "a.png").read_bytes()
    with serving("--checkpoint", tiny_checkpoint) as served:
        monkeypatch.setattr(sys, "stdout", ClosedPipe())
        jobs = [submit(served, png, name=f"{i}.png")[1]["id"] for i in range(2)]
        assert [finished(served, job, timeout=30)["state"] for job in jobs] == ["done", "done"]
        assert served.worker.is_alive()


# ---------------------------------------------------------------- 20: kills and hang-ups

def start_server(tmpdir):
    server = subprocess.Popen([sys.executable, "app.py", "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ, TMPDIR=str(tmpdir)))
    line = server.stdout.readline()
    found = re.search(r"serving (\S+) .*files in (\S+),", line)
    assert found, (line, server.stderr.read() if server.poll() is not None else "")
    return server, *found.groups()


def test_only_killed_servers_folders_are_removed(tmp_path):
    ended = subprocess.Popen(["true"])
    ended.wait()
    folders = {name: tmp_path / f"{app.FOLDER_PREFIX}{pid}-abcd_123" for name, pid in
               (("ended", ended.pid), ("running", os.getpid()))}
    folders["other host"] = tmp_path / f"resshuffle-app-other-host-{ended.pid}-abcd_123"
    for folder in folders.values():
        (folder / "sub").mkdir(parents=True)
    assert app.remove_stale_folders(tmp_path) == [folders["ended"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for k, f in folders.items() if k != "ended")


@pytest.mark.slow
def test_sighup_stops_the_server_and_removes_its_folder(tmp_path):
    server, url, folder = start_server(tmp_path)
    try:
        assert request(url)[0] == 200 and os.path.isdir(folder)
    finally:
        server.send_signal(signal.SIGHUP)
        out, err = server.communicate(timeout=30)
    assert server.returncode == 0 and out.strip() == "stopped" and err == "", (out, err)
    assert not os.path.exists(folder)


@pytest.mark.slow
def test_a_killed_servers_folder_goes_at_the_next_start(tmp_path):
    mine = tmp_path / "resshuffle-app-notes"  # the user's, though it looks alike
    mine.mkdir()
    killed, _, left = start_server(tmp_path)
    killed.kill()
    killed.communicate(timeout=30)
    assert os.path.isdir(left)
    server, url, folder = start_server(tmp_path)
    try:
        assert not os.path.exists(left) and os.path.isdir(folder) and mine.is_dir()
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=30)
    assert server.returncode == 0 and err == "", (out, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resshuffle-app-notes"]


# ---------------------------------------------------------------- 21: the page on a phone

def test_the_page_has_a_viewport_for_phones(tiny_checkpoint):
    with serving("--checkpoint", tiny_checkpoint) as served:
        page = request(served.url)[1].decode()
    assert re.search(r'<meta name="viewport" content="width=device-width, initial-scale=1">', page)


@pytest.mark.slow
def test_a_result_larger_than_a_phone_opens_fitted(tmp_path):
    browser = test_app.chromium(tmp_path, phone=True)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    try:
        with serving() as served:
            browser.get(served.url)
            browser.find_element(By.ID, "file").send_keys(str(ROOT / "show" / "coffee_lr.png"))
            browser.find_element(By.ID, "go").click()
            WebDriverWait(browser, 120).until(lambda b: b.find_element(By.ID, "status").text.startswith("done"))
            width = browser.execute_script("return document.documentElement.scrollWidth")
            shown = browser.execute_script("return document.getElementById('after').width")
            assert browser.find_element(By.ID, "fit").is_selected() and shown < 390 and width <= 390, (width, shown)
    finally:
        browser.quit()


# ---------------------------------------------------------------- 25: a suite without selenium

def test_the_browser_test_skips_without_selenium(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "selenium" or m.startswith("selenium.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "selenium", None)  # `import selenium...` now fails as where it is absent
    with pytest.raises(pytest.skip.Exception, match="selenium is not installed"):
        test_app.test_page_in_a_browser_upscales_and_downloads_infer_output(tmp_path)
