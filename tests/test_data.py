"""Tests of data.py: the alignment record, tokenizer, readers (every bad line named), batching and `data.py check`."""
import json
import re
import subprocess
import sys
import unicodedata
from collections import Counter

import pytest
import torch

import data
import tasks
from conftest import REPO, SHARED, write

PAWSX = SHARED / "pawsx"


@pytest.fixture(scope="module")
def tok(world):
    return data.train_tokenizer(world.training_texts(), 1024)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_specials_round_trip_and_save(world, tok, tmp_path):
    assert [tok.tokenizer.token_to_id(s) for s in data.SPECIALS] == [0, 1, 2]
    assert (tok.bos, tok.eos, tok.pad) == (data.BOS, data.EOS, data.PAD)
    texts = [d for _, d in world.pretrain[:200]] + ["Zürich – 東京, 서울! ½ 🙂\ttab", "  two  spaces  "]
    for lang in world.cfg.languages:
        texts += [d for c, d in world.pretrain if c == lang][:20] + [e.sentence for e in world.sentiment["dev"][lang]]
    ids = data.encode(tok, texts)
    assert all(tok.tokenizer.decode(i, skip_special_tokens=False) == t for i, t in zip(ids, texts))
    tok.save(str(tmp_path / "tokenizer.json"))
    assert data.load_tokenizer(tmp_path / "tokenizer.json").encode(texts[0]).ids == ids[0]
    assert tok.tokenizer.to_str() == data.train_tokenizer(world.training_texts(), 1024).tokenizer.to_str()  # deterministic


def test_encode_adds_no_specials_even_where_the_tokenizer_would(tok):
    """A checkpoint's tokenizer may prepend BOS itself (XGLM, Llama 3); TextTokenizer's encode never does:
    the callers place the specials."""
    from tokenizers import Tokenizer, processors
    inner = Tokenizer.from_str(tok.tokenizer.to_str())
    inner.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", data.BOS)])
    assert inner.encode("the cat").ids[0] == data.BOS                # the tokenizer alone adds it
    wrapped = data.TextTokenizer(inner, data.BOS, data.EOS, data.PAD)
    assert wrapped.encode("the cat").ids == inner.encode("the cat").ids[1:]
    assert [e.ids for e in wrapped.encode_batch(["the cat"])] == [inner.encode("the cat").ids[1:]]


def test_non_latin_language_shares_no_subword_with_english(world, tok):
    names = [w for k, w in world.langs["xb"].words.items() if k.startswith("notable")]
    notables, vocab = r"\b(" + "|".join(sorted(names, key=len, reverse=True)) + r")\b", {}
    for lang in ("en", "xb"):
        texts = [d for c, d in world.pretrain if c == lang] + [e.sentence for e in world.sentiment["dev"][lang]]
        texts += [t for _, en, xb in world.pairs["dev"]["xb"] for t in [en if lang == "en" else xb]]
        texts = [re.sub(notables, "", t) for t in texts]  # the knowledge base's names: Latin in every language
        vocab[lang] = {t for ids in data.encode(tok, texts) for t in ids}
    shared = {tok.decode([t], skip_special_tokens=False) for t in vocab["en"] & vocab["xb"]}
    assert shared  # punctuation at least
    allowed = lambda s: s in data.SPECIALS or all(c.isspace() or unicodedata.category(c)[0] == "P" for c in s)
    assert all(allowed(s) for s in shared), shared

# ----------------------------------------------------------------------------- readers


def test_readers_on_small_fixtures(tmp_path):
    assert data.read_parallel_tsv(write(tmp_path / "p.tsv", "a b\tα β\nc\tγ\n")) == [("a b", "α β"), ("c", "γ")]
    row = dict(sent0="hi", sent1="salut", clm_text="Say hi. Answer in French: salut", clm_prompt_len=25)
    ex = data.read_afp_jsonl(write(tmp_path / "a.jsonl", json.dumps(row) + "\n"))
    assert ex == [data.AlignExample("hi", "salut", row["clm_text"], 25)]
    assert ex[0].response() == " salut"
    assert data.read_text(write(tmp_path / "t.txt", "one\ntwo\n\n\nthree\n")) == ["one\ntwo", "three"]


