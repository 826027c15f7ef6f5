"""The decoded training set in one file on disk, memory-mapped: built once, shared by every process.

A cache file holds every readable image of a training folder decoded: the HR image cropped to
the scale's multiple and its LR image for that scale and degradation, uint8, each at a page
boundary. Every process maps it read-only, so the operating system keeps one copy of the pages
for all processes of a machine, and pages them in from disk when the set is larger than memory.

The file's name comes from what it was made from: the images' names, sizes and modification
times, the scale, the degradation and the code that decodes and downsamples. Any change gives
another name, which the next run builds; a run that builds one removes the older caches of the
same folder, scale and degradation.

Layout: MAGIC; the header's offset and length (little-endian uint64) and its SHA-256; the
pixels, from byte PAGE on; the JSON header, last, naming each image and where its HR and LR
lie. The pixels carry no checksum (reading them all at every start would cost what mapping
saves): a file is written whole or not at all, and must never be edited in place.
"""
import contextlib
import hashlib
import inspect
import json
import os
import re
import shutil
import stat
import struct
import sys
import tempfile
import time
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL
from tqdm import tqdm

import resize
from utils import UserError, plural, shown, warn

from . import images
from .files import HOST, atomic_path, check_folder_safe, make_dir, open_lock
from .images import image_size

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

FORMAT = 2  # what the file holds and how it is laid out; another FORMAT is another name
MAGIC = b"ResShuffle data cache\n\0\0"
PREFIX = struct.Struct("<QQ32s")  # after MAGIC: the header's offset, length and SHA-256
PAGE = 4096
SUFFIX = ".cache"
STARTED = time.time()  # before any process of a torchrun job can have built a cache (wait_for)


def default_cache_dir() -> Path:
    """The per-user cache folder (not the data's folder, which may be read-only or shared); where
    there is no home folder (HOME unset and no passwd entry, or naming no folder), one under the
    system's temporary folder, named for the user."""
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "resshuffle" / "data"
    if sys.platform not in ("win32", "darwin") and os.path.isabs(os.environ.get("XDG_CACHE_HOME", "")):
        return Path(os.environ["XDG_CACHE_HOME"]) / "resshuffle" / "data"  # a relative one is ignored (XDG)
    try:
        home = Path.home()
    except RuntimeError:  # "Could not determine home directory"
        home = None
    if home is None or not home.is_absolute() or not home.is_dir():
        user = getattr(os, "getuid", lambda: os.environ.get("USERNAME", "user"))()
        return Path(tempfile.gettempdir()) / f"resshuffle-{user}" / "data"
    base = {"win32": home / "AppData" / "Local", "darwin": home / "Library" / "Caches"}.get(sys.platform)
    return (base or home / ".cache") / "resshuffle" / "data"


def decode_pair(path: Path, scale: int, degradation: str) -> tuple[np.ndarray, np.ndarray, list[int]] | str:
    """(hr, lr, [width, height]) of one image: HR cropped to the scale's multiple, LR its
    downsampling, and the image's own size; or why it can't be read (a string), so that all
    failures can be listed. An image smaller than the scale gets an empty LR (the patch size
    leaves it out)."""
    try:
        img = images.load_rgb(path)
    except UserError as e:
        return str(e).removeprefix(f"{shown(path)}: ")
    hr = resize.modcrop(img, scale)
    lr = (resize.downsample(hr, scale, degradation) if min(hr.shape[:2]) >= scale
          else np.zeros((0, 0, 3), np.uint8))
    return hr, lr, [img.shape[1], img.shape[0]]


