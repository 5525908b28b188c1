"""
A decoder-only transformer, written out in full so it reads in one sitting.

One config expresses the models we pretrain here and five families of real checkpoints (hf.py maps their
weights). Every family is pre-norm: x + attn(norm(x)), then x + mlp(norm(x)). What differs, as in the public
transformers source of each family:

  family   norm       MLP              positions                         other
  gpt2     LayerNorm  GELU (tanh)      learned table                     fused, transposed qkv (Conv1D)
  xglm     LayerNorm  GELU (exact)     sinusoids, row p + 2 for pos p    token embeddings * sqrt(d_model)
  bloom    LayerNorm  GELU (tanh)      ALiBi biases on the scores        LayerNorm right after the embeddings
  llama    RMSNorm    SwiGLU           RoPE (llama3 frequency scaling)   no biases, grouped-query attention
  qwen2    RMSNorm    SwiGLU           RoPE, theta 1e6                   biases on q, k, v only
  ours     "gpt": LayerNorm, exact GELU, learned positions; "llama": RMSNorm, SwiGLU, RoPE

Padding: positions come from the attention mask (the i-th real token of a row has position i; ALiBi reads the
same positions for its keys), and pad keys are never attended, so a sequence gives the same outputs alone,
left-padded or right-padded in a batch. A key/value cache serves incremental decoding (`generate`) and scoring
many continuations after one shared prefix (`repeat_kv`, used by eval.py).

Hidden states, indexed as transformers' output_hidden_states: index 0 is the embedding output (after BLOOM's
embedding LayerNorm), index i the output of block i, and the last one passes through the final norm. The
paper's pooler "last-1" is the last real token of index 1, i.e. the output of the first block.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


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
    mlp: str = "gelu"           # "gelu" (exact) | "gelu_tanh" (the tanh approximation) | "swiglu"
    pos: str = "learned"        # "learned" | "sinusoidal" | "rope" | "alibi"
    pos_offset: int = 0         # sinusoidal: position p reads row p + pos_offset (XGLM: 2)
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", factor, low_freq_factor, high_freq_factor,
                                      #  original_max_position_embeddings} (Llama 3.1/3.2), None = plain RoPE
    embed_scale: float = 1.0    # token embeddings are multiplied by this (XGLM: sqrt(d_model))
    embed_norm: bool = False    # a norm right after the embeddings (BLOOM)
    bias: bool = True           # biases in linear layers and LayerNorm (GPT-2 yes, Llama no)
    qkv_bias: bool | None = None  # biases on q, k, v when they differ from `bias` (Qwen2: True with bias False)
    tie_embeddings: bool = True # output head shares the token embedding matrix
    dropout: float = 0.0
    norm_eps: float = 1e-5
    model_type: str = ""        # the Hugging Face family this config was read from (hf.py); "" = pretrained here

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        if min(self.n_head, self.n_kv_head) <= 0:
            raise ValueError(f"ModelConfig: n_head and n_kv_head must be positive, got {self.n_head}, {self.n_kv_head}")
        if not self.d_ff:
            self.d_ff = 4 * self.d_model if self.mlp != "swiglu" else 64 * math.ceil(8 * self.d_model / 3 / 64)
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        checks = [
            (self.norm in ("layernorm", "rmsnorm"), f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}"),
            (self.mlp in ("gelu", "gelu_tanh", "swiglu"),
             f"mlp must be 'gelu', 'gelu_tanh' or 'swiglu', got {self.mlp!r}"),
            (self.pos in ("learned", "sinusoidal", "rope", "alibi"),
             f"pos must be 'learned', 'sinusoidal', 'rope' or 'alibi', got {self.pos!r}"),
            (self.d_model % self.n_head == 0, f"d_model={self.d_model} is not divisible by n_head={self.n_head}"),
            (self.n_head % self.n_kv_head == 0, f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}"),
            (self.pos != "rope" or (self.d_model // self.n_head) % 2 == 0, "rope needs an even head size"),
            (rope_type in ("default", "llama3"), f"rope_scaling type {rope_type!r} is not supported (default, llama3)"),
            (self.pos != "sinusoidal" or self.d_model >= 4, "sinusoidal positions need d_model >= 4"),
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
    loss: torch.Tensor | None = None          # mean cross-entropy at logits_at, when targets are given


def make_norm(cfg):
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


# --------------------------------------------------------------------------------------------------------
# Positions: each a function of the (B, T) positions that the attention mask gives

def sinusoids(positions, dim, offset, dtype=torch.float32):
    """XGLM's (fairseq's) table row p + offset: [sin(p w_0..), cos(p w_0..)], w_i = 10000^(-i / (dim/2 - 1)),
    a zero column appended for odd dim. (B, T, dim), in at least fp32 (transformers builds the table in fp32)."""
    half = dim // 2
    w = torch.exp(torch.arange(half, device=positions.device, dtype=dtype) * -(math.log(10000) / (half - 1)))
    angles = (positions + offset).to(dtype)[..., None] * w                  # (B, T, half)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return F.pad(emb, (0, dim % 2))


def rope_inv_freq(head_dim, theta, scaling, device, dtype):
    """theta^(-2i/head_dim), and Llama 3's rescaling: wavelengths beyond original_max / low_freq_factor are
    stretched by `factor`, those below original_max / high_freq_factor kept, the band between interpolated."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim)
    if not scaling or scaling.get("rope_type", "default") == "default":
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen - low) / (high - low)).clamp(0, 1)         # 0 beyond the low band, 1 below the high
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_angles(positions, head_dim, theta, scaling=None, dtype=torch.float32):
    """cos, sin of the rotary angles pos * inv_freq_i, each (B, 1, T, head_dim), in at least fp32."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling, positions.device, dtype)
    angles = positions.to(dtype)[..., None] * inv_freq        # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)[:, None]     # (B, 1, T, head_dim), the half-split layout of Llama
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # rotate pairs (x_i, x_{i+d/2}) by the angle of their frequency
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.to(cos.dtype) * cos + rotated.to(cos.dtype) * sin).type_as(x)


def alibi_slopes(n_head):
    """ALiBi's head slopes (Press et al. 2022): 2^(-8i/n) for i = 1..n when n is a power of 2; otherwise those of
    the largest power of 2 below n, then every other slope of twice that many heads (as BLOOM does)."""
    def powers(n):
        return [2 ** (-8 * i / n) for i in range(1, n + 1)]
    p = 2 ** math.floor(math.log2(n_head))
    return torch.tensor(powers(p) + powers(2 * p)[0::2][:n_head - p], dtype=torch.float64)


# --------------------------------------------------------------------------------------------------------
# Blocks

class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.d_model // cfg.n_head
        qkv_bias = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
        self.q = nn.Linear(cfg.d_model, cfg.n_head * self.head_dim, bias=qkv_bias)
        self.k = nn.Linear(cfg.d_model, cfg.n_kv_head * self.head_dim, bias=qkv_bias)
        self.v = nn.Linear(cfg.d_model, cfg.n_kv_head * self.head_dim, bias=qkv_bias)
        self.o = nn.Linear(cfg.n_head * self.head_dim, cfg.d_model, bias=cfg.bias)
        self.dropout_p = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, attn_mask, rope, past):
        """attn_mask: None (plain causal), bool (allowed keys) or float (added to the scores: ALiBi)."""
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)      # (B, H, T, hd)
        k = self.k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)   # (B, Hkv, T, hd)
        v = self.v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if past is not None:                                   # keys/values of earlier tokens
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(q.dtype)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
            dropout_p=self.dropout_p if self.training else 0.0, enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.o(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.kind = cfg.mlp
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias) if cfg.mlp == "swiglu" else None
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        if self.kind == "swiglu":
            h = F.silu(self.gate(x)) * self.up(x)
        else:
            h = F.gelu(self.up(x), approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.dropout(self.down(h))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.attn = make_norm(cfg), Attention(cfg)
        self.norm2, self.mlp = make_norm(cfg), MLP(cfg)

    def forward(self, x, attn_mask, rope, past):
        a, present = self.attn(self.norm1(x), attn_mask, rope, past)
        x = x + a
        return x + self.mlp(self.norm2(x)), present


class HeadLoss(torch.autograd.Function):
    """sum_n -log softmax(x_n W^T)[t_n] for x (N, D), W (V, D), made `rows` rows at a time. While a chunk's
    probabilities p are at hand, the forward also takes its gradients, dL/dx = (p - onehot(t)) W and
    dL/dW += (p - onehot(t))^T x, so no logits are kept or made again; the backward scales them in place, so
    it runs once (no retain_graph, no second order). `grads`: whether to take them (False under no_grad)."""

    @staticmethod
    def forward(ctx, x, weight, targets, rows, grads):
        ctx.dtypes, ctx.done = (x.dtype, weight.dtype), False
        dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
        x, w = x.to(dtype), weight.to(dtype)
        grads = grads and any(ctx.needs_input_grad[:2])
        grad_x, grad_w = (torch.zeros_like(x), torch.zeros_like(w)) if grads else (None, None)
        total = x.new_zeros(())
        for s in range(0, len(x), rows):
            xs, ts = x[s:s + rows], targets[s:s + rows]
            logits = xs @ w.T                                                   # (rows, V)
            lse = logits.logsumexp(-1)
            total += (lse - logits.gather(1, ts[:, None])[:, 0]).sum()
            if grads:
                p = logits.sub_(lse[:, None]).exp_()                             # softmax, in place
                p[torch.arange(len(ts), device=p.device), ts] -= 1
                grad_x[s:s + rows] = p @ w
                grad_w.addmm_(p.T, xs)
        ctx.save_for_backward(grad_x, grad_w)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        if ctx.done:
            raise RuntimeError("HeadLoss: its backward runs once (retain_graph is not supported)")
        ctx.done = True
        grad_x, grad_w = ctx.saved_tensors
        return grad_x.mul_(grad).to(ctx.dtypes[0]), grad_w.mul_(grad).to(ctx.dtypes[1]), None, None, None


# --------------------------------------------------------------------------------------------------------
# The decoder

class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.embed_norm = make_norm(cfg) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.grad_checkpointing = False  # recompute each block in the backward instead of storing its activations
        self.head_chunk = 2 ** 25        # logits per chunk in head_loss: 128 MB in fp32
        self.apply(self._init_weights)
        # GPT-2: scale the projections into the residual stream by 1/sqrt(2 * n_layer) so its variance stays put
        for name, p in self.named_parameters():
            if name.endswith(("attn.o.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def tie_weights(self):
        """Share the embedding matrix with the head again (loading with assign=True replaces it). Returns self."""
        if self.cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        return self

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, input_ids, attention_mask=None, *, past_kv=None, use_cache=False,
                output_hidden_states=False, n_layers=None, compute_logits=True, logits_at=None, targets=None):
        """
        input_ids      (B, T) token ids of the new tokens.
        attention_mask (B, S) 1 = real token, 0 = pad, over the cached and the new tokens (S = past + T);
                       None = all real.
        past_kv        the `past_kv` of an earlier call, to continue after it.
        n_layers       run only the first n_layers blocks (hidden states only, no logits): the contrastive
                       term needs nothing above its pooling layer.
        logits_at      (B, T) bool: compute the logits at these positions only, returned as (N, V) in row-major
                       order; at a real vocabulary (250k) the head over prompt tokens that carry no loss is the
                       largest waste of the instruction rows.
        targets        (N,) the next token at each logits_at position: returns their mean cross-entropy as
                       `loss` (head_loss), and no logits.
        """
        n_run = self.blocks_to_run(n_layers, logits_at, targets)
        positions, attn_mask, rope = self.encode_positions(input_ids, attention_mask, past_kv)
        x = self.embed(input_ids, positions)                                    # (B, T, D)

        hidden = [x] if output_hidden_states else None
        present = [] if use_cache else None
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks[:n_run]):
            args = (x, attn_mask, rope, None if past_kv is None else past_kv[i])
            x, kv = checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)
            if use_cache:
                present.append(kv)
            if output_hidden_states:
                hidden.append(x)

        if n_run < self.cfg.n_layer:                  # a partial run ends below the final norm and the head
            return ModelOutput(None, tuple(hidden) if output_hidden_states else None, present)
        x = self.norm_f(x)                            # the last hidden state is the normed one, as in transformers
        if output_hidden_states:
            hidden[-1] = x
        hidden = tuple(hidden) if output_hidden_states else None
        if targets is not None:
            return ModelOutput(None, hidden, present, self.head_loss(x[logits_at], targets))
        logits = self.head(x if logits_at is None else x[logits_at]) if compute_logits else None  # (B, T, V) or (N, V)
        return ModelOutput(logits, hidden, present)

    def blocks_to_run(self, n_layers, logits_at, targets):
        """How many blocks forward runs; refuses a loss it could not compute."""
        n_run = self.cfg.n_layer if n_layers is None else n_layers
        if not 0 <= n_run <= self.cfg.n_layer:
            raise ValueError(f"n_layers={n_layers} is out of range 0..{self.cfg.n_layer}")
        if targets is not None and n_run < self.cfg.n_layer:
            raise ValueError("targets need every block: the loss is read at the output head")
        if targets is not None and logits_at is None:
            raise ValueError("targets need logits_at: the positions whose next token they are")
        return n_run

    def encode_positions(self, input_ids, attention_mask, past_kv):
        """Where the new tokens are, in the three forms the model reads it: positions (B, T) for the embeddings;
        attn_mask for scaled_dot_product_attention, None for the plain causal case, else bool (B or 1, 1, T, S),
        or float (B, H, T, S) with ALiBi's biases; rope (cos, sin) or None."""
        past_len = 0 if past_kv is None else past_kv[0][0].shape[2]            # tokens already in the cache
        key_pos, attn_mask = self.key_positions_and_mask(input_ids, attention_mask, past_len)
        positions = key_pos[:, past_len:]
        dtype = torch.promote_types(self.tok_emb.weight.dtype, torch.float32)   # angles, biases: fp32 at least
        rope = None
        if self.cfg.pos == "rope":
            rope = rope_angles(positions, self.cfg.d_model // self.cfg.n_head, self.cfg.rope_theta,
                               self.cfg.rope_scaling, dtype)
        elif self.cfg.pos == "alibi":
            # slope_h * key position: within a query's row this equals -slope_h * distance up to a constant,
            # which softmax ignores (BLOOM's formulation, so that it reads positions from the mask)
            T, S = input_ids.shape[1], key_pos.shape[1]
            if attn_mask is None:
                attn_mask = torch.ones(T, S, dtype=torch.bool, device=input_ids.device).tril(past_len)
            slopes = alibi_slopes(self.cfg.n_head).to(input_ids.device, dtype)
            bias = slopes[None, :, None, None] * key_pos[:, None, None, :].to(dtype)    # (B, H, 1, S)
            attn_mask = bias.masked_fill(~attn_mask, float("-inf"))                      # (B, H, T, S)
        return positions, attn_mask, rope

    def key_positions_and_mask(self, input_ids, attention_mask, past_len):
        """The position of every key, cached and new (B, S), and which keys each new token sees: None for the
        plain causal case, else bool, (T, S) with a cache and no padding, (B, 1, T, S) with padding."""
        B, T = input_ids.shape
        S, dev = past_len + T, input_ids.device
        if attention_mask is not None and attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, S)} "
                             f"(past {past_len} + new {T} tokens)")
        # positions count real tokens only, so pads (even mid-sequence) do not count towards the limit
        longest = S if attention_mask is None or S <= self.cfg.max_seq_len else int(attention_mask.sum(1).max())
        if longest > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {longest} exceeds max_seq_len={self.cfg.max_seq_len}")

        if attention_mask is None or (past_len == 0 and bool(attention_mask.all())):
            # no pads: the plain causal case, or after a cache the causal band shifted right by past_len
            band = None if past_len == 0 else torch.ones(T, S, dtype=torch.bool, device=dev).tril(past_len)
            return torch.arange(S, device=dev).expand(B, S), band
        real = attention_mask.bool()
        key_pos = (real.long().cumsum(-1) - 1).clamp(min=0)                              # (B, S)
        slot = torch.arange(S, device=dev)
        causal = slot[None, :] <= slot[past_len:, None]                                  # (T, S)
        # a pad query would see no key at all and softmax to NaN; let it see itself (its output is unused)
        allowed = (causal & real[:, None, None, :]) | (slot[None, :] == slot[past_len:, None])  # (B, 1, T, S)
        return key_pos, allowed

    def embed(self, input_ids, positions):
        """The input of the first block (B, T, D): token embeddings times embed_scale, plus learned or sinusoidal
        positions (RoPE and ALiBi act in the attention instead), then BLOOM's embedding norm."""
        x = self.tok_emb(input_ids)
        if self.cfg.embed_scale != 1.0:
            x = x * self.cfg.embed_scale
        if self.cfg.pos == "learned":
            x = x + self.pos_emb(positions)
        elif self.cfg.pos == "sinusoidal":
            dtype = torch.promote_types(x.dtype, torch.float32)
            x = x + sinusoids(positions, self.cfg.d_model, self.cfg.pos_offset, dtype).to(x.dtype)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return self.drop(x)

    def head_loss(self, x, targets):
        """Mean cross-entropy of the head's logits at hidden states x (N, D) against targets (N,), in at least fp32
        (TF32 matmuls on CUDA). At a 250k vocabulary the (N, V) logits and their gradient would dominate the
        step's memory: HeadLoss makes them for head_chunk logits' worth of rows at a time."""
        rows = max(1, self.head_chunk // self.cfg.vocab_size)
        with torch.autocast(x.device.type, enabled=False):
            return HeadLoss.apply(x, self.head.weight, targets, rows, torch.is_grad_enabled()) / len(targets)

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
    """The Decoder in ckpt_dir: a checkpoint of train.py (config.json + model.pt), or a Hugging Face checkpoint
    directory of a supported family (config.json with its model_type, *.safetensors or pytorch_model.bin)."""
    import hf  # late: hf.py imports this file
    ckpt_dir = Path(ckpt_dir)
    if hf.is_hf_checkpoint(ckpt_dir):
        return hf.load_hf_model(ckpt_dir, device)
    for name in ("config.json", "model.pt"):
        if not (ckpt_dir / name).is_file():
            raise FileNotFoundError(f"{ckpt_dir}: not a checkpoint directory (missing {name})")
    try:
        cfg = ModelConfig(**json.loads((ckpt_dir / "config.json").read_text())["model"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt_dir / 'config.json'}: not a model config of train.py ({e})") from None
    with torch.device("meta"):                                  # no time spent on a random init
        model = Decoder(cfg)
    try:
        model.load_state_dict(torch.load(ckpt_dir / "model.pt", map_location=device, weights_only=True), assign=True)
    except Exception as e:  # truncated, foreign or mismatched: torch raises several kinds
        raise CheckpointError(f"{ckpt_dir / 'model.pt'}: does not load as the model of its config.json "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return model.tie_weights().to(device)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as this Decoder (ours or a Hugging Face one); the message names the file."""
