"""Tests for eval.py: choice scoring (prefix cache, batching, hand-computed log-likelihood, token boundaries),
demo selection, truncation, retrieval and the other representation figures, task errors, end to end."""

import json
import math
import sys
from dataclasses import asdict

import pytest
import torch

import data
import eval as ev
import tasks
import toyworld
from conftest import SHARED
from model import Decoder, ModelConfig

PAWSX = SHARED / "pawsx"
pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = ["the cat sat on the mat.", "the cats sat on the mats. the cats ran.", "Answer: Yes, the dog ran far away.",
         "Question: where does the cat live? Answer: home", "答案对不对？答案对。", "问题：猫在哪里？答案：家里。"] * 30


@pytest.fixture(scope="module")
def tok():
    return data.train_tokenizer(TEXTS, vocab_size=330)


def make_model(tok, flavour="gpt", max_seq_len=96, seed=0):
    """A random model whose scores are O(1) and differ a lot between tokens (init leaves them near uniform)."""
    extra = dict(norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_head=2, bias=False, tie_embeddings=False)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), max_seq_len=max_seq_len, n_layer=2, n_head=4, d_model=32,
                      **(extra if flavour == "llama" else {}))
    torch.manual_seed(seed)
    model = Decoder(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2 if p.dim() > 1 else 0.1)
    return model


DEMOS = "the cat sat on the mat.</s>Answer: Yes, the dog ran far away.</s>"
CONTEXTS = [DEMOS + "the cat", DEMOS + "the dog", "答案", "问题：猫在哪里？答案：", DEMOS + "Answer:", "Answer: "]
CHOICES = [[" sat", "s sat on the mats.", "s"], [" ran far", " sat"], ["对", "不对", "对不对"], ["家里。", "猫"],
           [" Yes", " No", "Yes", " the cat sat on the mat."], ["Yes", "No"]]


def flat(scores):
    return torch.tensor([x for item in scores for pair in item for x in pair], dtype=torch.float64)


# ----------------------------------------------------------------------------- choice scoring

@pytest.mark.parametrize("flavour", ["gpt", "llama"])
def test_prefix_cache_equals_full_sequence_scoring(tok, flavour):
    model = make_model(tok, flavour)
    cached = ev.logprobs_of_choices(model, tok, CONTEXTS, CHOICES, batch_size=2, prefix_cache=True)
    full = ev.logprobs_of_choices(model, tok, CONTEXTS, CHOICES, batch_size=16, prefix_cache=False)
    assert [[n for _, n in it] for it in cached] == [[n for _, n in it] for it in full]
    assert torch.allclose(flat(cached), flat(full), atol=1e-4, rtol=0)
    assert flat(cached)[0::2].min() < -1.0                            # non-trivial scores


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_batch_size_invariance(tok, prefix_cache):
    model = make_model(tok)
    one = ev.logprobs_of_choices(model, tok, CONTEXTS, CHOICES, batch_size=1, prefix_cache=prefix_cache)
    for bs in (3, 64):
        many = ev.logprobs_of_choices(model, tok, CONTEXTS, CHOICES, batch_size=bs, prefix_cache=prefix_cache)
        assert torch.allclose(flat(one), flat(many), atol=1e-5, rtol=0)


def test_hand_computed_log_likelihood(tok):
    model = make_model(tok)
    context, choice = "the cat", " sat on the mat."
    ctx = tok.encode(context).ids
    full = tok.encode(context + choice).ids
    assert full[:len(ctx)] == ctx                                     # no token spans the join here
    ids = [data.BOS] + full
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()        # (T, V)
    m = logits.max(-1, keepdim=True).values
    logp = logits - m - (logits - m).exp().sum(-1, keepdim=True).log()  # log_softmax by hand
    want = sum(logp[t - 1, ids[t]].item() for t in range(1 + len(ctx), len(ids)))
    for cache in (True, False):
        (got, n), = ev.logprobs_of_choices(model, tok, [context], [[choice]], prefix_cache=cache)[0]
        assert n == len(full) - len(ctx)
        assert abs(got - want) < 1e-4


