"""
toyworld.py: the embedded multilingual world that `python train.py` runs on, with no download.

A small meaning space (people, cities, things, adjectives, verbs, and a knowledge base of facts about notables)
rendered into English plus synthetic languages with their own seeded words and word orders:
  en  English      S V O L   ("Kalib sells the broken lamp in Varo.")
  xa  Valian       S O L V   Latin script, shares the proper nouns with English (like de/es/fr)
  xb  Kirosh       V S O L   Greek script: shares no subword with English but the notables' names
  xc  Temish       L S O V   Cyrillic script
Every sentence is rendered from a meaning tuple, so translation pairs are exact and evaluation meanings can be
kept out of all training data. The two few-shot tasks start where the paper starts: the pretraining corpus holds
few-shot documents of both, mostly in English (fewshot_share against fewshot_share_other), and the facts that the
knowledge questions ask about are stated in English only, so a base model answers well in English and worse in
the other languages. `python toyworld.py --out DIR [--seed S]` writes (all UTF-8, "\n" endings):
  pretrain.txt                   pretraining corpus: documents separated by one blank line (toy docs are one
                                 line each); few-shot documents join their examples with DEMO_SEP ("</s>")
  text/{lang}.{dev,test}.txt     held-out documents per language (perplexity), same format
  align.{train,dev}.jsonl        alignment rows in the authors' JSONL {"sent0","sent1","clm_text",
                                 "clm_prompt_len"}: sent0/sent1 an en-xx translation pair (the contrastive term),
                                 clm_text a cross-lingual instruction sample (the instruction term) whose first
                                 clm_prompt_len characters are the prompt
  instructions/{lang}.json       the Bactrian-X-layout records behind align.train's instruction samples
  pairs/en-{xx}.{dev,test}.tsv   held-out translation pairs "en TAB xx", one meaning per line
  tasks/knowledge/{lang}.{split}.jsonl  {"id","question","choices","label","en_only"}; choices are statements
                                 ("Dutol lives in Varo."), so scoring them reads the facts learned from the text;
                                 en_only: the fact is stated in English only (all of them by default)
  tasks/sentiment/{lang}.{split}.tsv    TSV (header id, sentence, label; 1 = good): "Kalib sells the broken lamp
                                 in Varo. Is it good? No": the adjective decides, and its label words differ
                                 per language
  tasks/*/templates.json         template words per language {"right","yes","no","question","answer","good"}
  world.json                     config, language names, lexicon, and the facts with their split and en_only flag
  tokenizer.json                 byte-level BPE trained on pretrain.txt + align.train.jsonl texts
`python data.py check FILE` validates each of these files.
"""
import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import data
import tasks
from data import DEMO_SEP, LANGUAGE_NAMES


@dataclass
class WorldConfig:
    """Every knob of the toy world. Sizes are counted in whitespace-separated words: with the default
    2048-token BPE one word is about 1.27 tokens."""
    seed: int = 0
    languages: tuple = ("en", "xa", "xb", "xc")  # codes from TOY_LANGS; the first is the pivot (English)
    mix: tuple = (0.85, 0.05, 0.05, 0.05)       # share of pretraining words per language
    pretrain_words: int = 1_500_000             # pretraining corpus size in whitespace-separated words
    fewshot_share: float = 0.5                  # share of English's words in few-shot-formatted documents
    fewshot_share_other: float = 0.1            # the same for the other languages: task-formatted text is mostly
                                                # English, as in a real pretraining mix
    fact_share: float = 0.4                     # share of story sentences that state a fact
    en_only_share: float = 1.0                  # share of the dev and test facts stated in English only (the
                                                # knowledge task's cross-lingual transfer); train facts: everywhere
    align_fraction: float = 0.009               # alignment words (sent0 + sent1 + clm_text) / pretraining words
    align_dev_fraction: float = 0.1             # alignment dev rows, as a fraction of the train rows
    align_repeat: int = 1                       # the paper repeats instruction data 3x; here budget buys new ids
    cross_probability: float = 0.5              # chance that an instruction's answer language differs
    n_notables: int = 240                       # the knowledge base's subjects (3 facts each): names that every
                                                # language writes in Latin letters, like the names of brands
    n_persons: int = 24                         # lexicon sizes (persons and cities are proper nouns): every word
    n_cities: int = 12                          # must recur in the 1% alignment data, so a larger lexicon
    n_objects: int = 12                         # aligns worse (RESULTS.md)
    n_adjectives: int = 12                      # half good, half bad: the sentiment task's labels
    n_object_verbs: int = 6                     # "likes", "sells", ...: person -> thing
    n_person_verbs: int = 6                     # "helps", "meets", ...: person -> person, each with a synonym
    n_jobs: int = 8
    n_animals: int = 8
    n_knowledge: tuple = (150, 500)             # knowledge questions (dev, test) per language: facts whose question
                                                # form never appears in training; the other facts are train facts
    n_sentiment: tuple = (200, 500)             # sentiment items (dev, test) per language (parallel)
    n_eval_pairs: tuple = (200, 500)            # held-out translation meanings (dev, test) per en-xx file
    n_text_docs: int = 100                      # held-out documents per language and split


