"""The comparisons of rlaif.py --compare: DPO's loss, best-of-n's pick, d-RLAIF's score function,
and the reward model's auxiliary per-question loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from data.gorilla import prepare
from dpo import dpo_loss
from judge import QUESTIONS, Feedback, RulesJudge, combine, judge_score_fn
from model import GPT, GPTConfig, ScalarModel, pad_pairs
from reward import best_of_n, comparisons_loss
from runs import Sample


def test_dpo_loss_on_a_hand_computed_example():
    # pair 1: policy - ref = (-1 - -2) - (-3 - -2.5) = 1.5; pair 2: (-4 - -4) - (-1 - -2) = -1
    # beta 0.5: -log sigmoid(0.75) = 0.38687, -log sigmoid(-0.5) = 0.97408; mean 0.68048
    loss, margin = dpo_loss(
        torch.tensor([-1.0, -4.0]),
        torch.tensor([-3.0, -1.0]),
        torch.tensor([-2.0, -4.0]),
        torch.tensor([-2.5, -2.0]),
        beta=0.5,
    )
    want = (math.log1p(math.exp(-0.75)) + math.log1p(math.exp(0.5))) / 2
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert loss.item() == pytest.approx(0.68048, abs=1e-5)
    assert margin.item() == pytest.approx(0.5 * (1.5 - 1.0) / 2)


def test_best_of_n_picks_the_highest_score_of_each_group():
    scores = [0.1, 0.9, 0.3, -1.0, -2.0, 5.0, 2.0, 2.0, 1.0]
    assert best_of_n(scores, 3) == [1, 5, 6]  # ties: the first
    assert best_of_n(scores, 1) == list(range(9))


def test_rejection_sampling_picks_each_prompts_best_answer_after_the_end_of_text_penalty():
    from ppo import PPOConfig
    from rlaif import rejection_sampling_picks

    eot = 0

    def answer(i, record, ends):
        return Sample(i, record, "policy", [5], [7, 8] + ([eot] if ends else []), "")

    answers = [answer(0, 3, True), answer(1, 3, False), answer(2, 9, True), answer(3, 9, True)]
    scores = [0.2, 0.9, -0.5, 0.1]  # answer 1 scores best raw but is cut off before end-of-text
    picks = rejection_sampling_picks(answers, scores, eot, 2, PPOConfig(missing_eos_penalty=-1.0))
    assert [s.id for s in picks] == [0, 3]
    no_penalty = rejection_sampling_picks(
        answers, scores, eot, 2, PPOConfig(missing_eos_penalty=0.0)
    )
    assert [s.id for s in no_penalty] == [1, 3]
    with pytest.raises(ValueError, match="one prompt"):
        rejection_sampling_picks(answers, scores, eot, 4, PPOConfig())


def test_judge_score_fn_scores_each_rollout_against_its_own_instruction():
    """d-RLAIF's reward: the judge's score of the decoded rollout for the record its prompt came
    from, normalised by the SFT samples' judge scores."""
    records = prepare.load_records(prepare.EVAL_FILE, skip_bad=True, log=lambda *a: None)[:3]
    tok = prepare.tokenizer(compact=True)
    answers = [
        " <<<domain>>>: "
        + r.sections["domain"]
        + "\n<<<api_call>>>: "
        + r.sections["api_call"]
        + "\n<<<api_provider>>>: x\n<<<code>>>: "
        + r.sections["code"]
        for r in records
    ]
    answers[1] = answers[2]  # record 1 gets record 2's (wrong) answer
    feedback = [Feedback(i, i, "policy", "test", {}, s) for i, s in enumerate((0.2, 0.4, 0.6, 0.8))]
    # the SFT samples' judge scores 0.2, 0.4, 0.6, 0.8: mean 0.5, variance 0.05 (sum of squares over
    # n, as judge_score_fn divides)
    mean = 0.5
    std = math.sqrt(0.05)
    pairs = [
        (prepare.prompt_ids(tok, r.instruction), tok.encode(a) + [tok.eot])
        for r, a in zip(records, answers, strict=True)
    ]
    score = judge_score_fn(RulesJudge(), records, tok, feedback)(*pad_pairs(pairs, tok.eot))
    judge = RulesJudge()
    want = [
        (combine(judge.answers(r, a + "<|endoftext|>")) - mean) / std
        for r, a in zip(records, answers, strict=True)
    ]
    assert score.tolist() == pytest.approx(want, abs=1e-5)
    assert score[0] > score[1]


