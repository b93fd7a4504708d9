"""Several processes on the CPU (gloo): 2 ranks with a share of each batch take the same steps as
one process with the whole batch, and a rank that dies ends the other at its next barrier instead of
a hang."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "ddp_worker.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")


def run(argv, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT, **kw
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    one = run([sys.executable, str(WORKER), "steps", str(out)])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(WORKER), "steps", str(out)]
    )
    assert two.returncode == 0, two.stderr[-3000:]
    return [torch.load(out / name) for name in ("rank0_of_1.pt", "rank0_of_2.pt", "rank1_of_2.pt")]


def max_difference(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("what", ["sft", "rm", "policy", "value"])
def test_two_ranks_take_the_steps_of_one_process_with_their_joint_batch(results, what):
    """sft: 3 AdamW steps of sft.train_sft (global batch 8, accumulation 2); rm: one step of the
    pairwise and auxiliary losses; policy, value: one PPO update on a fixed rollout batch."""
    one, rank0, rank1 = results
    assert max_difference(rank0[what], rank1[what]) == 0  # every rank holds the same model
    assert max_difference(one[what], rank0[what]) < 1e-5
    # not a vacuous check
    assert max_difference(one[what], {k: v * 0 for k, v in one[what].items()}) > 0


@pytest.mark.slow
def test_validation_loss_is_split_between_the_ranks(results):
    one, rank0, rank1 = results
    assert (rank0["val"]["scored"], rank1["val"]["scored"], one["val"]["scored"]) == (4, 3, 7)
    for rank in (rank0, rank1):
        assert abs(rank["val"]["loss"] - one["val"]["loss"]) < 1e-5


@pytest.mark.slow
def test_advantages_are_whitened_over_the_global_batch(results):
    one, rank0, rank1 = results
    assert sorted(rank0["rows"].tolist() + rank1["rows"].tolist()) == list(range(8))
    for rank in (rank0, rank1):
        assert torch.allclose(rank["advantages"], one["advantages"][rank["rows"]], atol=1e-6)
    assert rank0["advantages"].abs().sum() > 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_other_at_its_barrier(tmp_path):
    """Two processes started by hand (no torchrun agent to stop them): rank 1 raises; rank 0 waits
    at a barrier with a 5 s timeout, then ends with an error naming rank 1."""
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE="2",
        OMP_NUM_THREADS="1",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "dead", str(tmp_path)],
            cwd=ROOT,
            text=True,
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for r in (0, 1)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]  # a hang fails here, not silently
    assert [p.returncode != 0 for p in procs] == [True, True]
    assert "rank 1 died" in errors[1]
    assert "1" in errors[0] and "monitoredBarrier" in errors[0].replace(" ", ""), errors[0][-2000:]


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which(str(TORCHRUN)), reason="torchrun not installed beside python")
def test_the_pipeline_under_torchrun_writes_what_one_process_writes(tmp_path):
    from tests.test_pipeline import SMALL

    small = [a for a in SMALL if a != "--tensorboard"]
    single = run([sys.executable, "rlaif.py", "--run-dir", str(tmp_path / "one"), *small])
    assert single.returncode == 0, single.stdout[-3000:]
    two = run(
        [
            str(TORCHRUN),
            "--standalone",
            "--nproc_per_node",
            "2",
            "rlaif.py",
            "--run-dir",
            str(tmp_path / "two"),
            *small,
        ]
    )
    assert two.returncode == 0, (two.stdout + two.stderr)[-3000:]

    def files(d):
        return sorted(
            str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.suffix != ".png"
        )

    assert files(tmp_path / "two") == files(tmp_path / "one")
    # rank 0 alone reports
    assert "Results on" in two.stdout and two.stdout.count("Results on") == 1
