"""
xalign: the AFP objective ("Align aFter Pre-training", Li, Wang, Zhang, Zong, NAACL 2024), self-contained.

This file needs torch and nothing else from the project, so it can be copied into another code base as is.

    L = contrastive_weight * L_MCL + instruction_weight * L_CIF      (paper defaults 1.0 and 1.5)

L_MCL, multilingual contrastive learning: for a batch of B translation pairs with sentence vectors x_i, y_i
(the last real token's hidden state after block 1, "last-1"),
    s_ij = cos(x_i, y_j) / tau,      L_MCL = -(1/B) sum_i log( exp(s_ii) / sum_j exp(s_ij) ),   tau = 0.05
L_CIF, cross-lingual instruction following: the causal-LM loss on the response tokens only, for texts
"{instruction} {input} Answer in {Language}: {output}" whose answer language often differs from the question's.

Using the contrastive loss in another project:

    import xalign
    zx = xalign.pool(hidden_x, mask_x)              # (B, D): last real token, any padding side
    zy = xalign.pool(hidden_y, mask_y)              # (B, D): the translations, row by row
    loss = xalign.info_nce(zx, zy, temperature=0.05)
    loss.backward()

Under torch.distributed the negatives are gathered from every rank with their gradients, so N processes with
B pairs each train exactly like one process with N*B pairs (after DDP's gradient averaging).
For tens of thousands of pairs, `info_nce(..., tile_size=1024)` gives the same loss and gradients without ever
holding the (B, B) similarity matrix (memory linear in B), and `cached_info_nce` bounds the encoder's
activations as well.
"""

import contextlib
import numbers
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------------------
# Sentence vectors

def pool(hidden, attention_mask, mode="last"):
    """Sentence vectors (B, D) from hidden states (B, T, D) and a 0/1 attention mask (B, T).

    last: h[b, t_b], t_b = the position of the last real token of row b (correct for left and right padding;
          the authors' code assumed right padding)
    mean: sum_t m_bt h_bt / sum_t m_bt
    """
    if hidden.dim() != 3 or attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"pool: hidden {tuple(hidden.shape)} and attention_mask {tuple(attention_mask.shape)} "
                         "must be (B, T, D) and (B, T)")
    real = attention_mask.bool()
    if not bool(real.any(dim=1).all()):
        raise ValueError("pool: a row of attention_mask has no real token")
    if mode == "last":
        T = real.shape[1]
        last = T - 1 - real.flip(1).long().argmax(dim=1)                       # (B,) first real token from the right
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if mode == "mean":
        m = real.to(hidden.dtype).unsqueeze(-1)                                # (B, T, 1)
        return (hidden * m).sum(dim=1) / m.sum(dim=1)
    raise ValueError(f"pool: mode must be 'last' or 'mean', got {mode!r}")


# --------------------------------------------------------------------------------------------------------
# Gathering across processes, with gradients

def _rank_and_world_size():
    """(rank, world_size), (0, 1) when torch.distributed is not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns each rank the gradient of ALL ranks' losses w.r.t. its own rows.
    (A plain all_gather cuts the graph; SimCSE put the local rows back, which keeps only the local loss's
    gradient: 1/world_size of the right one after DDP averages.)"""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)                                   # sum over every rank's loss
        rank, world_size = dist.get_rank(), dist.get_world_size()
        n = grad.shape[0] // world_size
        return grad[rank * n:(rank + 1) * n]


def gather(x):
    """Rows of every rank concatenated in rank order (W*B, ...), differentiable; x itself when not distributed."""
    rank, world_size = _rank_and_world_size()
    if world_size == 1:
        return x
    return _GatherWithGrad.apply(x) if x.requires_grad else _GatherWithGrad.forward(None, x)


# --------------------------------------------------------------------------------------------------------
# The contrastive loss

