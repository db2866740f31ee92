"""Run `recipes/full_finetune.py` under accelerate's FSDP path on CPU (launched by `accelerate launch`).

accelerate only turns a launch into FSDP on accelerators: on CPU it keeps DistributedType.MULTI_CPU and ignores the
FSDP plugin it built from the config file. PyTorch's FSDP itself runs on CPU with gloo, so this worker promotes the
state to FSDP with that plugin, exactly as accelerate does on GPUs; everything after (wrapping by the config's
auto-wrap policy, sharded training, gathering the state dict) is accelerate's and our own unchanged code. Prints the
classes of the FSDP units it built and the parameter dtype of the mixed-precision policy.
"""

import runpy
import sys
from pathlib import Path

import accelerate.accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from torch.distributed.fsdp import FSDPModule

original_init = AcceleratorState.__init__
plugins = []


def init_with_fsdp_on_cpu(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    # Every AcceleratorState() re-reads PartialState's MULTI_CPU: promote each time, with the Accelerator's plugin.
    plugins.extend([kwargs["fsdp_plugin"]] if kwargs.get("fsdp_plugin") is not None else [])
    if self.distributed_type == DistributedType.MULTI_CPU and plugins:
        if getattr(self, "fsdp_plugin", None) is None and self._mixed_precision != "no":
            plugins[0].set_mixed_precision(self._mixed_precision)
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugins[0]


original_prepare = accelerate.accelerator.fsdp2_prepare_model
units = []


def prepare_and_record_units(accelerator, model):
    model = original_prepare(accelerator, model)
    units.extend(type(module).__name__ for module in model.modules() if isinstance(module, FSDPModule))
    return model


AcceleratorState.__init__ = init_with_fsdp_on_cpu
accelerate.accelerator.fsdp2_prepare_model = prepare_and_record_units
recipe = Path(__file__).parents[2] / "recipes" / "full_finetune.py"
sys.argv = [str(recipe), *sys.argv[1:]]
runpy.run_path(str(recipe), run_name="__main__")
print("FSDP units:", ",".join(units))
policy = plugins[0].mixed_precision_policy
print("FSDP parameter dtype:", policy.param_dtype if policy else None)
