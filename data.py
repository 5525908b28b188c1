"""
data.py: the toy multilingual world, its tokenizer, readers for real data, and batching.

The toy world is a small meaning space (people, cities, things, adjectives, verbs, and a knowledge base of
facts) rendered into English plus synthetic languages with their own seeded words and word orders:
  en  English      S V O L   ("Kalib sells the red apple in Varo.")
  xa  Valian       S O L V   Latin script, shares the proper nouns with English (like de/es/fr)
  xb  Kirosh       V S O L   Greek script: shares no subword with English (the retrieval target)
  xc  Temish       L S O V   Cyrillic script
Every sentence is rendered from a meaning tuple, so translation pairs are exact and evaluation meanings can be
kept out of all training data. `python data.py toy --out DIR [--seed S]` writes (all UTF-8, "\n" endings):
  pretrain.txt                   pretraining corpus: documents separated by one blank line (toy docs are one
                                 line each); few-shot documents join their examples with DEMO_SEP ("</s>")
  text/{lang}.{dev,test}.txt     held-out documents per language (perplexity), same format
  align.{train,dev}.jsonl        AFP rows {"sent0","sent1","clm_text","clm_prompt_len"}; sent0/sent1 is an
                                 en-xx translation pair, clm_text a cross-lingual instruction sample and
                                 clm_prompt_len the prompt length in characters (the response is the rest)
  instructions/{lang}.json       the Bactrian-X-layout records behind align.train's instruction samples
  pairs/en-{xx}.{dev,test}.tsv   held-out translation pairs "en TAB xx", one meaning per line
  tasks/pawsx/{lang}.{split}.tsv        PAWS-X TSV (header id, sentence1, sentence2, label; 1 = paraphrase)
  tasks/knowledge/{lang}.{split}.jsonl  {"id","question","choices","label","en_only"}; choices are statements
                                 ("Kalib lives in Varo."), so scoring them reads the facts learned from the text
  tasks/*/templates.json         template words per language {"right","yes","no","question","answer"}
  world.json                     config, language names, lexicon, and the facts with their split and en_only flag
  tokenizer.json                 byte-level BPE trained on pretrain.txt + align.train.jsonl texts
`python data.py check FILE` validates any of these formats (and real PAWS-X / Bactrian-X files, and the paper's
five evaluation tasks) and exits 2 with "FILE:LINE: reason" on the first bad line: every reader raises that
ValueError on a malformed line.
Batches (collate_align, AlignData, PretrainData) have the keys of spec/INTERFACES.md, and batch(step) depends
only on (seed, step, rank), so a resumed run sees exactly the data it would have seen.
"""
import argparse
import json
import math
import random
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<pad>", "<s>", "</s>"]
PAD, BOS, EOS = 0, 1, 2
DEMO_SEP = "</s>"  # joins few-shot examples, as the paper joins demos; tokenizes to EOS
PAWSX_HEADER = ["id", "sentence1", "sentence2", "label"]

# English language names for "Answer in {name}:" (always English, as in the paper)
LANGUAGE_NAMES = {"en": "English", "de": "German", "es": "Spanish", "fr": "French", "ja": "Japanese",
                  "ko": "Korean", "zh": "Chinese", "ru": "Russian", "ar": "Arabic", "hi": "Hindi",
                  "xa": "Valian", "xb": "Kirosh", "xc": "Temish"}
# template words of the real PAWS-X languages; the toy languages get theirs from templates.json
TEMPLATE_WORDS = {
    "en": dict(right="right?", yes="Yes", no="No", question="Question", answer="Answer"),
    "de": dict(right="richtig?", yes="Ja", no="Nein", question="Frage", answer="Antwort"),
    "es": dict(right="¿verdad?", yes="Sí", no="No", question="Pregunta", answer="Respuesta"),
    "fr": dict(right="n'est-ce pas?", yes="Oui", no="Non", question="Question", answer="Réponse"),
    "ja": dict(right="ですよね?", yes="はい", no="いいえ", question="質問", answer="答え"),
    "ko": dict(right="맞죠?", yes="예", no="아니요", question="질문", answer="답"),
    "zh": dict(right="对吗?", yes="对", no="不对", question="问题", answer="答案"),
}

# -----------------------------------------------------------------------------
# records


@dataclass
class AlignExample:
    sent0: str           # contrastive pair: x
    sent1: str           # its translation y
    clm_text: str        # instruction sample; the loss covers clm_text[clm_prompt_len:]
    clm_prompt_len: int  # prompt length in characters


@dataclass
class PawsExample:
    id: str
    sentence1: str
    sentence2: str
    label: int           # 1 = paraphrase


@dataclass
class MCItem:
    prefix: str          # everything before the scored part (no demos)
    choices: list        # continuations; the scored text is prefix + choices[k]
    label: int           # index of the right choice; as a demonstration the item reads prefix + choices[label]
    id: str = ""


def pawsx_item(s1, s2, paws_label, words, id=""):
    """`{s1}, right? {Yes|No}, {s2}`: choices are [Yes, No], so a paraphrase (PAWS label 1) has label 0."""
    return MCItem(f"{s1}, {words['right']}", [f" {words['yes']}, {s2}", f" {words['no']}, {s2}"],
                  0 if paws_label == 1 else 1, id)


def knowledge_item(question, choices, label, words, id=""):
    return MCItem(f"{words['question']}: {question} {words['answer']}:", [f" {c}" for c in choices], label, id)


def demo_text(item):
    return item.prefix + item.choices[item.label]

# -----------------------------------------------------------------------------
# the toy world


@dataclass
class WorldConfig:
    """Every knob of the toy world. Sizes are counted in whitespace-separated words: with the default
    2048-token BPE one word is about 1.27 tokens, so the default corpus is about 1.9M tokens."""
    seed: int = 0
    languages: tuple = ("en", "xa", "xb", "xc")  # codes from TOY_LANGS; the first is the pivot (English)
    mix: tuple = (0.85, 0.05, 0.05, 0.05)       # share of pretraining words per language
    pretrain_tokens: int = 1_500_000            # pretraining corpus size in whitespace-separated words
    fewshot_share: float = 0.25                 # share of each language's words in few-shot-formatted documents
    en_only_share: float = 0.5                  # share of facts (in each split) stated in English only
    align_fraction: float = 0.01                # alignment words (sent0 + sent1 + clm_text) / pretraining words
    align_dev_fraction: float = 0.1             # alignment dev rows, as a fraction of the train rows
    align_repeat: int = 1                       # the paper repeats instruction data 3x; here budget buys new ids
    cross_probability: float = 0.5              # chance that an instruction's answer language differs
    n_persons: int = 24                         # lexicon sizes (persons and cities are proper nouns): every word
    n_cities: int = 12                          # must recur in the 1% alignment data, and a larger lexicon
    n_objects: int = 12                         # aligns worse (48 persons, 16 objects: xb P@1 0.59 vs 0.82)
    n_adjectives: int = 8
    n_object_verbs: int = 6                     # "likes", "sells", ...: person -> thing
    n_person_verbs: int = 6                     # "helps", "meets", ...: person -> person, each with a synonym
    n_jobs: int = 8
    n_animals: int = 8
    train_fact_share: float = 1 / 3             # facts whose question form may appear in training; rest eval
    dev_fact_share: float = 1 / 3               # of the eval facts, the share in the dev split (rest test)
    n_eval_pairs: tuple = (200, 500)            # held-out translation meanings (dev, test) per en-xx file
    n_pawsx: tuple = (200, 500)                 # PAWS-style items (dev, test) per language (parallel)
    n_text_docs: int = 100                      # held-out documents per language and split


