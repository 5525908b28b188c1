"""Tests for tasks.py: each layout's reader on files written here from the documented layouts, their
file:line errors, data.py check, and the shared dev data when it is beside the repository."""

import json

import pytest

import data
import tasks
from conftest import SHARED
from conftest import write as write_raw

PAWSX = SHARED / "pawsx"


def write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


XNLI_HEAD = ("language\tgold_label\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
             "sentence2_parse\tsentence1\tsentence2\tpromptID\tpairID\tgenre")


def xnli_row(lang, label, s1, s2, pair):
    return f"{lang}\t{label}\t(x)\t(y)\t(X)\t(Y)\t{s1}\t{s2}\t7\t{pair}\tfiction"


def test_xnli_release_and_authors_form(tmp_path):
    write(tmp_path / "rel/xnli.dev.tsv", [XNLI_HEAD, xnli_row("en", "neutral", "A man sleeps.", "He dreams.", 1),
                                          xnli_row("de", "contradiction", "Ein Mann schläft.", "Er rennt.", 2),
                                          xnli_row("en", "entailment", "It rains.", "It is wet.", 3)])
    rows = tasks.read("xnli", tmp_path / "rel", "en", "dev")
    assert [(r.premise, r.hypothesis, r.label, r.id) for r in rows] == \
           [("A man sleeps.", "He dreams.", 1, "1"), ("It rains.", "It is wet.", 0, "3")]
    assert tasks.languages("xnli", tmp_path / "rel") == ["en", "de"]
    write(tmp_path / "own/zh.test.tsv", ["他睡了。\t他在跑。\tcontradiction", "下雨了。\t地湿了。\t0"])
    assert [r.label for r in tasks.read("xnli", tmp_path / "own", "zh", "test")] == [2, 0]
    write(tmp_path / "bad/xnli.test.tsv", [XNLI_HEAD, xnli_row("en", "maybe", "a", "b", 1)])
    with pytest.raises(ValueError, match=r"xnli.test.tsv:2: label must be one of entailment"):
        tasks.read("xnli", tmp_path / "bad", "en", "test")


def test_pawsx_original_layout(tmp_path):
    write(tmp_path / "x-final/de/test_2k.tsv", ["id\tsentence1\tsentence2\tlabel", "1\tA b.\tB a.\t0"])
    write(tmp_path / "x-final/en/dev_2k.tsv", ["id\tsentence1\tsentence2\tlabel", "1\tA b.\tA b!\t1"])
    assert tasks.languages("pawsx", tmp_path) == ["en", "de"]
    assert tasks.read("pawsx", tmp_path, "de", "test")[0].label == 0
    with pytest.raises(FileNotFoundError, match="no dev file for language 'de'"):
        tasks.read("pawsx", tmp_path, "de", "dev")


def test_copa_jsonl(tmp_path):
    row = dict(premise="The man turned on the faucet.", choice1="The toilet filled with water.",
               choice2="Water flowed from the spout.", question="effect", label=1, idx=1)
    write(tmp_path / "en/val.en.jsonl", [json.dumps(row), json.dumps(dict(row, question="cause", label=0, idx=2))])
    rows = tasks.read("xcopa", tmp_path, "en", "dev")
    assert rows[0] == tasks.COPARow(row["premise"], [row["choice1"], row["choice2"]], "effect", 1, "1")
    assert tasks.languages("xcopa", tmp_path) == ["en"]
    for bad, message in [(dict(row, question="why"), "'cause' or 'effect'"), (dict(row, label=2), "0 or 1"),
                         ({k: v for k, v in row.items() if k != "choice2"}, "missing field 'choice2'")]:
        write(tmp_path / "en/test.en.jsonl", [json.dumps(row), json.dumps(bad)])
        with pytest.raises(ValueError, match=rf"test.en.jsonl:2: .*{message}"):
            tasks.read("xcopa", tmp_path, "en", "test")


def test_storycloze_tsv(tmp_path):
    head = "\t".join(tasks.STORY_HEADER)
    story = "s1\tTom was hungry.\tHe opened the fridge.\tIt was empty.\tHe went out.\tHe bought food.\tHe slept.\t1"
    write(tmp_path / "spring2016.val.ru.tsv_split_20_80_train.tsv", [head, story])
    write(tmp_path / "spring2016.val.ru.tsv_split_20_80_eval.tsv", [head, story[:-1] + "3"])
    row, = tasks.read("xstorycloze", tmp_path, "ru", "dev")
    assert row.sentences[3] == "He went out." and row.endings == ["He bought food.", "He slept."] and row.label == 0
    assert tasks.languages("xstorycloze", tmp_path) == ["ru"]
    with pytest.raises(ValueError, match=r"_eval.tsv:2: AnswerRightEnding must be 1 or 2"):
        tasks.read("xstorycloze", tmp_path, "ru", "test")


