"""The data cache's memory study: the training set mapped from one file (datacache.py) against decoded per process.

    python benchmark.py --data_cache [--quick] [--device auto] [--arch resshuffle] [--loss l1]

It makes a 2 GB set and takes minutes: the training set decoded into one file that every
process maps (machinery/datacache.py, train.py's default) against decoded into each process's
memory (TrainDataset's cache_dir=None). The set: 230 names linked to 8 distinct 2K PNGs, 2.0 GB
decoded with its x4 LR (--quick: 35 names, 0.3 GB), the cache beside it in a temporary folder
(never the user's cache folder). Measured, each row printed as soon as it is, then every figure as
JSON, where benchmark.py --json says:

- seconds to construct TrainDataset: decoding, building the cache, mapping it;
- PatchLoader's patches/s from each, the same batches, with 1 and 2 threads, beside what the
  fp32 training step (--arch, --loss, on --device) takes;
- PSS and USS of the set in 1 child process and in 2 at once (/proc/<pid>/smaps_rollup, less
  after the imports);
- train.py from the cache, then with --data_cache none, each in a memory cgroup (v1 or v2, as
  root) limited to train.py's own peak plus half the set: the first should finish, the second
  be killed. Without root that row says skipped.
"""
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image

from dataset import EpochSampler, PatchLoader, TrainDataset
from losses import WeightedLoss
from utils import REPO, plural

from .bench_tools import (
    BATCH,
    LR_PATCH,
    SCALE,
    TWO_K,
    header,
    loader_rate,
    make_2k_images,
    random_batch,
    row,
    run_figures,
    step_seconds,
)
from .images import list_images, load_rgb


class CachePlan(NamedTuple):
    """The study's sizes; --quick: a smaller set, fewer batches."""
    distinct: int  # distinct synthetic 2K images written
    images: int  # names they are linked under: the set's images
    loader_batches: int  # batches timed per loader measurement
    step_batch: int  # the training step the loader feeds, patches
    step_repeats: int  # its timed steps


CACHE_FULL = CachePlan(distinct=8, images=230, loader_batches=1000, step_batch=BATCH, step_repeats=2)
CACHE_QUICK = CachePlan(distinct=2, images=35, loader_batches=250, step_batch=BATCH, step_repeats=1)

# A child that holds the set, for the parent to read its memory: it imports, says "ready" and
# waits; on "go" it constructs the set, reads every page of it and says "done", then waits to
# be killed, so that all children are alive when the parent reads their /proc/<pid>/smaps_rollup.
# Not a module of this repository: no module may import an entry script.
HOLD_SET = """
import sys
from dataset import TrainDataset
print("ready", flush=True)
sys.stdin.readline()
data = TrainDataset(sys.argv[1], scale=4, patch_size=192, patches_per_image=1, quiet=True,
                    cache_dir=None if sys.argv[2] == "none" else sys.argv[2])
sum(int(a.reshape(-1)[::4096].sum()) for a in data.hr + data.lr)  # one byte of every page
print("done", flush=True)
sys.stdin.read()
"""


