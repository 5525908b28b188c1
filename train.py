"""
train.py: pretrain a small decoder, then align it with AFP (xalign.afp_loss). One loop serves both stages.
By default the align stage also replays the base model's pretraining text (--replay-weight; not in the paper,
0 turns it off), which keeps it a language model in the toy world.

    python train.py                                  # the default experiment: toy world, tokenizer, pretrain,
                                                     # align, evaluate both (eval.py) side by side
    python train.py --preset tiny --out /tmp/t       # the same in seconds
    python train.py --stage align --init runs/default/base --out runs/mine --pairs en-de.tsv
    python train.py --stage align --init ~/models/xglm-564M --preset paper --pairs en-zh.tsv --out runs/xglm
                                                     # a Hugging Face checkpoint (hf.py); also writes OUT/aligned.hf
    torchrun --nproc_per_node 4 train.py ...         # data parallel; contrastive negatives gathered across ranks

The flags and every check on them are in config.py. Run directory (--out):
  data/                      the toy world (toyworld.py), unless --data-dir or real data is given
  tokenizer.json             byte-level BPE
  base/  aligned/            best checkpoint of each stage by dev loss (config.json, model.pt, tokenizer.json)
  aligned.hf/                the best aligned checkpoint in its family's Hugging Face layout (HF bases only)
  base.last/  aligned.last/  latest checkpoint + state.pt (optimizer, scheduler, RNG, step), for --resume
  log.jsonl                  every logged step and every dev evaluation
  results.json               eval.py on base and aligned (--stage all)
Every batch is a pure function of the step (data.PretrainData / AlignData), so resuming needs only the step.
"""

import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import hf
import toyworld
import xalign
from config import (STAGE_DIR, TINY_EVAL, TINY_WORLD, ConfigError, check_inputs, init_dir, model_config,
                    own_alignment_data, parse_config, replay_source)
from checkpoint import (Interrupted, StopFlag, load_state, recover_checkpoint, rng_state, save_checkpoint,
                        set_rng_state)
from model import Decoder, load_model


class Diverged(RuntimeError):
    """The loss became NaN or inf."""


# -----------------------------------------------------------------------------
# 1. data: the toy world or the flags' files

def prepare_world(cfg, env):
    """The toy world's directory: --data-dir, the base model's world (align), or OUT/data, built now."""
    if cfg.data_dir:
        return Path(cfg.data_dir)
    if cfg.stage == "align":  # the world the base model was pretrained on, whose words its tokenizer knows
        base_world = json.loads((Path(init_dir(cfg)) / "config.json").read_text()).get("data_dir")
        if base_world and (Path(base_world) / "world.json").is_file():
            return Path(base_world)
    world_dir = Path(cfg.out) / "data"
    wcfg = toyworld.WorldConfig(seed=cfg.seed, pretrain_words=cfg.world_words, cross_probability=cfg.cross_probability,
                                **(TINY_WORLD if cfg.preset == "tiny" else {}))
    if env.master:  # deterministic from wcfg, and built in seconds
        t0 = time.time()
        toyworld.write_world(toyworld.build_world(wcfg), world_dir)
        log(env, f"toy world ({cfg.world_words:,} words) written to {world_dir} in {time.time() - t0:.1f}s")
    barrier(env)
    return world_dir