def test_winograd_published_tsv_and_jsonl(tmp_path):
    sentence = 'Dan took the rear seat because his "Dibs!" was slow.'
    tokens = ["Dan", "took", "the", "rear", "seat", "because", "his", "``", "Dibs", "!", "''", "was", "slow", "."]
    cands = [["Dan", [0, 1], ["Dan"], False], ["the rear seat", [2, 5], ["the", "rear", "seat"], True]]
    line = f"en\twsc\t?\t{sentence}\t{json.dumps(tokens)}\t{json.dumps(['his', [6, 7], ['his']])}\t{json.dumps(cands)}"
    write(tmp_path / "dataset.tsv", [line, line.replace("en\t", "fr\t", 1)])
    row, = tasks.read("xwinograd", tmp_path, "en", "test")
    assert (row.before, row.options, row.after, row.label) == \
           ("Dan took the rear seat because ", ["Dan", "the rear seat"], ' "Dibs!" was slow.', 1)
    assert row.before + row.options[0] + row.after == sentence.replace("his", "Dan")
    assert tasks.read("xwinograd", tmp_path, "en", "dev") == [row]        # no splits: one pool
    assert tasks.languages("xwinograd", tmp_path) == ["en", "fr"]
    write(tmp_path / "bad/dataset.tsv", [line, line.replace("True", "False").replace("true", "false")])
    with pytest.raises(ValueError, match=r"dataset.tsv:2: expected 2 or more candidates with exactly one correct"):
        tasks.read("xwinograd", tmp_path / "bad", "en", "test")
    write(tmp_path / "j/pt.jsonl", [json.dumps(dict(sentence="O _ caiu.", option1="copo", option2="prato", answer="2"))])
    row, = tasks.read("xwinograd", tmp_path / "j", "pt", "test")
    assert (row.before, row.options, row.after, row.label) == ("O ", ["copo", "prato"], " caiu.", 1)
    write(tmp_path / "j/ru.jsonl", [json.dumps(dict(sentence="no blank", option1="a", option2="b", answer=1))])
    with pytest.raises(ValueError, match=r"ru.jsonl:1: field 'sentence' must hold one '_'"):
        tasks.read("xwinograd", tmp_path / "j", "ru", "test")


def test_data_check_knows_the_task_files(tmp_path):
    write(tmp_path / "xnli.dev.tsv", [XNLI_HEAD, xnli_row("en", "neutral", "a", "b", 1)])
    assert "XNLI-1.0 release, 1 pairs in 1 languages" in data.check_file(tmp_path / "xnli.dev.tsv")
    write(tmp_path / "s.tsv", ["\t".join(tasks.STORY_HEADER), "x\ta\tb\tc\td\te\tf\t2"])
    assert "XStoryCloze TSV, 1 stories" in data.check_file(tmp_path / "s.tsv")
    good = dict(premise="a", choice1="b", choice2="c", question="cause", label=0, idx=0)
    assert "(X)COPA JSON lines, 1 items" in data.check_file(write(tmp_path / "val.en.jsonl", [json.dumps(good)]))
    bad = write(tmp_path / "val.et.jsonl", [json.dumps(dict(good, choice1=1))])
    with pytest.raises(ValueError, match=r"val.et.jsonl:1: field 'choice1' must be a string"):
        data.check_file(bad)
    wino = write(tmp_path / "ru.jsonl", [json.dumps(dict(sentence="a _ b", option1="x", option2="y", answer=2))])
    assert "XWinograd JSON lines, 1 schemas" in data.check_file(wino)
    crlf = tmp_path / "crlf.tsv"
    crlf.write_bytes(("\t".join(tasks.STORY_HEADER) + "\r\nx\ta\tb\tc\td\te\tf\t1\r\n").encode())
    assert "XStoryCloze TSV, 1 stories" in data.check_file(crlf)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the repository")