def info_nce(x, y, temperature=0.05, symmetric=False, hard_negatives=None, hard_negative_weight=0.0, groups=None,
             tile_size=None):
    """InfoNCE over in-batch negatives for B pairs (x_i, y_i), computed in float32 (float64 for float64 inputs).

        s_ij = cos(x_i, y_j) / tau                       (y_j from every rank under torch.distributed)
        h_ij = cos(x_i, hard_j) / tau + w * [i == j]     (optional hard-negative columns, w = hard_negative_weight)
        L    = -(1/B) sum_i log( exp(s_ii) / (sum_j exp(s_ij) + sum_j exp(h_ij)) )

    symmetric: average with the y -> x direction (the authors use x -> y only; hard negatives stay x -> y).
    groups:    (B,) ids; pairs that share an id (the same sentence twice in a batch) are not each other's
               negatives: s_ij is dropped from the sum when groups[i] == groups[j], i != j.
    tile_size: None builds the (B, W*B) logits whole, fastest while they fit in memory; an int t gives the same
               loss and gradients from (t, t) tiles (tiled_cross_entropy) in O(W*B*D + t*t) memory.
    """
    _check_info_nce_args(x, y, hard_negatives, groups, temperature, tile_size)
    with _no_autocast(x):       # under autocast the plain path's matmul would run in bf16
        return _info_nce(x, y, temperature, symmetric, hard_negatives, hard_negative_weight, groups, tile_size)


def _info_nce(x, y, temperature, symmetric, hard_negatives, hard_negative_weight, groups, tile_size):
    rank, B = _rank_and_world_size()[0], x.shape[0]
    # fp32 or wider (bf16 cosines at tau=0.01 would round to steps of ~0.8 in the logits; float64 stays float64)
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    x, y = x.to(dtype), y.to(dtype)
    hard_negatives = hard_negatives.to(dtype) if hard_negatives is not None else None
    all_groups = gather(groups) if groups is not None else None               # (W*B,)
    cross_entropy = plain_cross_entropy if tile_size is None else partial(tiled_cross_entropy, tile_size=tile_size)

    def loss_one_way(rows, cols, hard):
        # the columns of every rank, raw: each path normalizes them itself
        hard = gather(hard) if hard is not None else None                     # (W*B, D)
        return cross_entropy(rows, gather(cols), hard, groups, all_groups, rank * B, temperature, hard_negative_weight)

    loss = loss_one_way(x, y, hard_negatives)
    if symmetric:
        loss = (loss + loss_one_way(y, x, None)) / 2
    return loss


def _check_info_nce_args(x, y, hard_negatives, groups, temperature, tile_size):
    if x.dim() != 2 or x.shape != y.shape:
        raise ValueError(f"info_nce: x {tuple(x.shape)} and y {tuple(y.shape)} must both be (B, D)")
    if hard_negatives is not None and hard_negatives.shape != y.shape:
        raise ValueError(f"info_nce: hard_negatives {tuple(hard_negatives.shape)} must match y {tuple(y.shape)}")
    if groups is not None and groups.shape != x.shape[:1]:
        raise ValueError(f"info_nce: groups {tuple(groups.shape)} must be ({x.shape[0]},)")
    if not temperature > 0:
        raise ValueError(f"info_nce: temperature must be > 0, got {temperature}")
    _check_tile_size(tile_size)
    if tile_size is not None and isinstance(temperature, torch.Tensor) and temperature.requires_grad:
        raise ValueError("info_nce: the tiled path takes a fixed temperature; a learned one needs tile_size=None")
    n_pairs = x.shape[0] * _rank_and_world_size()[1]
    if n_pairs < 2:
        raise ValueError(f"info_nce: needs at least 2 pairs in the batch (got {n_pairs}): with one pair there "
                         "is no negative and the loss is 0")


def _check_tile_size(tile_size):
    if tile_size is not None and not (isinstance(tile_size, numbers.Integral) and not isinstance(tile_size, bool)
                                      and tile_size >= 1):
        raise ValueError(f"info_nce: tile_size must be an int >= 1 (or None: no tiling), got {tile_size!r}")


