"""Nothing lost, nothing forged: a model directory is complete or absent, a finished part is the one
its own marker names, a failed write names its file and cause, and a setting out of its range (from
a flag, a run's config.json or the train file) is refused before anything runs."""

import errno
import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path
from types import SimpleNamespace

import pytest

import config
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
    monkeypatch.setattr(
        rlaif, "rejection_sampling", lambda cfg, run, splits, out: trained.append("rs")
    )
    monkeypatch.setattr(rlaif, "best_of_n_answers", lambda *a: None)
    rlaif.compare_stage(cfg, tmp_path, {"train": [], "val": [], "test": []})
    assert trained == ["rloo", "grpo", "dpo", "rs"]
    assert all(
        (tmp_path / runs.RUN_FILES[p] / "done.json").exists()
        for p in ("drlaif", "rloo", "grpo", "dpo", "rs")
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
        (["--set", "sft.batch_size=0"], "--set sft.batch_size=0: must be >= 1"),
        (["--set", "rm.batch_size=0"], "--set rm.batch_size=0: must be >= 1"),
        (["--max-answer-tokens", "100000"], "--max-answer-tokens 100000: must be <= "),
        (["--sft-lr", "-1"], "--sft-lr -1.0: must be > 0"),
        (["--ppo-minibatch-size", "0"], "--ppo-minibatch-size 0: must be >= 1"),
        (["--ppo-rollouts-per-prompt", "0"], "--ppo-rollouts-per-prompt 0: must be >= 1"),
        (
            ["--ppo-rollouts-per-prompt", "3"],
            "batch_size 64 must be a multiple of rollouts_per_prompt 3",
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
        (
            '{"sft": {"steps": "abc"}}',
            'config.json: refused:\n  sft.steps "abc": must be an integer',
        ),
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
    config.save_config(rlaif.make_config(init="micro", run_dir=str(tmp_path)), tmp_path)
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(SystemExit) as e:
        script.main(["--run-dir", str(tmp_path), *flags])
    assert message in str(e.value)
    assert (tmp_path / "config.json").read_text() == before


def test_evaluate_refuses_a_recorded_setting_out_of_range(tmp_path):
    config.save_config(
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
        (["--sft-lr", "inf"], "--sft-lr inf: must be a finite number"),
        (["--set", "ppo.missing_eos_penalty=nan"], "--set ppo.missing_eos_penalty=nan: must be a"),
        (
            ["--set", "rm.heldout_fraction=0.5", "--set", "rm.val_fraction=0.5"],
            "must add up to less",
        ),
        (["--sampled-instructions", "1"], "leaving the reward model none to train on"),
        (["--from", "ppo", "--until", "sft"], "--from ppo --until sft: ppo comes after sft"),
        (["--from", "reward"], "--from reward: the earlier stage(s) sft, sample, feedback are not"),
        (
            ["--compare", "--ppo-rollouts-per-prompt", "1", "--ppo-batch-size", "4"],
            "(--compare's RLOO row)",
        ),
    ],
)
def test_a_setting_that_would_mean_nothing_is_refused(tmp_path, no_stage_runs, flags, message):
    assert message in refused(["--run-dir", str(tmp_path / "run"), *QUICK, *flags])
    assert not (tmp_path / "run").exists()


def test_set_reads_each_value_as_its_settings_type():
    """--set SECTION.NAME=VALUE reaches the config as the declared type: a number, an integer, a
    yes/no setting (true or false), a choice."""
    words = ["ppo.gamma=0.99", "sft.batch_size=4", "rm.tools=false", "ppo.advantage=rloo"]
    cfg = rlaif.parse_args([w for word in words for w in ("--set", word)])[0]
    got = (cfg.ppo.gamma, cfg.sft.batch_size, cfg.rm.tools, cfg.ppo.advantage)
    assert got == (0.99, 4, False, "rloo") and type(cfg.sft.batch_size) is int


def test_every_section_setting_is_set_from_rlaif_py_by_its_name():
    """Every setting of every section (PPO's under the names other implementations use) is set
    from rlaif.py by its name with --set (the common ones also have a flag): each here to its
    default, read back as its type."""
    for section, cls in rlaif.SECTION_CLASSES.items():
        for f in fields(cls):
            text = str(f.default).lower() if isinstance(f.default, bool) else str(f.default)
            cfg = rlaif.parse_args(["--set", f"{section}.{f.name}={text}"])[0]
            value = getattr(getattr(cfg, section), f.name)
            assert value == f.default and type(value) is type(f.default), (section, f.name)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--set", "ppo.gamma=abc"], "--set ppo.gamma=abc: must be a number (discount"),
        (["--set", "ppo.gamma=2"], "--set ppo.gamma=2.0: must be >= 0 and <= 1"),
        (["--set", "sft.batch_size=1.5"], "--set sft.batch_size=1.5: must be an integer"),
        (["--set", "rm.tools=yes"], "--set rm.tools=yes: must be true or false"),
        (["--set", "ppo.advantage=ppo"], "--set ppo.advantage=ppo: must be one of gae, rloo"),
        (
            ["--set", "ppo.gama=0.99"],
            "--set ppo.gama=0.99: ppo has no setting 'gama' (its settings",
        ),
        (["--set", "critic.lr=1"], "--set critic.lr=1: no section 'critic' (the sections: sft, p"),
        (["--set", "seed=2"], "--set seed=2: no section 'seed'"),
        (["--set", "ppo.gamma"], "--set ppo.gamma: expected SECTION.NAME=VALUE"),
        (["--ppo-lr", "1e-5", "--set", "ppo.lr=2e-5"], "--set ppo.lr=2e-5: ppo.lr is given twice"),
    ],
)
def test_a_bad_set_is_refused_naming_it_before_any_stage(tmp_path, no_stage_runs, flags, message):
    assert message in refused(["--run-dir", str(tmp_path / "run"), *QUICK, *flags])
    assert not (tmp_path / "run").exists()


