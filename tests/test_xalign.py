"""Tests for xalign.py: naive loop references, gradients, the tiled loss, pooling, 2-process gloo, GradCache,
afp_loss, bad inputs."""

import ast
import math
import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # flat layout: xalign.py and model.py live in the repo root

import xalign  # noqa: E402
from conftest import random_weights_  # noqa: E402
from model import Decoder, ModelConfig  # noqa: E402


# --------------------------------------------------------------------------------------------------------
# Naive references, written with explicit Python loops

def naive_cos(a, b):
    """cos(a, b) by the formula, norms floored at 1e-8 as F.normalize does."""
    na = torch.sqrt((a * a).sum()).clamp_min(1e-8)
    nb = torch.sqrt((b * b).sum()).clamp_min(1e-8)
    return (a * b).sum() / (na * nb)


def naive_lse(terms):
    m = max(t.item() for t in terms)
    return m + torch.log(sum(torch.exp(t - m) for t in terms))


def naive_info_nce(x, y, temperature=0.05, symmetric=False, hard=None, w=0.0, groups=None):
    """L = -(1/B) sum_i log(exp(s_ii) / (sum_{j kept} exp(s_ij) + sum_j exp(h_ij))), one row at a time."""
    B = x.shape[0]

    def one_way(rows, cols, hard_cols):
        total = 0
        for i in range(B):
            terms = []
            for j in range(B):
                if groups is not None and j != i and int(groups[i]) == int(groups[j]):
                    continue                                   # a duplicate of row i: not a negative
                terms.append(naive_cos(rows[i], cols[j]) / temperature)
            if hard_cols is not None:
                for j in range(B):
                    terms.append(naive_cos(rows[i], hard_cols[j]) / temperature + (w if i == j else 0.0))
            total = total + naive_lse(terms) - naive_cos(rows[i], cols[i]) / temperature
        return total / B

    loss = one_way(x, y, hard)
    if symmetric:
        loss = (loss + one_way(y, x, None)) / 2
    return loss


def naive_last(hidden, mask):
    rows = []
    for b in range(hidden.shape[0]):
        t = max(i for i in range(mask.shape[1]) if mask[b, i])
        rows.append(hidden[b, t])
    return torch.stack(rows)


def naive_mean(hidden, mask):
    rows = []
    for b in range(hidden.shape[0]):
        ts = [i for i in range(mask.shape[1]) if mask[b, i]]
        rows.append(sum(hidden[b, t] for t in ts) / len(ts))
    return torch.stack(rows)


def naive_clm(logits, labels):
    """-(1/|R|) sum over labelled positions t >= 1 of log softmax(logits[t-1])[labels[t]]."""
    total, count = 0, 0
    for n in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if int(labels[n, t]) != -100:
                row = logits[n, t - 1].double()
                total = total - (row[labels[n, t]] - naive_lse(list(row)))
                count += 1
    return total / count


def rand_pairs(B=6, D=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=dtype)
    y = x + 1.5 * torch.randn(B, D, generator=g, dtype=dtype)   # positives correlated: loss away from log B
    h = torch.randn(B, D, generator=g, dtype=dtype)
    return x, y, h


def r32(t):
    """The float32 rounding of t, back in float64: what info_nce actually computes with."""
    return t.float().double()


GROUPS = torch.tensor([0, 1, 0, 2, 1, 3])
CASES = {
    "default": dict(),
    "symmetric": dict(symmetric=True),
    "hard": dict(hard=True, w=0.7),
    "hard_w0": dict(hard=True, w=0.0),
    "groups": dict(groups=GROUPS),
    "all": dict(symmetric=True, hard=True, w=-0.3, groups=GROUPS, temperature=0.1),
}


def naive_case(x, y, h, case):
    kw = dict(CASES[case])
    use_hard = kw.pop("hard", False)
    return naive_info_nce(x, y, hard=h if use_hard else None, **kw)


def call_both(x, y, h, case):
    """(info_nce(...), naive_info_nce(...) on the float32 rounding of the inputs) for one of CASES."""
    kw = dict(CASES[case])
    use_hard = kw.pop("hard", False)
    w = kw.pop("w", 0.0)
    ours = xalign.info_nce(x, y, hard_negatives=h if use_hard else None, hard_negative_weight=w, **kw)
    return ours, naive_case(r32(x), r32(y), r32(h), case)


# --------------------------------------------------------------------------------------------------------
# 1, 2. info_nce against the naive loop: values and gradients

@pytest.mark.parametrize("case", list(CASES))
def test_info_nce_equals_naive_loop(case):
    # float32 inputs (what a model gives) are computed in float32: the float64 reference is evaluated on their
    # values and the tolerance is float32's (1e-5). float64 inputs stay float64: float64's tolerance, 1e-10.
    x, y, h = rand_pairs()
    ours, ref = call_both(x.float(), y.float(), h.float(), case)
    assert ours.dtype == torch.float32
    assert abs(ours.item() - ref.item()) < 1e-5, (case, ours.item(), ref.item())
    assert ref.item() > 0.05                                    # a non-trivial value was compared
    ours64, _ = call_both(x, y, h, case)
    assert ours64.dtype == torch.float64
    assert abs(ours64.item() - naive_case(x, y, h, case).item()) < 1e-10