def check_boundary(tok, context, choice):
    """The choice's tokens cover exactly the text from the start of the first token reaching past the context."""
    (seq,), (start,), _ = ev.encode_choices(tok, [context], [[choice]], 1024)
    seq, start = seq[0], start[0]
    head, tail = tok.decode(seq[1:start]), tok.decode(seq[start:])
    assert head + tail == context + choice
    assert len(head) <= len(context) < len(tok.decode(seq[1:start + 1]))   # the boundary token reaches past it
    assert tail.endswith(choice)
    return seq, start


def test_token_boundary_without_spaces(tok):
    context, choice = "问题：答案", "对"
    naive = tok.encode(context).ids
    joint = tok.encode(context + choice).ids
    assert joint[:len(naive)] != naive                                # "答案对" merges across the join
    seq, start = check_boundary(tok, context, choice)
    assert "答" in tok.decode(seq[start:])                            # the merged token is scored as the choice's
    for ctx, ch in [("答案", "对不对"), ("问题：猫在哪里？答案：", "家里。"), ("答案对不", "对")]:
        check_boundary(tok, ctx, ch)


def test_token_boundary_join_merges_into_one_token(tok):
    naive = tok.encode("the cat").ids
    joint = tok.encode("the cats").ids
    assert joint[:len(naive)] != naive and len(joint) == len(naive)   # " cat" + "s" -> " cats"
    seq, start = check_boundary(tok, "the cat", "s")
    assert len(seq) - start == 1
    seq, start = check_boundary(tok, "Answer: ", "Yes")               # the context's trailing space goes with "Yes"
    assert tok.decode(seq[start:]) == " Yes"


# ----------------------------------------------------------------------------- few-shot prompts

def items_fixture(lang="en"):
    word = {"en": "cat", "zh": "猫"}[lang]
    return [tasks.MCItem(f"{lang} {word} {i} says", [" yes", " no"], i % 2, id=f"dev-{i}") for i in range(12)]


def test_demos_never_include_the_query(tok, monkeypatch):
    pool = items_fixture()
    first = ev.pick_demos(pool, 3, seed=1)
    for i, q in enumerate(pool):
        demos = ev.pick_demos(pool, len(pool) - 1, seed=1, query=q, query_index=i)
        assert q not in demos and len(demos) == len(pool) - 1
        three = ev.pick_demos(pool, 3, seed=1, query=q, query_index=i)
        assert q not in three and (three == first if q not in first else all(d in three for d in first if d != q))
    zh = items_fixture("zh")                                          # cross-lingual: the translation is skipped
    for q in zh:
        assert all(d.id != q.id for d in ev.pick_demos(pool, 11, seed=1, query=q))
    dup = pool + [pool[0]]                                            # a duplicate of the query is skipped too
    assert pool[0] not in ev.pick_demos(dup, 11, seed=1, query=pool[0], query_index=0)

    seen = []                                                         # and through few_shot_accuracy's prompts
    monkeypatch.setattr(ev, "logprobs_of_choices", lambda m, t, contexts, choices, *a, **kw: (
        seen.extend(contexts) or [[(0.0, 1)] * len(c) for c in choices], 0))
    ev.few_shot_accuracy(make_model(tok), tok, pool, pool, 5, seed=3, item_index=list(range(len(pool))))
    for q, context in zip(pool, seen):
        demos = context.split(data.DEMO_SEP)
        assert len(demos) == 6 and demos[-1] == q.prefix and tasks.demo_text(q) not in demos[:-1]


def test_long_prompts_drop_whole_demos_from_the_left(tok, monkeypatch):
    model = make_model(tok, max_seq_len=40)
    pool = [tasks.MCItem(f"the cat sat on the mat {i} times, right?", [" Yes", " No"], 0, id=str(i)) for i in range(8)]
    seen = []
    real = ev.logprobs_of_choices
    monkeypatch.setattr(ev, "logprobs_of_choices", lambda m, t, contexts, *a, **kw: (
        seen.extend(contexts), real(m, t, contexts, *a, **kw))[1])
    r = ev.few_shot_accuracy(model, tok, pool[:3], pool[3:], 5, seed=0)
    assert r["truncated"] == 3 and r["n"] == 3
    demos = [tasks.demo_text(d) for d in pool[3:]]
    for context in seen:
        parts = context.split(data.DEMO_SEP)
        assert 1 <= len(parts) < 6 and all(p in demos for p in parts[:-1])   # whole demos only
        assert all(1 + len(tok.encode(context + c).ids) <= 40 for c in (" Yes", " No"))


