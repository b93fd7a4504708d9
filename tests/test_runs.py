"""Run directories (runs.py) and the settings they record (config.py): the config a run records
and reads back, the typed rows, metrics files and their TensorBoard mirror; and freed memory kept in
the process (training.py)."""

import json
import platform
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

import config
import rlaif
import runs
import training
from ppo import PPOConfig


def test_a_recorded_config_reads_back_as_the_same_config(tmp_path):
    """What rlaif.py records is what a stage script loads: the same type, the same values, sections
    included."""
    cfg = rlaif.make_config("paper", run_dir=str(tmp_path), ppo_lr=3e-6, rm=dict(epochs=2))
    config.save_config(cfg, tmp_path)
    back = config.load_config(tmp_path, **rlaif.SECTION_CLASSES)
    assert type(back) is config.Config and isinstance(back.ppo, PPOConfig) and back == cfg
    assert back.ppo.lr == 3e-6 and back.ppo.iterations == 200 and back.rm.epochs == 2
    # a section whose class is not given stays as recorded
    partial = config.load_config(tmp_path, ppo=PPOConfig)
    assert partial.rm == asdict(cfg.rm)


def test_a_run_made_before_a_setting_existed_resumes_at_its_default(tmp_path):
    """A field missing from a recorded config.json (an older version's run) is no difference at its
    default; asked for with another value, it is named, in a section and at the top level."""
    cfg = rlaif.make_config("tiny", run_dir=str(tmp_path))
    recorded = json.loads(json.dumps(asdict(cfg)))
    del recorded["rm"]["margin"], recorded["best_of_n"]
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    rlaif.prepare_run_dir(rlaif.parse_args(["--run-dir", str(tmp_path)])[0], None)
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    with pytest.raises(SystemExit) as e:
        rlaif.prepare_run_dir(
            rlaif.parse_args(
                ["--run-dir", str(tmp_path), "--set", "rm.margin=2", "--best-of-n", "3"]
            )[0],
            None,
        )
    assert "best_of_n: 8 -> 3" in str(e.value) and "rm.margin: 0.0 -> 2.0" in str(e.value)


def test_a_run_of_another_version_is_refused_naming_the_settings_it_lacks(tmp_path):
    """Settings are not migrated: a config.json recording settings this version does not have
    (sft_steps before the section sft, eval_every before its rename, ppo.seed) is refused, by
    load_config and by rlaif.py resuming it, in one message naming the file and each setting."""
    recorded = json.loads(json.dumps(asdict(rlaif.make_config("tiny", run_dir=str(tmp_path)))))
    del recorded["sft"]
    recorded.update(sft_steps=800, eval_every=100)
    recorded["ppo"]["seed"] = 1
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    message = (
        f"{tmp_path / 'config.json'}: recorded by another version of rlaif.py, with settings this "
        "version does not have: sft_steps, eval_every, ppo.seed; start a new --run-dir"
    )
    for load in (
        lambda: config.load_config(tmp_path, **rlaif.SECTION_CLASSES),
        lambda: rlaif.main(["--run-dir", str(tmp_path)]),
    ):
        with pytest.raises(SystemExit) as e:
            load()
        assert str(e.value) == message
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"ppo_no_such": 1}, "ppo has no setting 'no_such'"),
        ({"no_such": 1}, "no setting 'no_such'"),
    ],
)
def test_an_unknown_setting_is_named(overrides, needle):
    with pytest.raises(SystemExit, match=needle):
        config.apply_overrides(rlaif.make_config(), overrides)


def test_rows_round_trip_and_a_bad_row_names_its_line_and_fields(tmp_path):
    rows = [
        runs.Sample(0, 3, "policy", [1, 2], [5, 63], "x"),
        runs.Sample(1, 3, "reference", [1, 2], [6, 63], "y"),
    ]
    runs.write_rows(tmp_path / "samples.jsonl", rows)
    assert runs.read_rows(tmp_path / "samples.jsonl", runs.Sample) == rows
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    broken = json.loads(lines[1])
    del broken["response"]
    broken["extra"] = 1
    (tmp_path / "samples.jsonl").write_text(lines[0] + "\n" + json.dumps(broken) + "\n")
    with pytest.raises(
        SystemExit,
        match=r"samples.jsonl:2: not a Sample row \(missing \['response'\], unknown \['extra'\]\)",
    ):
        runs.read_rows(tmp_path / "samples.jsonl", runs.Sample)


def test_metrics_are_mirrored_to_tensorboard_once_each(tmp_path):
    """write_metrics rewrites the JSONL from the checkpointed rows and sends TensorBoard only the
    new rows; tensorboard's own reader sees one value per step."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import runs

    runs.open_tensorboard(tmp_path / "tb")
    try:
        rows = [dict(iteration=i, score=0.1 * i, kl=float(i), phase="ppo") for i in range(1, 4)]
        runs.write_metrics(tmp_path / "ppo" / "metrics.jsonl", rows[:2])
        # the next checkpoint: one new row
        runs.write_metrics(tmp_path / "ppo" / "metrics.jsonl", rows)
        runs.tensorboard_text("ppo/samples", "| a | b |", 3)
        runs.write_metrics(tmp_path / "compare" / "rloo" / "metrics.jsonl", rows[:1])
    finally:
        runs.TensorBoard.writer.close()
        runs.TensorBoard.writer = None
    assert [
        json.loads(line)["iteration"]
        for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()
    ] == [1, 2, 3]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("ppo/score")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("ppo/kl")] == [1.0, 2.0, 3.0]
    assert "compare/rloo/score" in events.Tags()["scalars"]


def test_tensorboard_without_the_package_says_how_to_install_it(monkeypatch):
    import sys

    import runs

    # import fails as if not installed
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(SystemExit, match="pip install tensorboard"):
        runs.open_tensorboard("unused")


KEEP_FREED = """
import resource, sys, torch
import training
if sys.argv[1] == "keep":
    training.keep_freed_memory()
for _ in range(8):  # 256 MB: the first few allocations fault their pages in, whatever the allocator
    torch.ones(1 << 26).sum()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    torch.ones(1 << 26).sum()  # allocated and freed again: faults only if the memory left
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_freed_memory_stays_in_the_process(tmp_path):
    """keep_freed_memory: a large tensor freed and allocated again reuses the process's memory
    instead of the kernel zeroing 65,536 fresh pages each time (the CPU time it saves). Of 8 such
    allocations the default faults every one in; kept, the heap may grow once more (CI saw exactly
    65,536 faults twice in about ten runs; why is not measured), never each time."""
    faults = {}
    for mode in ("keep", "default"):
        out = subprocess.run(
            [sys.executable, "-c", KEEP_FREED, mode],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(training.__file__).parent,
        )
        faults[mode] = int(out.stdout.split()[-1])
    pages = (1 << 28) // 4096  # one 256 MB tensor
    assert faults["default"] > 6 * pages, faults  # glibc's default: mmap, then unmap on free
    assert faults["keep"] < 1.25 * pages, faults  # at most one regrowth of 8
