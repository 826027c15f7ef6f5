"""How a network is trained: the recipes by name, one training step, and the EMA of the weights.

A recipe (`RECIPES`, train.py --recipe NAME) is the optimizer, the learning-rate schedule, the
initialisation, the EMA and the patch and batch plan; the step is `train_step` (its loss is
losses.py's). train.py strings steps into epochs; benchmark.py times `train_step` with a recipe's
optimizer exactly as train.py runs it (machinery/bench_tools.step_seconds).
"""
import math

import torch

from losses import WeightedLoss
from machinery.precision import autocast
from model import ResidualBlock

# Training recipes by name: adding one is one entry (docs/extending.md). Keys named as train.py's
# flags (lr, step_size, gamma, batch_size, patch_size, patches_per_image, ema, num_epochs, and the
# network options mean_shift, image_skip) set those flags' values; a flag typed beside --recipe
# overrides its key. The rest say how to build what the flags don't:
#   optimizer: "adam" or "adamw", with betas and weight_decay;
#   schedule: "step" (StepLR: x gamma every step_size epochs) or "cosine" (from lr down to
#     min_lr_ratio x lr over the run's steps, num_epochs x steps per epoch), after warmup_steps
#     steps rising linearly from lr / warmup_steps;
#   init: "default" (PyTorch's), or "zero_residual": the last conv of every residual block
#     starts at zero, so the network starts as its skip paths.
RECIPES = {
    # The original ResShuffle README's: Adam at 2e-4, halved every 50 epochs, batch 32 (train.py's defaults).
    "seed": {"optimizer": "adam", "betas": (0.9, 0.999), "weight_decay": 0.0, "schedule": "step",
             "warmup_steps": 0, "min_lr_ratio": 0.0, "init": "default",
             "lr": 2e-4, "step_size": 50, "gamma": 0.5, "batch_size": 32, "patches_per_image": 20, "ema": 0.0},
    # The shipped checkpoints' (docs/shipped-checkpoints.md): Adam at 5e-4 halved every 20 epochs of
    # 105 steps on the 84 training photos, batch 16, mean shift and the bicubic image skip, 60 epochs.
    "shipped": {"optimizer": "adam", "betas": (0.9, 0.999), "weight_decay": 0.0, "schedule": "step",
                "warmup_steps": 0, "min_lr_ratio": 0.0, "init": "default",
                "lr": 5e-4, "step_size": 20, "gamma": 0.5, "batch_size": 16, "patches_per_image": 20, "ema": 0.0,
                "num_epochs": 60, "mean_shift": True, "image_skip": True},
}
DEFAULT_RECIPE = "seed"

# The keys every recipe has that no flag sets: kept in a run's checkpoint, so that a resume builds
# the same optimizer and schedule even where RECIPES has since changed.
HOW_KEYS = ("optimizer", "betas", "weight_decay", "schedule", "warmup_steps", "min_lr_ratio", "init")


def recipe_how(name: str) -> dict:
    """The part of recipe `name` that no flag sets (HOW_KEYS)."""
    return {key: RECIPES[name][key] for key in HOW_KEYS}


def make_optimizer(model: torch.nn.Module, how: dict, lr: float) -> torch.optim.Optimizer:
    """The recipe's optimizer over `model`'s parameters, at learning rate `lr`."""
    kinds = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if how["optimizer"] not in kinds:
        raise ValueError(f"unknown optimizer {how['optimizer']!r}: use {' or '.join(kinds)}")
    return kinds[how["optimizer"]](model.parameters(), lr=lr, betas=tuple(how["betas"]),
                                   weight_decay=how["weight_decay"])


def make_schedule(optimizer: torch.optim.Optimizer, how: dict, *, step_size: int, gamma: float,
                  total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The recipe's learning-rate schedule. StepLR is stepped once an epoch (`steps_per_call` says
    so); the cosine schedule, with or without warmup, once a step."""
    if how["schedule"] == "step" and not how["warmup_steps"]:
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    if how["schedule"] != "cosine":
        raise ValueError(f"unknown schedule {how['schedule']!r} (with warmup: cosine only); use step or cosine")
    warmup, floor = how["warmup_steps"], how["min_lr_ratio"]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def steps_per_call(how: dict) -> str:
    """When the schedule is stepped: "epoch" (StepLR) or "step"."""
    return "epoch" if how["schedule"] == "step" else "step"


@torch.no_grad()
def initialise(model: torch.nn.Module, how: dict) -> None:
    """The recipe's initialisation, on a freshly built network."""
    if how["init"] == "zero_residual":
        for block in model.modules():
            if isinstance(block, ResidualBlock):
                block.conv2.weight.zero_()
                block.conv2.bias.zero_()
    elif how["init"] != "default":
        raise ValueError(f"unknown init {how['init']!r}: use default or zero_residual")

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
