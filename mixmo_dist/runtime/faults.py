"""How a rank that stops answering ends: collective timeouts, a lost peer, the hang watchdog, stack dumps, requeue.

A distributed job fails silently in ways a single process never does: a peer that froze, a node whose link went
down, a file system read that never returns. Left to the defaults, every other rank waits inside a collective for
30 minutes (gloo) or 10 (NCCL), and a signal cannot reach it there (a rank blocked in C++ runs no Python handler).
This module bounds every wait and turns a lost peer into the same ending on every surviving rank:

    one line on stderr   "error: rank R lost a peer at step S during OP (peer ADDR): ...; requeueing job J ..."
                         printed before the requeue runs: the requeue ends the job's processes within moments
    its Python stacks    <output_dir>/stacks/rank_<R>.txt (every thread, appended: one block per fault)
    a record             <output_dir>/faults.jsonl (what the requeue bound counts)
    a requeue            `scontrol requeue $SLURM_JOB_ID` under SLURM, at most `fault.max_requeues` times in a row
                         without a new checkpoint
    exit status          EXIT_FAULT (75, sysexits' EX_TEMPFAIL: a temporary failure, worth retrying)

Nothing here imports the rest of the package: the trainer hands in the output directory, the step and the
checkpoint step as they change.
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch

log = logging.getLogger("mixmo_dist")

# sysexits.h EX_TEMPFAIL: the job is worth running again (a peer was lost, a rank hung); launchers and wrappers
# that requeue on a status can key on it. `accelerate launch` (torchrun) turns any non-zero rank status into 1,
# which is why the rank requeues the SLURM job itself before it exits.
EXIT_FAULT = 75

# What a failed collective says, by backend: gloo's timeout and closed pairs, NCCL's watchdog and communicator
# errors, torch's own distributed error types (DistBackendError, DistNetworkError, DistStoreError).
_DIST_FAILURE = re.compile(
    r"gloo|NCCL|Timed out waiting|Connection closed by peer|Connection reset by peer|pair closure|Broken pipe|"
    r"Connection refused|DistBackendError|DistNetworkError|DistStoreError|ProcessGroup|Socket Timeout"
)
# gloo names the other end of a broken pair as "[ADDRESS]:PORT".
_PEER_ADDR = re.compile(r"\[([0-9A-Fa-f.:]+)\]:(\d+)")


def is_distributed_failure(err: BaseException) -> bool:
    """Whether `err`, raised inside a collective (or a backward pass that runs DDP's), means the process group broke."""
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    return isinstance(err, RuntimeError) and bool(_DIST_FAILURE.search(str(err)))


def set_collective_timeout(seconds: float) -> bool:
    """Set the default process group's collective timeout (every later collective, DDP's included).

    torch 2.14 has `torch.distributed.distributed_c10d.set_timeout`; older releases (the GPU machines' 2.11) have the
    private `_set_pg_timeout`, deprecated later. Returns False where neither exists or no group is initialised.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    c10d = dist.distributed_c10d
    setter = getattr(c10d, "set_timeout", None) or getattr(c10d, "_set_pg_timeout", None)
    if setter is None:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        setter(datetime.timedelta(seconds=seconds))
    return True


def nccl_environment(stacks_dir: Path) -> dict[str, str]:
    """Variables that make a timed-out NCCL collective an error with a record, set before the process group exists.

    Asynchronous error handling tears the rank down when its NCCL watchdog sees a collective time out (instead of a
    hang); the flight recorder keeps the last collectives of each rank and dumps them on timeout into
    `stacks_dir/nccl_trace_rank_<R>` (torch >= 2.3 reads these names; older releases ignore them). Values a user
    exported win.
    """
    return {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": str(stacks_dir / "nccl_trace_rank_"),
    }


class PeerLost(Exception):
    """A collective failed or timed out on this rank: a peer is gone, frozen or unreachable.

    Attributes:
        step: the optimizer step the rank was at.
        op: the operation it was in ("all-reduce of the step's flags", "gradient all-reduce", ...).
        peer: the peer's address where the backend named it, else None.
        stacks: the file this rank's Python stacks were written to, or None.
        state: the rank's FaultState when the fault happened (what the requeue record needs).
    """

    def __init__(
        self, message: str, *, step: int, op: str, peer: str | None, stacks: Path | None, state: FaultState
    ) -> None:
        super().__init__(message)
        self.step, self.op, self.peer, self.stacks, self.state = step, op, peer, stacks, state


@dataclass
class FaultState:
    """What a rank is doing, for the one line and the stack file of a fault; updated by the trainer as it goes.

    Attributes:
        rank: global rank.
        stacks_dir: where stack files go (`<output_dir>/stacks`); None until the output directory exists (a fault
            before that dumps its stacks to stderr).
        step: the current optimizer step.
        op: the collective (or phase) in progress.
        checkpoint_step: the step of the newest complete checkpoint this run saved or resumed from (-1: none).
    """

    rank: int = 0
    stacks_dir: Path | None = None
    step: int = 0
    op: str = "start-up"
    checkpoint_step: int = -1
    _dumped: set = field(default_factory=set)

    def dump_stacks(self, reason: str) -> Path | None:
        """Append every thread's Python stack, under a header naming `reason`, to `stacks/rank_<R>.txt`."""
        header = f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} rank {self.rank} step {self.step}: {reason}\n"
        if self.stacks_dir is None:
            sys.stderr.write(header)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            return None
        try:
            self.stacks_dir.mkdir(parents=True, exist_ok=True)
            path = self.stacks_dir / f"rank_{self.rank}.txt"
            with open(path, "a") as f:
                f.write(header)
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            return path
        except OSError:  # a full or gone disk must not hide the fault itself
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            return None

    def enable_crash_stacks(self) -> None:
        """Have faulthandler append every thread's stack to `stacks/rank_<R>.txt` if the process dies of SIGABRT,
        SIGSEGV, SIGBUS, SIGFPE or SIGILL (NCCL's watchdog aborts a rank whose collective timed out)."""
        if self.stacks_dir is None:
            return
        self.stacks_dir.mkdir(parents=True, exist_ok=True)
        self._crash_file = open(self.stacks_dir / f"rank_{self.rank}.txt", "a")  # noqa: SIM115 (open for life)
        faulthandler.enable(file=self._crash_file, all_threads=True)

    @contextmanager
    def during(self, op: str, *, always: bool = False) -> Iterator[None]:
        """Run a block that holds collectives as operation `op`: a broken process group inside it becomes PeerLost.

        Args:
            always: any RuntimeError inside is a collective's (a block that runs nothing but the collective);
                otherwise only errors that read as a distributed failure are converted.
        """
        previous, self.op = self.op, op
        try:
            yield
        except RuntimeError as err:
            if isinstance(err, PeerLost) or not (always or is_distributed_failure(err)):
                raise
            raise self.lost(op, err) from err
        finally:
            self.op = previous

    def lost(self, op: str, err: BaseException) -> PeerLost:
        """The PeerLost for `err`, raised inside `op`; the stacks are written here, where the collective failed."""
        detail = " ".join(str(err).split())
        detail = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", detail)  # the C++ source position says nothing
        if len(detail) > 300:
            detail = detail[:300].rsplit(" ", 1)[0] + " ..."
        match = _PEER_ADDR.search(str(err))
        peer = f"{match.group(1)}:{match.group(2)}" if match else None
        stacks = self.dump_stacks(f"lost a peer during {op}: {detail}")
        where = f" (peer {peer})" if peer else " (the backend does not say which peer)"
        message = f"rank {self.rank} lost a peer at step {self.step} during {op}{where}: {detail}"
        return PeerLost(message, step=self.step, op=op, peer=peer, stacks=stacks, state=self)


