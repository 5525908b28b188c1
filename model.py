"""
A small decoder-only transformer, written out in full so it reads in one sitting.

One config expresses two block flavours, so that real checkpoints can later be imported:
  GPT / BLOOM / XGLM style : LayerNorm, GELU MLP, learned positions      (norm="layernorm", mlp="gelu", pos="learned")
  Llama style              : RMSNorm, SwiGLU MLP, rotary positions, GQA (norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_head<n_head)

Padding: positions come from the attention mask (the i-th real token of a row has position i), and pad keys
are never attended, so a sequence gives the same outputs alone, left-padded or right-padded in a batch.
A key/value cache serves incremental decoding (`generate`) and scoring many continuations after one shared
prefix (`repeat_kv`, used by eval.py).

Hidden states: index 0 is the embedding output, index i the output of block i. The paper's pooler "last-1"
is the last real token of index 1, i.e. the output of the first block.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    max_seq_len: int = 512      # learned positions table size; also the longest sequence accepted
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0          # 0 = n_head; fewer gives grouped-query attention (Llama 2/3 style)
    d_model: int = 256
    d_ff: int = 0               # 0 = 4 * d_model for GELU, the usual 8/3 * d_model (rounded to 64) for SwiGLU
    norm: str = "layernorm"     # "layernorm" | "rmsnorm"
    mlp: str = "gelu"           # "gelu" | "swiglu"
    pos: str = "learned"        # "learned" | "rope"
    rope_theta: float = 10000.0
    bias: bool = True           # biases in linear layers and LayerNorm (GPT-2 yes, Llama no)
    tie_embeddings: bool = True # output head shares the token embedding matrix
    dropout: float = 0.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        if min(self.n_head, self.n_kv_head) <= 0:
            raise ValueError(f"ModelConfig: n_head and n_kv_head must be positive, got {self.n_head}, {self.n_kv_head}")
        if not self.d_ff:
            self.d_ff = 4 * self.d_model if self.mlp == "gelu" else 64 * math.ceil(8 * self.d_model / 3 / 64)
        checks = [
            (self.norm in ("layernorm", "rmsnorm"), f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}"),
            (self.mlp in ("gelu", "swiglu"), f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}"),
            (self.pos in ("learned", "rope"), f"pos must be 'learned' or 'rope', got {self.pos!r}"),
            (self.d_model % self.n_head == 0, f"d_model={self.d_model} is not divisible by n_head={self.n_head}"),
            (self.n_head % self.n_kv_head == 0, f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}"),
            (self.pos != "rope" or (self.d_model // self.n_head) % 2 == 0, "rope needs an even head size"),
            (min(self.vocab_size, self.max_seq_len, self.n_layer, self.d_model) > 0, "sizes must be positive"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"ModelConfig: {msg}")


@dataclass
class ModelOutput:
    logits: torch.Tensor | None               # (B, T, V), or (N, V) with logits_at; None when not computed
    hidden_states: tuple | None               # n_run + 1 tensors (B, T, D), when asked for
    past_kv: list | None                      # per block (k, v), each (B, n_kv_head, S, head_dim), when use_cache


def make_norm(cfg):
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def rope_angles(positions, head_dim, theta, dtype=torch.float32):
    """cos, sin of the rotary angles pos * theta^(-2i/head_dim), each (B, 1, T, head_dim), in at least fp32."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim)
    angles = positions.to(dtype)[..., None] * inv_freq        # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]     # (B, 1, T, head_dim), the half-split layout of Llama
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # rotate pairs (x_i, x_{i+d/2}) by the angle of their frequency
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.to(cos.dtype) * cos + rotated.to(cos.dtype) * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.d_model // cfg.n_head
        self.q = nn.Linear(cfg.d_model, cfg.n_head * self.head_dim, bias=cfg.bias)
        self.k = nn.Linear(cfg.d_model, cfg.n_kv_head * self.head_dim, bias=cfg.bias)
        self.v = nn.Linear(cfg.d_model, cfg.n_kv_head * self.head_dim, bias=cfg.bias)
        self.o = nn.Linear(cfg.n_head * self.head_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, attn_mask, rope, past, q_from=0):
        """q_from > 0: queries (and outputs) for positions q_from.. only; keys and values for all."""
        B, T, _ = x.shape
        Tq = T - q_from
        q = self.q(x[:, q_from:]).view(B, Tq, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, Tq, hd)
        k = self.k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)   # (B, Hkv, T, hd)
        v = self.v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *(r[:, :, q_from:] for r in rope)), apply_rope(k, *rope)
        if past is not None:                                   # keys/values of earlier tokens
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).reshape(B, Tq, self.n_head * self.head_dim)
        return self.resid_dropout(self.o(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias) if self.swiglu else None
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        h = F.silu(self.gate(x)) * self.up(x) if self.swiglu else F.gelu(self.up(x))
        return self.dropout(self.down(h))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.attn = make_norm(cfg), Attention(cfg)
        self.norm2, self.mlp = make_norm(cfg), MLP(cfg)

    def forward(self, x, attn_mask, rope, past, q_from=0):
        a, present = self.attn(self.norm1(x), attn_mask, rope, past, q_from)
        x = x[:, q_from:] + a
        return x + self.mlp(self.norm2(x)), present


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2: scale the projections into the residual stream by 1/sqrt(2 * n_layer) so its variance stays put
        for name, p in self.named_parameters():
            if name.endswith(("attn.o.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, input_ids, attention_mask=None, *, past_kv=None, use_cache=False,
                output_hidden_states=False, n_layers=None, compute_logits=True, logits_at=None):
        """
        input_ids      (B, T) token ids of the new tokens.
        attention_mask (B, S) 1 = real token, 0 = pad, over the cached and the new tokens (S = past + T);
                       None = all real.
        past_kv        the `past_kv` of an earlier call, to continue after it.
        n_layers       run only the first n_layers blocks (hidden states only, no logits): the contrastive
                       term needs nothing above its pooling layer.
        logits_at      (B, T) bool: compute the logits at these positions only, returned as (N, V) in row-major
                       order; the head and softmax over prompt tokens whose next token carries no loss are waste,
                       and so is the top block's output before the first such column (keys and values excepted).
        """
        B, T = input_ids.shape
        past_len = 0 if past_kv is None else past_kv[0][0].shape[2]
        S = past_len + T
        n_run = self.cfg.n_layer if n_layers is None else n_layers
        if not 0 <= n_run <= self.cfg.n_layer:
            raise ValueError(f"n_layers={n_layers} is out of range 0..{self.cfg.n_layer}")
        if attention_mask is not None and attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, S)} "
                             f"(past {past_len} + new {T} tokens)")
        # positions count real tokens only, so pads (even mid-sequence) do not count towards the limit
        longest = S if attention_mask is None or S <= self.cfg.max_seq_len else int(attention_mask.sum(1).max())
        if longest > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {longest} exceeds max_seq_len={self.cfg.max_seq_len}")

        # Without pads and cache the plain causal kernel applies; otherwise build (B, 1, T, S) explicitly.
        if attention_mask is None or (past_kv is None and bool(attention_mask.all())):
            attn_mask = None if past_len == 0 else torch.ones(T, S, dtype=torch.bool, device=input_ids.device).tril(past_len)
            positions = torch.arange(past_len, S, device=input_ids.device).expand(B, T)
        else:
            real = attention_mask.bool()
            positions = (real.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]             # (B, T)
            slot = torch.arange(S, device=input_ids.device)
            causal = slot[None, :] <= slot[past_len:, None]                                  # (T, S)
            attn_mask = causal & real[:, None, None, :]                                      # (B, 1, T, S)
            # a pad query would see no key at all and softmax to NaN; let it see itself (its output is unused)
            attn_mask = attn_mask | (slot[None, :] == slot[past_len:, None])

        x = self.tok_emb(input_ids)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        else:
            rope = rope_angles(positions, self.cfg.d_model // self.cfg.n_head, self.cfg.rope_theta,
                               torch.promote_types(x.dtype, torch.float32))
        x = self.drop(x)

        # With logits_at, the top block's output is read nowhere before the first logit column: there it only
        # needs keys and values, so its queries, output projection and MLP start at that column.
        q_from = 0
        if logits_at is not None and compute_logits and n_run == self.cfg.n_layer \
                and not (output_hidden_states or use_cache) and bool(logits_at.any()):
            q_from = int(logits_at.any(0).nonzero()[0])
            full = attn_mask if attn_mask is not None else \
                torch.ones(T, S, dtype=torch.bool, device=input_ids.device).tril(past_len)
            top_mask = full[..., q_from:, :]                    # (B, 1, T - q_from, S) or (T - q_from, S)

        hidden = [x] if output_hidden_states else None
        present = [] if use_cache else None
        for i, block in enumerate(self.blocks[:n_run]):
            past = None if past_kv is None else past_kv[i]
            if q_from and i == n_run - 1:
                x, kv = block(x, top_mask, rope, past, q_from)      # (B, T - q_from, D)
            else:
                x, kv = block(x, attn_mask, rope, past)
            if use_cache:
                present.append(kv)
            if output_hidden_states:
                hidden.append(x)

        logits = None
        if compute_logits and n_run == self.cfg.n_layer:
            logits = self.head(self.norm_f(x if logits_at is None else x[logits_at[:, q_from:]]))
        return ModelOutput(logits, tuple(hidden) if hidden is not None else None, present)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, attention_mask=None, temperature=0.0, top_k=None,
                 eos_id=None, generator=None):
        """Greedy (temperature 0) or sampled decoding with the KV cache. Prompts must be left-padded.
        Rows that produced eos_id keep emitting eos_id. Returns (B, T + new) token ids."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("generate needs left-padded prompts: the last column of attention_mask must be all 1")
        out = self(input_ids, attention_mask, use_cache=True)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        new_tokens = []
        for _ in range(max_new_tokens):
            logits = out.logits[:, -1].float()                                   # (B, V)
            if temperature <= 0:
                token = logits.argmax(-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                token = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
            if eos_id is not None:
                token = token.masked_fill(done, eos_id)
                done |= token == eos_id
            new_tokens.append(token)
            if eos_id is not None and bool(done.all()):
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(token), 1)], dim=1)
            out = self(token[:, None], attention_mask, past_kv=out.past_kv, use_cache=True)
        return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1) if new_tokens else input_ids

    def num_params(self, non_embedding=True):
        """Parameter count; by default without the embedding tables (the usual figure for scaling laws).
        A tied head is counted once, with the embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + (self.pos_emb.weight.numel() if self.pos_emb is not None else 0)
        return n

    def flops_per_token(self, seq_len, training=True):
        """Matmul FLOPs per token (PaLM appendix B): 2 per weight of every linear layer including the output
        head, plus 2 * 2 * seq_len * d_model per block for the attention scores and the weighted sum;
        a backward pass costs twice the forward, so training is 3x."""
        matmul_weights = sum(m.weight.numel() for m in self.blocks.modules() if isinstance(m, nn.Linear))
        matmul_weights += self.head.weight.numel()
        forward = 2 * matmul_weights + 4 * self.cfg.n_layer * seq_len * self.cfg.d_model
        return 3 * forward if training else forward


def repeat_kv(past_kv, n):
    """A cache of batch 1 repeated n times (a view, no copy): one shared prefix, n continuations."""
    return [(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in past_kv]


def load_model(ckpt_dir, device="cpu"):
    """The Decoder saved by train.py in ckpt_dir (config.json + model.pt)."""
    ckpt_dir = Path(ckpt_dir)
    for name in ("config.json", "model.pt"):
        if not (ckpt_dir / name).is_file():
            raise FileNotFoundError(f"{ckpt_dir}: not a checkpoint directory (missing {name})")
    cfg = ModelConfig(**json.loads((ckpt_dir / "config.json").read_text())["model"])
    model = Decoder(cfg)
    model.load_state_dict(torch.load(ckpt_dir / "model.pt", map_location=device, weights_only=True))
    return model.to(device)