def decoded_pairs(paths: list[Path], scale: int, degradation: str, num_threads: int):
    """decode_pair of every path, in order, in threads (PIL releases the GIL), ahead of use by
    at most two per thread: memory holds only those in flight and what the caller keeps."""
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        ahead = deque()
        for path in paths:
            ahead.append(pool.submit(decode_pair, path, scale, degradation))
            if len(ahead) > 2 * num_threads:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def mapped_pairs(paths: list[Path], *, hr_dir: Path, scale: int, degradation: str, cache_dir: str | Path,
                 num_threads: int, quiet: bool) -> list:
    """decode_pair's answer for every path, as views into the mapped cache file: built first
    where missing, stale or torn. Under torchrun the first process of each machine (LOCAL_RANK 0)
    builds, and the others wait for the file to appear."""
    source = made_from(paths, hr_dir=hr_dir, scale=scale, degradation=degradation)
    path = cache_folder(cache_dir) / cache_name(hr_dir, source)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return pairs_in(path, wait_for(path, source, hr_dir=hr_dir))
    prune_gone(path.parent, quiet=quiet)
    header = read_header(path, source, say=False)  # a whole file needs no lock: a read-only cache works too
    if header is None:
        with build_lock(path, quiet=quiet):
            header = read_header(path, source, say=not quiet)
            if header is None:
                return pairs_in(path, built(path, paths, source, hr_dir=hr_dir, num_threads=num_threads, quiet=quiet))
    if not quiet:
        print(f"data cache: reusing {shown(path)} ({size_text(path.stat().st_size)}, "
              f"built {time.strftime('%Y-%m-%d %H:%M', time.localtime(path.stat().st_mtime))})")
    return pairs_in(path, header)


def wait_for(path: Path, source: dict, hr_dir: Path) -> dict:
    """The header of the cache the machine's first process builds, once it is whole. Where that
    process built another (a file of the folder changed between their looks at it), this one would
    wait forever: it stops, saying so."""
    while (header := read_header(path, source, say=False)) is None:
        if lock_free(path) and any(other.stat().st_mtime >= STARTED for other in siblings(path)):
            raise UserError(f"{shown(hr_dir)}: its images changed while the run started (the processes saw different "
                            f"names, sizes or times): start it again")
        time.sleep(0.2)
    return header


def lock_free(path: Path) -> bool:
    """Whether no process holds the build lock of `path` (True where there is no flock)."""
    try:
        import fcntl
    except ImportError:
        return True
    try:
        with open_lock(lock_path(path)) as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
    except BlockingIOError:
        return False
    except (OSError, UserError):
        return True


def siblings(path: Path) -> list[Path]:
    """The other cache files of the same folder name, scale and degradation."""
    return [p for p in path.parent.glob(path.name.rsplit(".", 2)[0] + ".*" + SUFFIX) if p != path]


def lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def built(path: Path, paths: list[Path], source: dict, *, hr_dir: Path, num_threads: int, quiet: bool) -> dict:
    """Remove the folder's older caches (their room may be needed), build this one and say where
    and how large; its header."""
    for old in remove_older(path, hr_dir):
        if not quiet:
            print(f"data cache: removed {shown(old)}, made from an earlier state of {shown(hr_dir.resolve())}")
    started = time.time()
    build(path, paths, source, hr_dir=hr_dir, num_threads=num_threads, quiet=quiet)
    if not quiet:
        print(f"data cache: built {shown(path)} ({size_text(path.stat().st_size)}, {plural(len(paths), 'image')}) in "
              f"{time.time() - started:.0f} s; later runs map it instead of decoding")
    return read_header(path, source, say=True)


def made_from(paths: list[Path], *, hr_dir: Path, scale: int, degradation: str) -> dict:
    """What a cache is made from: a cache is used only where this is equal, to the last file."""
    code = [Path(inspect.getfile(m)).read_bytes() for m in (images, resize, sys.modules[__name__])]
    code.append(source_of(resize.DEGRADATIONS[degradation]).encode())  # a degradation added elsewhere
    files = []
    for p in paths:
        info = p.stat()
        files.append([p.relative_to(hr_dir).as_posix(), info.st_size, info.st_mtime_ns])
    return {"format": FORMAT, "scale": scale, "degradation": degradation, "pillow": PIL.__version__,
            "numpy": np.__version__, "code": hashlib.sha256(b"\0".join(code)).hexdigest(), "files": files}