def plain_cross_entropy(rows, cols, hard, row_groups, col_groups, offset, temperature, hard_weight):
    """One direction of info_nce with the (B, N) logits built whole: rows (B, D) against cols (N, D) (and hard
    (N, D)), row i's positive at column offset + i; vectors normalized here (eps keeps zero vectors finite)."""
    unit = lambda t: F.normalize(t, dim=-1, eps=1e-8)                         # noqa: E731
    own = torch.arange(rows.shape[0], device=rows.device)                    # (B,)
    target = own + offset                                                     # own pair's column among all ranks'
    rows = unit(rows)
    logits = rows @ unit(cols).T / temperature                                # (B, N)
    if row_groups is not None:
        same = (row_groups[:, None] == col_groups[None, :])
        same[own, target] = False                                             # the positive itself stays
        logits = logits.masked_fill(same, float("-inf"))
    if hard is not None:
        hard_logits = rows @ unit(hard).T / temperature
        bonus = torch.zeros_like(hard_logits)
        bonus[own, target] = hard_weight
        logits = torch.cat([logits, hard_logits + bonus], dim=1)              # (B, 2N)
    return F.cross_entropy(logits, target)


def tiled_cross_entropy(rows, cols, hard, row_groups, col_groups, offset, temperature, hard_weight, tile_size):
    """One direction of info_nce, from (tile_size, tile_size) tiles of the logits s_ij = cos(rows_i, cols_j) / tau.

    rows (B, D): this rank's anchors. cols (N, D): every rank's columns (N = W*B); row i's positive is column
    t_i = offset + i. hard (N, D) or None: hard-negative columns, hard_weight added on column t_i. All three are
    normalized inside as F.normalize(eps=1e-8) would: backward then turns the gradients w.r.t. the unit vectors
    into those w.r.t. the raw ones in place, with no (B, D) buffer of autograd's in between.
    row_groups (B,), col_groups (N,) or None: duplicate ids; s_ij is dropped where they match and j != t_i.
    Returns L = (1/B) sum_i (lse_i - s_i,t_i), lse_i = log of sum_j exp over the kept and the hard columns.
    The gradient w.r.t. cols is this rank's loss's only: under torch.distributed pass gather(...)'s output,
    whose backward sums it over the ranks.
    """
    return _TiledCrossEntropy.apply(rows, cols, hard, row_groups, col_groups, offset, temperature, hard_weight,
                                    tile_size)


