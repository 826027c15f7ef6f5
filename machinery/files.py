"""Where outputs go: written whole or not at all, never over an input, over an existing file only
when asked, into folders made when something is written; all checked before any work."""
import contextlib
import errno
import os
import re
import shutil
import socket
import stat
import tempfile
from collections import Counter
from pathlib import Path

from utils import UserError, name_too_long, shown, warn

TMP_SUFFIX = ".tmp"

# What a path that is not a regular file is, in the words an error uses.
FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (a named pipe)"),
              (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def not_a_file(path: str | Path) -> str | None:
    """What `path` is where it is there but not a regular file, for a message: "is a FIFO (a
    named pipe)", "is a link to /dev/zero, a character device"; None for a regular file, and for
    a path that can't be looked at (missing: the caller says so). Told by stat alone: opening a
    FIFO waits for a writer for ever, and a device (/dev/zero) is read without end."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # ValueError: a NUL in the name
        return None
    if stat.S_ISREG(mode):
        return None
    kind = next((name for is_kind, name in FILE_KINDS if is_kind(mode)), "not a file")
    link = f"a link to {shown(os.readlink(path))}, " if os.path.islink(path) else ""
    return f"is {link}{kind}"


# Write failures for which the free space is the likely reason, and worth saying.
SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)


class atomic_path:
    """Context manager giving a temporary path beside `path`, renamed onto it on success.

    A reader never sees a half-written file: a failure (or a kill) leaves the old file, or none.
    The temporary is made exclusively (mkstemp: O_EXCL, 0600, a random name) in a folder nobody
    else can swap it in (`check_folder_safe`); its mode is set and it is synced through the
    descriptor that made it, never by name, and it is renamed only while it is still that file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __enter__(self) -> str:
        if not self.path.parent.is_dir():
            raise UserError(f"{shown(self.path.parent)}: output folder does not exist")
        if self.path.is_dir():
            raise UserError(f"{shown(self.path)}: is a folder, not a file name")
        check_folder_safe(self.path.parent)
        if os.path.realpath(self.path.parent) not in CLEANED:  # once per folder: a folder run writes many
            CLEANED.add(os.path.realpath(self.path.parent))
            for stale in remove_stale_temporaries(self.path.parent):
                warn(f"removed {shown(stale)}, left by a process killed while writing it")
        try:
            self.fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=temporary_prefix(self.path.name),
                                                 suffix=TMP_SUFFIX)
        except OSError as e:
            raise UserError(f"{shown(self.path.parent)}: cannot write there ({e.strerror})") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.finish()
                return False
            except UserError:  # swapped
                self.discard()
                raise
            except OSError as e:
                exc = e
        # Said before the temporary goes: the room its partial write holds is not free for this file.
        message = self.failure(exc) if isinstance(exc, OSError) else None
        self.discard()
        if message:
            raise UserError(message) from None
        return False

    def finish(self) -> None:
        """Sync the temporary, give it the mode a plain open() would (mkstemp makes it 0600) and
        rename it onto the output, if it is still the file mkstemp made."""
        os.fsync(self.fd)
        if hasattr(os, "fchmod"):  # Windows has no modes to give
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(self.fd, 0o666 & ~umask)
        made, now = os.fstat(self.fd), os.lstat(self.tmp)
        if (made.st_dev, made.st_ino) != (now.st_dev, now.st_ino):
            raise UserError(f"{shown(self.path)}: its temporary {shown(self.tmp)} was replaced while being written "
                            f"(by another process that writes to {shown(self.path.parent)}?); nothing was written")
        os.close(self.fd)  # before the rename, which Windows refuses for an open file
        self.fd = None
        os.replace(self.tmp, self.path)

    def failure(self, exc) -> str:
        """The one line for a write that failed with `exc`."""
        space = f"; {free_space(self.path.parent)}" if exc.errno in SPACE_ERRORS else ""
        kept = "the file there before is unchanged" if self.path.exists() else "nothing was written"
        return f"{shown(self.path)}: could not be written ({exc.strerror or exc}{space}); {kept}"

    def discard(self) -> None:
        """Close and remove the temporary (a link planted under its name: the link, not its target)."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


def check_folder_safe(folder: Path) -> None:
    """Refuse to write into a folder anyone may write to, unless it has the sticky bit: anyone
    there could swap a file being written for a link to another (whose mode, or contents, the
    writer would then change). A sticky folder (/tmp) guards each file from all but its owner and
    the folder's, so such a folder must be this user's or root's. A folder only its owner and
    group may write to is trusted: they are whom its owner let in."""
    if os.name == "nt":
        return
    try:
        st = os.stat(folder)
    except OSError:  # missing or unreadable: the write itself says so
        return
    if not st.st_mode & stat.S_IWOTH:
        return
    if not st.st_mode & stat.S_ISVTX:
        raise UserError(f"{shown(folder)}: anyone may write to this folder (mode {stat.S_IMODE(st.st_mode):o}), and "
                        f"could swap what is written there for a link: use a folder of your own, or make it "
                        f"sticky (chmod +t)")
    if st.st_uid not in (0, os.geteuid()):
        raise UserError(f"{shown(folder)}: anyone may write to this folder, and its owner (user {st.st_uid}) may "
                        f"swap what is written there even though it is sticky: use a folder of your own")


def free_space(folder: Path) -> str:
    """'12.3 GB free', '45.6 MB free', or 'the disk is full' (under 1 MB: room for no output), for
    error messages about failed writes."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "free space unknown"
    if free < 1e6:
        return "the disk is full"
    return f"{free / 1e9:.1f} GB free" if free >= 1e9 else f"{free / 1e6:.1f} MB free"


