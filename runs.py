"""
Run directories: the files every stage of rlaif.py reads and writes, how one stage is run, and the
plumbing every training stage shares. Here, in order:
  - training helpers: log and progress lines, atomic writes, checkpoints, AdamW, the LR schedule,
    autocast, batches of similar length.
  - Config: every setting of a run, recorded in run_dir/config.json; load_config() reads it back
    (settings renamed since are read under their new names); check_settings() holds every setting
    to the type and range declared with it, before anything runs.
  - Sample, Feedback: the rows of sample/samples.jsonl and feedback/feedback.jsonl, written once.
  - RUN_FILES: every path inside a run; done markers, hashes and set-aside of stages to redo. A
    run is one directory (--run-dir). Each stage writes run_dir/<stage>/ and, last, a done.json
    with its summary and the sha256 of its outputs; a finished stage is skipped on the next run and
    its outputs are checked whenever a later stage relies on them.
  - metrics.jsonl (and TensorBoard), resumable training state (resume).
  - the command line of a stage script (python sft.py, judge.py, reward.py, ppo.py, evaluate.py) and
    run_stage(), which rlaif.py and those scripts use to run a stage. dpo.py trains one part of the
    compare stage, so it has a command line of its own (the same flags and checks, no done.json).
The torchrun code (several processes) is distributed.py's. Plumbing: nothing here imports a stage
(the stages import from here; model.py imports nothing of the project, so that it can be copied
alone).
"""

import argparse
import contextlib
import ctypes
import errno
import hashlib
import json
import math
import operator
import os
import random
import re
import shutil
import time
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated

import torch

from distributed import barrier, is_main, setup_distributed

# -----------------------------------------------------------------------------
# Training helpers shared by the stages: progress lines, files written atomically, checkpoints,
# optimizer, LR schedule, autocast, and batches of similar length


def log(msg):
    """Progress output, flushed at once so that a log file shows it while a stage runs."""
    print(msg, flush=True)


def make_optimizer(module, lr, weight_decay=0.1, betas=(0.9, 0.95)):
    """AdamW with weight decay on matrices only: biases, LayerNorms (1-D) are not decayed
    (nanoGPT)."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
        dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0),
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=torch.cuda.is_available())


def lr_at(step, max_lr, warmup, total, min_ratio=0.1):
    """Linear warmup, then cosine decay to min_ratio * max_lr at `total` steps."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return max_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast(device):
    """bf16 autocast on GPU; a no-op context on CPU (same code path either way)."""
    return torch.autocast(
        device_type="cuda", dtype=torch.bfloat16, enabled=str(device).startswith("cuda")
    )


def frozen_dtype(device):
    """The dtype of a model that takes no gradients (PPO's and DPO's reference, the reward model
    under PPO): bf16 on GPU halves its memory, and autocast computes in bf16 there anyway."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def keep_freed_memory():
    """Keep the memory torch frees inside the process (Linux, glibc) instead of handing it back to
    the kernel. On CPU, every step allocates and frees tensors of hundreds of MB (the logits and
    their gradients); glibc serves each from a fresh mmap, whose pages the kernel zeroes again on
    first touch, about a tenth of the default run's CPU time. Where memory comes from changes no
    number (docs/benchmarks.md); the same reason PyTorch's CPU tuning guide suggests jemalloc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl): nothing to do
        return
    libc.mallopt(M_MMAP_MAX, 0)  # large blocks from the heap too, not from mmap
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)  # keep up to 1 GiB of free heap


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's <malloc.h>


def progress(done, total, t0):
    """'(elapsed, ETA)' of a loop that has done `done` of `total` units since time t0: every stage's
    progress lines end with it."""
    elapsed = time.time() - t0
    eta = elapsed / done * (total - done) if done else float("nan")
    return f"({elapsed / 60:.1f} min, ETA {eta / 60:.1f} min)"


def progress_log(tag, unit, speed=lambda: ""):
    """on_batch(done, total) for a loop that reports its own progress (model.sample_answers): logs
    '[tag] done/total unit SPEED (elapsed, ETA)', timed from now; speed() says how fast (MFU)."""
    t0 = time.time()
    return lambda done, total: log(
        f"[{tag}] {done}/{total} {unit} {speed()} {progress(done, total, t0)}"
    )


