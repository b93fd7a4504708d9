"""
The reward model (Dutta et al. 2024, section 3.2): a GPT-2 backbone + scalar head
(model.ScalarModel) learns the AI feedback's scores (judge.py) with a pairwise Bradley-Terry loss,
then is normalised to mean 0 / std 1 on SFT samples (lm-human-preferences). [not in the paper] It
reads each answer followed by a tool's report on it (tool_report: the API database's entry for its
api_call, the model ids the database does not know, whether the code parses).

    python reward.py --run-dir runs/tiny --force    # redo the reward stage of a run (see rlaif.py)
"""

import ast
import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F

from config import driver_flag, stage_command_line
from data.gorilla import prepare
from data.gorilla.apis import APIDatabase, answer_api_call, undefined_names
from distributed import DIST, average_gradients, barrier, global_mean, is_main, shard
from judge import QUESTIONS, Feedback
from model import GPT, FlopMeter, ScalarModel, pad_pairs, right_pad
from runs import (
    Sample,
    load_checkpoint,
    log,
    read_rows,
    resume,
    run_alone,
    run_file,
    run_stage,
    save_checkpoint,
    write_metrics,
)
from training import (
    autocast,
    check_loss,
    length_grouped_batches,
    make_optimizer,
    progress,
    require_items,
    stream_seed,
)

# -----------------------------------------------------------------------------
# Settings of the reward model (rlaif.py --set rm.NAME=VALUE, python reward.py --*)


@dataclass
class RMConfig:
    epochs: Annotated[int, "passes over the training pairs", ">= 1"] = 1
    lr: Annotated[float, "AdamW learning rate (constant)", "> 0"] = 3e-4
    batch_size: Annotated[int, "judge-ordered pairs per step, from as many prompts", ">= 1"] = 16
    max_contrast_pairs: Annotated[
        int,
        "pairs with a contrast answer kept per prompt; every judge-ordered pair of "
        "the policy's own answers is kept (ties are dropped)",
        ">= 0",
    ] = 4
    heldout_fraction: Annotated[
        float,
        "prompts held out to measure pairwise accuracy on the policy's own answers",
        ">= 0 and < 1",
    ] = 0.1
    val_fraction: Annotated[
        float,
        "training prompts set aside to choose the step that is kept (the best "
        "validation accuracy among the trained steps)",
        ">= 0 and < 1",
    ] = 0.1
    eval_every: Annotated[
        int, "steps between measurements of the held-out and validation pairs", ">= 1"
    ] = 50
    train_blocks: Annotated[
        int,
        "top transformer blocks trained with the head (-1: the whole network; 0: the "
        "head alone, a probe on the SFT features)",
        ">= -1",
    ] = -1
    margin: Annotated[
        float,
        "Llama 2's margin: the pair's judge-score difference x this, subtracted inside "
        "the Bradley-Terry loss (0 = none)",
        ">= 0",
    ] = 0.0
    weight_decay: Annotated[float, "AdamW weight decay (matrices only)", ">= 0"] = 0.0
    tools: Annotated[
        bool,
        "[not in the paper] the reward model reads a tool report after each answer (the "
        "API database's entry for its api_call, unknown model ids, whether the code "
        "parses; reward.tool_report)",
    ] = True
    aux_weight: Annotated[
        float,
        "[not in the paper] weight of the auxiliary loss: one logit per judge question, "
        "binary cross-entropy against the judge's P(yes) (0 = scalar head only)",
        ">= 0",
    ] = 1.0


# what a resumed reward model's training may change: how often it is measured
RESUMABLE_CHANGES = ("eval_every",)


# -----------------------------------------------------------------------------
# The reward model

# [not in the paper] The answers a contrast answer (rlaif.contrast_answers) is compared
# with. Another domain's reference is compared only with this prompt's reference: the two
# differ in relevance alone. Against the policy's own answers it wins on its (runnable,
# real) code, so those pairs taught that a foreign domain wins (docs/experiments.md, "Where
# the reward model's ranking fails").
CONTRAST_PARTNERS = {"mismatched": {"reference"}}


