"""``fastssl gpu-report``: every Triton kernel of the project compiles ahead of time for sm_80
and sm_90 without register spills, the NT-Xent kernels use the tensor cores, and the JSON and
estimates have the promised shape. Compiles once per session (module fixture; results are also
cached under ~/.cache/fastssl/gpu_report, so later runs take seconds)."""
from __future__ import annotations

import argparse
import json
import os

import pytest

pytest.importorskip("triton")
gpu_report = pytest.importorskip("fastssl.gpu_report")

try:
    from triton.backends.nvidia.compiler import get_ptxas
    _HAVE_PTXAS = os.path.exists(get_ptxas(90).path) and os.path.exists(get_ptxas(80).path)
except Exception:  # pragma: no cover - a Triton without the NVIDIA backend
    _HAVE_PTXAS = False

pytestmark = pytest.mark.skipif(not _HAVE_PTXAS, reason="Triton's bundled ptxas is missing")

KERNEL_KEYS = {"kernel", "arch", "source", "registers", "shared_bytes", "spill_bytes",
               "tensor_cores"}
ESTIMATE_KEYS = {"op", "shape", "flops", "exps", "bytes", "h100_ms"}


@pytest.fixture(scope="module")
def report():
    return gpu_report.collect()


@pytest.fixture(scope="module")
def aot_entries():
    return gpu_report.discover_aot_kernels()


def test_every_listed_kernel_compiled_for_both_archs(report, aot_entries):
    triton_rows = {(k["kernel"], k["arch"]) for k in report["kernels"] if k["source"] == "triton"}
    names = [entry["name"] for _mod, entry in aot_entries]
    assert any(n.startswith("ntxent_fwd_kernel") for n in names)
    assert any(n.startswith("ntxent_bwd_kernel") for n in names)
    assert len(set(names)) == len(names), "AOT kernel names must be unique"
    for name in names:
        for arch in ("sm_80", "sm_90"):
            assert (name, arch) in triton_rows


def test_no_spills_anywhere(report):
    spilling = [(k["kernel"], k["arch"], k["spill_bytes"]) for k in report["kernels"]
                if k["spill_bytes"] != 0]
    assert not spilling, f"register spills: {spilling}"


def test_ntxent_kernels_use_tensor_cores(report, aot_entries):
    wants = {entry["name"] for mod, entry in aot_entries
             if mod.endswith(".ntxent") and entry["tensor_cores"]}
    assert len(wants) >= 12  # fwd + bwd x (bf16 large/small/wide, fp16 large/small, fp32)
    rows = [k for k in report["kernels"] if k["kernel"] in wants]
    assert len(rows) == 2 * len(wants)
    missing = [(k["kernel"], k["arch"]) for k in rows if not k["tensor_cores"]]
    assert not missing, f"no wgmma (sm_90) / mma (sm_80) in: {missing}"


def test_every_tensor_core_kernel_uses_them(report, aot_entries):
    wants = {entry["name"] for _mod, entry in aot_entries if entry.get("tensor_cores")}
    missing = [(k["kernel"], k["arch"]) for k in report["kernels"]
               if k["kernel"] in wants and not k["tensor_cores"]]
    assert not missing


def test_json_shape_and_estimates(report):
    assert set(report) == {"kernels", "estimates"}
    for k in report["kernels"]:
        assert set(k) == KERNEL_KEYS
        assert k["arch"] in ("sm_80", "sm_90") and k["source"] in ("triton", "cuda")
        assert 0 < k["registers"] <= 255
        # the launch configs must fit in shared memory (sm_80: 163 KiB, sm_90: 227 KiB)
        assert k["shared_bytes"] <= (166912 if k["arch"] == "sm_80" else 232448)
    est = {e["op"]: e for e in report["estimates"]}
    assert all(set(e) == ESTIMATE_KEYS for e in est.values())
    fused, eager = est["nt_xent fused (triton)"], est["nt_xent eager reference"]
    m, d = 65536, 128
    eq = 2 * m * m * d
    assert fused["flops"] <= 3 * eq and eager["flops"] == 3 * eq
    for e in (fused, eager):
        want = 1e3 * max(e["flops"] / 989e12, e["exps"] / 3.9e12, e["bytes"] / 3.35e12)
        assert e["h100_ms"] == pytest.approx(want, rel=1e-3)
    assert fused["bytes"] < 0.01 * eager["bytes"]  # the point of fusion: O(M D), not O(M^2)


def test_cli_json(report, capsys):
    from fastssl.cli import COMMANDS
    assert COMMANDS["gpu-report"][0] == "fastssl.gpu_report"
    parser = argparse.ArgumentParser()
    gpu_report.add_arguments(parser)
    assert gpu_report.run(parser.parse_args(["--json"])) == 0  # cached: fast
    out = json.loads(capsys.readouterr().out)
    assert out["kernels"] == report["kernels"] and out["estimates"] == report["estimates"]


@pytest.mark.skipif(gpu_report._nvcc() is None, reason="nvcc not found")
def test_cuda_source_parsed(tmp_path):
    """The nvcc path, on a tiny .cu (the project has none yet): registers, spills, mma."""
    src = tmp_path / "probe.cu"
    src.write_text(
        "#include <mma.h>\nusing namespace nvcuda;\n"
        "__global__ void saxpy(float a, const float* x, float* y, int n) {\n"
        "  int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) y[i] = a * x[i] + y[i]; }\n"
        "__global__ void mma16(const half* a, const half* b, float* c) {\n"
        "  wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fa;\n"
        "  wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> fb;\n"
        "  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;\n"
        "  wmma::fill_fragment(fc, 0.0f); wmma::load_matrix_sync(fa, a, 16);\n"
        "  wmma::load_matrix_sync(fb, b, 16); wmma::mma_sync(fc, fa, fb, fc);\n"
        "  wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major); }\n")
    rows = {r["kernel"]: r for r in gpu_report.compile_cuda(str(src), 90, use_cache=False)}
    assert set(rows) == {"probe.cu:saxpy", "probe.cu:mma16"}
    assert rows["probe.cu:mma16"]["tensor_cores"] and not rows["probe.cu:saxpy"]["tensor_cores"]
    assert all(r["registers"] > 0 and r["spill_bytes"] == 0 for r in rows.values())


def test_table_mentions_every_kernel(report):
    text = gpu_report.format_table(report)
    assert all(k["kernel"] in text for k in report["kernels"])
    assert "nt_xent eager reference" in text


def test_no_cuda_sources_is_fine(report, tmp_path):
    small = gpu_report.collect(only="ntxent_fwd_combine_kernel", cuda_dir=str(tmp_path))
    assert small["kernels"] and all(k["source"] == "triton" for k in small["kernels"])
    assert small["estimates"] == report["estimates"]
