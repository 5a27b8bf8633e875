"""Multi-node as two torchrun agents on this machine joining ONE c10d rendezvous over loopback (docs/scale-out.md)."""

from __future__ import annotations

import json
import uuid

from flowgrove.runs.checkpoint import choose_checkpoint

from test_faults import free_port, torchrun


def test_two_agents_one_rendezvous_train_two_steps_into_one_run_folder(tmp_path):
    run, port, job = tmp_path / "run", free_port(), f"test-{uuid.uuid4().hex[:8]}"
    launcher = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", job]
    logs = [tmp_path / f"node{n}.log" for n in range(2)]
    agents = [torchrun(launcher, run, 2, log=log) for log in logs]  # the run folder stands in for a shared filesystem
    try:
        codes = [a.wait(timeout=240) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    assert codes == [0, 0], "\n".join(log.read_text()[-2000:] for log in logs)
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert choose_checkpoint(run).state.world_size == 2  # one rank per "node", one world
    assert sum("run directory" in log.read_text() for log in logs) == 1  # rank 0 lives on one of the agents
