"""One training step, and what train.py's loop keeps between steps: the EMA of the weights.

The step is here (`train_step`; its loss is losses.py's). train.py strings these into epochs; benchmark.py times
`train_step` exactly as train.py runs it (machinery/bench_tools.step_seconds).
"""
import torch

from losses import WeightedLoss
from machinery.precision import autocast

L1 = WeightedLoss("l1")


def train_step(model: torch.nn.Module, lr: torch.Tensor, hr: torch.Tensor, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, precision: str, loss: WeightedLoss = L1) -> torch.Tensor:
    """One optimisation step on a batch of (lr, hr) float patches on the model's device (dataset.device_batch).

    `loss` is the run's --loss (losses.py; L1 as the original's by default), computed in fp32;
    `precision` is machinery/precision.py's name (autocast of the network; the weights and the optimizer
    stay fp32). Returns [total, each term], left on the device (reading it waits for a GPU).
    """
    with autocast(lr.device, precision):
        sr = model(lr)
    terms = loss.terms(sr, hr)
    total = loss.total(terms)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    scaler.step(optimizer)
    scaler.update()
    return torch.cat([total.detach().view(1), terms.detach()])


def ema_decay_at(decay: float, t: int) -> float:
    """The EMA decay for update t (0-based): min(decay, (1 + t) / (10 + t)).

    Without the warm-up, the random initial weights keep decay ** t of the average (0.995:
    20% after 315 steps); with it, early updates follow the weights closely and the full
    decay applies once (1 + t) / (10 + t) exceeds it.
    """
    return min(decay, (1 + t) / (10 + t))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """Move each of `ema`'s parameters (1 - decay) of the way to `model`'s, in place."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
