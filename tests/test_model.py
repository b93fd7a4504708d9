"""model.py against a real transformers GPT-2 (random weights, saved with save_pretrained)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import GPT, GPTConfig, Tokenizer, generate, left_pad, response_logprobs, sample

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")  # only the parity tests need it
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=300)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    d = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(d)
    return d, hf


def test_logits_match_transformers(hf_dir):
    d, hf = hf_dir
    ours = GPT.from_pretrained(d).eval()
    x = torch.randint(0, 300, (3, 17))
    with torch.no_grad():
        assert torch.allclose(ours(x), hf(x).logits, atol=1e-4)


def test_left_padding_gives_same_logits(hf_dir):
    d, hf = hf_dir
    ours = GPT.from_pretrained(d).eval()
    rows = [list(range(5, 20)), list(range(40, 47)), [7, 8]]
    ids, mask = left_pad(rows, pad=0)
    with torch.no_grad():
        padded = ours(ids, mask)
        theirs = hf(
            ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)
        ).logits
        for i, r in enumerate(rows):
            alone = ours(torch.tensor([r]))[0]
            assert torch.allclose(padded[i, -len(r) :], alone, atol=1e-4)
            assert torch.allclose(padded[i, -len(r) :], theirs[i, -len(r) :], atol=1e-4)


def test_greedy_generation_matches_transformers(hf_dir):
    d, hf = hf_dir
    ours = GPT.from_pretrained(d).eval()
    rows = [[11, 12, 13, 14, 15], [101, 102], [7, 3, 9]]
    ids, mask = left_pad(rows, pad=299)
    resp, resp_mask, _ = generate(ours, ids, mask, max_new_tokens=20, eot=299, temperature=0)
    with torch.no_grad():
        ref = hf.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=20,
            do_sample=False,
            pad_token_id=299,
            eos_token_id=299,
        )[:, ids.size(1) :]
    for i in range(len(rows)):
        n = int(resp_mask[i].sum())
        assert resp[i, :n].tolist() == ref[i, :n].tolist()


def test_save_pretrained_loads_in_transformers(hf_dir, tmp_path):
    d, hf = hf_dir
    ours = GPT(GPTConfig(block_size=64, vocab_size=200, n_layer=2, n_head=2, n_embd=32)).eval()
    ours.save_pretrained(tmp_path)
    transformers = pytest.importorskip("transformers")
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 200, (2, 10))
    with torch.no_grad():
        assert torch.allclose(ours(x), back(x).logits, atol=1e-4)
    again = GPT.from_pretrained(tmp_path).eval()
    assert torch.equal(again(x), ours(x))


def test_sampled_logprobs_equal_teacher_forced(hf_dir):
    """The sampler's log-probs (KV cache) equal the teacher-forced ones on the same tokens."""
    d, _ = hf_dir
    ours = GPT.from_pretrained(d).eval()
    ids, mask = left_pad([[1, 2, 3, 4], [5, 6]], pad=299)
    g = torch.Generator().manual_seed(1)
    resp, resp_mask, logprobs = generate(ours, ids, mask, 12, eot=299, temperature=0.7, generator=g)
    with torch.no_grad():
        tf = response_logprobs(ours, ids, mask, resp, resp_mask, temperature=0.7)
    assert torch.allclose(logprobs, tf, atol=1e-4)


def test_generation_is_seeded_and_stops_per_row(hf_dir):
    d, _ = hf_dir
    ours = GPT.from_pretrained(d).eval()
    ids, mask = left_pad([[1, 2, 3]] * 4, pad=0)

    def run():
        return generate(
            ours, ids, mask, 30, eot=5, temperature=2.0, generator=torch.Generator().manual_seed(3)
        )

    a, am, _ = run()
    b, _, _ = run()
    assert torch.equal(a, b)
    for row, m in zip(a, am, strict=True):  # after the first eot, the row is padding only
        n = int(m.sum())
        assert (row[n:] == 5).all()
        assert (row[: n - 1] != 5).all()


