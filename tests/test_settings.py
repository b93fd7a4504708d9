"""Nothing lost, nothing forged: a model directory is complete or absent, a finished part is the one
its own marker names, a failed write names its file and cause, and a setting out of its range (from
a flag, a run's config.json or the train file) is refused before anything runs."""

import errno
import json
import re
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest

import dpo
import evaluate
import judge
import ppo
import reward
import rlaif
import runs
from model import GPT, preset_config

QUICK = ["--init", "micro", "--exec-mode", "none"]  # no sandbox check: the settings alone decide


@pytest.fixture
def no_stage_runs(monkeypatch):
    """A stage that starts fails the test at once (on a version that checks late, nothing
    trains)."""

    def stage_ran(cfg, run, stage, *args):
        raise AssertionError(f"stage {stage} ran: the settings were not refused before it")

    monkeypatch.setattr(rlaif, "run_stage", stage_ran)


def refused(argv):
    with pytest.raises(SystemExit) as e:
        rlaif.main(argv)
    return str(e.value)


# -----------------------------------------------------------------------------
# 6. A model directory is complete or absent; a part of a stage is finished when its own marker
# says so


def test_a_model_directory_is_complete_or_absent(tmp_path, monkeypatch):
    """A crash between config.json and model.safetensors leaves no directory a later stage would
    take for a model; a complete older model stays complete until the new one replaces it. (The
    stages write models as here: save_pretrained into runs.atomic_dir.)"""
    import safetensors.torch

    net = GPT(preset_config("micro", 1000))
    runs.atomic_dir(tmp_path / "old", net.save_pretrained)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies while writing the weights

    monkeypatch.setattr(safetensors.torch, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        runs.atomic_dir(tmp_path / "model", net.save_pretrained)
    with pytest.raises(KeyboardInterrupt):
        runs.atomic_dir(tmp_path / "old", net.save_pretrained)
    assert not (tmp_path / "model").exists(), sorted(p.name for p in (tmp_path / "model").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # nothing half-written beside it
    GPT.from_pretrained(tmp_path / "old")  # still loads


def test_compare_redoes_a_part_that_has_files_but_not_its_own_done_marker(tmp_path, monkeypatch):
    """compare/rloo/model/config.json without weights (a crash) is not 'RLOO finished': RLOO runs
    again and ends with its own done.json; a part with its done.json is skipped."""
    cfg = rlaif.make_config(init="micro", compare=True, run_dir=str(tmp_path))
    (tmp_path / "feedback").mkdir()
    (tmp_path / runs.RUN_FILES["feedback"]).write_text("")
    for part in ("drlaif", "rloo"):
        (tmp_path / runs.RUN_FILES[part] / "model").mkdir(parents=True)
        (tmp_path / runs.RUN_FILES[part] / "model" / "config.json").write_text("{}")
    # d-RLAIF finished; RLOO crashed after config.json
    runs.mark_done(tmp_path / runs.RUN_FILES["drlaif"], {})
    trained = []

    def fake_ppo(cfg, run, splits, score_fn=None, out_dir=None, advantage=None):
        trained.append(advantage or "gae")
        (out_dir / "model").mkdir(parents=True, exist_ok=True)
        (out_dir / "model" / "model.safetensors").write_text("weights")
        return {}

    monkeypatch.setattr(rlaif.ppo, "ppo_stage", fake_ppo)
    monkeypatch.setattr(rlaif.dpo, "dpo_stage", lambda cfg, run, splits, out: trained.append("dpo"))
    monkeypatch.setattr(judge, "make_judge", lambda *a, **k: None)
    monkeypatch.setattr(rlaif, "best_of_n_answers", lambda *a: None)
    rlaif.compare_stage(cfg, tmp_path, {"train": [], "val": [], "test": []})
    assert trained == ["rloo", "grpo", "dpo"]
    assert all(
        (tmp_path / runs.RUN_FILES[p] / "done.json").exists()
        for p in ("drlaif", "rloo", "grpo", "dpo")
    )


# -----------------------------------------------------------------------------
# 7. A write that fails names the file and the cause


def test_a_full_disk_is_named_with_the_file(tmp_path, monkeypatch):
    """torch.save on a full disk says 'basic_ios::clear: iostream error'; a plain write says ENOSPC
    without the file. Both come out as 'cannot write PATH: no space left on device', with no tmp
    file left."""

    def torch_full(*args, **kwargs):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(runs.torch, "save", torch_full)
    monkeypatch.setattr(
        shutil, "disk_usage", lambda p: SimpleNamespace(total=1 << 30, used=1 << 30, free=0)
    )
    with pytest.raises(
        OSError, match=rf"cannot write {tmp_path / 'ckpt.pt'}: no space left on device"
    ):
        runs.save_checkpoint(tmp_path / "ckpt.pt", step=1)

    def write_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", write_full)
    with pytest.raises(
        OSError, match=rf"cannot write {tmp_path / 'x.jsonl'}: no space left on device"
    ):
        runs.write_jsonl(tmp_path / "x.jsonl", [{"a": 1}])
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs: a real full disk (needs root; skipped elsewhere)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield mount
    # lazy: a file torch left open does not block it
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


def test_a_real_full_disk_is_named_with_the_file(full_disk):
    net = GPT(preset_config("micro", 1000))  # 300 KB of weights
    for path, write in (
        (full_disk / "ckpt.pt", lambda p: runs.save_checkpoint(p, model=net.state_dict())),
        (full_disk / "model", lambda p: runs.atomic_dir(p, net.save_pretrained)),
        (full_disk / "rows.jsonl", lambda p: runs.write_jsonl(p, [{"text": "x" * 1000}] * 100)),
    ):
        with pytest.raises(OSError, match=rf"cannot write {path}\S*: no space left on device"):
            write(path)
        assert list(full_disk.iterdir()) == []  # no half-written file or directory left


# -----------------------------------------------------------------------------
# 8. Settings refused before anything runs, naming the setting and its range


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ppo-batch-size", "0"], "--ppo-batch-size 0: must be >= 1"),
        (["--sft-steps", "0"], "--sft-steps 0: must be >= 1"),
        (["--sft-steps", "-1"], "--sft-steps -1: must be >= 1"),
        (["--sft-eval-every", "0"], "--sft-eval-every 0: must be >= 1"),
        (["--sft-batch-size", "0"], "--sft-batch-size 0: must be >= 1"),
        (["--rm-batch-size", "0"], "--rm-batch-size 0: must be >= 1"),
        (["--max-answer-tokens", "100000"], "--max-answer-tokens 100000: must be <= "),
        (["--sft-lr", "-1"], "--sft-lr -1.0: must be > 0"),
        (["--ppo-minibatch-size", "0"], "--ppo-minibatch-size 0: must be >= 1"),
        (["--ppo-rollouts-per-prompt", "0"], "--ppo-rollouts-per-prompt 0: must be >= 1"),
        (
            ["--ppo-rollouts-per-prompt", "3"],
            "batch_size 32 must be a multiple of rollouts_per_prompt 3",
        ),
    ],
)
def test_a_setting_out_of_range_is_refused_before_any_stage(
    tmp_path, no_stage_runs, flags, message
):
    assert message in refused(["--run-dir", str(tmp_path / "run"), *QUICK, *flags])
    assert not (tmp_path / "run").exists()  # nothing ran, nothing was recorded


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "config.json: not JSON (line 1 column 2"),
        ("[1, 2]", "config.json: the file is a JSON list, not an object of settings"),
        ('{"sft_steps": "abc"}', 'config.json: refused:\n  sft_steps "abc": must be an integer'),
        ('{"ppo": {"batch_size": 0}}', "config.json: refused:\n  ppo.batch_size 0: must be >= 1"),
        ('{"rm": [1]}', "config.json: rm is a JSON list, not an object of settings"),
    ],
)
def test_a_bad_config_json_is_refused_naming_the_file_and_the_field(
    tmp_path, no_stage_runs, text, message
):
    recorded = json.loads(
        json.dumps(asdict(rlaif.make_config(init="micro", exec_mode="none", run_dir=str(tmp_path))))
    )
    try:
        edit = json.loads(text)
    except ValueError:
        edit = None
    content = (
        json.dumps(
            dict(
                recorded,
                **{
                    k: (dict(recorded[k], **v) if isinstance(v, dict) else v)
                    for k, v in edit.items()
                },
            )
        )
        if isinstance(edit, dict)
        else text
    )
    (tmp_path / "config.json").write_text(content)
    assert message in refused(["--run-dir", str(tmp_path)])
    assert (tmp_path / "config.json").read_text() == content  # not overwritten
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