class _TiledCrossEntropy(torch.autograd.Function):
    """tiled_cross_entropy's loss and exact gradients. Saved for backward: the unit vectors (B + 2N, D), their
    norms and lse (B,); no (B, N) tensor.

    With u = x / max(|x|, eps) for rows, cols and hard alike and s_ij = u_i . v_j / tau, forward folds the tiles
    into a running log-sum-exp per row (online: the running max is inside logaddexp),
        lse_i <- max(lse_i, b_i) + log(exp(lse_i - max) + exp(b_i - max)),   b_i = log sum_{j in tile} exp(s_ij)
    from lse_i = -inf (torch.logaddexp(-inf, -inf) is -inf, where the formula would give nan). Backward recomputes each tile's probabilities p_ij = exp(s_ij - lse_i) (0 where masked)
    and, with g the incoming gradient,
        dL/ds_ij = g * (p_ij - [j == t_i]) / B          (hard columns: p_ij only, the bonus being a constant)
        dL/du_i  = sum_j dL/ds_ij * v_j / tau,          dL/dv_j = sum_i dL/ds_ij * u_i / tau
        dL/dx    = (dL/du - u (dL/du . u)) / |x|        (dL/du / eps where |x| < eps), as F.normalize's
    The last step runs in place on the (B, D) and (N, D) gradients, which autograd then hands on as they are.
    """

    @staticmethod
    def forward(ctx, rows, cols, hard, row_groups, col_groups, offset, temperature, hard_weight, tile):
        B = rows.shape[0]
        ctx.config = (offset, 1 / float(temperature), hard_weight, tile)
        with _no_autocast(rows):
            (rows, r_norm), (cols, c_norm) = _unit(rows), _unit(cols)
            hard, h_norm = _unit(hard) if hard is not None else (None, None)
            lse = torch.full((B,), float("-inf"), dtype=rows.dtype, device=rows.device)
            zero = torch.zeros_like(lse)
            for r0, r1, _, _, _, s in _tiles(rows, cols, hard, row_groups, col_groups, *ctx.config, zero):
                lse[r0:r1] = torch.logaddexp(lse[r0:r1], torch.logsumexp(s, dim=1))  # a masked row: -inf, not nan
            s_pos = torch.einsum("bd,bd->b", rows, cols[offset:offset + B]) / temperature     # (B,) s_i,t_i
        ctx.save_for_backward(rows, cols, hard, r_norm, c_norm, h_norm, row_groups, col_groups, lse)
        return (lse - s_pos).mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        rows, cols, hard, r_norm, c_norm, h_norm, row_groups, col_groups, lse = ctx.saved_tensors
        offset, inv_tau = ctx.config[:2]
        B = rows.shape[0]
        alpha = inv_tau / B                           # 1/B from dL/ds, 1/tau from ds/du; g is applied at the end
        with _no_autocast(rows):
            d_rows, d_cols = torch.zeros_like(rows), torch.zeros_like(cols)
            d_hard = torch.zeros_like(hard) if hard is not None and ctx.needs_input_grad[2] else None
            for r0, r1, c0, c1, is_hard, s in _tiles(rows, cols, hard, row_groups, col_groups, *ctx.config, lse):
                p = s.exp_()                                                  # (tr, tc) p_ij in place; masked: 0
                src, d_src = (hard, d_hard) if is_hard else (cols, d_cols)
                d_rows[r0:r1].addmm_(p, src[c0:c1], alpha=alpha)              # in place: no (tr, D) temporary
                if d_src is not None:
                    d_src[c0:c1].addmm_(p.T, rows[r0:r1], alpha=alpha)
            d_rows.sub_(cols[offset:offset + B], alpha=alpha)                 # the -[j == t_i] term
            d_cols[offset:offset + B].sub_(rows, alpha=alpha)
            for d, t, norm in ((d_rows, rows, r_norm), (d_cols, cols, c_norm), (d_hard, hard, h_norm)):
                if d is not None:                     # g as a tensor: no host sync on CUDA
                    _unit_backward_(d.mul_(grad), t, norm)
        return d_rows, d_cols, d_hard, None, None, None, None, None, None


def _unit(t):
    """(t / max(|t|, eps), |t| (n, 1)): F.normalize(t, eps=1e-8)'s value, and the norm for the backward."""
    norm = torch.linalg.vector_norm(t, dim=1, keepdim=True)
    return t / norm.clamp_min(1e-8), norm


def _unit_backward_(grad, u, norm):
    """grad = dL/du becomes dL/dt in place, for u = _unit(t)[0]: the radial part goes, then / |t|; below eps
    the divisor is the constant eps and nothing goes."""
    radial = torch.einsum("bd,bd->b", grad, u)[:, None] * (norm >= 1e-8)     # (n, 1) dL/du . u
    return grad.addcmul_(u, radial, value=-1).div_(norm.clamp_min(1e-8))


