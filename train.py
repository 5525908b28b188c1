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

Run directory (--out):
  data/                      the toy world (data.write_world), unless --data-dir or real data is given
  tokenizer.json             byte-level BPE
  base/  aligned/            best checkpoint of each stage by dev loss (config.json, model.pt, tokenizer.json)
  aligned.hf/                the best aligned checkpoint in its family's Hugging Face layout (HF bases only)
  base.last/  aligned.last/  latest checkpoint + state.pt (optimizer, scheduler, RNG, step), for --resume
  log.jsonl                  every logged step and every dev evaluation
  results.json               eval.py on base and aligned (--stage all)
Every batch is a pure function of the step (data.PretrainData / AlignData), so resuming needs only the step.
"""

import argparse
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import hf
import xalign
from model import Decoder, ModelConfig, load_model


def flag(default, help, **argparse_extras):
    return field(default=default, metadata=dict(help=help, **argparse_extras))


@dataclass
class TrainConfig:
    # run
    stage: str = flag("all", "pretrain: LM from scratch -> OUT/base; align: AFP from --init -> OUT/aligned; "
                             "all: both, then eval.py on both", choices=("pretrain", "align", "all"))
    out: str = flag("runs/default", "run directory")
    init: str = flag("", "align: the checkpoint to align, train.py's (default OUT/base) or a Hugging Face "
                         "directory of a gpt2, xglm, bloom, llama or qwen2 model")
    preset: str = flag("default", "tiny: a seconds-long run for tests; default: the README experiment; paper: "
                                  "the authors' align hyperparameters, for real models (its values are those in "
                                  "brackets below)", choices=("tiny", "default", "paper"))
    resume: bool = flag(False, "continue from OUT/<stage>.last exactly where it stopped")
    seed: int = flag(0, "seed of python, numpy, torch and of the toy world")
    device: str = flag("auto", "auto (cuda when present), cpu, cuda, cuda:1, ...")
    compile: bool = flag(False, "torch.compile the model")
    grad_checkpointing: bool = flag(False, "recompute each block in the backward: less memory for 1B+ models")
    eval: bool = flag(True, "--stage all: evaluate base and aligned with eval.py at the end")
    # data
    data_dir: str = flag("", "an existing toy world (data.py toy --out DIR); default: build one in OUT/data")
    world_words: int = flag(1_500_000, "size of the toy world's pretraining corpus in words")
    text: tuple = flag((), "plain-text files to pretrain on instead of the toy corpus (blank line between docs)")
    pairs: tuple = flag((), "parallel TSV files (sentence TAB translation) to align on")
    afp_jsonl: tuple = flag((), "alignment rows in the authors' JSONL (sent0, sent1, clm_text, clm_prompt_len)")
    bactrian: tuple = flag((), "Bactrian-X JSON files as lang=path (first = pivot) to build instruction data from")
    cross_probability: float = flag(0.5, "chance that an instruction's answer language differs from its "
                                         "question's (paper 0.5)")
    vocab_size: int = flag(2048, "BPE vocabulary size")
    # model (pretraining; align takes the architecture of --init)
    arch: str = flag("gpt", "gpt: LayerNorm, GELU, learned positions; llama: RMSNorm, SwiGLU, RoPE",
                     choices=("gpt", "llama"))
    n_layer: int = flag(4, "transformer blocks")
    n_head: int = flag(4, "attention heads")
    d_model: int = flag(128, "width")
    dropout: float = flag(0.0, "dropout")
    # pretraining
    pretrain_steps: int = flag(1200, "optimizer steps (--steps with --stage pretrain)")
    pretrain_lr: float = flag(3e-3, "peak learning rate (--lr with --stage pretrain)")
    pretrain_batch_size: int = flag(16, "blocks per micro step, over all devices (--batch-size with --stage pretrain)")
    block_size: int = flag(128, "tokens per pretraining block")
    pretrain_weight_decay: float = flag(0.1, "AdamW weight decay (not on biases, norms, embeddings)")
    # alignment (AFP; the paper's values in brackets)
    align_steps: int = flag(450, "optimizer steps [5000] (--steps with --stage align)")
    align_lr: float = flag(2e-3, "peak learning rate [1e-5]; chosen on dev with replay on (--lr with --stage align)")
    align_batch_size: int = flag(16, "translation pairs (and instruction rows) per micro step, over all devices; "
                                     "in-batch negatives = batch - 1 [2 per device] (--batch-size with --stage align)")
    align_pair_batch_size: int = flag(512, "contrastive pairs per micro step when it should differ from "
                                         "--align-batch-size (0: the same rows as the instructions [2 per device])")
    max_len: int = flag(128, "longest pair or instruction row in tokens, longer ones are cut [512]")
    align_weight_decay: float = flag(0.0, "AdamW weight decay [0]")
    temperature: float = flag(0.05, "contrastive temperature tau [0.05]")
    pooling: str = flag("last", "sentence vector: last real token or masked mean [last]", choices=("last", "mean"))
    layer: int = flag(1, "hidden state pooled: 0 = embeddings, i = block i, -1 = top [1]")
    cl_weight: float = flag(1.0, "weight of the contrastive term L_MCL [1.0]")
    clm_weight: float = flag(1.5, "weight of the instruction term L_CIF [1.5]")
    symmetric: bool = flag(False, "contrastive loss in both directions (the authors: x -> y only)")
    replay_weight: float = flag(1.0, "NOT in the paper: weight of a causal-LM loss on --replay-batch-size blocks "
                                     "of the base model's pretraining text, added to each alignment step against "
                                     "forgetting; 0 = the paper's method alone. The blocks count as alignment tokens")
    replay_batch_size: int = flag(16, "pretraining blocks per alignment step for --replay-weight")
    # both stages
    warmup_ratio: float = flag(0.03, "linear warmup over this share of the steps, then cosine [0.03]")
    min_lr_ratio: float = flag(0.1, "the cosine ends at this fraction of the peak learning rate")
    grad_accum: int = flag(1, "micro steps per optimizer step [1]")
    grad_clip: float = flag(1.0, "clip the gradient norm to this (0 = off) [1.0]")
    eval_every: int = flag(0, "dev evaluation (and checkpoint) every this many steps and at the end; 0: 5 per stage")
    eval_batches: int = flag(8, "dev batches per evaluation")
    log_every: int = flag(10, "log a train step to log.jsonl every this many steps")
    # testing hooks
    debug_nan_at_step: int = flag(0, "testing: make the loss NaN at this step")
    debug_interrupt_at_step: int = flag(0, "testing: send ourselves SIGINT (Ctrl-C) at this step")


PRESETS = {
    "default": {},
    # the authors' script: lr 1e-5, cosine to 0 after 3% warmup, 5,000 steps, 2 rows per device, whose pairs are
    # the contrastive batch, 512 tokens, clip 1.0, no weight decay, no replay (per-device batch x GPUs: scale
    # --align-batch-size with torchrun)
    "paper": dict(align_lr=1e-5, warmup_ratio=0.03, min_lr_ratio=0.0, align_steps=5000, align_batch_size=2,
                  align_pair_batch_size=0, max_len=512, grad_clip=1.0, align_weight_decay=0.0, temperature=0.05,
                  pooling="last", layer=1, cl_weight=1.0, clm_weight=1.5, replay_weight=0.0, eval_every=500),
    "tiny": dict(world_words=20_000, vocab_size=400, n_layer=2, n_head=2, d_model=32, block_size=64,
                 pretrain_steps=30, pretrain_batch_size=8, pretrain_lr=3e-3, align_steps=10, align_batch_size=8,
                 align_pair_batch_size=0,
                 max_len=64, eval_every=10, eval_batches=2, log_every=5),
}
# the tiny world also shrinks its held-out sets, which are otherwise sized for stable evaluation
TINY_WORLD = dict(n_eval_pairs=(20, 20), n_pawsx=(20, 20), n_text_docs=8, align_dev_fraction=0.5)
TINY_EVAL = dict(max_items=10, n_pairs=20, shots=(0,))
ARCHS = {"gpt": dict(norm="layernorm", mlp="gelu", pos="learned"),
         "llama": dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False)}
SHORTHANDS = ("steps", "lr", "batch_size", "weight_decay")  # --steps etc. set the field of the one stage run
STAGE_DIR = {"pretrain": "base", "align": "aligned"}


class ConfigError(ValueError):
    """A bad flag value, file or checkpoint, found before any work."""


class Diverged(RuntimeError):
    """The loss became NaN or inf."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C: a resumable checkpoint was saved."""