def source_of(function) -> str:
    """A function's source; its name where Python has none (a builtin, a C extension)."""
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return getattr(function, "__qualname__", repr(function))


def cache_name(hr_dir: Path, source: dict) -> str:
    """'DIV2K_train_HR.x4.pil.<16 hex digits of what it was made from>.cache'."""
    digest = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]
    return f"{name_prefix(hr_dir, source['scale'], source['degradation'])}.{digest}{SUFFIX}"


def name_prefix(hr_dir: Path, scale: int, degradation: str) -> str:
    folder = re.sub(r"[^A-Za-z0-9_-]", "_", Path(hr_dir).name)[:60] or "images"
    return f"{folder}.x{scale}.{degradation}"


def cache_folder(cache_dir: str | Path) -> Path:
    """--data_cache, made if missing; one line where it can't be."""
    try:
        folder = Path(cache_dir).expanduser()
    except RuntimeError as e:  # ~nosuchuser
        raise UserError(f"{shown(cache_dir)}: --data_cache: {e}") from None
    make_dir(folder, what="the data cache folder",
             hint="; pass --data_cache with a writable folder, or --data_cache none to decode into memory")
    check_folder_safe(folder)
    check_own_below_temp(folder)
    return folder


def check_own_below_temp(folder: Path) -> None:
    """Under the system's temporary folder (the default where there is no home), anyone could
    have made the folder first, to swap the caches in it: each folder below it must be this user's."""
    temp = Path(tempfile.gettempdir()).resolve()
    folder = folder.resolve()
    if not hasattr(os, "geteuid") or temp not in folder.parents:
        return
    for d in (folder, *folder.parents[:folder.parents.index(temp)]):
        if d.stat().st_uid != os.geteuid():
            raise UserError(f"{shown(d)}: made by another user (user {d.stat().st_uid}), who could swap the data "
                            f"caches in it: pass --data_cache with a folder of your own")


class build_lock:
    """An exclusive lock on .<name>.lock beside the cache file while it is checked and built: one
    process builds, another run (or another machine on a shared disk) waits, then maps it."""

    def __init__(self, path: Path, quiet: bool):
        self.path, self.quiet, self.file = lock_path(path), quiet, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # Windows: no flock; the atomic rename still keeps readers whole
            return self
        try:
            self.file = open_lock(self.path)
        except OSError as e:
            raise UserError(f"{shown(self.path.parent)}: can't write the data cache there ({e.strerror}); pass "
                            f"--data_cache with a writable folder, or --data_cache none") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not self.quiet:
                print(f"data cache: waiting for another process building {shown(self.path.parent)}")
            fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.file:
            self.file.close()  # and with it the lock
        return False


def read_header(path: Path, source: dict, say: bool) -> dict | None:
    """The cache's header where it is whole and made from `source`; None where it is missing,
    or torn or made from other files (said when `say`: it is then built again). Anything else
    under the name (a link, a folder, a file of another kind) is refused: it is not ours to replace."""
    try:
        header = whole_header(path)
    except FileNotFoundError:
        return None
    if header is None:
        if say:
            warn(f"{shown(path)}: torn (cut short or damaged), not used: building it again")
        return None
    if header["made_from"] != source:
        if say:
            warn(f"{shown(path)}: made from other files than these, not used: building it again")
        return None
    return header


