"""
The settings of a run (config.py: Config and the command lines that set it).
  - Config: every setting of a run, recorded in run_dir/config.json (save_config); load_config()
    reads it back (another version's, naming a setting this one lacks, is refused). The sections
    sft, ppo, rm and dpo are the stages' own settings, defined in sft.py, ppo.py, reward.py and
    dpo.py.
  - check_settings() holds every setting to the type and range declared with it, and COMBINATIONS
    to what settings must satisfy together, before anything runs, whether a value came from a flag
    or from a run's config.json.
  - add_flags(): a flag per declared setting (rlaif.py: the pipeline's, and DRIVER_FLAGS of the
    sections; set_overrides() reads its --set SECTION.NAME=VALUE for the others); stage_settings()
    and stage_command_line(): the command line of a stage script (python sft.py, judge.py,
    reward.py, ppo.py, evaluate.py). dpo.py trains one part of the compare stage, so it uses
    stage_settings alone (the same flags and checks, no done.json).
"""

import argparse
import json
import math
import operator
import re
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated

from distributed import barrier, is_main, setup_distributed
from model import GPT2_VOCAB
from runs import (
    STAGE_ORDER,
    atomic_write,
    log,
    open_tensorboard,
    os_errors_as_messages,
    require_done,
    set_aside,
    start_over,
)
from training import keep_freed_memory

# -----------------------------------------------------------------------------
# The settings of a run


