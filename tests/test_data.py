"""Tests of data.py: the toy world, tokenizer, readers, batching and command line."""
import json
import re
import subprocess
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PAWSX = REPO.parent / "shared/data/pawsx"
SMALL = dict(pretrain_tokens=40_000, n_eval_pairs=(30, 60), n_pawsx=(20, 40), n_text_docs=4)


@pytest.fixture(scope="module")
def world():
    return data.build_world(data.WorldConfig(**SMALL))


@pytest.fixture(scope="module")
def big():
    """The default world (a couple of seconds): sizes, coverage and the alignment budget are checked on it."""
    return data.build_world(data.WorldConfig())


@pytest.fixture(scope="module")
def tok(world):
    return data.train_tokenizer(world.training_texts(), 1024)


@pytest.fixture(scope="module")
def world_dir(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    data.write_world(world, out)
    return out


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def stated_in(world):
    """Fact (rel, person, value) -> the languages whose training text states it."""
    out = {}
    for lang, m in world.train_meanings:
        if m[0] == "fact":
            out.setdefault(m[1:], set()).add(lang)
    return lambda f: out.get((f["rel"], f["person"], f["value"]), set())


def words_of(text):
    return re.findall(r"[^\s.,?:]+", text)

# ----------------------------------------------------------------------------- the world


def test_same_seed_same_files_other_seed_differs(world_dir, tmp_path):
    data.write_world(data.build_world(data.WorldConfig(**SMALL)), tmp_path / "a")
    data.write_world(data.build_world(data.WorldConfig(**SMALL, seed=1)), tmp_path / "b")
    same, other = files(tmp_path / "a"), files(tmp_path / "b")
    assert same == files(world_dir)
    assert same.keys() == other.keys()
    assert same["pretrain.txt"] != other["pretrain.txt"]
    assert same["pairs/en-xb.test.tsv"] != other["pairs/en-xb.test.tsv"]


@pytest.mark.parametrize("mix", [(0.85, 0.05, 0.05, 0.05), (0.4, 0.3, 0.2, 0.1)])
def test_language_mix_within_one_point(mix):
    w = data.build_world(data.WorldConfig(**dict(SMALL, mix=mix)))
    counts = Counter()
    for lang, doc in w.pretrain:
        counts[lang] += len(doc.split())
    total = sum(counts.values())
    assert abs(total - SMALL["pretrain_tokens"]) / SMALL["pretrain_tokens"] < 0.02
    for lang, share in zip(w.cfg.languages, mix):
        assert abs(counts[lang] / total - share) < 0.01, (lang, counts[lang] / total)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="mix"):
        data.build_world(data.WorldConfig(mix=(0.5, 0.5)))
    with pytest.raises(ValueError, match="languages"):
        data.build_world(data.WorldConfig(languages=("xa", "en"), mix=(0.5, 0.5)))


def test_translation_pairs_are_exact(world, world_dir):
    for x in ("xa", "xb", "xc"):
        for split in ("dev", "test"):
            rows = world.pairs[split][x]
            assert data.read_parallel_tsv(world_dir / f"pairs/en-{x}.{split}.tsv") == [(e, t) for _, e, t in rows]
            for m, en, xx in rows:
                assert en == data.render(world.langs["en"], m) and xx == data.render(world.langs[x], m)
            # one meaning per line and one line per meaning: retrieval has a single right answer
            assert len({m for m, _, _ in rows}) == len({e for _, e, _ in rows}) == len({t for _, _, t in rows}) \
                == len(rows) == dict(dev=30, test=60)[split]
    assert world.pairs["test"]["xa"][0][0] == world.pairs["test"]["xb"][0][0]  # same meanings in every pair file


def test_rendering_is_injective_and_languages_differ(world):
    for code, L in world.langs.items():
        assert len(set(L.words.values())) == len(L.words), code  # no word stands for two concepts
    m = ("act", 0, 1, 2, 3, 4)
    orders = {data.render(L, m) for L in world.langs.values()}
    assert len(orders) == len(world.langs)
    en, xb = (set(words_of(data.render(world.langs[c], m))) for c in ("en", "xb"))
    assert not en & xb


