"""Imported by every process of a run with PYTHONPATH=tests/fsdp_on_cpu (tests/test_fsdp.py), and acting in the ranks:

- accelerate takes its FSDP path on GPUs only and trains CPU processes with DDP instead: here it takes it on CPU
  processes too, its offload without pinned memory (which needs a GPU). Past that switch everything is accelerate's
  and torch's own FSDP2, over gloo.
- with FSDP_PROBE_DIR set, each rank writes FSDP_PROBE_DIR/rank{RANK}.json after every optimizer step: how many
  elements of the model's parameters, gradients and optimizer state it holds, of how many, on which device mesh,
  and FSDP's offload policies.
"""

import json
import os

if "RANK" in os.environ:
    import accelerate.state
    import torch.distributed as dist
    import transformers.trainer
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule
    from torch.distributed.tensor import DTensor
    from transformers import TrainerCallback

    init = accelerate.state.AcceleratorState.__init__

    def init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        # Every AcceleratorState() copies the process's distributed type back in: set FSDP again each time.
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        fsdp_plugin = fsdp_plugin or getattr(self, "fsdp_plugin", None)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
            if isinstance(fsdp_plugin.cpu_offload, CPUOffloadPolicy):
                fsdp_plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)  # pinned memory needs a GPU

    accelerate.state.AcceleratorState.__init__ = init_with_fsdp_on_cpu

    def held_and_total(tensors):
        tensors = list(tensors)
        return [sum(t.to_local().numel() if isinstance(t, DTensor) else t.numel() for t in tensors),
                sum(t.numel() for t in tensors)]

    class RecordModelState(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
            params = list(model.parameters())
            record = {
                "world_size": dist.get_world_size(),
                "meshes": sorted({f"{p.device_mesh.mesh.tolist()} {p.placements}" if isinstance(p, DTensor) else "none"
                                  for p in params}),
                "parameters": held_and_total(params),
                "gradients": held_and_total(p.grad for p in params),
                "optimizer_state": held_and_total(t for s in optimizer.state.values() for t in s.values() if t.dim()),
                "offload_policies": sorted({type(group.offload_policy).__name__ for group in (
                    m._get_fsdp_state()._fsdp_param_group for m in model.modules() if isinstance(m, FSDPModule)
                ) if group is not None}),
            }
            with open(os.path.join(os.environ["FSDP_PROBE_DIR"], f"rank{os.environ['RANK']}.json"), "w") as f:
                json.dump(record, f)

    if os.environ.get("FSDP_PROBE_DIR"):
        transformers.trainer.DEFAULT_CALLBACKS.append(RecordModelState())