# -----------------------------------------------------------------------------
# 1. languages: a lexicon and a word order each

TOY_LANGS = {  # order: constituents S V O L; alt: the other order used for paraphrases
    "en": dict(script="latin", order="SVOL", alt="LSVO", adj_after=False, loc_after=False),
    "xa": dict(script="latin", order="SOLV", alt="LSOV", adj_after=True, loc_after=True),
    "xb": dict(script="greek", order="VSOL", alt="LVSO", adj_after=True, loc_after=False),
    "xc": dict(script="cyrillic", order="LSOV", alt="SOVL", adj_after=False, loc_after=True),
}
EN_WORDS = dict(
    obj="apple book lamp chair basket coat drum kettle ladder mirror pencil rope shovel table violin wagon "
        "bottle hammer blanket candle".split(),
    adj="new old clean dirty shiny broken fresh rotten lovely ugly sturdy rusty".split(),  # even index: good
    vo="likes sells buys paints finds carries washes hides".split(),
    vp="helps meets calls teaches pays follows warns hires".split(),
    syn="assists encounters phones instructs compensates trails alerts employs".split(),
    job="baker farmer doctor teacher singer painter sailor tailor miller potter".split(),
    animal="horse cat dog goat parrot rabbit sheep duck pig mule".split(),
)
EN_FUNCTION = {"in": "in", "live": "lives", "work": "works", "keep": "keeps", "where": "where",
               "what_job": "what", "which_animal": "which", "who_q": "Who does it?",
               "where_q": "Where does it happen?", "good": "Is it good?",
               **tasks.TEMPLATE_WORDS["en"]}
EN_QUESTIONS = {"home": "Where does {} live?", "job": "What does {} work as?",
                "animal": "Which animal does {} keep?"}
RELATIONS = {"home": ("live", "city", "where"), "job": ("work", "job", "what_job"),
             "animal": ("keep", "animal", "which_animal")}  # relation: verb, value category, wh-word
TEMPLATE_KEYS = ("right", "yes", "no", "question", "answer", "good")
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


def lexicon_sizes(cfg):
    """Concept category -> how many concepts of it the world has."""
    return dict(person=cfg.n_persons, city=cfg.n_cities, obj=cfg.n_objects, adj=cfg.n_adjectives,
                vo=cfg.n_object_verbs, vp=cfg.n_person_verbs, job=cfg.n_jobs, animal=cfg.n_animals)


def _own_words(rng, code, sizes, taken):
    """A synthetic language's words for every concept and function word."""
    words = {f"{cat}{i}": _toy_word(rng, code, rng.choice((2, 3)), taken) for cat, n in sizes.items() for i in range(n)}
    for k in ("in", "live", "work", "keep", "where", "what_job", "which_animal", "yes", "no"):
        words[k] = _toy_word(rng, code, 1 if k == "in" else 2, taken)
    for k in ("question", "answer"):
        w = _toy_word(rng, code, 3, taken)
        words[k] = w[0].upper() + w[1:]
    words["right"] = _toy_word(rng, code, 2, taken) + "?"
    for k in ("who_q", "where_q", "good"):
        words[k] = f"{_toy_word(rng, code, 2, taken)} {_toy_word(rng, code, 2, taken)}?"
    return words


