"""torch.hub from a clone never meets a caller's own modules of the same names (utils.py, model.py, machinery/)."""
import sys
import textwrap

import pytest

from conftest import ROOT, run_script

CALLER = """
    import sys
    import torch
    import utils, model, machinery          # the caller's own, imported before the load
    net = torch.hub.load({root!r}, "resshuffle", scale=4, pretrained=True, source="local")
    espcn = torch.hub.load({root!r}, "network", arch="espcn", scale=4, source="local")
    again = torch.hub.load({root!r}, "resshuffle", scale=2, pretrained=False, source="local")
    import utils as utils_after, model as model_after, machinery as machinery_after
    import dataset                          # the caller's own, imported only after the load
    plain = {{"metrics", "resize", "losses", "training"}} | {{m for m in sys.modules if m.startswith("machinery.")}}
    print("networks", type(net).__name__, type(espcn).__name__, type(again).__name__,
          tuple(net(torch.rand(1, 3, 8, 8)).shape))
    print("caller", utils.WHO, model.WHO, machinery.WHO, utils_after is utils, model_after is model,
          machinery_after is machinery, dataset.WHO)
    print("leaked", sorted(plain & set(sys.modules)))
"""


@pytest.mark.slow
def test_hub_loads_beside_a_callers_own_utils_and_model_and_leaves_them_alone(tmp_path):
    for name in ("utils", "model", "dataset"):
        (tmp_path / f"{name}.py").write_text(f"WHO = 'caller {name}'\n")
    (tmp_path / "machinery").mkdir()  # a package of the caller's own, named as this repository's
    (tmp_path / "machinery" / "__init__.py").write_text("WHO = 'caller machinery'\n")
    (tmp_path / "caller.py").write_text(textwrap.dedent(CALLER.format(root=str(ROOT))))
    out = run_script("caller.py", cwd=tmp_path).stdout.splitlines()
    assert out[0] == "networks ResShuffle ESPCN ResShuffle (1, 3, 32, 32)"
    assert out[1] == "caller caller utils caller model caller machinery True True True caller dataset"
    assert out[2] == "leaked []"


def test_hub_uses_this_repositorys_modules_where_the_caller_imported_them(monkeypatch):
    import torch

    import model
    monkeypatch.setitem(model.NETWORKS, "espcn_alias", model.ESPCN)  # a registration the caller made
    net = torch.hub.load(str(ROOT), "network", arch="espcn_alias", scale=2, pretrained=False, source="local")
    assert type(net) is model.ESPCN and sys.modules["model"] is model