# This machine, in temporary names: a process on another one (a shared disk) is never taken for dead.
HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:32] or "host"
CLEANED = set()  # the folders this process has removed stale temporaries from


def temporary_prefix(name: str) -> str:
    """How `atomic_path` names the temporary file of `name`: hidden, with this machine and the
    writer's process id (`mkstemp` adds 8 random characters and TMP_SUFFIX). The name is cut to
    180 bytes, so that the temporary name fits where the output's own name (255 at most) fits."""
    return f".{os.fsdecode(os.fsencode(name)[:180])}.{HOST}-{os.getpid()}-"


STALE = re.compile(r"\..+\." + re.escape(HOST) + r"-(\d+)-[^.]{8}" + re.escape(TMP_SUFFIX), re.DOTALL)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete what `atomic_path` leaves in `folder` when a process is killed mid-write: the
    temporaries of this machine's processes that have ended (a user's own .tmp files stay, and so
    do those of a process still writing); the paths removed."""
    if os.name == "nt":  # os.kill(pid, 0) would end the process there, not ask about it
        return []
    stale = []
    with contextlib.suppress(OSError), os.scandir(folder) as entries:
        for entry in entries:
            found = STALE.fullmatch(entry.name)
            if found and entry.is_file(follow_symlinks=False) and not process_exists(int(found.group(1))):
                stale.append(Path(entry.path))
    for p in stale:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return stale


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # ended; a number no process id can be
        return False
    except PermissionError:  # another user's
        return True
    return True


def make_dir(path: str | Path, what: str = "folder", hint: str = "") -> Path:
    """mkdir -p, with a one-line error when it can't be made: `what` names the folder in it
    ("the data cache folder"), and `hint` ends it (what to pass instead)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{shown(path)}: is a file, not a folder{hint}") from None
    except OSError as e:
        raise UserError(f"{shown(path)}: cannot create {what} ({e.strerror}){hint}") from None
    return path


@contextlib.contextmanager
def made_folder(folder: Path):
    """`folder`, made if missing, and the folders this made removed again (those still empty)
    when the work inside fails: a failed write, or a typo in a path, leaves nothing behind."""
    missing = [p for p in (folder, *folder.parents) if not os.path.lexists(p)]
    try:
        make_dir(folder)
        yield folder
    except BaseException:
        for p in missing:  # deepest first
            with contextlib.suppress(OSError):
                p.rmdir()
        raise


def folder_for(path: Path):
    """`made_folder` for the folder of an output file."""
    return made_folder(path.parent)


# ---------------------------------------------------------------- checked before any work

def check_output_dir(path: str | Path) -> Path:
    """Fail now, before any work, if `path` is not a folder that can be written or made.

    The folder itself is made only when something is written into it (`make_dir`), so that a
    failed run leaves no empty folders. Writing is tried, not inferred from permissions: root
    may write to a 0555 folder, nobody to a read-only mount.
    """
    path = Path(path)
    check_name_lengths(path)
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():
            raise UserError(f"{shown(existing)}: is a link to {shown(os.readlink(existing))}, which does not exist "
                            f"(or loops)")
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{shown(path)}: can't be an output folder: {shown(existing)} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"{shown(existing)}: can't create files there ({e.strerror})") from None
    return path


def check_name_lengths(path: Path) -> None:
    """Each part of `path` must fit the file system's name limit (255 bytes on most)."""
    if any(len(os.fsencode(part)) > 255 for part in path.parts):
        raise UserError(name_too_long(path))


def file_ids(paths) -> set[tuple[int, int]]:
    """The (device, inode) of each existing path: what `check_output_file` compares outputs with,
    through links, `..` and case-folding file systems, in one stat per file."""
    ids = set()
    for p in paths:
        with contextlib.suppress(OSError):
            st = os.stat(p)
            ids.add((st.st_dev, st.st_ino))
    return ids


def check_output_file(path: str | Path, overwrite: bool = False, inputs: set = frozenset()) -> Path:
    """Fail now, before any work, if writing `path` would replace an input (`inputs`: `file_ids`),
    or an existing file without `overwrite`, or can't be done."""
    check_output_files([path], overwrite=overwrite, inputs=inputs)
    return Path(path)


