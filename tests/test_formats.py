"""Weights in other formats: .safetensors exports (no pickle), the shipped checkpoint in both
formats, torch.hub from a clone."""
import json

import numpy as np
import pytest
import safetensors.torch
import torch

import infer
import train
from conftest import ROOT, TINY_RUN, ResShuffle, assert_one_line_error, run_main, smooth_image
from machinery import checkpoint as checkpoint_module
from machinery.checkpoint import SHIPPED, load_checkpoint, load_model, shipped_checkpoint
from machinery.onnx_export import onnx_session
from machinery.upscale import upscale
from utils import UserError

X4 = shipped_checkpoint(4)  # the checkpoint infer.py and evaluate.py use by default


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """A finished run with EMA weights: its best.pt."""
    from conftest import make_images
    root = tmp_path_factory.mktemp("ema")
    images = make_images(root / "images")
    code, _, err = run_main(train, "--train_dir", images, "--val_dir", images, "--checkpoint_dir", root, *TINY_RUN,
                            "--run_name", "r", "--num_epochs", "1", "--ema", "0.5")
    assert code == 0, err
    return root / "r" / "best.pt"


@pytest.mark.parametrize("raw_weights", [False, True])
def test_a_safetensors_export_gives_the_same_outputs_as_the_pt(ema_run, tmp_path, raw_weights):
    for name in ("w.pt", "w.safetensors"):
        assert run_main(train, "--export", ema_run, tmp_path / name)[0] == 0
    img = smooth_image(np.random.default_rng(0), 24, 30)
    outputs = []
    for name in ("w.pt", "w.safetensors"):
        model, info = load_model(tmp_path / name, torch.device("cpu"), raw_weights=raw_weights)
        assert info["weights"] == ("raw" if raw_weights else "ema") and info["degradation"] == "pil"
        outputs.append(upscale(model, img))
    np.testing.assert_array_equal(*outputs)


def test_a_safetensors_file_loads_without_any_pickle(ema_run, tmp_path, monkeypatch):
    assert run_main(train, "--export", ema_run, tmp_path / "w.safetensors")[0] == 0
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (pickle) was called"))
    loaded = load_checkpoint(tmp_path / "w.safetensors")
    assert loaded["model_args"]["num_features"] == 8 and loaded["ema"] is not None
    metadata = safetensors.safe_open(str(tmp_path / "w.safetensors"), framework="pt").metadata()
    assert json.loads(metadata["model_args"]) == loaded["model_args"]


def test_the_shipped_checkpoint_holds_the_same_weights_in_both_formats():
    assert X4.suffix == ".safetensors"
    st, pt = load_checkpoint(X4), load_checkpoint(X4.with_suffix(".pt"))
    assert st["model_args"] == pt["model_args"] and st["degradation"] == pt["degradation"]
    assert pt["model"] is not None
    for kind in ("model", "ema"):  # the EMA where the run kept one
        a, b = st.get(kind) or {}, pt.get(kind) or {}
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


def test_bad_safetensors_files_are_one_line(tmp_path, ema_run):
    no_args = tmp_path / "no_args.safetensors"
    safetensors.torch.save_file({"model.head.0.weight": torch.zeros(2)}, str(no_args), metadata={"format": "x"})
    with pytest.raises(UserError, match="not a ResShuffle safetensors file"):
        load_checkpoint(no_args)
    torn = tmp_path / "torn.safetensors"
    assert run_main(train, "--export", ema_run, torn)[0] == 0
    torn.write_bytes(torn.read_bytes()[:2000])
    img = tmp_path / "a.png"
    from PIL import Image
    Image.fromarray(smooth_image(np.random.default_rng(0), 10, 10)).save(img)
    code, _, err = run_main(infer, img, "--checkpoint", torn)
    assert_one_line_error(code, err, "torn.safetensors: not a ResShuffle safetensors file")
    assert not (tmp_path / "a_x4.png").exists()


def test_a_safetensors_export_cannot_be_resumed(ema_run, tmp_path):
    out = tmp_path / "w.safetensors"
    assert run_main(train, "--export", ema_run, out)[0] == 0
    (tmp_path / "run").mkdir()
    last = tmp_path / "run" / "last.pt"
    last.write_bytes(out.read_bytes())
    code, _, err = run_main(train, "--resume", last)
    assert_one_line_error(code, err, "holds weights only")


def test_is_safetensors_reads_the_header_only():
    assert checkpoint_module.is_safetensors((12).to_bytes(8, "little") + b"{")
    assert not checkpoint_module.is_safetensors(b"PK\x03\x04" + bytes(5))
    assert not checkpoint_module.is_safetensors(bytes(9))


