"""Tests for hf.py: each family's checkpoint against transformers on randomly initialised tiny models (logits,
every hidden state, greedy generation), save_hf read back by transformers, sharded and .bin weights, the
family's special ids, bad checkpoints, and one align step and one eval run on a checkpoint of each family."""

import json
import shutil

import pytest
import torch
from tokenizers import processors

import config
import data
import eval as ev
import hf
import train
from conftest import random_weights_
from model import Decoder, ModelConfig, load_model

try:
    import transformers
    transformers.logging.set_verbosity_error()
except ImportError:
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers is not installed (it is "
                                        "test-only: pip install -r requirements-dev.txt)")

V = 320
FAMILIES = hf.FAMILIES
TEXTS = ["the cat sat on the mat.", "die Katze sitzt auf der Matte.", "le chat est assis sur le tapis.",
         "Question: where does the cat live? Answer: home", "猫坐在垫子上。", "кошка сидит на коврике."] * 20
# the special ids each tiny family uses: which BOS its tokenizer prepends (as the real ones: XGLM "</s>",
# Llama 3 "<|begin_of_text|>", none for GPT-2, BLOOM, Qwen2), its EOS, and its pad (None: the EOS)
SPECIALS = {"gpt2": (None, 2, None), "xglm": (2, 2, 0), "bloom": (None, 2, 0), "llama": (1, 2, None),
            "qwen2": (None, 2, None)}
LLAMA3 = dict(rope_type="llama3", factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
              original_max_position_embeddings=16)


def family_tokenizer(family):
    """A byte-level BPE with <pad>, <s>, </s> at 0, 1, 2 whose post-processor adds the family's BOS."""
    tok = data.train_tokenizer(TEXTS, vocab_size=300).tokenizer
    bos = SPECIALS[family][0]
    if bos is not None:
        name = tok.id_to_token(bos)
        tok.post_processor = processors.TemplateProcessing(single=f"{name} $A", special_tokens=[(name, bos)])
    return tok


def hf_config(family):
    bos, eos, pad = SPECIALS[family]
    ids = dict(bos_token_id=bos if bos is not None else eos, eos_token_id=eos, pad_token_id=pad)
    t = transformers
    return {
        "gpt2": lambda: t.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, **ids),
        "xglm": lambda: t.XGLMConfig(vocab_size=V, max_position_embeddings=64, d_model=32, num_layers=2,
                                     attention_heads=4, ffn_dim=64, **ids),
        # 6 heads: ALiBi's slopes for a head count that is not a power of 2
        "bloom": lambda: t.BloomConfig(vocab_size=V, hidden_size=48, n_layer=2, n_head=6, **ids),
        "llama": lambda: t.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       rope_scaling=dict(LLAMA3), **ids),
        "qwen2": lambda: t.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       rope_theta=1e6, tie_word_embeddings=True, **ids),
    }[family]()


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """{family: (directory, the transformers model)}: every parameter random and O(1), eager attention."""
    if transformers is None:
        pytest.skip("transformers is not installed")
    out = {}
    for i, family in enumerate(FAMILIES):
        torch.manual_seed(i)
        model = transformers.AutoModelForCausalLM.from_config(hf_config(family), attn_implementation="eager").eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.2 if p.dim() > 1 else 0.5)
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path)
        family_tokenizer(family).save(str(path / "tokenizer.json"))
        out[family] = path, model
    return out


def batch(pad):
    torch.manual_seed(0)
    ids = torch.randint(3, V, (3, 9))
    mask = torch.ones_like(ids)
    if pad == "left":
        mask[1, :3] = mask[2, :5] = 0
    if pad == "right":
        mask[1, 6:] = mask[2, 4:] = 0
    return ids, mask


