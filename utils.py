"""What every script shares: one-line errors, the repository's folder, flag types and help, device and seed."""
import argparse
import contextlib
import errno
import math
import os
import random
import re
import signal
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

# Default paths (the shipped checkpoint, data/, checkpoints/) are resolved from here, not from
# the current folder, so that the scripts work when run from anywhere.
REPO = Path(__file__).resolve().parent


class UserError(Exception):
    """A problem with the user's input: reported as one line, without a traceback."""


def run_cli(main, args) -> None:
    """Run a script's main(args); a UserError becomes `prog: error: ...` and exit status 1.

    Running out of memory and Ctrl-C are reported the same way (exit statuses 1 and 130);
    every output is written atomically, so neither leaves a half-written file.
    """
    prog = Path(sys.argv[0]).name
    try:
        main(args)
    except UserError as e:
        print(f"{prog}: error: {shown(e)}", file=sys.stderr)  # names in it can't act on the terminal
        sys.exit(1)
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        print(f"{prog}: error: out of memory ({shown(first_line(e))}): {memory_hint(prog)}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # a path typed with a name too long, met wherever it is first used
        if e.errno != errno.ENAMETOOLONG:
            raise
        print(f"{prog}: error: {name_too_long(e.filename or '')}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; outputs already written are complete, none is half-written", file=sys.stderr)
        sys.exit(130)


# What to lower when a script runs out of memory: its own flags, by script.
MEMORY_HINTS = {"train": "use a smaller --batch_size or --patch_size", "infer": "use a smaller --tile",
                "evaluate": "use a smaller --tile", "app": "use a smaller --tile",
                "benchmark": "use --quick, or --skip_memory"}


def memory_hint(prog: str) -> str:
    """What script `prog` (train.py, ...) can do about running out of memory."""
    return MEMORY_HINTS.get(Path(prog).stem, "free some memory, or give it a smaller input")


def name_too_long(path) -> str:
    """Why a path can't exist: the part of it longer than file systems allow (255 bytes on most),
    shown cut short."""
    parts = Path(path or "").parts
    shown = str(Path(*(p if len(os.fsencode(p)) <= 255 else p[:24] + "..." for p in parts)) if parts else "a path")
    shown = shown if len(shown) <= 200 else shown[:100] + "..." + shown[-60:]  # one line, even past PATH_MAX
    part = next((p for p in parts if len(os.fsencode(p)) > 255), None)
    if part is None:
        return f"{shown}: the path is longer than this file system allows"
    return f"{shown}: a name in it is {len(os.fsencode(part))} bytes, longer than file systems allow (255)"


def is_out_of_memory(e: BaseException) -> bool:
    """Whether `e` is an allocation failure. CUDA raises torch.OutOfMemoryError; torch's CPU
    allocator raises a plain RuntimeError, told apart only by its message."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e)


def first_line(e: BaseException) -> str:
    """An exception's message, first line only (torch's run to pages)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """'1 image', '2 images'; `nouns` where adding an s is wrong ('patches')."""
    return f"{count:,} {noun if count == 1 else nouns or noun + 's'}"


# Characters a terminal acts on rather than shows (C0 and C1 controls, so escape sequences and
# newlines; bidirectional overrides; the lone surrogates that stand for a name's undecodable bytes).
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def shown(name) -> str:
    """A file name (or any text from outside) as printed: its unprintable characters as \\xNN or
    \\uNNNN, so that a name can't set the terminal's title or clipboard, or forge a line of the log."""
    return UNPRINTABLE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}", str(name))


# The messages warn() keeps while warnings_held() is in force (a list); None: each printed at once.
_held = None


def warn(message: str) -> None:
    """A one-line warning on stderr (not `warnings`, which prints a source line with it)."""
    if _held is not None:
        _held.append(message)
        return
    tqdm.write(f"{Path(sys.argv[0]).name}: warning: {shown(message)}", file=sys.stderr)  # above a progress bar


@contextlib.contextmanager
def warnings_held():
    """warn()'s messages, and Python's warnings in one line each, kept while inside and printed on
    leaving, however it is left: under a table printed a row at a time, not between two rows."""
    global _held
    outer, _held = _held, []
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")  # each once per place, as Python shows them
            yield
    finally:
        held, _held = _held, outer
        for message in held + [f"{w.category.__name__}: {first_line(w.message)}" for w in caught]:
            warn(message)


# ---------------------------------------------------------------- runtime

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def select_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU; a device this machine lacks ('cuda' without a
    GPU, 'mps', ...), or 'meta' (shapes only), is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "meta":  # torch has it on every machine, for shapes without data
        raise UserError(f"device {name!r} is torch's device of shapes without data: no script can compute on "
                        f"it; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but CUDA is not available here")
    backend = getattr(torch, device.type, None)  # torch.mps, torch.xpu, ...: each says whether it is here
    if device.type not in ("cpu", "cuda") and not (hasattr(backend, "is_available") and backend.is_available()):
        raise UserError(f"device {name!r} asked for, but this machine has no such device: "
                        f"use auto, cpu, cuda or cuda:N")
    return device


# ---------------------------------------------------------------- argparse types

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def quality(text: str) -> int:
    """A JPEG (or WebP) quality: 1 to 100."""
    value = int(text)
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be 1 to 100, got {value}")
    return value


def noise_level(text: str) -> float:
    """A noise sigma in levels of 255: 0 to 255."""
    value = float(text)
    if not 0 <= value <= 255:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be 0 to 255, got {text}")
    return value


def seed_int(text: str) -> int:
    """A seed numpy accepts: 0 to 2**32 - 1."""
    value = int(text)
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"must be in 0 to {2 ** 32 - 1}, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


# ---------------------------------------------------------------- argparse help

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default after its help."""


def make_parser(doc: str) -> argparse.ArgumentParser:
    """A parser for a script whose docstring is: a summary, a `usage:` paragraph, the rest.

    The usage paragraph becomes argparse's usage (printed once, not twice), the rest the description.
    """
    summary, _, rest = doc.strip().partition("\n\n")
    usage, body = "", rest
    if rest.startswith("usage:"):
        usage, _, body = rest.partition("\n\n")
    return argparse.ArgumentParser(usage=usage.removeprefix("usage:").strip() or None,
                                   description=f"{summary}\n\n{body}".strip(), formatter_class=HelpFormatter)


# The signals that end a process politely: `kill` and job schedulers (SIGTERM), and a closed
# terminal or ssh session (SIGHUP). Each unwinds the way Ctrl-C does, leaving nothing half-written.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def sigterm_raises(exception):
    """While inside, SIGTERM or SIGHUP raises `exception(signum)` where the main thread is, so the stack
    unwinds as on Ctrl-C and temporary files and folders go with it; by default either ends the
    process where it stands, leaving them behind. Signals reach the main thread only: elsewhere
    this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise exception(signum)

    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
