"""scripts/gpu_long_context.sh on the CPU, with a stand-in `python3` that records its command lines: the commands
the queue and `evaluate` run (train, then eval + branch weights + retrieval documents; map-* jobs without passkey
and retrieval), and `stop` waiting for a job's own checkpoint on SIGTERM. The GPU runs themselves are in docs/results.md."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).parent.parent
DRIVER = REPO / "scripts" / "gpu_long_context.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("pgrep") is None,
                                reason="needs bash and pgrep")

RECORDER = """#!/bin/bash
echo "python3 $*" >> "$CALLS"
if [ "$3" = export ]; then mkdir -p "$6"; echo "exported $4 -> $6" >&2; fi
"""


@pytest.fixture
def machine(tmp_path):
    """A home like the GPU machine's after `start`: ~/long_context with the scripts, a runs folder, a block cache."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    work = home / "long_context"
    (work / "runs").mkdir(parents=True)
    (home / "dijiang_cache" / "blocks").mkdir(parents=True)
    (home / "dijiang_cache" / "blocks" / "blocks.pt").touch()  # the queue waits for the first job's block cache
    shutil.copytree(REPO / "scripts", work / "scripts")
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(RECORDER)
    (bin_dir / "python3").chmod(0o755)
    calls = tmp_path / "calls.log"
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CALLS": str(calls)}
    return {"home": home, "work": work, "runs": work / "runs", "env": env, "calls": calls}


def driver(machine, *args, cwd=None, **env):
    return subprocess.run(["bash", str(DRIVER), *args], cwd=cwd or machine["work"], env={**machine["env"], **env},
                          capture_output=True, text=True, timeout=60)


def calls(machine) -> list[str]:
    return machine["calls"].read_text().splitlines() if machine["calls"].exists() else []


def test_the_queue_trains_then_scores_each_job(machine):
    result = driver(machine, "queue", JOBS="pure-x map-x", PARALLEL="2")
    assert result.returncode == 0, result.stderr
    runs = machine["runs"]
    got = calls(machine)
    train = [c for c in got if " -m dijiang train " in c]
    assert sorted(train) == sorted(
        f"python3 -m dijiang train --recipe recipes/long-context/{job}.yaml --model {machine['home']}/model/hf "
        f"--data {machine['work']}/corpus/part-000.jsonl.xz --out {runs}/{job} --no-progress" for job in ("pure-x", "map-x"))
    pure_eval = next(c for c in got if f"--student pure-x={runs}/pure-x/final" in c)
    map_eval = next(c for c in got if f"--student map-x={runs}/map-x/final" in c)
    assert "--windows 512,2048,8192 --branch-off --cache-memory" in pure_eval and "--passkey 1024,2048,4096,8192" in pure_eval
    assert "--passkey" not in map_eval
    retrieval = [c for c in got if "check_retrieval_data.py" in c]
    assert len(retrieval) == 1 and f"--model {runs}/pure-x/final" in retrieval[0]
    weights = sorted(c for c in got if "branch_weights.py" in c)  # every job: each head's branch weight
    assert weights == sorted(f"python3 scripts/branch_weights.py {job}={runs}/{job}/final "
                             f"--json {runs}/{job}/eval/branch_weights.json" for job in ("pure-x", "map-x"))
    assert (runs / "pure-x.done").read_text().strip() == "0" == (runs / "map-x.done").read_text().strip()


def test_evaluate_exports_a_stopped_job_and_scores_it(machine):
    runs = machine["runs"]
    (runs / "pure-x" / "checkpoints").mkdir(parents=True)
    (runs / "map-x" / "final").mkdir(parents=True)  # finished: nothing to export
    result = driver(machine, "evaluate", EVAL="pure-x map-x")
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 30
    while not all((runs / f"{job}.done").exists() for job in ("pure-x", "map-x")):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    got = calls(machine)
    assert [c for c in got if " export " in c] == [f"python3 -m dijiang export {runs}/pure-x --out {runs}/pure-x/final"]
    assert any(f"--student pure-x={runs}/pure-x/final" in c for c in got)
    assert any(f"--student map-x={runs}/map-x/final" in c for c in got)
    assert "evaluating pure-x" in result.stdout and "evaluating map-x" in result.stdout


def test_evaluate_needs_the_jobs_named():
    result = subprocess.run(["bash", str(DRIVER), "evaluate"], capture_output=True, text=True, timeout=30,
                            env={k: v for k, v in os.environ.items() if k != "EVAL"}, cwd=REPO)
    assert result.returncode != 0 and "EVAL=" in result.stderr


def test_stop_waits_for_the_jobs_checkpoint_on_sigterm(machine, tmp_path):
    saved = tmp_path / "saved"
    job = subprocess.Popen([sys.executable, "-c", f"""
import signal, sys, time
def checkpoint_then_exit(*_):
    time.sleep(2)
    open({str(saved)!r}, "w").write("step")
    sys.exit(130)
signal.signal(signal.SIGTERM, checkpoint_then_exit)
print("ready", flush=True)
time.sleep(60)
""", "--recipe", "recipes/long-context/pure-x.yaml"], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert job.stdout.readline().strip() == "ready"
        (machine["runs"] / "pure-x.launched").touch()
        result = driver(machine, "stop", STOP="pure-x")
        assert result.returncode == 0 and "stopped pure-x" in result.stdout, result.stderr
        assert saved.read_text() == "step"  # stop returned after the job wrote it
        assert (machine["runs"] / "pure-x.done").read_text().strip() == "stopped"
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()


def test_status_with_wait_returns_once_every_job_is_done(machine, tmp_path):
    """WAIT keeps the poll in its call until the jobs finish (a job that finishes while it waits ends the wait; no
    gap between calls, in which the machine would go back), and collects into $OUT as it goes."""
    out = tmp_path / "out"
    out.mkdir()
    runs = machine["runs"]
    (runs / "a").mkdir()
    (runs / "a" / "log.jsonl").write_text('{"step": 1}\n')
    waiter = subprocess.Popen(["bash", str(DRIVER), "status"], cwd=machine["work"], stdout=subprocess.PIPE, text=True,
                              env={**machine["env"], "JOBS": "a", "WAIT": "50", "OUT": str(out)})
    time.sleep(1.5)
    assert waiter.poll() is None  # job a not done: still waiting
    (runs / "a.done").write_text("0\n")
    stdout, _ = waiter.communicate(timeout=40)
    assert waiter.returncode == 0
    assert "== a: done=0 last: {\"step\": 1}" in stdout
    assert (out / "long_context.tar.gz").stat().st_size > 0