def test_rows_that_end_leave_the_batch_without_changing_the_others():
    """generate drops rows that have ended from the batch and the KV cache: a row that goes on
    draws the same tokens as in a batch where no row ends (its cache rows follow it, and it keeps
    its own uniform draw every step)."""
    torch.manual_seed(0)
    net = GPT(GPTConfig(block_size=64, vocab_size=10, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():  # large weights: the next token depends on the whole context
        for p in net.parameters():
            p.normal_(0.0, 0.5)
    rows = [torch.randint(1, 10, (n,)).tolist() for n in [3, 5, 2, 4] * 4]
    ids, mask = left_pad(rows, pad=0)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    ended, _, _ = generate(net, ids, mask, 12, eot=0, temperature=1.0, generator=g())
    never, _, _ = generate(net, ids, mask, 12, eot=-1, temperature=1.0, generator=g())
    stopped = (ended == 0).any(1)
    assert 4 <= int(stopped.sum()) < len(rows), "the case needs a quarter that end, and others"
    for i in range(len(rows)):
        if not stopped[i]:
            assert ended[i].tolist() == never[i, : ended.size(1)].tolist(), i


def test_sample_matches_distribution_and_skips_zero_probability():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.2, 0.0]).repeat(20000, 1)
    probs[:, 0] *= 0.5  # unnormalised rows are allowed
    g = torch.Generator().manual_seed(0)
    freq = torch.bincount(sample(probs, g), minlength=5).double() / len(probs)
    expected = probs[0].double() / probs[0].sum()
    assert freq[1] == 0 and freq[4] == 0
    assert (freq - expected).abs().max() < 0.01  # 20k draws: standard error about 0.0035


