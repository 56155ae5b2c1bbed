"""benchmarks/gpu_check.sh is ready for a GPU machine and harmless elsewhere: without CUDA it says so and
exits 0 (CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on a GPU runner too)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_gpu_check_skips_cleanly_without_cuda():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["no CUDA: skipped"]