def _tiles(rows, cols, hard, row_groups, col_groups, offset, inv_tau, hard_weight, tile, shift):
    """(r0, r1, c0, c1, is_hard, logits - shift (r1-r0, c1-c0)) for every tile of the (B, N) logits and then of
    the hard ones, row tiles outermost; masked and given the bonus as info_nce's untiled path. The per-row shift
    (B,) and 1/tau are applied inside the matmul. Each tile is a fresh tensor: the caller may overwrite it."""
    spans = lambda n: [(a, min(a + tile, n)) for a in range(0, n, tile)]     # noqa: E731
    for r0, r1 in spans(rows.shape[0]):
        t = torch.arange(r0, r1, device=rows.device) + offset                 # (tr,) each row's positive column
        for is_hard, src in ((False, cols), (True, hard)):
            if src is None:
                continue
            for c0, c1 in spans(src.shape[0]):
                s = torch.addmm(shift[r0:r1, None], rows[r0:r1], src[c0:c1].T, beta=-1, alpha=inv_tau)  # (tr, tc)
                if is_hard or row_groups is not None:
                    positive = torch.arange(c0, c1, device=s.device)[None, :] == t[:, None]      # (tr, tc)
                    if is_hard:                                               # the bonus w on t_i only
                        s = torch.where(positive, s + hard_weight, s)     # (w = -inf drops it, as untiled)
                    else:                                                     # a duplicate, not the pair itself
                        same = (row_groups[r0:r1, None] == col_groups[None, c0:c1]) & ~positive
                        s.masked_fill_(same, float("-inf"))
                yield r0, r1, c0, c1, is_hard, s


