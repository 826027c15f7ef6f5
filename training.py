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
# flags (RECIPE_FLAGS) set those flags' values; a flag typed beside --recipe overrides its key.
# The rest (HOW_KEYS) say how to build what the flags don't:
#   optimizer: "adam", "adamw" or "muon" (`Muon`: the hidden convs' weights on Muon, the rest on
#     AdamW), with betas and weight_decay;
#   schedule: "steplr" (x gamma every step_size epochs) or "cosine" (from lr down to
#     min_lr_ratio x lr over the run's first num_epochs x steps-per-epoch steps), after
#     warmup_steps steps rising linearly from lr / warmup_steps (cosine only);
#   init: "default" (PyTorch's), or "zero_residual": the last conv of every residual block
#     starts at zero, so the network starts as its skip paths;
#   clip_grad_norm: the gradients' largest global L2 norm before each step (0: not clipped).
RECIPES = {
    # The original ResShuffle README's: Adam at 2e-4, halved every 50 epochs, batch 32 (train.py's defaults).
    "seed": {"optimizer": "adam", "betas": (0.9, 0.999), "weight_decay": 0.0, "schedule": "steplr",
             "warmup_steps": 0, "min_lr_ratio": 0.0, "init": "default", "clip_grad_norm": 0.0,
             "lr": 2e-4, "step_size": 50, "gamma": 0.5, "batch_size": 32, "patches_per_image": 20, "ema": 0.0},
    # The x2, x3 and x4 shipped before the `fast` recipes (docs/shipped-checkpoints.md; x2 ran 75
    # epochs): Adam at 5e-4 halved every 20 epochs of 105 steps on the 84 training photos, batch 16, mean
    # shift and the bicubic image skip.
    "shipped": {"optimizer": "adam", "betas": (0.9, 0.999), "weight_decay": 0.0, "schedule": "steplr",
                "warmup_steps": 0, "min_lr_ratio": 0.0, "init": "default", "clip_grad_norm": 0.0,
                "lr": 5e-4, "step_size": 20, "gamma": 0.5, "batch_size": 16, "patches_per_image": 20, "ema": 0.0,
                "num_epochs": 60, "mean_shift": True, "image_skip": True},
    # The x3 and x4 shipped between `shipped` and `fast` (docs/recipes.md): a cosine schedule from 1e-3
    # (30 warm-up steps, down to 1%), residual blocks that start as their skip paths, AdamW, gradients
    # clipped at norm 0.5, and shipped's pixels cut into 32x32 LR patches, 18 a step (2,520 steps in 12
    # epochs); shipped's mean shift and image skip.
    "fast_adamw": {"optimizer": "adamw", "betas": (0.9, 0.99), "weight_decay": 1e-4, "schedule": "cosine",
                   "warmup_steps": 30, "min_lr_ratio": 0.01, "init": "zero_residual", "clip_grad_norm": 0.5,
                   "lr": 1e-3, "batch_size": 18, "lr_patch_size": 32, "patches_per_image": 45, "ema": 0.0,
                   "num_epochs": 12, "mean_shift": True, "image_skip": True},
    # The shipped x2's, x3's and x4's, measured against `shipped` at x4 (docs/recipes.md): fast_adamw with the
    # hidden convs' weights on Muon (`Muon`), in 10 epochs (2,100 steps at x4).
    "fast": {"optimizer": "muon", "betas": (0.9, 0.99), "weight_decay": 1e-4, "schedule": "cosine",
             "warmup_steps": 30, "min_lr_ratio": 0.01, "init": "zero_residual", "clip_grad_norm": 0.5,
             "lr": 1e-3, "batch_size": 18, "lr_patch_size": 32, "patches_per_image": 45, "ema": 0.0,
             "num_epochs": 10, "mean_shift": True, "image_skip": True},
    # The shipped ESPCN's (docs/ancestors.md): Adam on a cosine falling 100-fold, as its paper's 1e-2 to 1e-4,
    # but from 1e-3 (from 1e-2 Adam diverged); fast's 32x32 LR patches, 18 a step, for 60 epochs.
    "espcn": {"optimizer": "adam", "betas": (0.9, 0.999), "weight_decay": 0.0, "schedule": "cosine",
              "warmup_steps": 0, "min_lr_ratio": 0.01, "init": "default", "clip_grad_norm": 0.0,
              "lr": 1e-3, "batch_size": 18, "lr_patch_size": 32, "patches_per_image": 45, "ema": 0.0,
              "num_epochs": 60},
}
DEFAULT_RECIPE = "seed"