TOY_LANGS = {  # order: constituents S V O L; alt: the other order used for paraphrases
    "en": dict(script="latin", order="SVOL", alt="LSVO", adj_after=False, loc_after=False),
    "xa": dict(script="latin", order="SOLV", alt="LSOV", adj_after=True, loc_after=True),
    "xb": dict(script="greek", order="VSOL", alt="LVSO", adj_after=True, loc_after=False),
    "xc": dict(script="cyrillic", order="LSOV", alt="SOVL", adj_after=False, loc_after=True),
}
EN_WORDS = dict(
    obj="apple book lamp chair basket coat drum kettle ladder mirror pencil rope shovel table violin wagon "
        "bottle hammer blanket candle".split(),
    adj="red blue green old new small large heavy yellow wooden broken shiny".split(),
    vo="likes sells buys paints finds carries washes hides".split(),
    vp="helps meets calls teaches pays follows warns hires".split(),
    syn="assists encounters phones instructs compensates trails alerts employs".split(),
    job="baker farmer doctor teacher singer painter sailor tailor miller potter".split(),
    animal="horse cat dog goat parrot rabbit sheep duck pig mule".split(),
)
EN_FUNCTION = {"in": "in", "live": "lives", "work": "works", "keep": "keeps", "where": "where",
               "what_job": "what", "which_animal": "which", "who_q": "Who does it?",
               "where_q": "Where does it happen?", **TEMPLATE_WORDS["en"]}
EN_QUESTIONS = {"home": "Where does {} live?", "job": "What does {} work as?",
                "animal": "Which animal does {} keep?"}
RELATIONS = {"home": ("live", "city", "where"), "job": ("work", "job", "what_job"),
             "animal": ("keep", "animal", "which_animal")}  # relation: verb, value category, wh-word
TEMPLATE_KEYS = ("right", "yes", "no", "question", "answer")
# names are built from these letters and transliterated letter by letter (a 1-1 map, so names stay distinct)
NAME_LETTERS = "bdgklmnprstzaeiou"
SCRIPT_LETTERS = {"latin": NAME_LETTERS, "greek": "βδγκλμνπρστζαειου", "cyrillic": "бдгклмнпрстзаеиоу"}
SYLLABLES = {  # onsets, vowels, codas of the synthetic languages' own words
    "xa": ("f h j l m n r s v w th sh".split(), "a e i o u ai ou".split(), ["", "", "n", "r", "s"]),
    "xb": (list("βγδζθκλμνξπρστφχ"), list("αεηιουω"), ["", "", "ν", "ς"]),
    "xc": (list("бвгджзклмнпрстчш"), list("аеиоуыюя"), ["", "", "н", "р", "к"]),
}


@dataclass
class Language:
    code: str
    name: str
    words: dict          # concept key ("person3", "obj0", "live", "yes", ...) -> surface form
    order: str
    alt: str
    adj_after: bool
    loc_after: bool

    def templates(self):
        return {k: self.words[k] for k in TEMPLATE_KEYS}


def _name(rng, taken):
    cons, vowels = NAME_LETTERS[:12], NAME_LETTERS[12:]
    while True:
        n = "".join(rng.choice(cons) + rng.choice(vowels) for _ in range(rng.choice((2, 2, 3))))
        n = (n + rng.choice(("", "n", "r", "s", "l"))).capitalize()
        if n not in taken:
            taken.add(n)
            return n


def _transliterate(name, script):
    table = dict(zip(NAME_LETTERS, SCRIPT_LETTERS[script]))
    out = "".join(table[c] for c in name.lower())
    return out[0].upper() + out[1:]


def _toy_word(rng, code, n_syllables, taken):
    onsets, vowels, codas = SYLLABLES[code]
    while True:
        w = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(n_syllables))
        if w not in taken:
            taken.add(w)
            return w


def make_languages(cfg, rng):
    """Seeded lexicons: shared proper nouns (transliterated), English words, synthetic words for the rest."""
    sizes = dict(obj=cfg.n_objects, adj=cfg.n_adjectives, vo=cfg.n_object_verbs, vp=cfg.n_person_verbs,
                 syn=cfg.n_person_verbs, job=cfg.n_jobs, animal=cfg.n_animals)
    for cat, n in sizes.items():
        if not 1 <= n <= len(EN_WORDS[cat]):
            raise ValueError(f"WorldConfig: {cat} size {n} must be in 1..{len(EN_WORDS[cat])}")
    taken = set()
    persons = [_name(rng, taken) for _ in range(cfg.n_persons)]
    cities = [_name(rng, taken) for _ in range(cfg.n_cities)]
    en_words = set(sum(EN_WORDS.values(), [])) | set(" ".join(EN_FUNCTION.values()).lower().split())
    langs = {}
    for code in cfg.languages:
        spec = TOY_LANGS[code]
        words = {f"person{i}": _transliterate(p, spec["script"]) for i, p in enumerate(persons)}
        words.update({f"city{i}": _transliterate(c, spec["script"]) for i, c in enumerate(cities)})
        if code == "en":
            words.update({f"{cat}{i}": EN_WORDS[cat][i] for cat, n in sizes.items() for i in range(n)})
            words.update(EN_FUNCTION)
        else:
            own = set(en_words)  # a Latin toy word must not be an English word
            words.update({f"{cat}{i}": _toy_word(rng, code, rng.choice((2, 3)), own)
                          for cat, n in sizes.items() for i in range(n)})
            for k in ("in", "live", "work", "keep", "where", "what_job", "which_animal", "yes", "no"):
                words[k] = _toy_word(rng, code, 1 if k == "in" else 2, own)
            for k in ("question", "answer"):
                w = _toy_word(rng, code, 3, own)
                words[k] = w[0].upper() + w[1:]
            words["right"] = _toy_word(rng, code, 2, own) + "?"
            for k in ("who_q", "where_q"):
                words[k] = f"{_toy_word(rng, code, 2, own)} {_toy_word(rng, code, 2, own)}?"
        langs[code] = Language(code, LANGUAGE_NAMES[code], words, spec["order"], spec["alt"],
                               spec["adj_after"], spec["loc_after"])
    return langs