def test_evaluation_meanings_are_disjoint_from_training(world):
    trained = {m for _, m in world.train_meanings}
    assert sum(m[0] == "act" for m in trained) > 100  # the record is really kept
    held_out = {m for split in ("dev", "test") for rows in world.pairs[split].values() for m, _, _ in rows}
    held_out |= {m for split in ("dev", "test") for pair in world.pawsx_meanings[split] for m in pair}
    assert held_out and not held_out & trained
    eval_facts = [f for f in world.facts if f["split"] != "train"]
    assert not {("ask", f["rel"], f["person"]) for f in eval_facts} & trained
    stated = stated_in(world)
    assert all(stated(f) <= {"en"} for f in eval_facts if f["en_only"])  # stated in no other language
    corpus = "\n".join(d for _, d in world.pretrain)  # and as text, not only as meaning ids
    assert not [en for _, en, _ in world.pairs["test"]["xb"] if en in corpus]
    assert not [xb for _, _, xb in world.pairs["test"]["xb"] if xb in corpus]


def test_pawsx_and_knowledge_items(world, world_dir):
    for split in ("dev", "test"):
        for (m1, m2), e in zip(world.pawsx_meanings[split], world.pawsx[split]["en"]):
            assert e.label == int(m1 == m2) and (m1 == m2 or (m1[2], m1[3]) == (m2[3], m2[2]))
    labels = [e.label for e in world.pawsx["test"]["en"]]
    assert 0 < sum(labels) < len(labels)
    en_only = [r["en_only"] for r in world.knowledge["test"]["en"]]
    assert any(en_only) and not all(en_only)
    for lang in world.cfg.languages:
        items = data.load_mc_task(world_dir / "tasks/knowledge", lang, "test")
        assert len(items) == len(world.knowledge["test"][lang])
        assert all(len(it.choices) == 4 and it.prefix.endswith(":") for it in items)
        right = data.load_mc_task(world_dir / "tasks/pawsx", lang, "dev")
        words = world.langs[lang].templates()
        assert right[0].prefix == f"{world.pawsx['dev'][lang][0].sentence1}, {words['right']}"
    cross = data.load_mc_task(world_dir / "tasks/pawsx", "xb", "dev", template_lang="en")
    e = world.pawsx["dev"]["xb"][0]
    assert cross[0].prefix == f"{e.sentence1}, right?"
    assert cross[0].choices == [f" Yes, {e.sentence2}", f" No, {e.sentence2}"]
    assert cross[0].label == (0 if e.label == 1 else 1)
    assert data.task_languages(world_dir / "tasks/pawsx") == ["en", "xa", "xb", "xc"]


def test_fewshot_documents_use_the_task_format(world):
    for lang in world.cfg.languages:
        shots = [d for c, d in world.pretrain if c == lang and data.DEMO_SEP in d]
        assert shots, lang
        words = world.langs[lang].templates()
        demos = [s for d in shots for s in d.split(data.DEMO_SEP)]
        assert any(f", {words['right']} {words['yes']}, " in s for s in demos)
        assert any(s.startswith(f"{words['question']}: ") and f" {words['answer']}: " in s for s in demos)


def test_default_world_token_mix_and_alignment_ratio(big):
    """The mix is set in words; with the default tokenizer (2048) it holds in tokens too."""
    tok = data.train_tokenizer(big.training_texts(), 2048)
    counts = Counter()
    for (lang, _), ids in zip(big.pretrain, data.encode(tok, [d for _, d in big.pretrain])):
        counts[lang] += len(ids)
    total = sum(counts.values())
    assert 1_000_000 < total < 3_000_000
    assert all(abs(counts[c] / total - share) < 0.01 for c, share in zip(big.cfg.languages, big.cfg.mix)), counts
    texts = [t for e in big.align["train"] for t in (e.sent0, e.sent1, e.clm_text)]
    align = sum(len(ids) for ids in data.encode(tok, texts))
    assert 0.008 < align / total <= 0.01


def test_default_world_sizes_budget_and_lexicon_coverage(big):
    stated = stated_in(big)
    for f in big.facts:  # every fact is stated in English; the shared evaluation facts in every language
        assert "en" in stated(f)
        if f["split"] != "train":
            assert stated(f) == ({"en"} if f["en_only"] else set(big.cfg.languages)), f
    n = sum(len(d.split()) for _, d in big.pretrain)
    assert 1_400_000 < n < 1_600_000
    align = big.align["train"]
    words = sum(len(t.split()) for e in align for t in (e.sent0, e.sent1, e.clm_text))
    assert 0.008 * n < words <= 0.01 * big.cfg.pretrain_tokens
    skip = {"question", "answer", "right", "yes", "no", "who_q", "where_q"}  # template words: not in pairs
    for x in ("xa", "xb", "xc"):
        seen = Counter(w for e in align for w in words_of(e.sent1))
        lexicon = {k: v for k, v in big.langs[x].words.items() if k not in skip}
        assert not [k for k, v in lexicon.items() if seen[v] == 0], x
    assert big.align["dev"] and not {(e.sent0, e.sent1) for e in big.align["dev"]} & {(e.sent0, e.sent1) for e in align}

# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_specials_round_trip_and_save(world, tok, tmp_path):
    assert [tok.tokenizer.token_to_id(s) for s in data.SPECIALS] == [0, 1, 2]
    assert (tok.bos, tok.eos, tok.pad) == (data.BOS, data.EOS, data.PAD)
    texts = [d for _, d in world.pretrain[:200]] + ["Zürich – 東京, 서울! ½ 🙂\ttab", "  two  spaces  "]
    for lang in world.cfg.languages:
        texts += [d for c, d in world.pretrain if c == lang][:20] + [e.sentence2 for e in world.pawsx["dev"][lang]]
    ids = data.encode(tok, texts)
    assert all(tok.tokenizer.decode(i, skip_special_tokens=False) == t for i, t in zip(ids, texts))
    tok.save(str(tmp_path / "tokenizer.json"))
    assert data.load_tokenizer(tmp_path / "tokenizer.json").encode(texts[0]).ids == ids[0]
    assert tok.tokenizer.to_str() == data.train_tokenizer(world.training_texts(), 1024).tokenizer.to_str()  # deterministic


def test_non_latin_language_shares_no_subword_with_english(world, tok):
    vocab = {}
    for lang in ("en", "xb"):
        texts = [d for c, d in world.pretrain if c == lang] + [e.sentence1 for e in world.pawsx["dev"][lang]]
        texts += [t for _, en, xb in world.pairs["dev"]["xb"] for t in [en if lang == "en" else xb]]
        vocab[lang] = {t for ids in data.encode(tok, texts) for t in ids}
    shared = {tok.decode([t], skip_special_tokens=False) for t in vocab["en"] & vocab["xb"]}
    assert shared  # punctuation at least
    allowed = lambda s: s in data.SPECIALS or all(c.isspace() or unicodedata.category(c)[0] == "P" for c in s)
    assert all(allowed(s) for s in shared), shared

# ----------------------------------------------------------------------------- readers


def write(path, text):
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def test_readers_on_small_fixtures(tmp_path):
    assert data.read_parallel_tsv(write(tmp_path / "p.tsv", "a b\tα β\nc\tγ\n")) == [("a b", "α β"), ("c", "γ")]
    row = dict(sent0="hi", sent1="salut", clm_text="Say hi. Answer in French: salut", clm_prompt_len=25)
    ex = data.read_afp_jsonl(write(tmp_path / "a.jsonl", json.dumps(row) + "\n"))
    assert ex == [data.AlignExample("hi", "salut", row["clm_text"], 25)]
    assert ex[0].clm_text[ex[0].clm_prompt_len:] == " salut"
    paws = write(tmp_path / "en.dev.tsv", "id\tsentence1\tsentence2\tlabel\n7\tA b.\tB a.\t0\n8\tC d.\tD c.\t1\n")
    assert data.read_pawsx_tsv(paws) == [data.PawsExample("7", "A b.", "B a.", 0),
                                         data.PawsExample("8", "C d.", "D c.", 1)]
    write(tmp_path / "en.dev.jsonl", json.dumps(dict(id="q1", question="Where?", choices=["x", "y"], label=1)))
    first = data.load_mc_task(tmp_path, "en", "dev")[0]
    assert first == data.MCItem("A b., right?", [" Yes, B a.", " No, B a."], 1, "7")
    assert data.read_knowledge_jsonl(tmp_path / "en.dev.jsonl")[0]["choices"] == ["x", "y"]
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
        i = re.search(r"instruction (\d+)", e.clm_text).group(1)
        src, tgt = e.clm_text[:2], e.clm_text[e.clm_prompt_len + 1:][:2]
        assert e.clm_text[:e.clm_prompt_len].endswith(f" Answer in {data.LANGUAGE_NAMES[tgt]}:")
        assert (e.sent0, e.sent1) == (f"en instruction {i}", f"zh instruction {i}")
        assert ("some input" in e.clm_text) == (int(i) % 2 == 1)
        assert e.clm_text[e.clm_prompt_len:] == f" {tgt} output {i}"
        kinds[src != tgt] += 1
    assert 100 < kinds[True] < 200  # cross_probability 0.5
    three = data.read_bactrian(paths, cross_probability=0.5, seed=0, repeat=1)
    pairs = Counter((e.clm_text[:2], e.clm_text[e.clm_prompt_len + 1:][:2]) for e in three)
    assert pairs[("zh", "de")] == pairs[("de", "zh")] == 0  # multilingual: cross samples go through the pivot
    assert sum(n for (s, t), n in pairs.items() if s == t) > 25
    assert all(e.sent0.startswith("en ") and e.sent1[:2] in ("zh", "de") for e in three)
    assert three == data.read_bactrian(paths, cross_probability=0.5, seed=0, repeat=1)
    assert all(e.clm_text[:2] == e.clm_text[e.clm_prompt_len + 1:][:2]
               for e in data.read_bactrian(paths, cross_probability=0.0, seed=1, repeat=1))


