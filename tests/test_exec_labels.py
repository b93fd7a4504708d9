"""The offline executability check against hand labels of real answers (tests/data/exec_labels.md
says how they were labelled): agreement and Cohen's kappa, and every disagreement printed."""

import json
from pathlib import Path

import pytest

from sandbox import Sandbox

LABELS = Path(__file__).with_name("data") / "exec_labels.jsonl"


def agreement(labels, predicted):
    """(observed agreement, Cohen's kappa, confusion {(label, predicted):
    count}) of two boolean lists."""
    n = len(labels)
    confusion = {
        (a, b): sum(x == a and y == b for x, y in zip(labels, predicted, strict=True))
        for a in (True, False)
        for b in (True, False)
    }
    observed = (confusion[True, True] + confusion[False, False]) / n
    chance = (
        sum(
            (confusion[v, True] + confusion[v, False]) * (confusion[True, v] + confusion[False, v])
            for v in (True, False)
        )
        / n
        / n
    )
    return observed, (observed - chance) / (1 - chance), confusion


def test_agreement_formula_on_a_hand_computed_case():
    # 10 items: labels 6 yes / 4 no; predictions agree on 5 yes and 3 no. po = 0.8;
    # pe = 0.6 x 0.6 + 0.4 x 0.4 = 0.52; kappa = (0.8 - 0.52) / 0.48 = 0.5833.
    labels = [True] * 6 + [False] * 4
    predicted = [True] * 5 + [False] + [True] + [False] * 3
    po, kappa, confusion = agreement(labels, predicted)
    assert po == 0.8 and abs(kappa - 0.28 / 0.48) < 1e-12
    assert confusion == {(True, True): 5, (True, False): 1, (False, True): 1, (False, False): 3}


@pytest.mark.slow
def test_offline_verdicts_agree_with_hand_labels():
    rows = [json.loads(line) for line in LABELS.read_text().splitlines()]
    assert len(rows) >= 100 and all(r["reason"] for r in rows)
    verdicts = Sandbox(offline=True).run_all([r["code"] for r in rows])
    predicted = [v == "executable" for v, _ in verdicts]
    po, kappa, confusion = agreement([r["executable"] for r in rows], predicted)
    print(
        f"\nagreement {po:.3f}, Cohen's kappa {kappa:.3f}, "
        f"(label, offline verdict) counts {confusion}"
    )
    for r, (verdict, detail), p in zip(rows, verdicts, predicted, strict=True):
        if p != r["executable"]:
            print(
                f"  uid {r['uid']}: label {r['executable']} ({r['reason'][:90]}); "
                f"offline {verdict} {detail[:90]}"
            )
    assert po >= 0.90, f"agreement {po:.3f} < 0.90"
