"""Time switching domain adapters against loading a fresh model with the adapter, on the tiny random SAM2.

    python scripts/bench_adapter_switch.py [--model tiny-random] [--repeats 20]

Prints the median time of `DomainAdapters.use` (set_adapter), of `hotswap` and of a fresh
`load_adapter(load_sam2(model), folder)`, and the ratio fresh / switch.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from sam2_peft.hub import DomainAdapters, load_adapter, save_adapter
from sam2_peft.models import load_sam2

QKV = r"vision_encoder\.backbone\.blocks\.\d+\.attn\.qkv"


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folders = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            model = get_peft_model(load_sam2(args.model), LoraConfig(target_modules=QKV, r=8, init_lora_weights=False))
            folders.append(Path(tmp) / f"domain{seed}")
            save_adapter(model, folders[-1], base_model_name_or_path=args.model, strategy="lora")
        domains = DomainAdapters(load_sam2(args.model)).add("a", folders[0]).add("b", folders[1])
        names = iter(["a", "b"] * args.repeats)
        use = median_seconds(lambda: domains.use(next(names)), args.repeats)
        swaps = iter(folders * args.repeats)
        hotswap = median_seconds(lambda: domains.hotswap("a", next(swaps)), args.repeats)
        fresh = median_seconds(lambda: load_adapter(load_sam2(args.model), folders[1]), max(3, args.repeats // 4))
    print(f"set_adapter switch: {use * 1e3:9.3f} ms")
    print(f"hotswap_adapter:    {hotswap * 1e3:9.3f} ms")
    print(f"fresh model + load: {fresh * 1e3:9.3f} ms")
    print(f"ratio fresh / switch: {fresh / use:.0f}x (set_adapter), {fresh / hotswap:.1f}x (hotswap)")


if __name__ == "__main__":
    main()