def make_languages(cfg, rng):
    """Seeded lexicons: shared proper nouns (transliterated), English words, synthetic words for the rest."""
    sizes = dict(obj=cfg.n_objects, adj=cfg.n_adjectives, vo=cfg.n_object_verbs, vp=cfg.n_person_verbs,
                 syn=cfg.n_person_verbs, job=cfg.n_jobs, animal=cfg.n_animals)  # the common nouns, verbs, ...
    for cat, n in sizes.items():
        if not 1 <= n <= len(EN_WORDS[cat]):
            raise ValueError(f"WorldConfig: {cat} size {n} must be in 1..{len(EN_WORDS[cat])}")
    taken = set()
    persons = [_name(rng, taken) for _ in range(cfg.n_persons)]
    cities = [_name(rng, taken) for _ in range(cfg.n_cities)]
    notables = [_name(rng, taken) for _ in range(cfg.n_notables)]
    en_words = set(sum(EN_WORDS.values(), [])) | set(" ".join(EN_FUNCTION.values()).lower().split())
    langs = {}
    for code in cfg.languages:
        spec = TOY_LANGS[code]
        words = {f"person{i}": _transliterate(p, spec["script"]) for i, p in enumerate(persons)}
        words.update({f"city{i}": _transliterate(c, spec["script"]) for i, c in enumerate(cities)})
        words.update({f"notable{i}": n for i, n in enumerate(notables)})
        if code == "en":
            words.update({f"{cat}{i}": EN_WORDS[cat][i] for cat, n in sizes.items() for i in range(n)})
            words.update(EN_FUNCTION)
        else:
            words.update(_own_words(rng, code, sizes, set(en_words)))  # a Latin toy word must not be English
        langs[code] = Language(code, LANGUAGE_NAMES[code], words, spec["order"], spec["alt"],
                               spec["adj_after"], spec["loc_after"])
    return langs


# -----------------------------------------------------------------------------
# 2. meanings and how each language renders them

def fact_meaning(f):
    return ("fact", f["rel"], f["notable"], f["value"])


def ask_meaning(f):
    return ("ask", f["rel"], f["notable"])


def is_good(m):
    """The sentiment label of an "act" meaning: its adjective's (even indices are the good ones)."""
    return m[3] % 2 == 0


def swap(m):
    """A "meet" meaning with agent and patient trading places."""
    return (m[0], m[1], m[3], m[2], m[4])


def render(L, m, syn=False, front=False, end="."):
    """Meaning tuple -> sentence in language L. Meanings:
    ("act", verb, person, adj, obj, city)   Kalib sells the broken lamp in Varo.
    ("meet", verb, person_a, person_b, city)  Kalib helps Moren in Varo. (syn: synonym verb; front: alt order)
    ("fact", rel, notable, value)           Dutol lives in Varo. / works as a baker. / keeps a horse.
    ("ask", rel, notable)                   Where does Dutol live?"""
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
            return EN_QUESTIONS[rel].format(w[f"notable{p}"])
        verb, cat, wh = RELATIONS[rel]
        value = w[wh] if kind == "ask" else w[f"{cat}{m[3]}"]
        slots = dict(S=w[f"notable{p}"], V=w[verb])
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
class Events:
    """New "act" and "meet" meanings, never one of `reserved` (the evaluation meanings, kept out of training)."""
    rng: random.Random
    sizes: dict
    reserved: set = field(default_factory=set)

    def new(self, kind=None, draw=None):
        """A meaning of `kind` (random if None), its slots drawn at random or by draw(category)."""
        draw = draw or (lambda k: self.rng.randrange(self.sizes[k]))
        while True:
            if (kind or self.rng.choice(("act", "meet"))) == "act":
                m = ("act", draw("vo"), draw("person"), draw("adj"), draw("obj"), draw("city"))
            else:
                m = ("meet", draw("vp"), draw("person"), draw("person"), draw("city"))
            if m not in self.reserved and (m[0] == "act" or (m[2] != m[3] and swap(m) not in self.reserved)):
                return m


# -----------------------------------------------------------------------------
# 3. the world, step by step (every step draws from the one seeded rng, in this order)