def test_shared_dev_data_reads_as_documented():
    assert tasks.languages("xcopa", SHARED / "xcopa") == ["et", "ht", "id", "it", "qu", "sw", "ta", "th", "tr",
                                                          "vi", "zh"]
    assert all(len(tasks.read("xcopa", SHARED / "xcopa", lang, "dev")) == 100
               for lang in tasks.languages("xcopa", SHARED / "xcopa"))
    counts = {lang: len(tasks.read("xwinograd", SHARED / "xwinograd", lang, "test"))
              for lang in tasks.languages("xwinograd", SHARED / "xwinograd")}
    assert counts == dict(en=2325, fr=83, jp=959, pt=263, ru=315, zh=16)
    assert tasks.languages("pawsx", SHARED / "pawsx") == ["en", "de", "es", "fr", "ja", "ko", "zh"]
    assert len(tasks.read("pawsx", SHARED / "pawsx", "ko", "dev")) == 2000


# ----------------------------------------------------------------------------- prompts

COPA = tasks.COPARow("The man turned on the faucet.", ["The toilet filled with water.", "Water flowed."], "effect", 1)


def test_templates_give_the_documented_strings():
    item = tasks.copa_item(COPA, "en")
    assert tasks.demo_text(item) == "Effect: The man turned on the faucet so water flowed."
    zh = tasks.copa_item(tasks.COPARow("那人打开水龙头。", ["厕所里满是水。", "水流出来了。"], "cause", 0), "zh")
    assert zh.prefix + zh.choices[0] == "起因: 那人打开水龙头因为厕所里满是水。"
    nli = tasks.nli_item(tasks.NLIRow("A man sleeps.", "He dreams.", 1), "en")
    assert nli.prefix == ("Premise: A man sleeps.\nHypothesis: He dreams.\nQuestion: What is the relationship "
                          "between premise and hypothesis, entailment, neutral, or contradiction?\nAnswer:")
    assert nli.choices == [" entailment", " neutral", " contradiction"] and nli.label == 1
    story = tasks.story_item(tasks.StoryRow(["A.", "B.", "C.", "D."], ["E.", "F."], 1), "en")
    assert tasks.demo_text(story) == "A. B. C. D. F."
    wino = tasks.winograd_item(tasks.WinogradRow("The cup fell because ", ["it", "the table"], " was slick.", 1), "en")
    assert tasks.demo_text(wino) == "The cup fell because the table was slick."
    assert all(lang in tasks.NLI_WORDS for lang in ("en", "fr", "es", "de", "el", "bg", "ru", "tr", "ar", "vi", "th",
                                                    "zh", "hi", "sw", "ur"))           # XNLI's 15 languages
    with pytest.raises(ValueError, match="xcopa: no template words for language 'xx'"):
        tasks.copa_item(COPA, "xx")


def test_the_paper_tasks_run_in_eval(tmp_path, capsys):
    """eval.py runs each task by name, both settings, demos from dev (XWinograd: from its other items);
    without English data there is no cross-lingual setting, and the console says so."""
    import torch
    import eval as ev
    from model import Decoder, ModelConfig
    row = dict(premise="The man turned on the faucet.", choice1="The toilet filled.", choice2="Water flowed.",
               question="effect", label=1)
    for lang in ("en", "it"):
        for split in ("val", "test"):
            write(tmp_path / f"xcopa/{lang}/{split}.{lang}.jsonl", [json.dumps(dict(row, idx=i)) for i in range(6)])
    write(tmp_path / "xwinograd/en.jsonl", [json.dumps(dict(sentence=f"The cup {i} fell on _ floor.", option1="the",
                                                            option2="a", answer=1)) for i in range(5)])
    write(tmp_path / "xnli/en.dev.tsv", [f"A man {i} sleeps.\tHe dreams.\tneutral" for i in range(4)])
    story = "\t".join(["s", "Tom ate.", "He was full.", "He slept.", "He woke.", "He ran.", "He flew.", "1"])
    for split in ("train", "eval"):                                    # Russian only: no English demos
        write(tmp_path / f"xstorycloze/spring2016.val.ru.tsv_split_20_80_{split}.tsv",
              ["\t".join(tasks.STORY_HEADER)] + [story.replace("s", f"s{i}", 1) for i in range(3)])
    texts = ["the man turned on the faucet", "the cup fell on the floor", "Premise Hypothesis Answer entailment"]
    tok = data.train_tokenizer(texts * 20, vocab_size=300)
    torch.manual_seed(0)
    model = Decoder(ModelConfig(vocab_size=tok.get_vocab_size(), max_seq_len=160, n_layer=1, n_head=2, d_model=16))
    cfg = ev.EvalConfig(tasks=[f"{t}={tmp_path / t}" for t in ("xcopa", "xwinograd", "xnli", "xstorycloze")],
                        shots=(0, 2),
                        max_items=6, progress=False)
    mc = ev.evaluate_model(model.eval(), tok, None, cfg)["mc"]
    assert set(mc["xcopa"]) == {"in_0shot", "in_2shot", "cross_0shot", "cross_2shot"}
    assert mc["xcopa"]["cross_2shot"]["it"]["n"] == 6 and "en" not in mc["xcopa"]["cross_2shot"]
    assert mc["xwinograd"]["in_2shot"]["en"]["n"] == 5 and set(mc["xwinograd"]) == {"in_0shot", "in_2shot"}
    assert set(mc["xstorycloze"]) == {"in_0shot", "in_2shot"} and mc["xstorycloze"]["in_2shot"]["ru"]["n"] == 3
    assert "xstorycloze: no English data" in capsys.readouterr().err
    r = mc["xnli"]["in_2shot"]["en"]
    assert r["n"] == 4 and abs(r["acc_se"] - (r["acc"] * (1 - r["acc"]) / 4) ** 0.5) < 1e-12


