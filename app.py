"""Upscale images in a browser: a local page that hands each image to one worker running the network.

usage: python app.py [--host 127.0.0.1] [--port 7860] [--max_pixels 4000000] [--checkpoint FILE] [--device auto]

Open the address it prints, drop or choose an image, pick the network and the precision. The
page shows the upscale over the input (a slider moves the split, at full resolution) and links
the PNG, which is byte for byte what `python infer.py IMAGE -o OUT.png --arch A --scale S --precision P`
writes (grayscale stays grayscale, alpha is kept). Jobs run one at a time, in the
order sent; each network is loaded when first asked for, and kept. An image of more than
--max_pixels is refused. The server listens on this machine only unless --host says otherwise;
uploads and results stay in one temporary folder, removed when it stops (Ctrl-C, SIGTERM or SIGHUP),
or at the next start where it was killed.

Any web page the user opens can send requests to 127.0.0.1, so the server answers only requests
addressed to it by an IP address, localhost or --host's name (a page whose name an attacker points
here gets nothing), takes uploads only from its own page (the Origin header), names jobs with
unguessable ids, and bounds its queue, its folder, its connections and how long each may take.
"""
import argparse
import contextlib
import errno
import http.server
import io
import ipaddress
import itertools
import json
import math
import os
import queue
import re
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from machinery.checkpoint import SHIPPED, SHIPPED_REAL, load_chosen, shipped_names
from machinery.cli import add_inference_flags
from machinery.files import HOST, process_exists
from machinery.images import image_metadata, image_size, open_image, save_image, to_rgb8
from machinery.precision import choose_precision
from machinery.upscale import DEFAULT_TILE, upscale_image
from model import DEFAULT_ARCH
from utils import (
    REPO,
    UserError,
    first_line,
    is_out_of_memory,
    make_parser,
    positive_int,
    run_cli,
    select_device,
    shown,
    sigterm_raises,
)

PAGE = REPO / "app.html"
PRECISION_CHOICES = ("auto", "fp32", "bf16")  # fp16: emulated, slowly, on CPUs, and not what auto picks on new GPUs

# Finished jobs whose files are kept: older ones are dropped, so a long session's disk use stays bounded.
KEEP_JOBS = 20

# Upload bytes per pixel allowed: an uncompressed 16-bit RGBA image is 8; the rest is a file's headers.
BYTES_PER_PIXEL = 8

# Jobs not finished at once (uploading, waiting or working): one more is refused, with a message on the page.
MAX_QUEUED = 8

# Bytes the temporary folder may hold: finished jobs' files go, oldest first, to stay below it, and an
# upload that can't fit even so is refused.
MAX_KEPT_BYTES = 2_000_000_000

# Connections served at once, each a thread: one more gets a 503 at once.
MAX_CONNECTIONS = 32

# Seconds a connection may stay silent (socketserver's timeout): an idle client lets go of its thread.
IDLE_SECONDS = 20

# Seconds in which a request's line and headers must all come, however slowly they trickle.
HEAD_SECONDS = 20

# Bytes a second an upload must average, after HEAD_SECONDS of grace: a trickle can't hold a thread for hours.
MIN_UPLOAD_RATE = 100_000

# Seconds a closing connection reads what its client still sends: closed unread, the connection would
# be reset, and the client could lose the answer.
LINGER_SECONDS = 2

# An upload goes to disk this many bytes at a time, so that uploads in flight hold little memory.
CHUNK = 1 << 20

# The temporary folder's name: HOST and the process id tell a killed server's folder at the next start.
FOLDER_PREFIX = f"resshuffle-app-{HOST}-"
STALE_FOLDER = re.compile(re.escape(FOLDER_PREFIX) + r"([0-9]+)-[a-z0-9_]{8}")

JOB_ID = re.compile(r"[A-Za-z0-9_-]{22}")  # secrets.token_urlsafe(16)


