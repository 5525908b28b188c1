"""Tests for model.py: a naive reference forward, gradcheck, padding, KV cache, generate, counts, config checks."""

import dataclasses
import json
import math

import pytest
import torch

from conftest import random_weights_
from model import Decoder, HeadLoss, ModelConfig, load_model, repeat_kv

V = 64
# ours, and the switches of the real families (hf.py) on our own weights: "qwen" also carries Llama 3's RoPE scaling
FLAVOURS = ["gpt", "llama", "xglm", "bloom", "qwen"]
LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=16)


def make_cfg(flavour, **kw):
    args = dict(vocab_size=V, max_seq_len=32, n_layer=2, n_head=4, d_model=32)
    if flavour in ("llama", "qwen"):
        args.update(norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_head=2, bias=False, tie_embeddings=False)
    if flavour == "qwen":
        args.update(qkv_bias=True, rope_theta=1e6, rope_scaling=LLAMA3_SCALING, norm_eps=1e-6)
    if flavour == "xglm":
        args.update(pos="sinusoidal", pos_offset=2, embed_scale=math.sqrt(32))
    if flavour == "bloom":
        args.update(pos="alibi", mlp="gelu_tanh", embed_norm=True)
    args.update(kw)
    return ModelConfig(**args)


def make_model(flavour, seed=0, **kw):
    """A model with all parameters random and O(1) scores (init leaves biases 0, norms 1, attention ~uniform)."""
    torch.manual_seed(seed)
    return random_weights_(Decoder(make_cfg(flavour, **kw)).eval(), 0.2)


def pad_batch(seqs, side):
    """Pad 1-D id tensors to one (B, L) batch on `side`; pad slots get random ids (they must not matter)."""
    L = max(len(s) for s in seqs)
    ids = torch.randint(V, (len(seqs), L))
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(L - len(s), L) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    return ids, mask


# ---------------------------------------------------------------- naive reference, one sequence at a time

def ref_norm(cfg, norm, x):
    if cfg.norm == "layernorm":
        mu = x.mean(-1, keepdim=True)
        y = (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + cfg.norm_eps) * norm.weight
        return y + norm.bias if norm.bias is not None else y
    return x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + cfg.norm_eps) * norm.weight


def ref_linear(lin, x):
    y = x @ lin.weight.T
    return y + lin.bias if lin.bias is not None else y


def ref_inv_freq(i, hd, theta, scaling):
    """theta^(-2i/hd), with Llama 3's piecewise rescaling by wavelength when scaling is given."""
    f = theta ** (-2 * i / hd)
    if not scaling:
        return f
    wavelen, old = 2 * math.pi / f, scaling["original_max_position_embeddings"]
    if wavelen < old / scaling["high_freq_factor"]:
        return f
    if wavelen > old / scaling["low_freq_factor"]:
        return f / scaling["factor"]
    s = (old / wavelen - scaling["low_freq_factor"]) / (scaling["high_freq_factor"] - scaling["low_freq_factor"])
    return (1 - s) * f / scaling["factor"] + s * f


def ref_rope(x, theta, scaling=None):
    """x (T, hd): rotate the pair (x_i, x_{i+hd/2}) at position t by t * inv_freq_i, as a complex product."""
    T, hd = x.shape
    half = hd // 2
    angles = torch.tensor([[t * ref_inv_freq(i, hd, theta, scaling) for i in range(half)] for t in range(T)],
                          dtype=torch.float64)
    z = torch.complex(x[:, :half], x[:, half:]) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([z.real, z.imag], dim=-1)