def test_info_nce_options_change_the_value():
    # the cases above are not all the same number: each option really acts
    x, y, h = rand_pairs()
    values = {case: call_both(x, y, h, case)[0].item() for case in CASES}
    assert len({round(v, 6) for v in values.values()}) == len(values), values
    # unique group ids mask nothing: identical to no groups
    assert xalign.info_nce(x, y, groups=torch.arange(6)).item() == xalign.info_nce(x, y).item()


@pytest.mark.parametrize("case", ["default", "symmetric", "hard", "groups", "all"])
def test_info_nce_gradients(case):
    # (a) central finite differences of the float64 naive loss (no autograd in the reference), tolerance 1e-5;
    # (b) autograd of the naive loss on the same values, 1e-5. (float64 inputs are computed in float64, so
    # test_info_nce_gradcheck below checks info_nce's own gradients to float64 precision as well.)
    x, y, h = rand_pairs(B=6, D=5, seed=1)
    x, y, h = (r32(t).requires_grad_() for t in (x, y, h))
    ours, _ = call_both(x, y, h, case)
    gx, gy, gh = torch.autograd.grad(ours, (x, y, h), allow_unused=True, materialize_grads=True)

    _, ref = call_both(x, y, h, case)
    rx, ry, rh = torch.autograd.grad(ref, (x, y, h), allow_unused=True, materialize_grads=True)

    eps = 1e-6
    for t, g, r in ((x, gx, rx), (y, gy, ry), (h, gh, rh)):
        fd = torch.zeros_like(t)
        with torch.no_grad():
            for idx in range(t.numel()):
                flat = t.view(-1)
                old = flat[idx].item()
                flat[idx] = old + eps                           # float64 throughout (x, y, h are float32 values)
                up = naive_case(x, y, h, case).item()
                flat[idx] = old - eps
                down = naive_case(x, y, h, case).item()
                flat[idx] = old
                fd.view(-1)[idx] = (up - down) / (2 * eps)
        torch.testing.assert_close(g.double(), fd, rtol=0, atol=1e-5)
        torch.testing.assert_close(g.double(), r, rtol=0, atol=1e-5)
    assert gy.abs().max() > 1e-2                                # non-trivial gradients were compared


def test_info_nce_dtypes():
    # half precisions are computed in float32, float64 stays float64
    x, y, _ = rand_pairs(B=4, D=8, dtype=torch.float32)
    for dtype, out in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                       (torch.float32, torch.float32), (torch.float64, torch.float64)):
        assert xalign.info_nce(x.to(dtype), y.to(dtype)).dtype == out, dtype
    assert xalign.info_nce(x.bfloat16(), y.double()).dtype == torch.float64


# --------------------------------------------------------------------------------------------------------
# 2b. the tiled loss (tile_size) equals the untiled one

TILES = [1, 3, 4, 6, 7]                                         # B = 6: divides it, does not, B, more than B


def info_nce_case(x, y, h, case, **extra):
    kw = dict(CASES[case])
    use_hard, w = kw.pop("hard", False), kw.pop("w", 0.0)
    return xalign.info_nce(x, y, hard_negatives=h if use_hard else None, hard_negative_weight=w, **kw, **extra)


def leaves(*tensors):
    return tuple(t.detach().clone().requires_grad_() for t in tensors)


