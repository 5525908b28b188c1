"""
config.py: train.py's flags (TrainConfig: one flag per field, with its help), the presets, and every check made
on them before any work: values, files, the checkpoint to align, and what --resume may change. A bad one raises
ConfigError, which train.py prints as one line and exit status 2.
"""

import argparse
import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

import data
import hf
from model import Decoder, ModelConfig


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
    data_dir: str = flag("", "an existing toy world (toyworld.py --out DIR); default: build one in OUT/data")
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
    pretrain_steps: int = flag(2400, "optimizer steps")
    pretrain_lr: float = flag(3e-3, "peak learning rate")
    pretrain_batch_size: int = flag(16, "blocks per micro step, over all devices")
    block_size: int = flag(128, "tokens per pretraining block")
    pretrain_weight_decay: float = flag(0.1, "AdamW weight decay (not on biases, norms, embeddings)")
    # alignment (AFP; the paper's values in brackets)
    align_steps: int = flag(300, "optimizer steps [5000]")
    align_lr: float = flag(2e-3, "peak learning rate [1e-5]; chosen on dev with replay on (RESULTS.md)")
    align_batch_size: int = flag(16, "instruction rows per micro step, over all devices [2 per device]")
    align_pair_batch_size: int = flag(512, "contrastive pairs per micro step, over all devices: each pair's "
                                         "in-batch negatives are the other pairs' translations; 0: the pairs of the "
                                         "--align-batch-size rows, as the authors [2 per device]")
    max_len: int = flag(128, "longest pair or instruction row in tokens, longer ones are cut [512]")
    align_weight_decay: float = flag(0.0, "AdamW weight decay [0]")
    temperature: float = flag(0.05, "contrastive temperature tau [0.05]")
    pooling: str = flag("last", "sentence vector: last real token or masked mean [last]", choices=("last", "mean"))
    layer: int = flag(1, "hidden state pooled: 0 = embeddings, i = block i, -1 = top [1]")
    contrastive_weight: float = flag(1.0, "weight of the contrastive term L_MCL [1.0]")
    instruction_weight: float = flag(1.5, "weight of the instruction term L_CIF [1.5]")
    symmetric: bool = flag(False, "contrastive loss in both directions (the authors: x -> y only)")
    contrastive_tile_size: int = flag(0, "compute the contrastive loss in tiles of this many pairs (exact; memory "
                                         "linear in the pairs, for contrastive batches of many thousands); 0: at once")
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


PRESETS = {
    "default": {},
    # the authors' script: lr 1e-5, cosine to 0 after 3% warmup, 5,000 steps, 2 rows per device, whose pairs are
    # the contrastive batch, 512 tokens, clip 1.0, no weight decay, no replay (per-device batch x GPUs: scale
    # --align-batch-size with torchrun)
    "paper": dict(align_lr=1e-5, warmup_ratio=0.03, min_lr_ratio=0.0, align_steps=5000, align_batch_size=2,
                  align_pair_batch_size=0, max_len=512, grad_clip=1.0, align_weight_decay=0.0, temperature=0.05,
                  pooling="last", layer=1, contrastive_weight=1.0, instruction_weight=1.5, replay_weight=0.0,
                  eval_every=500),
    "tiny": dict(world_words=20_000, vocab_size=400, n_layer=2, n_head=2, d_model=32, block_size=64,
                 pretrain_steps=30, pretrain_batch_size=8, pretrain_lr=3e-3, align_steps=10, align_batch_size=8,
                 align_pair_batch_size=0,
                 max_len=64, eval_every=10, eval_batches=2, log_every=5),
}
# the tiny world also shrinks its held-out sets, which are otherwise sized for stable evaluation
TINY_WORLD = dict(n_eval_pairs=(20, 20), n_knowledge=(20, 20), n_sentiment=(20, 20), n_text_docs=8,
                  align_dev_fraction=0.5)
TINY_EVAL = dict(max_items=10, n_pairs=20, shots=(0,))
ARCHS = {"gpt": dict(norm="layernorm", mlp="gelu", pos="learned"),
         "llama": dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False)}
STAGE_DIR = {"pretrain": "base", "align": "aligned"}


class ConfigError(ValueError):
    """A bad flag value, file or checkpoint, found before any work."""


# -----------------------------------------------------------------------------
# flags -> TrainConfig

def build_parser(description=None):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        name, kw = "--" + f.name.replace("_", "-"), dict(f.metadata)
        kw["help"] += f" (default: {f.default})" if f.default not in ((), "") else ""
        if isinstance(f.default, bool):
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, **kw)
        elif isinstance(f.default, tuple):
            p.add_argument(name, nargs="+", default=argparse.SUPPRESS, **kw)
        else:
            p.add_argument(name, type=type(f.default), default=argparse.SUPPRESS, **kw)
    return p


def parse_config(argv=None, description=None):
    """Flags -> TrainConfig: the dataclass defaults, then the preset, then the flags given. description: --help's."""
    args = vars(build_parser(description).parse_args(argv))
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
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
        (cfg.contrastive_weight >= 0 and cfg.instruction_weight >= 0,
         "--contrastive-weight and --instruction-weight must be >= 0"),
        (cfg.contrastive_weight + cfg.instruction_weight > 0,
         "--contrastive-weight and --instruction-weight are both 0: nothing to train"),
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
        (cfg.contrastive_tile_size >= 0, "--contrastive-tile-size must be >= 0 (0: no tiles)"),
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
               "eval_every", "eval_batches", "contrastive_tile_size"}   # (tiles save memory, exact up to rounding)
# flags renamed since: a run saved before the rename keeps its old key in config.json
RENAMED = {"cl_weight": "contrastive_weight", "clm_weight": "instruction_weight"}
# flags of the other stage only, besides its --pretrain-* / --align-* ones: free while this stage resumes
STAGE_ONLY = {"pretrain": {"arch", "n_layer", "n_head", "d_model", "dropout", "vocab_size"},
              "align": {"init", "pairs", "afp_jsonl", "bactrian", "cross_probability", "max_len", "temperature",
                        "pooling", "layer", "contrastive_weight", "instruction_weight", "symmetric", "replay_weight",
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
    effect from the step resumed at; train.resume logs it) and the flags of RESUME_FREE may differ; any other
    change is refused here, before any work, rather than silently ignored."""
    stages = ("pretrain", "align") if cfg.stage == "all" else (cfg.stage,)
    for stage in stages:
        last = Path(cfg.out) / f"{STAGE_DIR[stage]}.last"
        # after a crash between a save's two renames the checkpoint sits at .last.old (recovered later)
        path = next((d / "config.json" for d in (last, last.with_name(last.name + ".old"))
                     if (d / "config.json").is_file()), None)
        if path is None:
            continue
        saved = {RENAMED.get(k, k): v for k, v in json.loads(path.read_text()).get("train", {}).items()}
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
                          "`python toyworld.py --out DIR` or leave --data-dir out")
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
    files, world_dir = meta.get("train", {}).get("text"), meta.get("data_dir")
    if files and all(Path(f).is_file() for f in files):
        return tuple(files), None
    if world_dir and (Path(world_dir) / "pretrain.txt").is_file():
        return (), Path(world_dir)
    return None
