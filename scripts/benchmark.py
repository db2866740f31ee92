"""Benchmark the training strategies against the naive loop, LoRA merged vs unmerged inference, and adapter switching.

    python scripts/benchmark.py --output runs/benchmark                  # hiera-tiny, 1024 px, batch 1, 3 steps
    python scripts/benchmark.py --config hiera-large --strategies lora,full --gradient_checkpointing  # other sizes
    python scripts/benchmark.py --strategies lora,full --gradient_checkpointing --mixed_precision bf16
    python scripts/benchmark.py --config tiny-random --image_size 256 --steps 2 --output /tmp/bench   # smoke run
    python scripts/benchmark.py --config hiera-large --batch_size 8 --mixed_precision bf16 --steps 8   # on CUDA

Everything runs in one process on random weights (offline). An "epoch" is `--steps` batches of distinct images.
- naive: the plain loop users write: `Sam2Model.forward` on every step, no caches, same strategy and loss; fp32
  on CPU, under the same autocast as ours on CUDA (what a GPU user writes).
- ours: `InteractiveSegmenter` with the feature cache (decoder) or prefix cache (partial), gradient checkpointing
  with `--gradient_checkpointing` (windowed blocks in `--checkpoint_strips` strips), a bf16-autocast forward with
  `--mixed_precision bf16` (as the training loop's `accelerator.autocast()`); cached strategies run two epochs and
  report the second (the first fills the cache). Ratios are naive time / ours, from steps run alternately (naive,
  ours, naive, ...) so that drift in the machine's speed hits both alike.
- memory: CUDA max allocated on GPU (in process); on CPU, where RSS never goes down, each strategy runs two steps
  in a subprocess and reports its peak RSS (VmHWM) minus the RSS before the model was built (weights + training
  memory), twice: with glibc's default heap, which keeps many freed blocks (what a plain process uses; it varies
  by 10-20% between runs), and with freed memory returned to the OS (`MALLOC_MMAP_THRESHOLD_=131072`: what
  training holds, close to the live tensors and reproducible; that setting slows CPU steps by 25-45%).
- FLOPs: one step of ours on the eager `cpu` backend (cache filled) under `FlopCounterMode` (`speed.flops`); on
  CUDA, MFU = FLOPs / ours' step time / the bf16 matmul rate the script measures (`matmul_ceiling`).
Writes `benchmark.json` and `benchmark.md` to `--output`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Sam2Config, Sam2Model

from sam2_peft.caching import plan_cache
from sam2_peft.hub import DomainAdapters, load_adapter, save_adapter
from sam2_peft.interactive import InteractiveSegmenter
from sam2_peft.interop.official_config import official_to_hf_config
from sam2_peft.losses import LossWeights
from sam2_peft.memory import enable_gradient_checkpointing
from sam2_peft.models import load_sam2, model_fingerprint
from sam2_peft.presets import tiny_random_config
from sam2_peft.segmenter import SegmenterOutput, combine_prompts
from sam2_peft.speed.flops import count_flops, matmul_ceiling, mfu
from sam2_peft.strategies import apply_strategy
from sam2_peft.training import build_optimizer, compute_loss

# name -> (apply_strategy's strategy, its options)
STRATEGIES = {
    "decoder": ("decoder", {}),
    "partial": ("partial", {"num_blocks": 2}),
    "lora": ("lora", {"r": 8}),
    "lora-last4": ("lora", {"r": 8, "blocks": "last:4"}),
    "full": ("full", {}),
}
WEIGHTS = LossWeights()
# --config -> the official configuration it builds (random weights)
CONFIGS = {"hiera-tiny": "sam2.1_hiera_t", "hiera-small": "sam2.1_hiera_s", "hiera-base-plus": "sam2.1_hiera_b+",
           "hiera-large": "sam2.1_hiera_l"}


def build_config(name: str, image_size: int) -> Sam2Config:
    """An official size (`hiera-tiny`, `Sam2Config()`'s default, to `hiera-large`) at any multiple of 32 px, or the
    256-px tiny random model."""
    if name == "tiny-random":
        if image_size != 256:
            raise ValueError(f"--config tiny-random is built for --image_size 256, got {image_size}.")
        return tiny_random_config()
    if name not in CONFIGS or image_size % 32:
        raise ValueError(f"--config {name} --image_size {image_size}: use one of {', '.join(CONFIGS)} (size a "
                         "multiple of 32) or tiny-random.")
    config = official_to_hf_config(CONFIGS[name])
    config.vision_config.backbone_config.image_size = [image_size, image_size]
    config.vision_config.backbone_feature_sizes = [[image_size // s] * 2 for s in (4, 8, 16)]
    config.prompt_encoder_config.image_size = image_size
    return config


def make_batches(args, count: int, offset: int = 0) -> list[dict]:
    """`count` batches of random images, each with `--objects` box-prompted objects, as `collate_objects` gives."""
    size, n = args.image_size, args.batch_size
    batches = []
    for index in range(offset, offset + count):
        generator = torch.Generator().manual_seed(index)
        corners = torch.rand(n * args.objects, 2, 2, generator=generator).sort(dim=1).values * size
        boxes = corners.reshape(-1, 4)
        masks = torch.zeros(n * args.objects, size, size, dtype=torch.bool)
        for obj, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[obj, y0 : y1 + 1, x0 : x1 + 1] = True
        coords, labels = combine_prompts(boxes=boxes)
        batches.append({
            "pixel_values": torch.randn(n, 3, size, size, generator=generator),
            "image_ids": [f"image{index}_{i}" for i in range(n)],
            "image_index": torch.arange(n).repeat_interleave(args.objects),
            "boxes": boxes.reshape(n, args.objects, 4),
            "point_coords": coords,
            "point_labels": labels,
            "masks": masks,
            "object_present": torch.ones(n * args.objects, dtype=torch.bool),
        })
    return [{k: v.to(args.device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]


def fresh_model(args, strategy: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = Sam2Model(build_config(args.config, args.image_size)).to(args.device)
    name, options = STRATEGIES[strategy]
    return apply_strategy(model, name, **options).train()


def naive_step(model, optimizer, batch, args) -> float:
    """The plain loop: the whole `Sam2Model.forward` with the boxes, loss, backward, step (autocast on CUDA)."""
    bf16 = args.mixed_precision == "bf16" and args.device.type == "cuda"
    with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(pixel_values=batch["pixel_values"], input_boxes=batch["boxes"], multimask_output=True)
    outputs = [SegmenterOutput(out.pred_masks.flatten(0, 1), out.iou_scores.flatten(0, 1),
                               out.object_score_logits.flatten(0, 1))]
    loss = compute_loss(outputs, batch, WEIGHTS)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def our_step(module, optimizer, batch, cache, args) -> float:
    with torch.autocast(args.device.type, dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16"):
        if cache is not None:
            batch = {**batch, "image_features": cache.features(module.segmenter, batch)}
        outputs = module(batch)
    loss = compute_loss(outputs, batch, WEIGHTS)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def timed(fn, args) -> float:
    if args.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if args.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def setup(args, strategy: str, mode: str, backend: str | None = None):
    """(step function, cache) of the naive loop or ours (on `backend`, default `--backend`) for `strategy`."""
    model = fresh_model(args, strategy)
    optimizer = build_optimizer(model, 1e-5, 0.0)
    if mode == "naive":
        return (lambda batch: naive_step(model, optimizer, batch, args)), None
    backend = backend or args.backend
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model, strips=args.checkpoint_strips, backend=backend)
    plan = plan_cache(model, changes_pixels=False)
    cache = plan.build(model_fingerprint(model), f"benchmark {args.image_size}px", device=args.device)
    module = InteractiveSegmenter(model, backend=backend).train()
    return (lambda batch: our_step(module, optimizer, batch, cache, args)), cache


def run_strategy(args, strategy: str, batches: list[dict]) -> dict:
    """Median step times of the naive loop and of ours, run alternately step by step so that drift in the machine's
    speed hits both alike; a cached strategy first runs one epoch of ours to fill its cache (reported apart)."""
    naive, _ = setup(args, strategy, "naive")
    ours, cache = setup(args, strategy, "ours")
    first = [timed(lambda b=b: ours(b), args) for b in batches] if cache is not None else None
    naive_s, ours_s, _ = paired_median_times([(lambda b=b: naive(b), lambda b=b: ours(b)) for b in batches], args)
    first_s = statistics.median(first) if first is not None else ours_s
    return {
        "cache": cache.kind if cache is not None else None,
        "naive_step_s": naive_s,
        "ours_first_epoch_step_s": first_s,
        "ours_step_s": ours_s,
        "images_per_s": args.batch_size / ours_s,
        "naive_images_per_s": args.batch_size / naive_s,
        "speedup": naive_s / ours_s,
        "speedup_first_epoch": naive_s / first_s,
    }


def step_flops(args, strategy: str, batch: dict) -> int:
    """FLOPs of one step of ours, counted on the eager `cpu` backend after a step that fills a cache."""
    step, _ = setup(args, strategy, "ours", backend="cpu")
    step(batch)
    return count_flops(lambda: step(batch))


def train_two_steps(args, strategy: str, mode: str) -> None:
    """What a memory probe measures: build `strategy` (naive or ours) and train two steps on fresh images."""
    step, _ = setup(args, strategy, mode)
    for batch in make_batches(args, 2, offset=1000):
        step(batch)


# glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, so a CPU process's RSS also holds
# memory training no longer uses; a fixed 128 KiB threshold returns every tensor-sized block to the OS on free.
RETURNED_HEAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def probe_command(args, strategy: str, mode: str, heap: str) -> tuple[list[str], dict]:
    """The command line and environment of one CPU memory probe; `heap` is "default" or "returned" (see above)."""
    command = [sys.executable, __file__, "--probe", f"{strategy}:{mode}", "--config", args.config, "--image_size",
               str(args.image_size), "--batch_size", str(args.batch_size), "--objects", str(args.objects)]
    if args.gradient_checkpointing:
        command += ["--gradient_checkpointing", "--checkpoint_strips", str(args.checkpoint_strips)]
    command += ["--mixed_precision", args.mixed_precision] if args.mixed_precision != "no" else []
    command += ["--backend", args.backend] if getattr(args, "backend", "auto") != "auto" else []
    # "default" means glibc's defaults: drop the user's own malloc settings (MALLOC_*_, GLIBC_TUNABLES).
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_") and key != "GLIBC_TUNABLES"}
    return command, {**env, **RETURNED_HEAP} if heap == "returned" else env


def probe_memory(args, strategy: str, mode: str, heap: str = "default") -> float:
    """Peak memory (MB) of two training steps: in process on GPU, in a subprocess on CPU."""
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        train_two_steps(args, strategy, mode)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    command, env = probe_command(args, strategy, mode, heap)
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]


def status_mb(field: str) -> float:
    """A memory line of /proc/self/status in MB: VmRSS (now) or VmHWM (this process's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} line; CPU memory probes need Linux.")


def run_probe(args) -> None:
    strategy, mode = args.probe.split(":")
    before = status_mb("VmRSS")
    train_two_steps(args, strategy, mode)
    # VmHWM, not getrusage's ru_maxrss: Linux carries the parent's peak RSS into ru_maxrss across fork and exec.
    print(json.dumps({"peak_mb": status_mb("VmHWM") - before}))


def median_time(fn, args, repeats: int) -> float:
    return statistics.median(timed(fn, args) for _ in range(repeats))


def paired_median_times(pairs, args) -> tuple[float, float, float]:
    """Run each (first, second) pair of functions in turn, so that drift in machine load hits both alike: the
    median times of the firsts and of the seconds, and the median of each pair's second / first (which a slow
    stretch of the machine, hitting one pair, barely moves)."""
    times = [(timed(first, args), timed(second, args)) for first, second in pairs]
    return (statistics.median(a for a, _ in times), statistics.median(b for _, b in times),
            statistics.median(b / a for a, b in times))


def run_inference(args) -> dict:
    """Forward latency of LoRA unmerged and merged, each timed alternately with the base model (one batch, no grad)."""
    batch = make_batches(args, 1, offset=2000)[0]
    model = fresh_model(args, "lora").eval()
    for name, param in model.named_parameters():
        if "lora_B" in name:  # LoRA B starts at zero; make the adapter do something
            torch.nn.init.normal_(param, std=0.01)
    torch.manual_seed(0)
    base = Sam2Model(build_config(args.config, args.image_size)).to(args.device).eval()
    forward = lambda m: m(pixel_values=batch["pixel_values"], input_boxes=batch["boxes"])  # noqa: E731
    repeats = max(7, args.steps)
    with torch.no_grad():
        forward(base)  # warm-up (allocator, kernels)
        base_s, unmerged_s, unmerged_ratio = paired_median_times(
            [(lambda: forward(base), lambda: forward(model))] * repeats, args
        )
        merged = model.merge_and_unload()
        base_again_s, merged_s, merged_ratio = paired_median_times(
            [(lambda: forward(base), lambda: forward(merged))] * repeats, args
        )
    return {"base_s": base_s, "unmerged_s": unmerged_s, "unmerged_over_base": unmerged_ratio,
            "base_again_s": base_again_s, "merged_s": merged_s, "merged_over_base": merged_ratio}


def run_adapter_switch(args) -> dict:
    """`set_adapter` between two loaded LoRA domains versus loading the base model and the adapter again."""
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "base"
        torch.manual_seed(0)
        Sam2Model(build_config(args.config, args.image_size)).save_pretrained(base_dir)
        folders = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            model = apply_strategy(load_sam2(base_dir), "lora", r=8, init_lora_weights=False)
            folders.append(Path(tmp) / f"domain{seed}")
            save_adapter(model, folders[-1], base_model_name_or_path=str(base_dir), strategy="lora")
        domains = DomainAdapters(load_sam2(base_dir)).add("a", folders[0]).add("b", folders[1])
        names = iter(["a", "b"] * 50)
        switch_s = median_time(lambda: domains.use(next(names)), args, 20)
        reload_s = median_time(lambda: load_adapter(load_sam2(base_dir), folders[1]), args, max(3, args.steps))
    return {"switch_s": switch_s, "reload_s": reload_s, "reload_over_switch": reload_s / switch_s}


def memory_cells(report: dict, row: dict, key: str) -> list[str]:
    """`row[key]` in MB and as a fraction of full fine-tuning's, or dashes."""
    full = report["strategies"].get("full", {}).get(key)
    value = row.get(key)
    return [f"{value:.0f}" if value is not None else "-", f"{value / full:.2f}" if value and full else "-"]


def to_markdown(report: dict) -> str:
    s = report["settings"]
    rows = report["strategies"].values()
    memory = [("peak_mb", f"peak MB ({s['memory']})")]
    if any("peak_mb_returned" in row for row in rows):
        memory.append(("peak_mb_returned", "peak MB, freed memory returned to the OS"))
    header = ["strategy", "cache", "naive s/step", "ours s/step (1st epoch)", "ours s/step", "images/s", "speedup",
              "GFLOP/step", "MFU"]
    header += [cell for _, title in memory for cell in (title, "/ full")]
    lines = [
        f"# sam2-peft benchmark: {s['config']}, {s['image_size']} px, batch {s['batch_size']}, {s['steps']} steps, "
        f"{s['device']}",
        "",
        f"Command: `{s['command']}`",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, row in report["strategies"].items():
        cells = [name, row["cache"] or "-", f"{row['naive_step_s']:.3f}", f"{row['ours_first_epoch_step_s']:.3f}",
                 f"{row['ours_step_s']:.3f}", f"{row['images_per_s']:.2f}", f"{row['speedup']:.1f}x",
                 f"{row['flops_per_step'] / 1e9:.1f}", f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"]
        cells += [cell for key, _ in memory for cell in memory_cells(report, row, key)]
        lines.append("| " + " | ".join(cells) + " |")
    inf, sw = report["inference"], report["adapter_switch"]
    lines += [
        "",
        f"Inference (one batch, no grad, each timed alternately with the base; medians, and the median of the "
        f"pairs' ratios): LoRA unmerged {inf['unmerged_s']:.3f} s vs base {inf['base_s']:.3f} s "
        f"({inf['unmerged_over_base']:.3f}x), merged {inf['merged_s']:.3f} s vs base {inf['base_again_s']:.3f} s "
        f"({inf['merged_over_base']:.3f}x).",
        "",
        f"Adapter switch: {sw['switch_s'] * 1e3:.3f} ms; reload base + adapter: {sw['reload_s'] * 1e3:.1f} ms "
        f"({sw['reload_over_switch']:.0f}x).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="hiera-tiny",
                        help=f"{', '.join(CONFIGS)} (random weights; hiera-tiny is Sam2Config()) or tiny-random")
    parser.add_argument("--image_size", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="batches per epoch (distinct images)")
    parser.add_argument("--objects", type=int, default=4, help="box-prompted objects per image")
    parser.add_argument("--strategies", default="decoder,partial,lora,full")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="checkpoint Hiera blocks and the mask decoder (per object) in ours")
    parser.add_argument("--checkpoint_strips", type=int, default=4,
                        help="strips per windowed Hiera block when checkpointing (1: whole blocks)")
    parser.add_argument("--mixed_precision", choices=["no", "bf16"], default="no",
                        help="bf16 autocast of ours' forward, and of the naive loop's on CUDA (fp32 on CPU)")
    parser.add_argument("--backend", default="auto", help="ours' backend: auto, reference, cpu or cuda")
    parser.add_argument("--no_memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--output", default="runs/benchmark", help="folder for benchmark.json and benchmark.md")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: one CPU memory run
    args = parser.parse_args()
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.probe:
        run_probe(args)
        return
    strategies = args.strategies.split(",")
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        raise SystemExit(f"--strategies: unknown {unknown}; choose from {','.join(STRATEGIES)}.")

    batches = make_batches(args, args.steps)
    cuda = args.device.type == "cuda"
    ceiling = matmul_ceiling(args.device) if cuda else None
    report = {"settings": {
        "config": args.config, "backend": args.backend,
        "matmul_ceiling_tflops": ceiling / 1e12 if ceiling else None,
        "image_size": args.image_size, "batch_size": args.batch_size, "steps": args.steps,
        "objects": args.objects, "gradient_checkpointing": args.gradient_checkpointing,
        "checkpoint_strips": args.checkpoint_strips if args.gradient_checkpointing else None,
        "mixed_precision": args.mixed_precision,
        "device": torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads",
        "memory": "CUDA max allocated" if cuda else "peak RSS growth",
        "command": " ".join(["python", "scripts/benchmark.py", *sys.argv[1:]]),
    }, "strategies": {}}
    for strategy in strategies:
        row = run_strategy(args, strategy, batches)
        row["flops_per_step"] = step_flops(args, strategy, batches[0])
        row["mfu"] = mfu(row["flops_per_step"], row["ours_step_s"], ceiling) if cuda else None
        row["peak_mb"] = None if args.no_memory else probe_memory(args, strategy, "ours")
        if not args.no_memory and cuda:
            row["naive_peak_mb"] = probe_memory(args, strategy, "naive")
        if not args.no_memory and not cuda:
            row["peak_mb_returned"] = probe_memory(args, strategy, "ours", heap="returned")
        report["strategies"][strategy] = row
        print(f"{strategy}: {json.dumps(row)}", flush=True)
    report["inference"] = run_inference(args)
    report["adapter_switch"] = run_adapter_switch(args)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "benchmark.json").write_text(json.dumps(report, indent=2))
    markdown = to_markdown(report)
    (output / "benchmark.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
