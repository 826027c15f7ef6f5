"""app.py against a hostile web page and hostile clients: other host names, other origins,
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
import time
import tracemalloc

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


# ---------------------------------------------------------------- 1: DNS rebinding

def test_other_host_names_get_nothing(tiny_checkpoint, tmp_path):
    with serving("--checkpoint", tiny_checkpoint) as served:
        _, job = submit(served, photo(tmp_path / "a.png").read_bytes(), name="a.png")
        finished(served, job["id"])
        port = served.server.server_address[1]
        for path in ("/", f"/jobs/{job['id']}", f"/jobs/{job['id']}/input.png"):
            reply = raw(served, f"GET {path} HTTP/1.1\r\nHost: attacker.example:{port}\r\n\r\n".encode())
            assert status_of(reply) == 403 and b"PNG" not in reply and b"tiny.pt" not in reply, reply[:300]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LocalHost"):
            assert status_of(raw(served, f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())) == 200, host
        assert status_of(raw(served, b"GET / HTTP/1.0\r\n\r\n")) == 403  # no Host at all


@pytest.mark.parametrize("host, answered", [
    ("127.0.0.1:7860", True), ("[::1]:7860", True), ("LOCALHOST", True), ("gpu-box:7860", True),
    ("192.168.1.5", True), ("attacker.example:7860", False), ("127.0.0.1.nip.io:7860", False),
    ("attacker.example@127.0.0.1", False), ("localhost.:7860", False), ("", False)])
def test_host_names_answered_are_addresses_localhost_and_the_host_flags(host, answered):
    assert app.answers_to(host, listening="gpu-box") is answered


def test_job_ids_are_unguessable(tiny_checkpoint, tmp_path):
    with serving("--checkpoint", tiny_checkpoint) as served:
        png = photo(tmp_path / "a.png").read_bytes()
        ids = [submit(served, png, name="a.png")[1]["id"] for _ in range(2)]
        assert all(isinstance(i, str) and len(i) >= 20 for i in ids) and ids[0] != ids[1], ids
        assert request(f"{served.url}jobs/1")[0] in (400, 404)


# ---------------------------------------------------------------- 2: other origins, limits

def test_posts_from_other_origins_are_refused(tiny_checkpoint, tmp_path):
    png = photo(tmp_path / "a.png").read_bytes()
    with serving("--checkpoint", tiny_checkpoint) as served:
        for headers in ({"Origin": "http://attacker.example"}, {"Origin": "null"}, {},
                        {"Origin": "http://127.0.0.1:1"}, {"Sec-Fetch-Site": "cross-site"}):
            code, reply = post(served, png, dict(headers, **{"Content-Type": "text/plain"}))
            assert code == 403 and b"origin" in reply.lower(), (headers, reply)
        assert list(served.folder.iterdir()) == [] and served.jobs == {}
        assert post(served, png, {"Origin": origin(served)})[0] == 202
        assert post(served, png, {"Sec-Fetch-Site": "same-origin"})[0] == 202  # a browser that leaves Origin out


def test_a_full_queue_is_refused_with_a_message(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(app, "MAX_QUEUED", 2)
    png = photo(tmp_path / "a.png").read_bytes()
    with serving("--checkpoint", tiny_checkpoint) as served, worker_held(monkeypatch):
        codes = [submit(served, png, name="a.png")[0] for _ in range(2)]
        code, reply = submit(served, png, name="a.png")
        assert codes == [202, 202] and code == 503, (codes, reply)  # one working, one waiting: the queue's two
        assert "queue is full" in reply["error"], reply
        assert len(list(served.folder.iterdir())) == 2


def test_the_bytes_kept_are_capped(tiny_checkpoint, tmp_path, monkeypatch):
    png = photo(tmp_path / "a.png").read_bytes()
    monkeypatch.setattr(app, "MAX_KEPT_BYTES", 2 * len(png) + 10)
    with serving("--checkpoint", tiny_checkpoint) as served, worker_held(monkeypatch):
        codes = [submit(served, png, name="a.png")[0] for _ in range(2)]
        code, reply = submit(served, png, name="a.png")
        assert codes == [202, 202] and code == 503 and "bytes" in reply["error"], (codes, reply)
        assert sum(p.stat().st_size for p in served.folder.iterdir()) <= 2 * len(png) + 10


# ---------------------------------------------------------------- 3: slow and many clients

def test_idle_connections_are_closed(tiny_checkpoint, monkeypatch):
    assert 0 < (app.Handler.timeout or 0) <= 60
    monkeypatch.setattr(app.Handler, "timeout", 0.5)
    with serving("--checkpoint", tiny_checkpoint) as served:
        with socket.create_connection(served.server.server_address[:2], timeout=10) as s:
            start = time.monotonic()
            assert read_all(s) == b"" and time.monotonic() - start < 5


def test_a_body_that_never_comes_is_dropped(tiny_checkpoint, monkeypatch):
    assert 0 < (app.Handler.timeout or 0) <= 60
    monkeypatch.setattr(app.Handler, "timeout", 0.5)
    with serving("--checkpoint", tiny_checkpoint) as served:
        head = (f"POST /jobs?name=a.png HTTP/1.1\r\nHost: {origin(served)[7:]}\r\nOrigin: {origin(served)}\r\n"
                f"Content-Length: 100000\r\n\r\n").encode()
        with socket.create_connection(served.server.server_address[:2], timeout=10) as s:
            s.sendall(head + b"\x89PNG" * 100)
            start = time.monotonic()
            read_all(s)
            assert time.monotonic() - start < 5
        time.sleep(0.2)
        assert list(served.folder.iterdir()) == [] and served.jobs == {}


def test_a_trickling_client_is_cut_off(tiny_checkpoint, monkeypatch):
    """A byte every 0.2 s never lets the 2 s timeout pass, but the request's head has one second in all."""
    monkeypatch.setattr(app.Handler, "timeout", 2)
    monkeypatch.setattr(app, "HEAD_SECONDS", 1)
    with serving("--checkpoint", tiny_checkpoint) as served:
        with socket.create_connection(served.server.server_address[:2], timeout=10) as s:
            start = time.monotonic()
            with contextlib.suppress(OSError):
                for byte in b"GET / HTTP/1.1\r\nX-Slow: " + b"a" * 100:
                    s.sendall(bytes([byte]))
                    time.sleep(0.2)
            assert time.monotonic() - start < 5
            assert b"<html" not in read_all(s)