@dataclass
class Config:
    """Every setting of a run, defaults = the embedded tiny run (rlaif.py's PAPER lists what the
    paper changes). Each field is a flag of rlaif.py (--seed), declared with its help, choices and
    range (check_settings). The sections sft, ppo, rm and dpo hold the stages' own settings, defined
    in sft.py (SFTConfig), ppo.py (PPOConfig), reward.py (RMConfig) and dpo.py (DPOConfig); rlaif.py
    sets them with --set ppo.gamma=0.99, and the few of DRIVER_FLAGS with flags (--ppo-lr); each is
    an unprefixed flag of its stage's own script (python ppo.py --gamma). Made by rlaif.make_config
    or read back by load_config, which build the sections as those dataclasses."""

    run_dir: Annotated[str, "where every stage writes its outputs"] = "runs/tiny"
    seed: Annotated[int, "seed of every stage (split order, initialisation, sampling, PPO)"] = 1
    device: Annotated[str, "cpu, cuda or cuda:N"] = "cpu"
    init: Annotated[
        str,
        "model preset trained from scratch (tiny, micro) or HF weights to start from "
        "(gpt2-large, or a directory with config.json + model.safetensors)",
    ] = "tiny"
    compact: Annotated[
        bool,
        "[offline stand-in] compact vocabulary + compact answers (no explanation, "
        "code cut after the api_call)",
    ] = True
    api_pairs: Annotated[
        bool, "[offline stand-in] add the API database's 936 entries as SFT pairs"
    ] = True
    train_file: Annotated[
        str,
        "SFT data: '' = the offline split of the eval file; hub = APIBench's "
        "huggingface_train.json from the Hub; or a local file of its schema",
    ] = ""
    val_percent: Annotated[
        int,
        "percent of the eval file held out as validation questions, after the test's 20 percent: "
        "5 is 51 questions; 20 (190) is for choosing settings, and offline leaves fewer training "
        "instructions (521 of 660)",
        ">= 1 and <= 60",
    ] = 5
    max_answer_tokens: Annotated[
        int,
        "answer length: SFT targets are cut to it; sampling, PPO rollouts and "
        "evaluation stop at it",
        ">= 8",
    ] = 160
    grad_clip: Annotated[float, "gradient-norm clip (SFT, reward model, PPO)", "> 0"] = 1.0
    sampled_instructions: Annotated[
        int, "training instructions whose answers the judge grades (at most all)", ">= 1"
    ] = 1000
    answers_per_instruction: Annotated[
        int, "policy answers sampled per sampled instruction (contrast answers come on top)", ">= 1"
    ] = 4
    contrast_answers: Annotated[
        bool,
        "[not in the paper] also judge, per sampled instruction, its reference, "
        "another domain's, and a policy answer cut before its code",
    ] = True
    temperature: Annotated[
        float,
        "sampling temperature of the feedback samples, the PPO rollouts and best-of-n; "
        "0 (greedy) would make every answer to a prompt the same: no pairs to learn "
        "from",
        "> 0",
    ] = 0.7
    judge: Annotated[
        str,
        "rules (offline stand-in) or openai (any OpenAI-compatible LLM, the paper's GPT-3.5)",
        ("rules", "openai"),
    ] = "rules"
    judge_model: Annotated[str, "model name sent to the judge endpoint"] = "gpt-3.5-turbo"
    judge_base_url: Annotated[
        str,
        "OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 for vLLM "
        "(empty: $OPENAI_BASE_URL, else api.openai.com)",
    ] = ""
    judge_concurrency: Annotated[int, "judge requests in flight", ">= 1"] = 8
    tensorboard: Annotated[
        bool,
        "also write every stage's metrics and PPO's sample tables as TensorBoard event "
        "files in run_dir/tb (needs: pip install tensorboard)",
    ] = False
    judge_max_usd: Annotated[
        float,
        "stop the AI feedback before the judge's estimated or running cost passes "
        "this many USD (0 = no cap); what the run spent before (reruns, --compare) "
        "counts, and what was judged is kept",
        ">= 0",
    ] = 0.0
    judge_price: Annotated[
        str,
        "USD per million input,output tokens of --judge-model, e.g. 2.5,10 (empty: "
        "judge.PRICE_PER_MTOK's; --judge-max-usd needs a price)",
    ] = ""
    eval_split: Annotated[
        str,
        "the questions evaluate answers: test (the held-out 176, for the final table only) or "
        "val (the validation questions, for choosing settings)",
        ("test", "val"),
    ] = "test"
    eval_limit: Annotated[
        int, "evaluate on the first N of those questions only (0 = all)", ">= 0"
    ] = 0
    exec_mode: Annotated[
        str,
        "executability: offline (checking stand-ins, no network), real (real libraries) or none",
        ("offline", "real", "none"),
    ] = "offline"
    exec_timeout: Annotated[
        float,
        "CPU seconds per snippet; the wall clock allows 3x (sleeps; real mode: downloads)",
        "> 0",
    ] = 10.0
    unsafe_exec: Annotated[
        bool,
        "offline executability without OS isolation where namespaces are "
        "unavailable (NOT isolated; marked in the results)",
    ] = False
    compare: Annotated[
        bool,
        "[not in the paper] also d-RLAIF (PPO on the judge's score), RLOO, GRPO, DPO, "
        "rejection sampling and best-of-n from the same SFT model and feedback, in the same "
        "results table",
    ] = False
    best_of_n: Annotated[
        int, "answers sampled per test question for --compare's best-of-n", ">= 1"
    ] = 8
    dist_timeout: Annotated[
        float,
        "under torchrun: seconds a rank waits for the others (at a barrier, or while "
        "rank 0 alone samples, judges or evaluates) before the run ends with an "
        "error",
        "> 0",
    ] = 3600.0
    sft: typing.Any = field(default_factory=dict)  # sft.SFTConfig
    ppo: typing.Any = field(default_factory=dict)  # ppo.PPOConfig
    rm: typing.Any = field(default_factory=dict)  # reward.RMConfig
    dpo: typing.Any = field(default_factory=dict)  # dpo.DPOConfig


SECTIONS = ("sft", "ppo", "rm", "dpo")
# The section settings with a flag of rlaif.py (--sft-steps): how long each stage trains, its
# learning rate, and PPO's batch layout (what fits a GPU), the ones the README, the docs' commands
# and the tests change. Every other keeps its name and is set with --set SECTION.NAME=VALUE
# (--set ppo.gamma=0.99), in a run's config.json, or by its stage's script (python ppo.py --gamma):
# a flag each would make rlaif.py --help a list of 76 (issue 47).
DRIVER_FLAGS = dict(
    sft=("steps", "lr", "eval_every"),
    ppo=("iterations", "batch_size", "rollouts_per_prompt", "minibatch_size", "grad_accum", "lr"),
    rm=(),
    dpo=("steps",),
)
# Settings that change where and how fast a run goes, not its results: a finished run may resume
# with others.
NOT_RESULTS = (
    "run_dir",
    "judge_concurrency",
    "judge_max_usd",
    "judge_price",
    "tensorboard",
    "dist_timeout",
)


