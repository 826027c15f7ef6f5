"""A training run to look at: curves.png (each validation metric against bicubic's, training loss,
learning rate) and, with --tensorboard, the same as TensorBoard scalars with validation crops as images.

train.py redraws `<run>/curves.png` from log.csv at every validation; plot.py draws any log.csv.
TensorBoard is optional: without the package, --tensorboard is a one-line error.
"""
import math
import threading
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: no display needed, none opened
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from metrics import METRICS  # noqa: E402
from resize import resize_bicubic  # noqa: E402
from utils import UserError  # noqa: E402

from .files import SPACE_ERRORS, atomic_path, free_space  # noqa: E402

CROP = 96  # HR side of the validation crops shown in TensorBoard
NOT_SCALARS = ("epoch", "seconds", "precision")  # log.csv columns TensorBoard does not plot


def write_curves(rows: list[dict], path: Path, title: str = "", bicubic_psnr: float | None = None) -> None:
    """Draw log.csv `rows` (runs.read_log) into the PNG `path`, atomically (`curves_figure`)."""
    fig = curves_figure(rows, title=title, bicubic_psnr=bicubic_psnr)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
    finally:
        plt.close(fig)


def curves_figure(rows: list[dict], title: str = "", bicubic_psnr: float | None = None) -> plt.Figure:
    """log.csv `rows` drawn: one panel per metric (validation against bicubic's, from the log's
    bicubic_<metric> column; `bicubic_psnr` overrides PSNR's), the training loss (and each term of
    a sum), the learning rate."""
    def series(key):
        points = [(int(r["epoch"]), float(r[key])) for r in rows if r.get(key)]
        return [p[0] for p in points], [p[1] for p in points]

    fig, axes = plt.subplots(1, len(METRICS) + 2, figsize=(4.4 * (len(METRICS) + 2), 3.6), constrained_layout=True)
    for ax, (name, metric) in zip(axes, METRICS.items()):
        ax.plot(*series(f"val_{name}"), marker=".", label="network")
        bicubic = bicubic_psnr if name == "psnr" and bicubic_psnr is not None else next(
            (float(r[f"bicubic_{name}"]) for r in reversed(rows) if r.get(f"bicubic_{name}")), None)
        if bicubic is not None and math.isfinite(bicubic):
            ax.axhline(bicubic, color="gray", linestyle="--", label=f"bicubic {bicubic:.4g}")
        ax.set(title=f"validation {metric.label}{f' ({metric.unit})' if metric.unit else ''}", xlabel="epoch")
        legend_below(ax)
    loss_ax, lr_ax = axes[-2:]
    loss_ax.plot(*series("loss"), color="tab:red", label="loss")
    terms = [k for k in rows[0] if k.startswith("loss_")] if rows else []
    for key in terms if len(terms) > 1 else []:
        loss_ax.plot(*series(key), label=key[len("loss_"):], linewidth=1)
    loss_ax.set(title="training loss", xlabel="epoch")
    if len(terms) > 1:
        legend_below(loss_ax)
    lr_ax.plot(*series("lr"), color="tab:green")
    lr_ax.set(title="learning rate", xlabel="epoch", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no tick at 1.25
    if title:
        fig.suptitle(title)
    return fig


def legend_below(ax) -> None:
    """The panel's legend under it, beside the epoch label: inside, any corner is where some run's
    curves end (the last point is the one looked at)."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=3, fontsize="small", frameon=False)


def tensorboard_writer():
    """TensorBoard's SummaryWriter class; without the package, a one-line error (train.py asks
    before any work)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def open_tensorboard(folder: Path):
    """A TensorBoard writer for <run>/tensorboard."""
    if not getattr(threading.excepthook, "quiets_tensorboard", False):
        threading.excepthook = quiet_event_writer(threading.excepthook)
    return tensorboard_writer()(log_dir=str(folder / "tensorboard"))


def quiet_event_writer(previous):
    """A threading.excepthook that passes on everything but a failed write in TensorBoard's writer
    thread (a full disk): that thread would print a traceback, and the next flush raises the same
    error where log_to_tensorboard says it in one line."""
    def hook(args):
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard.")):
            previous(args)
    hook.quiets_tensorboard = True
    return hook


def log_to_tensorboard(writer, epoch: int, row: dict, panels: list) -> None:
    """One log.csv row as scalars, and (name, HWC uint8) validation panels as images."""
    try:
        for key, value in row.items():
            if key not in NOT_SCALARS and value:
                writer.add_scalar(key, float(value), epoch)
        for name, panel in panels:
            writer.add_image(f"val/{name}", panel, epoch, dataformats="HWC")
        writer.flush()
    except OSError as e:
        space = f"; {free_space(Path(writer.log_dir))}" if e.errno in SPACE_ERRORS else ""
        raise UserError(f"{writer.log_dir}: TensorBoard events could not be written "
                        f"({e.strerror or e}{space})") from None


def crop_panel(lr: np.ndarray, sr: np.ndarray, hr: np.ndarray) -> np.ndarray:
    """bicubic | SR | HR on the same central crop, side by side (HWC uint8)."""
    side = min(CROP, hr.shape[0], hr.shape[1])
    y, x = (hr.shape[0] - side) // 2, (hr.shape[1] - side) // 2
    bicubic = resize_bicubic(lr, hr.shape[1], hr.shape[0])
    return np.concatenate([img[y:y + side, x:x + side] for img in (bicubic, sr, hr)], axis=1)