def bactrian(tmp_path, lang, rows):
    recs = [dict(id=f"r{i}", instruction=f"{lang} instruction {i}", input=inp, output=f"{lang} output {i}")
            for i, inp in enumerate(rows)]
    return write(tmp_path / f"{lang}.json", json.dumps(recs, ensure_ascii=False, indent=1))


def test_read_bactrian_bilingual_and_multilingual(tmp_path):
    paths = {c: bactrian(tmp_path, c, ["", "some input"] * 50) for c in ("en", "zh", "de")}
    two = data.read_bactrian({c: paths[c] for c in ("en", "zh")}, cross_probability=0.5, seed=0, repeat=3)
    assert len(two) == 300
    kinds = Counter()
    for e in two:
        i = re.search(r"instruction (\d+)", e.instruction_text).group(1)
        src, tgt = e.instruction_text[:2], e.response()[1:][:2]
        assert e.prompt().endswith(f" Answer in {data.LANGUAGE_NAMES[tgt]}:")
        assert (e.sent0, e.sent1) == (f"en instruction {i}", f"zh instruction {i}")
        assert ("some input" in e.instruction_text) == (int(i) % 2 == 1)
        assert e.response() == f" {tgt} output {i}"
        kinds[src != tgt] += 1
    assert 100 < kinds[True] < 200  # cross_probability 0.5
    three = data.read_bactrian(paths, cross_probability=0.5, seed=0, repeat=1)
    pairs = Counter((e.instruction_text[:2], e.response()[1:][:2]) for e in three)
    assert pairs[("zh", "de")] == pairs[("de", "zh")] == 0  # multilingual: cross samples go through the pivot
    assert sum(n for (s, t), n in pairs.items() if s == t) > 25
    assert all(e.sent0.startswith("en ") and e.sent1[:2] in ("zh", "de") for e in three)
    assert three == data.read_bactrian(paths, cross_probability=0.5, seed=0, repeat=1)
    assert all(e.instruction_text[:2] == e.response()[1:][:2]
               for e in data.read_bactrian(paths, cross_probability=0.0, seed=1, repeat=1))


