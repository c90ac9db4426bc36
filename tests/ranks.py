"""Run a test function on the ranks of a real gloo process group: one spawned process per rank, CPU threads 1."""

import os
import queue
import traceback
from datetime import timedelta

import torch
import torch.multiprocessing as mp

WORKER_TIMEOUT_S = 120


def _run_rank(rank, world_size, store_path, function, results):
    try:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
        torch.distributed.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                                             world_size=world_size, timeout=timedelta(seconds=60))
        function(torch.distributed.group.WORLD)
        torch.distributed.destroy_process_group()
        results.put((rank, None))
    except BaseException:
        results.put((rank, traceback.format_exc()))


def run_on_ranks(function, world_size, tmp_path):
    """function(group) on every rank (a module-level function: each process imports it); fails with the first
    rank's error."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    workers = [ctx.Process(target=_run_rank, args=(rank, world_size, str(tmp_path / "store"), function, results),
                           daemon=True) for rank in range(world_size)]
    for worker in workers:
        worker.start()
    failures = []
    try:
        for _ in range(world_size):
            try:
                rank, error = results.get(timeout=WORKER_TIMEOUT_S)
            except queue.Empty:
                failures.append(f"timed out after {WORKER_TIMEOUT_S}s waiting for the ranks")
                break
            if error is not None:
                failures.append(f"rank {rank}:\n{error}")
                break  # the other ranks may now be stuck in a collective
    finally:
        for worker in workers:
            worker.join(timeout=0 if failures else 30)
            if worker.is_alive():
                worker.terminate()
                worker.join()
    assert not failures, "\n".join(failures)