def comparable(a, b):
    """Whether two answers to one prompt may form a pair: a source CONTRAST_PARTNERS names is
    compared only with the sources it lists; the others with any answer."""
    return b.source in CONTRAST_PARTNERS.get(
        a.source, {b.source}
    ) and a.source in CONTRAST_PARTNERS.get(b.source, {a.source})


def make_pairs(feedback, max_contrast_pairs, rng):
    """(better id, worse id) pairs within each prompt, ordered by judge score; ties are dropped.
    Every pair of the policy's own answers is kept: they are what PPO asks the reward model to rank.
    Pairs with a contrast answer (rlaif.contrast_answers) are capped at max_contrast_pairs per
    prompt, so that they teach relevance and missing code without outnumbering the policy's
    comparisons, and are made only between answers that CONTRAST_PARTNERS lets be compared."""
    by_record = {}
    for f in feedback:
        if f.score is not None:
            by_record.setdefault(f.record, []).append(f)
    pairs = []
    for group in by_record.values():
        ordered = [(a, b) for a in group for b in group if a.score > b.score and comparable(a, b)]
        own = [(a.id, b.id) for a, b in ordered if a.source == b.source == "policy"]
        contrast = [(a.id, b.id) for a, b in ordered if not a.source == b.source == "policy"]
        rng.shuffle(contrast)
        pairs.extend(own + contrast[:max_contrast_pairs])
    return pairs


# -----------------------------------------------------------------------------
# What the reward model gets right, pair by pair (the diagnostics of docs/experiments.md)

MARGIN_BINS = (0.1, 0.3)  # judge-score differences: small (< 0.1), medium, large (>= 0.3)


def pair_kind(a, b):
    """'policy-policy', 'policy-reference', 'mismatched-reference', ...: the
    sources of a pair's answers."""
    return "-".join(sorted((a.source, b.source)))


def separating_question(a, b):
    """The judge question that contributes most to the two answers' score difference."""

    def gap(q):
        return q[2] * abs((a.answers.get(q[0]) or 0.0) - (b.answers.get(q[0]) or 0.0))

    return max(QUESTIONS, key=gap)[0]


def margin_bin(a, b):
    d = abs(a.score - b.score)
    return "<0.1" if d < MARGIN_BINS[0] else "0.1-0.3" if d < MARGIN_BINS[1] else ">=0.3"


def pair_accuracy(scores, feedback, pairs, prefix):
    """{prefix/accuracy, prefix/pairs, prefix/kind/K, prefix/question/Q, prefix/margin/M}: the share
    of (better, worse) `pairs` that `scores` ({id: score}) order as the judge does; pairs the scores
    tie count as wrong. feedback: {id: Feedback}."""
    groups = {}
    for a, b in pairs:
        fa, fb = feedback[a], feedback[b]
        right = float(scores[a] > scores[b])
        for key in (
            "accuracy",
            f"kind/{pair_kind(fa, fb)}",
            f"question/{separating_question(fa, fb)}",
            f"margin/{margin_bin(fa, fb)}",
        ):
            groups.setdefault(key, []).append(right)
    out = {f"{prefix}/{k}": sum(v) / len(v) for k, v in sorted(groups.items())}
    out[f"{prefix}/pairs"] = len(pairs)
    return out


# -----------------------------------------------------------------------------
# What the reward model reads: the answer, then a tool's report on it [not in the paper]

REPORT_TOKENS = (
    64  # the report is cut to this many tokens; rlaif.py leaves room for it in the context
)