def apply_overrides(cfg, overrides, where="command line"):
    """cfg with `overrides` applied: top-level names, '<section>_<name>' (ppo_lr) or a section's
    dict (ppo=dict(lr=...)); None means unset. The one place settings change after their
    defaults."""
    for key, value in overrides.items():
        if value is None:
            continue
        section, name = (
            key.split("_", 1) if key.startswith(tuple(s + "_" for s in SECTIONS)) else (None, key)
        )
        if key in SECTIONS:
            for name, v in value.items():
                cfg = apply_overrides(cfg, {f"{key}_{name}": v}, where)
        elif section:
            sub = getattr(cfg, section)
            # a section whose class this process has not loaded: kept as recorded
            if isinstance(sub, dict):
                setattr(cfg, section, dict(sub, **{name: value}))
            elif name not in {f.name for f in fields(sub)}:
                raise SystemExit(f"{where}: {section} has no setting {name!r}")
            else:
                setattr(cfg, section, replace(sub, **{name: value}))
        elif key not in {f.name for f in fields(Config)}:
            raise SystemExit(f"{where}: no setting {key!r}")
        else:
            setattr(cfg, key, value)
    return cfg


def load_config(run_dir, **sections):
    """The Config a run recorded in run_dir/config.json (or a config.json given), its sections
    built with the classes given (ppo=PPOConfig, ...); a section whose class is not given stays the
    recorded dict. A file that is not JSON, not an object, names a setting this version does not
    have (another version's run: settings are not renamed or migrated), or has a setting of the
    wrong type or out of its range is refused, naming the file and the field, before anything
    runs."""
    config_file = Path(run_dir) if str(run_dir).endswith(".json") else Path(run_dir) / "config.json"
    if not config_file.exists():
        raise SystemExit(
            f"{config_file} not found"
            + (
                ""
                if config_file == Path(run_dir)
                else f": start the run with python rlaif.py --run-dir {run_dir}"
            )
        )
    try:
        d = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(
            f"{config_file}: not JSON (line {e.lineno} column {e.colno}: {e.msg}); rlaif.py "
            "wrote it as JSON: edited by hand? Fix it, or start a new --run-dir"
        ) from None
    for name, value in [("", d)] + [(n, d.get(n, {})) for n in sections if isinstance(d, dict)]:
        if not isinstance(value, dict):
            raise SystemExit(
                f"{config_file}: {name or 'the file'} is a JSON {type(value).__name__}, not an "
                "object of settings; fix it, or start a new --run-dir"
            )
    unknown = unknown_settings(d, sections)
    if unknown:
        raise SystemExit(
            f"{config_file}: recorded by another version of rlaif.py, with settings this version "
            f"does not have: {', '.join(unknown)}; start a new --run-dir"
        )
    built = {name: cls(**d.get(name, {})) for name, cls in sections.items()}
    cfg = Config(**dict(d, **built))
    check_settings(cfg, where=config_file)
    return cfg


def unknown_settings(recorded, sections):
    """The names in a recorded config.json that are no setting of this version (sft_steps,
    ppo.seed), in Config and in the sections whose classes are given. A setting missing from it
    is at its default (a run made before the setting existed)."""
    unknown = [key for key in recorded if key not in {f.name for f in fields(Config)}]
    for name, cls in sections.items():
        known = {f.name for f in fields(cls)}
        unknown += [f"{name}.{key}" for key in recorded.get(name, {}) if key not in known]
    return unknown


def save_config(cfg, run_dir):
    atomic_write(
        Path(run_dir) / "config.json",
        lambda p: Path(p).write_text(json.dumps(asdict(cfg), indent=1)),
    )