class Refused(UserError):
    """A request the server won't take now, with the HTTP status that says why."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Job:
    id: str  # unguessable: another page can't count its way to the user's images
    name: str  # the uploaded file's name: for messages and the download's name
    network: str  # a key of App.networks
    precision: str  # as asked: auto, fp32 or bf16
    number: int = 0  # 1, 2, ... in the order queued: the log's and the queue's order
    state: str = "uploading"  # then queued, working, and done or failed
    error: str = ""
    summary: str = ""  # sizes, network and precision, once done


class App:
    """The server, the queue of jobs and its one worker, the networks loaded so far, the temporary folder."""

    def __init__(self, args, server: http.server.ThreadingHTTPServer):
        self.server, server.app = server, self
        self.device = select_device(args.device)
        self.max_pixels = args.max_pixels
        self.networks = network_choices(args.checkpoint)
        self.models, self.precisions = {}, {}
        if args.checkpoint is not None:  # a bad file is an error now, not at the first job
            self.model(next(iter(self.networks)))
        self.page = render_page(networks=list(self.networks), max_pixels=self.max_pixels,
                                max_bytes=self.max_bytes(), precisions=PRECISION_CHOICES)
        self.jobs, self.numbers, self.lock, self.queue = {}, itertools.count(1), threading.RLock(), queue.Queue()
        self.incoming = 0  # bytes of the uploads in flight, promised room in the folder
        self.stale = remove_stale_folders(Path(tempfile.gettempdir()))
        self.folder = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}-"))  # last: nothing after it fails
        self.worker = threading.Thread(target=self.work, name="upscale worker", daemon=True)
        self.worker.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/"

    def max_bytes(self) -> int:
        return self.max_pixels * BYTES_PER_PIXEL + 1_000_000

    def close(self) -> None:
        """Stop taking requests, let the worker end after its job, remove the folder. A job still
        running is not waited for: its write into the removed folder fails, writing nothing."""
        self.server.server_close()
        self.queue.put(None)
        self.worker.join(timeout=1)
        shutil.rmtree(self.folder, ignore_errors=True)

    # ------------------------------------------------------------ requests

    def submit(self, body: io.BufferedIOBase, length: int, query: dict) -> Job:
        """Queue an upload of `length` bytes read from `body`, after checking the choices, the room
        left (Refused) and the image's header (a size over the limit, a file that is no image: a
        UserError). Whatever fails, nothing is queued or kept."""
        job = self.admit(Job(id=secrets.token_urlsafe(16), **self.choices(query)), length=length)
        path = self.path(job, "upload")
        try:
            receive(body, length=length, path=path)
            check_size(path, name=job.name, max_pixels=self.max_pixels)
        except BaseException:  # a refusal, a client gone or too slow: its part-upload goes too
            self.forget(job)
            raise
        finally:
            with self.lock:
                self.incoming -= length
        with self.lock:
            job.number, job.state = next(self.numbers), "queued"
        self.queue.put(job)
        return job

    def choices(self, query: dict) -> dict:
        """The Job fields a request's query names: the upload's name, the network and the precision."""
        name = Path(query.get("name", ["image"])[0]).name[:255] or "image"
        network = query.get("network", [next(iter(self.networks))])[0]
        precision = query.get("precision", ["auto"])[0]
        if network not in self.networks:
            raise UserError(f"unknown network {network!r}: this server has {', '.join(self.networks)}")
        if precision not in PRECISION_CHOICES:
            raise UserError(f"unknown precision {precision!r}: use {', '.join(PRECISION_CHOICES)}")
        return dict(name=name, network=network, precision=precision)

    def admit(self, job: Job, length: int) -> Job:
        """`job`, entered with room for its upload, or Refused when the queue or the folder is full."""
        with self.lock:
            unfinished = sum(j.state not in ("done", "failed") for j in self.jobs.values())
            if unfinished >= MAX_QUEUED:
                raise Refused(503, f"the queue is full ({unfinished} jobs, the most this server takes): "
                                   f"try again when one is done")
            finished = [j for j in self.jobs.values() if j.state in ("done", "failed")]
            while self.kept() + length > MAX_KEPT_BYTES and finished:
                self.forget(finished.pop(0))  # the oldest results make room for new work
            if self.kept() + length > MAX_KEPT_BYTES:
                raise Refused(503, f"the server holds {self.kept():,} bytes of images still to do, and takes "
                                   f"{MAX_KEPT_BYTES:,} at most: try again when some are done")
            self.incoming += length
            self.jobs[job.id] = job
        return job

    def kept(self) -> int:
        """Bytes in the folder, and promised to the uploads in flight."""
        total = self.incoming
        with contextlib.suppress(FileNotFoundError), os.scandir(self.folder) as entries:
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):  # dropped meanwhile
                    total += entry.stat(follow_symlinks=False).st_size
        return total

    def status(self, job: Job) -> dict:
        with self.lock:
            ahead = sum(j.state == "working" or (j.state == "queued" and j.number < job.number)
                        for j in self.jobs.values())
        done = {} if job.state != "done" else {
            "input": f"/jobs/{job.id}/input.png", "result": f"/jobs/{job.id}/result.png",
            "download": f"{Path(job.name).stem}_x{self.models[job.network].scale}.png"}  # infer.py's output name
        return {"id": job.id, "state": job.state, "ahead": ahead if job.state == "queued" else 0, "error": job.error,
                "summary": job.summary, **done}

    def find(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def path(self, job: Job, kind: str) -> Path:
        return self.folder / f"{job.id}_{kind}.png"

    # ------------------------------------------------------------ the worker

    def work(self) -> None:
        while (job := self.queue.get()) is not None:
            job.state = "working"
            start = time.perf_counter()
            job.error = self.run(job)
            self.path(job, "upload").unlink(missing_ok=True)
            job.state = "failed" if job.error else "done"
            log(f"job {job.number} {job.name}: " + (job.error or f"{job.summary}, {time.perf_counter() - start:.1f} s"))
            self.forget_old()

    def run(self, job: Job) -> str:
        """Upscale one job's image as infer.py does; '' or the reason it failed."""
        try:
            img = open_image(self.path(job, "upload"))
            model, precision = self.model(job.network), self.precision(job.precision)
            sr = upscale_image(model, img, tile=DEFAULT_TILE, precision=precision, progress=False)  # as infer.py
            save_image(sr, self.path(job, "result"), **image_metadata(img))
            to_rgb8(img).save(self.path(job, "input"), compress_level=1)  # the page's "before"
        except UserError as e:
            return str(e).replace(str(self.path(job, "upload")), job.name)
        except Exception as e:  # the worker must outlive any one image
            if is_out_of_memory(e):
                return "out of memory: try a smaller image"
            return f"failed: {type(e).__name__}: {first_line(e)}"
        job.summary = (f"{img.width}x{img.height} -> {sr.width}x{sr.height}, {job.network}, {precision}"
                       f"{'' if job.precision == precision else ' (auto)'}")
        return ""

    def model(self, network: str):
        """The network, loaded once and kept."""
        if network not in self.models:
            checkpoint, scale, arch, real = self.networks[network]
            self.models[network], _, _ = load_chosen(checkpoint, scale, self.device, arch=arch, real=real)
        return self.models[network]

    def precision(self, requested: str) -> str:
        """What `requested` runs in here; asked once each, so that an emulated one warns once."""
        if requested not in self.precisions:
            self.precisions[requested], _ = choose_precision(requested, self.device)
        return self.precisions[requested]

    def forget_old(self) -> None:
        """Drop the finished jobs beyond the last KEEP_JOBS, and more, oldest first, while the folder
        holds over MAX_KEPT_BYTES; the newest stays, for the page that waits for it."""
        with self.lock:
            finished = [j for j in self.jobs.values() if j.state in ("done", "failed")]
            for job in finished[:-KEEP_JOBS]:
                self.forget(job)
            for job in finished[-KEEP_JOBS:-1]:
                if self.kept() <= MAX_KEPT_BYTES:
                    break
                self.forget(job)

    def forget(self, job: Job) -> None:
        with self.lock:
            self.jobs.pop(job.id, None)
        for kind in ("upload", "input", "result"):
            self.path(job, kind).unlink(missing_ok=True)


