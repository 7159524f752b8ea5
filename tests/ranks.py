"""Running a test's ranks as processes (gloo on the CPU) under a deadline, shared by the
distributed tests.

CI once sat in test_distributed.py until its 90-minute limit (torch 2.13, gloo), and a loop of
that file here hung once in about 70 runs, in torch's process-group start-up or teardown, not
in a lookup. So: every collective has a timeout, the parent waits at most DEADLINE_S, and a
rank still running then has its Python stacks written (faulthandler on SIGUSR1) into the
failure message before it is killed."""
import datetime
import faulthandler
import os
import signal
import threading
import time

import torch.distributed as dist
import torch.multiprocessing as mp

DEADLINE_S = 120
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def guard_rank(rank: int, out_dir: str) -> None:
    """Stacks to a file on SIGUSR1; and the rank ends itself if the parent is gone before it
    could kill it (no orphan outlives the test run by more than a minute)."""
    stacks = open(os.path.join(out_dir, f"stacks{rank}.txt"), "w")
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    timer = threading.Timer(DEADLINE_S + 60, os._exit, (3,))
    timer.daemon = True  # never what keeps a finished rank alive
    timer.start()
    open(os.path.join(out_dir, f"guarded{rank}"), "w").close()


_out_dir = None  # this rank's folder (each rank is its own process)


def start_group(rank: int, world: int, out_dir: str) -> None:
    """guard_rank, then a gloo group over a file store in this attempt's own folder (a fresh
    rendezvous, no port to race for)."""
    global _out_dir
    _out_dir = out_dir
    guard_rank(rank, out_dir)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank,
                            world_size=world, timeout=COLLECTIVE_TIMEOUT)


def end_group() -> None:
    """Called once the rank's work is done and its results are written: marks it done, then
    tears the group down. Without the barrier torch 2.13's gloo can abort a rank whose peer
    has already torn the group down ("terminate called without an active exception", seen
    in CI); with it, torch 2.14's did so once in a clean-clone `make test` (2026-11-27):
    run_ranks does not take an abort after every rank is marked done for a failure."""
    open(os.path.join(_out_dir, f"done{dist.get_rank()}"), "w").close()
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(worker, args: tuple, out_dir, world: int, deadline_s: float = DEADLINE_S,
              from_guarded: bool = False) -> str | None:
    """Runs worker(rank, *args) on `world` ranks; None when all exited, else the stacks of
    the ranks still running at the deadline (then killed). A rank's error raises, as
    mp.spawn. from_guarded: the deadline counts from the moment every rank has called
    guard_rank (start-up, however slow the machine, is not part of it)."""
    ctx = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = None if from_guarded else time.monotonic() + deadline_s
    while not _join(ctx, out_dir, world):
        if deadline is None:
            if all(os.path.exists(os.path.join(out_dir, f"guarded{r}")) for r in range(world)):
                deadline = time.monotonic() + deadline_s
            continue
        if time.monotonic() > deadline:
            running = [(r, p) for r, p in enumerate(ctx.processes) if p.is_alive()]
            for _, p in running:
                os.kill(p.pid, signal.SIGUSR1)
            time.sleep(2)
            for _, p in running:
                p.kill()
                p.join()
            return "\n".join(f"rank {r} still running after {deadline_s} s:\n" + _stacks(out_dir, r)
                             for r, _ in running)
    return None


def _join(ctx, out_dir, world: int) -> bool:
    """ctx.join(timeout=1), except that a rank aborted (SIGABRT) after every rank marked its
    work done (end_group) is a crash in gloo's teardown, not the test's: warned, not raised.
    (A peer that then raises a Python error in the barrier still fails the test.)"""
    import warnings
    try:
        return ctx.join(timeout=1)
    except mp.ProcessExitedException as err:
        # Only gloo's abort (std::terminate: SIGABRT); a segfault at exit is never excused.
        if err.signal_name == "SIGABRT" and all(
                os.path.exists(os.path.join(out_dir, f"done{r}")) for r in range(world)):
            warnings.warn(f"a rank died in process-group teardown, after every rank's work was "
                          f"done: {err}")
            return True
        raise


def run_with_retry(worker, args_for, tmp_path, world: int, deadline_s: float = DEADLINE_S):
    """run_ranks in a fresh folder; a run that hit the deadline is retried once with a fresh
    rendezvous (a warning with the stacks), a second one fails. args_for(out_dir) gives the
    worker's arguments. Returns the folder of the run that finished."""
    import warnings
    hung = None
    for attempt in (1, 2):
        out = tmp_path / f"try{attempt}"
        out.mkdir()
        again = run_ranks(worker, args_for(str(out)), out, world, deadline_s)
        if again is None:
            if hung is not None:
                warnings.warn(f"ranks hung once; retried with a fresh rendezvous:\n{hung}")
            return out
        if hung is not None:
            raise AssertionError(f"the ranks hung twice:\n{hung}\n--- second run ---\n{again}")
        hung = again


def _stacks(out_dir, rank: int) -> str:
    path = out_dir / f"stacks{rank}.txt"
    return path.read_text() if path.exists() else "(no stacks: the rank had not started Python)"
