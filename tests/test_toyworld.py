"""Tests of toyworld.py: determinism (the seed-0 world's files, byte for byte), disjoint splits, exact
translations, the language mix, the alignment budget and lexicon coverage, and the command line."""
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest

import data
import tasks
import toyworld
from conftest import REPO, SMALL_WORLD


@pytest.fixture(scope="module")
def big():
    """The default world (a couple of seconds): sizes, coverage and the alignment budget are checked on it."""
    return toyworld.build_world(toyworld.WorldConfig())


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def stated_in(world):
    """Fact (rel, person, value) -> the languages whose training text states it."""
    out = {}
    for lang, m in world.train_meanings:
        if m[0] == "fact":
            out.setdefault(m[1:], set()).add(lang)
    return lambda f: out.get((f["rel"], f["notable"], f["value"]), set())


def words_of(text):
    return re.findall(r"[^\s.,?:]+", text)


def test_default_world_is_byte_identical_to_the_recorded_one(big, tmp_path):
    """RESULTS.md's figures rest on this world: every file of seed 0 has the sha256 recorded in
    tests/toyworld_seed0.sha256. A change to the world that is meant must rewrite that file, from the new world:
    `python toyworld.py --out W --vocab-size 0 && (cd W && find . -type f | sort | sed 's|^./||' | xargs sha256sum)`."""
    toyworld.write_world(big, tmp_path)
    recorded = dict(line.split()[::-1] for line in (REPO / "tests/toyworld_seed0.sha256").read_text().splitlines())
    now = {name: hashlib.sha256(content).hexdigest() for name, content in files(tmp_path).items()}
    assert now.keys() == recorded.keys()
    assert [name for name in now if now[name] != recorded[name]] == []


def test_same_seed_same_files_other_seed_differs(world_dir, tmp_path):
    toyworld.write_world(toyworld.build_world(toyworld.WorldConfig(**SMALL_WORLD)), tmp_path / "a")
    toyworld.write_world(toyworld.build_world(toyworld.WorldConfig(**SMALL_WORLD, seed=1)), tmp_path / "b")
    same, other = files(tmp_path / "a"), files(tmp_path / "b")
    assert same == files(world_dir)
    assert same.keys() == other.keys()
    assert same["pretrain.txt"] != other["pretrain.txt"]
    assert same["pairs/en-xb.test.tsv"] != other["pairs/en-xb.test.tsv"]


@pytest.mark.parametrize("mix", [(0.85, 0.05, 0.05, 0.05), (0.4, 0.3, 0.2, 0.1)])
def test_language_mix_within_one_point(mix):
    w = toyworld.build_world(toyworld.WorldConfig(**dict(SMALL_WORLD, mix=mix)))
    counts = Counter()
    for lang, doc in w.pretrain:
        counts[lang] += len(doc.split())
    total = sum(counts.values())
    assert abs(total - SMALL_WORLD["pretrain_words"]) / SMALL_WORLD["pretrain_words"] < 0.02
    for lang, share in zip(w.cfg.languages, mix):
        assert abs(counts[lang] / total - share) < 0.01, (lang, counts[lang] / total)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="mix"):
        toyworld.build_world(toyworld.WorldConfig(mix=(0.5, 0.5)))
    with pytest.raises(ValueError, match="languages"):
        toyworld.build_world(toyworld.WorldConfig(languages=("xa", "en"), mix=(0.5, 0.5)))


def test_translation_pairs_are_exact(world, world_dir):
    for x in ("xa", "xb", "xc"):
        for split in ("dev", "test"):
            rows = world.pairs[split][x]
            assert data.read_parallel_tsv(world_dir / f"pairs/en-{x}.{split}.tsv") == [(e, t) for _, e, t in rows]
            for m, en, xx in rows:
                assert en == toyworld.render(world.langs["en"], m) and xx == toyworld.render(world.langs[x], m)
            # one meaning per line and one line per meaning: retrieval has a single right answer
            assert len({m for m, _, _ in rows}) == len({e for _, e, _ in rows}) == len({t for _, _, t in rows}) \
                == len(rows) == dict(dev=30, test=60)[split]
    assert world.pairs["test"]["xa"][0][0] == world.pairs["test"]["xb"][0][0]  # same meanings in every pair file


def test_rendering_is_injective_and_languages_differ(world):
    for code, L in world.langs.items():
        assert len(set(L.words.values())) == len(L.words), code  # no word stands for two concepts
    m = ("act", 0, 1, 2, 3, 4)
    orders = {toyworld.render(L, m) for L in world.langs.values()}
    assert len(orders) == len(world.langs)
    en, xb = (set(words_of(toyworld.render(world.langs[c], m))) for c in ("en", "xb"))
    assert not en & xb