def network_choices(checkpoint: str | None) -> dict[str, tuple]:
    """The page's networks: name -> load_chosen's (checkpoint, scale, arch, real); the shipped ones
    ("resshuffle x4 for real photos": SHIPPED_REAL's), or the one --checkpoint names. The default
    (resshuffle x4) comes first."""
    if checkpoint is not None:
        return {Path(checkpoint).name: (checkpoint, None, None, False)}
    shipped = {f"{arch} x{scale}": (None, scale, arch, False) for arch, scales in SHIPPED.items() for scale in scales}
    shipped |= {f"{arch} x{scale} for real photos": (None, scale, arch, True)
                for arch, scales in SHIPPED_REAL.items() for scale in scales}
    default = f"{DEFAULT_ARCH} x4"
    return {default: shipped.pop(default), **shipped}


def check_size(path: Path, name: str, max_pixels: int) -> None:
    """Refuse a file that is not an image, or one of more than `max_pixels`, from its header."""
    try:
        width, height = image_size(path)
    except UserError as e:
        raise UserError(str(e).replace(str(path), name)) from None
    if width * height > max_pixels:
        raise UserError(f"{name}: {width}x{height} is {width * height:,} pixels, more than this server takes "
                        f"({max_pixels:,}: app.py --max_pixels)")