@dataclass
class World:
    cfg: WorldConfig
    langs: dict                 # code -> Language
    facts: list                 # dicts {rel, notable, value, en_only, split}
    pretrain: list              # [(lang, document)] in corpus order
    text: dict                  # split -> lang -> [document]
    align: dict                 # split -> [data.AlignExample]
    instructions: dict          # lang -> [Bactrian-X record] behind align["train"]
    pairs: dict                 # split -> xx -> [(meaning, en sentence, xx sentence)]
    knowledge: dict             # split -> lang -> [{"id","question","choices","label","en_only"}]
    sentiment: dict             # split -> lang -> [tasks.SentimentRow]
    sentiment_meanings: dict    # split -> [meaning of each item's sentence]
    train_meanings: set = field(default_factory=set)  # (lang, meaning) of every training sentence

    def training_texts(self):
        """What the tokenizer is trained on: the pretraining corpus and the alignment training texts."""
        return [d for _, d in self.pretrain] + [t for e in self.align["train"] for t in (e.sent0, e.sent1, e.instruction_text)]


def build_world(cfg: WorldConfig) -> World:
    """Generate the whole toy world in memory; deterministic from cfg.seed."""
    if len(cfg.languages) < 2 or cfg.languages[0] != "en" or any(c not in TOY_LANGS for c in cfg.languages):
        raise ValueError(f"WorldConfig.languages must start with 'en' and use codes from {list(TOY_LANGS)}")
    if len(cfg.mix) != len(cfg.languages) or abs(sum(cfg.mix) - 1) > 1e-6:
        raise ValueError("WorldConfig.mix needs one share per language, summing to 1")
    rng = random.Random(cfg.seed)
    langs = make_languages(cfg, rng)
    facts = deal_facts(cfg, rng)
    events = Events(rng, lexicon_sizes(cfg))
    pairs, knowledge, sentiment, sentiment_meanings = evaluation_sets(cfg, langs, facts, events)  # first: kept
    train_meanings = set()                                                                      # out of the rest
    docs = pretraining_corpus(cfg, langs, facts, events, train_meanings)
    text = {s: {c: [story(langs[c], facts, events, set(), cfg.fact_share) for _ in range(cfg.n_text_docs)]
                for c in cfg.languages} for s in ("dev", "test")}
    align, instructions = alignment_data(cfg, langs, facts, events, train_meanings)
    return World(cfg, langs, facts, docs, text, align, instructions, pairs, knowledge, sentiment,
                 sentiment_meanings, train_meanings)


def deal_facts(cfg, rng):
    """The knowledge base: every notable has a home, a job and an animal, values dealt from decks so all are used.
    The train split first takes one fact per value (so alignment data can state every word); then the dev and
    test splits take n_knowledge facts at random over the relations; the rest are train facts too."""
    sizes, cover, rest = lexicon_sizes(cfg), [], []
    for rel in RELATIONS:
        deck = _deck(sizes[RELATIONS[rel][1]], rng)
        rows = [dict(rel=rel, notable=p, value=next(deck)) for p in range(cfg.n_notables)]
        rng.shuffle(rows)
        firsts = set({r["value"]: i for i, r in reversed(list(enumerate(rows)))}.values())  # each value's first row
        cover += [r for i, r in enumerate(rows) if i in firsts]
        rest += [r for i, r in enumerate(rows) if i not in firsts]
    rng.shuffle(rest)
    n_dev, n_test = cfg.n_knowledge
    if n_dev + n_test > len(rest):
        raise ValueError(f"WorldConfig: n_knowledge {cfg.n_knowledge} needs more than the {len(rest)} facts left "
                         f"after the train split's; raise n_notables")
    split = dict(train=cover + rest[n_dev + n_test:], dev=rest[:n_dev], test=rest[n_dev:n_dev + n_test])
    facts = []
    for name, part in split.items():
        n_en_only = 0 if name == "train" else round(cfg.en_only_share * len(part))
        facts += [dict(r, split=name, en_only=i < n_en_only) for i, r in enumerate(part)]
    return facts