# ----------------------------------------------------------------------------- representations

def test_retrieval_p1():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 32, generator=g)
    assert ev.retrieval_p1(a, a) == (1.0, 1.0)
    assert ev.retrieval_p1(a, 3 * a + 0.01 * torch.randn(300, 32, generator=g)) == (1.0, 1.0)  # cosine
    p_ab, p_ba = ev.retrieval_p1(a, torch.randn(300, 32, generator=g))
    assert p_ab < 0.02 and p_ba < 0.02                                # chance is 1/300


def test_cosines_and_language_id():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 16, generator=g)
    pair, rand = ev.pair_cosines(a, a)
    assert abs(pair - 1) < 1e-6 and abs(rand) < 0.05
    shift = torch.zeros(16)
    shift[0] = 5.0
    assert ev.language_id_accuracy([a[:100] + shift, a[100:] - shift]) == 1.0
    mixed = ev.language_id_accuracy([torch.randn(400, 16, generator=g) for _ in range(4)])
    assert mixed < 0.4                                                # chance 0.25


def test_sentence_embeddings_do_not_depend_on_batching(tok):
    model = make_model(tok)
    sents = ["the cat sat.", "答案对不对？答案对。", "Answer: Yes, the dog ran far away.", "the"]
    all_layers = ev.sentence_embeddings(model, tok, sents, None, batch_size=3)      # (L+1, N, D)
    assert all_layers.shape == (3, 4, 32)
    for i, s in enumerate(sents):
        one = ev.sentence_embeddings(model, tok, [s], 1, batch_size=1)
        assert torch.allclose(one[0], all_layers[1, i], atol=1e-5)


# ----------------------------------------------------------------------------- tasks, files, end to end

def write_task(root, rows_by_file):
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in rows_by_file.items():
        (root / name).write_text("id\tsentence1\tsentence2\tlabel\n" + "".join(r + "\n" for r in rows), encoding="utf-8")
    return root