# Every setting's type, choices and range are declared with it: `name: Annotated[type, help,
# (choices), "range"]`, the range as comparisons joined by "and" (">= 1", "> 0", ">= 0 and < 1"); a
# float is also finite.
# check_settings holds every field of Config and of its sections to its own declaration, before the
# first stage, whether the value came from a flag or from a run's config.json: a setting is refused
# before any work, never after.

BOUND = re.compile(r"(>=|<=|>|<)\s*(-?[0-9.]+(?:e-?[0-9]+)?)")
COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def declared_settings(cls):
    """(name, type, help, choices or None, range or None) of each Annotated field of a config
    dataclass."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in fields(cls):
        if typing.get_origin(hints[f.name]) is typing.Annotated:  # a section (Config.ppo) is not
            kind, help_text, *extra = typing.get_args(hints[f.name])
            choices = next((e for e in extra if isinstance(e, tuple)), None)
            bounds = next((e for e in extra if isinstance(e, str)), None)
            yield f.name, kind, help_text, choices, bounds


def setting_problem(value, kind, choices, bounds):
    """Why `value` is not a valid setting of its declaration ('must be >= 1'), or None."""
    if isinstance(value, bool) != (kind is bool) or not isinstance(
        value, (int, float) if kind is float else kind
    ):
        name = {float: "a number", int: "an integer", bool: "true or false"}.get(
            kind, "a " + kind.__name__
        )
        return f"must be {name}"
    if choices and value not in choices:
        return f"must be one of {', '.join(choices)}"
    # inf and NaN are floats too: NaN fails every comparison but inf passes "> 0", and neither has
    # ever meant a setting (an infinite learning rate or timeout, a NaN penalty). A range that
    # means to allow infinity says "inf".
    if kind is float and not math.isfinite(value) and "inf" not in (bounds or ""):
        return "must be a finite number"
    if bounds and not all(COMPARE[op](value, float(x)) for op, x in BOUND.findall(bounds)):
        return f"must be {bounds}"
    return None


def settings_problems(cfg, where=None, unprefixed=None):
    """One line per setting of cfg (Config and every section built as its dataclass) that breaks its
    declaration. A line names the flag (where=None: --ppo-batch-size or --set ppo.gamma=2.0, or
    --batch-size for the section `unprefixed`, the one of a stage script) or the field of the file
    `where` (ppo.batch_size)."""
    problems = []
    for section in (None, *SECTIONS):
        obj = cfg if section is None else getattr(cfg, section)
        if section is not None and isinstance(obj, dict):
            continue  # a section whose class this process has not loaded
        for name, kind, help_text, choices, bounds in declared_settings(type(obj)):
            value, why = (
                getattr(obj, name),
                setting_problem(getattr(obj, name), kind, choices, bounds),
            )
            if why is None:
                continue
            label = setting_label(section, name, value, where, unprefixed)
            problems.append(f"{label}: {why} ({help_text})")
    return problems


def setting_label(section, name, value, where=None, unprefixed=None):
    """How the setting was given: '--ppo-batch-size 8' or '--set ppo.gamma=2.0' (rlaif.py's
    spelling, driver_flag()), '--batch-size 8' for the section `unprefixed` (a stage script's
    own), or, for a config file `where`, 'ppo.batch_size 8' (the value as JSON)."""
    if where:
        return f"{section + '.' if section else ''}{name} {json.dumps(value)}"
    if section is not None and section == unprefixed:
        return f"--{name.replace('_', '-')} {value}"
    label = driver_flag(section, name)
    return f"{label}={value}" if label.startswith("--set ") else f"{label} {value}"


def driver_flag(section, name):
    """rlaif.py's flag of a setting: --seed, --sft-steps (DRIVER_FLAGS), or --set ppo.gamma for a
    section setting without a flag of its own."""
    if section is None or name in DRIVER_FLAGS[section]:
        return f"--{section + '-' if section else ''}{name}".replace("_", "-")
    return f"--set {section}.{name}"


# Settings each within its range that together leave a stage nothing to train on (or ask a step for
# more than there is): ((section, name), ...), what must hold of their values, and why. Checked with
# the ranges, from flags or a config.json, so that such a run is refused before any work. The
# combinations that also depend on the data (how many instructions there are) are rlaif.py's
# check_stage_inputs.
COMBINATIONS = (
    (
        (("rm", "heldout_fraction"), ("rm", "val_fraction")),
        lambda held, val: held + val < 1,
        "must add up to less than 1: the held-out and validation prompts would take every sampled "
        "instruction, leaving the reward model none to train on",
    ),
    (
        (("ppo", "minibatch_size"), ("ppo", "grad_accum"), ("ppo", "batch_size")),
        lambda minibatch, accum, batch: minibatch * accum <= batch,
        "an optimizer step (minibatch_size x grad_accum answers) must not take more answers than "
        "an iteration samples (batch_size)",
    ),
)


def combination_problems(cfg, where=None, unprefixed=None):
    """One line per combination of COMBINATIONS that cfg breaks, naming each setting and its
    value. A section whose class this process has not loaded (a dict) is read as recorded."""
    problems = []
    for names, holds, why in COMBINATIONS:
        sections = [getattr(cfg, section) for section, _ in names]
        values = [
            sub.get(name) if isinstance(sub, dict) else getattr(sub, name)
            for sub, (_, name) in zip(sections, names, strict=True)
        ]
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            continue  # a missing or mistyped value: settings_problems names it
        if not holds(*values):
            labels = [
                setting_label(section, name, value, where, unprefixed)
                for (section, name), value in zip(names, values, strict=True)
            ]
            problems.append(f"{', '.join(labels)}: {why}")
    return problems


def check_settings(cfg, where=None, unprefixed=None, more=()):
    """SystemExit listing every problem of settings_problems() and combination_problems(), and
    `more` (checks across settings made elsewhere)."""
    # combinations are judged once each setting is within its own range
    problems = settings_problems(cfg, where, unprefixed) or combination_problems(
        cfg, where, unprefixed
    )
    problems += list(more)
    if problems:
        source = f"{where}: refused" if where else "refused before anything ran"
        raise SystemExit(f"{source}:\n  " + "\n  ".join(problems))


def settings_diff(recorded, cfg):
    """['field: recorded -> requested', ...] between a run's config.json and the requested
    config."""
    wanted = asdict(cfg)
    diff = []
    for key in sorted(set(recorded) | set(wanted)):
        if key in NOT_RESULTS:
            continue
        old, new = recorded.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            diff += [
                f"{key}.{k}: {old.get(k)!r} -> {new.get(k)!r}"
                for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)
            ]
        elif old != new:
            diff.append(f"{key}: {old!r} -> {new!r}")
    return diff


# -----------------------------------------------------------------------------
# Command lines: a flag per setting, and a stage script's settings read from its run


def add_flags(parser, cls, prefix, default_text, only=None):
    """One flag per field of a config dataclass declared as `name: Annotated[type, help, (choices),
    "range"]` (or per field named in `only`): --prefix-name, yes/no flags as --name / --no-name,
    default None (unset). default_text(field) says what an unset flag means, shown in --help with
    the range (check_settings enforces it)."""
    group = parser.add_argument_group(f"{prefix.rstrip('-') or 'pipeline'} settings")
    defaults = {f.name: f for f in fields(cls)}
    for name, kind, help_text, choices, bounds in declared_settings(cls):
        if only is not None and name not in only:
            continue
        flag, dest = f"--{prefix}{name.replace('_', '-')}", prefix.replace("-", "_") + name
        help_text += f" (default: {default_text(defaults[name])}{'; ' + bounds if bounds else ''})"
        if kind is bool:
            group.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, help=help_text
            )
        else:
            group.add_argument(flag, dest=dest, type=kind, help=help_text, choices=choices)


def set_overrides(assignments, classes, flags):
    """The overrides `flags` of rlaif.py ({"ppo_lr": 1e-5}) with its --set SECTION.NAME=VALUE
    assignments added ({"ppo_gamma": 0.99}), of the sections `classes` (sft=SFTConfig, ...), each
    value read as its setting's declared type (a yes/no one as true or false). A value that is not
    of its type is passed on as written, for check_settings to refuse with the ranges, naming --set;
    an unknown setting, or one given twice, is refused here."""
    overrides = dict(flags)
    for text in assignments:
        target, equals, value = text.partition("=")
        section, _, name = target.partition(".")
        if section not in classes:
            raise SystemExit(
                f"--set {text}: no section {section!r} (the sections: {', '.join(classes)}; a "
                "setting of the pipeline has its own flag)"
            )
        kinds = {n: kind for n, kind, *_ in declared_settings(classes[section])}
        if name not in kinds:
            raise SystemExit(
                f"--set {text}: {section} has no setting {name!r} (its settings: "
                f"{', '.join(kinds)})"
            )
        if not equals:
            raise SystemExit(f"--set {text}: expected SECTION.NAME=VALUE (--set ppo.gamma=0.99)")
        if f"{section}_{name}" in overrides:
            raise SystemExit(f"--set {text}: {section}.{name} is given twice; give it once")
        overrides[f"{section}_{name}"] = read_setting(value, kinds[name])
    return overrides


def read_setting(text, kind):
    """text as a value of type `kind` (a bool as true or false), or text itself if it is not one."""
    if kind is bool:
        return {"true": True, "false": False}.get(text.lower(), text)
    try:
        return kind(text)
    except ValueError:
        return text


# A stage script's inputs, given as files instead of a run directory (python ppo.py --sft-model DIR
# --reward-model FILE, as summarize_from_feedback_details' scripts take theirs): what each flag is.
INPUTS = dict(
    sft_model="the SFT model directory (config.json, model.safetensors)",
    reward_model="the reward model file (a reward stage's reward_model.pt)",
    samples="the sampled answers (a sample stage's samples.jsonl)",
    feedback="the judge's feedback on those answers (a feedback stage's feedback.jsonl)",
)
ALONE_FLAGS = ("out", "settings", "device", "seed")


def stage_settings(
    description, argv=None, section=None, section_cls=None, force_help=None, inputs=None, **more
):
    """The settings of a stage script (python ppo.py, dpo.py): --run-dir (default runs/tiny),
    --force, one flag per field of its section of Config (section="ppo", section_cls=PPOConfig)
    and, for a stage that can run without a run directory (inputs: its INPUTS, () for SFT), a flag
    per input and --out. Returns (cfg, run, force, overrides, given): the Config (the run's
    recorded one, or alone_config's) with the flags applied, checked before anything is set aside
    or recorded; `run` the run directory, or --out without one (given: {input: Path}; None when
    the stage runs on a run directory)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--run-dir",
        default="runs/tiny",
        help="a run directory of rlaif.py"
        + (" whose earlier stages are done" if inputs != () else "")
        + " (default: runs/tiny, the default run of rlaif.py)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help=force_help or "redo a finished stage (later stages are set aside)",
    )
    if inputs is not None:
        add_input_flags(p, inputs)
    if section_cls is not None:
        add_flags(p, section_cls, "", lambda f: "the run's")
    args = vars(p.parse_args(argv))
    run, force = Path(args.pop("run_dir")), args.pop("force")
    given = {k: Path(v) for k in inputs or () if (v := args.pop(k)) is not None}
    alone = {k: args.pop(k) for k in ALONE_FLAGS if k in args}
    overrides = {f"{section}_{k}": v for k, v in args.items() if v is not None}
    sections = dict({section: section_cls} if section else {}, **more)
    if given or any(v is not None for v in alone.values()):
        cfg, run = alone_config(inputs, given, alone, sections)
    else:
        cfg, given = load_config(run, **sections), None
    cfg = apply_overrides(cfg, overrides)
    check_settings(cfg, unprefixed=section)
    keep_freed_memory()
    setup_distributed(cfg.device, cfg.dist_timeout)
    if cfg.tensorboard and is_main():
        open_tensorboard(run / "tb")
    return cfg, run, force, overrides, given


