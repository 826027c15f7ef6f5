"""Hostile input to training, losses, checkpoints, benchmark.py, plot.py and the hub (issue 34):
each is refused in one line, or read exactly as meant."""
import pytest

import benchmark
import train
from conftest import run_main
from losses import WeightedLoss, loss_spec, parse_loss

# ---------------------------------------------------------------- --loss weights


@pytest.mark.parametrize("weight", [1e6, 2e7, 0.1234567, 1234567.5, 1e300, 3e-300])
def test_a_loss_weight_is_kept_exactly_whatever_its_size(weight):
    spec = loss_spec(f"l1+{weight!r}*fft")
    assert WeightedLoss(spec).weights == [1.0, weight]
    assert loss_spec(spec) == spec  # the stored spelling reads back as itself


def test_a_weight_written_with_an_exponent_sign_is_a_number_not_two_terms():
    assert parse_loss("l1+2e+07*fft") == [(1.0, "l1"), (2e7, "fft")]
    assert parse_loss("1E-3*l2+l1") == [(1e-3, "l2"), (1.0, "l1")]


def test_a_subnormal_loss_weight_is_one_line(image_dir, tmp_path):
    code, _, err = run_main(train, "--train_dir", image_dir, "--val_dir", image_dir, "--checkpoint_dir", tmp_path,
                            "--loss", "l1+1e-310*fft")
    assert code == 2 and "Traceback" not in err
    assert "argument --loss: the weight of fft, 1e-310, is subnormal" in err


def test_benchmark_takes_a_large_loss_weight_as_train_does(monkeypatch):
    seen = []
    monkeypatch.setattr(benchmark, "measure_all", lambda device, plan, precision, model_args, loss, memory:
                        seen.append(loss) or {})
    code, out, err = run_main(benchmark, "--loss", "l1+2e7*fft", "--device", "cpu", "--quick", "--precision", "fp32")
    assert code == 0 and "Traceback" not in err, err
    assert seen[0].weights == [1.0, 2e7] and seen[0].names == ["l1", "fft"]


def test_benchmark_refuses_a_bad_loss_in_one_line(monkeypatch):
    monkeypatch.setattr(benchmark, "measure_all", lambda *args, **kwargs: pytest.fail("measured"))
    code, _, err = run_main(benchmark, "--loss", "l1+1e-310*fft", "--device", "cpu")
    assert code == 2 and "Traceback" not in err and "subnormal" in err