ROW = json.dumps(dict(sent0="a", sent1="b", clm_text="prompt: answer", clm_prompt_len=7))
BAD = [  # (file name, content, line named in the error, words of the reason)
    ("p.tsv", "a\tb\nonly one column\n", 2, "columns"),
    ("p.tsv", "a\tb\na\tb\tc\n", 2, "columns"),
    ("p.tsv", "a\tb\n \tb\n", 2, "empty"),
    ("p.tsv", b"a\tb\nc\td\n\xff\tx\n", 3, "UTF-8"),
    ("p.tsv", "a\tb\n\nc\td\n", 2, "empty line"),
    ("a.jsonl", ROW + "\n" + ROW.replace('"sent1": "b", ', "") + "\n", 2, "missing field 'sent1'"),
    ("a.jsonl", ROW + "\n" + ROW.replace('"clm_prompt_len": 7', '"clm_prompt_len": "7"') + "\n", 2, "integer"),
    ("a.jsonl", ROW.replace('"sent0": "a"', '"sent0": 3') + "\n", 1, "string"),
    ("a.jsonl", ROW + "\n" + ROW.replace('"sent0": "a"', '"sent0": ""') + "\n", 2, "empty"),
    ("a.jsonl", ROW + "\n" + ROW + "\n" + ROW.replace(": 7", ": 99") + "\n", 3, "past the end"),
    ("a.jsonl", ROW + "\n{not json\n", 2, "JSON"),
    ("a.jsonl", b"[1, 2]\n", 1, "object"),
    ("a.jsonl", ROW.encode() + b"\n" + ROW.encode().replace(b'"a"', b'"\xc3"') + b"\n", 2, "UTF-8"),
    ("x.tsv", "id\tsentence1\tsentence2\tlabel\n1\ta\tb\t1\n2\ta\tb\tyes\n", 3, "label"),
    ("x.tsv", "id\tsentence1\tsentence2\tlabel\n1\ta\tb\n", 2, "columns"),
    ("x.tsv", "id\tsentence1\tsentence2\n1\ta\tb\n", 1, "header"),
    ("k.jsonl", '{"id": "1", "question": "q", "choices": ["a", "b"], "label": 2}\n', 1, "out of range"),
    ("k.jsonl", '{"id": "1", "question": "q", "choices": "ab", "label": 0}\n', 1, "choices"),
    ("k.jsonl", '{"id": "1", "question": "", "choices": ["a", "b"], "label": 0}\n', 1, "empty"),
    ("b.json", '[\n{"id": "1", "instruction": "i", "input": "", "output": "o"},\n{"id": "2", "instruction": "i",'
               ' "input": ""}\n]\n', 3, "missing field 'output'"),
    ("b.json", '[\n{"id": "1", "instruction": "i", "input": "", "output": "o"},\n'
               '{"id": "1", "instruction": "j", "input": "", "output": "p"}\n]\n', 3, "duplicate id"),
    ("b.json", '[\n{"id": "1", "instruction": ["i"], "input": "", "output": "o"}\n]\n', 2, "string"),
    ("b.json", b'[\n{"id": "1", "instruction": "i", "input": "", "output": "o"},\n{"id": "\xfe"}]', 3, "UTF-8"),
    ("b.json", '[\n{"id": "1", "instruction": "i", "input": "", "output": "o"}\n{"id": "2"}]', 3, "expected ','"),
    ("t.txt", b"fine\n\nstill fine\nbroken \xe2\x28\n", 4, "UTF-8"),
]
READERS = {"p.tsv": data.read_parallel_tsv, "a.jsonl": data.read_afp_jsonl, "x.tsv": tasks.read_pawsx_tsv,
           "k.jsonl": tasks.read_knowledge_jsonl, "t.txt": data.read_text,
           "b.json": lambda p: data.read_bactrian({"en": p, "zh": p})}


@pytest.mark.parametrize("name,content,line,reason", BAD)
def test_bad_input_names_file_and_line(tmp_path, name, content, line, reason):
    path = write(tmp_path / name, content)
    with pytest.raises(ValueError, match=re.escape(f"{path}:{line}: ") + ".*" + re.escape(reason)):
        READERS[name](path)


def test_skip_bad_reports_the_count(tmp_path):
    path = write(tmp_path / "p.tsv", "a\tb\nbad\nc\td\nworse\t\n")
    with pytest.warns(UserWarning, match="skipped 2 bad lines"):
        assert data.read_parallel_tsv(path, skip_bad=True) == [("a", "b"), ("c", "d")]


# ----------------------------------------------------------------------------- batching


def test_collate_align_shapes_masks_labels_groups(tok):
    a = data.AlignExample("short one.", "καλι.", "A much longer instruction prompt here. Answer in Kirosh: out put",
                          len("A much longer instruction prompt here. Answer in Kirosh:"))
    b = data.AlignExample("another.", "βανα.", "Q? Answer in English: reply", len("Q? Answer in English:"))
    dup = data.AlignExample("short one.", "something else.", "Q? Answer in English: x", 21)
    batch = data.collate_align([a, b, dup], tok, max_len=64)
    assert set(batch) == {"pair_ids", "pair_mask", "pair_groups", "instr_ids", "instr_mask", "instr_labels"}
    lp, li = batch["pair_ids"].shape[1], batch["instr_ids"].shape[1]
    assert batch["pair_ids"].shape == (6, lp) and batch["instr_ids"].shape == (3, li) and lp < li
    assert all(v.dtype == torch.long for v in batch.values())
    ids = data.encode(tok, ["short one.", "καλι.", " out put"])
    assert batch["pair_ids"][0, :len(ids[0]) + 2].tolist() == [data.BOS] + ids[0] + [data.EOS]
    assert batch["pair_ids"][3, :len(ids[1]) + 2].tolist() == [data.BOS] + ids[1] + [data.EOS]  # row B = y of pair 0
    sentences = [e.sent0 for e in (a, b, dup)] + [e.sent1 for e in (a, b, dup)]
    assert batch["pair_mask"].sum(1).tolist() == [2 + len(t) for t in data.encode(tok, sentences)]
    assert (batch["pair_ids"][batch["pair_mask"] == 0] == data.PAD).all()
    labels, mask = batch["instr_labels"][0], batch["instr_mask"][0]
    assert labels[labels != -100].tolist() == ids[2] + [data.EOS]  # the response and EOS, nothing else
    assert batch["instr_ids"][0, mask.sum() - 1] == data.EOS and batch["instr_ids"][0, 0] == data.BOS
    assert (batch["instr_labels"][batch["instr_mask"] == 0] == -100).all()
    assert batch["pair_groups"].tolist() == [0, 1, 0]  # dup shares "short one." with a