# The keys every recipe has that no flag sets: kept in a run's checkpoint (with the schedule's
# length, total_steps), so that a resume builds the same optimizer and schedule even where RECIPES
# has since changed.
HOW_KEYS = ("optimizer", "betas", "weight_decay", "schedule", "warmup_steps", "min_lr_ratio", "init",
            "clip_grad_norm")
# The train.py flags a recipe may set.
RECIPE_FLAGS = ("lr", "step_size", "gamma", "batch_size", "patch_size", "patches_per_image", "ema", "num_epochs",
                "mean_shift", "image_skip")
# A recipe's LR patch side, no flag: where --patch_size is not typed, train.py makes it this times the
# scale, so that one recipe serves x2 to x8 (--patch_size is the HR side).
LR_PATCH_KEY = "lr_patch_size"
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "muon": None}  # muon: make_optimizer
SCHEDULES = ("steplr", "cosine")
INITS = ("default", "zero_residual")


def recipe_how(name: str) -> dict:
    """The part of recipe `name` that no flag sets (HOW_KEYS)."""
    return {key: RECIPES[name][key] for key in HOW_KEYS}


def how_fault(how) -> str | None:
    """What is wrong with a recipe's HOW_KEYS part (a recipe's, or a run checkpoint's), in words; None
    where nothing is."""
    def number(v, low, high):
        return isinstance(v, int | float) and not isinstance(v, bool) and low <= v <= high  # NaN fails
    if not isinstance(how, dict) or set(how) - {"total_steps"} != set(HOW_KEYS):
        return f"not a table of {', '.join(HOW_KEYS)}"
    rules = {"optimizer": how["optimizer"] in OPTIMIZERS, "schedule": how["schedule"] in SCHEDULES,
             "init": how["init"] in INITS,
             "betas": isinstance(how["betas"], tuple | list) and len(how["betas"]) == 2 and all(
                 number(b, 0, 0.999999) for b in how["betas"]),
             "weight_decay": number(how["weight_decay"], 0, math.inf) and math.isfinite(how["weight_decay"]),
             "warmup_steps": number(how["warmup_steps"], 0, math.inf) and isinstance(how["warmup_steps"], int)
             and (how["warmup_steps"] == 0 or how["schedule"] == "cosine"),
             "min_lr_ratio": number(how["min_lr_ratio"], 0, 1),
             "clip_grad_norm": number(how["clip_grad_norm"], 0, math.inf) and math.isfinite(how["clip_grad_norm"]),
             "total_steps": "total_steps" not in how or isinstance(how["total_steps"], int) and how["total_steps"] > 0}
    bad = next((key for key, ok in rules.items() if not ok), None)
    return None if bad is None else f"its {bad} is {how.get(bad)!r}"


def make_optimizer(model: torch.nn.Module, how: dict, lr: float) -> torch.optim.Optimizer:
    """The recipe's optimizer over `model`'s parameters, at learning rate `lr`."""
    if how["optimizer"] == "muon":
        hidden = {id(p) for p in model.parameters() if p.ndim == 4 and min(p.shape[:2]) > 3}
        groups = [{"params": [p for p in model.parameters() if id(p) in hidden], "muon": True},
                  {"params": [p for p in model.parameters() if id(p) not in hidden], "muon": False}]
        return Muon(groups, lr=lr, betas=tuple(how["betas"]), weight_decay=how["weight_decay"])
    return OPTIMIZERS[how["optimizer"]](model.parameters(), lr=lr, betas=tuple(how["betas"]),
                                        weight_decay=how["weight_decay"])