def loss_and_grads(inputs, fn):
    loss = fn(*inputs)
    return (loss, *torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("case", list(CASES))
def test_tiled_equals_untiled(case, dtype, tol):
    inputs = tuple(t.to(dtype).requires_grad_() for t in rand_pairs())
    ref = loss_and_grads(inputs, lambda x, y, h: info_nce_case(x, y, h, case))
    assert ref[0].item() > 0.05 and ref[2].abs().max() > 1e-2   # non-trivial values are compared
    for tile in TILES:
        out = loss_and_grads(inputs, lambda x, y, h: info_nce_case(x, y, h, case, tile_size=tile))
        assert out[0].dtype == dtype
        for name, a, b in zip(("loss", "dx", "dy", "dh"), out, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=tol, msg=lambda m: f"tile {tile}, {name}: {m}")


@pytest.mark.parametrize("tile", [None, 4])
@pytest.mark.parametrize("case", ["symmetric", "hard", "all"])
def test_info_nce_gradcheck(case, tile):
    # float64 stays float64, so both paths' gradients can be checked against finite differences to gradcheck's
    # tolerances (the tiled path's backward is written by hand)
    inputs = tuple(t.requires_grad_() for t in rand_pairs(B=6, D=4, seed=2))
    assert torch.autograd.gradcheck(lambda x, y, h: info_nce_case(x, y, h, case, tile_size=tile), inputs)


def test_tiled_edge_cases():
    x, y, _ = rand_pairs(B=6, D=8, seed=4, dtype=torch.float64)
    # duplicates: at tile 1, row 1's first tile (column 0, its duplicate) is masked whole: its running
    # log-sum-exp must stay -inf there (logaddexp(-inf, -inf)), not become nan
    for groups in (torch.zeros(6, dtype=torch.long), torch.tensor([0, 0, 1, 1, 2, 2])):
        for tile in (1, 4):
            a, b = (loss_and_grads(leaves(x, y), lambda x, y: xalign.info_nce(
                x, y, groups=groups, symmetric=True, tile_size=t)) for t in (tile, None))
            assert torch.isfinite(a[0]) and torch.isfinite(a[1]).all()
            for u, v in zip(a, b):
                torch.testing.assert_close(u, v, rtol=0, atol=1e-10)
    # one group: only the positive is left, the loss is 0
    assert abs(xalign.info_nce(x, y, groups=torch.zeros(6, dtype=torch.long), tile_size=4).item()) < 1e-12
    # logits up to 100 in float32, large norms, zero vectors
    x32, y32 = (1e4 * x).float(), (1e4 * y).float()
    x32[1] = 0
    for tile in (1, 4):
        a, b = (loss_and_grads(leaves(x32, y32), lambda x, y: xalign.info_nce(
            x, y, temperature=0.01, symmetric=True, tile_size=t)) for t in (tile, None))
        assert torch.isfinite(a[1]).all() and a[0].item() > 1.0
        for u, v in zip(a, b):                                  # the zero row's gradient is ~1e8 (the eps): rtol
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def test_tiled_bf16_inputs_computed_in_float32():
    x, y, _ = rand_pairs(B=8, D=32, seed=3, dtype=torch.float32)
    xb = x.bfloat16().requires_grad_()
    yb = y.bfloat16().requires_grad_()
    a, b = (loss_and_grads((xb, yb), lambda x, y: xalign.info_nce(x, y, temperature=0.01, tile_size=t))
            for t in (3, None))
    assert a[0].dtype == torch.float32 and a[1].dtype == a[2].dtype == torch.bfloat16
    assert abs(a[0].item() - b[0].item()) < 1e-5
    for u, v in zip(a[1:], b[1:]):                              # float32 gradients within 1e-5, then rounded to bf16
        torch.testing.assert_close(u, v)


class LargestTensor(TorchDispatchMode):
    """Notes the most elements of any tensor an op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_tiled_never_builds_a_large_tensor():
    # B = 64 pairs of D = 8, tile 16: every tensor of the tiled loss and its backward, the (B, D) inputs and
    # gradients included, has at most B * D = 512 elements; a (B, tile) slab would have 1,024, the logits 4,096
    B, D = 64, 8
    g = torch.Generator().manual_seed(0)
    x, y, h = (torch.randn(B, D, generator=g, requires_grad=True) for _ in range(3))
    groups = torch.randint(0, 20, (B,), generator=g)
    sizes = {}
    for tile in (16, None):
        with LargestTensor() as seen:
            loss = xalign.info_nce(x, y, symmetric=True, hard_negatives=h, hard_negative_weight=0.3, groups=groups,
                                   tile_size=tile)
            loss.backward()
        sizes[tile] = seen.numel
    assert sizes[16] == B * D
    assert sizes[None] >= B * B                                 # the untiled path, seen by the same probe


def test_tiled_bad_tile_size():
    x = torch.randn(4, 3)
    for tile in (0, -1, 1.5, "8", True):
        with pytest.raises(ValueError, match="tile_size must be an int >= 1"):
            xalign.info_nce(x, x, tile_size=tile)
    calls = []
    with pytest.raises(ValueError, match="tile_size must be an int >= 1"):   # before any chunk is embedded
        xalign.cached_info_nce(lambda t: calls.append(t) or t, x, x, chunk_size=2, tile_size=0)
    assert calls == []
    tau = torch.tensor(0.05, requires_grad=True)
    with pytest.raises(ValueError, match="fixed temperature"):
        xalign.info_nce(x, x, temperature=tau, tile_size=2)


def test_tiled_and_plain_compute_in_fp32_under_autocast():
    """Under bf16 autocast (train.py's on CUDA) both paths still compute the logits in fp32: they agree with
    each other and with fp32 outside autocast, at tau 0.01 where bf16 logits would differ visibly."""
    x, y, _ = rand_pairs(B=16, D=32, seed=5, dtype=torch.float32)
    want = xalign.info_nce(x, y, temperature=0.01)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = xalign.info_nce(x, y, temperature=0.01)
        tiled = xalign.info_nce(x, y, temperature=0.01, tile_size=5)
    assert plain.dtype == tiled.dtype == torch.float32
    assert abs(plain.item() - want.item()) < 1e-5 and abs(tiled.item() - want.item()) < 1e-5


def test_tiled_hard_weight_minus_infinity_drops_the_own_hard_negative():
    x, y, h = rand_pairs(B=6, D=8, seed=6)
    plain = xalign.info_nce(x, y, hard_negatives=h, hard_negative_weight=float("-inf"))
    tiled = xalign.info_nce(x, y, hard_negatives=h, hard_negative_weight=float("-inf"), tile_size=4)
    assert torch.isfinite(plain) and abs(plain.item() - tiled.item()) < 1e-10


# --------------------------------------------------------------------------------------------------------
# 3. pool

def masks(kind, B=4, T=6):
    lengths = [6, 3, 1, 4][:B]
    m = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        if kind == "left":
            m[b, T - n:] = 1
        elif kind == "right":
            m[b, :n] = 1
        elif kind == "none":
            m[b] = 1
        else:                                                   # pads on both sides and inside
            m[b, 1:1 + n] = 1 if n < T - 1 else 0
            m[b, 0] = 1
    return m


@pytest.mark.parametrize("kind", ["left", "right", "none", "mixed"])
def test_pool_equals_picking_by_hand(kind):
    torch.manual_seed(0)
    hidden = torch.randn(4, 6, 5, dtype=torch.float64)
    m = masks(kind)
    assert torch.equal(xalign.pool(hidden, m, "last"), naive_last(hidden, m))
    assert torch.equal(xalign.pool(hidden, m), naive_last(hidden, m))              # "last" is the default
    assert torch.equal(xalign.pool(hidden, m.bool(), "last"), naive_last(hidden, m))
    torch.testing.assert_close(xalign.pool(hidden, m, "mean"), naive_mean(hidden, m), rtol=0, atol=1e-12)
    if kind != "none":                                                              # masks actually matter
        assert not torch.allclose(xalign.pool(hidden, m, "mean"), hidden.mean(1))


@pytest.mark.parametrize("mode", ["last", "mean"])
def test_pool_gradcheck(mode):
    # pool keeps the input dtype, so a float64 gradcheck is meaningful here
    torch.manual_seed(0)
    hidden = torch.randn(4, 6, 3, dtype=torch.float64, requires_grad=True)
    m = masks("mixed")
    assert torch.autograd.gradcheck(lambda h: xalign.pool(h, m, mode), (hidden,))


def test_pool_bad_inputs():
    hidden = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="no real token"):
        xalign.pool(hidden, torch.tensor([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="no real token"):
        xalign.pool(hidden, torch.tensor([[1, 1, 0], [0, 0, 0]]), "mean")
    with pytest.raises(ValueError, match="mode"):
        xalign.pool(hidden, torch.ones(2, 3), "max")
    with pytest.raises(ValueError, match="attention_mask"):
        xalign.pool(hidden, torch.ones(2, 4))


# --------------------------------------------------------------------------------------------------------
# 4. two processes (gloo) equal one process with all the pairs

DIST_B, DIST_DIN, DIST_D = 4, 6, 5
DIST_GROUPS = torch.tensor([0, 1, 0, 3, 5, 1, 6, 3])           # duplicates within a rank and across ranks
DIST_CONFIGS = {
    "plain": dict(),
    "symmetric": dict(symmetric=True),
    "groups": dict(groups=True),
    "hard": dict(hard=True, hard_negative_weight=0.5),
    "all": dict(symmetric=True, groups=True, hard=True, hard_negative_weight=-0.2, temperature=0.1),
    "cached": dict(cached=True, symmetric=True, groups=True, hard=True, hard_negative_weight=0.5),
    "tiled": dict(tile_size=3),                                 # 3 divides neither B = 4 nor W*B = 8
    "tiled_all": dict(tile_size=3, symmetric=True, groups=True, hard=True, hard_negative_weight=-0.2,
                      temperature=0.1),
    "tiled_cached": dict(tile_size=3, cached=True, symmetric=True, groups=True, hard=True, hard_negative_weight=0.5),
}


def dist_loss(lin, data, rows, cfg):
    """The loss of one configuration on data rows `rows` (backward run inside for the cached variant)."""
    kw = dict(cfg)
    cached, use_hard, use_groups = kw.pop("cached", False), kw.pop("hard", False), kw.pop("groups", False)
    if use_groups:
        kw["groups"] = data["groups"][rows]
    x, y, h = data["x"][rows], data["y"][rows], data["h"][rows]
    if cached:
        return xalign.cached_info_nce(lin, x, y, chunk_size=3, hard_inputs=h if use_hard else None, **kw)
    loss = xalign.info_nce(lin(x), lin(y), hard_negatives=lin(h) if use_hard else None, **kw)
    loss.backward()
    return loss.detach()


def _dist_worker(rank, world, init_file, data_file, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        data = torch.load(data_file)
        rows = slice(rank * DIST_B, (rank + 1) * DIST_B)
        results = {}
        for name, cfg in DIST_CONFIGS.items():
            lin = nn.Linear(DIST_DIN, DIST_D)
            lin.load_state_dict(data["lin"])
            loss = dist_loss(lin, data, rows, cfg)
            dist.all_reduce(loss)
            grads = [p.grad.clone() for p in lin.parameters()]
            for g in grads:                                     # what DDP does: average the gradients
                dist.all_reduce(g)
                g /= world
            results[name] = (loss / world, grads)
        if rank == 0:
            torch.save(results, out_file)
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process(tmp_path):
    torch.manual_seed(0)
    n = 2 * DIST_B
    x = torch.randn(n, DIST_DIN)
    y = x + 0.7 * torch.randn(n, DIST_DIN)
    first = {}
    for i, g in enumerate(DIST_GROUPS.tolist()):                # rows of a group are real duplicates
        j = first.setdefault(g, i)
        x[i], y[i] = x[j], y[j]
    data = dict(x=x, y=y, h=torch.randn(n, DIST_DIN), groups=DIST_GROUPS,
                lin=nn.Linear(DIST_DIN, DIST_D).state_dict())
    torch.save(data, tmp_path / "data.pt")
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "data.pt"), str(tmp_path / "out.pt")),
             nprocs=2, join=True)
    results = torch.load(tmp_path / "out.pt")

    assert not (dist.is_available() and dist.is_initialized())
    assert results["groups"][0].item() < results["plain"][0].item() - 0.1     # the duplicates' masking matters
    for name, cfg in DIST_CONFIGS.items():
        lin = nn.Linear(DIST_DIN, DIST_D)
        lin.load_state_dict(data["lin"])
        loss = dist_loss(lin, data, slice(0, n), cfg)
        d_loss, d_grads = results[name]
        assert abs(d_loss.item() - loss.item()) < 1e-6, (name, d_loss.item(), loss.item())
        for p, g in zip(lin.parameters(), d_grads):
            torch.testing.assert_close(g, p.grad, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
            assert p.grad.abs().max() > 1e-3
    for tiled, untiled in (("tiled", "plain"), ("tiled_all", "all"), ("tiled_cached", "cached")):
        assert abs(results[tiled][0].item() - results[untiled][0].item()) < 1e-6, tiled
        for g, ref in zip(results[tiled][1], results[untiled][1]):
            torch.testing.assert_close(g, ref, rtol=0, atol=1e-5, msg=lambda m: f"{tiled}: {m}")


# --------------------------------------------------------------------------------------------------------
# 5. cached_info_nce (GradCache) equals the plain loss, dropout on

def small_model(seed=0, dropout=0.0, n_layer=2, V=40):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, max_seq_len=32, n_layer=n_layer, n_head=2, d_model=16, dropout=dropout)
    return random_weights_(Decoder(cfg), 0.3)


def token_batch(B, T, V, seed, left=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, T), generator=g)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        if left and b % 2:
            mask[b, T - n:] = 1
        else:
            mask[b, :n] = 1
    return ids.masked_fill(mask == 0, 0), mask


def layer1_embed(model):
    def embed(ids, mask):
        out = model(ids, mask, output_hidden_states=True, n_layers=1, compute_logits=False)
        return xalign.pool(out.hidden_states[1], mask)
    return embed


def plain_chunked(embed, inputs, chunk):
    """One forward with a graph, chunk after chunk in the order cached_info_nce uses (on CPU, dropout masks
    depend on how the batch is cut, so this is the plain computation the cached one must reproduce)."""
    ids, mask = inputs
    return torch.cat([embed(i, m) for i, m in zip(ids.split(chunk), mask.split(chunk))])


@pytest.mark.parametrize("chunk", [1, 3, 8])
@pytest.mark.parametrize("with_hard", [False, True])
def test_cached_info_nce_equals_plain(chunk, with_hard):
    B = 5
    model = small_model(dropout=0.1).train()
    embed = layer1_embed(model)
    xs, ys, hs = (token_batch(B, 7, 40, seed=s, left=True) for s in (1, 2, 3))
    kw = dict(temperature=0.1, symmetric=True, groups=torch.tensor([0, 1, 2, 0, 4]))
    if with_hard:
        kw["hard_negative_weight"] = 0.4

    torch.manual_seed(123)
    zx, zy = plain_chunked(embed, xs, chunk), plain_chunked(embed, ys, chunk)
    zh = plain_chunked(embed, hs, chunk) if with_hard else None
    ref = xalign.info_nce(zx, zy, hard_negatives=zh, **kw)
    ref.backward()
    state_after_plain = torch.get_rng_state()
    ref_grads = {k: p.grad for k, p in model.named_parameters()}
    assert ref_grads["blocks.0.attn.q.weight"].abs().max() > 1e-3
    assert ref_grads["blocks.1.attn.q.weight"] is None            # nothing above layer 1 was run
    model.zero_grad(set_to_none=True)

    torch.manual_seed(123)
    loss = xalign.cached_info_nce(embed, xs, ys, chunk, hard_inputs=hs if with_hard else None, **kw)
    assert not loss.requires_grad
    assert abs(loss.item() - ref.item()) < 1e-5
    for k, p in model.named_parameters():
        if ref_grads[k] is None:
            assert p.grad is None, k
        else:
            torch.testing.assert_close(p.grad, ref_grads[k], rtol=0, atol=1e-5, msg=lambda m: f"{k}: {m}")
    assert torch.equal(torch.get_rng_state(), state_after_plain)   # training stays reproducible

    # dropout is really on: another seed gives another loss (so the masks were replayed, not absent)
    torch.manual_seed(124)
    with torch.no_grad():
        other = xalign.info_nce(plain_chunked(embed, xs, chunk), plain_chunked(embed, ys, chunk),
                                hard_negatives=plain_chunked(embed, hs, chunk) if with_hard else None, **kw)
    assert abs(other.item() - ref.item()) > 1e-4


def test_cached_info_nce_tiled_equals_untiled():
    model = small_model(dropout=0.1).train()
    embed = layer1_embed(model)
    xs, ys, hs = (token_batch(5, 7, 40, seed=s, left=True) for s in (1, 2, 3))
    kw = dict(temperature=0.1, symmetric=True, groups=torch.tensor([0, 1, 2, 0, 4]), hard_negative_weight=0.4)
    runs = []
    for tile in (None, 2):
        torch.manual_seed(123)
        loss = xalign.cached_info_nce(embed, xs, ys, 3, hard_inputs=hs, tile_size=tile, **kw)
        runs.append((loss, {k: p.grad for k, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    (loss_t, grads_t), (loss_u, grads_u) = runs[1], runs[0]
    assert abs(loss_t.item() - loss_u.item()) < 1e-6
    assert grads_u["blocks.0.attn.q.weight"].abs().max() > 1e-3
    for k, g in grads_u.items():
        if g is None:
            assert grads_t[k] is None, k
        else:
            torch.testing.assert_close(grads_t[k], g, rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_cached_info_nce_bad_chunk_size():
    lin = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="chunk_size"):
        xalign.cached_info_nce(lin, torch.randn(4, 3), torch.randn(4, 3), chunk_size=0)


# --------------------------------------------------------------------------------------------------------
# 6, 7. afp_loss and clm_loss against the naive way

def afp_batch(V=40, B=3, N=2, seed=0):
    pair_ids, pair_mask = token_batch(2 * B, 5, V, seed=seed, left=True)
    g = torch.Generator().manual_seed(seed + 1)
    Li = 9
    instr_ids = torch.randint(1, V, (N, Li), generator=g)
    instr_mask = torch.ones(N, Li, dtype=torch.long)
    instr_mask[1, 7:] = 0                                       # row 1 right-padded
    instr_ids = instr_ids.masked_fill(instr_mask == 0, 0)
    labels = instr_ids.clone()
    labels[0, :4] = -100                                        # prompts
    labels[1, :3] = -100
    labels[instr_mask == 0] = -100
    return dict(pair_ids=pair_ids, pair_mask=pair_mask, instr_ids=instr_ids, instr_mask=instr_mask,
                instr_labels=labels)


def naive_afp(model, batch, cfg):
    """The authors' way, in one pass: pair rows right-padded to the instruction length and run with the
    instruction rows through the full decoder; pool by hand; shift and cross-entropy by hand."""
    pair_ids, pair_mask = batch["pair_ids"], batch["pair_mask"]
    ids, mask = batch["instr_ids"], batch["instr_mask"]
    L = max(pair_ids.shape[1], ids.shape[1])
    pad = lambda t: F.pad(t, (0, L - t.shape[1]))                                   # noqa: E731
    all_ids = torch.cat([pad(pair_ids), pad(ids)])
    all_mask = torch.cat([pad(pair_mask), pad(mask)])
    out = model(all_ids, all_mask, output_hidden_states=True)
    assert len(out.hidden_states) == model.cfg.n_layer + 1
    P = pair_ids.shape[0]
    h = out.hidden_states[cfg.layer][:P]
    z = (naive_last if cfg.pooling == "last" else naive_mean)(h, all_mask[:P])
    B = P // 2
    contrastive = xalign.info_nce(z[:B], z[B:], cfg.temperature, symmetric=cfg.symmetric,
                                  groups=batch.get("pair_groups"))
    labels = F.pad(batch["instr_labels"], (0, L - ids.shape[1]), value=-100)
    instruction = naive_clm(out.logits[P:], labels)
    return contrastive, instruction


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("layer", [0, 1, 3, -1])
def test_afp_loss_equals_naive(pooling, layer):
    model = small_model(n_layer=3)
    batch = afp_batch()
    cfg = xalign.AFPConfig(pooling=pooling, layer=layer)
    out = xalign.afp_loss(model, batch, cfg)
    out.total.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    c, i = naive_afp(model, batch, cfg)
    total = cfg.contrastive_weight * c + cfg.instruction_weight * i
    total.backward()
    assert abs(out.contrastive.item() - c.item()) < 1e-5
    assert abs(out.instruction.item() - i.item()) < 1e-5
    assert abs(out.total.item() - total.item()) < 1e-5
    assert not out.contrastive.requires_grad and not out.instruction.requires_grad
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads[k], p.grad.float(), rtol=0, atol=1e-5, msg=lambda m: f"{k}: {m}")
    assert c.item() > 0.05 and i.item() > 0.05


def test_afp_loss_defaults_and_options():
    cfg = xalign.AFPConfig()
    assert (cfg.temperature, cfg.pooling, cfg.layer, cfg.contrastive_weight, cfg.instruction_weight, cfg.symmetric) == \
        (0.05, "last", 1, 1.0, 1.5, False)
    model = small_model(n_layer=3)
    batch = dict(afp_batch(), pair_groups=torch.tensor([0, 1, 0]))
    cfg = xalign.AFPConfig(symmetric=True, temperature=0.2, contrastive_weight=0.7, instruction_weight=2.0)
    out = xalign.afp_loss(model, batch, cfg)
    c, i = naive_afp(model, batch, cfg)
    assert abs(out.contrastive.item() - c.item()) < 1e-5 and abs(out.instruction.item() - i.item()) < 1e-5
    assert abs(out.total.item() - (0.7 * c + 2.0 * i).item()) < 1e-5


@pytest.mark.parametrize("zero", ["contrastive_weight", "instruction_weight"])
def test_afp_loss_zero_weight_still_logs_the_other_part(zero):
    model = small_model(n_layer=3)
    batch = afp_batch()
    cfg = xalign.AFPConfig(**{zero: 0.0})
    out = xalign.afp_loss(model, batch, cfg)
    out.total.backward()
    grads = {k: p.grad for k, p in model.named_parameters()}       # None: no gradient reached it
    model.zero_grad(set_to_none=True)

    c, i = naive_afp(model, batch, cfg)
    assert abs(out.contrastive.item() - c.item()) < 1e-5            # the zero-weight part is logged all the same
    assert abs(out.instruction.item() - i.item()) < 1e-5
    assert c.item() > 0.05 and i.item() > 0.05
    kept = cfg.instruction_weight * i if zero == "contrastive_weight" else cfg.contrastive_weight * c
    assert abs(out.total.item() - kept.item()) < 1e-5
    kept.backward()
    for k, p in model.named_parameters():
        ours = torch.zeros_like(p) if grads[k] is None else grads[k]
        ref = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5, msg=lambda m: f"{k}: {m}")
    assert sum(g.abs().sum() for g in grads.values() if g is not None) > 1e-2


class Spy(nn.Module):
    """A DDP-like wrapper (the model under .module) noting, per call, whether the output carries a graph."""

    def __init__(self, model):
        super().__init__()
        self.module, self.calls = model, []

    def forward(self, *args, **kw):
        out = self.module(*args, **kw)
        t = out.loss if out.loss is not None else out.logits if out.logits is not None else out.hidden_states[-1]
        kind = "instr" if out.hidden_states is None else f"pairs through {len(out.hidden_states) - 1} blocks"
        self.calls.append((kind, t.requires_grad))
        return out


@pytest.mark.parametrize("contrastive_weight, instruction_weight", [(1.0, 1.5), (0.0, 1.5), (1.0, 0.0)])
def test_afp_loss_zero_weight_term_has_no_graph(contrastive_weight, instruction_weight):
    # a weight-0 term is computed for the log only: no graph, no wasted backward memory
    spy = Spy(small_model(n_layer=3))
    out = xalign.afp_loss(spy, afp_batch(), xalign.AFPConfig(contrastive_weight=contrastive_weight, instruction_weight=instruction_weight))
    assert spy.calls == [("pairs through 1 blocks", contrastive_weight != 0), ("instr", instruction_weight != 0)]
    assert out.total.requires_grad


def test_afp_loss_bad_inputs():
    model = small_model(n_layer=3)
    batch = afp_batch()
    for layer in (4, 10, -5):
        with pytest.raises(ValueError, match="out of range"):
            xalign.afp_loss(model, batch, xalign.AFPConfig(layer=layer))
    xalign.afp_loss(model, batch, xalign.AFPConfig(layer=-4))        # -4 = index 0 of a 3-block model: valid
    odd = dict(batch, pair_ids=batch["pair_ids"][:5], pair_mask=batch["pair_mask"][:5])
    with pytest.raises(ValueError, match="2B"):
        xalign.afp_loss(model, odd, xalign.AFPConfig())
    unlabelled = dict(batch, instr_labels=torch.full_like(batch["instr_labels"], -100))
    with pytest.raises(ValueError, match="-100"):
        xalign.afp_loss(model, unlabelled, xalign.AFPConfig())
    with pytest.raises(ValueError, match="groups"):
        xalign.afp_loss(model, dict(batch, pair_groups=torch.tensor([0, 1])), xalign.AFPConfig())


def test_clm_loss_by_hand_counts_only_response_tokens():
    torch.manual_seed(0)
    N, L, V = 2, 7, 11
    logits = torch.randn(N, L, V, dtype=torch.float64)
    labels = torch.randint(0, V, (N, L))
    labels[0, :3] = -100
    labels[1, :5] = -100
    labels[1, 6] = -100                                         # a pad at the end
    loss = xalign.clm_loss(logits, labels)
    assert abs(loss.item() - naive_clm(logits, labels).item()) < 1e-6
    assert abs(loss.item() - xalign.clm_loss(logits.float(), labels).item()) < 1e-6

    # logits at position t predict token t+1: those whose next label is -100, and the last, do not count
    unused = [(0, 0), (0, 1), (0, 6), (1, 0), (1, 3), (1, 5), (1, 6)]
    changed = logits.clone()
    for n, t in unused:
        changed[n, t] = 50 * torch.randn(V, dtype=torch.float64)
    assert xalign.clm_loss(changed, labels).item() == loss.item()
    for n, t in [(0, 2), (1, 4)]:                               # a response position does count
        changed = logits.clone()
        changed[n, t, labels[n, t + 1]] += 3.0
        assert xalign.clm_loss(changed, labels).item() < loss.item() - 1e-3


def test_clm_loss_bad_inputs():
    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), -100)
    with pytest.raises(ValueError, match="-100"):
        xalign.clm_loss(logits, labels)
    labels[:, 0] = 3                                            # position 0 is never predicted
    with pytest.raises(ValueError, match="-100"):
        xalign.clm_loss(logits, labels)
    with pytest.raises(ValueError, match="disagree"):
        xalign.clm_loss(logits, torch.zeros(2, 4, dtype=torch.long))


# --------------------------------------------------------------------------------------------------------
# 8. bad inputs to info_nce

def test_info_nce_bad_inputs():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"must both be \(B, D\)"):
        xalign.info_nce(x, torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"must both be \(B, D\)"):
        xalign.info_nce(x, torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"must both be \(B, D\)"):
        xalign.info_nce(x[0], x[1])
    with pytest.raises(ValueError, match="at least 2 pairs"):
        xalign.info_nce(x[:1], x[1:2])
    for t in (0, 0.0, -0.05, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            xalign.info_nce(x, x, temperature=t)
    for groups in (torch.tensor([0, 1, 2]), torch.zeros(4, 1, dtype=torch.long)):
        with pytest.raises(ValueError, match="groups"):
            xalign.info_nce(x, x, groups=groups)
    with pytest.raises(ValueError, match="hard_negatives"):
        xalign.info_nce(x, x, hard_negatives=torch.randn(3, 3))


# --------------------------------------------------------------------------------------------------------
# 9. robustness

def test_zero_vectors_finite():
    x = torch.randn(4, 6)
    x[1] = 0
    y = torch.randn(4, 6)
    y[2] = 0
    x.requires_grad_()
    y.requires_grad_()
    loss = xalign.info_nce(x, y, symmetric=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    zx = torch.zeros(5, 6, requires_grad=True)                  # all cosines 0: the loss is log B
    loss = xalign.info_nce(zx, torch.zeros(5, 6))
    loss.backward()
    assert abs(loss.item() - math.log(5)) < 1e-6 and torch.isfinite(zx.grad).all()


def test_bf16_inputs():
    x, y, h = rand_pairs(B=8, D=32, seed=3, dtype=torch.float32)
    xb = x.bfloat16().requires_grad_()
    loss_b = xalign.info_nce(xb, y.bfloat16())
    loss_b.backward()
    loss_f = xalign.info_nce(x, y)
    assert loss_b.dtype == torch.float32 and torch.isfinite(loss_b)
    assert abs(loss_b.item() - loss_f.item()) <= 1e-2 * abs(loss_f.item())
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad).all()
    # computed in float32: on the bf16 values it matches float64 at tau = 0.01 (bf16 arithmetic would not)
    ref = naive_info_nce(xb.detach().double(), y.bfloat16().double(), temperature=0.01)
    assert abs(xalign.info_nce(xb, y.bfloat16(), temperature=0.01).item() - ref.item()) < 1e-4


def test_low_temperature_large_norm():
    x, y, _ = rand_pairs(B=6, D=8, seed=4, dtype=torch.float32)
    ref = naive_info_nce(r32(x), r32(y), temperature=0.01).item()
    for scale in (1.0, 1e4, 1e8):
        xs = (x * scale).requires_grad_()
        loss = xalign.info_nce(xs, y * scale, temperature=0.01)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(xs.grad).all()
        assert abs(loss.item() - ref) < 1e-3 * max(1.0, abs(ref)), (scale, loss.item(), ref)
    assert ref > 1.0                                            # logits up to 100: not a trivial value


# --------------------------------------------------------------------------------------------------------
# 10. xalign stands alone

def test_imports_only_torch_and_stdlib():
    tree = ast.parse((ROOT / "xalign.py").read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in xalign.py"
            modules.add(node.module.split(".")[0])
    assert "torch" in modules
    bad = {m for m in modules if m != "torch" and m not in sys.stdlib_module_names}
    assert not bad, f"xalign.py imports {bad}"


def test_import_alone_in_subprocess(tmp_path):
    shutil.copy(ROOT / "xalign.py", tmp_path / "xalign.py")
    for name in ("model", "data", "train", "eval", "tokenizer", "utils", "bench", "config"):
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('xalign must not import {name}')\n")
    code = ("import sys, torch, xalign; assert 'model' not in sys.modules; "
            "x = torch.randn(4, 8); print(xalign.info_nce, float(xalign.info_nce(x, x + 0.1)))")
    env = {**os.environ, "PYTHONPATH": ""}                      # nothing of the repo on the path
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "<function info_nce" in r.stdout
