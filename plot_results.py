"""Draw results.png: train loss per step of the baseline and of the CP runs, read from their trainer_state.json.

    bash run_origin_clm.sh; for cp in 1 2 4 8; do CP_SIZE=$cp bash run_magi_clm.sh; done
    python plot_results.py

Each CP curve's legend gives its largest |loss difference| against the baseline over the common steps.
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="output/origin", help="output_dir of run_origin_clm.sh")
    parser.add_argument("--cp_runs", nargs="+", default=[f"output/magi_cp{cp}" for cp in (1, 2, 4, 8)],
                        help="output_dirs of run_magi_clm.sh, one per CP size")
    parser.add_argument("--out", default="results.png")
    args = parser.parse_args()

    baseline = read_losses(args.baseline)
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.plot(list(baseline), list(baseline.values()), color="black", linewidth=3, alpha=0.35, label="no CP (baseline)")
    for run in args.cp_runs:
        losses = read_losses(run)
        ax.plot(list(losses), list(losses.values()), linewidth=1,
                label=f"{Path(run).name}: max |diff| {max_abs_difference(losses, baseline):.1e}")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title("Context parallelism against the baseline (embedded default, float32, CPU)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
