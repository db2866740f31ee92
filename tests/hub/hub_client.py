"""Load adapters in a fresh process, so huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HUB_CACHE at import.

    HF_ENDPOINT=http://127.0.0.1:PORT python hub_client.py user/name@v1 user/name
prints one JSON object per adapter: the files fetched and a checksum of the loaded adapter weights.
"""

import json
import sys

from sam2_peft.hub import load_adapter, resolve_adapter
from sam2_peft.models import load_sam2


def adapter_checksum(model) -> float:
    """Sum of every LoRA weight in the model: equal checksums mean the same adapter was loaded."""
    return float(sum(p.detach().double().sum() for name, p in model.named_parameters() if "lora_" in name))


if __name__ == "__main__":
    for spec in sys.argv[1:]:
        repo_id, _, revision = spec.partition("@")
        revision = revision or None
        folder = resolve_adapter(repo_id, revision)
        model = load_adapter(load_sam2("tiny-random"), repo_id, revision=revision)
        files = sorted(p.name for p in folder.iterdir())
        print(json.dumps({"spec": spec, "files": files, "checksum": adapter_checksum(model)}))
