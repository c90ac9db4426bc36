"""Draw results.png: train loss per step of the baseline and of the CP runs, read from their trainer_state.json.

    bash run_origin_clm.sh; for cp in 1 2 4 8; do CP_SIZE=$cp bash run_magi_clm.sh; done
    python bench/plot_results.py

Each CP curve's legend gives its largest |loss difference| against the baseline over the common steps, or with
--last_steps N its mean |loss difference| over the last N common steps (results_gpu.png, drawn by
bench/loss_alignment.sh).
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_losses(output_dir):
    history = json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def max_abs_difference(losses, baseline):
    """Largest |loss difference| over the steps both runs logged."""
    steps = baseline.keys() & losses.keys()
    if not steps:
        raise ValueError("the run and the baseline have no logged step in common")
    return max(abs(losses[s] - baseline[s]) for s in steps)


def mean_abs_difference(losses, baseline, last_steps):
    """Mean |loss difference| over the last last_steps steps that both runs logged."""
    steps = sorted(baseline.keys() & losses.keys())[-last_steps:]
    if len(steps) < last_steps:
        raise ValueError(f"the run and the baseline have {len(steps)} logged steps in common, fewer than {last_steps}")
    return sum(abs(losses[s] - baseline[s]) for s in steps) / len(steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="output/origin", help="output_dir of run_origin_clm.sh")
    parser.add_argument("--cp_runs", nargs="+", default=[f"output/magi_cp{cp}" for cp in (1, 2, 4, 8)],
                        help="output_dirs of run_magi_clm.sh, one per CP size")
    parser.add_argument("--out", default="results.png")
    parser.add_argument("--last_steps", type=int, help="legend: mean |loss difference| over this many last steps")
    parser.add_argument("--title", default="Context parallelism against the baseline (embedded default, float32, CPU)")
    args = parser.parse_args()

    baseline = read_losses(args.baseline)
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(list(baseline), list(baseline.values()), color="black", linewidth=3, alpha=0.35, label="no CP (baseline)")
    for run in args.cp_runs:
        losses = read_losses(run)
        if args.last_steps:
            difference = f"mean |diff| over the last {args.last_steps} steps {mean_abs_difference(losses, baseline, args.last_steps):.4f}"
        else:
            difference = f"max |diff| {max_abs_difference(losses, baseline):.1e}"
        ax.plot(list(losses), list(losses.values()), linewidth=1, label=f"{Path(run).name}: {difference}")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title(args.title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
