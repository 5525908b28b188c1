"""
hf.py: Hugging Face checkpoints of five model families read as model.Decoder, and written back, without the
transformers package.

    model = load_model("path/to/xglm-564M")                     # model.load_model calls load_hf_model
    save_hf(model, tokenizer, "runs/x/aligned.hf", base="path/to/xglm-564M")

A checkpoint directory holds config.json (its model_type: gpt2, xglm, bloom, llama or qwen2), the weights as
model.safetensors, sharded *.safetensors with model.safetensors.index.json, or pytorch_model.bin (read with
weights_only=True: tensors only, no code runs), and tokenizer.json (data.load_tokenizer reads it and the special ids).

Weights are renamed by a table per family (tensors keep their layout: nn.Linear's (out, in)), except
  gpt2   Conv1D layers store (in, out): transposed; c_attn holds q, k, v side by side on the output axis;
  bloom  query_key_value holds q, k, v interleaved per head: its output rows are (head, [q|k|v], head_dim).
A tied output head is not stored (transformers ties it on load); old checkpoints' buffers (GPT-2's causal
mask "attn.bias", XGLM's position table, rotary inv_freq) are skipped.
"""

import json
import math
import re
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, processors

from checkpoint import fresh_tmp, swap_in
from model import CheckpointError, Decoder, ModelConfig

FAMILIES = ("gpt2", "xglm", "bloom", "llama", "qwen2")
PREFIX = {"gpt2": "transformer.", "xglm": "model.", "bloom": "transformer.", "llama": "model.", "qwen2": "model."}
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "xglm": "XGLMForCausalLM", "bloom": "BloomForCausalLM",
                 "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
SKIPPED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|embed_positions\.[\w.]+|rotary_emb\.inv_freq)$")
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")




def is_hf_checkpoint(path):
    """A directory whose config.json names a model_type (train.py's checkpoints have model.pt instead)."""
    path = Path(path)
    if not (path / "config.json").is_file() or (path / "model.pt").is_file():
        return False
    try:
        return "model_type" in json.loads((path / "config.json").read_text())
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig

def read_config(ckpt_dir):
    path = Path(ckpt_dir) / "config.json"
    try:
        hf = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable config.json ({e})") from None
    if hf.get("model_type") not in FAMILIES:
        raise CheckpointError(f"{path}: model_type {hf.get('model_type')!r} is not supported; "
                              f"supported: {', '.join(FAMILIES)}")
    return hf


def config_from_hf(hf, path="config.json"):
    """The ModelConfig of a family's config.json (defaults as in transformers' config classes)."""
    try:
        return family_config(hf, path)
    except KeyError as e:
        raise CheckpointError(f"{path}: no {e.args[0]!r}, which a {hf['model_type']} config.json needs") from None