def test_torch_hub_loads_the_shipped_network_offline_from_the_clone(monkeypatch):
    monkeypatch.setenv("TORCH_HOME", "/nonexistent-torch-home")  # nothing cached, nothing downloaded
    net = torch.hub.load(str(ROOT), "resshuffle", scale=4, pretrained=True, source="local")
    expected, _ = load_model(X4, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), expected.state_dict().values()))
    assert not net.training
    fresh = torch.hub.load(str(ROOT), "resshuffle", scale=2, pretrained=False, source="local")
    assert fresh.scale == 2
    same = torch.hub.load(str(ROOT), "resshuffle", scale=4, pretrained=True, source="local", mean_shift=True)
    assert same.scale == 4
    with pytest.raises(ValueError, match="scale must be an int .2, 3, 4 or 8., got float 4.0"):
        torch.hub.load(str(ROOT), "resshuffle", scale=4.0, pretrained=True, source="local")
    with pytest.raises(ValueError, match="not resshuffle x8"):
        torch.hub.load(str(ROOT), "resshuffle", scale=8, pretrained=True, source="local")
    with pytest.raises(ValueError, match="other model_args"):
        torch.hub.load(str(ROOT), "resshuffle", scale=4, pretrained=True, source="local", num_features=32)
    for scale in SHIPPED["resshuffle"]:
        shipped = torch.hub.load(str(ROOT), "resshuffle", scale=scale, pretrained=True, source="local")
        expected, _ = load_model(checkpoint_module.shipped_checkpoint(scale), torch.device("cpu"))
        assert shipped.scale == scale and torch.equal(shipped.tail.weight, expected.tail.weight)


@pytest.mark.parametrize("scale", [2, 3, 4, 8])
def test_an_onnx_export_takes_any_size_and_matches_pytorch(tmp_path, scale):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from skimage.data import astronaut
    args = dict(scale=scale, num_features=8, num_residuals=2, mean_shift=True, image_skip=scale == 4)
    torch.manual_seed(scale)
    src = tmp_path / "x.pt"
    checkpoint_module.save_checkpoint({"model": ResShuffle(**args).state_dict(), "model_args": args}, src)
    code, _, err = run_main(train, "--export", src, tmp_path / "x.onnx")
    assert code == 0, err
    with pytest.raises(UserError, match="an ONNX export, which onnxruntime runs .docs/formats.md.; infer.py and"):
        load_checkpoint(tmp_path / "x.onnx")  # what infer.py --checkpoint x.onnx says
    model, _ = load_model(src, torch.device("cpu"))
    session, name = onnx_session(tmp_path / "x.onnx")
    photo = torch.from_numpy(astronaut()[100:311, 50:383].copy()).permute(2, 0, 1).float().div(255)  # 333x211
    for batch in (photo[None], torch.stack([photo[:, :37, :50], photo[:, 40:77, :50]])):
        with torch.no_grad():
            expected = model(batch).numpy()
        out = session.run(None, {name: batch.numpy()})[0]
        assert out.shape == (len(batch), 3, batch.shape[2] * scale, batch.shape[3] * scale)
        assert np.abs(out - expected).max() < 1e-4


def onnx_properties(path):
    """The metadata an export wrote into the .onnx file, decoded from JSON."""
    import onnx
    return {p.key: json.loads(p.value) for p in onnx.load(str(path)).metadata_props}


def test_the_shipped_network_exports_to_onnx_within_1e_4(tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from skimage.data import astronaut
    code, _, err = run_main(train, "--export", X4, tmp_path / "x4.onnx")
    assert code == 0, err
    props = onnx_properties(tmp_path / "x4.onnx")
    model, info = load_model(X4, torch.device("cpu"))
    assert props["weights"] == info["weights"] and props["model_args"]["num_residuals"] == 16
    photo = torch.from_numpy(astronaut()[100:311, 50:383].copy()).permute(2, 0, 1)[None].float().div(255)
    session, name = onnx_session(tmp_path / "x4.onnx")
    with torch.no_grad():
        assert np.abs(session.run(None, {name: photo.numpy()})[0] - model(photo).numpy()).max() < 1e-4


def test_an_onnx_export_of_an_ema_run_holds_the_ema_weights(ema_run, tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    assert run_main(train, "--export", ema_run, tmp_path / "e.onnx")[0] == 0
    props = onnx_properties(tmp_path / "e.onnx")
    assert props["weights"] == "ema"
    photo = torch.from_numpy(smooth_image(np.random.default_rng(1), 20, 28)).permute(2, 0, 1)[None].float().div(255)
    session, name = onnx_session(tmp_path / "e.onnx")
    out = session.run(None, {name: photo.numpy()})[0]
    with torch.no_grad():
        for raw_weights, close in ((False, True), (True, False)):
            model, _ = load_model(ema_run, torch.device("cpu"), raw_weights=raw_weights)
            assert (np.abs(out - model(photo).numpy()).max() < 1e-4) == close


def test_onnx_export_without_the_package_is_one_line(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    code, _, err = run_main(train, "--export", X4, tmp_path / "new" / "x4.onnx")
    assert_one_line_error(code, err,
                          "ONNX export needs the onnx and onnxscript packages (onnx is missing): pip install")
    assert not (tmp_path / "new").exists()


def test_an_export_to_an_unknown_suffix_is_refused(ema_run, tmp_path):
    for name in ("w.safetensor", "w", "w.txt"):
        code, _, err = run_main(train, "--export", ema_run, tmp_path / name)
        assert_one_line_error(code, err, "the export's format comes from its suffix: .safetensors, .pt, .pth, .onnx")
        assert not (tmp_path / name).exists()


def test_a_pt_file_named_safetensors_loads_by_what_it_holds(tmp_path):
    renamed = tmp_path / "x4.safetensors"
    renamed.write_bytes(X4.with_suffix(".pt").read_bytes())
    assert load_checkpoint(renamed)["model_args"] == load_checkpoint(X4)["model_args"]