def tool_report(answer, db):
    """[not in the paper] A tool-augmented reward model (Li et al. 2024, "Tool-Augmented Reward
    Modeling"): after the answer, the reward model reads what a lookup in the API database and
    a Python parser say about it: whether the code parses, how many names it reads that nothing
    binds (undefined_names), how many model ids of the api_call
    and of the code no entry names, and the entry the api_call makes (APIDatabase.match): its
    domain and call. A documented call shape with an invented model id is no entry (as in
    RulesJudge): with Gorilla's lenient match alone, PPO learned pipeline('<task>',
    model='<invented>') (docs/experiments.md). A small network cannot remember which of 936
    APIs and thousands of model ids exist, so its ranking of the policy's answers stayed near
    chance; it can read a line that says so."""
    sections = prepare.parse_answer(answer)
    api_call = answer_api_call(answer)
    unknown_call = set(db.unknown_model_ids(api_call))
    unknown_code = set(db.unknown_model_ids(sections["code"]))
    i = db.match(api_call) if not unknown_call else None
    entry = f"{db.apis[i]['domain']} | {db.apis[i]['api_call']}" if i is not None else "none"
    parses = "yes" if python_parses(sections["code"]) else "no"
    undefined = len(undefined_names(sections["code"]))
    return (
        f"\n### Tool: code parses {parses}, undefined names {undefined}, "
        f"unknown model ids: api_call {len(unknown_call)}, "
        f"code {len(unknown_code)}, API entry: {entry}\n"
    )


def python_parses(code):
    try:
        return bool(code.strip()) and ast.parse(code) is not None
    except (SyntaxError, ValueError):
        return False


def with_report(tok, response, db):
    """An answer's token ids followed by its tool report's (cut to REPORT_TOKENS)."""
    text = tok.decode([t for t in response if t != tok.eot])
    return list(response) + tok.encode(tool_report(text, db))[:REPORT_TOKENS]


def reading_reports(samples, tok, db):
    """{id: Sample} whose responses carry their tool reports: what the reward
    model trains and is measured on."""
    return {
        i: dataclasses.replace(s, response=with_report(tok, s.response, db))
        for i, s in samples.items()
    }


def read_reward_model(path, device="cpu"):
    """(ScalarModel, its checkpoint dict) from a file the reward stage wrote (rm.pt, ckpt.pt,
    best.pt): errors name the file."""
    ckpt = load_checkpoint(path, device)
    # a setting that was removed: its score cannot be read the same way
    if ckpt.get("lm_weight"):
        raise ValueError(
            f"{path}: made with --rm-lm-weight, which this version removed "
            "(docs/experiments.md); redo the reward stage (python reward.py --force)"
        )
    return ScalarModel.from_checkpoint(ckpt, device), ckpt


def load_reward_model(path, tok, device):
    """(reward model, its score_fn for PPO and best-of-n): score_fn(query,
    query_mask, response, response_mask) appends each response's tool report first
    when the model was trained reading them."""
    rm, ckpt = read_reward_model(path, device)
    if not ckpt.get("tools"):
        return rm, rm.score
    db = APIDatabase()

    def score(query, query_mask, response, response_mask):
        rows = [
            [t for t, m in zip(r, r_mask, strict=True) if m]
            for r, r_mask in zip(response.tolist(), response_mask.tolist(), strict=True)
        ]
        response, response_mask = right_pad(
            [with_report(tok, r, db) for r in rows], tok.eot, response.device
        )
        return rm.score(query, query_mask, response, response_mask)

    return rm, score


# -----------------------------------------------------------------------------
# The reward model's training: judge-ordered pairs, Bradley-Terry