def receive(body: io.BufferedIOBase, length: int, path: Path) -> None:
    """Copy `length` bytes of `body` into `path`, CHUNK at a time."""
    with open(path, "wb") as f:
        left = length
        while left:
            chunk = body.read(min(left, CHUNK))
            if not chunk:
                raise UserError(f"the upload ended after {length - left:,} of its {length:,} bytes")
            f.write(chunk)
            left -= len(chunk)


def remove_stale_folders(parent: Path) -> list[Path]:
    """Remove the temporary folders of this machine's app.py servers that were killed (SIGKILL, a
    crash) before they could; the folders removed. A folder of a server still running stays."""
    if os.name == "nt":  # os.kill(pid, 0) would end the process there, not ask about it
        return []
    stale = []
    with contextlib.suppress(OSError), os.scandir(parent) as entries:
        for entry in entries:
            found = STALE_FOLDER.fullmatch(entry.name)
            if (found and entry.is_dir(follow_symlinks=False) and entry.stat().st_uid == os.getuid()
                    and not process_exists(int(found[1]))):
                stale.append(Path(entry.path))
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def render_page(**config) -> bytes:
    """app.html with the server's choices in it ('<' escaped: the JSON sits in a <script>)."""
    try:
        html = PAGE.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{PAGE}: the page is missing ({e.strerror}): restore it with git checkout") from None
    return html.replace("{{CONFIG}}", json.dumps(config).replace("<", "\\u003c")).encode()


def log(line: str) -> None:
    """One line on stdout, its unprintable characters escaped: an uploaded name may hold terminal escapes
    or a newline. A closed stdout (`app.py | head -1`, the terminal gone) is no error: the server, its
    worker included, goes on without a log."""
    try:
        print(shown(line), flush=True)
    except (OSError, ValueError):
        with contextlib.suppress(OSError, ValueError, AttributeError):  # no more tries, nor a complaint at exit
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)


# ---------------------------------------------------------------- HTTP