def test_connections_beyond_the_limit_are_refused(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(app, "MAX_CONNECTIONS", 2)
    with serving("--checkpoint", tiny_checkpoint) as served:
        address = served.server.server_address[:2]
        with socket.create_connection(address), socket.create_connection(address):
            time.sleep(0.2)
            code, reply = request(served.url)
            assert code == 503 and b"connections" in reply, reply
        end = time.monotonic() + 5
        while request(served.url)[0] != 200:  # their threads end once they see the two closed
            assert time.monotonic() < end
            time.sleep(0.05)


def test_an_upload_goes_to_disk_not_into_memory(tiny_checkpoint):
    body = os.urandom(20_000_000)  # no image: refused once it is all there
    with serving("--checkpoint", tiny_checkpoint, "--max_pixels", 4_000_000) as served:
        tracemalloc.start()
        try:
            code, reply = submit(served, body, name="noise.png")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert code == 400 and "not a readable image" in reply["error"], reply
    assert peak < 8_000_000, f"{peak:,} bytes at the peak"


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


# ---------------------------------------------------------------- 15: odd headers and ids

@pytest.mark.parametrize("length", ["abc", "-5", "1, 2", "1e3", "0x10", "\u00b2"])
def test_odd_content_lengths_get_400(tiny_checkpoint, length):
    with serving("--checkpoint", tiny_checkpoint) as served:
        head = (f"POST /jobs?name=a.png HTTP/1.1\r\nHost: {origin(served)[7:]}\r\nOrigin: {origin(served)}\r\n"
                f"Content-Length: {length}\r\n\r\nabc").encode("latin-1")
        reply = raw(served, head)
        assert status_of(reply) == 400 and b"Content-Length" in reply, reply
        assert list(served.folder.iterdir()) == []


def test_two_content_lengths_get_400(tiny_checkpoint):
    with serving("--checkpoint", tiny_checkpoint) as served:
        head = (f"POST /jobs?name=a.png HTTP/1.1\r\nHost: {origin(served)[7:]}\r\nOrigin: {origin(served)}\r\n"
                f"Content-Length: 3\r\nContent-Length: 5\r\n\r\nabcde").encode()
        assert status_of(raw(served, head)) == 400


@pytest.mark.parametrize("job_id", ["\u00b2", "-1", "1" * 5000, "%00", "a.b"],
                         ids=["superscript", "negative", "5000 digits", "escaped nul", "dotted"])
def test_odd_job_ids_get_an_answer(tiny_checkpoint, job_id):
    with serving("--checkpoint", tiny_checkpoint) as served:
        for path in (f"/jobs/{job_id}", f"/jobs/{job_id}/result.png"):
            host = origin(served)[7:]
            reply = raw(served, f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode("latin-1"))
            assert status_of(reply) in (400, 404), reply


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
