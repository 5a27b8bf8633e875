"""Rank faults under torchrun: a heartbeat per rank in the c10d store, and one clear message naming the ranks that
went silent when a collective fails or times out.

Under torchrun the default store is the agent's (``TORCHELASTIC_USE_AGENT_STORE``), so it outlives any worker: a
survivor can still read it after a peer was killed. Heartbeats are counters, not clock times, so machines with
skewed clocks compare nothing but "did it move".
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

import torch.distributed as dist

HEARTBEAT_SECONDS = 1.0
SILENT_AFTER = 3.0  # heartbeats of a live rank move at least twice in this window
CHECK_SECONDS = 2.0  # how often a node's watcher reads every rank's counter
DONE = "done"  # the counter of a rank that left the training loop on its own (not silent: finished)
_KEY = "flowgrove/heartbeat/{}"
_REPORTED = threading.Lock()  # one report per process: the watchdog's or the failed collective's


@dataclass(frozen=True)
class Context:
    """What a failure message needs: the last checkpoint (read when it is written) and how to resume."""

    checkpoint: Callable[[], Path | None]
    resume_hint: str


@dataclass
class Watch:
    """The watchdog of one rank per node (local rank 0): a rank whose counter stood still for ``silent_after``
    seconds ends this process with a message naming it, before NCCL's own watchdog would abort without one.
    Ranks that never beat yet or finished (``DONE``) are not silent."""

    rank: int
    world: int
    silent_after: float
    context: Context
    changed: dict[int, tuple[str, float]] = field(default_factory=dict)
    last_check: float = 0.0

    def silent(self, values: list[str | None], now: float) -> list[int]:
        out = []
        for r, value in enumerate(values):
            if r == self.rank or value in (None, DONE):
                continue
            old = self.changed.get(r)
            if old is None or old[0] != value:
                self.changed[r] = (value, now)
            elif now - old[1] >= self.silent_after:
                out.append(r)
        return out


@dataclass
class Heartbeat:
    """The thread that writes this rank's counter; ``stop()`` ends it (it is a daemon either way)."""

    store: object
    rank: int
    world: int
    done: threading.Event
    thread: threading.Thread
    context: Context

    def stop(self, finished: bool = True) -> None:
        """End the heartbeat; ``finished``: mark the rank as done, so no watcher takes its silence for a fault."""
        self.done.set()
        self.thread.join(timeout=5)
        if finished:
            try:
                self.store.set(_KEY.format(self.rank), DONE)
            except Exception:  # noqa: BLE001  (the store is gone: nobody is left to watch)
                pass


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


def silent_after(timeout: float) -> float:
    """Heartbeat silence that counts as a dead or hung rank: half the collective timeout, at most a minute."""
    return min(60.0, timeout / 2)


def _check(store, watch: Watch) -> None:  # noqa: ANN001
    now = time.monotonic()
    if now - watch.last_check < CHECK_SECONDS:
        return
    watch.last_check = now
    silent = watch.silent(_read(store, watch.world), now)
    if silent and _REPORTED.acquire(blocking=False):
        failure = PeerFailure(watch.rank, silent, f"no heartbeat for {watch.silent_after:.0f} s")
        os.write(2, (failure_message(failure, watch.context.checkpoint(), watch.context.resume_hint) + "\n").encode())
        os._exit(1)  # the main thread may sit in a collective that only the timeout would end


def _beat(store, key: str, done: threading.Event, interval: float, watch: Watch | None = None) -> None:  # noqa: ANN001
    count = 0
    while not done.is_set():
        count += 1
        try:
            store.set(key, str(count))
            if watch:
                _check(store, watch)
        except Exception:  # noqa: BLE001  (the store went away: nothing left to report to)
            return
        done.wait(interval)


def start_heartbeat(context: Context, timeout: float | None = None,
                    interval: float = HEARTBEAT_SECONDS) -> Heartbeat | None:
    """Start this rank's heartbeat (and, on local rank 0 with a ``timeout``, the node's watchdog); None without a
    process group of two or more ranks."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    store = dist.distributed_c10d._get_default_store()
    rank, world, done = dist.get_rank(), dist.get_world_size(), threading.Event()
    watcher = timeout is not None and os.environ.get("LOCAL_RANK", "0") == "0"
    watch = Watch(rank, world, silent_after(timeout), context) if watcher else None
    thread = threading.Thread(target=_beat, args=(store, _KEY.format(rank), done, interval, watch),
                              name="flowgrove-heartbeat", daemon=True)
    thread.start()
    return Heartbeat(store, rank, world, done, thread, context)


def _read(store, world: int) -> list[str | None]:  # noqa: ANN001
    """Every rank's counter: one ``multi_get`` once all exist, else ``check`` each first (``get`` of a missing key
    blocks until the store's timeout)."""
    keys = [_KEY.format(r) for r in range(world)]
    if store.check(keys):
        return [v.decode() for v in store.multi_get(keys)]
    return [store.get(k).decode() if store.check([k]) else None for k in keys]


def silent_ranks(beat: Heartbeat, window: float = SILENT_AFTER) -> list[int] | None:
    """The other ranks whose heartbeat did not move within ``window`` seconds; None if the store is unreachable."""
    try:
        first = _read(beat.store, beat.world)
        time.sleep(window)
        second = _read(beat.store, beat.world)
    except Exception:  # noqa: BLE001  (the store's host is gone too)
        return None
    return [r for r in range(beat.world)
            if r != beat.rank and second[r] != DONE and (second[r] is None or first[r] == second[r])]


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
    return f"flowgrove: rank {failure.rank}: {head}; {last_checkpoint(checkpoint)}; {resume_hint}"


def last_checkpoint(checkpoint: Path | None) -> str:
    """What a stop message says about the checkpoint a resume would start from."""
    return f"the last checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"


@contextmanager
def peers_checked(beat: Heartbeat | None) -> Iterator[None]:
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
        if not _REPORTED.acquire(blocking=False):
            time.sleep(60)  # the watchdog is reporting and ends the process
        failure = PeerFailure(beat.rank, silent, str(err))
        raise SystemExit(failure_message(failure, beat.context.checkpoint(), beat.context.resume_hint)) from None


def barrier() -> None:
    """Every rank waits here (bounded by the collective timeout); nothing without a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