class Server(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer serving MAX_CONNECTIONS connections at once, and as many more turned away
    with a 503; beyond those, a connection is closed unanswered. Each closes lingering."""

    def __init__(self, server_address, handler_class):
        self.name = server_address[0]  # as --host gave it: binding puts an address in server_address
        super().__init__(server_address, handler_class)
        self.slots, self.refusals = threading.BoundedSemaphore(MAX_CONNECTIONS), threading.BoundedSemaphore(
            MAX_CONNECTIONS)

    def process_request(self, request, client_address):
        if self.slots.acquire(blocking=False):
            try:
                return super().process_request(request, client_address)
            except RuntimeError:  # no thread could start: its slot is free again
                self.slots.release()  # (not on Ctrl-C or SIGTERM: the thread may have started, and releases it)
                raise
        if not self.refusals.acquire(blocking=False):
            return self.close_request(request)
        threading.Thread(target=self.turn_away, args=(request,), daemon=True).start()

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def turn_away(self, request):
        body = json.dumps({"error": f"the server is busy: {MAX_CONNECTIONS} connections open, the most it serves "
                                    "at once; try again in a moment"}).encode()
        try:
            with contextlib.suppress(OSError):
                request.settimeout(LINGER_SECONDS)
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Content-Length: %d\r\nConnection: close\r\n\r\n%b" % (len(body), body))
            self.shutdown_request(request)
        finally:
            self.refusals.release()

    def shutdown_request(self, request):
        """Close once the client has closed too, or after LINGER_SECONDS: a connection closed with
        its request unread is reset, and its client may lose the answer sent."""
        with contextlib.suppress(OSError):
            request.shutdown(socket.SHUT_WR)
            end = time.monotonic() + LINGER_SECONDS
            while (left := end - time.monotonic()) > 0:
                request.settimeout(left)
                if not request.recv(65536):
                    break
        self.close_request(request)

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if not isinstance(error, ConnectionError):  # a page closed mid-request is no news
            log(f"request from {client_address[0]} failed: {type(error).__name__}: {first_line(error)}")


class DeadlineReader(io.RawIOBase):
    """A connection's reading end that gives up at `deadline`, as well as after `timeout` seconds of
    silence: a client that sends a byte now and then can't hold its thread for ever."""

    def __init__(self, sock: socket.socket, timeout: float):
        self.sock, self.timeout, self.deadline = sock, timeout, math.inf

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request took too long")
        self.sock.settimeout(min(self.timeout or left, left))
        return self.sock.recv_into(buffer)


class Handler(http.server.BaseHTTPRequestHandler):
    """GET / (the page), POST /jobs?name=&network=&precision= with the image as the body,
    GET /jobs/ID (its state as JSON), GET /jobs/ID/input.png and /jobs/ID/result.png."""
    server_version = "ResShuffle"
    timeout = IDLE_SECONDS

    def setup(self):
        super().setup()
        self.rfile.close()  # socketserver's reader, replaced by one with a deadline
        self.reader = DeadlineReader(self.connection, timeout=self.timeout)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self):
        self.reader.deadline = time.monotonic() + HEAD_SECONDS
        super().handle_one_request()

    def log_message(self, format, *args):
        pass  # the app logs one line per job; one per poll would bury them

    def do_GET(self):
        if refused := self.refusal():
            return self.send_json(refused.code, error=str(refused))
        app, parts = self.server.app, urlsplit(self.path).path.strip("/").split("/")
        if parts == [""]:
            return self.send(200, app.page, "text/html; charset=utf-8")
        if len(parts) in (2, 3) and parts[0] == "jobs" and not JOB_ID.fullmatch(parts[1]):
            return self.send_json(400, error=f"{shown(parts[1])[:40]}: not a job id")
        job = app.find(parts[1]) if len(parts) in (2, 3) and parts[0] == "jobs" else None
        if job is None:
            return self.send_json(404, error=f"{self.path[:100]}: no such page or job (the last {KEEP_JOBS} are kept)")
        if len(parts) == 2:
            return self.send_json(200, **app.status(job))
        kind = parts[2].removesuffix(".png")
        if job.state != "done" or kind not in ("input", "result"):
            return self.send_json(404, error=f"{self.path}: no such file")
        with contextlib.suppress(FileNotFoundError):  # dropped meanwhile: then a 404
            return self.send_file(app.path(job, kind), "image/png")
        self.send_json(404, error=f"{self.path}: no longer kept")

    def do_POST(self):
        app, url = self.server.app, urlsplit(self.path)
        try:
            if refused := self.refusal():
                raise refused
            if url.path != "/jobs":
                raise Refused(404, f"{url.path[:100]}: post images to /jobs")
            length = upload_length(self.headers.get_all("Content-Length"), most=app.max_bytes())
            self.reader.deadline = time.monotonic() + HEAD_SECONDS + length / MIN_UPLOAD_RATE
            job = app.submit(self.rfile, length=length, query=parse_qs(url.query))
        except Refused as e:
            self.close_connection = True  # the body is not read: nothing more can come on this connection
            return self.send_json(e.code, error=str(e))
        except UserError as e:
            log(f"refused: {e}")
            return self.send_json(400, error=str(e))
        self.send_json(202, **app.status(job))

    def refusal(self) -> Refused | None:
        """Why this request gets nothing, if it doesn't: a Host this server is not (a page whose name
        was pointed at this address), an Origin other than the page's own (another site's page)."""
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1 or not answers_to(hosts[0], listening=self.server.name):
            return Refused(403, f"{shown(hosts[0])[:100] if hosts else 'no Host'}: not this server's name; "
                                f"open {self.server.app.url}")
        origin = self.headers.get("Origin")
        if origin is None:  # browsers send it with every POST, and with every request from another origin
            if self.command == "GET" or self.headers.get("Sec-Fetch-Site") == "same-origin":
                return None
            return Refused(403, "a POST needs an Origin header: this server takes uploads from its own page only")
        if origin.lower() not in (f"http://{hosts[0].lower()}", f"https://{hosts[0].lower()}"):
            return Refused(403, f"origin {shown(origin)[:100]}: this server takes requests from its own page only")
        return None

    def send_json(self, code: int, **fields):
        self.send(code, json.dumps(fields).encode(), "application/json")

    def send(self, code: int, body: bytes, content_type: str):
        self.send_head(code, len(body), content_type)
        self.wfile.write(body)

    def send_file(self, path: Path, content_type: str):
        """A file, from the disk to the socket: a large result is not read into memory."""
        with open(path, "rb") as f:
            self.send_head(200, os.fstat(f.fileno()).st_size, content_type)
            self.connection.sendfile(f)

    def send_head(self, code: int, length: int, content_type: str):
        self.connection.settimeout(self.timeout)  # the reader's may be shorter
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", "no-store")  # the user's images, kept a while only
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()