@pytest.mark.parametrize("damage", ["missing", "shape", "json", "truncated"])
def test_broken_checkpoint_errors_name_file_and_tensor(hf_dir, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    d, _ = hf_dir
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    tensors = load_file(d / "model.safetensors")
    if damage == "missing":
        del tensors["transformer.h.1.mlp.c_fc.weight"]
    if damage == "shape":
        tensors["transformer.h.0.attn.c_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, tmp_path / "model.safetensors")
    if damage == "json":
        (tmp_path / "config.json").write_text('{"n_layer": 2,')
    if damage == "truncated":
        data = (tmp_path / "model.safetensors").read_bytes()
        (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception) as e:
        GPT.from_pretrained(tmp_path)
    msg = str(e.value)
    expect = {
        "missing": ["model.safetensors", "h.1.mlp.c_fc.weight"],
        "shape": ["model.safetensors", "h.0.attn.c_proj.weight", "(3, 3)"],
        "json": ["config.json", "line 1"],
        "truncated": ["model.safetensors"],
    }[damage]
    for s in expect:
        assert s in msg, msg


def test_tokenizer_offline_ids(tok):
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("<|endoftext|>") == [50256] and tok.eot == 50256


def test_tokenizer_round_trip_on_gorilla_text(tok):
    from data.gorilla.prepare import EVAL_FILE, VOCAB_FILE

    compact = Tokenizer(VOCAB_FILE)
    lines = EVAL_FILE.read_text().splitlines()[:200]
    for line in lines:
        text = json.loads(line)["code"]
        assert tok.decode(tok.encode(text)) == text
        assert compact.decode(compact.encode(text)) == text
    odd = "naïve 東京 🙂 <|endoftext|>"
    assert compact.decode(compact.encode(odd)) == odd


def test_same_seed_same_samples():
    probs = torch.rand(64, 100)
    assert torch.equal(
        sample(probs, torch.Generator().manual_seed(3)),
        sample(probs, torch.Generator().manual_seed(3)),
    )


def test_sampler_draws_on_its_generators_device(monkeypatch):
    """A CPU generator cannot fill a CUDA tensor: the uniforms are drawn on the generator's device,
    then moved to the probabilities'. Probabilities on the 'meta' device stand in for a GPU: a draw
    made on the probabilities' device shows up here as a 'meta' draw."""
    probs = torch.rand(4, 10).to("meta")
    seen, real_rand = [], torch.rand

    def spy(*args, **kw):
        seen.append(torch.device(kw["device"]))
        return real_rand(*args, **kw)

    monkeypatch.setattr(torch, "rand", spy)
    out = sample(probs, torch.Generator().manual_seed(0))
    assert seen == [torch.device("cpu")] and out.device.type == "meta"


@pytest.mark.parametrize("vocab_size, eot", [(50257, 50256), (11184, 11183)])
def test_export_generates_until_its_end_of_text_in_transformers(tmp_path, vocab_size, eot):
    """Our export loads with AutoModelForCausalLM (and, for GPT-2's vocabulary, AutoTokenizer), and
    transformers' generate stops at the end-of-text id we wrote into generation_config.json."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=vocab_size, n_layer=1, n_head=2, n_embd=16))
    with torch.no_grad():  # every position's hidden state is v, and v points at end-of-text
        v = torch.randn(16)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(v)
        model.transformer.wte.weight.mul_(0.01)
        model.transformer.wte.weight[eot] = 10 * v
    model.save_pretrained(tmp_path, eot=eot)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    out = hf.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=20, do_sample=False)
    assert out[0].tolist() == [1, 2, 3, eot]  # stopped at end-of-text, not after 20 tokens
    if vocab_size == 50257:
        hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
        text = open(prepare_file()).read()[:20000]
        assert hf_tok.encode(text) == Tokenizer().encode(text)
        assert hf_tok.eos_token_id == eot


def prepare_file():
    from data.gorilla import prepare

    return prepare.EVAL_FILE


def test_unreadable_checkpoint_names_its_file(tmp_path):
    from runs import load_checkpoint, save_checkpoint

    empty = tmp_path / "ckpt.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="ckpt.pt: not a readable checkpoint"):
        load_checkpoint(empty)
    save_checkpoint(tmp_path / "good.pt", step=3)
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")


def test_model_flops_are_palms_count_of_real_tokens():
    # PaLM appendix B, counted here from the model's own weights: 2 per block weight per real token,
    # 4 per layer, width and key per token, 2 per head weight per head row; 3x with a backward pass.
    torch.manual_seed(0)
    c = GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=16)
    net = GPT(c)
    block_weights = sum(
        m.weight.numel() for m in net.transformer.h.modules() if isinstance(m, torch.nn.Linear)
    )
    idx = torch.randint(0, 50, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # 10 real tokens, 2 padding
    per_token = 2 * block_weights + 4 * c.n_layer * c.n_embd * 6
    start = GPT.flops_done
    with torch.no_grad():
        hidden = net.hidden_states(idx, mask)
        net.head(hidden[:, -1])  # 2 head rows
    assert GPT.flops_done - start == 10 * per_token + 2 * 2 * c.n_embd * c.vocab_size
    start = GPT.flops_done
    net(idx, mask).sum().backward()  # 12 head rows; padding's rows go through the head too
    assert GPT.flops_done - start == 3 * (10 * per_token + 12 * 2 * c.n_embd * c.vocab_size)


def test_a_matmul_rate_taken_under_load_is_replaced_by_a_faster_one(monkeypatch):
    import model

    c = GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=32)
    monkeypatch.setattr(model, "MATMUL_RATES", {})
    first = model.matmul_rate(c, rows=64)
    key = next(iter(model.MATMUL_RATES))
    model.MATMUL_RATES[key] = 1.0  # as if other work had held the cores when it was measured
    assert model.matmul_rate(c, rows=64) == 1.0  # measured once a process...
    assert model.matmul_rate(c, rows=64, refresh=True) > 1.0  # ...until a stage's end asks again
    model.MATMUL_RATES[key] = 1e30  # an earlier, faster reading is the peak: kept
    assert model.matmul_rate(c, rows=64, refresh=True) == 1e30 and first > 0


# Run in a fresh interpreter beside a lone copy of model.py: it must import, build, run, save,
# load and sample with nothing of the project around it (issue 47: "model.py copyable alone").
COPIED_ALONE = """
import importlib.util
from pathlib import Path

import torch

assert importlib.util.find_spec("runs") is None, "the project is on sys.path"
import model

assert Path(model.__file__).resolve().parent == Path.cwd().resolve(), model.__file__
torch.manual_seed(0)
net = model.GPT(model.preset_config("micro", vocab_size=1000)).eval()
x = torch.randint(0, 1000, (2, 12))
with torch.no_grad():
    logits = net(x)
net.save_pretrained("saved", eot=999)
back = model.GPT.from_pretrained("saved").eval()
with torch.no_grad():
    assert torch.equal(back(x), logits), "save_pretrained -> from_pretrained changed the logits"
query, query_mask = model.left_pad([[1, 2, 3], [4]], pad=999)
response, response_mask, logprobs = model.generate(
    back, query, query_mask, 8, eot=999, generator=torch.Generator().manual_seed(0)
)
assert response.shape == response_mask.shape == logprobs.shape and response.size(0) == 2
print("ok")
"""


def test_model_py_copied_alone_imports_runs_saves_and_loads(tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(ROOT / "model.py", alone / "model.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", COPIED_ALONE],
        cwd=alone,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