def test_toy_task_readers_on_small_fixtures(tmp_path):
    paws = write_raw(tmp_path / "en.dev.tsv", "id\tsentence1\tsentence2\tlabel\n7\tA b.\tB a.\t0\n8\tC d.\tD c.\t1\n")
    assert tasks.read_pawsx_tsv(paws) == [tasks.PawsExample("7", "A b.", "B a.", 0),
                                          tasks.PawsExample("8", "C d.", "D c.", 1)]
    write_raw(tmp_path / "en.dev.jsonl", json.dumps(dict(id="q1", question="Where?", choices=["x", "y"], label=1)))
    first = tasks.load_mc_task(tmp_path, "en", "dev")[0]
    assert first == tasks.MCItem("A b., right?", [" Yes, B a.", " No, B a."], 1, "7")
    assert tasks.read_knowledge_jsonl(tmp_path / "en.dev.jsonl")[0]["choices"] == ["x", "y"]


def test_sentiment_tsv_reader_and_items(tmp_path):
    path = write_raw(tmp_path / "xb.dev.tsv", "id\tsentence\tlabel\n1\tA b c.\t1\n2\tD e f.\t0\n")
    assert tasks.read_sentiment_tsv(path) == [tasks.SentimentRow("1", "A b c.", 1), tasks.SentimentRow("2", "D e f.", 0)]
    write_raw(tmp_path / "templates.json", json.dumps({"xb": dict(good="Καλό;", yes="Ναι", no="Όχι")}))
    items = tasks.load_mc_task(tmp_path, "xb", "dev")
    assert items == [tasks.MCItem("A b c. Καλό;", [" Ναι", " Όχι"], 0, "1"), tasks.MCItem("D e f. Καλό;", [" Ναι", " Όχι"], 1, "2")]
    with pytest.raises(ValueError, match=r"no template words \['good', 'yes', 'no'\] for language 'en'"):
        tasks.load_mc_task(tmp_path, "xb", "dev", template_lang="en")   # the task's words are the world's own
    for body, needle in [("id\tsentence\tlabel\n1\tA.\t2\n", ":2: label must be 0 or 1"),
                         ("id\tsentence\tlabel\n1\tA.\n", ":2: expected 3"),
                         ("id\ttext\tlabel\n1\tA.\t1\n", ":1: expected the header id sentence label")]:
        with pytest.raises(ValueError, match=needle):
            tasks.read_sentiment_tsv(write_raw(tmp_path / "bad.tsv", body))


def test_pawsx_from_shared_data():
    if not (PAWSX / "en.dev.tsv").is_file():
        pytest.skip(f"no PAWS-X at {PAWSX}")
    assert tasks.task_languages(PAWSX) == ["en", "de", "es", "fr", "ja", "ko", "zh"]
    for lang in tasks.task_languages(PAWSX):
        rows, items = tasks.read_pawsx_tsv(PAWSX / f"{lang}.dev.tsv"), tasks.load_mc_task(PAWSX, lang, "dev")
        assert len(items) == len(rows) == 2000
        assert [it.label for it in items] == [1 - e.label for e in rows]  # choices are [Yes, No]
    zh = tasks.load_mc_task(PAWSX, "zh", "dev")[0]
    assert zh.prefix.endswith(", 对吗?") and zh.choices[0].startswith(" 对, ") and zh.choices[1].startswith(" 不对, ")
    en_template = tasks.load_mc_task(PAWSX, "zh", "dev", template_lang="en")[0]
    assert en_template.prefix.endswith(", right?") and en_template.choices[1].startswith(" No, ")
