"""Save an FSDP2-sharded model with models.sources.save_sharded_model_folder, for tests/test_fsdp_save.py.

  torchrun --nproc_per_node 2 tests/fsdp_save.py SOURCE_FOLDER TARGET_FOLDER SHARD_BYTES

Every rank loads SOURCE_FOLDER, shards it (fully_shard per block, then the root, as train.strategy=fsdp
does) and saves; rank 0 prints one JSON line: the peak RSS (VmHWM) during the save above the RSS before it,
and the bytes of the model's float32 weights.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from transformers import AutoModelForCausalLM  # noqa: E402

from shdcli import distributed  # noqa: E402
from shdcli.models.families import decoder_layers  # noqa: E402
from shdcli.models.sources import save_sharded_model_folder  # noqa: E402
from tests.setup_memory import reset_peak, status  # noqa: E402


def main(source: str, target: str, shard_bytes: int) -> None:
    info = distributed.init("cpu")
    model = AutoModelForCausalLM.from_pretrained(source)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    model = distributed.wrap_student(model, "fsdp", distributed.local_device(model.device), None, encoder=False,
                                     blocks=list(decoder_layers(model)))
    gc.collect()
    base = status("VmRSS")
    reset_peak()
    save_sharded_model_folder(model, None, Path(target), shard_bytes=shard_bytes)
    if info.is_main:
        print(json.dumps({"save_peak": status("VmHWM") - base, "weights": weights}), flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