def test_every_declared_range_holds_at_the_presets_and_shows_in_help(capsys):
    """The presets are inside every range; --help shows each range beside its default."""
    for preset in rlaif.PRESETS:
        assert config.settings_problems(rlaif.make_config(preset)) == []
    with pytest.raises(SystemExit):
        rlaif.parse_args(["--help"])
    assert "(default: 0.7; paper: 1.0; > 0)" in re.sub(r"\s+", " ", capsys.readouterr().out)


# -----------------------------------------------------------------------------
# 10. Issue 46, items 13-17, tried as a user would: real processes of rlaif.py and the stage
# scripts, real run directories. Each asserts the exit status, the message, and what was (not)
# written.

ROOT = Path(__file__).resolve().parent.parent
MICRO = [
    "--init",
    "micro",
    "--exec-mode",
    "none",
    "--sft-steps",
    "10",
    "--sft-eval-every",
    "10",
    "--sampled-instructions",
    "8",
    "--answers-per-instruction",
    "4",
    "--max-answer-tokens",
    "24",
    "--ppo-iterations",
    "3",
    "--ppo-batch-size",
    "8",
    "--ppo-rollouts-per-prompt",
    "4",
    "--ppo-minibatch-size",
    "4",
]


def script(name, *args):
    """python NAME ARGS in the project directory: (exit status, stdout + stderr)."""
    done = subprocess.run(
        [sys.executable, name, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,  # a version that does not refuse runs the micro stages instead
    )
    return done.returncode, done.stdout + done.stderr


def files(directory):
    return sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*"))


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """A run of the micro configuration with sft, sample, feedback and reward done (about 20 s);
    each test works on a copy (run_copy)."""
    run = tmp_path_factory.mktemp("micro") / "run"
    status, out = script("rlaif.py", "--run-dir", run, *MICRO, "--until", "reward")
    assert status == 0, out
    return run


@pytest.fixture
def run_copy(micro_run, tmp_path):
    shutil.copytree(micro_run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.slow
def test_inf_and_nan_flags_are_refused_before_any_stage(tmp_path):
    """13. inf passed '> 0' and NaN a setting without a range: --exec-timeout inf crashed every
    snippet, --sft-lr inf and the PPO ones made the losses NaN, each with exit status 0."""
    bad = {
        "--exec-timeout inf": ["--exec-timeout", "inf"],
        "--sft-lr inf": ["--sft-lr", "inf"],
        "--set ppo.vf_coef=inf": ["--set", "ppo.vf_coef=inf"],
        "--set ppo.init_kl_coef=inf": ["--set", "ppo.init_kl_coef=inf"],
        "--set ppo.missing_eos_penalty=nan": ["--set", "ppo.missing_eos_penalty=nan"],
        "--temperature inf": ["--temperature", "inf"],
    }
    flags = [word for words in bad.values() for word in words]
    status, out = script(
        "rlaif.py", "--run-dir", tmp_path / "run", *MICRO, "--until", "sft", *flags
    )
    assert status == 1, out
    for label in bad:
        assert f"{label}: must be a finite number" in out, out
    assert not (tmp_path / "run").exists()  # nothing ran, nothing was recorded


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, recorded, flags, message",
    [
        # 13: a config.json edited by hand, and a stage script's own flags
        (
            "rlaif.py",
            {"sft": {"lr": "Infinity"}},
            [],
            "config.json: refused:\n  sft.lr Infinity: must",
        ),
        ("ppo.py", {}, ["--vf-coef", "inf"], "--vf-coef inf: must be a finite number"),
        ("reward.py", {}, ["--margin", "inf"], "--margin inf: must be a finite number"),
        ("dpo.py", {"dpo": {"lr": "Infinity"}}, [], "dpo.lr Infinity: must be a finite number"),
        # 14: settings that leave the reward model no prompt to train on
        (
            "reward.py",
            {},
            ["--heldout-fraction", "0.6", "--val-fraction", "0.6"],
            "--heldout-fraction 0.6, --val-fraction 0.6: must add up to less than 1",
        ),
        (
            "rlaif.py",
            {"rm": {"heldout_fraction": 0.5, "val_fraction": 0.5}},
            [],
            "rm.heldout_fraction 0.5, rm.val_fraction 0.5: must add up to less than 1",
        ),
    ],
)
def test_a_recorded_or_stage_script_setting_is_refused_before_anything(
    tmp_path, name, recorded, flags, message
):
    """The same checks hold a run's config.json (JSON's Infinity and NaN are floats too) and a
    stage script's flags: refused, naming the field or the flag, with nothing changed."""
    # the micro configuration: a version that does not refuse the settings runs little
    small = dict(init="micro", exec_mode="none", sft_steps=10, sft_eval_every=10)
    cfg = json.loads(json.dumps(asdict(rlaif.make_config(run_dir=str(tmp_path), **small))))
    for key, value in recorded.items():
        cfg[key] = dict(cfg[key], **value) if isinstance(value, dict) else value
    text = json.dumps(cfg).replace('"Infinity"', "Infinity").replace('"NaN"', "NaN")
    (tmp_path / "config.json").write_text(text)
    until = ["--until", "sft"] if name == "rlaif.py" else []
    status, out = script(name, "--run-dir", tmp_path, *flags, *until)
    assert status == 1 and message in out, out
    assert files(tmp_path) == ["config.json"] and (tmp_path / "config.json").read_text() == text


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--set", "rm.heldout_fraction=0.6", "--set", "rm.val_fraction=0.6"],
            "--set rm.heldout_fraction=0.6, --set rm.val_fraction=0.6: must add up to less than 1",
        ),
        (
            ["--sampled-instructions", "1"],
            "--sampled-instructions 1, --set rm.heldout_fraction=0.1, --set rm.val_fraction=0.1: "
            "of the 1 instructions sampled, 1 are held out and 0 validate, leaving the reward",
        ),
        (
            ["--ppo-minibatch-size", "16"],
            "--ppo-minibatch-size 16, --ppo-grad-accum 1, --ppo-batch-size 8: an optimizer step",
        ),
        (
            ["--ppo-batch-size", "16", "--ppo-minibatch-size", "8", "--ppo-grad-accum", "4"],
            "--ppo-minibatch-size 8, --ppo-grad-accum 4, --ppo-batch-size 16: an optimizer step",
        ),
    ],
)
def test_settings_that_leave_a_stage_nothing_to_train_on_are_refused_up_front(
    tmp_path, flags, message
):
    """14. The reward model's held-out and validation fractions at 0.6 each left 0 training pairs,
    exit status 0, and the warning blamed 'same score'. Each setting is in its range; together they
    are not."""
    status, out = script(
        "rlaif.py", "--run-dir", tmp_path / "run", *MICRO, "--until", "sft", *flags
    )
    assert status == 1 and message in out, out
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, message, model",
    [
        (
            "reward.py",
            "[reward] nothing to train on: 0 judge-ordered training pairs (every answer to a "
            "training prompt got the same score",
            "reward/reward_model.pt",
        ),
        ("dpo.py", "[dpo] nothing to train on: 0 judge-ordered pairs", "compare/dpo/model"),
    ],
)
def test_a_stage_whose_input_turns_out_empty_stops_naming_the_cause(run_copy, name, message, model):
    """14, at run time: feedback in which every answer to a prompt got that prompt's score leaves
    no pair to learn from, though the scores differ across prompts (feedback with one score for
    every answer is refused earlier, by reward.refuse_uniform_feedback). The stage stops with the
    cause instead of passing an untrained model on."""
    feedback = runs.read_rows(run_copy / runs.RUN_FILES["feedback"], judge.Feedback)
    runs.write_rows(
        run_copy / runs.RUN_FILES["feedback"],
        [replace(f, score=(f.record % 7) / 10) for f in feedback],
    )
    runs.mark_done(run_copy / "feedback", {})
    status, out = script(name, "--run-dir", run_copy, "--force")
    assert status == 1 and message in out, out
    assert not (run_copy / model).exists()
    assert not (run_copy / Path(model).parts[0] / "done.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "state, flags, message",
    [
        (
            "empty",
            ["--from", "ppo", "--until", "sft"],
            "--from ppo --until sft: ppo comes after sft",
        ),
        (
            "missing",
            ["--from", "ppo", "--until", "ppo"],
            "--from ppo: the earlier stage(s) sft, sample, feedback, reward are not done in",
        ),
        (
            "empty",
            ["--from", "sample", "--until", "sample"],
            "--from sample: the earlier stage(s) sft are not done",
        ),
        ("file", ["--until", "sft"], "is a file; a run directory is a directory"),
    ],
)
def test_run_directory_flags_that_cannot_work_are_refused_before_any_stage(
    tmp_path, state, flags, message
):
    """15. --from ppo --until sft ran SFT; --from ppo on an empty or missing run directory ran all
    seven stages; a --run-dir that is a file ended in a FileExistsError traceback."""
    run = tmp_path / "run"
    if state == "empty":
        run.mkdir()
    elif state == "file":
        run.write_text("notes")
    status, out = script("rlaif.py", "--run-dir", run, *MICRO, *flags)
    assert status == 1 and message in out, out
    assert "Traceback" not in out and "[sft]" not in out  # no stage started
    assert files(tmp_path) == ([] if state == "missing" else ["run"])
    assert state != "file" or run.read_text() == "notes"


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, flags, message, model",
    [
        (
            "rlaif.py",
            ["--from", "sft", "--until", "sft", "--sft-lr", "1e30"],
            "[sft] the training loss is nan at step 2: training diverged, and no model is written. "
            "Look at --sft-lr",
            "sft/model",
        ),
        (
            "reward.py",
            ["--force", "--lr", "1e30"],
            "[reward] the training loss is nan at step 2: training diverged, and no model is "
            "written. Look at --set rm.lr and --set rm.margin",
            "reward/reward_model.pt",
        ),
        (
            "ppo.py",
            ["--lr", "1e30", "--critic-warmup", "0"],
            "[ppo] the training loss is nan at iteration 1: training diverged, and no model is "
            "written. Look at --ppo-lr",
            "ppo/model",
        ),
        (
            "ppo.py",
            ["--vf-lr", "1e30"],
            "[ppo] the training loss is nan at iteration 1 (the critic warm-up): training "
            "diverged, and no model is written. Look at --set ppo.vf_lr, --set ppo.vf_coef",
            "ppo/model",
        ),
        (
            "dpo.py",
            ["--lr", "1e30", "--steps", "5"],
            "[dpo] the training loss is nan at step 2: training diverged, and no model is written. "
            "Look at --set dpo.lr and --set dpo.beta",
            "compare/dpo/model",
        ),
    ],
)
def test_a_training_loss_that_turns_nan_stops_the_stage(run_copy, name, flags, message, model):
    """16. A learning rate of 1e30 is a finite number within its range, and every training loop's
    loss turns NaN a step later: the stage stops with the step and the setting to look at, and
    writes neither its model nor its done.json."""
    status, out = script(name, "--run-dir", run_copy, *flags)
    assert status == 1 and message in out, out
    assert not (run_copy / model).exists()
    assert not (run_copy / Path(model).parts[0] / "done.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rlaif.py", "sft.py"])
def test_a_full_disk_ends_with_one_line_not_a_traceback(full_disk, name):
    """17. A full disk was named (file and cause) but still ended in a traceback. A 64 KiB tmpfs
    holds config.json, not SFT's first checkpoint: one line naming both, exit status 1."""
    run = full_disk / "run"
    cfg = rlaif.make_config(
        init="micro", exec_mode="none", run_dir=str(run), sft_steps=2, sft_eval_every=1
    )
    if name == "sft.py":
        config.save_config(cfg, run)
    flags = [*QUICK, "--sft-steps", 2, "--sft-eval-every", 1] if name == "rlaif.py" else []
    status, out = script(name, "--run-dir", run, *flags)
    assert status == 1, out
    assert "Traceback" not in out, out
    last = out.strip().splitlines()[-1]
    assert last == f"[sft] stopped: cannot write {run / 'sft' / 'ckpt.pt'}: no space left on device"
