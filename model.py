"""
GPT-2, written out by hand (Radford et al. 2019), in the shape of nanoGPT's model.py.

The network and what a porter needs with it, once:
  - GPT: the network; loads and exports Hugging Face GPT-2 checkpoints (safetensors, no pickle).
  - ScalarModel: GPT-2 with a scalar head (the reward model, PPO's value model), and the plain
    state a checkpoint of it holds.
  - Tokenizer: tiktoken's GPT-2 BPE, built offline from data/gpt2.tiktoken when the download fails,
    optionally remapped onto the compact vocabulary the tiny CPU preset uses.
  - left_pad, right_pad, pad_pairs: the batch layout that generation and log-probs read.
  - generate(): the one batched sampler (KV cache, temperature, per-row EOS) used for
    SFT samples, PPO rollouts and evaluation; sample_answers() runs it over many prompts.
  - response_logprobs(): the one teacher-forced log-prob routine used by SFT, PPO and DPO
    (answer_states, then states_logprobs: PPO's shared value head reads the states between).
Copyable alone into another project, as nanoGPT's model.py is: at import it needs only Python and
torch (safetensors, huggingface_hub and tiktoken are imported inside the functions that use them).
What a run adds around it (atomic writes, checkpoint files, autocast, progress lines, run
directories) lives in runs.py, training.py and the stage files; nothing here imports them.
"""

import json
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
EOT = "<|endoftext|>"


# -----------------------------------------------------------------------------
# Config

# GPT-2's BPE: 50,000 merges, 256 bytes and <|endoftext|>. A model with fewer tokens was trained on
# the compact remap ([offline stand-in], see Tokenizer).
GPT2_VOCAB = 50257


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (prompt + answer) the position table covers
    vocab_size: int = GPT2_VOCAB  # the tiny preset uses the compact remap
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # off by default: RLHF needs deterministic log-probs (Huang et al. 2023)
    layer_norm_epsilon: float = 1e-5


PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M, the paper's model
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # CPU preset, trained from scratch: 4 layers, 256 wide, on the compact vocabulary
    # (data/gorilla/vocab.json), so that the embedding and output layer stop dominating compute.
    "tiny": dict(n_layer=4, n_head=4, n_embd=256, block_size=512, vocab_size=None),
    # tests, smoke runs
    "micro": dict(n_layer=2, n_head=2, n_embd=64, block_size=512, vocab_size=None),
}


