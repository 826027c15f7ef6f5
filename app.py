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
"""
import argparse
import contextlib
import errno
import http.server
import itertools
import json
import os
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from machinery.checkpoint import SHIPPED, load_chosen, shipped_names
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

# The temporary folder's name: HOST and the process id tell a killed server's folder at the next start.
FOLDER_PREFIX = f"resshuffle-app-{HOST}-"
STALE_FOLDER = re.compile(re.escape(FOLDER_PREFIX) + r"([0-9]+)-[a-z0-9_]{8}")


@dataclass
class Job:
    id: int
    name: str  # the uploaded file's name: for messages and the download's name
    network: str  # a key of App.networks
    precision: str  # as asked: auto, fp32 or bf16
    state: str = "queued"  # then working, then done or failed
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
        self.jobs, self.ids, self.lock, self.queue = {}, itertools.count(1), threading.Lock(), queue.Queue()
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

    def submit(self, body: bytes, query: dict) -> Job:
        """Queue an upload, after checking the choices and the image's header (a size over the limit,
        a file that is no image: a UserError, nothing queued)."""
        name = Path(query.get("name", ["image"])[0]).name or "image"
        network = query.get("network", [next(iter(self.networks))])[0]
        precision = query.get("precision", ["auto"])[0]
        if network not in self.networks:
            raise UserError(f"unknown network {network!r}: this server has {', '.join(self.networks)}")
        if precision not in PRECISION_CHOICES:
            raise UserError(f"unknown precision {precision!r}: use {', '.join(PRECISION_CHOICES)}")
        with self.lock:
            job = Job(id=next(self.ids), name=name, network=network, precision=precision)
            self.jobs[job.id] = job
        path = self.path(job, "upload")
        path.write_bytes(body)
        try:
            check_size(path, name=name, max_pixels=self.max_pixels)
        except UserError:
            self.forget(job)
            raise
        self.queue.put(job)
        return job

    def status(self, job: Job) -> dict:
        with self.lock:
            ahead = sum(j.state == "working" or (j.state == "queued" and j.id < job.id) for j in self.jobs.values())
        done = {} if job.state != "done" else {
            "input": f"/jobs/{job.id}/input.png", "result": f"/jobs/{job.id}/result.png",
            "download": f"{Path(job.name).stem}_x{self.models[job.network].scale}.png"}  # infer.py's output name
        return {"id": job.id, "state": job.state, "ahead": ahead if job.state == "queued" else 0, "error": job.error,
                "summary": job.summary, **done}

    def find(self, text: str) -> Job | None:
        with self.lock:
            return self.jobs.get(int(text)) if text.isdigit() else None

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
            log(f"job {job.id} {job.name}: " + (job.error or f"{job.summary}, {time.perf_counter() - start:.1f} s"))
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
            checkpoint, scale, arch = self.networks[network]
            self.models[network], _, _ = load_chosen(checkpoint, scale, self.device, arch=arch)
        return self.models[network]

    def precision(self, requested: str) -> str:
        """What `requested` runs in here; asked once each, so that an emulated one warns once."""
        if requested not in self.precisions:
            self.precisions[requested], _ = choose_precision(requested, self.device)
        return self.precisions[requested]

    def forget_old(self) -> None:
        with self.lock:
            finished = [j for j in self.jobs.values() if j.state in ("done", "failed")]
        for job in finished[:-KEEP_JOBS]:
            self.forget(job)

    def forget(self, job: Job) -> None:
        with self.lock:
            self.jobs.pop(job.id, None)
        for kind in ("upload", "input", "result"):
            self.path(job, kind).unlink(missing_ok=True)


def network_choices(checkpoint: str | None) -> dict[str, tuple]:
    """The page's networks: name -> load_chosen's (checkpoint, scale, arch); the shipped ones, or
    the one --checkpoint names. The default (resshuffle x4) comes first."""
    if checkpoint is not None:
        return {Path(checkpoint).name: (checkpoint, None, None)}
    shipped = {f"{arch} x{scale}": (None, scale, arch) for arch, scales in SHIPPED.items() for scale in scales}
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
    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if not isinstance(error, ConnectionError):  # a page closed mid-request is no news
            log(f"request from {client_address[0]} failed: {type(error).__name__}: {first_line(error)}")


class Handler(http.server.BaseHTTPRequestHandler):
    """GET / (the page), POST /jobs?name=&network=&precision= with the image as the body,
    GET /jobs/ID (its state as JSON), GET /jobs/ID/input.png and /jobs/ID/result.png."""
    server_version = "ResShuffle"

    def log_message(self, format, *args):
        pass  # the app logs one line per job; one per poll would bury them

    def do_GET(self):
        app, parts = self.server.app, urlsplit(self.path).path.strip("/").split("/")
        if parts == [""]:
            return self.send(200, app.page, "text/html; charset=utf-8")
        job = app.find(parts[1]) if len(parts) in (2, 3) and parts[0] == "jobs" else None
        if job is None:
            return self.send_json(404, error=f"{self.path}: no such page or job (the last {KEEP_JOBS} are kept)")
        if len(parts) == 2:
            return self.send_json(200, **app.status(job))
        kind = parts[2].removesuffix(".png")
        if job.state != "done" or kind not in ("input", "result"):
            return self.send_json(404, error=f"{self.path}: no such file")
        with contextlib.suppress(FileNotFoundError):  # dropped meanwhile: then a 404
            return self.send(200, app.path(job, kind).read_bytes(), "image/png")
        self.send_json(404, error=f"{self.path}: no longer kept")

    def do_POST(self):
        app, url = self.server.app, urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or -1)
        if url.path != "/jobs":
            return self.send_json(404, error=f"{url.path}: post images to /jobs")
        if not 0 < length <= app.max_bytes():
            self.close_connection = True  # the body is not read: nothing more can come on this connection
            code = 411 if length < 0 else 413 if length else 400  # no Content-Length, too long, empty
            return self.send_json(code, error=f"an upload of {max(length, 0):,} bytes: this server takes 1 to "
                                  f"{app.max_bytes():,}")
        try:
            job = app.submit(self.rfile.read(length), parse_qs(url.query))
        except UserError as e:
            log(f"refused: {e}")
            return self.send_json(400, error=str(e))
        self.send_json(202, **app.status(job))

    def send_json(self, code: int, **fields):
        self.send(code, json.dumps(fields).encode(), "application/json")

    def send(self, code: int, body: bytes, content_type: str):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")  # job ids start at 1 again with each server
        self.end_headers()
        self.wfile.write(body)


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
