"""Rank faults under torchrun: a heartbeat per rank in the c10d store, and one clear message naming the ranks that
went silent when a collective fails or times out.

Under torchrun the default store is the agent's (``TORCHELASTIC_USE_AGENT_STORE``), so it outlives any worker: a
survivor can still read it after a peer was killed. Heartbeats are counters, not clock times, so machines with
skewed clocks compare nothing but "did it move".
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

import torch.distributed as dist

HEARTBEAT_SECONDS = 1.0
SILENT_AFTER = 3.0  # heartbeats of a live rank move at least twice in this window
_KEY = "flowgrove/heartbeat/{}"


@dataclass
class Heartbeat:
    """The thread that writes this rank's counter; ``stop()`` ends it (it is a daemon either way)."""

    store: object
    rank: int
    world: int
    done: threading.Event
    thread: threading.Thread

    def stop(self) -> None:
        self.done.set()


@dataclass(frozen=True)
class PeerFailure:
    """What a survivor knows after a collective failed: the silent ranks (None: the store was unreachable)."""

    rank: int
    silent: list[int] | None
    error: str


def collective_timeout(seconds: float) -> timedelta:
    """``run.collective_timeout`` -> the timedelta ``init_process_group`` takes."""
    if seconds <= 0:
        raise ValueError(f"run.collective_timeout={seconds} must be a positive number of seconds")
    return timedelta(seconds=seconds)


def _beat(store, key: str, done: threading.Event, interval: float) -> None:  # noqa: ANN001
    count = 0
    while not done.is_set():
        count += 1
        try:
            store.set(key, str(count))
        except Exception:  # noqa: BLE001  (the store went away: nothing left to report to)
            return
        done.wait(interval)


def start_heartbeat(interval: float = HEARTBEAT_SECONDS) -> Heartbeat | None:
    """Start this rank's heartbeat; None without a process group of two or more ranks."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    store = dist.distributed_c10d._get_default_store()
    rank, done = dist.get_rank(), threading.Event()
    thread = threading.Thread(target=_beat, args=(store, _KEY.format(rank), done, interval),
                              name="flowgrove-heartbeat", daemon=True)
    thread.start()
    return Heartbeat(store, rank, dist.get_world_size(), done, thread)


def _read(store, world: int) -> list[str | None]:  # noqa: ANN001
    """Every rank's counter; ``check`` first, because ``get`` of a missing key blocks until the store's timeout."""
    keys = [_KEY.format(r) for r in range(world)]
    return [store.get(k).decode() if store.check([k]) else None for k in keys]


def silent_ranks(beat: Heartbeat, window: float = SILENT_AFTER) -> list[int] | None:
    """The other ranks whose heartbeat did not move within ``window`` seconds; None if the store is unreachable."""
    try:
        first = _read(beat.store, beat.world)
        time.sleep(window)
        second = _read(beat.store, beat.world)
    except Exception:  # noqa: BLE001  (the store's host is gone too)
        return None
    return [r for r in range(beat.world) if r != beat.rank and (second[r] is None or first[r] == second[r])]


def looks_like_collective_error(err: BaseException) -> bool:
    """A failure of the process group (a peer gone, a timeout), as opposed to a bug in this rank's own code."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return any(s in text for s in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "timed out",
                                   "Timed out", "Socket Timeout", "Broken pipe"))


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def failure_message(failure: PeerFailure, checkpoint: Path | None, resume_hint: str) -> str:
    """The one line a survivor exits with."""
    cause = failure.error.splitlines()[0][:160] if failure.error else "no detail"
    if failure.silent:
        head = f"{_ranks(failure.silent)} stopped responding ({cause})"
    elif failure.silent is None:
        head = f"a collective failed and the rendezvous store is unreachable, so the node hosting it is down ({cause})"
    else:
        head = (f"a collective failed while every rank's heartbeat is alive: a rank is stuck outside the collectives "
                f"(raise run.collective_timeout if a step legitimately waits that long) ({cause})")
    last = f"the last checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
    return f"flowgrove: rank {failure.rank}: {head}; {last}; {resume_hint}"


@contextmanager
def peers_checked(beat: Heartbeat | None, checkpoint: Callable[[], Path | None], resume_hint: str) -> Iterator[None]:
    """Turn a failed collective into ``SystemExit`` with :func:`failure_message`, so a survivor never hangs or
    tries to checkpoint with a dead peer. Errors of this rank's own code pass unchanged."""
    try:
        yield
    except RuntimeError as err:
        if beat is None:
            raise
        silent = silent_ranks(beat)
        if not silent and not looks_like_collective_error(err):
            raise
        failure = PeerFailure(beat.rank, silent, str(err))
        raise SystemExit(failure_message(failure, checkpoint(), resume_hint)) from None


def barrier() -> None:
    """Every rank waits here (bounded by the collective timeout); nothing without a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