def preset_config(name, vocab_size=GPT2_VOCAB):
    """GPTConfig for a preset name; vocab_size fills in presets that take it from the tokenizer."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    kw = dict(PRESETS[name])
    if kw.get("vocab_size", 0) is None:
        # round up: matmuls like multiples of 64 (nanoGPT)
        kw["vocab_size"] = -(-vocab_size // 64) * 64
    return GPTConfig(**kw)


# -----------------------------------------------------------------------------
# The network


class KVCache:
    """Preallocated keys/values for every layer, so sampling step t attends to steps < t
    without recomputing them and without reallocating (torch.cat per step is quadratic)."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.len = 0  # positions filled so far

    def keep(self, rows):
        """Keep only these rows of the batch (generate drops the rows that have ended)."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]

    def update(self, layer, k, v):
        end = self.len + k.size(2)
        self.k[layer][:, :, self.len : end] = k
        self.v[layer][:, :, self.len : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.layer, self.n_head = layer, config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask, cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2's "gelu_new"
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block (GPT-2, section 2.3)."""

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, mask, cache=None):
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    # Model FLOPs this process has computed, every GPT together (PaLM's "model FLOPs", Chowdhery
    # et al. 2022, appendix B): 2 per weight per real token, 4 per attention entry, 3x with the
    # backward pass. Padding positions are computed but not counted: they are the waste MFU should
    # show. FlopMeter reads it.
    flops_done = 0

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for (
            name,
            p,
        ) in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(self, idx, attention_mask=None, cache=None):
        """Final-LayerNorm hidden states (B, T, C). attention_mask (B, S) marks real tokens (1) and
        padding (0) over every key position, past (cached) ones included, S = cached + T: left
        padding of prompts, and right padding of answers after their end."""
        B, T = idx.shape
        past = cache.len if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past + T, dtype=torch.long, device=idx.device)
        # Position ids count real tokens only, so a left-padded row sees the same positions as
        # unpadded.
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        if pos.max() >= self.config.block_size:
            raise ValueError(
                f"sequence of {int(pos.max()) + 1} tokens exceeds block_size "
                f"{self.config.block_size}"
            )
        # Boolean mask (B, 1, T, S): causal AND key is a real token. A query may always see itself,
        # so padding rows never have an empty softmax (their outputs are ignored downstream).
        q_idx = torch.arange(past, past + T, device=idx.device)[:, None]
        k_idx = torch.arange(past + T, device=idx.device)[None, :]
        mask = (k_idx <= q_idx)[None, None] & attention_mask.bool()[:, None, None, :]
        mask = mask | (k_idx == q_idx)[None, None]
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x, mask, cache)
        if cache is not None:
            cache.len += T
        self.count_flops(x, tokens=int(attention_mask[:, past:].sum()), keys=past + T)
        return self.transformer.ln_f(x)

    def forward(self, idx, attention_mask=None, cache=None):
        """Next-token logits (B, T, vocab)."""
        return self.head(self.hidden_states(idx, attention_mask, cache))

    def head(self, hidden):
        """The LM head on hidden states (..., C) -> logits (..., vocab), counted in flops_done."""
        self.count_flops(hidden, head_rows=hidden.numel() // hidden.size(-1))
        return self.lm_head(hidden)

    def count_flops(self, x, tokens=0, keys=0, head_rows=0):
        """Add the model FLOPs of `tokens` real tokens through the blocks, each attending to `keys`
        positions (PaLM counts every key, causal or not), and of `head_rows` rows through the LM
        head; 3x when x will be backpropagated (the backward pass costs twice the forward)."""
        c = self.config
        per_token = 2 * 12 * c.n_layer * c.n_embd**2 + 4 * c.n_layer * c.n_embd * keys
        forward = tokens * per_token + head_rows * 2 * c.n_embd * c.vocab_size
        GPT.flops_done += forward * (3 if x.requires_grad else 1)

    # ---- Hugging Face checkpoints --------------------------------------------------------------

    # HF GPT-2 stores these four as Conv1D, i.e. (in, out): transpose them to nn.Linear's (out, in).
    CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    @classmethod
    def from_pretrained(cls, name_or_dir):
        """Load a Hugging Face GPT-2 checkpoint (config.json + model.safetensors) from a local
        directory, or from the Hub by name ("gpt2-large") when online."""
        path = Path(name_or_dir)
        if path.is_dir():
            config_file, weights_file = path / "config.json", path / "model.safetensors"
        else:
            from huggingface_hub import hf_hub_download  # comes with `datasets`; only used online

            try:
                config_file = Path(hf_hub_download(str(name_or_dir), "config.json"))
                weights_file = Path(hf_hub_download(str(name_or_dir), "model.safetensors"))
            except Exception as e:
                raise RuntimeError(
                    f"could not download {name_or_dir!r} from the Hugging Face Hub ({e}); "
                    "pass a local directory with config.json and model.safetensors"
                ) from e
        config = cls._read_hf_config(config_file)
        model = cls(config)
        model._load_hf_weights(weights_file)
        return model

    @staticmethod
    def _read_hf_config(config_file):
        try:
            hf = json.loads(Path(config_file).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{config_file}: missing (a GPT-2 checkpoint needs config.json)"
            ) from None
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{config_file}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
            ) from None
        keys = dict(
            block_size="n_positions",
            vocab_size="vocab_size",
            n_layer="n_layer",
            n_head="n_head",
            n_embd="n_embd",
        )
        missing = [hf_key for hf_key in keys.values() if hf_key not in hf]
        if missing:
            raise ValueError(f"{config_file}: missing field(s) {missing}")
        return GPTConfig(
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            **{ours: int(hf[theirs]) for ours, theirs in keys.items()},
        )

    def _load_hf_weights(self, weights_file):
        from safetensors import safe_open

        ours = self.state_dict()
        try:
            with safe_open(str(weights_file), framework="pt") as f:
                theirs = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{weights_file}: missing (a GPT-2 checkpoint needs model.safetensors)"
            ) from None
        except Exception as e:
            raise ValueError(f"{weights_file}: not a readable safetensors file ({e})") from None
        for key in ours:
            if key == "lm_head.weight":
                continue  # tied to wte
            hf_key = key.removeprefix("transformer.")
            if hf_key not in theirs:
                raise KeyError(f"{weights_file}: missing tensor {hf_key!r}")
            t = theirs[hf_key]
            if key.endswith(self.CONV1D):
                t = t.t()
            if t.shape != ours[key].shape:
                raise ValueError(
                    f"{weights_file}: tensor {hf_key!r} has shape {tuple(t.shape)}, "
                    f"expected {tuple(ours[key].shape)} for this config.json"
                )
            with torch.no_grad():
                ours[key].copy_(t)

    def save_pretrained(self, out_dir, eot=50256):
        """Write config.json, generation_config.json and model.safetensors into out_dir, which
        transformers' GPT2LMHeadModel loads unchanged. eot: the end-of-text id (11183 in the
        compact vocabulary). Plain writes, as transformers' own save_pretrained: a run that must
        never leave half a model writes into a directory renamed into place (runs.atomic_dir)."""
        from safetensors.torch import save_file

        c = self.config
        hf_config = dict(
            model_type="gpt2",
            architectures=["GPT2LMHeadModel"],
            n_positions=c.block_size,
            n_ctx=c.block_size,
            vocab_size=c.vocab_size,
            n_layer=c.n_layer,
            n_head=c.n_head,
            n_embd=c.n_embd,
            layer_norm_epsilon=c.layer_norm_epsilon,
            activation_function="gelu_new",
            resid_pdrop=c.dropout,
            embd_pdrop=c.dropout,
            attn_pdrop=c.dropout,
            tie_word_embeddings=True,
            bos_token_id=eot,
            eos_token_id=eot,
        )
        generation = dict(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
        tensors = {}
        for key, t in self.state_dict().items():
            if key == "lm_head.weight":
                continue  # tied; transformers re-ties it on load
            t = t.detach().to("cpu", torch.float32)
            tensors[key] = (t.t() if key.endswith(self.CONV1D) else t).contiguous()
        files = {
            "config.json": json.dumps(hf_config, indent=2),
            "generation_config.json": json.dumps(generation),
        }
        # GPT-2's own vocabulary: AutoTokenizer.from_pretrained(out_dir) works
        if c.vocab_size >= GPT2_VOCAB:
            files.update(gpt2_tokenizer_files(c.block_size))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (out_dir / name).write_text(text)
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


class ScalarModel(nn.Module):
    """GPT-2 backbone + a linear head giving one scalar per position. The reward model reads it at
    the last real token; PPO's value model (initialised from the reward model) reads it at every
    step. n_aux > 0 adds auxiliary logits read at the same token (the reward model's per-question
    heads)."""

    def __init__(self, backbone, n_aux=0):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.n_embd, 1)
        # lm-human-preferences
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(backbone.config.n_embd + 1))
        nn.init.zeros_(self.head.bias)
        self.aux = nn.Linear(backbone.config.n_embd, n_aux) if n_aux else None
        self.register_buffer("gain", torch.ones(()))  # reward normalisation, set after training
        self.register_buffer("bias", torch.zeros(()))

    def forward(self, ids, mask):
        return self.head(self.backbone.hidden_states(ids, mask)).squeeze(-1)

    def freeze_below(self, train_blocks):
        """Train only the heads and the top `train_blocks` transformer blocks (with the final
        LayerNorm); -1 trains everything. A frozen trunk keeps what the SFT network already
        knows."""
        if train_blocks < 0:
            return
        blocks = self.backbone.transformer.h
        self.backbone.requires_grad_(False)
        for block in list(blocks)[len(blocks) - train_blocks :] if train_blocks else []:
            block.requires_grad_(True)
        self.backbone.transformer.ln_f.requires_grad_(train_blocks > 0)

    def score_and_aux(self, query, query_mask, response, response_mask):
        """(normalised reward, auxiliary logits or None) of each (query, response), read at the
        response's last real token."""
        hidden = self.backbone.hidden_states(
            torch.cat([query, response], 1), torch.cat([query_mask, response_mask], 1)
        )
        last = query.size(1) + response_mask.sum(1) - 1
        h = hidden[torch.arange(hidden.size(0), device=hidden.device), last]
        raw = self.head(h).squeeze(-1)
        return self.gain * raw + self.bias, (self.aux(h) if self.aux is not None else None)

    def score(self, query, query_mask, response, response_mask):
        """Normalised reward of each (query, response): the head at the response's last real
        token."""
        return self.score_and_aux(query, query_mask, response, response_mask)[0]

    def checkpoint(self, **extra):
        """Plain state (tensors, numbers, dicts) to torch.save: the weights, the backbone's config
        and the number of auxiliary heads, which from_checkpoint needs to rebuild the model, and
        `extra` (a training step, an optimizer state)."""
        return dict(
            model=self.state_dict(),
            config=vars(self.backbone.config),
            n_aux=self.aux.out_features if self.aux is not None else 0,
            **extra,
        )

    @classmethod
    def from_checkpoint(cls, ckpt, device="cpu"):
        """The model that checkpoint() described (ckpt as torch.load returned it)."""
        m = cls(GPT(config_from_dict(ckpt["config"])), ckpt.get("n_aux", 0))
        m.load_state_dict(ckpt["model"])
        return m.to(device)


