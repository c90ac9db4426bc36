"""bench/plot_results.py reads trainer_state.json files and writes the figure."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.plot_results import max_abs_difference, mean_abs_difference, read_losses

REPO = Path(__file__).resolve().parent.parent


def write_state(folder, losses):
    folder.mkdir()
    history = [{"step": i + 1, "loss": loss} for i, loss in enumerate(losses)] + [{"step": len(losses), "train_loss": 1}]
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    return folder


def test_reads_losses_and_measures_the_largest_difference(tmp_path):
    baseline = read_losses(write_state(tmp_path / "origin", [3.0, 2.0, 1.0]))
    run = read_losses(write_state(tmp_path / "cp2", [3.0, 2.5, 1.1]))
    assert baseline == {1: 3.0, 2: 2.0, 3: 1.0}
    assert max_abs_difference(run, baseline) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no logged step in common"):
        max_abs_difference({7: 1.0}, baseline)


def test_mean_difference_over_the_last_steps():
    baseline = {1: 3.0, 2: 2.0, 3: 1.0}
    run = {1: 9.0, 2: 2.2, 3: 1.0}
    assert mean_abs_difference(run, baseline, 2) == pytest.approx(0.1)  # steps 2 and 3, not the first
    with pytest.raises(ValueError, match="2 logged steps in common, fewer than 3"):
        mean_abs_difference({2: 2.0, 3: 1.0}, baseline, 3)


def test_writes_the_figure(tmp_path):
    baseline = write_state(tmp_path / "origin", [3.0, 2.0, 1.0])
    runs = [write_state(tmp_path / f"magi_cp{cp}", [3.0, 2.0 + cp * 1e-3, 1.0]) for cp in (1, 2)]
    out = tmp_path / "results.png"
    subprocess.run([sys.executable, "bench/plot_results.py", "--baseline", str(baseline),
                    "--cp_runs", *map(str, runs), "--out", str(out)], cwd=REPO, check=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