def whole_header(path: Path) -> dict | None:
    """The header of the cache file `path` where it is whole (its SHA-256 and its shape check),
    None where it is torn; UserError where the file is not a cache."""
    check_regular_file(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC) + PREFIX.size)
            if head[:len(MAGIC)] != MAGIC and not MAGIC.startswith(head):
                raise UserError(f"{shown(path)}: not a ResShuffle data cache, though named as one: move it away, or "
                                f"pass another --data_cache")
            offset, length, digest = PREFIX.unpack(head[len(MAGIC):])
            f.seek(offset)
            text = f.read(length) if offset + length == os.fstat(f.fileno()).st_size else b""
        header = json.loads(text) if hashlib.sha256(text).digest() == digest else None
    except FileNotFoundError:  # missing is not torn: the caller builds it without a warning
        raise
    except (OSError, ValueError, struct.error):  # unreadable, cut inside the prefix, JSON of another kind
        return None
    return header if header is not None and whole(header, data_end=offset) else None


def check_regular_file(path: Path) -> None:
    """Refuse a link, a folder, a pipe... under the cache's name (FileNotFoundError where none)."""
    mode = os.lstat(path).st_mode
    if not stat.S_ISREG(mode):
        what = "a link" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode) else "not a regular file"
        raise UserError(f"{shown(path)}: {what}, not a data cache train.py made: move it away, or pass another "
                        f"--data_cache")


def whole(header: dict, data_end: int) -> bool:
    """One entry per image, each skipped (saying why) or with its HR and LR inside the pixel
    area, the HR scale times the LR, its offsets and sizes integers."""
    try:
        scale, images = header["made_from"]["scale"], header["images"]
        kept = [item for item in images if "skipped" not in item]
        return (len(images) == len(header["made_from"]["files"])
                and all(isinstance(item["skipped"], str) for item in images if "skipped" in item)
                and all(integers(item["hr"], 3) and integers(item["lr"], 3) and integers(item["size"], 2)
                        for item in kept)
                and all(PAGE <= off and 0 <= h and 0 <= w and off + h * w * 3 <= data_end
                        for item in kept for off, h, w in (item["hr"], item["lr"]))
                and all(item["hr"][1] == item["lr"][1] * scale and item["hr"][2] == item["lr"][2] * scale
                        for item in kept if item["lr"][1]))
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):
        return False


def integers(values, length: int) -> bool:
    """`values` a list of `length` ints (not floats, nor bools): offsets and sizes that index
    arrays. A header edited by hand can hold others under a checksum that matches."""
    return isinstance(values, list) and len(values) == length and all(type(v) is int for v in values)


def build(path: Path, paths: list[Path], source: dict, *, hr_dir: Path, num_threads: int, quiet: bool) -> None:
    """Decode every image and write the cache file, whole or not at all."""
    check_room(path, paths, source["scale"])
    entries = []
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(MAGIC + PREFIX.pack(0, 0, bytes(32)))
        bar = tqdm(decoded_pairs(paths, source["scale"], source["degradation"], num_threads),
                   total=len(paths), desc=f"caching {shown(Path(hr_dir).name)}", unit="img", leave=False, disable=quiet)
        for (name, _, _), pair in zip(source["files"], bar):
            if isinstance(pair, str):
                entries.append({"name": name, "skipped": pair})
                continue
            entries.append({"name": name, "size": pair[2], "hr": write_array(f, pair[0]),
                            "lr": write_array(f, pair[1])})
        offset = max(f.tell(), PAGE)
        header = json.dumps({"made_from": source, "source": str(hr_dir.resolve()), "host": HOST,
                             "images": entries}).encode()
        f.seek(offset)
        f.write(header)
        f.seek(len(MAGIC))
        f.write(PREFIX.pack(offset, len(header), hashlib.sha256(header).digest()))