# -----------------------------------------------------------------------------
# Tokenizer

# tiktoken's r50k/gpt2 pre-tokenisation pattern (the regex GPT-2's encoder.py used).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def gpt2_encoding():
    """tiktoken's GPT-2 encoding; offline, the identical one built from data/gpt2.tiktoken."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(str(ROOT / "data" / "gpt2.tiktoken"))
        return tiktoken.Encoding(
            "gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={EOT: 50256},
            explicit_n_vocab=GPT2_VOCAB,
        )


def gpt2_tokenizer_files(max_length):
    """GPT-2's vocab.json and merges.txt (transformers' format) derived from the BPE ranks: each
    token is written in GPT-2's printable byte alphabet; its merge is the pair that BPE, using only
    lower ranks, joins into it."""
    enc = gpt2_encoding()
    ranks = enc._mergeable_ranks
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's bytes_to_unicode
    alphabet = {
        b: chr(b) if b in printable else chr(256 + sum(1 for x in range(b) if x not in printable))
        for b in range(256)
    }

    def spell(token):
        return "".join(alphabet[b] for b in token)

    merges = []
    for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            i = min(
                range(len(parts) - 1),
                key=lambda i: ranks.get(parts[i] + parts[i + 1], float("inf")),
            )
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        merges.append(f"{spell(parts[0])} {spell(parts[1])}")
    vocab = {spell(t): r for t, r in ranks.items()} | {EOT: 50256}
    config = dict(
        tokenizer_class="GPT2Tokenizer",
        model_max_length=max_length,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        add_prefix_space=False,
    )
    return {
        "vocab.json": json.dumps(vocab),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(config),
    }


class Tokenizer:
    """GPT-2 BPE. With `vocab_file` (a JSON list of GPT-2 ids), ids are remapped onto that compact
    vocabulary: a GPT-2 token outside it is spelled with its single-byte tokens (always inside), so
    every text still encodes losslessly. The tiny preset uses this; the paper config does not."""

    def __init__(self, vocab_file=None):
        self.enc = gpt2_encoding()
        self.gpt2_ids = None
        if vocab_file is not None:
            self.gpt2_ids = json.loads(Path(vocab_file).read_text())
            self.compact = {g: i for i, g in enumerate(self.gpt2_ids)}
            self.byte_ids = [
                self.compact[self.enc.encode_single_token(bytes([b]))] for b in range(256)
            ]
        self.vocab_size = len(self.gpt2_ids) if self.gpt2_ids else self.enc.n_vocab
        self.eot = self.encode(EOT)[0]

    def encode(self, text):
        ids = self.enc.encode(text, allowed_special={EOT})
        if self.gpt2_ids is None:
            return ids
        out = []
        for g in ids:
            if g in self.compact:
                out.append(self.compact[g])
            else:
                out.extend(self.byte_ids[b] for b in self.enc.decode_single_token_bytes(g))
        return out

    def decode(self, ids):
        if self.gpt2_ids is not None:
            ids = [self.gpt2_ids[i] for i in ids if i < len(self.gpt2_ids)]
        return self.enc.decode(list(ids))


# -----------------------------------------------------------------------------
# Batches, sampling and log-probs: one implementation each


def left_pad(seqs, pad, device="cpu"):
    """Left-pad token lists into (B, T) ids and a 1/0 attention mask."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s) :] = torch.tensor(s)
            mask[i, T - len(s) :] = 1
    return ids.to(device), mask.to(device)


