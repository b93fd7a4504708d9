"""Gorilla records, the prompt format, and the SFT loop (masking, resume)."""

import pytest
import torch

from data.gorilla import prepare


def test_every_eval_record_parses_or_is_reported_with_its_line():
    reported = []
    records = prepare.load_records(prepare.EVAL_FILE, skip_bad=True, log=reported.append)
    lines = [line for line in prepare.EVAL_FILE.read_text().splitlines() if line.strip()]
    skipped = [m for m in reported if m.startswith("[data]   ")]
    assert len(records) + len(skipped) == len(lines) == 911
    assert f"skipped {len(skipped)} malformed" in reported[0]
    for m in skipped:  # file:line: reason
        line = int(m.split("huggingface_eval.json:")[1].split(":")[0])
        assert 1 <= line <= 911 and ("lacks" in m or "no '" in m)
    assert len(records) > 850
    for r in records:
        assert r.instruction and all(r.sections[k] for k in prepare.REQUIRED)


def test_malformed_file_fails_with_file_line_and_reason(tmp_path):
    good = prepare.EVAL_FILE.read_text().splitlines()[0]
    bad = tmp_path / "bad.json"
    bad.write_text(
        good + "\n" + '{"code": "###Instruction: x ###Output: <<<domain>>>: d"}\n' + "{oops\n"
    )
    with pytest.raises(
        prepare.DataError, match=r"bad.json:2: answer lacks section\(s\) <<<api_call>>>"
    ):
        prepare.load_records(bad)
    bad.write_text(good + "\n{oops\n")
    with pytest.raises(prepare.DataError, match=r"bad.json:2: invalid JSON"):
        prepare.load_records(bad)
    msgs = []
    assert len(prepare.load_records(bad, skip_bad=True, log=msgs.append)) == 1
    assert "skipped 1 malformed" in msgs[0]


def test_split_is_deterministic_and_disjoint():
    records = prepare.load_records(prepare.EVAL_FILE, skip_bad=True, log=lambda *a: None)
    a, b = prepare.offline_splits(records), prepare.offline_splits(list(reversed(records)))
    assert {k: sorted(r.line for r in v) for k, v in a.items()} == {
        k: sorted(r.line for r in v) for k, v in b.items()
    }
    train, test = {r.instruction for r in a["train"]}, {r.instruction for r in a["test"]}
    assert not train & test and 0.15 < len(a["test"]) / len(records) < 0.25


def test_answer_format_round_trips_through_the_parser():
    records = prepare.load_records(prepare.EVAL_FILE, skip_bad=True, log=lambda *a: None)
    for r in records[:100]:
        for compact in (False, True):
            parsed = prepare.parse_answer(prepare.format_answer(r.sections, compact=compact))
            assert parsed["api_call"] == r.sections["api_call"]
            assert parsed["domain"] == r.sections["domain"]
            assert (parsed["explanation"] == "") == compact


