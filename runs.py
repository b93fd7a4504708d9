"""
Run directories: the files every stage of rlaif.py reads and writes, and how one stage is run. A
run is one directory (--run-dir). Each stage writes run_dir/<stage>/ and, last, a done.json with its
summary and the sha256 of its outputs; a finished stage is skipped on the next run and its outputs
are checked whenever a later stage relies on them. Here, in order:
  - log; files and model directories written atomically, checkpoints.
  - Sample: the rows of sample/samples.jsonl, written once (the sample stage is rlaif.py's, above
    every stage that reads them; feedback/feedback.jsonl's rows are judge.Feedback).
  - RUN_FILES: every path inside a run; done markers, hashes and set-aside of stages to redo.
  - metrics.jsonl (and TensorBoard), resumable training state (resume).
  - run_stage(), which rlaif.py and the stage scripts use to run a stage, and run_part(), one part
    of a stage that trains several models.
A run's settings are config.py's, the torchrun code is distributed.py's, and what the stages
train with is training.py's.
"""

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import torch

from distributed import barrier, is_main

# -----------------------------------------------------------------------------
# Progress output, files written atomically, checkpoints


def log(msg):
    """Progress output, flushed at once so that a log file shows it while a stage runs."""
    print(msg, flush=True)


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


# -----------------------------------------------------------------------------
# The row the sample stage passes on: one sampled answer (the judge's verdict on it, Feedback,
# is judge.py's)


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
    rs="compare/rs",
    best_of_n="compare/best_of_n_{pick}.jsonl",
    results="evaluate/results.md",
)


def run_file(run, key, files):
    """The path of a run's file RUN_FILES[key], or files[key] where a stage script was given it
    (python ppo.py --sft-model DIR: config.INPUTS)."""
    return Path(files[key]) if files.get(key) else Path(run) / RUN_FILES[key]


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


def resume(
    ckpt_file,
    device,
    optimizer,
    stage,
    log,
    counter="step",
    settings=None,
    may_change=(),
    **modules,
):
    """A training stage's resumable state: (step, history, ckpt) from ckpt_file, each module's
    state (saved under its keyword's name) and the optimizer's (if given) loaded, and "[stage]
    resumed from ... at step N" logged; (0, [], {}) when there is no checkpoint yet. counter: the
    checkpoint's key for the step (PPO counts iterations). settings: the stage's settings (a dict,
    saved in its checkpoints under "settings"); a checkpoint made with others, except those named
    in may_change, is refused before anything is loaded, each setting named."""
    if not Path(ckpt_file).exists():
        return 0, [], {}
    ckpt = load_checkpoint(ckpt_file, device)
    saved = ckpt.get("settings", {})  # none in checkpoints made before they were recorded
    diff = [
        f"{k}: {saved[k]!r} in the checkpoint, {v!r} now"
        for k, v in (settings or {}).items()
        if k in saved and saved[k] != v and k not in may_change
    ]
    if diff:
        # DPO is a part of the compare stage, not a stage of its own: rlaif.py redoes it there
        redo = f"python {stage}.py --force, or rlaif.py --from {stage}"
        if stage not in STAGE_ORDER:
            redo = "rlaif.py --from compare"
        raise ValueError(
            f"{ckpt_file} was made with other {stage} settings:\n  " + "\n  ".join(diff) + "\n"
            f"Resume with the settings it was made with, or redo {stage} from the start "
            f"({redo}; or delete {ckpt_file})."
        )
    for key, module in modules.items():
        module.load_state_dict(ckpt[key])
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    step, history = ckpt[counter], ckpt.get("history", [])
    log(f"[{stage}] resumed from {ckpt_file} at {counter} {step}")
    return step, history, ckpt


# -----------------------------------------------------------------------------
# Running a stage: from rlaif.py, or alone from its own script

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


def start_over(out_dir):
    """Remove a finished stage's marker and resume point (--force): it trains again from the start,
    and its old model stays until the new one replaces it."""
    for name in ("done.json", "ckpt.pt"):
        (Path(out_dir) / name).unlink(missing_ok=True)


def run_alone(out, train):
    """A stage script given its inputs as files (python ppo.py --sft-model DIR --reward-model
    FILE): train() writes into `out`, then out/done.json as run_stage writes a stage's. No run
    directory: nothing verified, set aside or resumed from another stage."""
    t0 = time.time()
    with os_errors_as_messages(f"[{out}]"):
        summary = train()
    barrier()
    if is_main():
        with os_errors_as_messages(f"[{out}]"):
            mark_done(out, dict(summary, seconds=round(time.time() - t0, 1)))
        log(f"done in {time.time() - t0:.0f}s -> {out}")
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