@pytest.mark.parametrize(
    "script, flags, message",
    [
        (ppo, ["--batch-size", "0"], "--batch-size 0: must be >= 1"),
        (ppo, ["--minibatch-size", "0"], "--minibatch-size 0: must be >= 1"),
        (reward, ["--batch-size", "0"], "--batch-size 0: must be >= 1"),
        (dpo, ["--steps", "0"], "--steps 0: must be >= 1"),
    ],
)
def test_a_stage_script_refuses_a_setting_before_anything(tmp_path, script, flags, message):
    """python ppo.py / reward.py / dpo.py: the flag is refused, not 'sft is not done' or a late
    crash."""
    runs.save_config(rlaif.make_config(init="micro", run_dir=str(tmp_path)), tmp_path)
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(SystemExit) as e:
        script.main(["--run-dir", str(tmp_path), *flags])
    assert message in str(e.value)
    assert (tmp_path / "config.json").read_text() == before


def test_evaluate_refuses_a_recorded_setting_out_of_range(tmp_path):
    runs.save_config(
        rlaif.make_config(init="micro", run_dir=str(tmp_path), exec_timeout=0.0), tmp_path
    )
    with pytest.raises(SystemExit, match="config.json: refused:\n  exec_timeout 0.0: must be > 0"):
        evaluate.main(["--run-dir", str(tmp_path)])


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "train.jsonl: no usable record (the file is empty)"),
        (['{"code": 1', ""], "train.jsonl:1: not JSON"),
        (
            ['{"api_call": "pipeline()"}', '{"domain": "x"}'],
            "train.jsonl:1: no 'code' string field",
        ),
        (
            ['{"code": "###Instruction: do it ###Output: <<<domain>>>: NLP <<<code>>>: x"}'],
            "train.jsonl:1: answer lacks section(s) <<<api_call>>>, <<<api_provider>>>",
        ),
    ],
)
def test_a_train_file_without_usable_records_is_refused_before_sft(
    tmp_path, no_stage_runs, lines, message
):
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(lines))
    assert message in refused(
        ["--run-dir", str(tmp_path / "run"), *QUICK, "--train-file", str(train)]
    )
    assert not (tmp_path / "run").exists()


