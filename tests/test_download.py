"""`python download.py` against an HTTP server on 127.0.0.1 that the test starts."""
import hashlib
import http.server
import io
import socket
import threading
import urllib.request
import zipfile

import numpy as np
import pytest
from PIL import Image

import download
import evaluate
from conftest import assert_one_line_error, run_main, smooth_image


def make_zip(name: str, count: int, seed: int) -> bytes:
    """A zip laid out as DIV2K's: <name>/0001.png ..."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for i in range(1, count + 1):
            png = io.BytesIO()
            Image.fromarray(smooth_image(rng, 40, 48)).save(png, format="PNG")
            z.writestr(f"{name}/{i:04d}.png", png.getvalue())
    return buffer.getvalue()


class Server:
    """Serves `files` (path -> bytes) with Range support; cuts the first response of the paths in
    `drop_once` after half the body; records (path, Range header) of every request."""

    def __init__(self, files: dict, drop_once=()):
        self.files, self.drop_once, self.requests = files, set(drop_once), []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
                if start >= len(body):
                    self.send_error(416)
                    return
                self.send_response(206 if start else 200)
                self.send_header("Content-Length", str(len(body) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                if self.path in server.drop_once:
                    server.drop_once.discard(self.path)
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the connection drops mid-body
                    return
                self.wfile.write(body[start:])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/mirror"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def div2k(monkeypatch):
    """Small stand-ins for the two zips, and DIV2K_FILES pinned to them."""
    zips = {"DIV2K_train_HR": make_zip("DIV2K_train_HR", 5, 0), "DIV2K_valid_HR": make_zip("DIV2K_valid_HR", 2, 1)}
    counts = {"DIV2K_train_HR": 5, "DIV2K_valid_HR": 2}
    monkeypatch.setattr(download, "DIV2K_FILES", {
        name: (len(data), hashlib.sha256(data).hexdigest(), counts[name]) for name, data in zips.items()})
    monkeypatch.setattr(download, "RETRY_SLEEP", 0)
    return {f"/mirror/{name}.zip": data for name, data in zips.items()}


def test_download_resumes_a_dropped_connection_extracts_and_skips_what_is_there(div2k, tmp_path):
    server = Server(div2k, drop_once={"/mirror/DIV2K_train_HR.zip"})
    try:
        code, out, err = run_main(download, "--root", tmp_path / "data", "--url_base", server.url)
        assert code == 0, err
        train_requests = [r for p, r in server.requests if p == "/mirror/DIV2K_train_HR.zip"]
        half = (len(div2k["/mirror/DIV2K_train_HR.zip"])) // 2
        assert train_requests == [None, f"bytes={half}-"]  # resumed where the connection dropped
        assert f"retrying from byte {half:,}" in out
        data = tmp_path / "data"
        assert sorted(p.name for p in data.iterdir()) == ["DIV2K_train_HR", "DIV2K_valid_HR"]  # zips removed
        assert [p.name for p in sorted((data / "DIV2K_valid_HR").iterdir())] == ["0001.png", "0002.png"]
        assert len(list((data / "DIV2K_train_HR").glob("*.png"))) == 5

        server.requests.clear()
        code, out, err = run_main(download, "--root", data, "--url_base", server.url)
        assert code == 0 and server.requests == [] and out.count("already there") == 2

        # A folder with images missing is not taken for complete.
        (data / "DIV2K_valid_HR" / "0002.png").unlink()
        code, _, err = run_main(download, "--root", data, "--url_base", server.url)
        assert code == 1 and "1 of 2 images; delete the folder" in err
    finally:
        server.close()


def test_a_partial_file_from_an_earlier_run_is_resumed(div2k, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    body = div2k["/mirror/DIV2K_valid_HR.zip"]
    (data / "DIV2K_valid_HR.zip.part").write_bytes(body[:1000])
    server = Server(div2k)
    try:
        code, _, err = run_main(download, "--root", data, "--url_base", server.url,
                                "--sets", "DIV2K_valid_HR", "--keep_zip")
    finally:
        server.close()
    assert code == 0, err
    assert server.requests == [("/mirror/DIV2K_valid_HR.zip", "bytes=1000-")]
    assert (data / "DIV2K_valid_HR.zip").read_bytes() == body  # kept, whole
    assert len(list((data / "DIV2K_valid_HR").glob("*.png"))) == 2


def test_a_corrupt_download_is_refused_and_leaves_nothing(div2k, tmp_path):
    good = div2k["/mirror/DIV2K_valid_HR.zip"]
    corrupt = dict(div2k)
    corrupt["/mirror/DIV2K_valid_HR.zip"] = good[:100] + bytes([good[100] ^ 0xFF]) + good[101:]
    server = Server(corrupt)
    data = tmp_path / "data"
    try:
        code, _, err = run_main(download, "--root", data, "--url_base", server.url,
                                "--sets", "DIV2K_valid_HR")
        assert code == 1 and "corrupt download" in err and "Traceback" not in err
        assert not data.exists()  # no zip, no .part, no half-extracted folder, not even the --root it made

        # A file of another size is refused from its headers, before anything is written.
        server.files["/mirror/DIV2K_valid_HR.zip"] = good + b"more"
        code, _, err = run_main(download, "--root", data, "--url_base", server.url,
                                "--sets", "DIV2K_valid_HR")
        assert code == 1 and f"the file there is {len(good) + 4:,} bytes, not {len(good):,}" in err
        assert not data.exists()

        code, _, err = run_main(download, "--root", data, "--url_base", server.url + "/nothere",
                                "--sets", "DIV2K_valid_HR")
        assert code == 1 and "404" in err and not data.exists()
    finally:
        server.close()


def test_a_zip_that_does_not_hold_the_set_is_not_extracted(div2k, tmp_path, monkeypatch):
    wrong = make_zip("DIV2K_valid_HR", 1, 2)  # one image where two are expected
    monkeypatch.setitem(download.DIV2K_FILES, "DIV2K_valid_HR", (len(wrong), hashlib.sha256(wrong).hexdigest(), 2))
    server = Server({"/mirror/DIV2K_valid_HR.zip": wrong})
    try:
        code, _, err = run_main(download, "--root", tmp_path, "--url_base", server.url,
                                "--sets", "DIV2K_valid_HR", "--keep_zip")
    finally:
        server.close()
    assert code == 1 and "holds 1 images where DIV2K_valid_HR has 2" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DIV2K_valid_HR.zip"]


def test_missing_div2k_folders_say_how_to_get_them(tmp_path, tiny_checkpoint):
    code, _, err = run_main(evaluate, "--data_dir", tmp_path / "data" / "DIV2K_valid_HR",
                            "--checkpoint", tiny_checkpoint)
    assert code == 1 and f"get DIV2K with: python download.py --root {tmp_path / 'data'}" in err


def test_a_url_base_that_is_not_http_is_one_line(tmp_path):
    code, _, err = run_main(download, "--root", tmp_path / "data", "--url_base", "notaurl")
    assert code == 1 and "--url_base notaurl: not an http:// or https:// address" in err and "Traceback" not in err
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("url, reason", [("http://[::1", "Invalid IPv6 URL"),
                                         ("http://localhost:99999", "Port out of range")])
def test_a_url_base_that_is_not_an_address_is_one_line(tmp_path, url, reason):
    code, _, err = run_main(download, "--root", tmp_path / "data", "--url_base", url)
    assert_one_line_error(code, err, f"--url_base {url}: not a valid address ({reason}")
    assert not (tmp_path / "data").exists()


def count_attempts(monkeypatch) -> list:
    """Record every urlopen call download.py makes; sleeps between retries cost no time."""
    attempts = []
    urlopen = urllib.request.urlopen

    def counting(request, *args, **kwargs):
        attempts.append(request.full_url)
        return urlopen(request, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", counting)
    monkeypatch.setattr(download, "RETRY_SLEEP", 0)
    return attempts


def test_a_refused_connection_fails_at_once_in_one_line_and_leaves_no_root(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    attempts = count_attempts(monkeypatch)
    root = tmp_path / "new" / "data"
    code, _, err = run_main(download, "--root", root, "--url_base", f"http://127.0.0.1:{port}/mirror",
                            "--sets", "DIV2K_valid_HR")
    assert code == 1 and len(attempts) == 1  # no retries
    assert err.count("\n") == 1 and err.startswith(f"download.py: error: 127.0.0.1:{port}: connection refused"), err
    assert list(tmp_path.iterdir()) == []  # neither --root nor the parent it made


def test_a_host_name_that_does_not_resolve_fails_at_once_naming_the_host(tmp_path, monkeypatch):
    lookups = []

    def no_dns(host, *args, **kwargs):
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    attempts = count_attempts(monkeypatch)
    root = tmp_path / "data"
    root.mkdir()  # there before: stays, as it was
    code, _, err = run_main(download, "--root", root, "--url_base", "https://div2k.mirror.invalid/cvl")
    assert code == 1 and len(attempts) == 1 and lookups == ["div2k.mirror.invalid"]
    assert err == ("download.py: error: div2k.mirror.invalid: cannot resolve the host name (no network?): "
                   f"[Errno {socket.EAI_NONAME}] Name or service not known\n")
    assert root.is_dir() and list(root.iterdir()) == []


def test_a_server_that_sends_nothing_is_retried_then_leaves_no_empty_part(tmp_path, monkeypatch):
    class EmptyBody(io.BytesIO):  # a 200 whose connection closes before the first byte
        status, headers = 200, {}

    attempts = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout: attempts.append(request) or EmptyBody())
    monkeypatch.setattr(download, "RETRY_SLEEP", 0)
    root = tmp_path / "data"
    code, out, err = run_main(download, "--root", root, "--url_base", "http://127.0.0.1:1/mirror",
                              "--sets", "DIV2K_valid_HR")
    assert code == 1 and len(attempts) == download.RETRIES + 1
    assert out.count("closed early; retrying") == download.RETRIES
    assert f"{download.RETRIES + 1} failed attempts, last: closed early" in err and "resume" not in err
    assert not root.exists()  # the empty .part went, and then the --root this run made


def test_a_file_or_folder_where_download_writes_is_one_line_before_any_download(tmp_path):
    (tmp_path / "afile").write_text("x")
    code, _, err = run_main(download, "--root", tmp_path / "afile", "--url_base", "http://127.0.0.1:9")
    assert code == 1 and err.strip().endswith("afile: is a file, not a folder"), err
    (tmp_path / "data" / "DIV2K_valid_HR.zip").mkdir(parents=True)
    code, _, err = run_main(download, "--root", tmp_path / "data", "--sets", "DIV2K_valid_HR",
                            "--url_base", "http://127.0.0.1:9")
    assert code == 1 and "DIV2K_valid_HR.zip: is a folder, where the set's zip goes" in err and "Traceback" not in err