class Watchdog:
    """Ends a rank on which nothing completes for too long: a hang outside collectives (a stalled read, a deadlock).

    A daemon thread checks the time since the last `beat()`; past the limit it writes every thread's stacks, prints
    one line, with `on_fire(say)` (the requeue) and ends the process with EXIT_FAULT: the rank cannot be
    unblocked from another thread, and its peers then stop on their collective timeout.

    Args:
        state: the rank's FaultState (step, operation, stack directory).
        limit_s: seconds without a beat that end the rank (<= 0: never started).
        on_fire: called before the exit with `say(phrase)`, which prints the rank's line ending in `phrase` (the
            requeue's outcome, said before the requeue runs); if it never calls `say` (or raises), the line is
            printed anyway.
    """

    def __init__(
        self, state: FaultState, limit_s: float, on_fire: Callable[[Callable[[str], None]], object] | None = None
    ) -> None:
        self.state, self.limit_s, self.on_fire = state, float(limit_s), on_fire
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.limit_s <= 0 or self._thread is not None:
            return
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="mixmo-watchdog", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        """Something completed (a step, a validation batch, a checkpoint file)."""
        self._last = time.monotonic()

    def set_limit(self, limit_s: float) -> None:
        self.limit_s = float(limit_s)
        self.beat()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.limit_s / 10)):
            idle = time.monotonic() - self._last
            if idle > self.limit_s:
                self._fire(idle)
                return

    def _fire(self, idle: float) -> None:
        st = self.state
        reason = f"nothing completed for {idle:.0f} s (fault.watchdog_s={self.limit_s:g}) during {st.op}"
        stacks = st.dump_stacks(reason)
        where = f"; stacks in {stacks}" if stacks else ""
        message = f"rank {st.rank} hung at step {st.step}: {reason}{where}"
        said: list[str] = []

        def say(phrase: str) -> None:
            said.append(phrase)
            print(f"error: {message}{phrase}", file=sys.stderr, flush=True)

        if self.on_fire is not None:
            try:
                self.on_fire(say)
            except Exception as err:  # noqa: BLE001  (the exit below must happen whatever the requeue did)
                if not said:
                    say(f"; requeue failed: {err}")
        if not said:
            say("")
        logging.shutdown()
        os._exit(EXIT_FAULT)