def evaluation_sets(cfg, langs, facts, events):
    """Held-out translation pairs, knowledge questions and sentiment items per split (dev, test); their event
    meanings are reserved, so no training text can use them."""
    rng, codes, others = events.rng, list(cfg.languages), list(cfg.languages[1:])
    pairs, knowledge, sentiment, sentiment_meanings = {}, {}, {}, {}
    for split, n_pairs, n_sentiment in zip(("dev", "test"), cfg.n_eval_pairs, cfg.n_sentiment):
        ms = []
        while len(ms) < n_pairs:
            ms.append(events.new())
            events.reserved.add(ms[-1])
        pairs[split] = {x: [(m, render(langs["en"], m), render(langs[x], m)) for m in ms] for x in others}
        knowledge[split] = knowledge_questions(cfg, split, langs, facts, rng)
        ms = []
        while len(ms) < n_sentiment:
            ms.append(events.new("act"))
            events.reserved.add(ms[-1])
        sentiment_meanings[split] = ms
        sentiment[split] = {c: [tasks.SentimentRow(f"{split}-{i}", render(langs[c], m), int(is_good(m)))
                                for i, m in enumerate(ms)] for c in codes}
    return pairs, knowledge, sentiment, sentiment_meanings


def knowledge_questions(cfg, split, langs, facts, rng):
    """lang -> the split's questions; the choices are full statements, which differ in the value only."""
    sizes, rows = lexicon_sizes(cfg), []
    for i, f in enumerate(x for x in facts if x["split"] == split):
        wrong = [dict(f, value=v) for v in range(sizes[RELATIONS[f["rel"]][1]]) if v != f["value"]]
        options = [f] + rng.sample(wrong, min(3, len(wrong)))
        rng.shuffle(options)
        rows.append((f"{split}-{i}", f, options))
    return {c: [dict(id=i, question=render(L, ask_meaning(f)), choices=[render(L, fact_meaning(o)) for o in opts],
                     label=opts.index(f), en_only=f["en_only"]) for i, f, opts in rows] for c, L in langs.items()}


def known_facts(L, facts):
    """The facts stated in language L: all in English, the rest only where not marked en_only."""
    return [f for f in facts if L.code == "en" or not f["en_only"]]


def story(L, facts, events, seen, fact_share):
    """A document of 3-10 sentences: facts (fact_share of them) and events (some with a synonym or the other
    word order)."""
    rng, out = events.rng, []
    for _ in range(rng.randint(3, 10)):
        r = rng.random()
        if r < fact_share:
            m, flags = fact_meaning(rng.choice(known_facts(L, facts))), ()
        else:
            m, flags = events.new("act" if rng.random() < 0.5 else "meet"), (rng.random() < 0.3, rng.random() < 0.3)
        seen.add((L.code, m))
        out.append(render(L, m, *flags))
    return " ".join(out)


def fewshot_document(L, facts, events, seen):
    """3-8 examples of one task in the evaluation format, joined by DEMO_SEP, so in-context learning can form."""
    rng, c = events.rng, L.code
    words, items, qa = L.templates(), [], rng.random() < 0.5
    for _ in range(rng.randint(3, 8)):
        if qa:
            f = rng.choice([f for f in known_facts(L, facts) if f["split"] == "train"])
            seen.add((c, ask_meaning(f)))
            items.append(tasks.knowledge_item(render(L, ask_meaning(f)), [render(L, fact_meaning(f))], 0, words))
        else:
            m = events.new("act")
            seen.add((c, m))
            items.append(tasks.sentiment_item(render(L, m), is_good(m), words))
    return DEMO_SEP.join(tasks.demo_text(it) for it in items)


def pretraining_corpus(cfg, langs, facts, events, seen):
    """[(lang, document)]: each language's share of the words, its last fewshot_share (English) or
    fewshot_share_other in few-shot documents; facts marked en_only are stated in English only. Adds every
    sentence's (lang, meaning) to `seen`."""
    docs = []
    for c, share in zip(cfg.languages, cfg.mix):
        budget, used = share * cfg.pretrain_words, 0
        few_share = cfg.fewshot_share if c == "en" else cfg.fewshot_share_other
        while used < budget:
            few = used >= (1 - few_share) * budget
            d = (fewshot_document(langs[c], facts, events, seen) if few
                 else story(langs[c], facts, events, seen, cfg.fact_share))
            docs.append((c, d))
            used += len(d.split())
    events.rng.shuffle(docs)
    return docs


# -----------------------------------------------------------------------------
# 4. alignment data: translation pairs zipped with cross-lingual instruction samples