def set_bytes(plan: CachePlan) -> int:
    """The set decoded: each 2K image and its x4 LR, uint8 RGB."""
    w, h = TWO_K
    return plan.images * 3 * (w * h + (w // SCALE) * (h // SCALE))


def make_cache_set(tmp: Path, plan: CachePlan) -> Path:
    """`plan.distinct` photo-like 2K PNGs in tmp/distinct, linked under `plan.images` names in
    tmp/set: a large set made in seconds (decoding 230 distinct images costs the same as 8 copies)."""
    (tmp / "distinct").mkdir()
    (tmp / "set").mkdir()
    make_2k_images(tmp / "distinct", plan.distinct)
    distinct = list_images(tmp / "distinct")
    for i in range(plan.images):
        os.link(distinct[i % len(distinct)], tmp / "set" / f"{i:04d}.png")
    return tmp / "set"


def bench_data_cache(device, plan: CachePlan, model_args: dict, loss: WeightedLoss) -> dict:
    """The study: start-up, the loader's speed, memory with 1 and 2 processes, and train.py under
    a memory limit, from the mapped cache against the set decoded into memory."""
    with tempfile.TemporaryDirectory() as tmp:  # the cache too: never the user's own cache folder
        tmp = Path(tmp)
        folder, cache = make_cache_set(tmp, plan), tmp / "cache"
        size = f"{plan.images} 2K images, {set_bytes(plan) / 1e9:.2f} GB"  # named in each section's first row
        out = {"cache_images": plan.images, "cache_set_gb": set_bytes(plan) / 1e9}
        sets = cache_startup(folder, cache, plan, size, out)
        out |= cache_loader(sets, plan, device, model_args, loss)
        del sets  # the children below must be the only processes mapping the cache
        out |= cache_memory(folder, cache, size)
        out |= cache_limit(device, tmp, cache, plan)
    return out


def cache_startup(folder: Path, cache: Path, plan: CachePlan, size: str, out: dict) -> dict:
    """Seconds to construct TrainDataset decoding into memory, building the cache, and mapping
    it (into `out`); the in-memory and the mapped sets, for the loader."""
    sets, seconds = {}, {}
    per_image = -(-(plan.loader_batches + 1) * BATCH // plan.images)  # an epoch holds the batches timed
    for name, cache_dir in (("decode", None), ("build", cache), ("reuse", cache)):
        start = time.perf_counter()
        sets[name] = TrainDataset(folder, scale=SCALE, patch_size=LR_PATCH * SCALE, patches_per_image=per_image,
                                  cache_dir=cache_dir, quiet=True)
        seconds[name] = out[f"cache_startup_{name}_s"] = time.perf_counter() - start
    row(f"start-up, s ({size}): mapped", f"{seconds['reuse']:.2f}", f"{seconds['decode']:.1f}",
        f"{seconds['decode'] / seconds['reuse']:.0f}x")
    row("  first run: cache built, s", f"{seconds['build']:.1f}")
    out["cache_startup_decode_over_reuse"] = seconds["decode"] / seconds["reuse"]
    del sets["build"]
    return sets


def cache_loader(sets: dict, plan: CachePlan, device, model_args: dict, loss: WeightedLoss) -> dict:
    """PatchLoader's patches/s from the mapped set against the in-memory one, the same batches,
    after a pass over every page of both; and what the fp32 training step takes."""
    mapped, memory = sets["reuse"], sets["decode"]
    same = all(torch.equal(a, b) for a, b in zip(mapped.batch(0, range(BATCH)), memory.batch(0, range(BATCH))))
    for data in (mapped, memory):
        sum(int(a.reshape(-1)[::4096].sum()) for a in data.hr + data.lr)  # warm: every page read once
    row("loader: the same patches from both, bit for bit", "yes" if same else "NO")
    out = {"cache_same_patches": same}
    for workers in (1, 2):
        rate = {"memory": 0.0, "mapped": 0.0}
        for _ in range(3):  # the best of 3, in turns: another load on the machine slows both alike
            for name, data in (("memory", memory), ("mapped", mapped)):
                loader = PatchLoader(data, EpochSampler(data, seed=0), batch_size=BATCH, num_workers=workers)
                rate[name] = max(rate[name], loader_rate(loader, batches=plan.loader_batches))
        row(f"loader, patches/s ({BATCH}x{LR_PATCH * SCALE}px HR), {plural(workers, 'thread')}",
            f"{rate['mapped']:.0f}", f"{rate['memory']:.0f}", f"{rate['mapped'] / rate['memory']:.2f}x")
        out |= {f"cache_loader_patches_s_{workers}w_{name}": r for name, r in rate.items()}
    batch = plan.step_batch
    step = batch / step_seconds(device, model_args, loss, "fp32", *random_batch(batch), steps=plan.step_repeats)
    row(f"  fp32 {model_args['arch']} train step (batch {batch}) takes, patches/s", f"{step:.1f}")
    return out | {"cache_train_step_patches_s_fp32": step, "cache_train_step_batch": batch}


def cache_memory(folder: Path, cache: Path, size: str) -> dict:
    """PSS and USS of the set in 1 process and in 2 at once, mapped against decoded into memory
    (measured first: each row's ratio needs it)."""
    if not Path("/proc/self/smaps_rollup").exists():
        row("memory of 1 and 2 processes", "skipped", "no smaps_rollup (Linux 4.14+)")
        return {}
    gb = {(mode, n): held_memory(folder, cache_dir, processes=n)
          for n in (1, 2) for mode, cache_dir in (("memory", "none"), ("mapped", cache))}
    out = {f"cache_{kind}_gb_{n}p_{mode}": gb[mode, n][kind] for mode, n in gb for kind in ("pss", "uss")}
    row(f"memory, GB ({size}): 1 process, PSS", *(f"{gb[m, 1]['pss']:.2f}" for m in ("mapped", "memory")))
    row("  1 process, USS (private)", *(f"{gb[m, 1]['uss']:.2f}" for m in ("mapped", "memory")))
    row("  2 processes at once, PSS summed", *(f"{gb[m, 2]['pss']:.2f}" for m in ("mapped", "memory")))
    row("  2 processes at once, USS summed", *(f"{gb[m, 2]['uss']:.2f}" for m in ("mapped", "memory")))
    for mode in ("mapped", "memory"):
        out[f"cache_pss_2p_over_1p_{mode}"] = gb[mode, 2]["pss"] / gb[mode, 1]["pss"]
    row("  2 processes / 1 (PSS)", *(f"{out[f'cache_pss_2p_over_1p_{m}']:.2f}x" for m in ("mapped", "memory")))
    return out


def held_memory(folder: Path, cache_dir, processes: int) -> dict:
    """PSS and USS (GB) of the set in `processes` children holding it at once, summed: their
    memory with the set, less after their imports, both read while all of them are alive (the
    libraries they share count the same in both)."""
    procs = [subprocess.Popen([sys.executable, "-c", HOLD_SET, str(folder), str(cache_dir)], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO)
             for _ in range(processes)]
    try:
        before = memory_when(procs, "ready")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        after = memory_when(procs, "done")
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return {kind: (after[kind] - before[kind]) / 1e9 for kind in before}


def memory_when(procs: list[subprocess.Popen], word: str) -> dict:
    """Once every child has said `word`: their PSS and USS (bytes), summed."""
    for p in procs:
        if p.stdout.readline().strip() != word:
            raise RuntimeError(f"a child holding the set failed (exit {p.wait()})")
    total = {"pss": 0, "uss": 0}
    for p in procs:
        with open(f"/proc/{p.pid}/smaps_rollup") as f:
            kb = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f) if v.strip().endswith("kB")}
        total["pss"] += kb["Pss"] * 1024
        total["uss"] += (kb["Private_Clean"] + kb["Private_Dirty"]) * 1024
    return total


# Per memory cgroup version: its root, the limit, the swap limit (set too, so that a process over the
# limit is killed, not swapped), the peak charged, the file that counts OOM kills.
CGROUP_FILES = {"cgroup v2": ("/sys/fs/cgroup", "memory.max", "memory.swap.max", "memory.peak", "memory.events"),
                "cgroup v1": ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.memsw.limit_in_bytes",
                              "memory.max_usage_in_bytes", "memory.oom_control")}