# ------------------------------------------------------------------------------------------------------ requeue


def end_rank_after_fault(err: PeerLost, out_dir: Path, max_requeues: int) -> NoReturn:
    """This rank's ending after a lost peer: record, requeue (SLURM), one line on stderr, exit EXIT_FAULT.

    `os._exit`, not an exception: a teardown of the broken process group (or DataLoader workers waiting on it) could
    block again, and the point is to end within seconds. The run lock is a kernel lock that ends with the process;
    the forkserver and workers die with the rank (parent-death signals).
    """
    stacks = f"; stacks in {err.stacks}" if err.stacks else ""

    def say(phrase: str) -> None:
        print(f"error: {err}{stacks}{phrase}", file=sys.stderr, flush=True)

    record_and_requeue(out_dir if out_dir.is_dir() else None, err.state, "lost peer", max_requeues, say)
    logging.shutdown()
    os._exit(EXIT_FAULT)


def fault_requeue_command() -> list[str] | None:
    """`scontrol requeue JOB` where this rank runs in a SLURM job that asked for requeues, else None.

    `slurm_launch` (sbatch) sets MIXMO_REQUEUE_CMD=scontrol; submitit's TrainJob sets MIXMO_FAULT_REQUEUE=scontrol on
    a SLURM cluster (it leaves preemptions to submitit's own handler, which needs the signal, not a fault).
    """
    job = os.environ.get("SLURM_JOB_ID")
    asked = "scontrol" in (os.environ.get("MIXMO_REQUEUE_CMD"), os.environ.get("MIXMO_FAULT_REQUEUE"))
    return ["scontrol", "requeue", job] if job and asked else None


