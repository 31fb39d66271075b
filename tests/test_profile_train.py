"""Smoke tests of ``fastssl profile`` and ``fastssl train`` at tiny sizes, and of the
embedded datasets and the torch-only linear probe they rely on."""
import json

import pytest
import torch

from fastssl import data
from fastssl.tools import cli
from fastssl.tools.training import METHODS, PHASES, SSLModel, linear_probe

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
    # Each step's phases tile it (what is left is the loop's own overhead) ...
    assert 0.90 <= res["phases_share"] <= 1.0 + 1e-6, res["phases_share"]
    # ... and the table's figures are medians within each step's fastest/slowest.
    for p in PHASES:
        lo, hi = res["phases_spread_ms"][p]
        assert lo <= res["phases_ms"][p] <= hi
    lo, hi = res["step_spread_ms"]
    assert lo <= res["step_ms"] <= hi
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
    # Both backends in this process, interleaved phase by phase; the table shows both, with
    # the same-code phases' ratio as a noise check, and each side's own peak memory.
    assert cli.main(["profile", "--method", "simclr", "--backend", "both", *TINY_PROFILE,
                     "--threads", "1", "--json"]) == 0
    out = capsys.readouterr().out
    assert "fused ms" in out and "reference ms" in out and "fused/ref" in out
    assert "noise check" in out or "! noise" in out
    res = _last_json(out)
    assert res["backend"] == "fused" and res["interleaved"] == "phase by phase, one process"
    assert "one step of each side alone" in out
    ref = res["reference"]
    assert set(ref) == {"step_ms", "phases_ms", "images_per_s", "peak_mb", "step_spread_ms",
                        "phases_spread_ms", "phases_share"}
    # Interleaved: a step's wall time is the sum of its phases (the other side's are not in it).
    assert ref["phases_share"] == pytest.approx(1.0)
    assert set(res["same_code_ratio"]) == {"encoder_forward", "optimizer"}
    assert all(v > 0 for v in res["same_code_ratio"].values())
    assert res["peak_mb"] > 0 and ref["peak_mb"] > 0