def render(L, m, syn=False, front=False, end="."):
    """Meaning tuple -> sentence in language L. Meanings:
    ("act", verb, person, adj, obj, city)   Kalib sells the red apple in Varo.
    ("meet", verb, person_a, person_b, city)  Kalib helps Moren in Varo. (syn: synonym verb; front: alt order)
    ("fact", rel, person, value)            Kalib lives in Varo. / works as a baker. / keeps a horse.
    ("ask", rel, person)                    Where does Kalib live?"""
    w, kind = L.words, m[0]
    loc = (lambda place: f"{place} {w['in']}") if L.loc_after else (lambda place: f"{w['in']} {place}")
    if kind == "act":
        _, v, p, a, o, c = m
        obj = (f"{w[f'obj{o}']} {w[f'adj{a}']}" if L.adj_after else f"{w[f'adj{a}']} {w[f'obj{o}']}")
        slots = dict(S=w[f"person{p}"], V=w[f"vo{v}"], O="the " + obj if L.code == "en" else obj,
                     L=loc(w[f"city{c}"]))
    elif kind == "meet":
        _, v, p, q, c = m
        slots = dict(S=w[f"person{p}"], V=w[f"{'syn' if syn else 'vp'}{v}"], O=w[f"person{q}"],
                     L=loc(w[f"city{c}"]))
    else:
        rel, p = m[1], m[2]
        if kind == "ask" and L.code == "en":
            return EN_QUESTIONS[rel].format(w[f"person{p}"])
        verb, cat, wh = RELATIONS[rel]
        value = w[wh] if kind == "ask" else w[f"{cat}{m[3]}"]
        slots = dict(S=w[f"person{p}"], V=w[verb])
        if rel == "home":
            slots["L"] = value if kind == "ask" else loc(value)
        else:
            slots["O"] = ({"job": "as a ", "animal": "a "}[rel] + value) if L.code == "en" else value
        end = "?" if kind == "ask" else end
    return " ".join(slots[k] for k in (L.alt if front else L.order) if k in slots) + end


def _deck(n, rng):
    """Endless shuffled passes over range(n): every value is used once before any repeats."""
    while True:
        order = list(range(n))
        rng.shuffle(order)
        yield from order


@dataclass
class World:
    cfg: WorldConfig
    langs: dict                 # code -> Language
    facts: list                 # dicts {rel, person, value, en_only, split}
    pretrain: list              # [(lang, document)] in corpus order
    text: dict                  # split -> lang -> [document]
    align: dict                 # split -> [AlignExample]
    instructions: dict          # lang -> [Bactrian-X record] behind align["train"]
    pairs: dict                 # split -> xx -> [(meaning, en sentence, xx sentence)]
    pawsx: dict                 # split -> lang -> [PawsExample]
    pawsx_meanings: dict        # split -> [(meaning of sentence1, meaning of sentence2)]
    knowledge: dict             # split -> lang -> [{"id","question","choices","label","en_only"}]
    train_meanings: set = field(default_factory=set)  # (lang, meaning) of every training sentence

    def training_texts(self):
        """What the tokenizer is trained on: the pretraining corpus and the alignment training texts."""
        return [d for _, d in self.pretrain] + [t for e in self.align["train"] for t in (e.sent0, e.sent1, e.clm_text)]