def pretrain_texts(cfg, world_dir):
    """(train documents, dev documents)."""
    if cfg.text:
        docs = [d for path in cfg.text for d in data.read_text(path)]
        if len(docs) < 2:
            raise ValueError(f"--text {' '.join(cfg.text)}: {len(docs)} document(s); pretraining holds out the last "
                             "2% (one at least) for the dev loss, so it needs 2 or more (a blank line separates them)")
        n_dev = max(1, len(docs) // 50)  # hold out the last 2% for the dev loss
        return docs[:-n_dev], docs[-n_dev:]
    dev = [d for path in sorted((world_dir / "text").glob("*.dev.txt")) for d in data.read_text(path)]
    return data.read_text(world_dir / "pretrain.txt"), dev


def align_examples(cfg, world_dir):
    """(train examples, dev examples) of data.AlignExample, from the flags' files or the toy world."""
    ex = []
    for path, read in [(p, partial(data.read_translation_pairs, seed=cfg.seed)) for p in cfg.pairs] + \
                      [(p, data.read_afp_jsonl) for p in cfg.afp_jsonl]:
        rows = read(path)
        if not rows:
            raise ValueError(f"{path}: no rows in the file")
        ex += rows
    if cfg.bactrian:
        ex += data.read_bactrian(dict(b.split("=", 1) for b in cfg.bactrian), cfg.cross_probability, cfg.seed)
    if ex:
        random.Random(cfg.seed).shuffle(ex)
        n_dev = min(max(len(ex) // 50, 2 * cfg.align_batch_size), len(ex) // 5)  # dev: 2%, at least 2 batches
        return ex[n_dev:], ex[:n_dev]
    return data.read_afp_jsonl(world_dir / "align.train.jsonl"), data.read_afp_jsonl(world_dir / "align.dev.jsonl")


class Inputs(NamedTuple):
    text: tuple | None       # (train, dev) documents of --text
    align: tuple | None      # (train, dev) examples of --pairs, --afp-jsonl and --bactrian


def read_inputs(cfg):
    """Every file of --text, --pairs, --afp-jsonl and --bactrian, read and checked now, so that a bad row stops
    the run before pretraining rather than after it."""
    try:
        text = pretrain_texts(cfg, None) if cfg.text else None
        align = align_examples(cfg, None) if own_alignment_data(cfg) and cfg.stage != "pretrain" else None
    except ValueError as e:  # the readers' "FILE:LINE: what is wrong"
        raise ConfigError(str(e)) from None
    if align is not None and len(align[1]) < 2:
        raise ConfigError(f"{sum(map(len, align))} alignment examples: too few to hold out the 2 that the "
                          "contrastive dev loss needs (10 or more)")
    return Inputs(text, align)


def get_tokenizer(cfg, env, texts):
    """OUT/tokenizer.json: reused on --resume, trained otherwise (rank 0, the others wait)."""
    path = Path(cfg.out) / "tokenizer.json"
    if env.master and not (cfg.resume and path.is_file()):
        t0 = time.time()
        data.train_tokenizer(texts, cfg.vocab_size).save(str(path))
        log(env, f"tokenizer ({cfg.vocab_size} tokens) trained in {time.time() - t0:.1f}s")
    barrier(env)
    return data.load_tokenizer(path)


# -----------------------------------------------------------------------------
# 2. the two objectives: a batch -> dict of scalar losses, "loss" being the one to minimise

def pretrain_blocks(docs, cfg, env, tokenizer, batch_size):
    """Causal-LM blocks of docs for this rank (pretraining, and the replayed text of the align stage)."""
    return data.PretrainData(docs, tokenizer, cfg.block_size, batch_size, cfg.seed, env.rank, env.world_size)


def lm_loss(model, batch):
    logits = model(batch["input_ids"], batch["attention_mask"]).logits          # (B, T, V)
    return {"loss": xalign.clm_loss(logits, batch["labels"])}


def align_loss(model, batch, afp, replay_weight=0.0):
    out = xalign.afp_loss(model, batch, afp)
    parts = {"loss": out.total, "contrastive": out.contrastive, "instruction": out.instruction}
    if replay_weight:  # --replay-weight: pretraining text beside the alignment rows, against forgetting
        parts["replay"] = lm_loss(model, batch)["loss"]
        parts["loss"] = parts["loss"] + replay_weight * parts["replay"]
    return parts


class ReplayData:
    """Alignment batches with pretraining blocks beside them (--replay-weight); step i of both streams."""

    def __init__(self, align_data, pretrain_data):
        self.align_data, self.pretrain_data = align_data, pretrain_data

    def batch(self, step) -> dict:
        return {**self.align_data.batch(step), **self.pretrain_data.batch(step)}


def n_tokens(batch):
    """Real (non-pad) tokens in a batch."""
    return int(sum(batch[k].sum() for k in ("attention_mask", "pair_mask", "instr_mask") if k in batch))


def train_flops(model, batch, layer):
    """Training FLOPs of a batch as model.flops_per_token counts them, each row through what it runs: LM rows
    through the whole model; instruction rows through the blocks, and the head at their scored (response)
    positions only; pair rows through the `layer` blocks below the pooled state. Real tokens only."""
    head, n_layer, flops = 6 * model.head.weight.numel(), model.cfg.n_layer, 0.0     # head: training FLOPs/token
    if "input_ids" in batch:
        flops += float(batch["attention_mask"].sum()) * model.flops_per_token(batch["input_ids"].shape[1])
    if "instr_ids" in batch:
        blocks = model.flops_per_token(batch["instr_ids"].shape[1]) - head
        flops += float(batch["instr_mask"].sum()) * blocks + float((batch["instr_labels"] != -100).sum()) * head
    if "pair_ids" in batch:
        per_block = (model.flops_per_token(batch["pair_ids"].shape[1]) - head) / n_layer
        flops += float(batch["pair_mask"].sum()) * per_block * (layer if layer >= 0 else layer + n_layer + 1)
    return flops


# -----------------------------------------------------------------------------
# 3. optimizer and schedule

def make_optimizer(model, lr, weight_decay, betas, device):
    # decay matrices only: biases and norm gains are 1-D, embeddings are lookups (and tied to the head)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and id(p) not in embeddings]
    no_decay = [p for p in params if p.dim() < 2 or id(p) in embeddings]
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")


def lr_factor(step, steps, warmup, floor):
    """Multiplier of the peak lr for optimizer step `step` (0-based): linear warmup, then cosine to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------
# 4. processes, devices, logging

@dataclass
class Env:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    log_path: Path | None = None

    def __post_init__(self):
        self.ddp, self.master = self.world_size > 1, self.rank == 0

    def autocast(self):
        # bf16 on CUDA (no loss scaling needed); fp32 on CPU, where bf16 matmuls are slow and inexact
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()


def setup_env(cfg):
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        cuda = torch.cuda.is_available() and cfg.device != "cpu"
        dist.init_process_group("nccl" if cuda else "gloo")
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device(f"cuda:{local}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(device)
        env = Env(device, dist.get_rank(), dist.get_world_size())
    else:
        env = Env(torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                               "cpu" if cfg.device == "auto" else cfg.device))
    if env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # the same init everywhere; DDP also broadcasts rank 0's weights
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    env.log_path = Path(cfg.out) / "log.jsonl"
    return env


def barrier(env):
    if env.ddp:
        dist.barrier()


def log(env, msg, **record):
    """A line on the console (rank 0) and, when given fields, a JSON line in OUT/log.jsonl."""
    if not env.master:
        return
    if msg:
        tqdm.write(msg)
    if record:
        with open(env.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# -----------------------------------------------------------------------------
# 5. the loop

@dataclass
class Stage:
    """What one stage trains, and how."""
    name: str                       # "pretrain" or "align"
    model: Decoder
    tokenizer: data.TextTokenizer
    loss_fn: Callable               # (model, batch) -> {"loss": to minimise, other parts: logged}
    train_data: object              # .batch(step) -> dict of tensors
    dev_data: object
    steps: int
    lr: float
    weight_decay: float
    betas: tuple
    meta: dict                      # written into each checkpoint's config.json


@dataclass
class Progress:
    step: int = 0
    best_dev: float = math.inf
    tokens: int = 0
    flops: float = 0.0              # training FLOPs so far (train_flops)


def train(stage: Stage, cfg, env):
    """Train stage.model for stage.steps optimizer steps. Keeps OUT/<dir> (best dev loss) and OUT/<dir>.last
    (latest, resumable). Returns (path of the best checkpoint, Progress: steps, tokens and FLOPs trained)."""
    best_dir, last_dir = Path(cfg.out) / STAGE_DIR[stage.name], Path(cfg.out) / f"{STAGE_DIR[stage.name]}.last"
    if env.master:                                      # a crash may have left either half swapped
        recover_checkpoint(best_dir)
        recover_checkpoint(last_dir)
    barrier(env)
    opt = make_optimizer(stage.model, stage.lr, stage.weight_decay, stage.betas, env.device)
    schedule = partial(lr_factor, steps=stage.steps, warmup=math.ceil(cfg.warmup_ratio * stage.steps),
                       floor=cfg.min_lr_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    progress = resume(stage, env, last_dir, opt, sched) if cfg.resume else Progress()
    if progress.step >= stage.steps:
        log(env, f"{stage.name}: already done ({progress.step} steps), best checkpoint {best_dir}")
        return best_dir, progress
    eval_every = cfg.eval_every or max(1, stage.steps // 5)
    fwd = wrap_model(stage, cfg, env)
    save = partial(save_stage, stage, env, progress)
    t_log, tok_log = time.time(), 0
    with StopFlag() as stop, tqdm(total=stage.steps, initial=progress.step, desc=stage.name,
                                  disable=not env.master, dynamic_ncols=True) as bar:
        while progress.step < stage.steps:
            # forward and backward over the micro batches, then one update
            losses, grad_norm, n_tok, flops = forward_backward(fwd, stage, cfg, env, progress.step)
            check_finite(stage, losses, grad_norm, progress.step, last_dir, eval_every)
            lr = opt.param_groups[0]["lr"]  # the rate this update uses
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            progress.step += 1
            progress.tokens += n_tok
            progress.flops += flops
            tok_log += n_tok
            bar.update(1)
            # log the step
            if progress.step % cfg.log_every == 0 or progress.step == stage.steps:
                tok_s, t_log, tok_log = tok_log / (time.time() - t_log), time.time(), 0
                bar.set_postfix({**{k: f"{v:.3f}" for k, v in losses.items()}, "lr": f"{lr:.1e}", "tok/s": f"{tok_s:.0f}"})
                log(env, "", stage=stage.name, step=progress.step, **losses, lr=lr, grad_norm=grad_norm,
                    tokens=progress.tokens, tok_s=round(tok_s, 1), time=time.time())
            # evaluate on dev: keep the best checkpoint, and the last one to resume from
            if progress.step % eval_every == 0 or progress.step == stage.steps:
                if evaluate_dev(stage, cfg, env, progress):
                    save(best_dir)
                save(last_dir, opt, sched)
            # Ctrl-C: save and stop, every rank at the same step
            if stop.agreed(env):
                save(last_dir, opt, sched)
                raise Interrupted(f"{stage.name}: interrupted at step {progress.step}/{stage.steps}; checkpoint "
                                  f"saved to {last_dir}, continue with --resume")
    return best_dir, progress


def wrap_model(stage, cfg, env):
    """The model as the loss calls it: compiled (--compile) and in DDP under torchrun."""
    fwd = torch.compile(stage.model) if cfg.compile else stage.model
    if env.ddp:  # pair rows never reach the blocks above the pooled layer: without L_CIF those get no gradient
        unused = stage.name == "align" and cfg.instruction_weight == 0
        fwd = DDP(fwd, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                  find_unused_parameters=unused)
    return fwd


def forward_backward(fwd, stage, cfg, env, step):
    """Gradients of one optimizer step over cfg.grad_accum micro batches (batch index = position in the data
    stream). Returns (mean loss parts over micro batches and ranks, grad norm before clipping, tokens, FLOPs)."""
    parts_sum, n_tok, flops = None, 0, 0.0
    for micro in range(cfg.grad_accum):
        batch = stage.train_data.batch(step * cfg.grad_accum + micro)
        n_tok += n_tokens(batch)
        flops += train_flops(stage.model, batch, cfg.layer)
        batch = to_device(batch, env.device)
        if env.ddp:  # all-reduce the gradients on the last micro step only
            fwd.require_backward_grad_sync = micro == cfg.grad_accum - 1
        with env.autocast():
            parts = stage.loss_fn(fwd, batch)
        (parts["loss"] / cfg.grad_accum).backward()
        vals = torch.stack([v.detach().float() for v in parts.values()])
        parts_sum = vals if parts_sum is None else parts_sum + vals
    counts = torch.tensor([float(n_tok), flops], dtype=torch.float64, device=parts_sum.device)
    stats = torch.cat([(parts_sum / cfg.grad_accum).double(), counts])
    if env.ddp:  # one all-reduce: the loss parts averaged over ranks, the counts summed
        dist.all_reduce(stats)
        stats[:-2] /= env.world_size
    grad_norm = float(nn.utils.clip_grad_norm_(stage.model.parameters(), cfg.grad_clip or math.inf))
    return dict(zip(parts, stats[:-2].tolist())), grad_norm, int(stats[-2]), float(stats[-1])


def check_finite(stage, losses, grad_norm, step, last_dir, eval_every):
    """Stop before an update with a NaN or inf, saying which checkpoint is left to resume from."""
    if math.isfinite(losses["loss"]) and math.isfinite(grad_norm):
        return
    saved = (f"The last good checkpoint {last_dir} is untouched: --resume from it" if (last_dir / "state.pt").is_file()
             else f"No checkpoint was saved before it (the first comes at step {eval_every}): start again")
    raise Diverged(f"{stage.name}: non-finite loss {losses['loss']} (grad norm {grad_norm}) at step {step + 1}; "
                   f"stopped before the update. {saved}, perhaps with a lower learning rate.")


@torch.no_grad()
def evaluate_dev(stage, cfg, env, progress):
    """Mean of each loss part over the first cfg.eval_batches dev batches (the same ones every time) over all
    ranks, logged; True when the dev loss is the best so far (progress.best_dev is updated)."""
    stage.model.eval()
    total = None
    for i in range(cfg.eval_batches):
        with env.autocast():
            parts = stage.loss_fn(stage.model, to_device(stage.dev_data.batch(i), env.device))
        vals = torch.stack([v.detach().float() for v in parts.values()])
        total = vals if total is None else total + vals
    stage.model.train()
    if env.ddp:
        dist.all_reduce(total)
    dev = dict(zip(parts, (total / (cfg.eval_batches * env.world_size)).tolist()))
    improved = dev["loss"] < progress.best_dev
    progress.best_dev = min(progress.best_dev, dev["loss"])
    log(env, f"{stage.name} step {progress.step}: dev " + " ".join(f"{k} {v:.4f}" for k, v in dev.items())
        + (" (best)" if improved else ""), stage=stage.name, step=progress.step, **{f"dev_{k}": v for k, v in dev.items()})
    return improved


def save_stage(stage, env, progress, path, opt=None, sched=None):
    """A checkpoint of the stage (rank 0 writes); with the optimizer, the one --resume continues from."""
    if not env.master:
        return
    meta = dict(stage.meta, stage=stage.name, step=progress.step, tokens=progress.tokens, flops=progress.flops,
                dev_loss=progress.best_dev)
    state = None if opt is None else dict(step=progress.step, best_dev=progress.best_dev, tokens=progress.tokens,
                                          flops=progress.flops, optimizer=opt.state_dict(),
                                          scheduler=sched.state_dict(), rng=rng_state())
    save_checkpoint(path, stage.model, stage.tokenizer, meta, state)


def resume(stage, env, last_dir, opt, sched):
    """The weights, optimizer, schedule, random state and progress saved in last_dir. A new learning rate
    (config.check_resume allows only that) takes effect from the step resumed at."""
    if not (last_dir / "state.pt").is_file():
        log(env, f"{stage.name}: nothing to resume in {last_dir}, starting at step 0")
        return Progress()
    saved = json.loads((last_dir / "config.json").read_text())
    if saved["model"] != asdict(stage.model.cfg):
        raise ConfigError(f"--resume: {last_dir} holds a different model ({saved['model']})")
    stage.model.load_state_dict(torch.load(last_dir / "model.pt", map_location=env.device, weights_only=True))
    state = load_state(last_dir)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    progress = Progress(state["step"], state["best_dev"], state["tokens"], state.get("flops", 0.0))
    log(env, f"{stage.name}: resuming from {last_dir} at step {progress.step}/{stage.steps}")
    if sched.base_lrs[0] != stage.lr:
        log(env, f"{stage.name}: peak learning rate {stage.lr} from step {progress.step} on (was {sched.base_lrs[0]})")
        sched.base_lrs = [stage.lr] * len(opt.param_groups)
        for group in opt.param_groups:
            group["initial_lr"], group["lr"] = stage.lr, stage.lr * sched.lr_lambdas[0](progress.step)
    return progress


# -----------------------------------------------------------------------------
# 6. the stages

def pretrain(cfg, env, world_dir, inputs):
    train_docs, dev_docs = inputs.text or pretrain_texts(cfg, world_dir)
    tok_texts = list(train_docs)
    if world_dir is not None and not cfg.text:  # the toy tokenizer also sees the alignment texts (all languages)
        tok_texts += [t for e in align_examples(cfg, world_dir)[0] for t in (e.sent0, e.sent1, e.instruction_text)]
    tokenizer = get_tokenizer(cfg, env, tok_texts)
    model = Decoder(model_config(cfg, tokenizer.get_vocab_size())).to(env.device)
    log(env, f"pretrain: {model.num_params() / 1e6:.2f}M parameters (without embeddings), {len(train_docs):,} "
             f"documents, {cfg.pretrain_steps} steps x {cfg.pretrain_batch_size * cfg.grad_accum} blocks x "
             f"{cfg.block_size} tokens on {env.world_size} x {env.device}")
    meta = dict(model=asdict(model.cfg), train=asdict(cfg), data_dir=str(world_dir) if world_dir else None,
                specials=tokenizer.specials())
    blocks = [pretrain_blocks(d, cfg, env, tokenizer, cfg.pretrain_batch_size) for d in (train_docs, dev_docs)]
    stage = Stage("pretrain", model, tokenizer, lm_loss, *blocks, cfg.pretrain_steps, cfg.pretrain_lr,
                  cfg.pretrain_weight_decay, (0.9, 0.95), meta)
    return train(stage, cfg, env)


def align(cfg, env, world_dir, inputs):
    init = Path(init_dir(cfg))
    model = load_model(init, env.device)
    model.grad_checkpointing = cfg.grad_checkpointing
    tokenizer = data.load_tokenizer(init)
    init_meta = json.loads((init / "config.json").read_text())
    train_ex, dev_ex = inputs.align or align_examples(cfg, world_dir)
    if len(dev_ex) < 2:  # the toy world's (read_inputs checked the flags' files)
        raise ConfigError(f"align: {len(dev_ex)} dev examples; the contrastive dev loss needs at least 2")
    args = dict(tokenizer=tokenizer, batch_size=cfg.align_batch_size, max_len=cfg.max_len, seed=cfg.seed,
                rank=env.rank, world_size=env.world_size, pair_batch_size=cfg.align_pair_batch_size)
    train_data, dev_data = data.AlignData(train_ex, **args), data.AlignData(dev_ex, **args)
    report_long_and_duplicate_rows(env, train_ex, train_data, cfg.max_len)
    if cfg.replay_weight:  # the base model's own pretraining text (or --text): train and dev documents
        files, replay_world = replay_source(cfg)
        texts = inputs.text or pretrain_texts(replace(cfg, text=files), replay_world)
        train_data, dev_data = (ReplayData(d, pretrain_blocks(t, cfg, env, tokenizer, cfg.replay_batch_size))
                                for d, t in zip((train_data, dev_data), texts))
    afp = xalign.AFPConfig(temperature=cfg.temperature, pooling=cfg.pooling, layer=cfg.layer,
                           contrastive_weight=cfg.contrastive_weight, instruction_weight=cfg.instruction_weight,
                           symmetric=cfg.symmetric, tile_size=cfg.contrastive_tile_size or None)
    log(env, f"align: from {init} ({init_meta.get('step')} steps), {len(train_ex):,} training examples, "
             f"{cfg.align_steps} steps x {(cfg.align_pair_batch_size or cfg.align_batch_size) * cfg.grad_accum} pairs "
             f"and {cfg.align_batch_size * cfg.grad_accum} instruction rows, layer {cfg.layer} {cfg.pooling} pooling, "
             f"tau {cfg.temperature}, weights {cfg.contrastive_weight}/{cfg.instruction_weight}"
             + (f", replay {cfg.replay_weight} x {cfg.replay_batch_size} pretraining blocks (not in the paper; "
                "--replay-weight 0 for AFP alone)" if cfg.replay_weight else ""))
    pre_tokens = init_meta.get("tokens")
    meta = dict(model=asdict(model.cfg), train=asdict(cfg), data_dir=str(world_dir) if world_dir else None,
                init=str(init), pretrain_tokens=pre_tokens, specials=tokenizer.specials())
    loss_fn = partial(align_loss, afp=afp, replay_weight=cfg.replay_weight)
    stage = Stage("align", model, tokenizer, loss_fn, train_data, dev_data, cfg.align_steps, cfg.align_lr,
                  cfg.align_weight_decay, (0.9, 0.999), meta)  # HF AdamW betas, as the authors' Trainer
    best, progress = train(stage, cfg, env)
    if hf.is_hf_checkpoint(init) and env.master:  # the aligned model where transformers, lm-eval, vLLM read it
        out = hf.save_hf(load_model(best), tokenizer, Path(cfg.out) / "aligned.hf", base=init)
        log(env, f"align: the best checkpoint in {model.cfg.model_type}'s Hugging Face layout: {out}")
    report_alignment_cost(env, progress, init_meta)
    return best, progress


def report_alignment_cost(env, progress, init_meta):
    """The alignment stage's tokens and training FLOPs as shares of the base model's pretraining (train.py's
    bases record both; the paper's point is that alignment is cheap)."""
    pre_tokens, pre_flops = init_meta.get("tokens"), init_meta.get("flops")
    if pre_tokens:
        log(env, f"align: {progress.tokens:,} alignment tokens = {100 * progress.tokens / pre_tokens:.2f}% of the "
                 f"{pre_tokens:,} pretraining tokens", alignment_tokens=progress.tokens, pretrain_tokens=pre_tokens,
            alignment_share=progress.tokens / pre_tokens)
    if pre_flops:
        log(env, f"align: {progress.flops:.3g} training FLOPs = {100 * progress.flops / pre_flops:.1f}% of "
                 f"pretraining's {pre_flops:.3g}", alignment_flops=progress.flops, pretrain_flops=pre_flops,
            alignment_flops_share=progress.flops / pre_flops)


def report_long_and_duplicate_rows(env, examples, align_data, max_len):
    """Say how many alignment rows --max-len cuts and how many pairs repeat: nothing is dropped unsaid."""
    n_bos = len(align_data.tokenizer.start)
    long_pairs = sum(max(len(x), len(y)) + n_bos + 1 > max_len for x, y, _, _ in align_data.tokens)
    long_rows = sum(len(p) + len(r) + n_bos + 1 > max_len for _, _, p, r in align_data.tokens)
    repeats = len(examples) - len({(e.sent0, e.sent1) for e in examples})
    if long_pairs or long_rows or repeats:
        log(env, f"align: of {len(examples):,} training examples, {long_pairs} pairs and {long_rows} instruction rows "
                 f"are longer than --max-len {max_len} and are cut (a sentence loses its end, a prompt its start, a "
                 f"response its end), and {repeats} pairs repeat an earlier one (kept; never each other's negatives)",
            long_pairs=long_pairs, long_instruction_rows=long_rows, repeated_pairs=repeats)


def report(cfg, env, world_dir):
    """eval.py on base and aligned: the side-by-side tables, and OUT/results.json."""
    import eval as evaluation  # late: only --stage all needs it
    if world_dir is None:
        return log(env, "no toy world to evaluate on: run eval.py on OUT/base and OUT/aligned with --tasks")
    ecfg = evaluation.EvalConfig(device=str(env.device), **(TINY_EVAL if cfg.preset == "tiny" else {}))
    out = Path(cfg.out)
    results = {name: evaluation.evaluate(out / name, world_dir, cfg=ecfg) for name in ("base", "aligned")}
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    log(env, evaluation.markdown_table(results) + f"\nresults: {out / 'results.json'}")
    return results


# -----------------------------------------------------------------------------
# 7. main

def main(argv=None):
    cfg = parse_config(argv, description=__doc__)
    check_inputs(cfg)
    inputs = read_inputs(cfg)  # every error up to here comes before any work
    env = setup_env(cfg)
    try:
        real_data = cfg.text if cfg.stage == "pretrain" else own_alignment_data(cfg)
        if cfg.stage == "all":
            real_data = cfg.text and own_alignment_data(cfg)
        world_dir = None if real_data else prepare_world(cfg, env)
        if cfg.stage in ("pretrain", "all"):
            pretrain(cfg, env, world_dir, inputs)
        if cfg.stage in ("align", "all"):
            align(cfg, env, world_dir, inputs)
        results = report(cfg, env, world_dir) if cfg.stage == "all" and cfg.eval and env.master else None
        barrier(env)  # no rank tears the group down while another still talks to it (not after a crash: that hangs)
        return results
    finally:
        if env.ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, hf.CheckpointError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Diverged as e:
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as e:
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(130)