def add_input_flags(parser, inputs):
    needs = alone_needs(inputs)
    group = parser.add_argument_group(f"without a run directory ({needs})")
    for key in inputs:
        group.add_argument(f"--{flag(key)}", dest=key, metavar="PATH", help=INPUTS[key])
    group.add_argument(
        "--out", help="the directory to write into (required without a run directory)"
    )
    group.add_argument(
        "--settings",
        metavar="CONFIG_JSON",
        help="the run-level settings (answer length, temperature, ...) of this config.json, e.g. "
        "the run that made the inputs (default: the defaults of python rlaif.py)",
    )
    group.add_argument("--device", help="cpu, cuda or cuda:N (default: --settings')")
    group.add_argument("--seed", type=int, help="random seed (default: --settings')")


def flag(key):
    return key.replace("_", "-")


def alone_needs(inputs):
    """The flags a stage script needs without a run directory: its inputs' and --out."""
    return ", ".join([f"--{flag(k)}" for k in inputs] + ["--out"])


def alone_config(inputs, given, alone, sections):
    """(cfg, out) of a stage script given its inputs as files: the settings of --settings (else the
    defaults) with --device and --seed, and the vocabulary the SFT model was trained with; every
    input checked to exist before any work."""
    missing = [f"--{flag(k)}" for k in inputs if k not in given] + ["--out"] * (not alone["out"])
    if missing:
        raise SystemExit(
            f"without a run directory this stage needs {alone_needs(inputs)}"
            f" (missing {', '.join(missing)}); or give --run-dir alone"
        )
    for key, path in given.items():
        if not path.exists() or (key == "sft_model" and not (path / "config.json").exists()):
            raise SystemExit(f"--{flag(key)} {path}: not found ({INPUTS[key]})")
    if alone["settings"]:
        cfg = load_config(alone["settings"], **sections)
    else:
        cfg = Config(**{name: cls() for name, cls in sections.items()})
    cfg = apply_overrides(cfg, dict(device=alone["device"], seed=alone["seed"]))
    if "sft_model" in given:  # the tokenizer is the one the model was trained with
        vocab = json.loads((given["sft_model"] / "config.json").read_text())["vocab_size"]
        cfg.compact = vocab < GPT2_VOCAB
    return cfg, Path(alone["out"])


