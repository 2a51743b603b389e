"""The Triton kernels (lightning attention, RMSNorm, cross-entropy, SwiGLU) compile for the H100 (sm_90a) with the real launch configs, on any
machine: the interpreter runs the kernels' arithmetic but never the GPU compiler, so a shape or layout
the compiler rejects, a config that spills registers, or a matmul that misses Hopper's wgmma would only
show on a GPU. Runs benchmarks/sm90_report.py in a subprocess (without TRITON_INTERPRET, which the
kernel tests set in this process)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]' installs it)")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernels_compile_for_sm90_without_spills(tmp_path, head_dim):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = tmp_path / "report.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sm90_report.py"), "--quick",
                          "--head-dim", str(head_dim), "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = json.loads(out.read_text())["rows"]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"segment_sum (k, v)", "fwd", "bwd_dq", "bwd_dk", "bwd_dv", "rms_norm fwd (N=1024)",
                       "rms_norm bwd (N=1024)", "cross_entropy", "swiglu fwd", "swiglu bwd"}, kernels
    for r in rows:
        assert "error" not in r, r
        assert r["spill_stores"] == 0 and r["stack_frame"] == 0, r
        assert r["shared_bytes"] <= 227 * 1024, r
        if r["kernel"].startswith(("segment_sum", "fwd", "bwd")):  # the norm and the loss have no matmul
            assert r["wgmma"] > 0, r  # Hopper tensor-core matmuls, not the mma.sync fallback
