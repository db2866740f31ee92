"""Speed behind one boundary: which computation each fast path takes, switched per device (`--backend`).

    from sam2_peft.speed import select_backend
    backend = select_backend("auto", device)        # reference | cpu | cuda
    segmenter = Sam2Segmenter(model, backend="reference")   # the plain transformers modules, to debug with

Everything outside this package computes through a `Backend` (`backends.py`): `Sam2Segmenter` (encode, project,
decode), `family.encode_prefix` / `encode_from_prefix` (the split encoder forward of the prefix cache) and
`memory.enable_gradient_checkpointing` (strips). The fast paths themselves: `decoder.py` and `layers.py` (the
decoder on tokens and its GEMM layers), `neck.py` (the FPN on GEMMs), `fused_lora.py` (in-place LoRA),
`strips.py` (checkpoint strips), `hiera.py` (fused window attention), `compiled.py` (regional compilation, the
bucketed decoder); `versions.py` guards the transformers versions they are tested on, and `flops.py` counts what
a step computes (MFU). Tests: tests/speed/, every path against `reference`.
"""

from sam2_peft.speed.backends import BACKENDS, Backend, CpuBackend, CudaBackend, select_backend
from sam2_peft.speed.versions import SUPPORTED_TRANSFORMERS, check_transformers

__all__ = [
    "BACKENDS", "SUPPORTED_TRANSFORMERS", "Backend", "CpuBackend", "CudaBackend", "check_transformers",
    "select_backend",
]
