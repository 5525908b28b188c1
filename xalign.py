"""
xalign: the AFP objective ("Align aFter Pre-training", Li, Wang, Zhang, Zong, NAACL 2024), self-contained.

This file needs torch and nothing else from the project, so it can be copied into another code base as is.

    L = cl_weight * L_MCL + clm_weight * L_CIF                       (paper defaults 1.0 and 1.5)

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
"""

from dataclasses import dataclass
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

def _world():
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
        rank, world = dist.get_rank(), dist.get_world_size()
        n = grad.shape[0] // world
        return grad[rank * n:(rank + 1) * n]


def gather(x):
    """Rows of every rank concatenated in rank order (W*B, ...), differentiable; x itself when not distributed."""
    rank, world = _world()
    if world == 1:
        return x
    return _GatherWithGrad.apply(x) if x.requires_grad else _GatherWithGrad.forward(None, x)


# --------------------------------------------------------------------------------------------------------
# The contrastive loss

def info_nce(x, y, temperature=0.05, symmetric=False, hard_negatives=None, hard_negative_weight=0.0, groups=None):
    """InfoNCE over in-batch negatives for B pairs (x_i, y_i), computed in float32 (float64 for float64 inputs).

        s_ij = cos(x_i, y_j) / tau                       (y_j from every rank under torch.distributed)
        h_ij = cos(x_i, hard_j) / tau + w * [i == j]     (optional hard-negative columns, w = hard_negative_weight)
        L    = -(1/B) sum_i log( exp(s_ii) / (sum_j exp(s_ij) + sum_j exp(h_ij)) )

    symmetric: average with the y -> x direction (the authors use x -> y only; hard negatives stay x -> y).
    groups:    (B,) ids; pairs that share an id (the same sentence twice in a batch) are not each other's
               negatives: s_ij is dropped from the sum when groups[i] == groups[j], i != j.
    """
    if x.dim() != 2 or x.shape != y.shape:
        raise ValueError(f"info_nce: x {tuple(x.shape)} and y {tuple(y.shape)} must both be (B, D)")
    if hard_negatives is not None and hard_negatives.shape != y.shape:
        raise ValueError(f"info_nce: hard_negatives {tuple(hard_negatives.shape)} must match y {tuple(y.shape)}")
    if groups is not None and groups.shape != x.shape[:1]:
        raise ValueError(f"info_nce: groups {tuple(groups.shape)} must be ({x.shape[0]},)")
    if not temperature > 0:
        raise ValueError(f"info_nce: temperature must be > 0, got {temperature}")
    rank, world = _world()
    B = x.shape[0]
    if B * world < 2:
        raise ValueError(f"info_nce: needs at least 2 pairs in the batch (got {B * world}): with one pair there "
                         "is no negative and the loss is 0")

    # normalize in fp32 or wider (bf16 cosines at tau=0.01 would round to steps of ~0.8 in the logits; float64
    # stays float64); eps keeps zero vectors finite
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    unit = lambda t: F.normalize(t.to(dtype), dim=-1, eps=1e-8)               # noqa: E731
    x, y = unit(x), unit(y)
    target = torch.arange(B, device=x.device) + rank * B                      # own pair's column among all ranks'

    def loss_one_way(rows, cols, hard):
        logits = rows @ gather(cols).T / temperature                          # (B, W*B)
        if groups is not None:
            all_groups = gather(groups)
            same = (groups[:, None] == all_groups[None, :])
            same[torch.arange(B, device=x.device), target] = False            # the positive itself stays
            logits = logits.masked_fill(same, float("-inf"))
        if hard is not None:
            hard_logits = rows @ gather(unit(hard)).T / temperature
            bonus = torch.zeros_like(hard_logits)
            bonus[torch.arange(B, device=x.device), target] = hard_negative_weight
            logits = torch.cat([logits, hard_logits + bonus], dim=1)          # (B, 2*W*B)
        return F.cross_entropy(logits, target)

    loss = loss_one_way(x, y, hard_negatives)
    if symmetric:
        loss = (loss + loss_one_way(y, x, None)) / 2
    return loss


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
    Parameter gradients are those of the plain loss; peak memory is one chunk's activations plus (B, D).
    """
    if chunk_size < 1:
        raise ValueError(f"cached_info_nce: chunk_size must be >= 1, got {chunk_size}")
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
    cl_weight: float = 1.0      # weight of L_MCL
    clm_weight: float = 1.5     # weight of L_CIF
    symmetric: bool = False     # also the y -> x direction


class AFPLoss(NamedTuple):
    total: torch.Tensor
    contrastive: torch.Tensor
    instruction: torch.Tensor


def afp_loss(model, batch, cfg=AFPConfig()):
    """L = cl_weight * L_MCL + clm_weight * L_CIF on one alignment batch.

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

    with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.cl_weight != 0):
        out = model(pair_ids, pair_mask, output_hidden_states=True, n_layers=layer, compute_logits=False)
        z = pool(out.hidden_states[layer], pair_mask, cfg.pooling)                      # (2B, D)
        contrastive = info_nce(z[:B], z[B:], cfg.temperature, symmetric=cfg.symmetric, groups=batch.get("pair_groups"))
    with torch.set_grad_enabled(torch.is_grad_enabled() and cfg.clm_weight != 0):
        labels = batch["instr_labels"]
        at = scored_positions(labels)                            # the head runs on response positions only
        targets = labels[:, 1:][at[:, :-1]]                      # (n_scored,) the token each position predicts
        instruction = model(batch["instr_ids"], batch["instr_mask"], logits_at=at, targets=targets).loss  # = clm_loss
    total = cfg.cl_weight * contrastive + cfg.clm_weight * instruction
    return AFPLoss(total, contrastive.detach(), instruction.detach())