def _no_autocast(t):
    """Autocast off around the tiles: backward must recompute exactly the forward's logits, but it runs wherever
    loss.backward() is called (for CUDA on another thread, outside the forward's autocast). Inputs are fp32/fp64."""
    if torch.amp.is_autocast_available(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


class _RNGState:
    """The CPU (and CUDA, for a CUDA device) random state, to replay dropout masks exactly."""

    def __init__(self, device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self):
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def cached_info_nce(embed, x_inputs, y_inputs, chunk_size, hard_inputs=None, **info_nce_kwargs):
    """info_nce(embed(x_inputs), embed(y_inputs)) for contrastive batches too large to hold every activation
    (the GradCache method of Gao et al. 2021). Runs backward itself and returns the loss, detached.

    embed:    callable(*tensors) -> (n, D), e.g. a model followed by pool.
    x_inputs: a tensor or a tuple of tensors with the batch on dim 0 (ids, mask); y_inputs, hard_inputs alike.

    1. embed every chunk without a graph, noting the random state before each chunk;
    2. compute the loss on the full (B, D) matrices and its gradient g = dL/dz w.r.t. the embeddings only;
    3. embed each chunk again with a graph, from the noted random state (same dropout masks), and backprop g.
    Parameter gradients are those of the plain loss; peak memory is one chunk's activations plus (B, D), and
    the loss's (B, W*B) logits unless tile_size=t (passed on to info_nce) bounds those to (t, t) tiles too.
    """
    if chunk_size < 1:
        raise ValueError(f"cached_info_nce: chunk_size must be >= 1, got {chunk_size}")
    _check_tile_size(info_nce_kwargs.get("tile_size"))                       # before any chunk is embedded
    groups = [x_inputs, y_inputs] + ([hard_inputs] if hard_inputs is not None else [])
    groups = [g if isinstance(g, (tuple, list)) else (g,) for g in groups]
    chunked = [list(zip(*(t.split(chunk_size) for t in g))) for g in groups]   # per input: list of chunk tuples

    states, embeddings = [], []
    with torch.no_grad():
        for chunks in chunked:
            states.append([])
            parts = []
            for chunk in chunks:
                states[-1].append(_RNGState(chunk[0].device))
                parts.append(embed(*chunk))
            embeddings.append(torch.cat(parts).detach().requires_grad_())

    hard = embeddings[2] if hard_inputs is not None else None
    loss = info_nce(embeddings[0], embeddings[1], hard_negatives=hard, **info_nce_kwargs)
    loss.backward()                                             # only to the embeddings: they are graph leaves

    # replaying every chunk in the first pass's order also leaves the random state where one plain pass would
    for chunks, chunk_states, z in zip(chunked, states, embeddings):
        for chunk, state, grad in zip(chunks, chunk_states, z.grad.split(chunk_size)):
            state.restore()
            z_chunk = embed(*chunk)
            z_chunk.backward(grad.to(z_chunk.dtype))
    return loss.detach()


# --------------------------------------------------------------------------------------------------------
# The instruction-following loss and the combined objective

def clm_loss(logits, labels):
    """Causal-LM loss on the labelled tokens only: -(1/|R|) sum_{t in R} log p(labels_t | tokens_<t),
    R = positions whose label is not -100 (the response). logits (N, L, V); labels (N, L), unshifted."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"clm_loss: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    scored_positions(labels)                                    # raises when nothing is labelled
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def scored_positions(labels):
    """(N, L) bool: the positions t whose next token t+1 is labelled, the only ones whose logits the loss reads."""
    at = torch.zeros_like(labels, dtype=torch.bool)
    at[:, :-1] = labels[:, 1:] != -100
    if not bool(at.any()):
        raise ValueError("clm_loss: no labelled token (every label is -100)")
    return at


@dataclass
class AFPConfig:
    temperature: float = 0.05   # tau of the contrastive loss
    pooling: str = "last"       # "last" (last real token) or "mean"
    layer: int = 1              # hidden-state index pooled: 0 = embeddings, i = block i, negative counts from the top
    contrastive_weight: float = 1.0   # weight of L_MCL
    instruction_weight: float = 1.5   # weight of L_CIF
    symmetric: bool = False     # also the y -> x direction
    tile_size: int | None = None      # info_nce's tiled path (exact; memory linear in the pairs); None: plain


class AFPLoss(NamedTuple):
    total: torch.Tensor
    contrastive: torch.Tensor
    instruction: torch.Tensor


def afp_loss(model, batch, cfg=AFPConfig()):
    """L = contrastive_weight * L_MCL + instruction_weight * L_CIF on one alignment batch.

    batch: pair_ids, pair_mask (2B, Lp): rows 0..B-1 are sentences, rows B..2B-1 their translations;
           pair_groups (B,) optional duplicate ids; instr_ids, instr_mask, instr_labels (N, Li).
    model: called as model(ids, mask, output_hidden_states=True, n_layers=k, compute_logits=False) for the pairs
           and model(ids, mask, logits_at=positions, targets=next_tokens).loss -> mean cross-entropy there for
           the instructions (the Decoder of model.py; elsewhere: F.cross_entropy(logits[positions], next_tokens)).

    The pair rows run through the first `layer` blocks only (nothing above reaches L_MCL) and are padded in a
    block of their own, so no pair row is padded to an instruction row's length. A term of weight 0 is still
    computed, without a graph, so that ablations log it.
    """
    n_layer = getattr(model, "module", model).cfg.n_layer          # through a DDP wrapper too
    layer = cfg.layer + n_layer + 1 if cfg.layer < 0 else cfg.layer
    if not 0 <= layer <= n_layer:
        raise ValueError(f"afp_loss: layer {cfg.layer} is out of range for a model of {n_layer} blocks "
                         f"(0..{n_layer}, or -{n_layer + 1}..-1)")
    pair_ids, pair_mask = batch["pair_ids"], batch["pair_mask"]
    if pair_ids.shape[0] % 2:
        raise ValueError(f"afp_loss: pair_ids has {pair_ids.shape[0]} rows; expected 2B (sentences, then translations)")
    B = pair_ids.shape[0] // 2

    with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.contrastive_weight != 0):
        out = model(pair_ids, pair_mask, output_hidden_states=True, n_layers=layer, compute_logits=False)
        z = pool(out.hidden_states[layer], pair_mask, cfg.pooling)                      # (2B, D)
        contrastive = info_nce(z[:B], z[B:], cfg.temperature, symmetric=cfg.symmetric, groups=batch.get("pair_groups"),
                               tile_size=cfg.tile_size)
    with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.instruction_weight != 0):
        labels = batch["instr_labels"]
        at = scored_positions(labels)                            # the head runs on response positions only
        targets = labels[:, 1:][at[:, :-1]]                      # (n_scored,) the token each position predicts
        instruction = model(batch["instr_ids"], batch["instr_mask"], logits_at=at, targets=targets).loss  # = clm_loss
    total = cfg.contrastive_weight * contrastive + cfg.instruction_weight * instruction
    return AFPLoss(total, contrastive.detach(), instruction.detach())