def test_auxiliary_loss_adds_per_question_cross_entropy():
    torch.manual_seed(0)
    rm = ScalarModel(
        GPT(GPTConfig(block_size=64, vocab_size=64, n_layer=2, n_head=2, n_embd=32)), len(QUESTIONS)
    )
    samples = {i: Sample(i, i, "policy", [1, 2], [5 + i, 6, 63], "") for i in range(3)}
    targets = {0: [1.0] * 6, 1: [0.0] * 6, 2: [1, 0, 1, 0, 1, 0]}

    class Tok:
        eot = 63

    pairs = [(0, 1), (2, 1)]
    plain = comparisons_loss(rm, samples, pairs, Tok, "cpu")
    with_aux = comparisons_loss(rm, samples, pairs, Tok, "cpu", targets, aux_weight=0.5)
    _, aux = rm.score_and_aux(
        *pad_pairs([(samples[i].query, samples[i].response) for i in range(3)], 63)
    )
    bce = F.binary_cross_entropy_with_logits(
        aux, torch.tensor([targets[i] for i in range(3)], dtype=torch.float32)
    )
    assert with_aux.item() == pytest.approx(plain.item() + 0.5 * bce.item(), abs=1e-6)


def test_dpo_sequence_logprob_is_the_sum_of_the_answer_tokens():
    """log pi(y|x) = sum over the answer's tokens (Rafailov et al. 2023, eq. 7), not their mean: a
    model whose next-token distribution is softmax([0, 1, 2]) everywhere gives answers [2, 0, 1]
    and [2] (padded) log p(2) + log p(0) + log p(1) and log p(2)."""
    from dpo import sequence_logprobs
    from tests.test_ppo import ConstantLM

    class Tok:
        eot = 0

    log_z = math.log(1 + math.e + math.e**2)
    logp = [0.0 - log_z, 1.0 - log_z, 2.0 - log_z]
    samples = {
        0: Sample(0, 0, "policy", [1], [2, 0, 1], ""),
        1: Sample(1, 0, "policy", [1, 2], [2], ""),
    }
    got = sequence_logprobs(ConstantLM([0.0, 1.0, 2.0]), samples, [0, 1], Tok, "cpu")
    assert got.tolist() == pytest.approx([logp[2] + logp[0] + logp[1], logp[2]], rel=1e-6)


def test_a_dpo_checkpoint_made_with_another_beta_is_refused_before_it_is_loaded(
    tmp_path, monkeypatch
):
    """DPO resumes from its checkpoint (no step run twice), but not under another beta: the
    implicit reward it trained on would change mid-run."""
    import dataclasses

    import dpo
    from config import Config
    from dpo import DPOConfig, train_dpo

    def tiny():
        torch.manual_seed(0)
        return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))

    class Tok:
        eot = 63

    samples = {k: Sample(k, k // 2, "policy", [1, 2], [10 + k, 63], "") for k in range(8)}
    pairs = [(2 * q, 2 * q + 1) for q in range(4)]
    cfg, run_cfg = DPOConfig(steps=20, batch_size=2), Config(device="cpu")
    train_dpo(tiny(), tiny(), samples, pairs, Tok, cfg, run_cfg, tmp_path)
    with pytest.raises(ValueError, match=r"beta: 0.1 in the checkpoint, 0.5 now") as refused:
        other = dataclasses.replace(cfg, beta=0.5)
        train_dpo(tiny(), tiny(), samples, pairs, Tok, other, run_cfg, tmp_path)
    # the ways out it names exist: DPO is redone within the compare stage, or its checkpoint goes
    assert "rlaif.py --from compare" in str(refused.value)
    assert "--from dpo" not in str(refused.value)
    assert f"delete {tmp_path / 'ckpt.pt'}" in str(refused.value)
    said = []
    monkeypatch.setattr(dpo, "log", said.append)
    train_dpo(tiny(), tiny(), samples, pairs, Tok, cfg, run_cfg, tmp_path)
    assert said[0] == f"[dpo] resumed from {tmp_path / 'ckpt.pt'} at step 20"