# -----------------------------------------------------------------------------
# command line

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        name, kw = "--" + f.name.replace("_", "-"), dict(f.metadata)
        kw["help"] += f" (default: {f.default})" if f.default not in ((), "") else ""
        if isinstance(f.default, bool):
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, **kw)
        elif isinstance(f.default, tuple):
            p.add_argument(name, nargs="+", default=argparse.SUPPRESS, **kw)
        else:
            p.add_argument(name, type=type(f.default), default=argparse.SUPPRESS, **kw)
    g = p.add_argument_group("shorthands for the one stage of --stage pretrain or --stage align")
    g.add_argument("--steps", type=int, default=argparse.SUPPRESS, help="--pretrain-steps or --align-steps")
    g.add_argument("--lr", type=float, default=argparse.SUPPRESS, help="--pretrain-lr or --align-lr")
    g.add_argument("--batch-size", type=int, default=argparse.SUPPRESS, help="--pretrain- or --align-batch-size")
    g.add_argument("--weight-decay", type=float, default=argparse.SUPPRESS, help="--pretrain- or --align-weight-decay")
    return p


def parse_config(argv=None):
    """Flags -> TrainConfig: the dataclass defaults, then the preset, then the flags given."""
    args = vars(build_parser().parse_args(argv))
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items() if k not in SHORTHANDS}
    stage = given.get("stage", "all")
    for short in SHORTHANDS:
        if short in args:
            if stage == "all":
                raise ConfigError(f"--{short.replace('_', '-')} needs --stage pretrain or align; with --stage all "
                                  f"use --pretrain-{short.replace('_', '-')} and --align-{short.replace('_', '-')}")
            given[f"{stage}_{short}"] = args[short]
    cfg = TrainConfig(**{**PRESETS[given.get("preset", "default")], **given})
    if cfg.stage == "align" and not cfg.text and "replay_weight" not in given and hf.is_hf_checkpoint(init_dir(cfg)):
        cfg = replace(cfg, replay_weight=0.0)  # a Hugging Face base carries no pretraining text to replay
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Value checks that need no file, so a typo fails at once."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    checks = [
        (cfg.pretrain_steps > 0 and cfg.align_steps > 0, "steps must be positive"),
        (cfg.pretrain_lr > 0 and cfg.align_lr > 0, "the learning rate must be positive"),
        (cfg.pretrain_batch_size > 0 and cfg.align_batch_size > 0, "the batch size must be positive"),
        (cfg.pretrain_weight_decay >= 0 and cfg.align_weight_decay >= 0, "weight decay must be >= 0"),
        (min(cfg.block_size, cfg.max_len) >= 8, "--block-size and --max-len must be at least 8"),
        (0 <= cfg.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {cfg.warmup_ratio}"),
        (0 <= cfg.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}"),
        (cfg.grad_accum >= 1, "--grad-accum must be >= 1"),
        (cfg.grad_clip >= 0, "--grad-clip must be >= 0"),
        (cfg.eval_every >= 0 and min(cfg.eval_batches, cfg.log_every) >= 1,
         "--eval-every must be >= 0, --eval-batches and --log-every >= 1"),
        (cfg.temperature > 0, f"--temperature must be > 0, got {cfg.temperature}"),
        (cfg.cl_weight >= 0 and cfg.clm_weight >= 0, "--cl-weight and --clm-weight must be >= 0"),
        (cfg.cl_weight + cfg.clm_weight > 0, "--cl-weight and --clm-weight are both 0: nothing to train"),
        (0 <= cfg.cross_probability <= 1, f"--cross-probability must be in [0, 1], got {cfg.cross_probability}"),
        (cfg.vocab_size >= 300, "--vocab-size must be at least 300 (256 bytes + specials + merges)"),
        (cfg.world_words >= 1000, "--world-words must be at least 1000"),
        (0 <= cfg.dropout < 1, "--dropout must be in [0, 1)"),
        (not (cfg.init and cfg.stage != "align"), "--init is for --stage align (--stage all pretrains its own base)"),
        (all("=" in b for b in cfg.bactrian), "--bactrian takes lang=path items, e.g. en=en.json zh=zh.json"),
        (len(cfg.bactrian) != 1, "--bactrian needs two languages or more (the first is the pivot), e.g. "
                                 "en=en.json zh=zh.json"),
        ((cfg.align_pair_batch_size or cfg.align_batch_size) >= 2,
         "the contrastive term needs 2 pairs or more a step (--align-batch-size / --align-pair-batch-size): "
         "the other pairs are its negatives"),
        (cfg.align_pair_batch_size >= 0, "--align-pair-batch-size must be >= 0"),
        (cfg.pretrain_batch_size % world_size == 0 and cfg.align_batch_size % world_size == 0
         and cfg.align_pair_batch_size % world_size == 0,
         f"batch sizes are global: they must be divisible by the {world_size} processes"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    try:
        device = torch.device("cpu" if cfg.device == "auto" else cfg.device)
    except RuntimeError:
        raise ConfigError(f"--device {cfg.device!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device}: CUDA is not available here")
    if cfg.stage != "align":  # the architecture is ours to build: validate it now
        try:
            model_config(cfg, cfg.vocab_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        check_layer(cfg, cfg.n_layer)


# flags that change no result, which --resume accepts changed (with the stage's learning rate)
RESUME_FREE = {"stage", "preset", "resume", "out", "device", "compile", "eval", "grad_checkpointing", "log_every",
               "eval_every", "eval_batches", "debug_nan_at_step", "debug_interrupt_at_step"}
# flags of the other stage only, besides its --pretrain-* / --align-* ones: free while this stage resumes
STAGE_ONLY = {"pretrain": {"arch", "n_layer", "n_head", "d_model", "dropout", "vocab_size"},
              "align": {"init", "pairs", "afp_jsonl", "bactrian", "cross_probability", "max_len", "temperature",
                        "pooling", "layer", "cl_weight", "clm_weight", "symmetric", "replay_weight",
                        "replay_batch_size"}}


def same_setting(key, saved, now, out):
    """Whether a flag's saved value and its value now mean the same: paths compare resolved, lists as tuples,
    --init "" as the OUT/base it stands for."""
    if key == "init":
        saved, now = (Path(v or Path(out) / "base").resolve() for v in (saved, now))
    elif key in ("text", "pairs", "afp_jsonl", "data_dir"):
        norm = lambda v: tuple(str(Path(p).resolve()) for p in v) if isinstance(v, (list, tuple)) else \
            (str(Path(v).resolve()) if v else v)
        saved, now = norm(saved), norm(now)
    return (tuple(saved) if isinstance(saved, list) else saved) == (tuple(now) if isinstance(now, list) else now)


def check_resume(cfg):
    """--resume continues a run with the flags it started with. Only the stage's learning rate (which takes
    effect from the step resumed at; train_stage logs it) and the flags of RESUME_FREE may differ; any other
    change is refused here, before any work, rather than silently ignored."""
    stages = ("pretrain", "align") if cfg.stage == "all" else (cfg.stage,)
    for stage in stages:
        last = Path(cfg.out) / f"{STAGE_DIR[stage]}.last"
        # after a crash between a save's two renames the checkpoint sits at .last.old-PID (recovered later)
        path = next((d / "config.json" for d in [last, *sorted(last.parent.glob(f"{last.name}.old-*"))]
                     if (d / "config.json").is_file()), None)
        if path is None:
            continue
        saved = json.loads(path.read_text()).get("train", {})
        other = {"pretrain": "align", "align": "pretrain"}[stage]     # the other stage's flags may differ
        for k, v in asdict(cfg).items():
            if k in RESUME_FREE or k == f"{stage}_lr" or k.startswith(other + "_") or k in STAGE_ONLY[other] \
                    or k not in saved or same_setting(k, saved[k], v, cfg.out):
                continue
            preset = f" (the preset was {saved.get('preset')!r}, now {cfg.preset!r})" \
                if saved.get("preset", cfg.preset) != cfg.preset else ""
            raise ConfigError(f"--resume: --{k.replace('_', '-')} was {saved[k]!r} when {last} was saved, now "
                              f"{v!r}{preset}; a run resumes with the flags it started with (only --{stage}-lr and "
                              f"{', '.join('--' + f.replace('_', '-') for f in sorted(RESUME_FREE))} may change)")


def check_layer(cfg, n_layer):
    if not -n_layer - 1 <= cfg.layer <= n_layer:
        raise ConfigError(f"--layer {cfg.layer} is out of range for a model of {n_layer} blocks "
                          f"(0..{n_layer}, or -{n_layer + 1}..-1)")


def model_config(cfg, vocab_size):
    return ModelConfig(vocab_size=vocab_size, max_seq_len=max(cfg.block_size, cfg.max_len), n_layer=cfg.n_layer,
                       n_head=cfg.n_head, d_model=cfg.d_model, dropout=cfg.dropout, **ARCHS[cfg.arch])


def check_inputs(cfg):
    """The files named by flags, and the --init checkpoint (loadable, and fits the flags)."""
    files = list(cfg.text) + list(cfg.pairs) + list(cfg.afp_jsonl) + [b.split("=", 1)[1] for b in cfg.bactrian]
    for path in files:
        if not Path(path).is_file():
            raise ConfigError(f"no such file: {path}")
    if cfg.data_dir and not (Path(cfg.data_dir) / "world.json").is_file():
        raise ConfigError(f"--data-dir {cfg.data_dir} is not a toy world (no world.json); make one with "
                          "`python data.py toy --out DIR` or leave --data-dir out")
    if cfg.resume:
        check_resume(cfg)
    if cfg.replay_weight < 0 or (cfg.replay_weight and cfg.replay_batch_size < 1):
        raise ConfigError(f"--replay-weight {cfg.replay_weight} must be >= 0, with --replay-batch-size >= 1")
    if cfg.stage != "align":
        return
    init = Path(init_dir(cfg))
    if hf.is_hf_checkpoint(init):
        mcfg = check_hf_init(cfg, init)
    else:
        mcfg = check_own_init(cfg, init)
    check_layer(cfg, mcfg.n_layer)
    if cfg.max_len > mcfg.max_seq_len:
        raise ConfigError(f"--max-len {cfg.max_len} exceeds the init model's max_seq_len {mcfg.max_seq_len}")
    if cfg.replay_weight and replay_source(cfg) is None:
        where = ("is a Hugging Face checkpoint, which carries no pretraining text" if mcfg.model_type else
                 "names no pretraining text that exists here in its config.json")
        raise ConfigError(f"--replay-weight {cfg.replay_weight} replays the base model's pretraining text, but "
                          f"{init} {where}: give it with --text, or turn replay off with --replay-weight 0 "
                          "(the paper's method alone)")
    if cfg.replay_weight and cfg.block_size > mcfg.max_seq_len:
        raise ConfigError(f"--block-size {cfg.block_size} (replayed blocks) exceeds the init model's max_seq_len "
                          f"{mcfg.max_seq_len}")


def check_own_init(cfg, init):
    """A checkpoint of train.py: loadable, and its tokenizer fits. Returns its ModelConfig."""
    missing = [n for n in ("config.json", "model.pt", "tokenizer.json") if not (init / n).is_file()]
    if missing:
        hint = "" if cfg.init else " (give --init CKPT, or run --stage pretrain with this --out first)"
        raise ConfigError(f"--init {init}: not a checkpoint directory, missing {', '.join(missing)}{hint}")
    try:
        mcfg = ModelConfig(**json.loads((init / "config.json").read_text())["model"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--init {init}: incompatible config.json ({e})") from None
    with torch.device("meta"):  # shapes only, no memory
        expected = {k: tuple(v.shape) for k, v in Decoder(mcfg).state_dict().items()}
    saved = torch.load(init / "model.pt", map_location="cpu", weights_only=True, mmap=True)
    if {k: tuple(v.shape) for k, v in saved.items()} != expected:
        raise ConfigError(f"--init {init}: model.pt does not match the model of its config.json")
    if data.load_tokenizer(init).get_vocab_size() != mcfg.vocab_size:
        raise ConfigError(f"--init {init}: tokenizer.json does not match the model's vocab_size {mcfg.vocab_size}")
    return mcfg


def check_hf_init(cfg, init):
    """A Hugging Face checkpoint: a supported family, weights and tokenizer present, alignment data given.
    Returns its ModelConfig. (A tensor that is missing or misshapen is named when the weights are read.)"""
    try:
        mcfg = hf.config_from_hf(hf.read_config(init), init / "config.json")
        hf.weight_files(init)
        tokenizer = data.load_tokenizer(init)
    except (hf.CheckpointError, ValueError, FileNotFoundError) as e:
        raise ConfigError(f"--init {init}: {e}") from None
    if tokenizer.get_vocab_size() > mcfg.vocab_size:
        raise ConfigError(f"--init {init}: tokenizer.json has {tokenizer.get_vocab_size()} tokens, more than the "
                          f"model's vocab_size {mcfg.vocab_size}")
    if not own_alignment_data(cfg):
        raise ConfigError(f"--init {init} is a Hugging Face checkpoint: give its alignment data with --pairs, "
                          "--afp-jsonl or --bactrian (the toy world is for the models pretrained here)")
    return mcfg


def own_alignment_data(cfg):
    """The alignment files given by flags (empty: the toy world's)."""
    return cfg.pairs or cfg.afp_jsonl or cfg.bactrian


def init_dir(cfg):
    return cfg.init or str(Path(cfg.out) / "base")


def replay_source(cfg):
    """(text files, world dir) for pretrain_texts to replay: --text, else the --init model's own pretraining text
    as its config.json records it (its --text files or its toy world); None if that is not on this machine."""
    if cfg.text:
        return cfg.text, None
    if hf.is_hf_checkpoint(init_dir(cfg)):  # a Hugging Face base carries no pretraining text
        return None
    meta = json.loads((Path(init_dir(cfg)) / "config.json").read_text())
    files, world = meta.get("train", {}).get("text"), meta.get("data_dir")
    if files and all(Path(f).is_file() for f in files):
        return tuple(files), None
    if world and (Path(world) / "pretrain.txt").is_file():
        return (), Path(world)
    return None


# -----------------------------------------------------------------------------
# data

def prepare_world(cfg, env):
    """The toy world's directory: --data-dir, the base model's world (align), or OUT/data, built now."""
    if cfg.data_dir:
        return Path(cfg.data_dir)
    if cfg.stage == "align":  # the world the base model was pretrained on, whose words its tokenizer knows
        base_world = json.loads((Path(init_dir(cfg)) / "config.json").read_text()).get("data_dir")
        if base_world and (Path(base_world) / "world.json").is_file():
            return Path(base_world)
    world_dir = Path(cfg.out) / "data"
    wcfg = data.WorldConfig(seed=cfg.seed, pretrain_tokens=cfg.world_words, cross_probability=cfg.cross_probability,
                            **(TINY_WORLD if cfg.preset == "tiny" else {}))
    if env.master:  # deterministic from wcfg, and built in seconds
        t0 = time.time()
        data.write_world(data.build_world(wcfg), world_dir)
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
    for path, read in [(p, partial(translation_examples, seed=cfg.seed)) for p in cfg.pairs] + \
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


def translation_examples(path, seed):
    """Pairs of a TSV as AFP rows: the pair for L_MCL, and as instruction "{a} Translate into {B}: {b}" in a
    random direction for L_CIF. Language names come from a file name like en-zh.tsv, else "{a} = {b}"."""
    codes = Path(path).name.split(".")[0].split("-")
    names = [data.LANGUAGE_NAMES.get(c) for c in codes] if len(codes) == 2 else [None, None]
    rng, out = random.Random(seed), []
    for src, tgt in data.read_parallel_tsv(path):
        flip = rng.random() < 0.5
        a, b, name = (tgt, src, names[0]) if flip else (src, tgt, names[1])
        prompt = f"{a} Translate into {name}:" if all(names) else f"{a} ="
        out.append(data.AlignExample(src, tgt, f"{prompt} {b}", len(prompt)))
    return out


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
# the two objectives: a batch -> dict of scalar losses, "loss" being the one to minimise

def lm_loss(model, batch):
    logits = model(batch["input_ids"], batch["attention_mask"]).logits          # (B, T, V)
    return {"loss": xalign.clm_loss(logits, batch["labels"])}


def align_loss(model, batch, afp, replay_weight=0.0):
    out = xalign.afp_loss(model, batch, afp)
    parts = {"loss": out.total, "cl": out.contrastive, "clm": out.instruction}
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


# -----------------------------------------------------------------------------
# optimizer, schedule, checkpoints

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


def save_checkpoint(path, model, tokenizer, meta, state=None):
    """Write into a temp directory, fsync, then swap it in: a crash leaves the old checkpoint or the new one."""
    path = Path(path)
    tmp, old = path.with_name(f"{path.name}.tmp-{os.getpid()}"), path.with_name(f"{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(model.state_dict(), tmp / "model.pt")
    (tmp / "config.json").write_text(json.dumps(meta, indent=1))
    tokenizer.save(str(tmp / "tokenizer.json"))
    if state is not None:
        torch.save(state, tmp / "state.pt")
    for f in [*tmp.iterdir(), tmp]:
        fsync(f)
    if path.exists():
        os.replace(path, old)  # a directory cannot be renamed over a non-empty one: move the old one aside
    os.replace(tmp, path)
    fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def recover_checkpoint(path):
    """After a crash between the two renames of save_checkpoint the previous checkpoint sits at <path>.old-PID:
    put it back. Leftovers of a crashed save (<path>.tmp-PID, half written, and other .old-PID) are removed."""
    if not path.exists():
        for old in sorted(path.parent.glob(f"{path.name}.old-*")):
            os.replace(old, path)
            break
    for leftover in [*path.parent.glob(f"{path.name}.tmp-*"), *path.parent.glob(f"{path.name}.old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    return path


def rng_state():
    """Every random state as tensors, numbers and lists, so that state.pt loads with weights_only=True."""
    version, mt, gauss = random.getstate()
    key, keys, pos, has_gauss, cached = np.random.get_state()
    return dict(python=[version, list(mt), gauss], numpy=[key, torch.from_numpy(keys.astype(np.int64)), pos,
                                                         has_gauss, cached],
                torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(s):
    version, mt, gauss = s["python"]
    random.setstate((version, tuple(mt), gauss))
    key, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((key, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# -----------------------------------------------------------------------------
# processes, devices, logging

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


class StopFlag:
    """Ctrl-C (or SIGTERM) during training asks for a checkpoint at the end of the step; a second one quits at once."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"\n{signal.Signals(signum).name}: saving a resumable checkpoint after this step "
                   "(again to quit without saving)")


# -----------------------------------------------------------------------------
# the loop

@torch.no_grad()
def dev_loss(model, loss_fn, dev_data, n_batches, env):
    """Mean of each loss part over the first n_batches dev batches (the same ones every time), over all ranks."""
    model.eval()
    total = None
    for i in range(n_batches):
        with env.autocast():
            parts = loss_fn(model, to_device(dev_data.batch(i), env.device))
        vals = torch.stack([v.detach().float() for v in parts.values()])
        total = vals if total is None else total + vals
    model.train()
    if env.ddp:
        dist.all_reduce(total)
    return dict(zip(parts, (total / (n_batches * env.world_size)).tolist()))


def train_stage(stage, cfg, env, model, tokenizer, loss_fn, train_data, dev_data, hp, meta):
    """Train model for hp["steps"] optimizer steps. Keeps OUT/<dir> (best dev loss) and OUT/<dir>.last (latest,
    resumable). Returns (path of the best checkpoint, tokens trained on)."""
    out = Path(cfg.out)
    best_dir, last_dir = out / STAGE_DIR[stage], out / f"{STAGE_DIR[stage]}.last"
    if env.master:                                      # a crash may have left either half swapped
        recover_checkpoint(best_dir)
        recover_checkpoint(last_dir)
    barrier(env)
    steps = hp["steps"]
    eval_every = cfg.eval_every or max(1, steps // 5)
    opt = make_optimizer(model, hp["lr"], hp["weight_decay"], hp["betas"], env.device)
    warmup = math.ceil(cfg.warmup_ratio * steps)
    schedule = partial(lr_factor, steps=steps, warmup=warmup, floor=cfg.min_lr_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    step, best, tokens = 0, math.inf, 0

    if cfg.resume and not (last_dir / "state.pt").is_file():
        log(env, f"{stage}: nothing to resume in {last_dir}, starting at step 0")
    elif cfg.resume:
        saved = json.loads((last_dir / "config.json").read_text())
        if saved["model"] != asdict(model.cfg):
            raise ConfigError(f"--resume: {last_dir} holds a different model ({saved['model']})")
        model.load_state_dict(torch.load(last_dir / "model.pt", map_location=env.device, weights_only=True))
        try:  # tensors, numbers, strings, lists and dicts only: a pickled object is refused, never run
            state = torch.load(last_dir / "state.pt", map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several kinds for a truncated or foreign file
            raise ConfigError(f"--resume: {last_dir / 'state.pt'} does not load safely (weights_only): not a state "
                              "file of this project, or one written before xalign stored its random state as tensors "
                              f"and lists, which cannot be resumed: start the stage again ({type(e).__name__})") from None
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step, best, tokens = state["step"], state["best_dev"], state["tokens"]
        log(env, f"{stage}: resuming from {last_dir} at step {step}/{steps}")
        if sched.base_lrs[0] != hp["lr"]:  # --resume with another learning rate: the schedule continues at it
            log(env, f"{stage}: peak learning rate {hp['lr']} from step {step} on (was {sched.base_lrs[0]})")
            sched.base_lrs = [hp["lr"]] * len(opt.param_groups)
            for group in opt.param_groups:
                group["initial_lr"], group["lr"] = hp["lr"], hp["lr"] * schedule(step)
    if step >= steps:
        log(env, f"{stage}: already done ({step} steps), best checkpoint {best_dir}")
        return best_dir, tokens

    def checkpoint(path, with_state):
        m = dict(meta, stage=stage, step=step, tokens=tokens, dev_loss=best)
        state = None
        if with_state:
            state = dict(step=step, best_dev=best, tokens=tokens, optimizer=opt.state_dict(),
                         scheduler=sched.state_dict(), rng=rng_state())
        if env.master:
            save_checkpoint(path, model, tokenizer, m, state)

    # the pair rows never reach the blocks above the pooled layer: without L_CIF those get no gradient
    unused = stage == "align" and cfg.clm_weight == 0
    fwd = torch.compile(model) if cfg.compile else model
    if env.ddp:
        fwd = DDP(fwd, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                  find_unused_parameters=unused)
    stop = StopFlag()
    in_main = threading.current_thread() is threading.main_thread()  # where Python delivers signals
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    bar = tqdm(total=steps, initial=step, desc=stage, disable=not env.master, dynamic_ncols=True)
    t_log, tok_log = time.time(), 0
    try:
        while step < steps:
            # ---- forward / backward over the micro steps; batch index = position in the data stream
            parts_sum, n_tok = None, 0
            for micro in range(cfg.grad_accum):
                batch = train_data.batch(step * cfg.grad_accum + micro)
                n_tok += n_tokens(batch)
                batch = to_device(batch, env.device)
                if env.ddp:  # all-reduce the gradients on the last micro step only
                    fwd.require_backward_grad_sync = micro == cfg.grad_accum - 1
                with env.autocast():
                    parts = loss_fn(fwd, batch)
                if step + 1 == cfg.debug_nan_at_step:
                    parts["loss"] = parts["loss"] * float("nan")
                (parts["loss"] / cfg.grad_accum).backward()
                vals = torch.stack([v.detach().float() for v in parts.values()])
                parts_sum = vals if parts_sum is None else parts_sum + vals
            # ---- one all-reduce: the mean loss parts and the token count over ranks
            stats = torch.cat([parts_sum / cfg.grad_accum, torch.tensor([float(n_tok)], device=parts_sum.device)])
            if env.ddp:
                dist.all_reduce(stats)
                stats[:-1] /= env.world_size
            losses = dict(zip(parts, stats[:-1].tolist()))
            grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf))
            if not (math.isfinite(losses["loss"]) and math.isfinite(grad_norm)):
                saved = (f"The last good checkpoint {last_dir} is untouched (--resume from it, perhaps with a lower "
                         "learning rate)" if (last_dir / "state.pt").is_file() else
                         f"No checkpoint was saved before it (the first comes at step {eval_every}): start again, "
                         "perhaps with a lower learning rate")
                raise Diverged(f"{stage}: non-finite loss {losses['loss']} (grad norm {grad_norm}) at step {step + 1}; "
                               f"stopped before the update. {saved}")
            lr = opt.param_groups[0]["lr"]  # the rate this update uses
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens += int(stats[-1])
            tok_log += int(stats[-1])
            bar.update(1)

            # ---- log, evaluate on dev, checkpoint
            if step % cfg.log_every == 0 or step == steps:
                tok_s = tok_log / (time.time() - t_log)
                t_log, tok_log = time.time(), 0
                bar.set_postfix({**{k: f"{v:.3f}" for k, v in losses.items()}, "lr": f"{lr:.1e}",
                                 "tok/s": f"{tok_s:.0f}"})
                log(env, "", stage=stage, step=step, **losses, lr=lr, grad_norm=grad_norm, tokens=tokens,
                    tok_s=round(tok_s, 1), time=time.time())
            if step % eval_every == 0 or step == steps:
                dev = dev_loss(model, loss_fn, dev_data, cfg.eval_batches, env)
                improved = dev["loss"] < best
                best = min(best, dev["loss"])
                log(env, f"{stage} step {step}: dev " + " ".join(f"{k} {v:.4f}" for k, v in dev.items())
                    + (" (best)" if improved else ""),
                    stage=stage, step=step, **{f"dev_{k}": v for k, v in dev.items()})
                if improved:
                    checkpoint(best_dir, with_state=False)
                checkpoint(last_dir, with_state=True)
            if step == cfg.debug_interrupt_at_step and in_main:
                os.kill(os.getpid(), signal.SIGINT)
            # ---- Ctrl-C: every rank must agree to stop, at the same step
            flag_t = torch.tensor([float(stop.requested)], device=env.device)
            if env.ddp:
                dist.all_reduce(flag_t)
            if flag_t.item() > 0:
                checkpoint(last_dir, with_state=True)
                raise Interrupted(f"{stage}: interrupted at step {step}/{steps}; checkpoint saved to {last_dir}, "
                                  f"continue with --resume")
    finally:
        bar.close()
        for s, handler in old_handlers.items():
            signal.signal(s, handler)
    return best_dir, tokens


# -----------------------------------------------------------------------------
# the stages

def pretrain(cfg, env, world_dir, inputs):
    train_docs, dev_docs = inputs.text or pretrain_texts(cfg, world_dir)
    tok_texts = list(train_docs)
    if world_dir is not None and not cfg.text:  # the toy tokenizer also sees the alignment texts (all languages)
        tok_texts += [t for e in align_examples(cfg, world_dir)[0] for t in (e.sent0, e.sent1, e.clm_text)]
    tokenizer = get_tokenizer(cfg, env, tok_texts)
    model = Decoder(model_config(cfg, tokenizer.get_vocab_size())).to(env.device)
    args = dict(tokenizer=tokenizer, block_size=cfg.block_size, batch_size=cfg.pretrain_batch_size, seed=cfg.seed,
                rank=env.rank, world_size=env.world_size)
    train_data, dev_data = data.PretrainData(train_docs, **args), data.PretrainData(dev_docs, **args)
    log(env, f"pretrain: {model.num_params() / 1e6:.2f}M parameters (without embeddings), {len(train_docs):,} "
             f"documents, {cfg.pretrain_steps} steps x {cfg.pretrain_batch_size * cfg.grad_accum} blocks x "
             f"{cfg.block_size} tokens on {env.world_size} x {env.device}")
    hp = dict(steps=cfg.pretrain_steps, lr=cfg.pretrain_lr, weight_decay=cfg.pretrain_weight_decay, betas=(0.9, 0.95))
    meta = dict(model=asdict(model.cfg), train=asdict(cfg), data_dir=str(world_dir) if world_dir else None,
                specials=tokenizer.specials())
    return train_stage("pretrain", cfg, env, model, tokenizer, lm_loss, train_data, dev_data, hp, meta)


def align(cfg, env, world_dir, inputs):
    init = Path(init_dir(cfg))
    model = load_model(init, env.device)
    model.grad_checkpointing = cfg.grad_checkpointing
    tokenizer = data.load_tokenizer(init)
    init_meta = json.loads((init / "config.json").read_text())
    train_ex, dev_ex = inputs.align or align_examples(cfg, world_dir)
    if len(dev_ex) < 2:
        raise ConfigError(f"align: {len(dev_ex)} dev examples; the contrastive dev loss needs at least 2")
    args = dict(tokenizer=tokenizer, batch_size=cfg.align_batch_size, max_len=cfg.max_len, seed=cfg.seed,
                rank=env.rank, world_size=env.world_size, pair_batch_size=cfg.align_pair_batch_size)
    train_data, dev_data = data.AlignData(train_ex, **args), data.AlignData(dev_ex, **args)
    report_long_and_duplicate_rows(env, train_ex, train_data, cfg.max_len)
    if cfg.replay_weight:  # the base model's own pretraining text (or --text): train and dev documents
        files, world = replay_source(cfg)
        texts = inputs.text or pretrain_texts(replace(cfg, text=files), world)
        args = dict(tokenizer=tokenizer, block_size=cfg.block_size, batch_size=cfg.replay_batch_size, seed=cfg.seed,
                    rank=env.rank, world_size=env.world_size)
        train_data, dev_data = (ReplayData(d, data.PretrainData(t, **args))
                                for d, t in zip((train_data, dev_data), texts))
    afp = xalign.AFPConfig(temperature=cfg.temperature, pooling=cfg.pooling, layer=cfg.layer,
                           cl_weight=cfg.cl_weight, clm_weight=cfg.clm_weight, symmetric=cfg.symmetric)
    log(env, f"align: from {init} ({init_meta.get('step')} steps), {len(train_ex):,} training examples, "
             f"{cfg.align_steps} steps x {(cfg.align_pair_batch_size or cfg.align_batch_size) * cfg.grad_accum} pairs "
             f"and {cfg.align_batch_size * cfg.grad_accum} instruction rows, layer "
             f"{cfg.layer} {cfg.pooling} pooling, tau {cfg.temperature}, weights {cfg.cl_weight}/{cfg.clm_weight}"
             + (f", replay {cfg.replay_weight} x {cfg.replay_batch_size} pretraining blocks (not in the paper; "
                "--replay-weight 0 for AFP alone)" if cfg.replay_weight else ""))
    # HF AdamW betas, as the authors' Trainer
    hp = dict(steps=cfg.align_steps, lr=cfg.align_lr, weight_decay=cfg.align_weight_decay, betas=(0.9, 0.999))
    pre_tokens = init_meta.get("tokens")
    meta = dict(model=asdict(model.cfg), train=asdict(cfg), data_dir=str(world_dir) if world_dir else None,
                init=str(init), pretrain_tokens=pre_tokens, specials=tokenizer.specials())
    loss_fn = partial(align_loss, afp=afp, replay_weight=cfg.replay_weight)
    best, tokens = train_stage("align", cfg, env, model, tokenizer, loss_fn, train_data, dev_data, hp, meta)
    if hf.is_hf_checkpoint(init) and env.master:  # the aligned model where transformers, lm-eval, vLLM read it
        out = hf.save_hf(load_model(best), tokenizer, Path(cfg.out) / "aligned.hf", base=init)
        log(env, f"align: the best checkpoint in {model.cfg.model_type}'s Hugging Face layout: {out}")
    if pre_tokens:
        log(env, f"align: {tokens:,} alignment tokens = {100 * tokens / pre_tokens:.2f}% of the {pre_tokens:,} "
                 "pretraining tokens", alignment_tokens=tokens, pretrain_tokens=pre_tokens,
            alignment_share=tokens / pre_tokens)
    return best, tokens


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


def main(argv=None):
    cfg = parse_config(argv)
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
        if cfg.stage == "all" and cfg.eval and env.master:
            return report(cfg, env, world_dir)
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