def right_pad(seqs, pad, device="cpu"):
    """Right-pad token lists into (B, T) ids and a 1/0 mask."""
    T = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def pad_pairs(pairs, pad, device="cpu"):
    """(prompt, answer) token lists -> query, query_mask (left-padded), response, response_mask
    (right-padded): the batch layout of response_logprobs, for SFT, the reward model and DPO
    alike."""
    query, query_mask = left_pad([p for p, _ in pairs], pad, device)
    response, response_mask = right_pad([a for _, a in pairs], pad, device)
    return query, query_mask, response, response_mask


def sample(probs, generator=None, live=None, batch_size=None):
    """One token per row by inverse-CDF sampling: a single uniform draw per row. (torch.multinomial
    draws an exponential variate per vocabulary entry, 50k per row, which was half of CPU sampling
    time.) Zero-probability tokens are never chosen: their CDF step is empty. live: the rows of a
    batch of batch_size that probs holds (generate drops the rows that have ended): the whole batch
    draws, so that a row's tokens do not depend on when the others ended."""
    cdf = probs.double().cumsum(-1)
    # The uniforms come from `generator` on its own device (a CPU generator cannot fill a CUDA
    # tensor) and are then moved: the same seed gives the same draws on CPU and GPU.
    device = generator.device if generator is not None else cdf.device
    rows = probs.size(0) if live is None else batch_size
    u = torch.rand(rows, 1, dtype=cdf.dtype, device=device, generator=generator).to(cdf.device)
    u = (u if live is None else u[live]) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=probs.size(-1) - 1)