def test_toy_alignment_samples_come_from_the_bactrian_reader(world, world_dir):
    paths = {c: world_dir / f"instructions/{c}.json" for c in world.cfg.languages}
    again = data.read_bactrian(paths, world.cfg.cross_probability, world.cfg.seed, world.cfg.align_repeat)
    assert [e.clm_text for e in again] == [e.clm_text for e in world.align["train"]]
    assert data.read_afp_jsonl(world_dir / "align.train.jsonl") == world.align["train"]


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
READERS = {"p.tsv": data.read_parallel_tsv, "a.jsonl": data.read_afp_jsonl, "x.tsv": data.read_pawsx_tsv,
           "k.jsonl": data.read_knowledge_jsonl, "t.txt": data.read_text,
           "b.json": lambda p: data.read_bactrian({"en": p, "zh": p})}


@pytest.mark.parametrize("name,content,line,reason", BAD)
def test_bad_input_names_file_and_line(tmp_path, name, content, line, reason):
    path = write(tmp_path / name, content)
    with pytest.raises(ValueError) as err:
        READERS[name](path)
    assert f"{path}:{line}: " in str(err.value) and reason in str(err.value), str(err.value)


def test_skip_bad_reports_the_count(tmp_path):
    path = write(tmp_path / "p.tsv", "a\tb\nbad\nc\td\nworse\t\n")
    with pytest.warns(UserWarning, match="skipped 2 bad lines"):
        assert data.read_parallel_tsv(path, skip_bad=True) == [("a", "b"), ("c", "d")]


def test_pawsx_from_shared_data():
    if not (PAWSX / "en.dev.tsv").is_file():
        pytest.skip(f"no PAWS-X at {PAWSX}")
    assert data.task_languages(PAWSX) == ["en", "de", "es", "fr", "ja", "ko", "zh"]
    for lang in data.task_languages(PAWSX):
        rows, items = data.read_pawsx_tsv(PAWSX / f"{lang}.dev.tsv"), data.load_mc_task(PAWSX, lang, "dev")
        assert len(items) == len(rows) == 2000
        assert [it.label for it in items] == [1 - e.label for e in rows]  # choices are [Yes, No]
    zh = data.load_mc_task(PAWSX, "zh", "dev")[0]
    assert zh.prefix.endswith(", 对吗?") and zh.choices[0].startswith(" 对, ") and zh.choices[1].startswith(" 不对, ")
    en_template = data.load_mc_task(PAWSX, "zh", "dev", template_lang="en")[0]
    assert en_template.prefix.endswith(", right?") and en_template.choices[1].startswith(" No, ")

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
    for name in ("align.train.jsonl", "pairs/en-xb.dev.tsv", "tasks/pawsx/xb.test.tsv", "tasks/knowledge/en.dev.jsonl",
                 "instructions/xb.json", "pretrain.txt", "tasks/pawsx/templates.json", "world.json"):
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


def test_toy_command_writes_world_and_tokenizer(tmp_path):
    args = ["toy", "--out", str(tmp_path / "w"), "--seed", "2", "--pretrain-tokens", "20000", "--vocab-size", "600"]
    assert data.main(args) == 0
    tok = data.load_tokenizer(tmp_path / "w/tokenizer.json")
    assert tok.get_vocab_size() <= 600
    assert json.loads((tmp_path / "w/world.json").read_text())["config"]["seed"] == 2
    assert data.read_text(tmp_path / "w/pretrain.txt")


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
    with pytest.raises(ValueError):
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