def atomic_write(path, write):
    """Call write(tmp_path), then rename over `path`: a crash never leaves a half-written file. A
    write that fails is re-raised as an OSError naming the file and the cause (torch's own message
    for a full disk names neither); the half-written tmp file is removed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(str(tmp))
        os.replace(tmp, path)
    except Exception as e:  # OSError, torch's RuntimeError, safetensors' SafetensorError
        error = write_error(path, e)  # before the tmp file goes: a full disk is still full
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise error from e


def write_error(path, e):
    """OSError('cannot write PATH: CAUSE'); a full disk is named as such whichever library hit
    it."""
    full = (
        getattr(e, "errno", None) == errno.ENOSPC
        or "No space left" in str(e)
        or free_bytes(Path(path).parent) < 1 << 20
    )
    cause = "no space left on device" if full else f"{type(e).__name__}: {e}"
    code = errno.ENOSPC if full else getattr(e, "errno", None) or errno.EIO
    return OSError(code, f"cannot write {path}: {cause}")


def free_bytes(directory):
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return 1 << 62  # unknown: not called full


@contextlib.contextmanager
def os_errors_as_messages(program):
    """An operating-system error (a full disk, a permission refused, a path that is a file) ends
    the program with one line naming the file and the cause, and exit status 1: it is the state of
    the machine, which the user fixes, not a bug of the code, whose traceback would bury the line
    that matters. atomic_write's errors already name their file (write_error)."""
    try:
        yield
    except OSError as e:
        cause = e.strerror or str(e)
        where = f": {e.filename}" if e.filename and str(e.filename) not in cause else ""
        raise SystemExit(f"{program} stopped: {cause}{where}") from None


def check_loss(loss, stage, step, look_at):
    """Stop a training stage whose loss is NaN or infinite, whatever caused it (a learning rate
    too large, a reward or penalty that is not a number, an overflow): the weights it would save
    are no longer numbers, and every later stage would build on them. Called by each training loop
    with its step and the settings most likely to blame; nothing is written after it."""
    value = loss.item() if torch.is_tensor(loss) else float(loss)
    if not math.isfinite(value):
        raise SystemExit(
            f"[{stage}] the training loss is {value} at {step}: training diverged, and no model "
            f"is written. Look at {look_at}, then run the stage again with other settings"
        )


def require_items(items, stage, what, cause):
    """Stop a stage whose input turned out empty (`what`, e.g. 'judge-ordered pairs'), naming the
    cause, rather than train on nothing and pass the untrained model on as if trained."""
    if not items:
        raise SystemExit(f"[{stage}] nothing to train on: 0 {what} ({cause}); no model is written")


