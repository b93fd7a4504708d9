"""Benchmark model.py against transformers' GPT-2 on this CPU (prints numbers; asserts nothing).

python tests/bench_model.py
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import GPT, GPTConfig, generate, left_pad  # noqa: E402


def timed(fn, repeat):
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def train_step(model, x, hf=False):
    def step():
        logits = model(x).logits if hf else model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def main():
    import transformers

    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    c = dict(n_layer=6, n_head=6, n_embd=384, vocab_size=50257, block_size=512)
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_layer=c["n_layer"],
            n_head=c["n_head"],
            n_embd=c["n_embd"],
            n_positions=c["block_size"],
            vocab_size=c["vocab_size"],
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            attn_implementation="sdpa",
        )
    )  # no dropout, as ours
    ours = GPT(GPTConfig(**c))
    B, T = 8, 256
    x = torch.randint(0, c["vocab_size"], (B, T))
    t_ours, t_hf = timed(train_step(ours, x), 5), timed(train_step(hf, x, hf=True), 5)
    print(
        f"forward+backward, {c['n_layer']}x{c['n_embd']}, B={B} T={T}: "
        f"ours {B * T / t_ours:,.0f} tok/s, "
        f"transformers {B * T / t_hf:,.0f} tok/s, ratio {t_hf / t_ours:.2f}x"
    )

    ours.eval(), hf.eval()
    prompts = [
        torch.randint(0, c["vocab_size"], (int(n),)).tolist() for n in torch.randint(8, 24, (16,))
    ]
    ids, mask = left_pad(prompts, 0)
    g = torch.Generator().manual_seed(0)
    # eot=-1 never comes, so both make exactly 64 tokens
    t_ours = timed(lambda: generate(ours, ids, mask, 64, eot=-1, temperature=1.0, generator=g), 2)
    with torch.no_grad():
        t_hf = timed(
            lambda: hf.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=64,
                min_new_tokens=64,
                do_sample=True,
                pad_token_id=0,
                use_cache=True,
            ),
            2,
        )
    print(
        f"sampling, batch 16, 64 new tokens: ours {16 * 64 / t_ours:,.0f} tok/s, "
        f"transformers generate {16 * 64 / t_hf:,.0f} tok/s, ratio {t_hf / t_ours:.2f}x"
    )

    # FLOP rate of our training step at a gpt2-small-like shape vs the CPU's plain torch.mm rate
    s = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024))
    B, T = 4, 256
    x = torch.randint(0, 50257, (B, T))
    n_params = sum(p.numel() for p in s.parameters())
    # 6N per token + attention (PaLM appendix B)
    flops = 6 * n_params * B * T + 12 * 12 * 768 * T * B * T
    t = timed(train_step(s, x), 2)
    a, b = torch.randn(B * T, 768), torch.randn(768, 3072)
    t_mm = timed(lambda: a @ b, 20)
    mm_rate = 2 * B * T * 768 * 3072 / t_mm
    print(
        f"training step at 12x768 (gpt2-small shape), B={B} T={T}: {flops / t / 1e9:.1f} GFLOP/s = "
        f"{flops / t / mm_rate:.0%} of torch.mm's {mm_rate / 1e9:.1f} GFLOP/s"
    )


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    main()