def build_world(cfg: WorldConfig) -> World:
    """Generate the whole toy world in memory; deterministic from cfg.seed."""
    if len(cfg.languages) < 2 or cfg.languages[0] != "en" or any(c not in TOY_LANGS for c in cfg.languages):
        raise ValueError(f"WorldConfig.languages must start with 'en' and use codes from {list(TOY_LANGS)}")
    if len(cfg.mix) != len(cfg.languages) or abs(sum(cfg.mix) - 1) > 1e-6:
        raise ValueError("WorldConfig.mix needs one share per language, summing to 1")
    rng = random.Random(cfg.seed)
    langs = make_languages(cfg, rng)
    codes, others = list(cfg.languages), list(cfg.languages[1:])
    sizes = dict(person=cfg.n_persons, city=cfg.n_cities, obj=cfg.n_objects, adj=cfg.n_adjectives,
                 vo=cfg.n_object_verbs, vp=cfg.n_person_verbs, job=cfg.n_jobs, animal=cfg.n_animals)
    value_count = lambda rel: sizes[RELATIONS[rel][1]]

    # knowledge base: every person has a home, a job and an animal, values dealt from decks so all are used.
    # Per relation, the train split first takes one fact per value, so alignment data can state every word.
    facts = []
    for rel in RELATIONS:
        deck = _deck(value_count(rel), rng)
        rows = [dict(rel=rel, person=p, value=next(deck)) for p in range(cfg.n_persons)]
        rng.shuffle(rows)
        cover = list({r["value"]: r for r in rows}.values())
        rest = [r for r in rows if r not in cover]
        n_train = max(len(cover), round(cfg.train_fact_share * len(rows))) - len(cover)
        n_dev = round(cfg.dev_fact_share * (len(rest) - n_train))
        split = dict(train=cover + rest[:n_train], dev=rest[n_train:n_train + n_dev], test=rest[n_train + n_dev:])
        for name, part in split.items():
            rng.shuffle(part)
            facts += [dict(r, split=name, en_only=i < round(cfg.en_only_share * len(part))) for i, r in enumerate(part)]
    fact_m = lambda f: ("fact", f["rel"], f["person"], f["value"])
    ask_m = lambda f: ("ask", f["rel"], f["person"])
    train_facts = [f for f in facts if f["split"] == "train"]

    # evaluation meanings first, so that no training text can use them
    reserved = set()
    swap = lambda m: (m[0], m[1], m[3], m[2], m[4])  # agent and patient of a "meet" trade places

    def event(kind=None, draw=None):
        """A new act/meet meaning outside `reserved`; slots drawn at random or by draw(category)."""
        draw = draw or (lambda k: rng.randrange(sizes[k]))
        while True:
            if (kind or rng.choice(("act", "meet"))) == "act":
                m = ("act", draw("vo"), draw("person"), draw("adj"), draw("obj"), draw("city"))
            else:
                m = ("meet", draw("vp"), draw("person"), draw("person"), draw("city"))
            if m not in reserved and (m[0] == "act" or (m[2] != m[3] and swap(m) not in reserved)):
                return m

    def paws(m, label):  # PAWS-style: a paraphrase changes words or order, a non-paraphrase swaps the roles
        flags = rng.choice([(1, 0), (0, 1), (1, 1)] if label else [(0, 0), (1, 0), (0, 1), (1, 1)])
        return m if label else swap(m), flags

    pairs, pawsx, pawsx_meanings, knowledge = {}, {}, {}, {}
    for split, n_pairs, n_paws in zip(("dev", "test"), cfg.n_eval_pairs, cfg.n_pawsx):
        ms = []
        while len(ms) < n_pairs:
            ms.append(event())
            reserved.add(ms[-1])
        pairs[split] = {x: [(m, render(langs["en"], m), render(langs[x], m)) for m in ms] for x in others}
        items = []
        for i in range(n_paws):
            m, label = event("meet"), int(rng.random() < 0.5)
            reserved.update((m, swap(m)))
            items.append((f"{split}-{i}", m, *paws(m, label), label))
        pawsx_meanings[split] = [(m1, m2) for _, m1, m2, _, _ in items]
        pawsx[split] = {c: [PawsExample(i, render(langs[c], m1, end=""), render(langs[c], m2, *f, end=""), y)
                            for i, m1, m2, f, y in items] for c in codes}
        rows = []  # knowledge questions; the choices are the full statements, which differ in the value only
        for i, f in enumerate(x for x in facts if x["split"] == split):
            wrong = [dict(f, value=v) for v in range(value_count(f["rel"])) if v != f["value"]]
            options = [f] + rng.sample(wrong, min(3, len(wrong)))
            rng.shuffle(options)
            rows.append((f"{split}-{i}", f, options))
        knowledge[split] = {c: [dict(id=i, question=render(langs[c], ask_m(f)),
                                     choices=[render(langs[c], fact_m(o)) for o in opts], label=opts.index(f),
                                     en_only=f["en_only"]) for i, f, opts in rows] for c in codes}

    # pretraining documents, in each language's share; facts marked en_only are stated in English only
    train_meanings = set()
    known = {c: [f for f in facts if c == "en" or not f["en_only"]] for c in codes}

    def story(c, seen):  # 3-10 sentences: events (some with a synonym or the other word order) and facts
        out = []
        for _ in range(rng.randint(3, 10)):
            r = rng.random()
            if r < 0.2:
                m, flags = fact_m(rng.choice(known[c])), ()
            else:
                m, flags = event("act" if r < 0.6 else "meet"), (rng.random() < 0.3, rng.random() < 0.3)
            seen.add((c, m))
            out.append(render(langs[c], m, *flags))
        return " ".join(out)

    def fewshot(c):  # 3-8 examples of one task in the evaluation format, so in-context learning can form
        words, items, qa = langs[c].templates(), [], rng.random() < 0.5
        for _ in range(rng.randint(3, 8)):
            if qa:
                f = rng.choice([f for f in known[c] if f["split"] == "train"])
                train_meanings.add((c, ask_m(f)))
                items.append(knowledge_item(render(langs[c], ask_m(f)), [render(langs[c], fact_m(f))], 0, words))
            else:
                m, label = event("meet"), int(rng.random() < 0.5)
                m2, flags = paws(m, label)
                train_meanings.update(((c, m), (c, m2)))
                items.append(pawsx_item(render(langs[c], m, end=""), render(langs[c], m2, *flags, end=""),
                                        label, words))
        return DEMO_SEP.join(demo_text(it) for it in items)

    docs = []
    for c, share in zip(codes, cfg.mix):
        budget, used = share * cfg.pretrain_tokens, 0
        while used < budget:
            d = fewshot(c) if used >= (1 - cfg.fewshot_share) * budget else story(c, train_meanings)
            docs.append((c, d))
            used += len(d.split())
    rng.shuffle(docs)
    text = {s: {c: [story(c, set()) for _ in range(cfg.n_text_docs)] for c in codes} for s in ("dev", "test")}

    # alignment data: en-xx translation pairs with slots dealt from per-language decks (so every word of
    # every language shows up), zipped with cross-lingual instruction samples made by the Bactrian-X reader's
    # function from parallel toy records
    decks = {x: {k: _deck(n, rng) for k, n in dict(sizes, rel=len(RELATIONS)).items()} for x in others + ["rec"]}
    train_by_value = {}
    for f in train_facts:
        train_by_value.setdefault((f["rel"], f["value"]), []).append(f)

    def deck_fact(d):  # a training fact whose value is the next one in the relation's value deck
        rel = list(RELATIONS)[next(d["rel"])]
        return rng.choice(train_by_value[(rel, next(d[RELATIONS[rel][1]]))])

    def candidate_pair(x, i):  # (xx, meaning, en sentence, xx sentence), kinds in fixed proportions
        draw, kind, flags = (lambda k: next(decks[x][k])), "aaaammmffq"[i % 10], ()
        if kind in "am":
            m = event("act" if kind == "a" else "meet", draw)
            flags = (rng.random() < 0.5, rng.random() < 0.5) if kind == "m" else ()
        else:
            m = fact_m(deck_fact(decks[x])) if kind == "f" else ask_m(rng.choice(train_facts))
        return x, m, render(langs["en"], m, *flags), render(langs[x], m, *flags)

    def candidate_record(i):  # ({lang: Bactrian-X record}, prompt meaning, output meaning or None)
        if rng.random() < 0.5:  # a knowledge question, answered by the fact
            f = deck_fact(decks["rec"])
            return {c: dict(id=f"i{i}", instruction=render(langs[c], ask_m(f)), input="",
                            output=render(langs[c], fact_m(f))) for c in codes}, ask_m(f), fact_m(f)
        m, who = event(None, lambda k: next(decks["rec"][k])), rng.random() < 0.5  # who / where, answered by a name
        answer = f"person{m[2]}" if who else f"city{m[-1]}"
        return {c: dict(id=f"i{i}", instruction=langs[c].words["who_q" if who else "where_q"],
                        input=render(langs[c], m), output=langs[c].words[answer]) for c in codes}, m, None

    n_cand = int(2 * cfg.align_fraction * cfg.pretrain_tokens / 15) + 50  # rows average > 15 words
    cand_pairs = [candidate_pair(others[i % len(others)], i // len(others)) for i in range(n_cand)]
    cand_records = [candidate_record(i) for i in range(n_cand)]
    n_words = lambda e: len(e.sent0.split()) + len(e.sent1.split()) + len(e.clm_text.split())

    def make_rows(pair_list, records, seed):  # -> [(pair, record, AlignExample, src, tgt)]
        by_id = {r[0]["en"]["id"]: r for r in records}
        samples = _cross_lingual({c: [r[0][c] for r in records] for c in codes}, cfg.cross_probability,
                                 random.Random(seed), cfg.align_repeat)
        return [(p, by_id[rid], replace(ex, sent0=p[2], sent1=p[3]), src, tgt)
                for p, (rid, src, tgt, ex) in zip(pair_list, samples)]

    budget = cfg.align_fraction * cfg.pretrain_tokens
    avg = sum(n_words(r[2]) for r in make_rows(cand_pairs[:50], cand_records[:50], cfg.seed)) / 50
    n_rec = max(1, min(n_cand, round(budget / avg / cfg.align_repeat)))
    while True:  # fewer records until within budget, so instructions/*.json hold exactly the records used
        rows = make_rows(cand_pairs, cand_records[:n_rec], cfg.seed)
        if n_rec == 1 or sum(n_words(r[2]) for r in rows) <= budget:
            break
        n_rec -= 1
    for p, (_, prompt_m, output_m), _, src, tgt in rows:
        train_meanings.update((("en", p[1]), (p[0], p[1]), (src, prompt_m)))
        if output_m is not None:
            train_meanings.add((tgt, output_m))
    used = {r[0][1] for r in rows}
    n_dev = max(1, math.ceil(cfg.align_dev_fraction * len(rows)))
    dev_pairs = [p for p in cand_pairs[len(rows):] if p[1] not in used][:n_dev]
    dev_rows = make_rows(dev_pairs, cand_records[n_rec:n_rec + n_dev], cfg.seed + 1)
    align = dict(train=[r[2] for r in rows], dev=[r[2] for r in dev_rows])
    instructions = {c: [r[0][c] for r in cand_records[:n_rec]] for c in codes}
    return World(cfg, langs, facts, docs, text, align, instructions, pairs, pawsx, pawsx_meanings, knowledge,
                 train_meanings)


def _cross_lingual(records_by_lang, cross_probability, rng, repeat):
    """The paper's cross-lingual instruction samples from records parallel by id (first language = pivot).
    Two languages: the source is drawn uniformly, the answer is in the other one with prob. cross_probability.
    More: with prob. 1 - cross_probability one random language for both, else pivot -> X, flipped to
    X -> pivot with prob. 0.5. Contrastive pair: the pivot's instruction and X's (X drawn when both are pivot).
    Returns [(id, source language, answer language, AlignExample)], `repeat` passes over the ids."""
    langs = list(records_by_lang)
    pivot, others = langs[0], langs[1:]
    index = {c: {r["id"]: r for r in recs} for c, recs in records_by_lang.items()}
    ids = [r["id"] for r in records_by_lang[pivot] if all(r["id"] in index[c] for c in others)]
    out = []
    for _ in range(repeat):
        for i in ids:
            if len(langs) == 2:
                src = rng.choice(langs)
                tgt = (others[0] if src == pivot else pivot) if rng.random() < cross_probability else src
            elif rng.random() < 1 - cross_probability:
                src = tgt = rng.choice(langs)
            else:
                x = rng.choice(others)
                src, tgt = (x, pivot) if rng.random() < 0.5 else (pivot, x)
            x = src if src != pivot else tgt if tgt != pivot else rng.choice(others)
            r = index[src][i]
            prompt = " ".join(t for t in (r["instruction"].strip(), r["input"].strip()) if t)
            prompt += f" Answer in {LANGUAGE_NAMES.get(tgt, tgt)}:"
            text = f"{prompt} {index[tgt][i]['output'].strip()}"
            out.append((i, src, tgt, AlignExample(index[pivot][i]["instruction"], index[x][i]["instruction"],
                                                  text, len(prompt))))
    return out


def write_world(world: World, out_dir) -> None:
    """Write the world in the formats the readers below accept (file list in the module docstring)."""
    out = Path(out_dir)
    for sub in ("text", "pairs", "instructions", "tasks/pawsx", "tasks/knowledge"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    def put(name, lines):
        (out / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    dumps = lambda obj: json.dumps(obj, ensure_ascii=False)
    put("pretrain.txt", "\n\n".join(d for _, d in world.pretrain).split("\n"))
    for split in ("dev", "test"):
        for c, docs in world.text[split].items():
            put(f"text/{c}.{split}.txt", "\n\n".join(docs).split("\n"))
        for x, rows in world.pairs[split].items():
            put(f"pairs/en-{x}.{split}.tsv", [f"{en}\t{xx}" for _, en, xx in rows])
        for c, items in world.pawsx[split].items():
            put(f"tasks/pawsx/{c}.{split}.tsv", ["\t".join(PAWSX_HEADER)] +
                [f"{e.id}\t{e.sentence1}\t{e.sentence2}\t{e.label}" for e in items])
        for c, items in world.knowledge[split].items():
            put(f"tasks/knowledge/{c}.{split}.jsonl", [dumps(r) for r in items])
    for split, rows in world.align.items():
        put(f"align.{split}.jsonl", [dumps(asdict(e)) for e in rows])
    for c, recs in world.instructions.items():  # one record per line, so errors can name a line
        put(f"instructions/{c}.json", ["["] + [dumps(r) + ("," if k < len(recs) - 1 else "")
                                              for k, r in enumerate(recs)] + ["]"])
    templates = dumps({c: L.templates() for c, L in world.langs.items()})
    put("tasks/pawsx/templates.json", [templates])
    put("tasks/knowledge/templates.json", [templates])
    info = dict(config=asdict(world.cfg), languages={c: dict(name=L.name, order=L.order, alt_order=L.alt,
                script=TOY_LANGS[c]["script"]) for c, L in world.langs.items()},
                lexicon={c: L.words for c, L in world.langs.items()}, facts=world.facts)
    put("world.json", [json.dumps(info, ensure_ascii=False, indent=1)])

# -----------------------------------------------------------------------------
# tokenizer


class TextTokenizer:
    """A `tokenizers.Tokenizer` and the special ids of the model it belongs to, which every sequence built here
    follows: bos starts each sequence (None: the family starts with the first text token), eos ends a document,
    a pair sentence (last-token pooling reads it) and a response; pad fills what the mask hides.
    encode/encode_batch add no specials: the callers place them."""

    def __init__(self, tokenizer, bos, eos, pad):
        self.tokenizer, self.bos, self.eos, self.pad = tokenizer, bos, eos, pad
        self.start = [] if bos is None else [bos]               # what each sequence starts with

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_batch(self, texts):
        """Encodings (ids and character offsets), tokenizers' parallel batch encoder."""
        return self.tokenizer.encode_batch(list(texts), add_special_tokens=False)

    def decode(self, ids, skip_special_tokens=False):
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def get_vocab_size(self):
        return self.tokenizer.get_vocab_size()

    def id_to_token(self, i):
        return self.tokenizer.id_to_token(i)

    def save(self, path):
        self.tokenizer.save(str(path))

    def specials(self):
        return dict(bos=self.bos, eos=self.eos, pad=self.pad)


def train_tokenizer(texts, vocab_size=2048) -> TextTokenizer:
    """Byte-level BPE (exact round trip in any script); "<pad>"=0, "<s>"=1, "</s>"=2."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # specials inside the text (the demo separator) would otherwise be learned as merges of "<", "/", "s", ">"
    clean = (t.replace(DEMO_SEP, " ") for t in texts)
    tok.train_from_iterator(clean, trainer)
    return TextTokenizer(tok, BOS, EOS, PAD)


def load_tokenizer(path) -> TextTokenizer:
    """A tokenizer.json file of ours (specials at ids 0, 1, 2), or a checkpoint directory's tokenizer.json with
    that checkpoint's special ids: a checkpoint of train.py records them in config.json ("specials"); a Hugging
    Face checkpoint follows its family (hf_specials)."""
    path = Path(path)
    meta = {}
    if path.is_dir():
        if (path / "config.json").is_file():
            meta = json.loads((path / "config.json").read_text())
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such tokenizer file")
    tok = Tokenizer.from_file(str(path))
    if "model_type" in meta:
        return TextTokenizer(tok, **hf_specials(tok, meta, path.parent))
    if meta.get("specials"):
        return TextTokenizer(tok, **meta["specials"])
    if [tok.token_to_id(s) for s in SPECIALS] != [PAD, BOS, EOS]:
        raise ValueError(f"{path}: expected special tokens {SPECIALS} at ids 0, 1, 2")
    return TextTokenizer(tok, BOS, EOS, PAD)


def hf_specials(tok, config, ckpt_dir):
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


def encode(tokenizer, texts):
    """Token ids of each text, no specials (tokenizers' parallel batch encoder)."""
    return [e.ids for e in tokenizer.encode_batch(texts)]

# -----------------------------------------------------------------------------
# readers: every malformed line raises ValueError("FILE:LINE: reason"); skip_bad=True skips and warns the count


def _field(obj, key, allow_empty=False):
    if key not in obj:
        raise ValueError(f"missing field {key!r}")
    v = obj[key]
    if not isinstance(v, str):
        raise ValueError(f"field {key!r} must be a string, not {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise ValueError(f"field {key!r} is empty")
    return v


def _int(obj, key):
    if key not in obj:
        raise ValueError(f"missing field {key!r}")
    v = obj[key]
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"field {key!r} must be an integer, not {type(v).__name__}")
    return v


def _id(obj):
    if not isinstance(obj.get("id"), (str, int)) or isinstance(obj.get("id"), bool) or obj["id"] == "":
        raise ValueError("field 'id' missing or not a non-empty string/integer")
    return str(obj["id"])


def _json_object(line):
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _columns(line, n):
    cols = line.split("\t")
    if len(cols) != n:
        raise ValueError(f"expected {n} tab-separated columns, got {len(cols)}")
    for k, c in enumerate(cols, 1):
        if not c.strip():
            raise ValueError(f"column {k} is empty")
    return cols


def _no_bom(path):
    """A UTF-8 byte-order mark would become part of the first field: refuse it, naming the file."""
    with open(path, "rb") as f:
        if f.read(3) == b"\xef\xbb\xbf":
            raise ValueError(f"{path}:1: starts with a UTF-8 byte-order mark; save it as UTF-8 without one")


def _read_lines(path, parse, skip_bad=False, first=1):
    """Apply parse(line) to each line from number `first` on; blank lines are errors too."""
    _no_bom(path)
    lines = Path(path).read_bytes().split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    out, bad = [], []
    for n, raw in enumerate(lines[first - 1:], first):
        try:
            try:
                line = raw.decode("utf-8").removesuffix("\r")
            except UnicodeDecodeError as e:
                raise ValueError(f"invalid UTF-8 (byte {e.start}: {e.reason})") from None
            if not line.strip():
                raise ValueError("empty line")
            out.append(parse(line))
        except ValueError as e:
            if not skip_bad:
                raise ValueError(f"{path}:{n}: {e}") from None
            bad.append(f"line {n}: {e}")
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} bad lines (first: {bad[0]})")
    return out


def read_text(path) -> list:
    """Plain-text documents separated by blank lines (lines of a document are joined with newlines)."""
    _no_bom(path)
    docs, cur = [], []
    for n, raw in enumerate(Path(path).read_bytes().split(b"\n"), 1):
        try:
            line = raw.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{n}: invalid UTF-8 (byte {e.start}: {e.reason})") from None
        if line.strip():
            cur.append(line)
        elif cur:
            docs.append("\n".join(cur))
            cur = []
    return docs + (["\n".join(cur)] if cur else [])


def read_parallel_tsv(path, skip_bad=False) -> list:
    """Translation pairs, one "src TAB tgt" per line, no header."""
    return _read_lines(path, lambda line: tuple(_columns(line, 2)), skip_bad)


def _afp_row(line):
    obj = _json_object(line)
    text = _field(obj, "clm_text")
    k = _int(obj, "clm_prompt_len")
    if not 0 <= k <= len(text):
        raise ValueError(f"clm_prompt_len {k} is past the end of clm_text ({len(text)} characters)")
    if not text[k:].strip():
        raise ValueError(f"the response (clm_text after clm_prompt_len {k}) is empty: nothing to learn")
    return AlignExample(_field(obj, "sent0"), _field(obj, "sent1"), text, k)


def read_afp_jsonl(path, skip_bad=False) -> list:
    """The authors' training rows {"sent0","sent1","clm_text","clm_prompt_len"}, read as they are."""
    return _read_lines(path, _afp_row, skip_bad)


def read_pawsx_tsv(path, skip_bad=False) -> list:
    """PAWS-X TSV with the header id, sentence1, sentence2, label (1 = paraphrase)."""
    _no_bom(path)
    head = Path(path).read_bytes().split(b"\n", 1)[0].decode("utf-8", "replace").removesuffix("\r")
    if head.split("\t") != PAWSX_HEADER:
        raise ValueError(f"{path}:1: expected the header {' '.join(PAWSX_HEADER)} (tab-separated)")

    def parse(line):
        i, s1, s2, y = _columns(line, 4)
        if y not in ("0", "1"):
            raise ValueError(f"label must be 0 or 1, got {y!r}")
        return PawsExample(i, s1, s2, int(y))
    return _read_lines(path, parse, skip_bad, first=2)


def _knowledge_row(line):
    obj = _json_object(line)
    choices = obj.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise ValueError("field 'choices' must be a list of at least 2 non-empty strings")
    label = _int(obj, "label")
    if not 0 <= label < len(choices):
        raise ValueError(f"label {label} is out of range for {len(choices)} choices")
    return dict(obj, id=_id(obj), question=_field(obj, "question"))


def read_knowledge_jsonl(path, skip_bad=False) -> list:
    """Knowledge questions {"id","question","choices","label"} (other fields are kept)."""
    return _read_lines(path, _knowledge_row, skip_bad)


def _read_bactrian_file(path) -> list:
    """A JSON list of {id, instruction, input, output}; errors name the line where the record starts."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: invalid UTF-8 ({e.reason})") from None
    dec, space, pos, line = json.JSONDecoder(), re.compile(r"\s*"), 0, 1

    def line_of(j):  # counting on from the previous offset keeps this linear in the file size
        nonlocal pos, line
        line, pos = line + text.count("\n", pos, j), j
        return line
    i = space.match(text).end()
    if not text.startswith("[", i):
        raise ValueError(f"{path}:{line_of(i)}: expected a JSON list of records")
    i, records, seen = space.match(text, i + 1).end(), [], {}
    while not text.startswith("]", i):
        try:
            obj, j = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        n = line_of(i)
        try:
            if not isinstance(obj, dict):
                raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
            rec = dict(id=_id(obj), instruction=_field(obj, "instruction"),
                       input=_field(obj, "input", allow_empty=True), output=_field(obj, "output"))
            if rec["id"] in seen:
                raise ValueError(f"duplicate id {rec['id']!r} (first on line {seen[rec['id']]})")
        except ValueError as e:
            raise ValueError(f"{path}:{n}: {e}") from None
        seen[rec["id"]] = n
        records.append(rec)
        i = space.match(text, j).end()
        if text.startswith(",", i):
            i = space.match(text, i + 1).end()
        elif not text.startswith("]", i):
            raise ValueError(f"{path}:{line_of(i)}: expected ',' or ']' after a record")
    return records


def read_bactrian(paths_by_lang: dict, cross_probability=0.5, seed=0, repeat=3) -> list:
    """Per-language Bactrian-X JSON files -> cross-lingual instruction samples (see _cross_lingual). The first
    language is the pivot; a key missing from LANGUAGE_NAMES is used as the language name itself. Ids absent
    from some language are left out, with a warning giving the count."""
    records = {c: _read_bactrian_file(p) for c, p in paths_by_lang.items()}
    common = set.intersection(*({r["id"] for r in recs} for recs in records.values()))
    missing = len(set().union(*({r["id"] for r in recs} for recs in records.values())) - common)
    if missing:
        warnings.warn(f"read_bactrian: {missing} ids are not in every language and were left out")
    return [ex for *_, ex in _cross_lingual(records, cross_probability, random.Random(seed), repeat)]


def _template_words(task_dir, lang, keys):
    table, path = dict(TEMPLATE_WORDS), Path(task_dir) / "templates.json"
    if path.exists():
        try:
            table.update(json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None
    words = table.get(lang)
    if not isinstance(words, dict) or any(not isinstance(words.get(k), str) for k in keys):
        raise ValueError(f"{path}: no template words {list(keys)} for language {lang!r}")
    return words


def load_mc_task(task_dir, lang, split, template_lang=None) -> list:
    """{task_dir}/{lang}.{split}.tsv (PAWS-X) or .jsonl (knowledge) as MCItems; template words from
    templates.json in task_dir or TEMPLATE_WORDS, in template_lang (default lang: the cross-lingual setting
    passes "en" for an English template around target-language content)."""
    tsv, jsonl = Path(task_dir) / f"{lang}.{split}.tsv", Path(task_dir) / f"{lang}.{split}.jsonl"
    if tsv.exists():
        words = _template_words(task_dir, template_lang or lang, ("right", "yes", "no"))
        return [pawsx_item(e.sentence1, e.sentence2, e.label, words, e.id) for e in read_pawsx_tsv(tsv)]
    if jsonl.exists():
        words = _template_words(task_dir, template_lang or lang, ("question", "answer"))
        return [knowledge_item(r["question"], r["choices"], r["label"], words, r["id"])
                for r in read_knowledge_jsonl(jsonl)]
    raise FileNotFoundError(f"no task file {tsv.name} or {jsonl.name} in {task_dir}")


def task_languages(task_dir) -> list:
    """Languages with a {lang}.{split}.{tsv|jsonl} file in task_dir, English first, then sorted."""
    langs = {p.name.split(".")[0] for p in Path(task_dir).iterdir()
             if re.fullmatch(r"[^.]+\.[^.]+\.(tsv|jsonl)", p.name)}
    return sorted(langs, key=lambda c: (c != "en", c))

# -----------------------------------------------------------------------------
# batching: batch(step) is a pure function of (seed, step, rank), so a resumed run sees the same data


def _text_groups(examples):
    """Group id per example: examples sharing any sentence (sent0 or sent1) get the same id, the smallest
    index in their group, so the contrastive loss does not use them as each other's negatives."""
    parent, first = list(range(len(examples))), {}

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for i, e in enumerate(examples):
        for t in (e.sent0, e.sent1):
            a, b = find(i), find(first.setdefault(t, i))
            parent[max(a, b)] = min(a, b)
    return [find(i) for i in range(len(examples))]


def _pad(rows, fill):
    width = max(len(r) for r in rows)
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.long)


def _lengths_mask(rows):
    width = max(len(r) for r in rows)
    return (torch.arange(width)[None, :] < torch.tensor([len(r) for r in rows])[:, None]).long()


def sentence_row(ids, max_len, tokenizer):
    """A sentence as the contrastive term and eval.py's representation analysis see it: [BOS] ids [EOS].
    "last" pooling then reads the EOS state. The sentence's own last token (often ".") is followed by the
    next sentence in pretraining text, so aligning its state across languages erases the language the LM needs
    there (in the toy world the loss after "." rose far above uniform); EOS is only followed by a new document."""
    start = tokenizer.start
    return start + ids[:max_len - 1 - len(start)] + [tokenizer.eos]


def _collate_tokens(x, y, prompts, responses, groups, max_len, tokenizer):
    pair_rows = [sentence_row(t, max_len, tokenizer) for t in x + y]  # x rows then y rows
    instr_rows, label_rows, start = [], [], tokenizer.start
    for p, r in zip(prompts, responses):
        r = (r + [tokenizer.eos])[:max_len - 1]  # only a response longer than max_len loses its end (and EOS)
        p = p[max(0, len(p) - (max_len - len(start) - len(r))):]  # over-long prompts lose their start, BOS stays
        instr_rows.append(start + p + r)
        label_rows.append([-100] * (len(start) + len(p)) + r)
    return dict(pair_ids=_pad(pair_rows, tokenizer.pad), pair_mask=_lengths_mask(pair_rows),
                pair_groups=torch.tensor(groups, dtype=torch.long),
                instr_ids=_pad(instr_rows, tokenizer.pad), instr_mask=_lengths_mask(instr_rows),
                instr_labels=_pad(label_rows, -100))


def _tokenize_align(examples, tokenizer):
    texts = [e.sent0 for e in examples] + [e.sent1 for e in examples]
    texts += [e.clm_text[:e.clm_prompt_len] for e in examples] + [e.clm_text[e.clm_prompt_len:] for e in examples]
    ids, n = encode(tokenizer, texts), len(examples)
    return ids[:n], ids[n:2 * n], ids[2 * n:3 * n], ids[3 * n:]


def collate_align(examples, tokenizer, max_len, groups=None) -> dict:
    """AlignExamples -> the batch of INTERFACES.md: pair_ids (2B,Lp) [x rows, then y rows], pair_mask,
    pair_groups (B,), instr_ids (B,Li), instr_mask, instr_labels (token ids on response + EOS, else -100).
    Pairs and instructions are padded separately (right padding with the tokenizer's pad id)."""
    x, y, p, r = _tokenize_align(examples, tokenizer)
    return _collate_tokens(x, y, p, r, _text_groups(examples) if groups is None else groups, max_len, tokenizer)


def _step_indices(n, batch_size, seed, step, rank, world_size, perms):
    """Dataset indices for (step, rank): position step*batch_size + rank's slice in an endless stream of
    epoch-wise permutations, permutation e drawn from (seed, e)."""
    if batch_size % world_size or not 0 <= rank < world_size:
        raise ValueError(f"batch_size {batch_size} must split evenly over world_size {world_size} (rank {rank})")
    per = batch_size // world_size
    pos = np.arange(step * batch_size + rank * per, step * batch_size + (rank + 1) * per)
    epochs = pos // n
    out = np.empty(per, dtype=np.int64)
    for epoch in np.unique(epochs):                 # one or a few epochs per batch, never one per row
        if epoch not in perms:
            if len(perms) > 2:
                perms.pop(next(iter(perms)))
            perms[epoch] = np.random.default_rng([seed, int(epoch)]).permutation(n)
        sel = epochs == epoch
        out[sel] = perms[epoch][pos[sel] % n]
    return out.tolist()


class AlignData:
    """Alignment batches by step. batch_size is the global batch: rank r of world_size gets its slice of
    batch_size // world_size examples. Group ids are computed over the whole dataset, so they agree across
    ranks when the contrastive term gathers them.
    pair_batch_size (0 = batch_size): contrastive pairs per step, drawn from a stream of their own when it
    differs from batch_size. In-batch negatives are cheap (the pair rows run through `layer` blocks only), and
    more of them make the contrastive task harder than telling 16 sentences apart by one word."""

    def __init__(self, examples, tokenizer, batch_size, max_len, seed, rank=0, world_size=1, pair_batch_size=0):
        if not examples:
            raise ValueError("AlignData: no examples")
        self.examples, self.batch_size, self.max_len = examples, batch_size, max_len
        self.pair_batch_size = pair_batch_size or batch_size
        self.seed, self.rank, self.world_size, self._perms, self._pair_perms = seed, rank, world_size, {}, {}
        self.indices(0), self.pair_indices(0)  # check the sizes, rank and world_size before the work below
        self.tokenizer = tokenizer
        self.tokens = list(zip(*_tokenize_align(examples, tokenizer)))
        self.groups = _text_groups(examples)

    def indices(self, step):
        return _step_indices(len(self.examples), self.batch_size, self.seed, step, self.rank, self.world_size,
                             self._perms)

    def pair_indices(self, step):
        if self.pair_batch_size == self.batch_size:
            return self.indices(step)                       # the authors' rows: each row's pair and instruction
        return _step_indices(len(self.examples), self.pair_batch_size, self.seed + 1, step, self.rank,
                             self.world_size, self._pair_perms)

    def batch(self, step) -> dict:
        idx, pair_idx = self.indices(step), self.pair_indices(step)
        x, y = [self.tokens[i][0] for i in pair_idx], [self.tokens[i][1] for i in pair_idx]
        p, r = [self.tokens[i][2] for i in idx], [self.tokens[i][3] for i in idx]
        return _collate_tokens(x, y, p, r, [self.groups[i] for i in pair_idx], self.max_len, self.tokenizer)


class PretrainData:
    """Causal-LM blocks: documents as [BOS] doc [EOS], concatenated, cut into block_size rows; the tail is a
    final right-padded block. Takes a list of documents or a ready 1-D token array. batch_size is global."""

    def __init__(self, docs_or_token_array, tokenizer, block_size, batch_size, seed, rank=0, world_size=1):
        if isinstance(docs_or_token_array, (list, tuple)):
            stream = np.concatenate([np.array([*tokenizer.start, *d, tokenizer.eos])
                                     for d in encode(tokenizer, docs_or_token_array)])
        else:
            stream = np.asarray(docs_or_token_array, dtype=np.int64).reshape(-1)
        if len(stream) < 2:
            raise ValueError("PretrainData: no tokens")
        n_full, tail = divmod(len(stream), block_size)
        blocks = stream[:n_full * block_size].reshape(n_full, block_size)
        lengths = [block_size] * n_full
        if tail >= 2:  # a lone last token has nothing to predict
            blocks = np.concatenate([blocks, np.pad(stream[-tail:], (0, block_size - tail))[None]])
            lengths.append(tail)
        self.n_tokens = len(stream)
        self.blocks, self.lengths = torch.from_numpy(blocks), torch.tensor(lengths)
        self.batch_size, self.seed, self.rank, self.world_size, self._perms = batch_size, seed, rank, world_size, {}
        self.indices(0)

    def indices(self, step):
        return _step_indices(len(self.blocks), self.batch_size, self.seed, step, self.rank, self.world_size,
                             self._perms)

    def batch(self, step) -> dict:
        idx = torch.tensor(self.indices(step))
        ids = self.blocks[idx]
        mask = (torch.arange(ids.shape[1])[None, :] < self.lengths[idx][:, None]).long()
        return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))

# -----------------------------------------------------------------------------
# command line


def check_file(path) -> str:
    """Validate a data file of any supported format; return a one-line summary or raise ValueError."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: no such file")
    import tasks  # late: tasks.py imports this file
    summary = tasks.check(p)                                   # the paper's evaluation tasks
    if summary:
        return summary
    if p.suffix == ".txt":
        first = p.read_bytes().lstrip().split(b"\n", 1)[0]
        try:                                     # judged by content: JSON named .txt would train as prose
            is_json = isinstance(json.loads(first), (dict, list))
        except ValueError:
            is_json = False
        if is_json:
            raise ValueError(f"{p}:1: this is JSON, not plain text (name it .json or .jsonl for its own checks)")
        docs = read_text(p)
        return f"{p}: plain text, {len(docs)} documents, {sum(len(d.split()) for d in docs)} words"
    if p.suffix == ".tsv":
        if p.read_bytes().split(b"\n", 1)[0].rstrip(b"\r") == "\t".join(PAWSX_HEADER).encode():
            rows = read_pawsx_tsv(p)
            return f"{p}: PAWS-X TSV, {len(rows)} pairs, {sum(e.label for e in rows)} paraphrases"
        return f"{p}: parallel TSV, {len(read_parallel_tsv(p))} pairs"
    if p.suffix == ".jsonl":
        first = next((line for line in p.read_bytes().split(b"\n") if line.strip()), b"{}")
        try:
            keys = json.loads(first)
        except ValueError:
            keys = {}  # the reader below reports the line
        if isinstance(keys, dict) and "question" in keys:
            return f"{p}: knowledge questions JSONL, {len(read_knowledge_jsonl(p))} items"
        rows = read_afp_jsonl(p)
        return f"{p}: AFP alignment JSONL, {len(rows)} rows"
    if p.suffix == ".json":
        head = p.read_bytes().lstrip()[:1]
        if head == b"[":
            return f"{p}: Bactrian-X instruction JSON, {len(_read_bactrian_file(p))} records"
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{p}:{getattr(e, 'lineno', 1)}: invalid JSON") from None
        if isinstance(obj, dict) and "model" in obj:
            try:
                return f"{p}: tokenizer, vocabulary {load_tokenizer(p).get_vocab_size()}"
            except Exception as e:  # the tokenizers library raises its own exception types
                raise ValueError(f"{p}: not a usable tokenizer ({e})") from None
        if isinstance(obj, dict) and isinstance(obj.get("config"), dict) and "lexicon" in obj:
            return f"{p}: toy world description, languages {', '.join(obj['config'].get('languages', []))}"
        if isinstance(obj, dict) and all(isinstance(w, dict) and all(isinstance(v, str) for v in w.values())
                                         for w in obj.values()):
            return f"{p}: template words for {len(obj)} languages"
        raise ValueError(f"{p}:1: not a Bactrian-X, tokenizer, templates or world.json file")
    raise ValueError(f"{p}: unknown file type {p.suffix!r} (expected .txt .tsv .jsonl .json)")


def main(argv=None):
    ap = argparse.ArgumentParser(description="The toy multilingual world and data-file checks.")
    sub = ap.add_subparsers(dest="command", required=True)
    toy = sub.add_parser("toy", help="write the toy world (and its tokenizer) to a directory")
    toy.add_argument("--out", required=True)
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument("--pretrain-tokens", type=int, default=WorldConfig.pretrain_tokens,
                     help="pretraining corpus size in whitespace words")
    toy.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary; 0 skips the tokenizer")
    check = sub.add_parser("check", help="validate a data file; exit status 2 on the first bad line")
    check.add_argument("file")
    args = ap.parse_args(argv)
    if args.command == "check":
        try:
            print("ok:", check_file(args.file))
            return 0
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    t0 = time.time()
    world = build_world(WorldConfig(seed=args.seed, pretrain_tokens=args.pretrain_tokens))
    write_world(world, args.out)
    t1 = time.time()
    print(f"world: {len(world.pretrain)} pretraining docs, {len(world.align['train'])} alignment rows, "
          f"written to {args.out} in {t1 - t0:.1f}s")
    if args.vocab_size:
        tok = train_tokenizer(world.training_texts(), args.vocab_size)
        tok.save(str(Path(args.out) / "tokenizer.json"))
        t2 = time.time()
        print(f"tokenizer: {tok.get_vocab_size()} tokens, trained in {t2 - t1:.1f}s")
        per_lang = {c: sum(map(len, encode(tok, [d for l, d in world.pretrain if l == c])))
                    for c in world.cfg.languages}
        total = sum(per_lang.values())
        align = sum(map(len, encode(tok, [t for e in world.align["train"] for t in (e.sent0, e.sent1, e.clm_text)])))
        print("pretraining tokens: " + ", ".join(f"{c} {n} ({n / total:.1%})" for c, n in per_lang.items()) +
              f"; total {total}")
        print(f"alignment tokens: {align} ({align / total:.2%} of pretraining)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