class LimitedRun(NamedTuple):
    result: subprocess.CompletedProcess
    peak: int | None  # bytes charged at most, where the kernel says
    oom_kills: int


def cgroup_version() -> str:
    """The memory cgroup version here, 'cgroup v2' or 'cgroup v1'; OSError saying why there is none."""
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        if "memory" not in Path("/sys/fs/cgroup/cgroup.subtree_control").read_text().split():
            raise OSError("cgroup v2 without the memory controller for child groups")
        return "cgroup v2"
    if Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists():
        return "cgroup v1"
    raise OSError("no memory cgroup (/sys/fs/cgroup)")


def run_limited(command: list[str], version: str, limit: int | None, env: dict) -> LimitedRun:
    """`command` in a memory cgroup of its own, limited to `limit` bytes (None: no limit), removed
    after; OSError where the cgroup can't be made (not root, a read-only /sys)."""
    root, limit_file, swap_file, peak_file, events_file = CGROUP_FILES[version]
    group = Path(root) / f"resshuffle-bench-{os.getpid()}"
    group.mkdir()
    try:
        if limit is not None:
            (group / limit_file).write_text(str(limit))
            if (group / swap_file).exists():
                (group / swap_file).write_text("0" if version == "cgroup v2" else str(limit))
        # The shell moves itself into the group, then becomes the command: only it is limited.
        result = subprocess.run(["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(group), *command],
                                capture_output=True, text=True, cwd=REPO, env=env, check=False)
        peak = int((group / peak_file).read_text()) if (group / peak_file).exists() else None
        kills = [int(line.split()[1]) for line in (group / events_file).read_text().splitlines()
                 if line.startswith("oom_kill ")]
    finally:
        remove_cgroup(group)
    return LimitedRun(result, peak, sum(kills))


def remove_cgroup(group: Path) -> None:
    """rmdir, once the kernel has let go of the process that ran in it."""
    for _ in range(50):
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    print(f"{Path(sys.argv[0]).name}: could not remove the cgroup {group}", file=sys.stderr, flush=True)


def cache_limit(device, tmp: Path, cache: Path, plan: CachePlan) -> dict:
    """train.py from the mapped cache, then with --data_cache none, each in a memory cgroup limited
    to train.py's own peak (on the distinct images alone) plus half the set: the first should
    finish, the second be killed. Skipped, saying why, where no memory cgroup can be made."""
    (tmp / "val").mkdir()
    Image.fromarray(load_rgb(list_images(tmp / "distinct")[0])[:256, :256]).save(tmp / "val" / "0.png")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "home"), "MPLCONFIGDIR": str(tmp / "home")}  # not the user's
    try:
        version = cgroup_version()
        own = run_limited(train_command(device, tmp, tmp / "distinct", "none", "own", images=plan.distinct), version,
                          limit=None, env=env)
        if own.result.returncode:
            raise OSError(f"train.py failed (exit {own.result.returncode}): {last_line(own.result.stderr)}")
    except OSError as e:
        row("train.py under a memory limit", "skipped", str(e))
        return {"cache_limit_skipped": str(e)}
    allowance = own.peak or 10 ** 9  # v2 before Linux 5.19 has no memory.peak: allow 1 GB
    limit = allowance + set_bytes(plan) // 2
    evict(cache)  # the set is read from disk inside the limit, as a set larger than memory is
    runs = {name: run_limited(train_command(device, tmp, tmp / "set", data_cache, name, images=plan.images), version,
                              limit, env) for name, data_cache in (("mapped", cache), ("memory", "none"))}
    return limit_rows(runs, limit, allowance, version, plan)


