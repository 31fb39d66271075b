"""The benchmark harness and CLI: runs end to end at tiny sizes, and the fused NT-Xent's peak
extra memory at 2N = 16384 stays within the O(N·D) budget (measured in its own process)."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from fastssl import _ext


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastssl", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_info_runs():
    out = _cli("info")
    assert out.returncode == 0, out.stderr
    assert "C++ extension" in out.stdout and "Triton" in out.stdout
    js = json.loads(_cli("info", "--json").stdout)
    assert js["cpp_extension"] == _ext.available()


def test_bench_cli_end_to_end(tmp_path):
    jpath, ppath = tmp_path / "b.json", tmp_path / "b.png"
    out = _cli("bench", "--op", "nt_xent", "--sizes", "64", "130", "--repeat", "1",
               "--json", str(jpath), "--plot", str(ppath))
    assert out.returncode == 0, out.stderr
    # One markdown table per mode: "<mode>:", a header whose first column is the x label
    # 2N, a rule, then one row per size in order, with a ratio cell per non-fused provider.
    lines = out.stdout.splitlines()
    headers = [i for i, line in enumerate(lines) if re.match(r"^\|\s*2N \| .*fused time", line)]
    assert [lines[i - 1] for i in headers] == ["forward:", "backward:", "both:"], out.stdout
    for i in headers:
        assert re.match(r"^\|-+\|", lines[i + 1]), lines[i + 1]
        body = lines[i + 2:i + 4]
        assert [re.match(r"^\|\s*(\d+) \|", row).group(1) for row in body] == ["64", "130"], body
        assert all(len(re.findall(r"\| +\d+\.\d\dx ", row)) >= 2 for row in body), body
    assert "compiled/fused" in out.stdout and "fused/floor" in out.stdout
    rows = json.loads(jpath.read_text())["rows"]
    got = {(r["provider"], r["mode"], r["x"]) for r in rows if "median_ms" in r}
    for p in ("fused", "reference", "compiled"):
        for m in ("forward", "backward", "both"):
            for x in (64, 130):
                assert (p, m, x) in got, (p, m, x, out.stderr[-2000:])
    assert all(r["median_ms"] > 0 for r in rows if "median_ms" in r)
    assert ppath.stat().st_size > 10_000
    assert "[nt_xent 1/6]" in out.stderr  # progress line per case


@pytest.mark.skipif(not _ext.has_op("ntxent_fwd"), reason="C++ extension missing")
def test_fused_peak_memory_is_o_nd():
    job = {"op": "nt_xent", "provider": "fused", "size": 16384, "modes": ["both"],
           "dtype": "float32", "device": "cpu", "repeat": 1, "max_seconds": 1}
    out = subprocess.run([sys.executable, "-m", "fastssl.tools.bench.worker", json.dumps(job)],
                         capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    row = [json.loads(l[7:]) for l in out.stdout.splitlines() if l.startswith("RESULT ")][0]
    assert row.get("peak_mb") is not None, (row, out.stderr[-1000:])
    # The eager reference needs ~3 GB here; the budget for the fused op is 64 MB.
    assert row["peak_mb"] <= 64, row


@pytest.mark.parametrize("provider", ["fused", "reference_enqueue", "official"])
def test_queue_benchmark_times_wrapping_enqueues(provider):
    """Every call of a queue-benchmark provider (warm-up and timed rounds alike) writes both
    ends of the ring, i.e. wraps."""
    import torch
    from fastssl.tools.bench import op_queue
    size = 256
    inp = op_queue.make_inputs(size, torch.float32, torch.device("cpu"))
    fn = getattr(op_queue, provider)
    for call in range(3):
        inp["queue"].buffer.zero_()
        fn(inp)
        buf = inp["queue"].buffer
        assert buf[-1].abs().sum() > 0 and buf[0].abs().sum() > 0, f"call {call} did not wrap"
        assert int(inp["queue"].ptr) == size // 2
