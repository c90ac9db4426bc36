"""bench/memory_peak.py finds the peak of an allocation trace and what is alive then (synthetic traces: recording one
needs a GPU; bench/e2e.py --memory_snapshot does that there)."""

import pickle
import subprocess
import sys
from pathlib import Path

from bench.memory_peak import live_at_peak, peak_breakdown

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30


def event(action, addr, size, site="forward", filename="/repo/model.py"):
    frames = [{"filename": "/site-packages/torch/nn/functional.py", "line": 1, "name": "linear"},
              {"filename": filename, "line": 7, "name": site}]
    return {"action": action, "addr": addr, "size": size, "frames": frames}


# weights (2 GiB, kept); activations a, b (1 GiB each) freed in the backward; then a gradient (2 GiB) after they go:
# the peak is 4 GiB, while a and b are alive, not the 4 GiB at the end counted twice.
TRACE = [
    event("alloc", 1, 2 * GIB, "init_weights"),
    event("alloc", 2, GIB, "mlp"),
    event("alloc", 3, GIB, "attention"),
    event("free_requested", 2, GIB, "mlp"),
    event("free_completed", 2, GIB, "mlp"),
    event("free_completed", 3, GIB, "attention"),
    event("alloc", 4, GIB, "backward"),
    event("segment_alloc", 9, 8 * GIB),
]


def test_the_peak_and_what_holds_it():
    peak, live = live_at_peak(TRACE)
    assert peak == 4 * GIB
    assert sorted(entry["addr"] for entry in live) == [1, 2, 3]
    lines = peak_breakdown({"device_traces": [[], TRACE]})  # the device that ran is found
    assert lines[0] == "peak allocated: 4.00 GiB, held by 3 tensors; the largest sites:"
    assert "init_weights (model.py:7)" in lines[1] and lines[1].split()[0] == "2.00"


def test_the_command_reads_a_snapshot(tmp_path):
    path = tmp_path / "snapshot.pickle"
    path.write_bytes(pickle.dumps({"device_traces": [TRACE], "segments": []}))
    out = subprocess.run([sys.executable, "bench/memory_peak.py", str(path)], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert out.splitlines()[0].startswith("peak allocated: 4.00 GiB")

