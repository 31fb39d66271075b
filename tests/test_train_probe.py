"""The acceptance of ``fastssl train``'s default run (issue 12): SimCLR on the built-in digits,
seed 0, beats the same encoder at its random initialisation by >= 8 points on the held-out
linear probe, and the random-init probe is above chance. About a minute of a 2-core CPU
(the default run itself), kept apart from test_profile_train.py's fast smoke tests."""
import pytest
import torch

from fastssl.tools.training import train


@pytest.fixture(autouse=True)
def _two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(min(2, n))
    yield
    torch.set_num_threads(n)


def test_default_simclr_run_beats_random_init_by_8_points():
    res = train("simclr", progress=False)
    assert res["data"] == "digits" and res["epochs"] == 15
    gain = res["ssl_probe_acc"] - res["random_probe_acc"]
    assert gain >= 0.08, (res["ssl_probe_acc"], res["random_probe_acc"])
    # A random-init probe that carries no signal would sit at chance +- 3 points here
    # (359 held-out images): this one must be clear of it.
    assert res["random_probe_acc"] > res["chance"] + 0.1, res["random_probe_acc"]
    assert res["losses"][-1] < res["losses"][0]
