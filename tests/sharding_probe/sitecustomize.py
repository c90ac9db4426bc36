"""Imported by every process of a run with PYTHONPATH=tests/sharding_probe (tests/test_cp_exactness.py): with
SHARDING_PROBE_DIR set, each rank keeps SHARDING_PROBE_DIR/rank{RANK}.json up to date with a record per micro-batch:
the samples it got (before the CP split), the token count the Trainer normalizes that step's loss with, and whether
the gradients live in DDP's buckets after its backward."""

import json
import os

if "RANK" in os.environ and "SHARDING_PROBE_DIR" in os.environ:
    import transformers

    records = []
    training_step = transformers.Trainer.training_step

    def recording_training_step(self, model, inputs, num_items_in_batch=None):
        record = {"step": self.state.global_step, "labels": inputs["labels"].tolist(),
                  "num_items_in_batch": None if num_items_in_batch is None else int(num_items_in_batch)}
        loss = training_step(self, model, inputs, num_items_in_batch)
        record["gradients_in_ddp_buckets"] = all(p.grad is not None and p.grad._base is not None
                                                 for p in model.parameters())
        records.append(record)
        with open(os.path.join(os.environ["SHARDING_PROBE_DIR"], f"rank{os.environ['RANK']}.json"), "w") as f:
            json.dump(records, f)
        return loss

    transformers.Trainer.training_step = recording_training_step
