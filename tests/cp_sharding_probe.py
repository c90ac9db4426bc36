"""run_magi_clm.py with a record of what each rank trains on. Run under torchrun with run_magi_clm.py's arguments;
each rank writes $PROBE_DIR/rank{RANK}.json: per micro-batch, the samples it got (before the CP split), the
token count the Trainer normalizes the loss of that step with, and whether the gradients live in DDP's buckets."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import run_magi_clm  # noqa: E402

records = []
training_step = run_magi_clm.MagiTrainer.training_step


def recording_training_step(self, model, inputs, num_items_in_batch=None):
    record = {"step": self.state.global_step, "labels": inputs["labels"].tolist(),
              "num_items_in_batch": None if num_items_in_batch is None else int(num_items_in_batch)}
    loss = training_step(self, model, inputs, num_items_in_batch)
    # Whether every gradient is a view of DDP's buckets after this micro-batch's backward.
    record["gradients_in_ddp_buckets"] = all(p.grad is not None and p.grad._base is not None
                                             for p in model.parameters())
    records.append(record)
    return loss


run_magi_clm.MagiTrainer.training_step = recording_training_step
run_magi_clm.main()
Path(os.environ["PROBE_DIR"], f"rank{os.environ['RANK']}.json").write_text(json.dumps(records))