def test_sft_loss_has_zero_weight_on_prompt_tokens():
    """The loss is the mean NLL of the answer tokens alone, computed by hand on unpadded rows."""
    from model import GPT, GPTConfig
    from sft import sft_loss

    model = GPT(GPTConfig(block_size=64, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    batch = [([1, 2, 3, 4], [5, 6, 49]), ([7, 8], [9, 49])]
    loss, _ = sft_loss(model, batch, 49, "cpu")
    with torch.no_grad():
        nll, n = 0.0, 0
        for prompt, answer in batch:
            logp = model(torch.tensor([prompt + answer])).log_softmax(-1)[0]
            for t, tok in enumerate(answer):
                nll -= logp[len(prompt) - 1 + t, tok].item()
                n += 1
    assert abs(loss.item() - nll / n) < 1e-5


@pytest.mark.slow
def test_sft_resume_reproduces_uninterrupted_run(tmp_path, monkeypatch):
    import rlaif
    import sft
    from model import Tokenizer

    tok = Tokenizer(prepare.VOCAB_FILE)
    g = torch.Generator().manual_seed(0)

    def rand(lo, hi):
        return torch.randint(
            0, 300, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g
        ).tolist()

    examples = [(rand(3, 9), rand(2, 7) + [tok.eot]) for _ in range(64)]
    cfg = rlaif.make_config(
        "tiny",
        init="micro",
        sft_steps=12,
        sft_batch_size=8,
        sft_eval_every=4,
        sft_warmup=2,
        device="cpu",
    )
    _, full = sft.train_sft(tok, examples, examples[:8], cfg.sft, cfg, tmp_path / "a")

    real_save = sft.save_checkpoint

    def crash_after_step_8(path, **state):
        real_save(path, **state)
        if state["step"] == 8:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(sft, "save_checkpoint", crash_after_step_8)
    with pytest.raises(KeyboardInterrupt):
        sft.train_sft(tok, examples, examples[:8], cfg.sft, cfg, tmp_path / "b")
    monkeypatch.setattr(sft, "save_checkpoint", real_save)
    _, resumed = sft.train_sft(tok, examples, examples[:8], cfg.sft, cfg, tmp_path / "b")
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full]
    assert resumed[-1].get("val_loss") == full[-1].get("val_loss")


def test_contrast_answers_differ_from_their_pair_in_one_judged_property():
    """Reference vs another domain's reference: the judge's relevance answer flips. A policy answer
    vs the same answer cut before its code: the judge's code answer flips and nothing before the
    code changes."""
    import rlaif
    from judge import RulesJudge
    from runs import Sample

    tok = prepare.tokenizer(compact=True)
    cfg = rlaif.make_config("tiny")
    train = prepare.offline_splits(
        prepare.load_records(prepare.EVAL_FILE, skip_bad=True, log=lambda *a: None)
    )["train"]
    chosen = [0, 5, 9]

    def answer(i):
        return tok.decode(
            prepare.answer_ids(tok, train[i].sections, cfg.compact, cfg.max_answer_tokens)
        )

    samples = [
        Sample(0, 0, "policy", [], [], " <<<domain>>>: x"),  # no code tag: not used
        Sample(1, 0, "policy", [], [], answer(0)),
        Sample(2, 5, "policy", [], [], answer(5)),
    ]
    out = rlaif.contrast_answers(cfg, tok, train, chosen, samples, start_id=3)
    assert [(c.record, c.source) for c in out] == [
        (0, "reference"),
        (0, "mismatched"),
        (0, "no_code"),
        (5, "reference"),
        (5, "mismatched"),
        (5, "no_code"),
        (9, "reference"),
        (9, "mismatched"),
    ]
    assert [c.id for c in out] == list(range(3, 11))
    judge = RulesJudge()
    for c in out:
        r = train[c.record]
        yes = judge.answers(r, c.answer)
        assert yes["domain_right"] == float(c.source != "mismatched")
        assert yes["code_valid"] == float(c.source != "no_code")
        if c.source == "no_code":
            policy = answer(c.record)
            assert c.response[-1] == tok.eot and policy.startswith(
                c.answer.replace("<|endoftext|>", "")
            )
            assert prepare.parse_answer(c.answer)["api_call"] == r.sections["api_call"]


@pytest.mark.slow
def test_sft_metrics_after_a_crash_and_resume_have_each_step_once(tmp_path, monkeypatch):
    """SFT crashes after its step-20 checkpoint (at step 25); the resumed run's metrics.jsonl has
    every step 1..40 exactly once, with validation losses at the checkpoints. A resume with another
    number of steps is refused."""
    import dataclasses
    import json

    import rlaif
    import sft
    from data.gorilla import prepare
    from model import Tokenizer

    cfg = rlaif.make_config(
        init="micro", sft_steps=40, sft_eval_every=20, sft_batch_size=4, max_answer_tokens=40
    )
    tok = Tokenizer(prepare.VOCAB_FILE)
    examples = [([1, 2, 3, i % 50 + 5], [i % 40 + 7, 9, tok.eot]) for i in range(64)]

    def crash_at_25(msg):
        if msg.startswith("[sft] step 25/"):
            raise RuntimeError("killed")

    monkeypatch.setattr(sft, "log", crash_at_25)
    with pytest.raises(RuntimeError):
        sft.train_sft(tok, examples, examples[:8], cfg.sft, cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))  # as checkpointed, not as far as it got
    # more steps would change the schedule it was trained on: refused, the setting named
    longer = dataclasses.replace(cfg.sft, steps=80)
    with pytest.raises(ValueError, match=r"steps: 40 in the checkpoint, 80 now"):
        sft.train_sft(tok, examples, examples[:8], longer, cfg, tmp_path)
    said = []
    monkeypatch.setattr(sft, "log", said.append)
    sft.train_sft(tok, examples, examples[:8], cfg.sft, cfg, tmp_path)
    assert any(m.startswith("[sft] resumed from") and m.endswith("at step 20") for m in said)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert [r["step"] for r in rows if "val_loss" in r] == [20, 40]
    assert {"loss", "lr", "tokens_per_s"} <= set(rows[0])


def test_a_larger_validation_set_keeps_the_test_questions_and_takes_only_train_ones():
    """--val-percent 20 (for choosing settings): the same 176 test questions, the 5% validation
    set inside the larger one, the rest taken from train, and the three still disjoint."""
    import evaluate
    import rlaif

    records = prepare.load_records(prepare.EVAL_FILE, skip_bad=True, log=lambda *a: None)
    small, large = prepare.offline_splits(records), prepare.offline_splits(records, 20)
    lines = {k: {r.line for r in v} for k, v in small.items()}
    large_lines = {k: {r.line for r in v} for k, v in large.items()}
    assert large_lines["test"] == lines["test"]
    assert lines["val"] < large_lines["val"]
    assert large_lines["val"] - lines["val"] <= lines["train"]
    assert large_lines["train"] == lines["train"] - large_lines["val"]
    assert len(large["val"]) >= 150 and len(small["val"]) < 60
    # the flag reaches the stages: the run's splits, and what evaluate --eval-split val answers
    cfg, _, _ = rlaif.parse_args(["--val-percent", "20", "--eval-split", "val"])
    splits = prepare.run_splits(cfg, log=lambda *a: None)
    assert {r.line for r in evaluate.eval_questions(cfg, splits)} == large_lines["val"]
    # 90 would leave no training instructions
    with pytest.raises(SystemExit, match="--val-percent 90: must be"):
        rlaif.refuse_bad_settings(rlaif.parse_args(["--val-percent", "90"])[0])