def reference(model, family, ids, mask):
    """transformers' forward, given the positions that the mask implies (except BLOOM, which reads the mask):
    its XGLM, GPT-2, Llama and Qwen2 count positions from the first column, pads included, unless told."""
    pos = {} if family == "bloom" else dict(position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    with torch.no_grad():
        return model(ids, attention_mask=mask, output_hidden_states=True, **pos)


@needs_transformers
@pytest.mark.parametrize("pad", [None, "left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_hidden_states_match_transformers(hf_checkpoints, family, pad):
    path, ref_model = hf_checkpoints[family]
    ours = load_model(path).eval()
    assert ours.cfg.model_type == family
    ids, mask = batch(pad)
    ref = reference(ref_model, family, ids, mask)
    with torch.no_grad():
        out = ours(ids, mask, output_hidden_states=True)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], ref.logits[real], rtol=0, atol=1e-4)
    assert len(out.hidden_states) == len(ref.hidden_states) == ours.cfg.n_layer + 1
    for a, b in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-4)


@needs_transformers
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(hf_checkpoints, family):
    """Greedy decoding with the KV cache, token for token; left-padded prompts too, except for XGLM, whose
    transformers generate counts positions from the first column, pads included."""
    path, ref_model = hf_checkpoints[family]
    ours = load_model(path).eval()
    ids = torch.randint(3, V, (2, 5), generator=torch.Generator().manual_seed(1))
    masks = [torch.ones_like(ids)] + ([] if family == "xglm" else [torch.tensor([[0, 0, 1, 1, 1], [1] * 5])])
    for mask in masks:
        with torch.no_grad():
            ref = ref_model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                     eos_token_id=None, pad_token_id=0)
        assert torch.equal(ours.generate(ids, 8, attention_mask=mask), ref)


@needs_transformers
@pytest.mark.parametrize("family", FAMILIES)
def test_save_hf_then_transformers_gives_the_same_logits(hf_checkpoints, family, tmp_path):
    path, ref_model = hf_checkpoints[family]
    ours = load_model(path).eval()
    out = hf.save_hf(ours, data.load_tokenizer(path), tmp_path / "saved", base=path)
    again = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask = batch("right")
    real = mask.bool()
    torch.testing.assert_close(reference(again, family, ids, mask).logits[real],
                               reference(ref_model, family, ids, mask).logits[real], rtol=0, atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert (out / "tokenizer.json").is_file() and config["model_type"] == family
    if family == "llama":       # transformers 4 and vLLM read rope_scaling, transformers 5 rope_parameters
        assert config["rope_scaling"]["rope_type"] == config["rope_parameters"]["rope_type"] == "llama3"


@needs_transformers
@pytest.mark.parametrize("flavour", ["gpt", "llama"])
def test_save_hf_of_a_model_pretrained_here(flavour, tmp_path):
    """Our own models are written as gpt2 or llama, tokenizer included; transformers reads both back."""
    cfg = dict(vocab_size=V, max_seq_len=32, n_layer=2, n_head=4, d_model=32)
    cfg.update(config.ARCHS[flavour] | (dict(n_kv_head=2) if flavour == "llama" else {}))
    torch.manual_seed(0)
    model = random_weights_(Decoder(ModelConfig(**cfg)), 0.2).eval()
    out = hf.save_hf(model, data.train_tokenizer(TEXTS, vocab_size=300), tmp_path / "saved")
    again = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask = batch("right")
    with torch.no_grad():
        torch.testing.assert_close(again(ids, attention_mask=mask).logits[mask.bool()],
                                   model(ids, mask).logits[mask.bool()], rtol=0, atol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("the cat")["input_ids"][0] == data.BOS                     # transformers adds our BOS too
    assert data.load_tokenizer(out).specials() == dict(bos=data.BOS, eos=data.EOS, pad=data.PAD)


@needs_transformers
def test_sharded_and_bin_checkpoints_load(hf_checkpoints, tmp_path):
    path, ref_model = hf_checkpoints["llama"]
    ref_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded/model.safetensors.index.json").is_file()
    assert len(hf.weight_files(tmp_path / "sharded")) > 1
    (tmp_path / "bin").mkdir()
    shutil.copy(path / "config.json", tmp_path / "bin/config.json")
    torch.save(ref_model.state_dict(), tmp_path / "bin/pytorch_model.bin")
    ids, mask = batch("left")
    want = load_model(path)(ids, mask).logits
    for d in ("sharded", "bin"):
        torch.testing.assert_close(load_model(tmp_path / d)(ids, mask).logits, want, rtol=0, atol=0)


@needs_transformers
@pytest.mark.parametrize("family", FAMILIES)
def test_special_ids_follow_the_checkpoint(hf_checkpoints, family):
    bos, eos, pad = SPECIALS[family]
    tok = data.load_tokenizer(hf_checkpoints[family][0])
    assert (tok.bos, tok.eos, tok.pad) == (bos, eos, eos if pad is None else pad)
    assert tok.encode("the cat").ids == tok.tokenizer.encode("the cat").ids[len(tok.start):]   # no specials added
    assert data.sentence_row([7, 8], 16, tok) == ([] if bos is None else [bos]) + [7, 8, eos]


# ------------------------------------------------------------------------------ checkpoints made here
# (save_hf of our Decoder in a family's config: these need no transformers)

def family_config(family):
    cfg = dict(vocab_size=V, max_seq_len=64, n_layer=2, n_head=4, d_model=32, model_type=family)
    cfg.update({"gpt2": dict(mlp="gelu_tanh"),
                "xglm": dict(pos="sinusoidal", pos_offset=2, embed_scale=32 ** 0.5),
                "bloom": dict(pos="alibi", mlp="gelu_tanh", embed_norm=True),
                "llama": dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, n_kv_head=2,
                              tie_embeddings=False, rope_scaling=dict(LLAMA3)),
                "qwen2": dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, qkv_bias=True, n_kv_head=2,
                              rope_theta=1e6, norm_eps=1e-6)}[family])
    return ModelConfig(**cfg)