def orthogonalise(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to g, roughly (its singular values land in about 0.7-1.1):
    Muon's quintic Newton-Schulz iteration, with Jordan et al.'s coefficients."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g / (g.norm() + 1e-7)
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024) for the groups marked `muon`, Adam for the others; both with
    decoupled weight decay (AdamW's).

    torch.optim.Muon takes 2-D weights only; a conv's (out, in, k, k) weight is here the (out,
    in * k * k) matrix it multiplies by. Each step moves it along its orthogonalised Nesterov
    momentum (every direction at the same rate, where Adam's steps follow a few), scaled by
    0.2 * sqrt(max(out, in * k * k)) so that its size matches an Adam step's at the same lr
    (Moonshot's "match_rms_adamw"): one lr serves both groups. make_optimizer gives Muon the
    hidden convs' weights, and Adam the biases and the RGB head and tail, as Muon's authors keep
    a network's input and output layers on Adam.
    """

    def __init__(self, groups, lr: float, betas: tuple[float, float], weight_decay: float, momentum: float = 0.95):
        super().__init__(groups, {"lr": lr, "betas": betas, "weight_decay": weight_decay, "momentum": momentum,
                                  "eps": 1e-8})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in (p for p in group["params"] if p.grad is not None):
                p.mul_(1 - group["lr"] * group["weight_decay"])
                (self.muon_step if group["muon"] else self.adam_step)(p, group)

    def muon_step(self, p: torch.Tensor, group: dict) -> None:
        g, momentum = p.grad, group["momentum"]
        buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(g))
        buf.mul_(momentum).add_(g)
        update = orthogonalise(g.add(buf, alpha=momentum).reshape(g.size(0), -1))
        p.add_(update.view_as(p), alpha=-group["lr"] * 0.2 * max(update.shape) ** 0.5)

    def adam_step(self, p: torch.Tensor, group: dict) -> None:
        g, state, (beta1, beta2) = p.grad, self.state[p], group["betas"]
        step = state.setdefault("step", torch.zeros(())).add_(1).item()  # a tensor, as torch's Adam keeps it
        m = state.setdefault("exp_avg", torch.zeros_like(g))
        v = state.setdefault("exp_avg_sq", torch.zeros_like(g))
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        m_hat, v_hat = m / (1 - beta1 ** step), v / (1 - beta2 ** step)
        p.addcdiv_(m_hat, v_hat.sqrt().add_(group["eps"]), value=-group["lr"])


def make_schedule(optimizer: torch.optim.Optimizer, how: dict, *, step_size: int,
                  gamma: float) -> torch.optim.lr_scheduler.LRScheduler:
    """The recipe's learning-rate schedule: StepLR, stepped once an epoch; or cosine (with its
    warmup), stepped once a step, over how["total_steps"]."""
    if how["schedule"] == "steplr":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    warmup, floor, total = how["warmup_steps"], how["min_lr_ratio"], how["total_steps"]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def stepped_every_batch(how: dict) -> bool:
    """Whether the schedule moves every step (cosine), not once an epoch (StepLR)."""
    return how["schedule"] != "steplr"


@torch.no_grad()
def initialise(model: torch.nn.Module, how: dict) -> None:
    """The recipe's initialisation, on a freshly built network."""
    if how["init"] == "zero_residual":
        blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
        if not blocks:
            raise ValueError(f"init zero_residual: the {type(model).__name__} network has no residual blocks")
        for block in blocks:
            block.conv2.weight.zero_()
            block.conv2.bias.zero_()


L1 = WeightedLoss("l1")


def train_step(model: torch.nn.Module, lr: torch.Tensor, hr: torch.Tensor, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, precision: str, loss: WeightedLoss = L1,
               clip_grad_norm: float = 0.0) -> torch.Tensor:
    """One optimisation step on a batch of (lr, hr) float patches on the model's device (dataset.device_batch).

    `loss` is the run's --loss (losses.py; L1 as the original's by default), computed in fp32;
    `precision` is machinery/precision.py's name (autocast of the network; the weights and the optimizer
    stay fp32). `clip_grad_norm` > 0 scales the gradients down to that global norm where they exceed
    it (the recipe's: a rare outsized batch then cannot throw Adam's steps off).
    Returns [total, each term], left on the device (reading it waits for a GPU).
    """
    with autocast(lr.device, precision):
        sr = model(lr)
    terms = loss.terms(sr, hr)
    total = loss.total(terms)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if clip_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
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