# -----------------------------------------------------------------------------
# 9. Settings that would run and mean nothing: refused, with what they would have meant


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "0"], "--temperature 0.0: must be > 0 (sampling temperature"),
        (["--temperature", "-1"], "--temperature -1.0: must be > 0"),
        (["--answers-per-instruction", "0"], "--answers-per-instruction 0: must be >= 1"),
        (
            ["--no-contrast-answers", "--answers-per-instruction", "1"],
            "--answers-per-instruction 1: must be >= 2 with --no-con",
        ),
        (["--sampled-instructions", "0"], "--sampled-instructions 0: must be >= 1"),
        (["--ppo-iterations", "0"], "--ppo-iterations 0: must be >= 1"),
        (["--eval-limit", "-1"], "--eval-limit -1: must be >= 0"),
        (["--exec-timeout", "0"], "--exec-timeout 0.0: must be > 0"),
        (
            ["--compare", "--ppo-rollouts-per-prompt", "1", "--ppo-batch-size", "4"],
            "(--compare's RLOO row)",
        ),
    ],
)
def test_a_setting_that_would_mean_nothing_is_refused(tmp_path, no_stage_runs, flags, message):
    assert message in refused(["--run-dir", str(tmp_path / "run"), *QUICK, *flags])
    assert not (tmp_path / "run").exists()


def test_every_declared_range_holds_at_the_presets_and_shows_in_help(capsys):
    """The presets are inside every range; --help shows each range beside its default."""
    for preset in rlaif.PRESETS:
        assert runs.settings_problems(rlaif.make_config(preset)) == []
    with pytest.raises(SystemExit):
        rlaif.parse_args(["--help"])
    assert "(default: 0.7; paper: 1.0; > 0)" in re.sub(r"\s+", " ", capsys.readouterr().out)
