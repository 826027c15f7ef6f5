"""ONNX export of a network (model.NETWORKS): any batch, height and width (dynamic axes), fp32.

Optional: needs `pip install onnx onnxscript` to export and onnxruntime to run the file.
"""
import contextlib
import importlib
import io
import json
from pathlib import Path

import torch

from utils import UserError

from .files import atomic_path

OPTIONAL = "pip install onnx onnxscript onnxruntime"


def export_onnx(model: torch.nn.Module, path: Path, metadata: dict) -> None:
    """Write `model` (on the CPU, fp32) as ONNX with input `lr` (N, 3, H, W) in [0, 1] and output
    `sr` (N, 3, scale H, scale W); `metadata` (model_args, ...) goes into the file's properties."""
    onnx = require_onnx()
    model = model.cpu().float().to(memory_format=torch.contiguous_format).eval()
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height", min=2), 3: torch.export.Dim("width", min=2)}
    with atomic_path(path) as tmp, contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its stages
        program = torch.onnx.export(model, (torch.rand(1, 3, 32, 32),), dynamo=True, dynamic_shapes={"x": dims},
                                    input_names=["lr"], output_names=["sr"])
        proto = program.model_proto
        onnx.helper.set_model_props(proto, {k: json.dumps(v) for k, v in metadata.items()})
        onnx.save(proto, str(tmp))


def require_onnx():
    """The onnx module, with onnxscript (torch's exporter needs it) installed; else a one-line error."""
    try:
        import onnx
        importlib.import_module("onnxscript")
    except ImportError as e:
        raise UserError(f"ONNX export needs the onnx and onnxscript packages ({e.name} is missing): "
                        f"{OPTIONAL}") from None
    return onnx


def onnx_session(path: Path):
    """An onnxruntime CPU session for an exported file, and the name of its input."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"running an ONNX file needs onnxruntime: {OPTIONAL}") from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session, session.get_inputs()[0].name