class RecordingFile:
    """A binary file that keeps the OSError of a failed write: torch.save reports one only as
    'unexpected pos' or 'basic_ios::clear: iostream error', so without it a full disk goes
    unnamed."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        return self.f.flush()


def torch_save(obj, path):
    """torch.save through a Python file, so that a failed write raises its own OSError
    (ENOSPC...)."""
    with open(path, "wb") as f:
        out = RecordingFile(f)
        try:
            torch.save(obj, out)
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None


def save_checkpoint(path, **state):
    """Atomic torch.save of plain state (tensors, numbers, strings, dicts)."""
    atomic_write(path, lambda p: torch_save(state, p))


def atomic_dir(path, write):
    """Call write(tmp_dir), then rename it to `path`: a directory (a model, written by
    model.save_pretrained) is complete or absent, never half-written. A finished older one is
    replaced only once the new one is complete. A write that fails is re-raised as atomic_write's
    OSError naming `path` and the cause (a full disk as such)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a crash's leftover
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except Exception as e:
        error = write_error(path, e)  # before the tmp dir goes: a full disk is still full
        shutil.rmtree(tmp, ignore_errors=True)  # frees what a full disk needs
        raise error from e
    except BaseException:  # a kill (Ctrl-C): nothing half-written is left beside `path`
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)  # a crash here leaves the new one complete in tmp, none at `path`
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    """torch.load of plain state only (weights_only: no pickle code runs); errors name the file."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(
            f"{path}: not a readable checkpoint ({type(e).__name__}: {e}); delete it (and the "
            "stage's done.json) to redo the stage that wrote it"
        ) from None


def stream_seed(seed, stream, index):
    """The seed of draw `index` (an epoch, an iteration) of one stream of random numbers of a run:
    seed * stream + index. Streams drawn from the same kind of generator (SFT's shuffle and batch
    order, the reward model's) take different multipliers, so that they do not share a seed; PPO's
    prompt choice (Python's random) and its sampling (a torch.Generator) share 104729 but not a
    generator. The values are the ones the stages always used."""
    return seed * stream + index


def length_grouped_batches(keys, batch_size, shuffle_seed, batch_seed, drop_last=False):
    """Batches of indices with little padding but random content: a seeded shuffle, cut into groups
    of 32 batches (wide enough to find similar lengths, narrow enough to stay random), each group
    sorted by `keys` (a length, or (prompt length // 16, answer length) where prompts are left- and
    answers right-padded, so both should agree), then the batches shuffled."""
    order = list(range(len(keys)))
    random.Random(shuffle_seed).shuffle(order)
    group = 32 * batch_size
    order = [
        j
        for g in range(0, len(order), group)
        for j in sorted(order[g : g + group], key=lambda j: keys[j])
    ]
    end = (
        len(order) // batch_size * batch_size
        if drop_last and len(order) >= batch_size
        else len(order)
    )
    batches = [order[b : b + batch_size] for b in range(0, end, batch_size)]
    random.Random(batch_seed).shuffle(batches)
    return batches


# -----------------------------------------------------------------------------
# The settings of a run


@dataclass
class Config:
    """Every setting of a run, defaults = the embedded tiny run (rlaif.py's PAPER lists what the
    paper changes). Each field is a flag of rlaif.py (--sft-steps), declared with its help, choices
    and range (check_settings). The sections ppo, rm and dpo hold the stages' own settings, defined
    at the top of ppo.py (PPOConfig), reward.py (RMConfig) and dpo.py (DPOConfig); their flags are
    --ppo-*, --rm-*, --dpo-* (and unprefixed in that stage's own script). Made by rlaif.make_config
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
    max_answer_tokens: Annotated[
        int,
        "answer length: SFT targets are cut to it; sampling, PPO rollouts and "
        "evaluation stop at it",
        ">= 8",
    ] = 160
    sft_steps: Annotated[int, "SFT optimizer steps", ">= 1"] = 800
    sft_batch_size: Annotated[int, "SFT examples per micro-batch", ">= 1"] = 16
    sft_grad_accum: Annotated[int, "SFT micro-batches per optimizer step", ">= 1"] = 1
    sft_lr: Annotated[float, "SFT peak learning rate (linear warmup, cosine decay)", "> 0"] = 2e-3
    sft_warmup: Annotated[int, "SFT warmup steps", ">= 0"] = 50
    sft_eval_every: Annotated[
        int, "SFT validation loss and checkpoint every this many steps", ">= 1"
    ] = 100
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
        float, "seconds per snippet (real mode includes model downloads)", "> 0"
    ] = 10.0
    unsafe_exec: Annotated[
        bool,
        "offline executability without OS isolation where namespaces are "
        "unavailable (NOT isolated; marked in the results)",
    ] = False
    compare: Annotated[
        bool,
        "[not in the paper] also d-RLAIF (PPO on the judge's score), RLOO, GRPO, DPO and "
        "best-of-n from the same SFT model and feedback, in the same results table",
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
    ppo: typing.Any = field(default_factory=dict)  # ppo.PPOConfig
    rm: typing.Any = field(default_factory=dict)  # reward.RMConfig
    dpo: typing.Any = field(default_factory=dict)  # dpo.DPOConfig


SECTIONS = ("ppo", "rm", "dpo")
# Settings renamed since runs were recorded: load_config reads an older config.json under the new
# names, so that an existing run directory still resumes.
RENAMED = dict(
    eval_every="sft_eval_every",  # applies to SFT only
    sample_prompts="sampled_instructions",
    samples_per_prompt="answers_per_instruction",
)
# Settings that became constants, with the value each is fixed at: a run recorded with another value
# cannot resume (its results could not be reproduced).
REMOVED = dict(weight_decay=0.1)  # sft.WEIGHT_DECAY
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
    """The Config a run recorded in run_dir/config.json, its sections built with the classes given
    (ppo=PPOConfig, ...); a section whose class is not given stays the recorded dict. A file that is
    not JSON, not an object, or has a setting of the wrong type or out of its range is refused,
    naming the file and the field, before anything runs."""
    config_file = Path(run_dir) / "config.json"
    if not config_file.exists():
        raise SystemExit(
            f"{config_file} not found: start the run with python rlaif.py --run-dir {run_dir}"
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
    d = renamed_settings(d, config_file)
    try:
        built = {name: cls(**d.get(name, {})) for name, cls in sections.items()}
        cfg = Config(**dict(d, **built))
    except TypeError as e:
        raise SystemExit(
            f"{config_file}: not a config of this version ({e}); start a new --run-dir"
        ) from None
    check_settings(cfg, where=config_file)
    return cfg


def renamed_settings(recorded, config_file):
    """A recorded config.json's settings under this version's names (RENAMED, REMOVED)."""
    d = {RENAMED.get(key, key): value for key, value in recorded.items()}
    for key, fixed in REMOVED.items():
        if key in d and d.pop(key) != fixed:
            raise SystemExit(
                f"{config_file}: {key} {recorded[key]!r}: no longer a setting (fixed at {fixed}); "
                "start a new --run-dir"
            )
    return d


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
        name = (
            "a number" if kind is float else "an integer" if kind is int else "a " + kind.__name__
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
    declaration. A line names the flag (where=None: --ppo-batch-size, or --batch-size for the
    section `unprefixed`, the one of a stage script) or the field of the file `where`
    (ppo.batch_size)."""
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
    """'--ppo-batch-size 8' (a flag; '--batch-size 8' for the section `unprefixed`, a stage
    script's own) or, for a config file `where`, 'ppo.batch_size 8' (the value as JSON)."""
    prefix = "" if section in (None, unprefixed) else section + ("." if where else "-")
    label = f"{prefix}{name}" if where else f"--{prefix}{name}".replace("_", "-")
    return f"{label} {value if where is None else json.dumps(value)}"


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
# The rows the stages pass on: one sampled answer, and the judge's verdict on it


@dataclass
class Sample:
    """One answer to a training instruction (sample/samples.jsonl)."""

    id: int
    record: int  # index of the instruction in the training split
    # "policy" (sampled from SFT) or a contrast answer: "reference", "mismatched", "no_code"
    source: str
    query: list  # prompt token ids
    response: list  # answer token ids (ending in <|endoftext|> unless cut at max_answer_tokens)
    answer: str  # the answer as text


@dataclass
class Feedback:
    """The judge's verdict on one Sample (feedback/feedback.jsonl)."""

    id: int
    record: int
    source: str
    judge: str  # which judge answered (rules judge, or the LLM's name)
    answers: dict  # question -> P(yes) in [0, 1], or None where the judge gave no answer
    score: float  # judge.combine(answers); None when the judge gave up on this answer
    error: str = None


def write_rows(path, rows):
    write_jsonl(path, [asdict(r) for r in rows])


def read_rows(path, cls):
    """The rows of a JSONL file as `cls` records; an error names the file, the line and the
    fields."""
    names = {f.name for f in fields(cls)}
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            rows.append(cls(**d))
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{n}: not JSON ({e})") from None
        except TypeError:
            required = {f.name for f in fields(cls) if f.default is MISSING}
            raise SystemExit(
                f"{path}:{n}: not a {cls.__name__} row (missing {sorted(required - set(d))}, "
                f"unknown {sorted(set(d) - names)}); redo the stage that wrote it"
            ) from None
    return rows


# -----------------------------------------------------------------------------
# Files of a run; each stage ends with done.json, the sha256 of its outputs, checked whenever a
# later stage relies on them (a truncated or altered file is an error)

STAGE_ORDER = ("sft", "sample", "feedback", "reward", "ppo", "compare", "evaluate")
RUN_FILES = dict(
    sft_model="sft/model",
    samples="sample/samples.jsonl",
    feedback="feedback/feedback.jsonl",
    feedback_partial="feedback/feedback.partial.jsonl",
    judge_cache="judge_cache.jsonl",
    reward_model="reward/reward_model.pt",
    ppo_model="ppo/model",
    drlaif="compare/drlaif",
    rloo="compare/rloo",
    grpo="compare/grpo",
    dpo="compare/dpo",
    best_of_n="compare/best_of_n_{pick}.jsonl",
    results="evaluate/results.md",
)
RESUMABLE_STATE = (
    "done.json",
    "ckpt.pt",
    ".partial.jsonl",
    ".tmp",
)  # not outputs: excluded from the hashes


def output_hashes(stage_dir):
    out = {}
    for f in sorted(Path(stage_dir).rglob("*")):
        if f.is_file() and not f.name.endswith(RESUMABLE_STATE):
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            out[str(f.relative_to(stage_dir))] = h.hexdigest()
    return out


def mark_done(stage_dir, summary):
    summary = dict(summary, outputs=output_hashes(stage_dir))
    atomic_write(
        Path(stage_dir) / "done.json", lambda p: Path(p).write_text(json.dumps(summary, indent=1))
    )


def verify_done(stage_dir):
    """Raise, naming the file, if an output of a finished stage is missing or not what it wrote."""
    recorded = json.loads((Path(stage_dir) / "done.json").read_text()).get("outputs", {})
    now = output_hashes(stage_dir)
    for name, digest in recorded.items():
        if now.get(name) != digest:
            state = (
                "is missing"
                if name not in now
                else "has changed since the stage finished (truncated or altered?)"
            )
            raise SystemExit(
                f"{Path(stage_dir) / name} {state}. Redo that stage: --from {Path(stage_dir).name}"
            )


def require_done(run, stages):
    """Every one of `stages` finished and intact (verify_done), or one line naming the command that
    runs them."""
    for name in stages:
        if not (run / name / "done.json").exists():
            raise SystemExit(
                f"{run / name} is not done: python rlaif.py --run-dir {run} --until {stages[-1]}"
            )
        verify_done(run / name)


def set_aside(run, stages):
    """Before stages are redone: a finished stage moves to run/.previous/<stage>, where it stays
    until its redo is complete (run_stage then deletes it); an unfinished one is deleted, so a
    failed redo never replaces the last complete result."""
    for name in stages:
        current, previous = Path(run) / name, Path(run) / ".previous" / name
        if (current / "done.json").exists():
            previous.parent.mkdir(exist_ok=True)
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(current, previous)
        elif current.exists():
            shutil.rmtree(current)


# -----------------------------------------------------------------------------
# JSONL, metrics and resumable training state


def write_jsonl(path, rows):
    atomic_write(path, lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in rows)))


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class TensorBoard:
    """[--tensorboard] The run's event-file writer (run_dir/tb), or None; rows already sent per
    metrics file."""

    writer, sent = None, {}


def open_tensorboard(log_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SystemExit(
            "--tensorboard needs the tensorboard package: pip install tensorboard"
        ) from None
    TensorBoard.writer, TensorBoard.sent = SummaryWriter(str(log_dir)), {}


def metrics_tag(path):
    """'ppo', 'reward', 'compare/drlaif': where a stage's metrics.jsonl lives, as its TensorBoard
    prefix."""
    parent = Path(path).parent
    return f"{parent.parent.name}/{parent.name}" if parent.parent.name == "compare" else parent.name


def write_metrics(path, rows):
    """Rewrite a stage's metrics.jsonl from its checkpointed rows (atomic: after a resume no row
    appears twice); with --tensorboard, also send the rows not sent yet, as '<stage>/<name>'
    scalars."""
    write_jsonl(path, rows)
    if TensorBoard.writer is None:
        return
    tag, start = metrics_tag(path), TensorBoard.sent.get(str(path), 0)
    for i, row in enumerate(rows[start:], start):
        step = row.get("iteration", row.get("step", i))
        for key, value in row.items():
            if (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and key not in ("step", "iteration")
            ):
                TensorBoard.writer.add_scalar(f"{tag}/{key}", value, step)
    TensorBoard.sent[str(path)] = len(rows)
    TensorBoard.writer.flush()


def tensorboard_text(tag, text, step):
    if TensorBoard.writer is not None:
        TensorBoard.writer.add_text(tag, text, step)
        TensorBoard.writer.flush()


def resume(ckpt_file, device, optimizer, stage, log, counter="step", **modules):
    """A training stage's resumable state: (step, history, ckpt) from ckpt_file, each module's
    state (saved under its keyword's name) and the optimizer's (if given) loaded, and "[stage]
    resumed from ... at step N" logged; (0, [], {}) when there is no checkpoint yet. counter: the
    checkpoint's key for the step (PPO counts iterations)."""
    if not Path(ckpt_file).exists():
        return 0, [], {}
    ckpt = load_checkpoint(ckpt_file, device)
    for key, module in modules.items():
        module.load_state_dict(ckpt[key])
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    step, history = ckpt[counter], ckpt.get("history", [])
    log(f"[{stage}] resumed from {ckpt_file} at {counter} {step}")
    return step, history, ckpt


# -----------------------------------------------------------------------------
# Running a stage: from rlaif.py, or alone from its own script


def add_flags(parser, cls, prefix, default_text):
    """One flag per field of a config dataclass declared as `name: Annotated[type, help, (choices),
    "range"]`: --prefix-name, yes/no flags as --name / --no-name, default None (unset).
    default_text(field) says what an unset flag means, shown in --help with the range
    (check_settings enforces it)."""
    group = parser.add_argument_group(f"{prefix.rstrip('-') or 'pipeline'} settings")
    defaults = {f.name: f for f in fields(cls)}
    for name, kind, help_text, choices, bounds in declared_settings(cls):
        flag, dest = f"--{prefix}{name.replace('_', '-')}", prefix.replace("-", "_") + name
        help_text += f" (default: {default_text(defaults[name])}{'; ' + bounds if bounds else ''})"
        if kind is bool:
            group.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, help=help_text
            )
        else:
            group.add_argument(flag, dest=dest, type=kind, help=help_text, choices=choices)


EVERY_RANK = (
    "sft",
    "reward",
    "ppo",
    "compare",
)  # under torchrun, the training stages run on every rank


def run_stage(cfg, run, stage, stage_fn, splits):
    """Run one stage: its directory, stage_fn(cfg, run, splits) -> summary, then done.json (summary,
    seconds, output hashes). The stage's set-aside previous result is deleted only now that the new
    one is complete. Under torchrun, a stage that does not train runs on rank 0 while the others
    wait."""
    t0 = time.time()
    with os_errors_as_messages(f"[{stage}]"):  # a full disk, a permission: one line, exit 1
        (run / stage).mkdir(parents=True, exist_ok=True)
        summary = stage_fn(cfg, run, splits) if is_main() or stage in EVERY_RANK else {}
    barrier()
    if is_main():
        with os_errors_as_messages(f"[{stage}]"):
            mark_done(run / stage, dict(summary, seconds=round(time.time() - t0, 1)))
        shutil.rmtree(run / ".previous" / stage, ignore_errors=True)
        if (run / ".previous").exists() and not any((run / ".previous").iterdir()):
            (run / ".previous").rmdir()
        log(f"[{stage}] done in {time.time() - t0:.0f}s -> {run / stage}")
    barrier()


def run_part(out_dir, train, announce=None):
    """One part of a stage that trains several models (compare's d-RLAIF, RLOO, GRPO, DPO): log
    `announce` and train(out_dir) unless the part's own done.json says it finished, then that
    done.json, written last. Whether a file of the part exists says nothing: only the marker does.
    Returns whether it ran."""
    if (Path(out_dir) / "done.json").exists():
        return False
    if announce:
        log(announce)
    summary = train(out_dir)
    if is_main():
        mark_done(out_dir, summary if isinstance(summary, dict) else {})
    barrier()
    return True


def stage_settings(description, argv=None, section=None, section_cls=None, force_help=None, **more):
    """The settings of a stage script (python ppo.py, dpo.py): --run-dir (default runs/tiny),
    --force, and one flag per field of its section of Config (section="ppo",
    section_cls=PPOConfig). Returns (cfg, run, force, overrides): the run's recorded Config (its
    sections built with section_cls and the classes in `more`) with the flags applied, checked
    before anything is set aside or recorded."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--run-dir",
        default="runs/tiny",
        help="a run directory of rlaif.py whose earlier stages are "
        "done (default: runs/tiny, the default run of rlaif.py)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help=force_help or "redo a finished stage (later stages are set aside)",
    )
    if section_cls is not None:
        add_flags(p, section_cls, "", lambda f: "the run's")
    args = vars(p.parse_args(argv))
    run, force = Path(args.pop("run_dir")), args.pop("force")
    overrides = {f"{section}_{k}": v for k, v in args.items() if v is not None}
    cfg = load_config(run, **({section: section_cls} if section else {}), **more)
    cfg = apply_overrides(cfg, overrides)
    check_settings(cfg, unprefixed=section)
    keep_freed_memory()
    setup_distributed(cfg.device, cfg.dist_timeout)
    if cfg.tensorboard and is_main():
        open_tensorboard(run / "tb")
    return cfg, run, force, overrides


def stage_command_line(stage, description, argv=None, section=None, section_cls=None):
    """The command line of a stage script (stage_settings). Returns (cfg, run): the run's recorded
    Config with the flags applied and recorded; earlier stages verified, the stage resumable if
    interrupted, a finished one kept unless --force, and later stages set aside so that no result
    of the old stage survives as if current."""
    cfg, run, force, overrides = stage_settings(description, argv, section, section_cls)
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
    return cfg, run