def family_config(hf, path):
    t = hf["model_type"]

    def unsupported(what):
        raise CheckpointError(f"{path}: {t} with {what} is not supported")
    if t == "gpt2":
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            unsupported("non-standard attention scaling")
        act = hf.get("activation_function", "gelu_new")
        d = hf["n_embd"]
        args = dict(vocab_size=hf["vocab_size"], max_seq_len=hf.get("n_positions", 1024), n_layer=hf["n_layer"],
                    n_head=hf["n_head"], d_model=d, d_ff=hf.get("n_inner") or 4 * d, norm="layernorm",
                    pos="learned", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                    tie_embeddings=hf.get("tie_word_embeddings", True))
    elif t == "xglm":
        act, d = hf.get("activation_function", "gelu"), hf["d_model"]
        args = dict(vocab_size=hf["vocab_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
                    n_layer=hf["num_layers"], n_head=hf["attention_heads"], d_model=d, d_ff=hf["ffn_dim"],
                    norm="layernorm", pos="sinusoidal", pos_offset=2,   # XGLM's table starts 2 rows in (fairseq)
                    embed_scale=math.sqrt(d) if hf.get("scale_embedding", True) else 1.0, norm_eps=1e-5,
                    tie_embeddings=hf.get("tie_word_embeddings", True))
    elif t == "bloom":
        if hf.get("apply_residual_connection_post_layernorm"):
            unsupported("apply_residual_connection_post_layernorm")
        act, d = "gelu_new", hf["hidden_size"]                    # BLOOM's own GELU is the tanh approximation
        args = dict(vocab_size=hf["vocab_size"], max_seq_len=hf.get("seq_length", 2048), n_layer=hf["n_layer"],
                    n_head=hf["n_head"], d_model=d, d_ff=4 * d, norm="layernorm", pos="alibi", embed_norm=True,
                    norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", True))
    else:  # llama, qwen2
        act, d, heads = hf.get("hidden_act", "silu"), hf["hidden_size"], hf["num_attention_heads"]
        if act != "silu":
            unsupported(f"hidden_act {act!r}")
        if hf.get("head_dim", d // heads) != d // heads:
            unsupported(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
        if t == "qwen2" and hf.get("use_sliding_window"):
            unsupported("use_sliding_window")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})   # transformers 5 / 4 layouts
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope["rope_type"] = rope.pop("type", rope.get("rope_type", "default"))
        if rope["rope_type"] not in ("default", "llama3"):
            unsupported(f"rope type {rope['rope_type']!r}")
        bias = hf.get("attention_bias", False)
        if t == "llama" and hf.get("mlp_bias", False) != bias:
            unsupported("attention_bias != mlp_bias")
        args = dict(vocab_size=hf["vocab_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
                    n_layer=hf["num_hidden_layers"], n_head=heads, n_kv_head=hf.get("num_key_value_heads") or heads,
                    d_model=d, d_ff=hf["intermediate_size"], norm="rmsnorm", pos="rope", rope_theta=float(theta),
                    rope_scaling=rope if rope["rope_type"] == "llama3" else None, bias=bias,
                    qkv_bias=True if t == "qwen2" else None, norm_eps=hf.get("rms_norm_eps", 1e-6),
                    tie_embeddings=hf.get("tie_word_embeddings", False))
        act = "swiglu"
    mlp = "swiglu" if act == "swiglu" else ACTIVATIONS.get(act)
    if mlp is None:
        unsupported(f"activation {act!r}")
    try:
        return ModelConfig(**args, mlp=mlp, model_type=t)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def family_of(cfg):
    """The family a model is written as: the one it was read from, or for a model pretrained here gpt2 (GPT
    blocks) or llama (Llama blocks)."""
    if cfg.model_type:
        return cfg.model_type
    plain = cfg.qkv_bias is None and not cfg.embed_norm and cfg.embed_scale == 1.0
    if plain and (cfg.pos, cfg.norm, cfg.bias) == ("learned", "layernorm", True) and cfg.mlp != "swiglu":
        return "gpt2"
    if plain and (cfg.pos, cfg.norm, cfg.mlp) == ("rope", "rmsnorm", "swiglu"):
        return "llama"
    raise ValueError(f"save_hf: no Hugging Face family expresses this model ({cfg})")


def config_to_hf(cfg, base=None):
    """The family's config.json for cfg, over `base` (the base model's config.json: keeps its token ids and
    whatever else it says)."""
    t = family_of(cfg)
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new"}.get(cfg.mlp)
    if t == "gpt2":
        fields = dict(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_layer=cfg.n_layer, n_head=cfg.n_head,
                      n_embd=cfg.d_model, n_inner=cfg.d_ff, activation_function=act, layer_norm_epsilon=cfg.norm_eps)
    elif t == "xglm":
        fields = dict(vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_seq_len, num_layers=cfg.n_layer,
                      attention_heads=cfg.n_head, d_model=cfg.d_model, ffn_dim=cfg.d_ff, activation_function=act,
                      scale_embedding=cfg.embed_scale != 1.0)
    elif t == "bloom":
        fields = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
                      layer_norm_epsilon=cfg.norm_eps, seq_length=cfg.max_seq_len)
    else:
        # transformers 5 reads rope_parameters, transformers 4 and vLLM rope_scaling: both, from one source
        fields = dict(vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_seq_len, hidden_size=cfg.d_model,
                      intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                      num_key_value_heads=cfg.n_kv_head, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
                      rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
                      rope_parameters=dict(cfg.rope_scaling or {"rope_type": "default"}, rope_theta=cfg.rope_theta))
        if t == "llama":
            fields.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    out = {k: v for k, v in (base or {}).items() if k not in ("rope_scaling", "rope_parameters", "torch_dtype")}
    return dict(out, **fields, model_type=t, architectures=[ARCHITECTURES[t]],
                tie_word_embeddings=cfg.tie_embeddings, dtype="float32")


# --------------------------------------------------------------------------------------------------------
# weight names: ours <-> the family's

def renames(cfg, t):
    """{our name: the family's name, prefix stripped} for the tensors stored in nn.Linear's layout, and the
    names of the fused q/k/v tensor and the Conv1D (transposed) layers."""
    top, block = {
        "gpt2": ({"tok_emb": "wte", "pos_emb": "wpe", "norm_f": "ln_f"},
                 {"norm1": "ln_1", "norm2": "ln_2", "attn.o": "attn.c_proj", "mlp.up": "mlp.c_fc",
                  "mlp.down": "mlp.c_proj"}),
        "xglm": ({"tok_emb": "embed_tokens", "norm_f": "layer_norm"},
                 {"norm1": "self_attn_layer_norm", "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj",
                  "attn.v": "self_attn.v_proj", "attn.o": "self_attn.out_proj", "norm2": "final_layer_norm",
                  "mlp.up": "fc1", "mlp.down": "fc2"}),
        "bloom": ({"tok_emb": "word_embeddings", "embed_norm": "word_embeddings_layernorm", "norm_f": "ln_f"},
                  {"norm1": "input_layernorm", "attn.o": "self_attention.dense", "norm2": "post_attention_layernorm",
                   "mlp.up": "mlp.dense_h_to_4h", "mlp.down": "mlp.dense_4h_to_h"}),
        "llama": ({"tok_emb": "embed_tokens", "norm_f": "norm"},
                  {"norm1": "input_layernorm", "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj",
                   "attn.v": "self_attn.v_proj", "attn.o": "self_attn.o_proj", "norm2": "post_attention_layernorm",
                   "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.down": "mlp.down_proj"}),
    }[t if t != "qwen2" else "llama"]
    layers = {"gpt2": "h", "bloom": "h"}.get(t, "layers")
    names = dict(top)
    for i in range(cfg.n_layer):
        names.update({f"blocks.{i}.{a}": f"{layers}.{i}.{b}" for a, b in block.items()})
    fused = {"gpt2": "attn.c_attn", "bloom": "self_attention.query_key_value"}.get(t)
    fused = {f"blocks.{i}": f"{layers}.{i}.{fused}" for i in range(cfg.n_layer)} if fused else {}
    conv1d = {f"{layers}.{i}.{b}" for i in range(cfg.n_layer) for b in ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    return names, fused, conv1d if t == "gpt2" else set()


def split_qkv(t, w, cfg):
    """A fused q/k/v weight (or bias) of gpt2 or bloom -> [q, k, v] in nn.Linear's layout; None when its shape
    is not the fused one: gpt2's Conv1D (d, 3d), bloom's (3d, d), a bias (3d,)."""
    d = cfg.d_model
    if tuple(w.shape) != ((3 * d,) if w.dim() == 1 else (d, 3 * d) if t == "gpt2" else (3 * d, d)):
        return None
    if t == "gpt2":                                             # Conv1D: (in, 3 * d) or bias (3 * d,)
        return list((w.T if w.dim() == 2 else w).split(cfg.d_model, dim=0))
    hd = cfg.d_model // cfg.n_head                               # bloom: rows (head, 3, hd)
    w = w.view(cfg.n_head, 3, hd, *w.shape[1:])
    return [w[:, j].reshape(cfg.d_model, *w.shape[3:]) for j in range(3)]


def fuse_qkv(t, q, k, v, cfg):
    if t == "gpt2":
        w = torch.cat([q, k, v], dim=0)
        return w.T.contiguous() if w.dim() == 2 else w
    hd = cfg.d_model // cfg.n_head
    fused = torch.stack([x.reshape(cfg.n_head, hd, *x.shape[1:]) for x in (q, k, v)], dim=1)   # (H, 3, hd, ...)
    return fused.reshape(3 * cfg.d_model, *q.shape[1:])


def state_from_hf(cfg, tensors, files):
    """Our state dict from {the family's name: tensor} ({name: file} for error messages). Every tensor of the
    model must be there with its shape, and every tensor there must be used (or be a known buffer)."""
    t = cfg.model_type
    names, fused, conv1d = renames(cfg, t)
    src = {k.removeprefix(PREFIX[t]): k for k in tensors}          # old checkpoints store no prefix
    with torch.device("meta"):
        expected = Decoder(cfg).state_dict()
    used, state = set(), {}

    def take(name, ours, part=None):
        if name not in src:
            where = ", ".join(sorted(set(files.values()))) or "the checkpoint"
            raise CheckpointError(f"{where}: no tensor {name if name == 'lm_head.weight' else PREFIX[t] + name}")
        used.add(name)
        w, where = tensors[src[name]], f"{files[src[name]]}: tensor {src[name]}"
        if part:                                                     # q, k or v of a fused tensor
            parts = split_qkv(t, w, cfg)
            w = w.view(-1) if parts is None else parts["qkv".index(part)].contiguous()
        elif name.rsplit(".", 1)[0] in conv1d and w.dim() == 2:
            w = w.T.contiguous()
        if tuple(w.shape) != tuple(expected[ours].shape):
            raise CheckpointError(f"{where} has shape {tuple(tensors[src[name]].shape)}, which does not fit "
                                  f"{ours} {tuple(expected[ours].shape)} of the model config.json describes")
        return w

    for ours in expected:
        module, kind = ours.rsplit(".", 1)
        block, _, proj = module.rpartition(".attn.")
        if ours == "head.weight":
            if cfg.tie_embeddings:
                used.add("lm_head.weight")                       # a stored copy of the tied head is fine
            else:
                state[ours] = take("lm_head.weight", ours)
        elif block in fused and proj in ("q", "k", "v"):
            state[ours] = take(f"{fused[block]}.{kind}", ours, proj)
        else:
            state[ours] = take(f"{names[module]}.{kind}", ours)
    extra = [src[k] for k in src if k not in used and not SKIPPED.search(k)]
    if extra:
        raise CheckpointError(f"{files[extra[0]]}: unexpected tensor {extra[0]}" +
                              (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "") +
                              f": not part of a {t} model as config.json describes it")
    return state


def state_to_hf(model):
    """{the family's name: tensor}: the inverse of state_from_hf."""
    cfg, t = model.cfg, family_of(model.cfg)
    names, fused, conv1d = renames(cfg, t)
    sd, out = model.state_dict(), {}
    for ours, w in sd.items():
        module, kind = ours.rsplit(".", 1)
        block, _, proj = module.rpartition(".attn.")
        if ours == "head.weight":
            if not cfg.tie_embeddings:
                out["lm_head.weight"] = w
        elif block in fused and proj in ("q", "k", "v"):
            if proj == "q":
                qkv = [sd[f"{block}.attn.{x}.{kind}"] for x in "qkv"]
                out[PREFIX[t] + f"{fused[block]}.{kind}"] = fuse_qkv(t, *qkv, cfg)
        else:
            name = names[module]
            out[PREFIX[t] + f"{name}.{kind}"] = w.T if name in conv1d and w.dim() == 2 else w
    return {k: v.detach().contiguous() for k, v in out.items()}


# --------------------------------------------------------------------------------------------------------
# reading and writing

def weight_files(ckpt_dir):
    """The weight files of a checkpoint directory, as its index or its single file names them."""
    ckpt_dir = Path(ckpt_dir)
    for name in WEIGHT_FILES:
        path = ckpt_dir / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as e:
                raise CheckpointError(f"{path}: not a weight index (needs a weight_map: {e})") from None
            missing = [s for s in shards if not (ckpt_dir / s).is_file()]
            if missing:
                raise CheckpointError(f"{path}: names {missing[0]}, which is not in {ckpt_dir}")
            return [ckpt_dir / s for s in shards]
        return [path]
    raise CheckpointError(f"{ckpt_dir}: no weights ({', '.join(WEIGHT_FILES)})")


def read_tensors(path):
    """{name: tensor} of one .safetensors or pytorch_model.bin file (weights_only: no code runs)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated or foreign files raise many kinds of errors; all mean the same here
        raise CheckpointError(f"{path}: unreadable weights ({type(e).__name__}: {e})") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return tensors


def load_hf_model(ckpt_dir, device="cpu", dtype=torch.float32):
    """The Decoder of a Hugging Face checkpoint directory, weights cast to dtype (fp32: the optimizer's)."""
    ckpt_dir = Path(ckpt_dir)
    cfg = config_from_hf(read_config(ckpt_dir), ckpt_dir / "config.json")
    tensors, files = {}, {}
    for path in weight_files(ckpt_dir):
        for name, w in read_tensors(path).items():
            tensors[name], files[name] = w, str(path)
    state = state_from_hf(cfg, tensors, files)
    if cfg.tie_embeddings:
        state["head.weight"] = state["tok_emb.weight"]
    with torch.device("meta"):                                  # no time spent on a random init
        model = Decoder(cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    return model.tie_weights().to(device)


def with_bos(tokenizer):
    """tokenizer.tokenizer, with a post-processor that puts tokenizer.bos before the text where it has none:
    a Hugging Face tokenizer adds the BOS itself, and special_ids reads it back from there."""
    tok = tokenizer.tokenizer
    if tokenizer.bos is None or tok.encode("a", add_special_tokens=True).ids[:1] == [tokenizer.bos]:
        return tok
    tok = Tokenizer.from_str(tok.to_str())
    bos = tok.id_to_token(tokenizer.bos)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tokenizer.bos)])
    return tok


def save_hf(model, tokenizer, out_dir, base=None):
    """Write model in its family's layout (config.json, model.safetensors, tokenizer.json), so that transformers,
    lm-evaluation-harness and vLLM load it as they load the base. base: the base checkpoint's directory, whose
    config.json fields and tokenizer/generation files are kept. Written next to out_dir, then swapped in atomically."""
    from safetensors.torch import save_file
    out_dir, base = Path(out_dir), Path(base) if base else None
    base_config = read_config(base) if base and is_hf_checkpoint(base) else None
    tmp = fresh_tmp(out_dir)
    config = config_to_hf(model.cfg, base_config)
    config.update({k: v for k, v in (("bos_token_id", tokenizer.bos), ("eos_token_id", tokenizer.eos),
                                     ("pad_token_id", tokenizer.pad)) if k not in config or config[k] is None})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.float().cpu() for k, v in state_to_hf(model).items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    copied = [p for p in (base.iterdir() if base_config else []) if p.is_file() and
              (p.name.startswith(("tokenizer", "special_tokens_map", "generation_config")) or p.suffix == ".model")]
    for p in copied:
        shutil.copy2(p, tmp / p.name)
    if not copied:  # our own tokenizer: tokenizer.json and the few fields transformers' fast tokenizer reads
        with_bos(tokenizer).save(str(tmp / "tokenizer.json"))
        token = lambda i: None if i is None else tokenizer.id_to_token(i)
        (tmp / "tokenizer_config.json").write_text(json.dumps(dict(
            tokenizer_class="PreTrainedTokenizerFast", bos_token=token(tokenizer.bos), eos_token=token(tokenizer.eos),
            pad_token=token(tokenizer.pad), model_max_length=model.cfg.max_seq_len), indent=2))
    swap_in(tmp, out_dir)
    return out_dir


def special_ids(tok, config, ckpt_dir):
    """The special ids of a Hugging Face checkpoint, as its own files say:
    bos: the token its tokenizer's post-processor puts before the text (XGLM "</s>", Llama 3
         "<|begin_of_text|>"), or None where it puts none (GPT-2, BLOOM, Qwen2);
    eos: config.json's eos_token_id (the first of a list), else tokenizer_config.json's eos_token;
    pad: config.json's pad_token_id, else tokenizer_config.json's pad_token, else eos (always masked)."""
    plain, full = tok.encode("a", add_special_tokens=False).ids, tok.encode("a", add_special_tokens=True).ids
    added = next((full[:i] for i in range(len(full)) if full[i:i + len(plain)] == plain), [])   # before the text
    extra = {}
    if (Path(ckpt_dir) / "tokenizer_config.json").is_file():
        extra = json.loads((Path(ckpt_dir) / "tokenizer_config.json").read_text())

    def token_id(key):
        v = config.get(f"{key}_token_id")
        v = v[0] if isinstance(v, list) and v else v
        if v is None and extra.get(f"{key}_token"):
            t = extra[f"{key}_token"]
            v = tok.token_to_id(t["content"] if isinstance(t, dict) else t)
        return v
    eos = token_id("eos")
    if eos is None:
        raise ValueError(f"{Path(ckpt_dir) / 'config.json'}: no eos_token_id (nor an eos_token in "
                         "tokenizer_config.json): the end of a sentence cannot be marked")
    pad = token_id("pad")
    return dict(bos=added[-1] if added else None, eos=eos, pad=eos if pad is None else pad)