def test_task_errors_name_the_file(tok, tmp_path):
    model, cfg = make_model(tok), ev.EvalConfig(shots=(0, 1), max_items=5, progress=False)
    good = [f"{i}\tthe cat sat\tthe cat sat on the mat\t{i % 2}" for i in range(4)]
    bad = write_task(tmp_path / "bad", {"en.dev.tsv": good[:2] + ["9\tonly two columns"] + good[2:]})
    with pytest.raises(ValueError, match=r"en\.dev\.tsv:4: expected 4 tab-separated columns"):
        ev.evaluate_model(model, tok, None, ev.EvalConfig(**{**asdict(cfg), "tasks": [f"bad={bad}"]}))
    gap = write_task(tmp_path / "gap", {"en.test.tsv": good, "en.dev.tsv": good, "de.test.tsv": good})
    with pytest.raises(FileNotFoundError, match=r"de\.dev\.tsv"):   # demos need de's dev split
        ev.evaluate_model(model, tok, None, ev.EvalConfig(**{**asdict(cfg), "tasks": [f"gap={gap}"]}))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ev.resolve_tasks(None, [f"x={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError, match="no files of its layout"):
        ev.evaluate_model(model, tok, None, ev.EvalConfig(**{**asdict(cfg), "tasks": [f"e={tmp_path}"]}))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A small toy world and two random checkpoints that use it."""
    root = tmp_path_factory.mktemp("run")
    world = toyworld.build_world(toyworld.WorldConfig(pretrain_words=20_000, n_eval_pairs=(20, 30), n_sentiment=(12, 16),
                                              n_knowledge=(12, 16), n_text_docs=4))
    toyworld.write_world(world, root / "data")
    tok = data.train_tokenizer(world.training_texts(), 400)
    tok.save(str(root / "tokenizer.json"))
    for seed, name in enumerate(("base", "aligned")):
        model = make_model(tok, max_seq_len=128, seed=seed)
        (root / name).mkdir()
        torch.save(model.state_dict(), root / name / "model.pt")
        (root / name / "config.json").write_text(json.dumps(dict(model=asdict(model.cfg), train={}, stage=name,
                                                                 step=seed, data_dir=str(root / "data"))))
    return root


def test_evaluate_end_to_end(tiny_run, capsys):
    out = tiny_run / "results.json"
    ev.main([str(tiny_run / "base"), str(tiny_run / "aligned"), "--shots", "0,2", "--max-items", "8",
             "--pairs", "16", "--out", str(out)])
    table = capsys.readouterr().out
    assert "→" in table and "lang_id_acc" in table
    sentiment = table.split("sentiment: few-shot accuracy (acc, %; 8–8 items a cell, standard error at most ")[1]
    se, sentiment = sentiment.split(")", 1)
    assert 0 < float(se) <= 100 * math.sqrt(0.25 / 8)                 # the largest SE of any cell, in points
    sentiment = sentiment.split("\n\n", 2)[1]
    assert sentiment.startswith("| setting | en | xa | xb | xc | avg |") and "\n| cross_2shot |  | " in sentiment
    res = json.loads(out.read_text())
    assert list(res) == ["base", "aligned"]
    r = res["base"]
    assert set(r["mc"]) == {"knowledge", "sentiment"}
    assert set(r["mc"]["sentiment"]) == {"in_0shot", "in_2shot", "cross_0shot", "cross_2shot"}
    assert set(r["mc"]["sentiment"]["cross_2shot"]) == {"xa", "xb", "xc", "avg"}    # English only in "in"
    entry = r["mc"]["sentiment"]["in_2shot"]["en"]
    assert entry["n"] == 8 and 0 <= entry["acc"] <= 1 and {"acc_norm", "truncated", "skipped"} <= set(entry)
    assert entry["acc_se"] == pytest.approx(math.sqrt(entry["acc"] * (1 - entry["acc"]) / 8))
    assert "acc_en_only" in r["mc"]["knowledge"]["in_0shot"]["xa"]
    rep = r["repr"]
    assert rep["layers"] == [0, 1, 2] and len(rep["lang_id_acc"]) == 3 and rep["langs"] == ["en", "xa", "xb", "xc"]
    assert all(len(rep["pairs"]["xb"][k]) == 3 for k in ("p1_en_xx", "p1_xx_en", "cos_pair", "cos_random"))
    assert set(r["ppl"]) == {"en", "xa", "xb", "xc"} and all(math.isfinite(v["ppl"]) for v in r["ppl"].values())
    assert res["aligned"]["mc"] != r["mc"] or res["aligned"]["repr"] != rep   # two different models


def test_plot_without_matplotlib_says_how_to_install(tiny_run, monkeypatch, capsys, tmp_path):
    r = ev.evaluate(tiny_run / "base", tasks=["sentiment"], shots=[0], cfg=ev.EvalConfig(max_items=4, n_pairs=10, pca_points=5,
                                                                                   progress=False))
    assert len(r["pca"]["xy"]) == len(r["pca"]["lang"]) == 20
    monkeypatch.setitem(sys.modules, "matplotlib", None)              # import matplotlib now fails
    assert ev.plot_pca({"base": r}, tmp_path / "pca.png") is False
    assert "pip install matplotlib" in capsys.readouterr().err


@pytest.mark.skipif(not PAWSX.is_dir(), reason="../shared/data/pawsx is absent")
def test_real_pawsx(tok):
    model = make_model(tok, max_seq_len=256)
    for lang in ("zh", "en"):
        items = tasks.load_mc_task(PAWSX, lang, "dev")[:6]
        pool = tasks.load_mc_task(PAWSX, "en", "dev", template_lang=None)
        a = ev.few_shot_accuracy(model, tok, items, pool, 1, seed=0, item_index=list(range(6)), prefix_cache=True)
        b = ev.few_shot_accuracy(model, tok, items, pool, 1, seed=0, item_index=list(range(6)), prefix_cache=False)
        assert a == b and a["n"] + a["skipped"] == 6
        for it in items:                                              # 对/不对 join a Chinese sentence: exact cover
            check_boundary(tok, it.prefix[-30:], it.choices[1][:20])


def test_scoring_without_bos(tok):
    """A family with no BOS: sequences start with the text, the cut keeps one context token, perplexity scores
    every token but the first and counts the characters it scored."""
    plain = data.TextTokenizer(tok.tokenizer, None, data.EOS, data.PAD)
    context, choice = "the cat sat", " on the mat."
    ctx, full = plain.encode(context).ids, plain.encode(context + choice).ids
    (seq,), (start,), _ = ev.encode_choices(plain, [context], [[choice]], 1024)
    assert seq[0] == full and start[0] == len(ctx)
    n_choice = len(full) - len(ctx)
    (seq,), (start,), n_cut = ev.encode_choices(plain, [context], [[choice]], n_choice + 1)
    assert n_cut == 1 and seq[0] == full[len(ctx) - 1:] and start[0] == 1      # one context token left
    (seq,), _, _ = ev.encode_choices(plain, [context], [[choice]], n_choice)
    assert seq is None
    model = make_model(tok)
    text = "the cats sat on the mats."
    ids = plain.encode(text).ids
    r = ev.perplexity(model, plain, [text])
    assert r["tokens"] == len(ids)                                   # EOS scored, the first token not
    first = len(plain.tokenizer.decode(ids[:1]))
    with torch.no_grad():
        logits = model(torch.tensor([ids + [data.EOS]])).logits[0, :-1].log_softmax(-1)
    nll = -logits.gather(1, torch.tensor(ids[1:] + [data.EOS])[:, None]).sum().item()
    assert abs(r["bits_per_char"] - nll / math.log(2) / (len(text) + 1 - first)) < 1e-4


def test_skipped_and_truncated_items_are_reported(tok, tmp_path, capsys):
    long = "the cat sat on the mat " * 12
    rows = [f"{i}\tthe cat sat\tthe cat ran\t{i % 2}" for i in range(4)] + [f"9\t{long}\t{long}\t1"]
    task = write_task(tmp_path / "t", {"en.dev.tsv": rows})
    cfg = ev.EvalConfig(tasks=[f"t={task}"], shots=(0, 2), max_items=5, progress=False)
    r = ev.evaluate_model(make_model(tok, max_seq_len=40), tok, None, cfg)["mc"]["t"]["in_0shot"]["en"]
    assert (r["n"], r["skipped"]) == (4, 1)
    err = capsys.readouterr().err
    assert "t in_0shot en: 4 of 5 items scored (1 longer than the model's 40 tokens)" in err


def test_cli_bad_inputs_exit_2_with_one_line(tiny_run, tmp_path, capsys):
    """A missing checkpoint, an invalid config.json, a truncated model.pt, another model's tokenizer and a bad
    task file each give one 'eval.py: error:' line naming the file, exit status 2, no traceback."""
    import shutil
    cases = {}
    for name, edit in [("config", lambda d: (d / "config.json").write_text("{not json")),
                       ("truncated", lambda d: (d / "model.pt").write_bytes((d / "model.pt").read_bytes()[:999])),
                       ("tokenizer", lambda d: (d / "tokenizer.json").write_text(data.train_tokenizer(
                           [f"w{i} t{7 * i} u{13 * i}" for i in range(3000)], 700).tokenizer.to_str()))]:
        d = tmp_path / name
        shutil.copytree(tiny_run / "base", d)
        shutil.copy(tiny_run / "tokenizer.json", d / "tokenizer.json")
        edit(d)
        cases[name] = ([str(d), "--tasks", f"sentiment={tiny_run / 'data/tasks/sentiment'}"],
                       {"config": "config.json: not a model config", "truncated": "model.pt: does not load",
                        "tokenizer": "it is not this model's tokenizer"}[name])
    bad_task = tmp_path / "badtask"
    bad_task.mkdir()
    (bad_task / "en.dev.tsv").write_text("id\tsentence1\tsentence2\tlabel\n1\ta\tb\n")
    cases["task"] = ([str(tiny_run / "base"), "--tasks", f"pawsx={bad_task}"], "en.dev.tsv:2: expected 4")
    cases["missing"] = ([str(tmp_path / "nowhere"), "--tasks", f"pawsx={bad_task}"], "nowhere")
    for name, (argv, needle) in cases.items():
        with pytest.raises(SystemExit) as stop:
            ev.main([*argv, "--shots", "0", "--max-items", "2", "--pairs", "5"])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip() and "it/s" not in line]
        assert stop.value.code == 2 and "Traceback" not in err, name
        assert lines[-1].startswith("eval.py: error: ") and needle in lines[-1], (name, lines[-1])