def test_evaluation_meanings_are_disjoint_from_training(world):
    trained = {m for _, m in world.train_meanings}
    assert sum(m[0] == "act" for m in trained) > 100  # the record is really kept
    held_out = {m for split in ("dev", "test") for rows in world.pairs[split].values() for m, _, _ in rows}
    held_out |= {m for split in ("dev", "test") for m in world.sentiment_meanings[split]}
    assert held_out and not held_out & trained
    eval_facts = [f for f in world.facts if f["split"] != "train"]
    assert not {("ask", f["rel"], f["notable"]) for f in eval_facts} & trained
    stated = stated_in(world)
    assert all(stated(f) <= {"en"} for f in eval_facts if f["en_only"])  # stated in no other language
    corpus = "\n".join(d for _, d in world.pretrain)  # and as text, not only as meaning ids
    assert not [en for _, en, _ in world.pairs["test"]["xb"] if en in corpus]
    assert not [xb for _, _, xb in world.pairs["test"]["xb"] if xb in corpus]


def test_sentiment_and_knowledge_items(world, world_dir):
    for split in ("dev", "test"):
        for m, e in zip(world.sentiment_meanings[split], world.sentiment[split]["en"]):
            adjective = world.langs["en"].words[f"adj{m[3]}"]
            assert e.label == int(toyworld.is_good(m)) == int(adjective in "new clean shiny fresh lovely sturdy".split())
            assert f" {adjective} " in e.sentence
    labels = [e.label for e in world.sentiment["test"]["en"]]
    assert 0.3 < sum(labels) / len(labels) < 0.7
    assert all(r["en_only"] for r in world.knowledge["test"]["en"])  # the default: every eval fact in English only
    for lang in world.cfg.languages:
        items = tasks.load_mc_task(world_dir / "tasks/knowledge", lang, "test")
        assert len(items) == len(world.knowledge["test"][lang]) == 40
        assert all(len(it.choices) == 4 and it.prefix.endswith(":") for it in items)
        rows = world.sentiment["dev"][lang]
        assert tasks.read_sentiment_tsv(world_dir / f"tasks/sentiment/{lang}.dev.tsv") == rows
        words = world.langs[lang].templates()
        items = tasks.load_mc_task(world_dir / "tasks/sentiment", lang, "dev")
        assert items[0].prefix == f"{rows[0].sentence} {words['good']}"
        assert items[0].choices == [f" {words['yes']}", f" {words['no']}"] and items[0].label == 1 - rows[0].label
    cross = tasks.load_mc_task(world_dir / "tasks/sentiment", "xb", "dev", template_lang="en")
    e = world.sentiment["dev"]["xb"][0]
    assert cross[0].prefix == f"{e.sentence} Is it good?" and cross[0].choices == [" Yes", " No"]
    assert tasks.task_languages(world_dir / "tasks/sentiment") == ["en", "xa", "xb", "xc"]


def test_fewshot_documents_use_the_task_format(world):
    for lang in world.cfg.languages:
        shots = [d for c, d in world.pretrain if c == lang and data.DEMO_SEP in d]
        assert shots, lang
        words = world.langs[lang].templates()
        demos = [s for d in shots for s in d.split(data.DEMO_SEP)]
        assert any(s.endswith(f" {words['good']} {words['yes']}") for s in demos)
        assert any(s.endswith(f" {words['good']} {words['no']}") for s in demos)
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
    texts = [t for e in big.align["train"] for t in (e.sent0, e.sent1, e.instruction_text)]
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
    words = sum(len(t.split()) for e in align for t in (e.sent0, e.sent1, e.instruction_text))
    assert 0.8 * big.cfg.align_fraction * n < words <= big.cfg.align_fraction * big.cfg.pretrain_words
    skip = {"question", "answer", "right", "yes", "no", "good", "who_q", "where_q"}  # template words: not in pairs
    for x in ("xa", "xb", "xc"):  # every word but the notables' names, which are the same in every language, in
        # the pairs or the instruction samples (a few job and animal words are answers only)
        seen = Counter(w for e in align for t in (e.sent1, e.instruction_text) for w in words_of(t))
        lexicon = {k: v for k, v in big.langs[x].words.items() if k not in skip and not k.startswith("notable")}
        assert not [k for k, v in lexicon.items() if seen[v] == 0], x
    assert big.align["dev"] and not {(e.sent0, e.sent1) for e in big.align["dev"]} & {(e.sent0, e.sent1) for e in align}


def test_toy_alignment_samples_come_from_the_bactrian_reader(world, world_dir):
    paths = {c: world_dir / f"instructions/{c}.json" for c in world.cfg.languages}
    again = data.read_bactrian(paths, world.cfg.cross_probability, world.cfg.seed, world.cfg.align_repeat)
    assert [e.instruction_text for e in again] == [e.instruction_text for e in world.align["train"]]
    assert data.read_afp_jsonl(world_dir / "align.train.jsonl") == world.align["train"]


def test_command_writes_world_and_tokenizer(tmp_path, capsys):
    args = ["--out", str(tmp_path / "w"), "--seed", "2", "--pretrain-words", "20000", "--vocab-size", "600"]
    assert toyworld.main(args) == 0
    assert "alignment tokens" in capsys.readouterr().out
    tok = data.load_tokenizer(tmp_path / "w/tokenizer.json")
    assert tok.get_vocab_size() <= 600
    config = json.loads((tmp_path / "w/world.json").read_text())["config"]
    assert config["seed"] == 2 and config["pretrain_words"] == 20000
    assert data.read_text(tmp_path / "w/pretrain.txt")
