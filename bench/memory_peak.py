"""What holds GPU memory at a run's peak: replays the allocation trace of a CUDA memory snapshot
(torch.cuda.memory._dump_snapshot) to the moment the most memory was allocated, and sums what is alive then by the
line of code that allocated it (the first frame outside torch itself).

    python bench/memory_peak.py snapshot.pickle          # a snapshot from bench/e2e.py --memory_snapshot, or any
    python bench/memory_peak.py bench/results/11_memory_snapshot_cp2_524288.pickle.gz   # one recorded on 2 H200s

bench/e2e.py --memory_snapshot PATH records the trace from before the model is built and prints this table at the end.
torch's own viewers draw the same trace: `python -m torch.cuda._memory_viz trace_plot PATH -o trace.html`.
"""

import argparse
import gzip
import pickle
from collections import defaultdict


def live_at_peak(trace):
    """(peak bytes, the alloc entries alive at the peak) of one device's trace."""

    def replay(entries):
        live, total, peak, peak_index = {}, 0, 0, -1
        for i, entry in enumerate(entries):
            if entry["action"] == "alloc":
                live[entry["addr"]] = entry
                total += entry["size"]
            elif entry["action"] == "free_completed" and entry["addr"] in live:
                total -= live.pop(entry["addr"])["size"]
            if total > peak:
                peak, peak_index = total, i
        return live, peak, peak_index

    _, peak, peak_index = replay(trace)
    live, _, _ = replay(trace[: peak_index + 1])
    return peak, list(live.values())


def allocation_site(entry):
    """The innermost frame outside torch's own code: the model's, a kernel library's or ours."""
    for frame in entry.get("frames", []):
        if "/torch/" not in frame["filename"] and not frame["filename"].startswith("<"):
            return f"{frame['name']} ({frame['filename'].rsplit('/', 1)[-1]}:{frame['line']})"
    return "(no frame outside torch)"


def peak_breakdown(snapshot, top=15):
    """Lines of a table: the peak, then the allocation sites holding the most of it."""
    trace = max(snapshot["device_traces"], key=len)  # the device that ran
    peak, live = live_at_peak(trace)
    by_site = defaultdict(lambda: [0, 0])
    for entry in live:
        by_site[allocation_site(entry)][0] += entry["size"]
        by_site[allocation_site(entry)][1] += 1
    lines = [f"peak allocated: {peak / 2**30:.2f} GiB, held by {len(live)} tensors; the largest sites:"]
    for site, (size, count) in sorted(by_site.items(), key=lambda item: -item[1][0])[:top]:
        lines.append(f"{size / 2**30:9.2f} GiB {count:6d} x  {site}")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("snapshot", help="a pickle written by torch.cuda.memory._dump_snapshot (or gzipped: .gz)")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    with (gzip.open if args.snapshot.endswith(".gz") else open)(args.snapshot, "rb") as f:
        print("\n".join(peak_breakdown(pickle.load(f), args.top)))


if __name__ == "__main__":
    main()