def ref_forward(model, ids):
    """ids (T,) -> logits (T, V), [hidden states (T, D)] for an unpadded sequence, from the model's parameters."""
    cfg = model.cfg
    T, H, Hkv = len(ids), cfg.n_head, cfg.n_kv_head
    hd = cfg.d_model // H
    x = model.tok_emb.weight[ids] * cfg.embed_scale
    if cfg.pos == "learned":
        x = x + model.pos_emb.weight[:T]
    if cfg.pos == "sinusoidal":                                  # [sin(p w_i), cos(p w_i)] at p = t + offset
        half = cfg.d_model // 2
        w = [math.exp(-i * math.log(10000) / (half - 1)) for i in range(half)]
        p = [t + cfg.pos_offset for t in range(T)]
        x = x + torch.tensor([[math.sin(q * wi) for wi in w] + [math.cos(q * wi) for wi in w] for q in p],
                             dtype=x.dtype)
    if cfg.embed_norm:
        x = ref_norm(cfg, model.embed_norm, x)
    hidden = [x]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for blk in model.blocks:
        h = ref_norm(cfg, blk.norm1, x)
        q, k, v = ref_linear(blk.attn.q, h), ref_linear(blk.attn.k, h), ref_linear(blk.attn.v, h)
        heads = []
        for j in range(H):
            g = j // (H // Hkv)                                   # kv head shared by this query head
            qj, kj, vj = q[:, j * hd:(j + 1) * hd], k[:, g * hd:(g + 1) * hd], v[:, g * hd:(g + 1) * hd]
            if cfg.pos == "rope":
                qj, kj = ref_rope(qj, cfg.rope_theta, cfg.rope_scaling), ref_rope(kj, cfg.rope_theta, cfg.rope_scaling)
            scores = qj @ kj.T / math.sqrt(hd)
            if cfg.pos == "alibi":                               # -slope_j * distance (H a power of 2 here)
                dist = torch.arange(T)[:, None] - torch.arange(T)[None, :]
                scores = scores - 2 ** (-8 * (j + 1) / H) * dist
            scores = scores.masked_fill(~causal, float("-inf"))
            heads.append(torch.softmax(scores, dim=-1) @ vj)
        x = x + ref_linear(blk.attn.o, torch.cat(heads, dim=-1))
        h = ref_norm(cfg, blk.norm2, x)
        if cfg.mlp == "swiglu":
            g = ref_linear(blk.mlp.gate, h)
            a = g * torch.sigmoid(g) * ref_linear(blk.mlp.up, h)
        elif cfg.mlp == "gelu_tanh":
            u = ref_linear(blk.mlp.up, h)
            a = 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
        else:
            u = ref_linear(blk.mlp.up, h)
            a = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))
        x = x + ref_linear(blk.mlp.down, a)
        hidden.append(x)
    hidden[-1] = ref_norm(cfg, model.norm_f, x)                  # the last hidden state is after the final norm
    w_out = model.tok_emb.weight if cfg.tie_embeddings else model.head.weight
    return hidden[-1] @ w_out.T, hidden