def limit_rows(runs: dict, limit: int, allowance: int, version: str, plan: CachePlan) -> dict:
    """The rows of cache_limit and its figures."""
    what = {name: limited_outcome(run) for name, run in runs.items()}
    row(f"train.py, {version} limit {limit / 1e9:.2f} GB ({plan.images} 2K images)", what["mapped"], what["memory"])
    row(f"  the limit: train.py's own peak {allowance / 1e9:.2f} GB + half the set", "")
    rate, peak = train_rate(runs["mapped"].result.stdout), runs["mapped"].peak
    row("  mapped: train.py's patches/s, read from disk", f"{rate:.0f}" if rate else "?")
    row("  mapped: its peak charged to the cgroup, GB", f"{peak / 1e9:.2f}" if peak else "?")
    return {"cache_limit_gb": limit / 1e9, "cache_limit_mechanism": version, "cache_limit_mapped": what["mapped"],
            "cache_limit_memory": what["memory"], "cache_limit_mapped_patches_s": rate,
            "cache_limit_mapped_peak_gb": peak / 1e9 if peak else None}


def limited_outcome(run: LimitedRun) -> str:
    """'finished', 'killed (SIGKILL) by the limit', 'exit 1'."""
    code = run.result.returncode
    if code == 0:
        return "finished"
    if code < 0:
        return f"killed ({signal.Signals(-code).name}){' by the limit' if run.oom_kills else ''}"
    return f"exit {code}: {last_line(run.result.stderr)}"


def train_command(device, tmp: Path, folder: Path, data_cache, name: str, images: int) -> list[str]:
    """train.py for one epoch of at least 4 steps, every image read, on the smallest network: the
    run is about the data's memory, and ResShuffle's steps would take minutes on a CPU."""
    per_image = -(-4 * BATCH // images)
    return [sys.executable, "train.py", "--train_dir", str(folder), "--val_dir", str(tmp / "val"),
            "--checkpoint_dir", str(tmp / "runs"), "--run_name", name, "--data_cache", str(data_cache),
            "--arch", "espcn", "--num_epochs", "1", "--patches_per_image", str(per_image), "--batch_size", str(BATCH),
            "--device", str(device), "--precision", "fp32", "--num_workers", "2", "--patience", "0"]


def train_rate(stdout: str) -> float | None:
    """Patches/s of train.py's epoch, from its lines 'train: ..., 14 steps of 16' and 'epoch 1: ..., 1.2 s'
    (validation of one small image included)."""
    steps = re.search(r"(\d+) steps of (\d+)", stdout)
    seconds = re.search(r"^epoch 1: .*, ([\d.]+) s$", stdout, re.MULTILINE)
    if not steps or not seconds or float(seconds[1]) == 0:
        return None
    return int(steps[1]) * int(steps[2]) / float(seconds[1])


def evict(cache: Path) -> None:
    """Drop the cache files' pages from the page cache (no process maps them now)."""
    for path in cache.glob("*.cache"):
        with open(path, "rb") as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def last_line(text: str) -> str:
    return (text.strip().splitlines() or ["?"])[-1]


def measure(device, quick: bool, model_args: dict, loss: WeightedLoss, precision: str) -> dict:
    """The table, a row at a time; every figure, for benchmark.py to write where --json says
    (`precision`: the one benchmark.py measures beside fp32, recorded there; the training step
    here runs in fp32)."""
    figures = run_figures(device, precision, model_args["arch"], loss.spec, quick, data_cache=True)
    header(figures, "data cache", ("mapped", "in memory", "ratio"))
    return figures | bench_data_cache(device, CACHE_QUICK if quick else CACHE_FULL, model_args, loss)


def sizes() -> str:
    """The set's sizes, for --help."""
    return (f"{CACHE_FULL.images} 2K images ({set_bytes(CACHE_FULL) / 1e9:.1f} GB decoded; with --quick "
            f"{CACHE_QUICK.images}, {set_bytes(CACHE_QUICK) / 1e9:.1f} GB)")