def alignment_data(cfg, langs, facts, events, seen):
    """({"train", "dev"} -> [AlignExample], lang -> [Bactrian-X record]). en-xx translation pairs with slots
    dealt from per-language decks (so every word of every language shows up in a pair or an instruction sample),
    zipped with cross-lingual instruction samples made by data.cross_lingual_samples (the Bactrian-X reader's
    sampler) from parallel toy records; as many as fit in align_fraction of the pretraining words. Most pairs are
    events: with fewer (2 fact pairs in 11) retrieval of held-out events fell well below 0.9 (RESULTS.md)."""
    rng, codes, others = events.rng, list(cfg.languages), list(cfg.languages[1:])
    sizes = lexicon_sizes(cfg)
    decks = {x: {k: _deck(n, rng) for k, n in dict(sizes, rel=len(RELATIONS)).items()} for x in others + ["rec"]}
    train_facts = [f for f in facts if f["split"] == "train"]
    train_by_value = {}
    for f in train_facts:
        train_by_value.setdefault((f["rel"], f["value"]), []).append(f)

    def deck_fact(d):  # a training fact whose value is the next one in the relation's value deck
        rel = list(RELATIONS)[next(d["rel"])]
        return rng.choice(train_by_value[(rel, next(d[RELATIONS[rel][1]]))])

    def candidate_pair(x, i):  # (xx, meaning, en sentence, xx sentence), kinds in fixed proportions
        draw, kind, flags = (lambda k: next(decks[x][k])), "aaaammmmfq"[i % 10], ()
        if kind in "am":
            m = events.new("act" if kind == "a" else "meet", draw)
            flags = (rng.random() < 0.5, rng.random() < 0.5) if kind == "m" else ()
        else:
            m = fact_meaning(deck_fact(decks[x])) if kind == "f" else ask_meaning(rng.choice(train_facts))
        return x, m, render(langs["en"], m, *flags), render(langs[x], m, *flags)

    def candidate_record(i):  # ({lang: Bactrian-X record}, prompt meaning, output meaning or None)
        if rng.random() < 0.5:  # a knowledge question, answered by the fact
            f = deck_fact(decks["rec"])
            return {c: dict(id=f"i{i}", instruction=render(langs[c], ask_meaning(f)), input="",
                            output=render(langs[c], fact_meaning(f))) for c in codes}, ask_meaning(f), fact_meaning(f)
        m, who = events.new(None, lambda k: next(decks["rec"][k])), rng.random() < 0.5  # who / where: a name
        answer = f"person{m[2]}" if who else f"city{m[-1]}"
        return {c: dict(id=f"i{i}", instruction=langs[c].words["who_q" if who else "where_q"],
                        input=render(langs[c], m), output=langs[c].words[answer]) for c in codes}, m, None

    n_cand = int(2 * cfg.align_fraction * cfg.pretrain_words / 15) + 50  # rows average > 15 words
    cand_pairs = [candidate_pair(others[i % len(others)], i // len(others)) for i in range(n_cand)]
    cand_records = [candidate_record(i) for i in range(n_cand)]
    rows, n_rec = _rows_within_budget(cfg, cand_pairs, cand_records)
    for p, (_, prompt_m, output_m), _, src, tgt in rows:
        seen.update((("en", p[1]), (p[0], p[1]), (src, prompt_m)))
        if output_m is not None:
            seen.add((tgt, output_m))
    used = {r[0][1] for r in rows}
    n_dev = max(1, math.ceil(cfg.align_dev_fraction * len(rows)))
    dev_pairs = [p for p in cand_pairs[len(rows):] if p[1] not in used][:n_dev]
    dev_rows = _zip_rows(cfg, dev_pairs, cand_records[n_rec:n_rec + n_dev], cfg.seed + 1)
    align = dict(train=[r[2] for r in rows], dev=[r[2] for r in dev_rows])
    return align, {c: [r[0][c] for r in cand_records[:n_rec]] for c in codes}


def _zip_rows(cfg, pair_list, records, seed):
    """[(pair, record, AlignExample, source language, answer language)]: each record's cross-lingual sample,
    its contrastive pair replaced by the translation pair beside it."""
    by_id = {r[0]["en"]["id"]: r for r in records}
    samples = data.cross_lingual_samples({c: [r[0][c] for r in records] for c in cfg.languages},
                                         cfg.cross_probability, random.Random(seed), cfg.align_repeat)
    return [(p, by_id[rid], replace(ex, sent0=p[2], sent1=p[3]), src, tgt)
            for p, (rid, src, tgt, ex) in zip(pair_list, samples)]


def _rows_within_budget(cfg, cand_pairs, cand_records):
    """(rows, number of records): the most records whose rows fit in align_fraction of the pretraining words,
    so that instructions/*.json hold exactly the records used."""
    n_words = lambda e: len(e.sent0.split()) + len(e.sent1.split()) + len(e.instruction_text.split())
    budget = cfg.align_fraction * cfg.pretrain_words
    avg = sum(n_words(r[2]) for r in _zip_rows(cfg, cand_pairs[:50], cand_records[:50], cfg.seed)) / 50
    n_rec = max(1, min(len(cand_records), round(budget / avg / cfg.align_repeat)))
    while True:
        rows = _zip_rows(cfg, cand_pairs, cand_records[:n_rec], cfg.seed)
        if n_rec == 1 or sum(n_words(r[2]) for r in rows) <= budget:
            return rows, n_rec
        n_rec -= 1


# -----------------------------------------------------------------------------
# 5. files

def write_world(world: World, out_dir) -> None:
    """Write the world in the formats the readers of data.py and tasks.py accept (list in the module docstring)."""
    out = Path(out_dir)
    for sub in ("text", "pairs", "instructions", "tasks/knowledge", "tasks/sentiment"):
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
        for c, rows in world.sentiment[split].items():
            put(f"tasks/sentiment/{c}.{split}.tsv", ["\t".join(tasks.SENTIMENT_HEADER)] +
                [f"{e.id}\t{e.sentence}\t{e.label}" for e in rows])
        for c, items in world.knowledge[split].items():
            put(f"tasks/knowledge/{c}.{split}.jsonl", [dumps(r) for r in items])
    for split, rows in world.align.items():
        put(f"align.{split}.jsonl", [dumps(data.afp_row(e)) for e in rows])
    for c, recs in world.instructions.items():  # one record per line, so errors can name a line
        put(f"instructions/{c}.json", ["["] + [dumps(r) + ("," if k < len(recs) - 1 else "")
                                              for k, r in enumerate(recs)] + ["]"])
    templates = dumps({c: L.templates() for c, L in world.langs.items()})
    put("tasks/sentiment/templates.json", [templates])
    put("tasks/knowledge/templates.json", [templates])
    info = dict(config=asdict(world.cfg), languages={c: dict(name=L.name, order=L.order, alt_order=L.alt,
                script=TOY_LANGS[c]["script"]) for c, L in world.langs.items()},
                lexicon={c: L.words for c, L in world.langs.items()}, facts=world.facts)
    put("world.json", [json.dumps(info, ensure_ascii=False, indent=1)])


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write the toy multilingual world (and its tokenizer) to a directory.")
    ap.add_argument("--out", required=True, help="directory to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pretrain-words", type=int, default=WorldConfig.pretrain_words,
                    help="pretraining corpus size in whitespace-separated words")
    ap.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary; 0 skips the tokenizer")
    args = ap.parse_args(argv)
    t0 = time.time()
    world = build_world(WorldConfig(seed=args.seed, pretrain_words=args.pretrain_words))
    write_world(world, args.out)
    t1 = time.time()
    print(f"world: {len(world.pretrain)} pretraining docs, {len(world.align['train'])} alignment rows, "
          f"written to {args.out} in {t1 - t0:.1f}s")
    if args.vocab_size:
        tok = data.train_tokenizer(world.training_texts(), args.vocab_size)
        tok.save(str(Path(args.out) / "tokenizer.json"))
        print(f"tokenizer: {tok.get_vocab_size()} tokens, trained in {time.time() - t1:.1f}s")
        per_lang = {c: sum(map(len, data.encode(tok, [d for l, d in world.pretrain if l == c])))
                    for c in world.cfg.languages}
        total = sum(per_lang.values())
        align = sum(map(len, data.encode(tok, [t for e in world.align["train"]
                                               for t in (e.sent0, e.sent1, e.instruction_text)])))
        print("pretraining tokens: " + ", ".join(f"{c} {n} ({n / total:.1%})" for c, n in per_lang.items()) +
              f"; total {total}")
        print(f"alignment tokens: {align} ({align / total:.2%} of pretraining)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