def check_output_files(paths, overwrite: bool = False, inputs: set = frozenset()) -> None:
    """`check_output_file` for many outputs: each file, then each of their folders once."""
    for raw in paths:  # Path() drops a trailing slash, which says the user meant a folder
        if str(raw).endswith(("/", os.sep)):
            raise UserError(f"{shown(raw)}: ends in '/', a folder; name the output file")
    paths = [Path(p) for p in paths]
    for path in paths:
        check_name_lengths(path)
        if path.is_dir():
            raise UserError(f"{shown(path)}: is a folder, not a file name; choose another output name")
        if path.is_symlink() or (path.exists() and not path.is_file()):  # a link, a device, a pipe
            raise UserError(f"{shown(path)}: is not a regular file (a link?); outputs are written only as files: "
                            f"remove it or choose another output name")
        if path.exists() and file_ids([path]) & inputs:
            raise UserError(f"{shown(path)}: is an input; outputs never replace inputs: choose another output name")
        if path.exists() and not overwrite:
            raise UserError(f"{shown(path)}: exists; pass --overwrite to replace it")
    for folder in dict.fromkeys(path.parent for path in paths):
        check_output_dir(folder)


def check_outside(out_dir: Path, folder: Path) -> None:
    """An output folder must not be an input folder or inside one: the next run would read the
    outputs as inputs."""
    ids = file_ids([folder])
    for d in (out_dir, *out_dir.parents):
        if d.exists() and file_ids([d]) & ids:
            raise UserError(f"{shown(out_dir)}: is {shown(folder)} or inside it, where the inputs are; the next run "
                            f"would read the outputs as inputs: choose another output folder")


def check_outputs_outside_inputs(pairs: list[tuple[Path, Path]]) -> None:
    """No output may land in a folder an input is read from, or below it (a linked subfolder under
    --recursive can lead there): each run would upscale the last run's outputs again. An output
    folder that merely holds the input folder (`-o .` for `in/`) is fine."""
    sources = {os.path.realpath(src.parent) + os.sep for src, _ in pairs}
    for _, dst in pairs:
        real = os.path.realpath(dst.parent) + os.sep
        source = next((s for s in sources if real.startswith(s)), None)
        if source is not None:
            raise UserError(f"{shown(dst)}: would be written into {shown(source.rstrip(os.sep))}, where inputs are "
                            f"read from (through a link?); the next run would read the outputs as inputs: choose "
                            f"another output folder")


def output_stems(paths: list[Path]) -> dict[Path, str]:
    """Each image's output stem: its own, or with its extension added (a_jpg, a_png) where two
    images in one folder share a stem, so that neither output replaces the other."""
    shared = Counter((p.parent, p.stem) for p in paths)
    return {p: p.stem if shared[p.parent, p.stem] == 1 else f"{p.stem}_{p.suffix.lstrip('.')}" for p in paths}


def check_distinct(pairs: list[tuple[Path, Path]]) -> None:
    """No two inputs may have one output (a.png and a.jpg beside a_png.png): refused, not overwritten."""
    seen = {}
    for src, dst in pairs:
        key = Path(os.path.realpath(dst))  # not Path.resolve(), which raises on a link loop
        if key in seen:
            raise UserError(f"{shown(seen[key])} and {shown(src)} would both be written as {shown(dst)}; rename one "
                            f"of them")
        seen[key] = src
    folders = {p for key in seen for p in key.parents}
    for key, src in seen.items():
        if key in folders:  # a_x4.png written as a file, and as the folder of a/a_x4.png/b.png's output
            raise UserError(f"{shown(key)}: would be written as the output of {shown(src)} and as a folder of other "
                            f"outputs")


# ---------------------------------------------------------------- one process per folder

def lock_folder(folder: Path):
    """An exclusive lock on folder/.lock, held while the returned file is open; a second process
    asking for it gets a one-line error. None where the platform has no flock (Windows)."""
    try:
        import fcntl
    except ImportError:
        return None
    check_folder_safe(folder)
    try:
        f = open_lock(folder / ".lock")  # held open by the caller: the lock lasts as long
    except OSError as e:
        raise UserError(f"{shown(folder / '.lock')}: can't be opened as a lock file ({e.strerror})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UserError(f"{shown(folder)}: another process (a training run?) is using this folder; "
                        f"wait for it to end") from None
    return f


def open_lock(path: Path):
    """`path` opened (read-only: flock needs no more) to be locked, made if missing, never through
    a link: a link planted under its name is refused, and its target neither made nor opened.
    Anything but a regular file is refused too (O_NONBLOCK: a fifo there would wait forever)."""
    flags = os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK) and os.path.islink(path):  # EMLINK: FreeBSD's answer
            raise UserError(f"{shown(path)}: a link, not a lock file; remove it (someone else may have "
                            f"put it there)") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{shown(path)}: not a regular file, not a lock file; remove it")
    return os.fdopen(fd, "rb")