def prepare_out(cfg, out, force, stage):
    """--out of a stage script given its inputs as files: a finished one kept unless --force, which
    starts over (the old model stays until the new one replaces it); the settings recorded."""
    if (out / "done.json").exists() and not force:
        raise SystemExit(f"{out} is already done; --force redoes it")
    if is_main():
        with os_errors_as_messages(f"[{stage}]"):
            out.mkdir(parents=True, exist_ok=True)
            if force:
                start_over(out)
            save_config(cfg, out)
    barrier()


def stage_command_line(stage, description, argv=None, section=None, section_cls=None, inputs=None):
    """The command line of a stage script (stage_settings). Returns (cfg, run, given): the run's
    recorded Config with the flags applied and recorded; earlier stages verified, the stage
    resumable if interrupted, a finished one kept unless --force, and later stages set aside so
    that no result of the old stage survives as if current. Without a run directory (given:
    {input: Path}, the inputs given as files), `run` is --out, where the settings are recorded
    instead."""
    cfg, run, force, overrides, given = stage_settings(
        description, argv, section, section_cls, inputs=inputs
    )
    if given is not None:
        prepare_out(cfg, run, force, stage)
        return cfg, run, given
    require_done(run, STAGE_ORDER[: STAGE_ORDER.index(stage)])
    if (run / stage / "done.json").exists() and not force:
        raise SystemExit(
            f"{run / stage} is already done; --force redoes it (later stages are set aside)"
        )
    if is_main():
        with os_errors_as_messages(f"[{stage}]"):
            set_aside(run, STAGE_ORDER[STAGE_ORDER.index(stage) + (0 if force else 1) :])
            if overrides:
                save_config(cfg, run)
        if overrides:
            log(f"[{stage}] recorded in {run / 'config.json'}: {overrides}")
    barrier()
    return cfg, run, given