@torch.no_grad()
def generate(model, query, query_mask, max_new_tokens, eot, temperature=1.0, generator=None):
    """Sample continuations of left-padded prompts with a KV cache.

    Returns (response, response_mask, logprobs), each (B, N): tokens right-padded with `eot`, 1 on
    real tokens (the stopping `eot` included), and the log-probability of each token under the
    temperature-scaled distribution. temperature=0 is greedy decoding. Rows that have ended leave
    the batch (and the cache) once a quarter of it has: the rest stop paying for them.
    """
    B, Q = query.shape
    N = min(max_new_tokens, model.config.block_size - Q)
    if N < 1:
        raise ValueError(
            f"a prompt of {Q} tokens leaves no room in block_size {model.config.block_size}"
        )
    param = next(model.parameters())
    cache = KVCache(model.config, B, Q + N, query.device, param.dtype)
    mask = query_mask.clone()
    response = torch.full((B, N), eot, dtype=torch.long, device=query.device)
    logps = torch.zeros(B, N, device=query.device)
    live = torch.arange(B, device=query.device)  # the batch's rows still in the cache, in order
    done = torch.zeros(B, dtype=torch.bool, device=query.device)  # per live row
    x = query
    for t in range(N):
        logits = model.head(model.hidden_states(x, mask, cache)[:, -1]).float()
        if temperature == 0:
            logprobs = logits.log_softmax(-1)
            tok = logits.argmax(-1)
        else:
            logprobs = (logits / temperature).log_softmax(-1)
            tok = sample(logprobs.exp(), generator, live, batch_size=B)
        tok = torch.where(done, torch.full_like(tok, eot), tok)
        response[live, t] = tok
        logps[live, t] = logprobs.gather(1, tok[:, None]).squeeze(1)
        done = done | (tok == eot)
        if done.all():
            break
        x = tok[:, None]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if done.sum() * 4 >= len(done):  # drop the finished rows
            keep = (~done).nonzero().squeeze(1)
            live, done, x, mask = live[keep], done[keep], x[keep], mask[keep]
            cache.keep(keep)
    response = response[:, : t + 1]
    # mask: 1 up to and including the first eot of each row
    after_eot = (response == eot).long().cumsum(1) - (response == eot).long()
    response_mask = (after_eot == 0).long()
    return response, response_mask, logps[:, : t + 1] * response_mask


