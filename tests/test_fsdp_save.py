"""The final FSDP student is streamed to safetensors file by file (models.sources.save_sharded_model_folder):
the folder reloads with from_pretrained and equals the model that was sharded, files and index are named as
save_pretrained names them, and rank 0 never holds a second full copy of the model while it saves."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from tests.conftest import ROOT
from tests.tiny import make_tiny

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_two_ranks_stream_the_sharded_model_to_safetensors_files(tmp_path):
    from transformers import AutoModelForCausalLM

    # 43M parameters (172 MB of float32): big enough that a full copy dominates the interpreter's noise
    source = make_tiny("llama", tmp_path / "source", layers=8, heads=8, kv_heads=4, hidden=768)
    shard_bytes = 24 * 2**20
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "fsdp_save.py"), str(source), str(tmp_path / "saved"), str(shard_bytes)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [stats] = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]

    saved = tmp_path / "saved"
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in saved.glob("*.safetensors"))
    assert len(files) > 2 and files == sorted(set(index["weight_map"].values()))
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    largest = max(p.numel() * p.element_size() for p in AutoModelForCausalLM.from_pretrained(source).parameters())
    for name in files:  # no file holds more than shard_bytes, or one tensor larger than it
        assert (saved / name).stat().st_size <= max(shard_bytes, largest) + 2**16
    assert not list(tmp_path.glob(".*tmp*")) and not list(saved.glob(".*"))  # renamed whole, nothing left over

    a = AutoModelForCausalLM.from_pretrained(source).eval()
    b = AutoModelForCausalLM.from_pretrained(saved).eval()
    assert b.state_dict().keys() == a.state_dict().keys()
    for key, value in a.state_dict().items():
        assert torch.equal(b.state_dict()[key], value), key
    # rank 0 held one file's tensors and one gathered tensor at a time, not the whole model again (the save
    # before issue 29 gathered a full float32 state dict and loaded it into a second model: 2 x the weights)
    print(f"save peak {stats['save_peak'] / stats['weights']:.2f} x the float32 weights")
    assert stats["save_peak"] <= 0.4 * stats["weights"], stats  # measured 0.26
