"""Smoke tests of ``fastssl profile`` and ``fastssl train`` at tiny sizes, and of the
embedded datasets and the torch-only linear probe they rely on."""
import json

import pytest
import torch

from fastssl import cli, data
from fastssl.training import PHASES, linear_probe

TINY_PROFILE = ["--batch", "16", "--steps", "3", "--warmup", "1", "--width", "4",
                "--queue", "64", "--quiet"]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: one thread avoids OpenMP barrier waits on a busy 2-core runner.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _last_json(out):
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("method", ["simclr", "moco", "byol"])
def test_profile_json_phases_tile_the_step(method, capsys):
    assert cli.main(["profile", "--method", method, *TINY_PROFILE, "--json"]) == 0
    res = _last_json(capsys.readouterr().out)
    assert set(res) >= {"method", "batch", "step_ms", "phases_ms", "images_per_s", "peak_mb"}
    assert res["method"] == method and res["batch"] == 16
    assert set(res["phases_ms"]) == set(PHASES)
    assert all(v >= 0 for v in res["phases_ms"].values())
    share = sum(res["phases_ms"].values()) / res["step_ms"]
    assert 0.90 <= share <= 1.05, share
    assert res["peak_mb"] is not None and res["peak_mb"] >= 0
    assert res["images_per_s"] == pytest.approx(16 * 1000 / res["step_ms"], rel=1e-2, abs=0.06)


def test_profile_reference_backend_and_trace(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    assert cli.main(["profile", "--method", "moco", "--backend", "reference", *TINY_PROFILE,
                     "--trace", str(trace), "--json"]) == 0
    out = capsys.readouterr().out
    assert "EMA + queue" in out  # the table precedes the JSON line
    assert _last_json(out)["backend"] == "reference"
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {f"fastssl::{p}" for p in PHASES} <= names


def test_profile_both_backends_side_by_side(capsys):
    # Each backend runs in its own process (clean peak memory); the table shows both.
    assert cli.main(["profile", "--method", "simclr", "--backend", "both", *TINY_PROFILE,
                     "--threads", "1", "--json"]) == 0
    out = capsys.readouterr().out
    assert "fused ms" in out and "reference ms" in out
    res = _last_json(out)
    assert res["backend"] == "fused"
    ref = res["reference"]
    assert set(ref) == {"step_ms", "phases_ms", "images_per_s", "peak_mb"}
    assert 0.90 <= sum(ref["phases_ms"].values()) / ref["step_ms"] <= 1.05


def test_train_tiny_cli(tmp_path, capsys):
    assert cli.main(["train", "--method", "byol", "--epochs", "1", "--batch", "32",
                     "--n-train", "96", "--width", "4", "--quiet", "--json",
                     "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    res = _last_json(out)
    assert list(res) == ["method", "data", "epochs", "ssl_probe_acc", "random_probe_acc",
                         "pixel_probe_acc", "seconds"]
    assert res["method"] == "byol" and res["data"] == "shapes" and res["epochs"] == 1
    for k in ("ssl_probe_acc", "random_probe_acc", "pixel_probe_acc"):
        assert 0.0 <= res[k] <= 1.0
    assert "raw pixels" in out
    assert (tmp_path / "loss_byol_shapes.png").stat().st_size > 0


def test_shapes_deterministic_and_balanced():
    a, ya = data.render_shapes(600, seed=3)
    b, yb = data.render_shapes(600, seed=3)
    c, _ = data.render_shapes(600, seed=4)
    assert a.dtype == torch.uint8 and a.shape == (600, 3, 32, 32)
    assert torch.equal(a, b) and torch.equal(ya, yb) and not torch.equal(a, c)
    counts = torch.bincount(ya, minlength=len(data.SHAPE_CLASSES))
    assert counts.min() > 600 / 6 * 0.7


def test_digits_embedded_and_probe_sanity():
    ds = data.digits()
    assert ds.images.shape == (1797, 3, 32, 32) and ds.pixels.shape == (1797, 64)
    assert ds.train.numel() + ds.test.numel() == 1797
    assert set(ds.train.tolist()).isdisjoint(ds.test.tolist())
    # Raw pixels of 8x8 digits are close to linearly separable (~95%+ with sklearn's
    # LogisticRegression): the torch probe must get there too.
    acc = linear_probe(ds.pixels[ds.train], ds.labels[ds.train], ds.pixels[ds.test],
                       ds.labels[ds.test])
    assert acc > 0.93


def test_probe_chance_on_shuffled_labels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 20, generator=g)
    y = torch.randint(0, 4, (400,), generator=g)
    acc = linear_probe(x[:300], y[:300], x[300:], y[300:])
    assert acc < 0.45  # no signal -> about chance (0.25), never a leak of test labels
