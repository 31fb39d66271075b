"""Smoke tests: every script in examples/ runs end to end at a tiny size and returns a finite
loss (imported and called through its ``main(argv)``, as ``python examples/x.py`` would)."""
import importlib.util
import math
import os

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")

TINY = {
    "simclr_ntxent": ["--steps", "2", "--batch", "16", "--width", "4"],
    "moco_v2": ["--steps", "3", "--batch", "16", "--width", "4", "--queue", "40"],
    "byol": ["--steps", "2", "--batch", "16", "--width", "4"],
}


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: one thread avoids OpenMP barrier waits on a busy 2-core runner.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}",
                                                  os.path.join(EXAMPLES, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_example_is_covered():
    scripts = {f[:-3] for f in os.listdir(EXAMPLES) if f.endswith(".py")}
    assert scripts == set(TINY)


@pytest.mark.parametrize("name", sorted(TINY))
def test_example_runs(name, capsys):
    loss = _load(name).main(TINY[name])
    out = capsys.readouterr().out
    assert math.isfinite(loss)
    assert "step    0" in out and f"{loss:.4f}" in out