def sample_answers(
    model, prompts, eot, max_new_tokens, temperature, seed, batch_size=32, on_batch=None
):
    """Answers (token lists, ending in eot unless cut off) to token-list prompts: generate() over
    batches of prompts of similar length (less left padding), with one seeded generator on the CPU
    whatever the model's device. on_batch(done, total), if given, is called after each batch (the
    stages log progress with it). Mixed precision is the caller's: call it under autocast."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    # stable: same seed, same order
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [None] * len(prompts)
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        query, query_mask = left_pad([prompts[i] for i in rows], eot, device)
        response, response_mask, _ = generate(
            model, query, query_mask, max_new_tokens, eot, temperature, generator=generator
        )
        for i, r, m in zip(rows, response.tolist(), response_mask.sum(1).tolist(), strict=True):
            out[i] = r[:m]
        if on_batch is not None:
            on_batch(min(start + batch_size, len(order)), len(order))
    return out


def response_logprobs(
    model, query, query_mask, response, response_mask, temperature=1.0, with_entropy=False
):
    """Teacher-forced log-probs (B, R) of `response` given left-padded `query` (zero on padding).
    with_entropy: also each position's entropy (B, R), without gradient."""
    hidden = answer_states(model, query, query_mask, response, response_mask)
    return states_logprobs(model, hidden, response, response_mask, temperature, with_entropy)


def answer_states(model, query, query_mask, response, response_mask):
    """Final hidden states (B, R, C) at the positions that predict each response token: position
    Q-1+t predicts response token t. PPO's shared value head reads the same states."""
    hidden = model.hidden_states(
        torch.cat([query, response], 1), torch.cat([query_mask, response_mask], 1)
    )
    return hidden[:, query.size(1) - 1 : -1]