def make_checkpoint(family, path):
    torch.manual_seed(0)
    model = random_weights_(Decoder(family_config(family)), 0.2)
    bos, eos, pad = SPECIALS[family]
    tok = data.TextTokenizer(family_tokenizer(family), bos, eos, eos if pad is None else pad)
    return model, hf.save_hf(model, tok, path)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_hf_load_round_trip(family, tmp_path):
    model, path = make_checkpoint(family, tmp_path / family)
    loaded = load_model(path)
    assert loaded.cfg == model.cfg
    ids, mask = batch("left")
    assert torch.equal(loaded.eval()(ids, mask).logits, model.eval()(ids, mask).logits)
    assert (data.load_tokenizer(path).bos, data.load_tokenizer(path).eos) == SPECIALS[family][:2]


def test_bad_checkpoints_name_the_file_and_tensor(tmp_path):
    _, path = make_checkpoint("bloom", tmp_path / "ok")
    weights = path / "model.safetensors"

    def broken(name, edit):
        d = tmp_path / name
        shutil.copytree(path, d)
        edit(d)
        return d

    from safetensors.torch import load_file, save_file
    cases = [
        (lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                                               "model_type": "t5"})),
         "model_type 't5' is not supported; supported: gpt2, xglm, bloom, llama, qwen2"),
        (lambda d: (d / "model.safetensors").write_bytes(weights.read_bytes()[:5000]), "model.safetensors: unreadable"),
        (lambda d: save_file({k: v for k, v in load_file(weights).items() if "h.1.mlp.dense_4h_to_h.bias" not in k},
                             d / "model.safetensors"), "no tensor transformer.h.1.mlp.dense_4h_to_h.bias"),
        (lambda d: save_file({**load_file(weights), "transformer.h.0.self_attention.dense.weight": torch.zeros(32, 31)},
                             d / "model.safetensors"),
         "tensor transformer.h.0.self_attention.dense.weight has shape (32, 31)"),
        (lambda d: save_file({**load_file(weights), "transformer.h.0.extra.weight": torch.zeros(2)},
                             d / "model.safetensors"), "unexpected tensor transformer.h.0.extra.weight"),
        (lambda d: (d / "model.safetensors").unlink(), "no weights"),
        (lambda d: (d / "config.json").write_text(json.dumps({k: v for k, v in json.loads(
            (d / "config.json").read_text()).items() if k != "hidden_size"})), "no 'hidden_size', which a bloom"),
        (lambda d: save_file({**load_file(weights), "transformer.h.1.self_attention.query_key_value.weight":
                              torch.zeros(90, 32)}, d / "model.safetensors"),
         "tensor transformer.h.1.self_attention.query_key_value.weight has shape (90, 32)"),
    ]
    for i, (edit, message) in enumerate(cases):
        with pytest.raises(hf.CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_model(broken(f"case{i}", edit))


def test_pickled_code_in_a_bin_file_does_not_run(tmp_path):
    """pytorch_model.bin is read with weights_only=True: a pickled callable is refused, not called."""
    _, path = make_checkpoint("gpt2", tmp_path / "ok")
    (path / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    torch.save({"x": torch.zeros(1), "payload": Payload(str(marker))}, path / "pytorch_model.bin")
    with pytest.raises(hf.CheckpointError, match="pytorch_model.bin: unreadable weights"):
        load_model(path)
    assert not marker.exists()


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("family", FAMILIES)
def test_align_step_and_eval_on_a_family_checkpoint(family, tmp_path, capsys):
    """train.py aligns a Hugging Face checkpoint (no replay without --text), writes aligned/ and aligned.hf/;
    eval.py scores PAWS-X-layout items with it."""
    _, base = make_checkpoint(family, tmp_path / "base")
    pairs = tmp_path / "en-de.tsv"
    pairs.write_text("".join(f"the cat {i} sat.\tdie Katze {i} sitzt.\n" for i in range(60)))
    out = tmp_path / "run"
    train.main(["--stage", "align", "--init", str(base), "--pairs", str(pairs), "--out", str(out), "--preset",
                "tiny", "--align-steps", "2", "--eval-every", "2", "--grad-checkpointing"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    dev = [r for r in log if "dev_loss" in r]
    assert dev and all(torch.isfinite(torch.tensor(r["dev_loss"])) for r in dev) and "dev_replay" not in dev[-1]
    saved = json.loads((out / "aligned/config.json").read_text())
    assert saved["model"]["model_type"] == family and saved["train"]["replay_weight"] == 0.0
    aligned = load_model(out / "aligned.hf")
    assert not torch.equal(aligned.tok_emb.weight, load_model(base).tok_emb.weight)  # it trained
    task = tmp_path / "paws"
    task.mkdir()
    for lang in ("en", "de"):
        rows = [f"{i}\tthe cat {i} sat.\tthe cat {i} sits.\t{i % 2}\n" for i in range(12)]
        (task / f"{lang}.dev.tsv").write_text("id\tsentence1\tsentence2\tlabel\n" + "".join(rows))
    cfg = ev.EvalConfig(tasks=[f"pawsx={task}"], shots=(0, 2), max_items=12, progress=False)
    res = ev.evaluate(out / "aligned.hf", cfg=cfg)
    for key in ("in_0shot", "in_2shot", "cross_2shot"):
        for lang, r in res["mc"]["pawsx"][key].items():
            assert lang == "avg" or (r["n"] == 12 and r["skipped"] == 0 and 0 <= r["acc"] <= 1)


def test_hf_init_needs_alignment_data_and_text_for_replay(tmp_path, capsys):
    _, base = make_checkpoint("qwen2", tmp_path / "base")
    pairs = tmp_path / "en-de.tsv"
    pairs.write_text("a\tb\n" * 10)
    with pytest.raises(train.ConfigError, match="give its alignment data with --pairs"):
        train.main(["--stage", "align", "--init", str(base), "--out", str(tmp_path / "r")])
    with pytest.raises(train.ConfigError, match="carries no pretraining text: give it with --text"):
        train.main(["--stage", "align", "--init", str(base), "--out", str(tmp_path / "r"), "--pairs", str(pairs),
                    "--replay-weight", "1", "--max-len", "32"])


def test_paper_preset_is_the_authors_hyperparameters():
    cfg = train.parse_config(["--stage", "align", "--preset", "paper", "--align-steps", "7"])
    assert (cfg.align_lr, cfg.warmup_ratio, cfg.min_lr_ratio, cfg.temperature, cfg.pooling, cfg.layer) == \
           (1e-5, 0.03, 0.0, 0.05, "last", 1)
    assert (cfg.contrastive_weight, cfg.instruction_weight, cfg.grad_clip, cfg.align_weight_decay, cfg.replay_weight) == \
           (1.0, 1.5, 1.0, 0.0, 0.0)
    assert cfg.align_steps == 7                                       # flags override the preset


def test_eval_cli_names_a_bad_checkpoint_in_one_line(tmp_path, capsys):
    _, path = make_checkpoint("xglm", tmp_path / "x")
    (path / "model.safetensors").write_bytes(b"\0" * 100)
    with pytest.raises(SystemExit) as stop:
        ev.main([str(path), "--tasks", f"paws={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err[-1].startswith("eval.py: error: ") and "model.safetensors" in err[-1]


def test_gpt2_fused_qkv_of_the_wrong_size_is_named(tmp_path):
    from safetensors.torch import load_file, save_file
    _, path = make_checkpoint("gpt2", tmp_path / "g")
    tensors = load_file(path / "model.safetensors")
    for shape in ((32, 64), (32, 100)):
        save_file({**tensors, "transformer.h.0.attn.c_attn.weight": torch.zeros(shape)}, path / "model.safetensors")
        with pytest.raises(hf.CheckpointError, match=rf"c_attn.weight has shape \(32, {shape[1]}\)"):
            load_model(path)


def test_specials_when_the_tokenizer_also_appends_an_eos(tmp_path):
    tok = family_tokenizer("gpt2")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    assert hf.special_ids(tok, {"eos_token_id": 2}, tmp_path) == dict(bos=1, eos=2, pad=2)


@needs_transformers
@pytest.mark.parametrize("family", FAMILIES)
def test_choice_log_likelihoods_equal_a_direct_transformers_computation(hf_checkpoints, family):
    """eval.py's scores of (context, choice) on the loaded checkpoint, cached and not, batch 1 and 16, equal the
    summed log-probabilities that the transformers model gives the same tokens, one sequence at a time."""
    path, ref_model = hf_checkpoints[family]
    ours, tok = load_model(path).eval(), data.load_tokenizer(path)
    contexts = ["the cat sat on the mat.</s>Question: where does the cat live? Answer:", "猫坐在", "le chat est"]
    choices = [[" home", " the mat", " Paris"], ["垫子上。", "地上"], [" assis", " là"]]
    seqs, starts, _ = ev.encode_choices(tok, contexts, choices, ours.cfg.max_seq_len)
    want = []
    for item_seqs, item_starts in zip(seqs, starts):
        for s, start in zip(item_seqs, item_starts):
            with torch.no_grad():
                logp = ref_model(torch.tensor([s])).logits[0].double().log_softmax(-1)
            want.append(sum(logp[t - 1, s[t]].item() for t in range(start, len(s))))
    for cache in (True, False):
        for batch_size in (1, 16):
            got = ev.logprobs_of_choices(ours, tok, contexts, choices, batch_size=batch_size, prefix_cache=cache)
            got = [score for item in got for score, _ in item]
            assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4