def pair_batches(samples, pairs, batch_size, epochs, seed):
    """Every step's batch of (id, id) `pairs` of `samples` for `epochs` passes, fixed up
    front so that a resumed run trains on the same batches; length-grouped (the reward
    model's and DPO's batches)."""
    keys = [
        (len(samples[a].query) // 16, max(len(samples[a].response), len(samples[b].response)))
        for a, b in pairs
    ]
    # Under torchrun the last, short batch of an epoch is dropped, so that
    # every rank has pairs in every step.
    return [
        batch
        for epoch in range(epochs)
        for batch in length_grouped_batches(
            keys,
            batch_size,
            shuffle_seed=stream_seed(seed, 7919, epoch),
            batch_seed=stream_seed(seed, 31, epoch),
            drop_last=DIST.world > 1,
        )
    ]


def rm_batch(samples, ids, tok, device):
    return pad_pairs([(samples[i].query, samples[i].response) for i in ids], tok.eot, device)


def comparisons_loss(
    rm, samples, pairs, tok, device, targets=None, aux_weight=0.0, stats=None, margins=None
):
    """Mean Bradley-Terry loss -log sigmoid(r_better - r_worse) over `pairs`, with one forward pass
    per distinct answer of the batch (InstructGPT, Ouyang et al. 2022, section 3.5: K answers give
    up to K(K-1)/2 comparisons for K passes). With aux_weight > 0, plus aux_weight x the binary
    cross-entropy of the per-question logits against the judge's answers, targets: {id: [P(yes) per
    QUESTIONS]}. [not in the paper] The scalar comparisons tell the model which answer won, not why;
    the six answers say why (a dense target for every answer). margins: {pair: margin} or None.
    stats: a dict to receive the batch's pairwise accuracy and, with targets, each question's
    accuracy (logit > 0 against P(yes) > 0.5), for the metrics."""
    ids = sorted({i for pair in pairs for i in pair})
    at = {i: k for k, i in enumerate(ids)}
    r, aux = rm.score_and_aux(*rm_batch(samples, ids, tok, device))
    better = torch.tensor([at[a] for a, _ in pairs], device=r.device)
    worse = torch.tensor([at[b] for _, b in pairs], device=r.device)
    # Llama 2's margin (Touvron et al. 2023, eq. 2): a pair the judge separates widely must be
    # separated by at least that margin; a close call asks for less.
    margin = torch.tensor([margins[p] for p in pairs], device=r.device) if margins else 0.0
    # every rank's pairs under torchrun
    loss = global_mean(-F.logsigmoid(r[better] - r[worse] - margin))
    if stats is not None:
        stats["accuracy"] = global_mean((r[better] > r[worse]).float()).item()
    if aux is not None and targets:
        y = torch.tensor([targets[i] for i in ids], device=aux.device, dtype=torch.float32)
        if aux_weight:
            loss = loss + aux_weight * global_mean(
                F.binary_cross_entropy_with_logits(aux.float(), y, reduction="none")
            )
        if stats is not None:
            right = ((aux.float() > 0) == (y > 0.5)).float().mean(0).tolist()
            stats.update(
                {f"accuracy_{k}": a for (k, _, _), a in zip(QUESTIONS, right, strict=True)}
            )
    return loss


def question_targets(feedback):
    """{sample id: [P(yes) for each of QUESTIONS]} of every fully answered sample."""
    return {f.id: [f.answers[k] for k, _, _ in QUESTIONS] for f in feedback if f.score is not None}


@torch.no_grad()
def rm_scores(rm, samples, ids, tok, device, batch_size=32):
    rm.eval()
    out = []
    for i in range(0, len(ids), batch_size):
        with autocast(device):
            out.append(rm.score(*rm_batch(samples, ids[i : i + batch_size], tok, device)).float())
    return torch.cat(out) if out else torch.zeros(0)


def split_prompts(feedback, cfg, seed):
    """(held-out, validation) sets of training-split record ids; the rest trains. Held-out prompts
    only measure (the number the docs report); validation prompts choose the step that is kept."""
    rng = random.Random(seed)
    records = sorted({f.record for f in feedback})
    rng.shuffle(records)
    n_held = max(1, int(len(records) * cfg.heldout_fraction))
    n_val = int(len(records) * cfg.val_fraction)
    return set(records[:n_held]), set(records[n_held : n_held + n_val]), rng


def policy_pairs(feedback, records, rng):
    """Judge-ordered pairs of the policy's own answers to `records`: what
    PPO asks the reward model."""
    fb = [
        f for f in feedback if f.record in records and f.score is not None and f.source == "policy"
    ]
    return fb, make_pairs(fb, 0, rng)


def measure(rm, samples, feedback, sets, tok, device):
    """Pairwise accuracy of rm on each named (Feedback rows, pairs) set, by
    kind, question and margin."""
    out = {}
    by_id = {f.id: f for f in feedback}
    for name, (_rows, pairs) in sets.items():
        ids = sorted({i for pair in pairs for i in pair})
        scores = dict(zip(ids, rm_scores(rm, samples, ids, tok, device).tolist(), strict=True))
        out.update(pair_accuracy(scores, by_id, pairs, name))
    return out


def train_reward_model(
    rm, samples, feedback, tok, cfg, seed, grad_clip, device, ckpt_file, log=log
):
    """Train on judge-ordered pairs (Bradley-Terry); returns held-out metrics. samples: {id:
    runs.Sample}. Every eval_every steps (and at step 0) it measures the held-out and validation
    prompts' pairs; the trained step with the best validation accuracy is the one kept."""
    train_fb, train_pairs, sets = training_pairs(feedback, cfg, seed, log)
    targets = question_targets(train_fb) if rm.aux is not None else {}
    judge_scores = {f.id: f.score for f in train_fb}
    rm.freeze_below(cfg.train_blocks)
    # Every step's batch, fixed up front so a resumed run trains on the same batches. Pairs from
    # many prompts per batch, not one prompt's comparisons (InstructGPT's faster layout), which
    # generalised worse to new prompts (docs/experiments.md, "The reward model's batches");
    # length grouping keeps padding low.
    order = pair_batches(samples, train_pairs, cfg.batch_size, cfg.epochs, seed)
    steps = len(order)
    log(f"[reward] {steps} steps of {cfg.batch_size} pairs")
    optimizer = make_optimizer(rm, cfg.lr, cfg.weight_decay)
    best_file = Path(ckpt_file).with_name("best.pt")
    metrics_file = Path(ckpt_file).parent / "metrics.jsonl"
    settings = dataclasses.asdict(cfg)
    step, history, ckpt = resume(
        ckpt_file,
        device,
        optimizer,
        "reward",
        log,
        settings=settings,
        may_change=RESUMABLE_CHANGES,
        model=rm,
    )
    best = ckpt.get("best", (-1.0, 0))  # (validation accuracy, step) kept so far
    t0, start = time.time(), step
    meter = FlopMeter()
    while True:
        if step % cfg.eval_every == 0 or step == steps:
            history.append(dict(step=step, **measure(rm, samples, feedback, sets, tok, device)))
            validated = bool(sets["val"][1])
            best = keep_if_best(rm, history[-1], best, best_file, validated, log, steps == 0)
        if step == steps:
            break
        batch = [train_pairs[i] for i in order[step]]
        stats = train_step(
            rm, samples, batch, judge_scores, targets, optimizer, tok, cfg, grad_clip, device
        )
        step += 1
        look_at = f"{driver_flag('rm', 'lr')} and {driver_flag('rm', 'margin')}"
        check_loss(stats["loss"], "reward", f"step {step}", look_at)
        history.append(dict(step=step, lr=cfg.lr, **stats))
        if step % 20 == 0 or step == steps:
            eta = progress(step - start, steps - start, t0)
            speed = meter.line(rm.backbone)
            log(f"[reward] step {step}/{steps} loss {stats['loss']:.4f} {speed} {eta}")
            if is_main():
                state = dict(optimizer=optimizer.state_dict(), step=step, history=history)
                save_checkpoint(ckpt_file, **rm.checkpoint(**state, best=best, settings=settings))
                # from the checkpointed history: no row twice after a resume
                write_metrics(metrics_file, history)
    barrier()
    return kept_model(rm, history, best, best_file, metrics_file, steps, device, log)


def training_pairs(feedback, cfg, seed, log=log):
    """(training prompts' feedback, their judge-ordered pairs, the measured sets): held-out and
    validation prompts' policy pairs, and a fixed slice of the training pairs (to see
    overfitting)."""
    heldout, val, rng = split_prompts(feedback, cfg, seed)
    measured_only = heldout | val
    train_fb = [f for f in feedback if f.record not in measured_only]
    train_pairs = make_pairs(train_fb, cfg.max_contrast_pairs, rng)
    sets = dict(
        heldout=policy_pairs(feedback, heldout, rng),
        val=policy_pairs(feedback, val, rng),
        train=(train_fb, train_pairs[:512]),
    )
    require_items(
        train_pairs,
        "reward",
        "judge-ordered training pairs",
        f"{len(measured_only)} prompts held out or validating left none to train on: lower "
        f"{driver_flag('rm', 'heldout_fraction')} or {driver_flag('rm', 'val_fraction')}"
        if not train_fb
        else "every answer to a training prompt got the same score: train SFT longer "
        "(--sft-steps) or sample more answers per instruction (--answers-per-instruction)",
    )
    log(
        f"[reward] {len(train_pairs)} train pairs, {len(sets['heldout'][1])} held-out pairs "
        f"({len(heldout)} prompts), {len(sets['val'][1])} validation pairs ({len(val)} prompts)"
    )
    return train_fb, train_pairs, sets


def kept_model(rm, history, best, best_file, metrics_file, steps, device, log=log):
    """Load the kept step's weights into rm; its held-out metrics, also appended to the
    metrics."""
    # its own step: a crash may have left `best` older
    kept_ckpt = load_checkpoint(best_file, device)
    rm.load_state_dict(kept_ckpt["model"])
    best = (kept_ckpt.get("val_accuracy", best[0]), kept_ckpt["step"])
    kept = next(r for r in history if r["step"] == best[1] and "heldout/pairs" in r)
    log(f"[reward] kept step {best[1]} (validation accuracy {best[0]:.3f})")
    heldout_metrics = dict(
        kept_step=best[1],
        heldout_pairwise_accuracy=kept.get("heldout/accuracy", 0.0),
        heldout_pairs=kept["heldout/pairs"],
        val_pairwise_accuracy=best[0],
    )
    if is_main():
        write_metrics(metrics_file, history + [dict(step=steps, **heldout_metrics)])
    return heldout_metrics


def keep_if_best(rm, row, best, best_file, validated, log, untrained_ok=False):
    """Log a measured row; save the model to best_file if its validation accuracy beats best =
    (accuracy, step). Without validation pairs, the last step is kept. Every rank keeps the same
    tuple. Step 0's head is random: it is kept only when there is no training step (seed 3 kept it
    by noise, docs/experiments.md)."""
    log(
        f"[reward] step {row['step']}: pairwise accuracy held-out "
        f"{row.get('heldout/accuracy', 0):.3f}, "
        f"validation {row.get('val/accuracy', 0):.3f}, train {row.get('train/accuracy', 0):.3f}"
    )
    if row["step"] == 0 and not untrained_ok:
        return best
    if row.get("val/accuracy", 0.0) > best[0] or not validated:
        best = (row.get("val/accuracy", 0.0), row["step"])
        if is_main():
            save_checkpoint(best_file, **rm.checkpoint(step=row["step"], val_accuracy=best[0]))
    return best


def train_step(rm, samples, pairs, scores, targets, optimizer, tok, cfg, grad_clip, device):
    """One optimizer step on a batch of pairs (this rank's share under torchrun); returns its stats.
    scores: {id: judge score}, for the margin."""
    rm.train()
    stats = {}
    margins = (
        {(a, b): cfg.margin * (scores[a] - scores[b]) for a, b in pairs} if cfg.margin else None
    )
    with autocast(device):
        loss = comparisons_loss(
            rm, samples, shard(pairs), tok, device, targets, cfg.aux_weight, stats, margins
        )
    loss.backward()
    average_gradients([p for p in rm.parameters() if p.requires_grad])
    torch.nn.utils.clip_grad_norm_([p for p in rm.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return dict(loss=loss.item(), **stats)


def normalise(rm, samples, ids, tok, device):
    """Set gain/bias so rewards on SFT samples have mean 0 and std 1 (lm-human-preferences)."""
    rm.gain.fill_(1.0)
    rm.bias.fill_(0.0)
    r = rm_scores(rm, samples, ids, tok, device)
    rm.gain.fill_(1.0 / (r.std().item() + 1e-8))
    rm.bias.fill_(-r.mean().item() / (r.std().item() + 1e-8))


# -----------------------------------------------------------------------------
# Best-of-n [not in the paper] (rlaif.py --compare): the best-scored of n answers


def best_of_n(scores, n):
    """Index of the best-scored answer in each consecutive group of n (the first, on ties)."""
    return [max(range(i, i + n), key=lambda j: scores[j]) for i in range(0, len(scores), n)]


# -----------------------------------------------------------------------------
# The stage of a run (rlaif.py): 4. the reward model


def refuse_uniform_feedback(feedback, run):
    """SystemExit, saying what the judge said, when every answer got the same score: no answer is
    better than another, so the reward model would learn nothing (it stayed untrained, PPO followed
    its noise, and the run ended 0 with an RLAIF row, when a judge said "No" to everything)."""
    scores = [f.score for f in feedback]
    if len(scores) < 2 or max(scores) - min(scores) > 1e-9:
        return
    said = ", ".join(
        f"{k} {sum(f.answers[k] for f in feedback) / len(feedback):.2f}" for k, _, _ in QUESTIONS
    )
    raise SystemExit(
        f"[reward] refused: {feedback[0].judge} gave all {len(scores)} answers the same score "
        f"{scores[0]:.3f} (mean P(yes) per question: {said}), so no answer is better than another "
        "and the reward model would learn nothing. Check that the judge answers the questions, "
        + (
            f"then python rlaif.py --run-dir {run} --from feedback (with --judge-base-url / "
            "--judge-model of a working judge) judges again."
            if run
            else "then judge the answers again with a working judge."
        )
    )


def reward_stage(cfg, run, splits, out_dir=None, **files):
    """Stage 4: the reward model, initialised from the SFT model, trained on the feedback,
    normalised on the policy's samples. files: sft_model, samples and feedback in place of the
    run's (python reward.py --sft-model), with out_dir in place of run_dir/reward."""
    out_dir = Path(out_dir or run / "reward")
    feedback = read_rows(run_file(run, "feedback", files), Feedback)
    refuse_uniform_feedback(feedback, None if files else run)
    meter = FlopMeter()
    tok = prepare.tokenizer(cfg.compact)
    samples = {s.id: s for s in read_rows(run_file(run, "samples", files), Sample)}
    if cfg.rm.tools:
        samples = reading_reports(samples, tok, APIDatabase())
    torch.manual_seed(cfg.seed)
    rm = ScalarModel(GPT.from_pretrained(run_file(run, "sft_model", files)), len(QUESTIONS)).to(
        cfg.device
    )
    metrics = train_reward_model(
        rm,
        samples,
        feedback,
        tok,
        cfg.rm,
        cfg.seed,
        cfg.grad_clip,
        cfg.device,
        out_dir / "ckpt.pt",
        log=log,
    )
    normalise(rm, samples, [i for i, s in samples.items() if s.source == "policy"], tok, cfg.device)
    if is_main():
        save_checkpoint(out_dir / "reward_model.pt", **rm.checkpoint(tools=cfg.rm.tools))
    log(
        f"[reward] held-out pairwise accuracy {metrics['heldout_pairwise_accuracy']:.3f} "
        f"({metrics['heldout_pairs']} pairs) at the step kept, {metrics['kept_step']}"
    )
    return dict(metrics, **meter.summary(rm.backbone, remeasure=True))


def main(argv=None):
    """python reward.py: the reward model alone, on an existing run (default runs/tiny), or on an
    SFT model, sampled answers and their feedback given as files into --out."""
    cfg, run, given = stage_command_line(
        "reward",
        "Reward model: train it on AI feedback. On a run of rlaif.py (--run-dir: its sft, sample "
        "and feedback, into run_dir/reward, with the run's recorded settings, which the flags "
        "below override and are recorded; later results are set aside) or on files (--sft-model "
        "DIR --samples FILE --feedback FILE, into --out, no run directory).",
        argv,
        section="rm",
        section_cls=RMConfig,
        inputs=("sft_model", "samples", "feedback"),
    )
    splits = prepare.run_splits(cfg)
    if given is not None:
        run_alone(run, lambda: reward_stage(cfg, None, splits, out_dir=run, **given))
    else:
        run_stage(cfg, run, "reward", reward_stage, splits)


if __name__ == "__main__":
    main()