def test_truncation_keeps_the_response(tok):
    prompt = "word " * 60 + "Answer in English:"
    e = data.AlignExample("x " * 50, "y", prompt + " the answer", len(prompt))
    batch = data.collate_align([e], tok, max_len=16)
    resp = data.encode(tok, [" the answer"])[0]
    assert batch["pair_ids"].shape[1] == 16 and batch["instr_ids"].shape[1] == 16
    assert batch["instr_ids"][0, 0] == data.BOS and batch["instr_ids"][0, -len(resp) - 1:].tolist() == resp + [data.EOS]
    labels = batch["instr_labels"][0]
    assert labels[labels != -100].tolist() == resp + [data.EOS]


def test_align_data_is_deterministic_and_ranks_are_disjoint(world, tok):
    ex = world.align["train"] + world.align["dev"]
    one = data.AlignData(ex, tok, batch_size=4, max_len=64, seed=3)
    assert all((one.batch(5)[k] == data.AlignData(ex, tok, 4, 64, 3).batch(5)[k]).all() for k in one.batch(5))
    assert one.indices(5) != one.indices(6)
    ranks = [data.AlignData(ex, tok, 4, 64, 3, rank=r, world_size=2) for r in (0, 1)]
    for step in (0, 7):
        r0, r1 = ranks[0].indices(step), ranks[1].indices(step)
        assert not set(r0) & set(r1) and r0 + r1 == one.indices(step)
    n = len(ex)
    epoch = [i for s in range(n // 4 * 3) for i in one.indices(s)]
    assert sorted(epoch[:n]) == list(range(n)) and epoch[:n] != epoch[n:2 * n]  # a new order each epoch
    with pytest.raises(ValueError, match="world_size"):
        data.AlignData(ex, tok, 3, 64, 0, rank=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        data.PretrainData([d for _, d in world.pretrain[:20]], tok, 16, 4, 0, rank=2, world_size=2)


def test_pretrain_data_blocks_and_determinism(world, tok):
    docs = [d for _, d in world.pretrain[:300]]
    pd = data.PretrainData(docs, tok, block_size=32, batch_size=8, seed=0)
    stream = [t for ids in data.encode(tok, docs) for t in [data.BOS] + ids + [data.EOS]]
    assert pd.n_tokens == len(stream) and len(pd.blocks) == -(-len(stream) // 32)
    b = pd.batch(2)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape == (8, 32)
    assert (b["input_ids"] == data.PretrainData(docs, tok, 32, 8, 0).batch(2)["input_ids"]).all()
    last = len(pd.blocks) - 1
    ids, mask = pd.blocks[last], torch.arange(32) < pd.lengths[last]
    assert ids[mask].tolist() == stream[last * 32:] and (ids[~mask] == data.PAD).all()
    step = next(s for s in range(100) if last in pd.indices(s))
    row = pd.indices(step).index(last)
    assert (pd.batch(step)["labels"][row][~mask] == -100).all()
    r0 = data.PretrainData(torch.tensor(stream), tok, 32, 8, 0, rank=0, world_size=2)
    r1 = data.PretrainData(torch.tensor(stream), tok, 32, 8, 0, rank=1, world_size=2)
    assert r0.indices(4) + r1.indices(4) == pd.indices(4) and not set(r0.indices(4)) & set(r1.indices(4))

# ----------------------------------------------------------------------------- command line


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "data.py"), *args], capture_output=True, text=True)


def test_check_command(world_dir, tmp_path, capsys):
    for name in ("align.train.jsonl", "pairs/en-xb.dev.tsv", "tasks/sentiment/xb.test.tsv", "tasks/knowledge/en.dev.jsonl",
                 "instructions/xb.json", "pretrain.txt", "tasks/sentiment/templates.json", "world.json"):
        assert data.main(["check", str(world_dir / name)]) == 0, name
    bad = write(tmp_path / "bad.jsonl", ROW + "\n" + ROW.replace(": 7", ": 99") + "\n")
    assert data.main(["check", str(bad)]) == 2 and f"{bad}:2:" in capsys.readouterr().err
    assert data.main(["check", str(tmp_path / "missing.tsv")]) == 2
    # the exit status as a shell sees it
    ok = subprocess.run([sys.executable, str(REPO / "data.py"), "check", str(world_dir / "pairs/en-xa.dev.tsv")],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("ok:")
    res = subprocess.run([sys.executable, str(REPO / "data.py"), "check", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2 and f"{bad}:2:" in res.stderr


def test_align_data_pair_batch_size(world, tok):
    """A contrastive batch larger than the instruction batch: its own stream, same tokens, deterministic."""
    ex = world.align["train"] + world.align["dev"]
    ad = data.AlignData(ex, tok, batch_size=4, max_len=64, seed=3, pair_batch_size=12)
    b = ad.batch(2)
    assert b["pair_ids"].shape[0] == 24 and b["pair_groups"].shape == (12,) and b["instr_ids"].shape[0] == 4
    same = data.AlignData(ex, tok, batch_size=4, max_len=64, seed=3)
    assert (same.batch(2)["instr_ids"] == b["instr_ids"]).all()          # instruction rows unchanged
    rows = ad.pair_indices(2)
    ref = data.collate_align([ex[i] for i in rows], tok, 64, groups=[ad.groups[i] for i in rows])
    assert (ref["pair_ids"] == b["pair_ids"]).all()
    with pytest.raises(ValueError, match="batch_size 5 must split evenly over world_size 2"):
        data.AlignData(ex, tok, 4, 64, 0, rank=0, world_size=2, pair_batch_size=5)


def test_collate_without_bos_follows_the_tokenizer(tok):
    """A family with no BOS (GPT-2, BLOOM, Qwen2) and its own eos/pad ids: rows start with the text, pair rows
    end with its EOS, an over-long response keeps max_len - 1 tokens after one prompt token."""
    plain = data.TextTokenizer(tok.tokenizer, None, 7, 5)
    a = data.AlignExample("short one.", "καλι.", "Prompt here: out put", len("Prompt here:"))
    long = data.AlignExample("x", "y", "Q: " + "word " * 40, len("Q:"))
    batch = data.collate_align([a, long], plain, max_len=16)
    ids = data.encode(plain, ["short one.", " out put", "Prompt here:"])
    assert batch["pair_ids"][0, :len(ids[0]) + 1].tolist() == ids[0] + [7]
    assert (batch["pair_ids"][batch["pair_mask"] == 0] == 5).all()
    assert batch["instr_ids"][0, :len(ids[2])].tolist() == ids[2]
    labels = batch["instr_labels"]
    assert labels[0][labels[0] != -100].tolist() == ids[1] + [7]
    assert batch["instr_mask"][1].sum() == 16 and (labels[1] != -100).sum() == 15   # one prompt token stays


def test_an_empty_response_is_refused(tmp_path):
    row = dict(sent0="a.", sent1="b.", clm_text="Q? Answer in English:  ", clm_prompt_len=len("Q? Answer in English:"))
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"r.jsonl:1: the response .* is empty"):
        data.read_afp_jsonl(path)


def test_check_judges_by_content(tmp_path, capsys):
    path = tmp_path / "rows.txt"
    path.write_text('{"sent0": "a", "sent1": "b"}\n')
    assert data.main(["check", str(path)]) == 2 and "this is JSON, not plain text" in capsys.readouterr().err