def answers_to(host: str, listening: str) -> bool:
    """Whether a Host header names this server: an IP address, localhost, or the name it listens on.
    Any other name could be one whose DNS an attacker points at this address (DNS rebinding)."""
    found = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[0-9A-Za-z.-]+)(:[0-9]{1,5})?", host.strip())
    if not found:
        return False
    name = found[1].strip("[]").lower()
    with contextlib.suppress(ValueError):
        return name in ("localhost", listening.lower()) or bool(ipaddress.ip_address(name))
    return False


def upload_length(values: list[str] | None, most: int) -> int:
    """An upload's length from its Content-Length header, or Refused: missing, not one number, 0, over `most`."""
    if not values:
        raise Refused(411, "an upload needs a Content-Length header")
    if len(values) > 1 or not re.fullmatch(r"[0-9]{1,18}", values[0].strip()):
        raise Refused(400, f"Content-Length {shown(', '.join(values))[:100]}: not a number of bytes")
    length = int(values[0])
    if not 0 < length <= most:
        raise Refused(413 if length else 400, f"an upload of {length:,} bytes: this server takes 1 to {most:,}")
    return length


def listen(host: str, port: int) -> Server:
    try:
        return Server((host, port), Handler)
    except OSError as e:
        why = "the port is in use (another app.py?): choose another with --port" if e.errno == errno.EADDRINUSE \
            else e.strerror or str(e)
        raise UserError(f"can't listen on {host}:{port}: {why}") from None


# ---------------------------------------------------------------- the script

def start(args) -> App:
    """The app, listening (not yet serving: `app.server.serve_forever()`), its worker waiting for jobs."""
    server = listen(args.host, args.port)
    try:
        return App(args, server)
    except BaseException:
        server.server_close()
        raise


def main(args):
    app = start(args)
    log(f"serving {app.url} (networks: {', '.join(app.networks)}; files in {app.folder}, removed on exit; "
        f"Ctrl-C stops it)")
    for folder in app.stale:
        log(f"removed {folder}: the folder of an app.py that was killed")
    try:
        with sigterm_raises(KeyboardInterrupt):  # the server stops as on Ctrl-C, its folder with it
            app.server.serve_forever()
    except KeyboardInterrupt:
        log("stopped")
    finally:
        app.close()
    if app.worker.is_alive():  # mid-job: torch's threads would abort Python's exit under it; the folder is gone
        sys.stderr.flush()
        os._exit(0)


def port_number(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0 to 65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 serves every network this machine is on, without "
                             "a password: anyone who reaches it can upscale and see the results")
    parser.add_argument("--port", type=port_number, default=7860, help="port to listen on (0: any free one)")
    parser.add_argument("--max_pixels", type=positive_int, default=4_000_000,
                        help="refuse input images of more pixels (a 4 MP image takes minutes at x4 on a CPU)")
    add_inference_flags(parser, shipped=False, how_it_runs=False,
                        checkpoint_help=f"serve this network only; None: the shipped ones ({shipped_names(None)})")
    return parser


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())