@pytest.mark.parametrize("pad", [None, "left", "right"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_forward_matches_naive_reference_float64(flavour, pad):
    model = make_model(flavour).double()
    seqs = [torch.randint(V, (10,)), torch.randint(V, (7,))]
    if pad is None:
        seqs[1] = torch.randint(V, (10,))
        ids, mask = torch.stack(seqs), None
    else:
        ids, mask = pad_batch(seqs, pad)
    out = model(ids, mask, output_hidden_states=True)
    assert len(out.hidden_states) == model.cfg.n_layer + 1
    for b, s in enumerate(seqs):
        real = slice(None) if mask is None else mask[b].bool()
        ref_logits, ref_hidden = ref_forward(model, s)
        torch.testing.assert_close(out.logits[b, real], ref_logits, atol=1e-10, rtol=0)
        for i in range(model.cfg.n_layer + 1):
            torch.testing.assert_close(out.hidden_states[i][b, real], ref_hidden[i], atol=1e-10, rtol=0)


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("flavour", FLAVOURS)
def test_gradcheck_float64(flavour):
    model = make_model(flavour, n_layer=1, d_model=8, n_head=2, n_kv_head=1 if flavour == "llama" else 0,
                       vocab_size=11, d_ff=16).double()
    ids, mask = pad_batch([torch.randint(11, (4,)), torch.randint(11, (3,))], "left")
    ids = ids % 11
    params = dict(model.named_parameters())

    def logits_of(q_weight, tok_emb):
        p = {**params, "blocks.0.attn.q.weight": q_weight, "tok_emb.weight": tok_emb}
        return torch.func.functional_call(model, p, (ids, mask)).logits[mask.bool()]

    inputs = (params["blocks.0.attn.q.weight"].detach().clone().requires_grad_(),
              params["tok_emb.weight"].detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(logits_of, inputs)


# ---------------------------------------------------------------- padding

@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_padding_invariance(flavour, side):
    model = make_model(flavour)
    target = torch.randint(V, (6,))
    alone = model(target[None], output_hidden_states=True)
    ids, mask = pad_batch([torch.randint(V, (9,)), target, torch.randint(V, (3,))], side)
    out = model(ids, mask, output_hidden_states=True)
    real = mask[1].bool()
    torch.testing.assert_close(out.logits[1, real], alone.logits[0], atol=1e-5, rtol=0)
    for h_batch, h_alone in zip(out.hidden_states, alone.hidden_states, strict=True):
        torch.testing.assert_close(h_batch[1, real], h_alone[0], atol=1e-5, rtol=0)
        assert torch.isfinite(h_batch).all()
    assert torch.isfinite(out.logits).all()


# ---------------------------------------------------------------- KV cache

@pytest.mark.parametrize("chunks", [[1] * 9, [3, 1, 4, 1]])
@pytest.mark.parametrize("pad", [None, "left"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_kv_cache_matches_full_forward(flavour, pad, chunks):
    model = make_model(flavour)
    if pad is None:
        ids, mask = torch.randint(V, (2, 9)), None
    else:
        ids, mask = pad_batch([torch.randint(V, (9,)), torch.randint(V, (4,)), torch.randint(V, (6,))], "left")
    full = model(ids, mask).logits
    past, start, steps = None, 0, []
    for n in chunks:
        m = None if mask is None else mask[:, :start + n]
        out = model(ids[:, start:start + n], m, past_kv=past, use_cache=True)
        past, start = out.past_kv, start + n
        steps.append(out.logits)
    assert len(past) == model.cfg.n_layer
    assert past[0][0].shape == (ids.shape[0], model.cfg.n_kv_head, ids.shape[1], model.cfg.d_model // model.cfg.n_head)
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_repeat_kv_prefix_scoring(flavour):
    model = make_model(flavour)
    prefix = torch.randint(V, (5,))
    conts = [torch.randint(V, (3,)), torch.randint(V, (6,)), torch.randint(V, (1,))]
    past = model(prefix[None], use_cache=True).past_kv
    ids, cmask = pad_batch(conts, "right")
    mask = torch.cat([torch.ones(len(conts), len(prefix), dtype=torch.long), cmask], dim=1)
    out = model(ids, mask, past_kv=repeat_kv(past, len(conts)))
    assert torch.isfinite(out.logits).all()
    for b, c in enumerate(conts):
        full = model(torch.cat([prefix, c])[None]).logits[0, len(prefix):]
        torch.testing.assert_close(out.logits[b, :len(c)], full, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- generate

def naive_greedy(model, prompt, n):
    ids = prompt[None]
    for _ in range(n):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_generate_greedy_matches_naive_loop(flavour):
    model = make_model(flavour).double()
    prompts = [torch.randint(V, (5,)), torch.randint(V, (2,)), torch.randint(V, (4,))]
    ids, mask = pad_batch(prompts, "left")
    out = model.generate(ids, 6, attention_mask=mask)
    assert out.shape == (3, ids.shape[1] + 6)
    assert torch.equal(out[:, :ids.shape[1]], ids)
    for b, p in enumerate(prompts):
        assert torch.equal(out[b, ids.shape[1]:], naive_greedy(model, p, 6))
    # sampling restricted to the top token is greedy
    assert torch.equal(model.generate(ids, 6, attention_mask=mask, temperature=1.0, top_k=1), out)


def test_generate_eos():
    model = make_model("gpt").double()
    ids, mask = pad_batch([torch.randint(V, (5,)), torch.randint(V, (3,))], "left")
    greedy = model.generate(ids, 6, attention_mask=mask)[:, ids.shape[1]:]
    eos = int(greedy[0, 1])
    out = model.generate(ids, 6, attention_mask=mask, eos_id=eos)[:, ids.shape[1]:]
    for b in range(2):
        hits = (greedy[b] == eos).nonzero()
        first = int(hits[0]) if len(hits) else out.shape[1]
        assert torch.equal(out[b, :first + 1], greedy[b, :first + 1][:out.shape[1]])
        assert (out[b, first:] == eos).all()       # after eos: eos again
    # every row done: generation stops early
    first_tok = int(greedy[0, 0])
    assert model.generate(ids[:1, -5:], 6, eos_id=first_tok).shape == (1, 6)


def test_generate_rejects_right_padding():
    model = make_model("gpt")
    ids, mask = pad_batch([torch.randint(V, (5,)), torch.randint(V, (3,))], "right")
    with pytest.raises(ValueError, match="generate needs left-padded prompts"):
        model.generate(ids, 2, attention_mask=mask)


# ---------------------------------------------------------------- partial runs, counts

@pytest.mark.parametrize("flavour", FLAVOURS)
def test_n_layers_partial_run(flavour):
    model = make_model(flavour, n_layer=3)
    ids, mask = pad_batch([torch.randint(V, (7,)), torch.randint(V, (4,))], "left")
    full = model(ids, mask, output_hidden_states=True)
    for k in range(4):
        out = model(ids, mask, output_hidden_states=True, n_layers=k)
        assert len(out.hidden_states) == k + 1
        for a, b in zip(out.hidden_states, full.hidden_states[:k + 1]):
            assert torch.equal(a, b)
        assert (out.logits is None) == (k < 3)
    for k in (-1, 4):
        with pytest.raises(ValueError, match=rf"n_layers={k} is out of range 0\.\.3"):
            model(ids, mask, n_layers=k)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_num_params_and_flops(flavour):
    model = make_model(flavour)
    cfg = model.cfg
    unique = {id(p): p.numel() for _, p in model.named_parameters(remove_duplicate=False)}
    assert model.num_params(non_embedding=False) == sum(unique.values())
    assert (model.head.weight is model.tok_emb.weight) == cfg.tie_embeddings
    emb = cfg.vocab_size * cfg.d_model + (cfg.max_seq_len * cfg.d_model if cfg.pos == "learned" else 0)
    assert model.num_params() == sum(unique.values()) - emb

    hd = cfg.d_model // cfg.n_head
    attn = 2 * cfg.d_model * cfg.d_model + 2 * cfg.d_model * cfg.n_kv_head * hd
    mlp = (3 if cfg.mlp == "swiglu" else 2) * cfg.d_model * cfg.d_ff
    weights = cfg.n_layer * (attn + mlp) + cfg.vocab_size * cfg.d_model
    T = 16
    train = 6 * weights + 12 * cfg.n_layer * T * cfg.d_model
    assert model.flops_per_token(T) == train
    assert model.flops_per_token(T, training=False) * 3 == train


# ---------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("kw, message", [
    (dict(norm="foo"), "norm must be 'layernorm' or 'rmsnorm', got 'foo'"),
    (dict(mlp="foo"), "mlp must be 'gelu', 'gelu_tanh' or 'swiglu', got 'foo'"),
    (dict(pos="foo"), "pos must be 'learned', 'sinusoidal', 'rope' or 'alibi', got 'foo'"),
    (dict(d_model=30), "d_model=30 is not divisible by n_head=4"),
    (dict(n_kv_head=3), "n_head=4 is not divisible by n_kv_head=3"),
    (dict(pos="rope", d_model=12), "rope needs an even head size"),          # head size 3
    (dict(n_layer=0), "sizes must be positive"), (dict(vocab_size=0), "sizes must be positive"),
    (dict(n_head=0), "n_head and n_kv_head must be positive, got 0, 0"),
])
def test_bad_config_raises(kw, message):
    with pytest.raises(ValueError, match=f"^ModelConfig: {message}$"):
        make_cfg("gpt", **kw)


def test_bad_inputs_raise():
    model = make_model("gpt", max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randint(V, (1, 9)))
    past = model(torch.randint(V, (1, 6)), use_cache=True).past_kv
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randint(V, (1, 3)), past_kv=past)
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.randint(V, (2, 5)), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):           # must cover past + new tokens
        model(torch.randint(V, (1, 2)), torch.ones(1, 2, dtype=torch.long), past_kv=past)


# ---------------------------------------------------------------- dropout, checkpoints

@pytest.mark.parametrize("flavour", FLAVOURS)
def test_dropout_train_vs_eval(flavour):
    model = make_model(flavour, dropout=0.2)
    ids = torch.randint(V, (2, 8))
    a, b = model(ids).logits, model(ids).logits
    assert torch.equal(a, b)
    model.train()
    c = model(ids).logits
    model.eval()
    assert not torch.allclose(a, c)
    assert torch.equal(model(ids).logits, a)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_load_model_round_trip(flavour, tmp_path):
    model = make_model(flavour)
    (tmp_path / "config.json").write_text(json.dumps({"model": dataclasses.asdict(model.cfg)}))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    loaded = load_model(tmp_path)
    assert loaded.cfg == model.cfg
    ids, mask = pad_batch([torch.randint(V, (7,)), torch.randint(V, (4,))], "left")
    assert torch.equal(loaded.eval()(ids, mask).logits, model(ids, mask).logits)
    (tmp_path / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match="model.pt"):
        load_model(tmp_path)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_logits_at_selects_positions(flavour):
    """logits_at computes the head only where asked: the same rows as the full logits, in row-major order."""
    model = make_model(flavour).eval()
    ids = torch.randint(3, model.cfg.vocab_size, (3, 7))
    at = torch.rand(3, 7) < 0.4
    at[0, 2] = True
    full = model(ids).logits
    picked = model(ids, logits_at=at).logits
    assert picked.shape == (int(at.sum()), model.cfg.vocab_size)
    torch.testing.assert_close(picked, full[at], rtol=0, atol=1e-5)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_logits_at_after_cache(flavour):
    """logits_at on new tokens after a KV cache, with and without a mask: the same logits as the full call."""
    model = make_model(flavour).double()
    ids = torch.randint(3, model.cfg.vocab_size, (2, 9))
    at = torch.zeros(2, 4, dtype=torch.bool)
    at[:, 2:] = True
    for mask in (None, torch.ones_like(ids)):
        past = model(ids[:, :5], None if mask is None else mask[:, :5], use_cache=True).past_kv
        picked = model(ids[:, 5:], mask, past_kv=past, logits_at=at).logits
        torch.testing.assert_close(picked, model(ids, mask).logits[:, 5:][at], rtol=0, atol=1e-10)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_targets_give_the_chunked_head_loss_float64(flavour):
    """forward(targets=...) equals the cross-entropy of the full logits at logits_at, loss and gradients, when
    HeadLoss makes its logits 3 rows at a time and when it makes them at once; under no_grad it takes none."""
    model = make_model(flavour).double()
    ids, mask = pad_batch([torch.randint(V, (10,)), torch.randint(V, (6,))], "right")
    at = mask.bool() & (torch.rand(ids.shape) < 0.7)
    at[0, 1] = True
    targets = torch.randint(V, (int(at.sum()),))
    results = []
    for chunk in (3 * V, 10 ** 9, None):
        model.zero_grad()
        model.head_chunk = chunk or model.head_chunk
        loss = torch.nn.functional.cross_entropy(model(ids, mask).logits[at], targets) if chunk is None \
            else model(ids, mask, logits_at=at, targets=targets).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    for loss, grads in results[:2]:
        torch.testing.assert_close(loss, results[2][0], rtol=0, atol=1e-12)
        for a, b in zip(grads, results[2][1]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    model.head_chunk = 3 * V
    asked = []
    real_forward = HeadLoss.forward
    HeadLoss.forward = staticmethod(lambda ctx, *a: asked.append(a[-1]) or real_forward(ctx, *a))
    try:
        with torch.no_grad():
            loss = model(ids, mask, logits_at=at, targets=targets).loss
    finally:
        HeadLoss.forward = staticmethod(real_forward)
    torch.testing.assert_close(loss, results[2][0], rtol=0, atol=1e-12)
    assert asked == [False]                                           # no gradients taken for nothing
    with pytest.raises(ValueError, match="logits_at"):
        model(ids, mask, targets=targets)


def test_head_loss_dtypes_and_a_single_backward():
    """bf16 hidden states and an fp32 head: the loss in fp32, each gradient in its input's dtype; a second
    backward through the same graph is refused, not silently wrong."""
    x = torch.randn(5, 8, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    t = torch.randint(11, (5,))
    loss = HeadLoss.apply(x, w, t, 2, True)
    ref = torch.nn.functional.cross_entropy(x.double() @ w.double().T, t, reduction="sum")
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 1e-3 * ref.item()
    loss.backward(retain_graph=True)
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    with pytest.raises(RuntimeError, match="runs once"):
        loss.backward()


@pytest.mark.parametrize("flavour", ["gpt", "bloom"])
def test_grad_checkpointing_same_gradients_float64(flavour):
    model = make_model(flavour, dropout=0.1).double().train()
    ids, mask = pad_batch([torch.randint(V, (9,)), torch.randint(V, (5,))], "left")
    grads, calls = [], []
    model.blocks[0].attn.q.register_forward_hook(lambda *_: calls.append(1))   # the block stops early when remade
    for on in (False, True):
        model.grad_checkpointing = on
        model.zero_grad()
        calls.clear()
        torch.manual_seed(3)                                            # the same dropout masks
        model(ids, mask).logits[mask.bool()].sin().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        assert len(calls) == (2 if on else 1)                           # recomputed in the backward
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