def test_train_tiny_cli(tmp_path, capsys):
    assert cli.main(["train", "--method", "byol", "--data", "shapes", "--epochs", "1",
                     "--batch", "32", "--n-train", "96", "--width", "4", "--quiet", "--json",
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


@pytest.mark.parametrize("method", METHODS)
def test_every_method_steps_and_learns(method):
    """Each registered method: two full training steps run (views, heads, loss, backward,
    optimiser, EMA / queue / centre updates) with a finite loss, and its loss decreases when
    its heads and encoder are fitted to one fixed set of views (the after-step updates held
    still, so the targets do not move under the loss): the gradient reaches what the loss
    depends on, with the right sign."""
    images, _ = data.render_shapes(12, seed=1)
    model = SSLModel(method, width=4, hidden=16, proj_dim=8, queue_size=32, lr=3e-3,
                     total_steps=8, seed=0)
    for _ in range(2):
        assert torch.isfinite(model.step(images))
    method_impl = model.method
    views = method_impl.make_views(images)
    losses = []
    for _ in range(6):
        loss = method_impl.loss(method_impl.forward_views(views))
        losses.append(float(loss))
        loss.backward()
        model.optimizer.step()
        model.optimizer.zero_grad(set_to_none=True)
    assert losses[-1] < losses[0], losses


def test_train_n_train_is_for_shapes_only():
    with pytest.raises(ValueError, match="shapes data only"):
        cli.main(["train", "--data", "digits", "--n-train", "96", "--quiet"])


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


def _nt_xent_step(backend, z1, z2):
    from fastssl import nt_xent
    nt_xent(z1, z2, 0.1, backend=backend).backward()


@pytest.mark.skipif(not __import__("fastssl")._ext.has_op("ntxent_fwd"),
                    reason="C++ extension missing")
def test_fused_kernels_leave_no_threads_spinning():
    """The fused C++ kernels must not leave threads spinning (or busy) after they return.

    1. Load-independent: the CPU time this process burns during a 20 ms sleep right after a
       fused NT-Xent forward + backward is no more than after the plain-PyTorch reference of
       the same call (OpenMP's pool spins briefly after any parallel region, torch's own
       included; a thread of ours left spinning would burn the whole 20 ms).
    2. The effect on the next torch op: a matmul right after the fused call vs right after the
       reference call, interleaved (ABBA), best of 2 per round, median of the paired ratios
       <= 1.1. The matmul is 512^3 (~2 ms at 2 threads): a thread left spinning steals CPU for
       as long as it spins, so it shows in a matmul of any length, while a 256^3 one (~0.3 ms)
       mostly times how long OpenMP's idle workers take to wake up -- measured on the 2-core
       dev machine: 256^3 back to back 231 us, after a 2 ms sleep 474 us, after the fused call
       418 us, after the reference 381 us (1.10); at 512^3 2145 / 2325 / 2193 / 2321 us
       (0.94): no spinning, only the wake-up of a pool that went idle. On an oversubscribed machine (1-minute load above 1.5x the CPU count) this
       ratio measures how long the scheduler takes to wake OpenMP's sleeping workers, not our
       kernels: then the test reports the ratio and skips instead of asserting.
    Runs with at least 2 threads (spinning threads only matter with a pool)."""
    import os
    import statistics
    import time
    torch.set_num_threads(max(2, torch.get_num_threads()))
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(256, 128, generator=g).requires_grad_()
    z2 = torch.randn(256, 128, generator=g).requires_grad_()
    a = torch.randn(512, 512, generator=g)
    b = torch.randn(512, 512, generator=g)

    def matmul_after(backend):
        best = float("inf")
        for _ in range(2):
            _nt_xent_step(backend, z1, z2)
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        return best

    def idle_cpu_after(backend):
        _nt_xent_step(backend, z1, z2)
        c0 = time.process_time()
        time.sleep(0.02)
        return time.process_time() - c0

    for backend in ("cpp", "reference"):  # warm both paths and the matmul
        matmul_after(backend)

    def attempt():
        ratios, idle = [], {"cpp": [], "reference": []}
        for r in range(20):
            order = ("cpp", "reference") if r % 2 == 0 else ("reference", "cpp")
            t = {k: matmul_after(k) for k in order}
            ratios.append(t["cpp"] / t["reference"])
            for k in order:
                idle[k].append(idle_cpu_after(k))
        return statistics.median(ratios), sorted(ratios), \
            [statistics.median(idle[k]) for k in ("cpp", "reference")]

    # Up to 3 attempts of 20 paired rounds: a thread of ours left spinning slows the matmul in
    # every attempt, whereas a burst of load from another process (seen in a fresh-clone run
    # beside other work: paired ratios from 0.35 to 2+, median 1.12) rarely lasts through
    # three. The idle-CPU check must hold in every attempt.
    load = [os.getloadavg()[0]]
    tries = []
    for _ in range(3):
        ratio, ratios, (idle_fused, idle_plain) = attempt()
        assert idle_fused <= idle_plain + 0.005, (idle_fused, idle_plain)
        tries.append((ratio, ratios))
        if ratio <= 1.1:
            break
    load.append(os.getloadavg()[0])
    best = min(r for r, _ in tries)
    if max(load) > 1.5 * os.cpu_count():
        pytest.skip(f"matmul-after ratio {best:.2f} not judged: load average {max(load):.1f} "
                    f"on {os.cpu_count()} CPUs (idle-CPU check passed: {1e3 * idle_fused:.1f} "
                    f"vs {1e3 * idle_plain:.1f} ms)")
    assert best <= 1.1, tries


def test_method_defaults_of_fastssl_train():
    """MAE trains longer and slower by default (its README row was measured that way);
    every other method takes the dataset's epochs and the common learning rate."""
    from fastssl.tools.training import DEFAULT_LR, SSL_METHODS, method_defaults
    assert method_defaults("mae", "digits") == (45, 1e-3)
    assert method_defaults("mae", "shapes") == (40, 1e-3)
    for m in SSL_METHODS:
        if m != "mae":
            assert method_defaults(m, "digits") == (15, DEFAULT_LR)
    with pytest.raises(ValueError, match="method must be one of"):
        method_defaults("swav", "digits")