def record_and_requeue(
    out_dir: Path | None,
    state: FaultState,
    kind: str,
    max_requeues: int,
    say: Callable[[str], None] = lambda phrase: None,
) -> str:
    """Append this fault to `faults.jsonl` and requeue the SLURM job when the bound allows; returns the outcome as
    a phrase for the rank's line ("; requeueing job J (2 of fault.max_requeues=3 in a row)", "; not requeued: ...",
    or "" outside SLURM).

    `say(phrase)` prints the rank's line and is called before `scontrol requeue` runs: a requeue ends the job's
    processes (slurmstepd's signals, the launcher's death) within moments, this one included, so a line printed
    after it would often be lost. A requeue that then fails gets a second line, "error: rank R: requeue ...".

    The bound counts job restarts that ended in a fault with no newer checkpoint than now: a job that keeps failing
    at the same point stops after `max_requeues` tries, a job that makes progress between faults never does. Every
    surviving rank calls this; the first `scontrol requeue` requeues the job and the others' are refused by
    slurmctld (the job is already pending), which is harmless.
    """
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    record = {
        "time": time.time(),
        "kind": kind,
        "rank": state.rank,
        "host": socket.gethostname(),
        "step": state.step,
        "op": state.op,
        "checkpoint_step": state.checkpoint_step,
        "job": os.environ.get("SLURM_JOB_ID"),
        "restart": restart,
    }
    earlier = _read_faults(out_dir) if out_dir is not None else []
    cmd = fault_requeue_command()
    same = {
        (r.get("job"), r.get("restart"))
        for r in earlier + [record]
        if r.get("checkpoint_step") == state.checkpoint_step and r.get("job") == record["job"]
    }
    # The decision goes into the record: the batch script requeues from it when this rank's own `scontrol requeue`
    # is killed with the step before it reaches slurmctld (`requeue_after_failed_step`).
    record["requeue"] = cmd is not None and len(same) <= max_requeues
    if out_dir is not None:
        try:
            with open(out_dir / "faults.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError:
            pass
    if cmd is None:
        say("")
        return ""
    if not record["requeue"]:
        phrase = (
            f"; not requeued: {len(same)} restarts of job {record['job']} ended in a fault without a newer "
            f"checkpoint than step {state.checkpoint_step} (fault.max_requeues={max_requeues})"
        )
        say(phrase)
        return phrase
    phrase = f"; requeueing job {record['job']} ({len(same)} of fault.max_requeues={max_requeues} in a row)"
    say(phrase)
    failure = _run_requeue(cmd)
    if failure:
        print(f"error: rank {state.rank}: {failure} (another rank may have requeued)", file=sys.stderr, flush=True)
    return phrase


def _run_requeue(cmd: list[str]) -> str | None:
    """Runs `scontrol requeue JOB`; None when slurmctld took it, else what went wrong (scontrol's answer or the
    error of running it)."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"`{' '.join(cmd)}` failed: {err}"
    return None if res.returncode == 0 else f"`{' '.join(cmd)}` answered: {' '.join(res.stderr.split())[:200]}"


def requeue_after_failed_step(out_dir: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    """The batch script's requeue after its training step failed: `(status, line)`.

    A rank that decides to requeue (a lost peer, a hang) prints its line and then runs `scontrol requeue` as its own
    child; srun's `--kill-on-bad-exit` can end the step, and that child with it, before the request reaches
    slurmctld (seen: 17 ms between the line and the step's end). The batch script runs outside the step, so when srun
    fails it calls this: if `faults.jsonl` holds a record of this job and restart (SLURM_JOB_ID,
    SLURM_RESTART_COUNT) whose decision was to requeue, it runs `scontrol requeue JOB` itself. A second request for a
    job that a rank did requeue is refused by slurmctld (the job is already pending), which is harmless.

    Returns:
        status 0 when the job was requeued here or nothing asked for it (the line says which), 1 when the request
        was refused or failed (the line gives scontrol's answer).
    """
    env = dict(os.environ if env is None else env)
    job = env.get("SLURM_JOB_ID", "")
    restart = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    if not job:
        return 0, "not a SLURM job: nothing to requeue"
    asked = [
        r
        for r in _read_faults(out_dir)
        if str(r.get("job")) == job and r.get("restart") == restart and r.get("requeue") is True
    ]
    if not asked:
        return 0, f"no rank of job {job} (restart {restart}) asked for a requeue in {out_dir / 'faults.jsonl'}"
    first = asked[0]
    why = f"rank {first.get('rank')} asked for it after a {first.get('kind')} at step {first.get('step')}"
    failure = _run_requeue(["scontrol", "requeue", job])
    if failure:
        return 1, f"{failure} (a rank may have requeued it already); {why}"
    return 0, f"requeued job {job}: {why}"


def _read_faults(out_dir: Path) -> list[dict]:
    try:
        lines = (out_dir / "faults.jsonl").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a full disk or a kill
    return out
