"""Which floating-point precision the network runs in (--precision), decided per device at run time.

fp32 is exact and the same everywhere. bf16 autocast halves the bytes each convolution moves and,
where the processor has bf16 instructions, runs them natively: a CPU with AVX512-BF16 or AMX,
a GPU of compute capability 8.0 or newer. fp16 needs loss scaling in training (GradScaler); it is
what older GPUs run natively. The machines this runs on differ from day to day, so `auto` asks
the hardware each time. It does not time a convolution both ways: on a shared 2-core machine such
a probe said bf16 was 2.2x as fast one minute and 0.66x the next, and a run's precision should
not depend on what else the machine was doing at its start (benchmark.py measures the ratio).
"""
import torch

from utils import warn

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_bf16_instructions() -> str | None:
    """The CPU's native bf16 instructions ('AMX' or 'AVX512-BF16'), by torch's own query; None."""
    checks = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
    return next((name for name, query in checks if getattr(torch.cpu, query, lambda: False)()), None)


def choose_precision(requested: str, device: torch.device, source: str = "--precision") -> tuple[str, str]:
    """(precision, why): `requested` itself, or what `auto` picks for `device`.

    `why` is a short reason for the log line. A precision the device only emulates warns,
    naming where it came from (`source`: the flag, or a resumed run's own precision).
    """
    if requested != "auto":
        if requested not in native_precisions(device):
            warn(f"{source} {requested}: {device} has no native {requested}, which it emulates (slower than fp32)")
        return requested, "asked for"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) >= (8, 0):
            return "bf16", f"auto: compute capability {major}.{minor} runs bf16 natively"
        return "fp16", f"auto: compute capability {major}.{minor}, fp16 natively (bf16 would be emulated)"
    if device.type != "cpu":
        return "fp32", f"auto: fp32 on {device.type}"
    instructions = cpu_bf16_instructions()
    if instructions is None:
        return "fp32", "auto: this CPU has no bf16 instructions (AVX512-BF16 or AMX)"
    return "bf16", f"auto: this CPU runs bf16 natively ({instructions})"


def native_precisions(device: torch.device) -> set[str]:
    """The precisions `device` runs natively: fp32, and bf16 and/or fp16."""
    if device.type == "cuda":
        return {"fp32", "fp16", "bf16"} if torch.cuda.get_device_capability(device) >= (8, 0) else {"fp32", "fp16"}
    return {"fp32", "bf16"} if device.type == "cpu" and cpu_bf16_instructions() else {"fp32"}


def autocast(device: torch.device, precision: str):
    """The autocast context for `precision` on `device` (disabled for fp32)."""
    return torch.autocast(device.type, dtype=DTYPES[precision], enabled=DTYPES[precision] is not None)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for fp16 training (its gradients underflow without it); a no-op otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def load_scaler_state(scaler: torch.amp.GradScaler, state: dict | None) -> None:
    """Restore a GradScaler where both sides scale: an fp32 or bf16 run saves an empty state,
    which an fp16 scaler refuses ("The source state dict is empty"); it then starts afresh."""
    if state and scaler.is_enabled():
        scaler.load_state_dict(state)