def write_array(f, a: np.ndarray) -> list[int]:
    """Write `a` at the next page boundary (from PAGE on); [offset, height, width]."""
    offset = max(-(-f.tell() // PAGE) * PAGE, PAGE)
    f.seek(offset)
    f.write(np.ascontiguousarray(a).data)
    return [offset, a.shape[0], a.shape[1]]


def check_room(path: Path, paths: list[Path], scale: int) -> None:
    """Refuse, before decoding, a cache the disk has no room for (sizes from the file headers)."""
    need = 0
    for p in paths:
        try:
            w, h = image_size(p)
        except UserError:
            continue
        need += 3 * (w * h + (w // scale) * (h // scale)) + 2 * PAGE
    free = shutil.disk_usage(path.parent).free
    if need > free:
        raise UserError(f"{shown(path.parent)}: the data cache needs {size_text(need)}, and {size_text(free)} is free: "
                        f"free space, pass --data_cache with another folder, or --data_cache none")


def pairs_in(path: Path, header: dict) -> list:
    """decode_pair's answer for each image, as read-only views into the mapped file. The file is
    held with a shared flock while any view lives (in forked workers too): `prune_gone` leaves
    alone a cache some process is using."""
    with open(path, "rb") as f:
        mapped = np.memmap(f, dtype=np.uint8, mode="r")
        if fcntl:
            held = os.dup(f.fileno())
            with contextlib.suppress(OSError):
                fcntl.flock(held, fcntl.LOCK_SH | fcntl.LOCK_NB)
            weakref.finalize(mapped, os.close, held)  # the views hold `mapped`: released with the last

    def view(off: int, h: int, w: int) -> np.ndarray:
        return mapped[off:off + h * w * 3].view(np.ndarray).reshape(h, w, 3)

    return [item["skipped"] if "skipped" in item else (view(*item["hr"]), view(*item["lr"]), item["size"])
            for item in header["images"]]


def prune_gone(folder: Path, quiet: bool) -> None:
    """Remove the caches made from image folders that no longer exist, and say so in one line:
    only in the default cache folder, where caches of deleted or moved folders would pile up
    unseen (each the size of its decoded images), never in a folder typed with --data_cache,
    which machines that see image folders elsewhere may share. A cache some process is building
    (its build lock) or using (`pairs_in`'s shared lock) stays, and so does one another machine
    made (its header's host; caches from before that was recorded count as this machine's)."""
    if fcntl is None or os.path.realpath(folder) != os.path.realpath(default_cache_dir()):
        return
    removed = [gone for path in sorted(folder.glob("*" + SUFFIX)) if (gone := prune(path)) is not None]
    if removed and not quiet:
        print(f"data cache: removed {plural(len(removed), 'cache')} made from folders that no longer exist "
              f"({size_text(sum(size for _, size in removed))}): {', '.join(shown(s) for s, _ in removed)}")


def prune(path: Path) -> tuple[str, int] | None:
    """Remove the cache `path` if its image folder is gone and nobody builds or maps it: (the
    folder it was made from, its size), or None where it stays."""
    try:
        header = whole_header(path)
        source = header and header.get("host", HOST) == HOST and header.get("source")
        if not isinstance(source, str) or os.path.isdir(source):
            return None
        with open_lock(lock_path(path)) as building, open(path, "rb") as using:
            fcntl.flock(building, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(using, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.path.isdir(source) or not os.path.samestat(os.fstat(using.fileno()), os.lstat(path)):
                return None  # made again meanwhile, or replaced
            size = os.fstat(using.fileno()).st_size
            path.unlink()
            lock_path(path).unlink(missing_ok=True)
        return source, size
    except (OSError, UserError, AttributeError):  # in use (BlockingIOError), gone meanwhile, not ours
        return None


def remove_older(path: Path, hr_dir: Path) -> list[Path]:
    """Remove the caches of the same folder, scale and degradation other than `path`, and their
    lock files: the folder has changed since they were built. A run still mapping one keeps
    reading it (POSIX)."""
    removed = []
    for other in siblings(path):
        try:
            header = whole_header(other)
            if header is not None and header.get("source") == str(hr_dir.resolve()):
                other.unlink()
                lock_path(other).unlink(missing_ok=True)
                removed.append(other)
        except (OSError, UserError, AttributeError):  # not ours, or gone meanwhile: left as it is
            continue
    return removed


def size_text(n: int) -> str:
    """'5.93 GB', '12.4 MB'."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