def states_logprobs(model, hidden, response, response_mask, temperature=1.0, with_entropy=False):
    """Log-probs (B, R) of `response` from answer_states (zero on padding), and with_entropy each
    position's entropy. The LM head and log-softmax run only at the positions that predict a real
    response token: in a padded batch most positions are prompt or padding, and the head is about
    half of a small model's compute."""
    real = response_mask.bool()
    logits = model.head(hidden[real]).float()  # (N real tokens, vocab)
    if temperature not in (0, 1):  # 0 is greedy decoding, whose answers are scored at 1
        logits = logits / temperature
    logp = logits.log_softmax(-1)
    logprobs = torch.zeros(response.shape, dtype=logp.dtype, device=logp.device)
    logprobs[real] = logp.gather(1, response[real][:, None]).squeeze(1)
    if not with_entropy:
        return logprobs
    entropy = torch.zeros_like(logprobs)
    with torch.no_grad():  # a statistic: autograd would keep another (tokens, vocab) tensor for it
        entropy[real] = -(logp.exp() * logp).sum(-1)
    return logprobs, entropy


# -----------------------------------------------------------------------------
# Speed: model FLOPs per second and MFU on the host that runs

MATMUL_RATES = {}  # (n_embd, vocab_size, device, threads) -> FLOP/s, measured once per process


def matmul_rate(config, device="cpu", rows=2048, repeat=3, refresh=False):
    """FLOP/s of torch.mm on this host, with this process's threads, at the two shapes the model
    multiplies most: its MLP (rows x C @ C x 4C) and its LM head (rows x C @ C x vocab), in the
    dtype the model computes in (bf16 under autocast on a GPU). The yardstick of MFU: a CPU's peak
    is not on its box, and hosts of one size differ up to 4x, not in proportion at every shape
    (docs/benchmarks.md). Measured once per process; refresh measures again and keeps the faster:
    a peak is the best the host shows, and a rate taken while other work shared the cores put a
    stage's MFU over 100%."""
    device = torch.device(device)
    key = (config.n_embd, config.vocab_size, str(device), torch.get_num_threads())
    if key not in MATMUL_RATES or refresh:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        x = torch.randn(rows, config.n_embd, device=device, dtype=dtype)
        flops, seconds = 0, 0.0
        for n in (4 * config.n_embd, config.vocab_size):
            w = torch.randn(config.n_embd, n, device=device, dtype=dtype)
            x @ w  # warm-up
            times = []
            for _ in range(repeat):
                synchronize(device)
                t0 = time.perf_counter()
                x @ w
                synchronize(device)
                times.append(time.perf_counter() - t0)
            seconds += min(times)  # the fastest repeat: the others were interrupted
            flops += 2 * rows * w.numel()
        MATMUL_RATES[key] = max(flops / seconds, MATMUL_RATES.get(key, 0.0))
    return MATMUL_RATES[key]


def synchronize(device):
    if device.type == "cuda":  # kernels run asynchronously: wait for them before reading a clock
        torch.cuda.synchronize(device)


class FlopMeter:
    """Model FLOPs per second since it was made (GPT.flops_done), and model-FLOPs utilisation
    (MFU, nanoGPT's estimate_mfu) against this host's matmul_rate at the shapes and on the device
    of `model`: a speed that reads the same on any machine."""

    def __init__(self):
        self.start, self.t0 = GPT.flops_done, time.time()

    def summary(self, model, remeasure=False):
        """remeasure: take the host's rate again first (a stage's last summary, for done.json)."""
        flops, seconds = GPT.flops_done - self.start, max(time.time() - self.t0, 1e-9)
        peak = matmul_rate(model.config, next(model.parameters()).device, refresh=remeasure)
        return dict(
            model_gflop=round(flops / 1e9, 1),
            model_gflops_per_s=round(flops / seconds / 1e9, 2),
            matmul_gflops_per_s=round(peak / 1e9, 1),
            mfu=round(flops / seconds / peak, 3),
        )

    def line(self, model):
        m = self.summary(model)
        return f"{m['model_gflops_per_s']:.1f} GFLOP/s MFU {m['mfu']:.0%}"


def config_from_dict(d):
    return GPTConfig(**{f.name: d[f.name] for f in fields(GPTConfig) if f.name in d})
