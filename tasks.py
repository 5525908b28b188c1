"""
tasks.py: the paper's five evaluation tasks, read from their public layouts in a local directory (nothing is
downloaded). `read(task, DIR, lang, split)` returns the rows of one language and split; `languages(task, DIR)`
the languages present. Split "dev" is where few-shot demos come from, "test" the queries.

  task         files under DIR                                                      a row
  xnli         xnli.{dev,test}.tsv of the XNLI-1.0 release (a header naming language,  NLIRow
               gold_label, sentence1, sentence2, pairID, ...), or {lang}.{split}.tsv
               in the authors' form: premise TAB hypothesis TAB label
  pawsx        {lang}.{split}.tsv, or the original x-final/{lang}/{dev_2k,test_2k}.tsv  PawsExample
  xcopa        {lang}/{val,test}.{lang}.jsonl (val = dev), English = COPA in that form COPARow
  xstorycloze  spring2016.val.{lang}.tsv_split_20_80_{train,eval}.tsv                  StoryRow
               (train = dev, eval = test)
  xwinograd    dataset.tsv (all languages; no splits: the caller keeps a query out of  WinogradRow
               its own demos), or {lang}.jsonl with a "_" in the sentence

Every reader checks every row and raises ValueError("FILE:LINE: reason") at the first bad one.
"""

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import data

TASKS = ("xnli", "pawsx", "xcopa", "xstorycloze", "xwinograd")
NLI_LABELS = ("entailment", "neutral", "contradiction")
PAWSX_HEADER = ["id", "sentence1", "sentence2", "label"]
SENTIMENT_HEADER = ["id", "sentence", "label"]
STORY_HEADER = ["InputStoryid", "InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4",
                "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2", "AnswerRightEnding"]


# --------------------------------------------------------------------------------------------------------
# what every task becomes: multiple-choice items, scored by the log-likelihood of each choice

@dataclass
class MCItem:
    prefix: str          # everything before the scored part (no demos)
    choices: list        # continuations; the scored text is prefix + choices[k]
    label: int           # index of the right choice; as a demonstration the item reads prefix + choices[label]
    id: str = ""


def demo_text(item):
    return item.prefix + item.choices[item.label]


@dataclass
class NLIRow:
    premise: str
    hypothesis: str
    label: int           # 0 entailment, 1 neutral, 2 contradiction
    id: str = ""


@dataclass
class PawsExample:
    id: str
    sentence1: str
    sentence2: str
    label: int           # 1 = paraphrase


@dataclass
class SentimentRow:
    id: str
    sentence: str
    label: int           # 1 = good (the toy world's sentiment task)


@dataclass
class COPARow:
    premise: str
    choices: list        # the two alternatives
    question: str        # "cause" or "effect": what the right alternative is to the premise
    label: int           # 0 or 1
    id: str = ""


@dataclass
class StoryRow:
    sentences: list      # the four sentences of the story
    endings: list        # the two candidate endings
    label: int           # 0 or 1: the right ending
    id: str = ""


@dataclass
class WinogradRow:
    before: str          # the sentence up to the blank (the pronoun)
    options: list        # the candidates that can fill it
    after: str           # the sentence after the blank
    label: int           # index of the right option
    id: str = ""


# --------------------------------------------------------------------------------------------------------
# where the files are

def task_file(task, root, lang, split):
    """The file holding (lang, split) of a task under root, or None."""
    root = Path(root)
    s = {"dev": "dev", "test": "test"}.get(split)
    if s is None:
        raise ValueError(f"split must be 'dev' or 'test', got {split!r}")
    candidates = {
        "xnli": [root / f"{lang}.{s}.tsv", root / f"xnli.{s}.tsv"],
        "pawsx": [root / f"{lang}.{s}.tsv", root / "x-final" / lang / f"{s}_2k.tsv", root / lang / f"{s}_2k.tsv"],
        "xcopa": [root / lang / f"{'val' if s == 'dev' else 'test'}.{lang}.jsonl"],
        "xstorycloze": [root / f"spring2016.val.{lang}.tsv_split_20_80_{'train' if s == 'dev' else 'eval'}.tsv"],
        "xwinograd": [root / f"{lang}.jsonl", root / "dataset.tsv"],
    }[task]
    return next((p for p in candidates if p.is_file()), None)


def languages(task, root):
    """The languages with a file of the task under root, English first, then sorted."""
    root = Path(root)
    if task == "xnli" and any(root.glob("xnli.*.tsv")):
        found = {r.split("\t", 1)[0] for p in root.glob("xnli.*.tsv") for r in p.read_text("utf-8").splitlines()[1:]}
    elif task == "xwinograd" and (root / "dataset.tsv").is_file():
        found = {r.split("\t", 1)[0] for r in (root / "dataset.tsv").read_text("utf-8").splitlines() if r.strip()}
    else:
        found = {_lang_of(task, p) for p in root.rglob("*") if p.is_file()} - {None}
        found = {lang for lang in found if task_file(task, root, lang, "dev") or task_file(task, root, lang, "test")}
    return sorted(found, key=lambda c: (c != "en", c))


def _lang_of(task, path):
    """The language a file of the task's layout holds, or None for other files."""
    name = path.name
    if task in ("xnli", "pawsx") and name.count(".") == 2 and name.endswith(".tsv"):
        return name.split(".")[0]
    if task == "pawsx" and name in ("dev_2k.tsv", "test_2k.tsv"):
        return path.parent.name
    if task == "xcopa" and name.endswith(".jsonl") and name.count(".") == 2:
        return name.split(".")[1]
    if task == "xstorycloze" and name.startswith("spring2016.val."):
        return name.split(".")[2]
    if task == "xwinograd" and name.endswith(".jsonl"):
        return name.split(".")[0]
    return None


def read(task, root, lang, split):
    """The rows of (lang, split): NLIRow, PawsExample, COPARow, StoryRow or WinogradRow."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; the paper's tasks are {', '.join(TASKS)}")
    path = task_file(task, root, lang, split)
    if path is None:
        raise FileNotFoundError(f"{task}: no {split} file for language {lang!r} under {root} (see tasks.py)")
    if task == "pawsx":
        return read_pawsx_tsv(path)
    if path.name.startswith("xnli."):
        return [row for row_lang, row in read_xnli_release(path) if row_lang == lang]
    if path.name == "dataset.tsv":
        return [row for row_lang, row in read_xwinograd_tsv(path) if row_lang == lang]
    return {"xnli": read_nli_tsv, "xcopa": read_copa_jsonl, "xstorycloze": read_story_tsv,
            "xwinograd": read_winograd_jsonl}[task](path)


# --------------------------------------------------------------------------------------------------------
# readers, one per layout

def _nli_label(value):
    if value in NLI_LABELS:
        return NLI_LABELS.index(value)
    if value in ("0", "1", "2"):
        return int(value)
    raise ValueError(f"label must be one of {', '.join(NLI_LABELS)} (or 0, 1, 2), got {value!r}")


def read_nli_tsv(path):
    """The authors' form: premise TAB hypothesis TAB label, no header."""
    def parse(line):
        premise, hypothesis, label = data._columns(line, 3)
        return NLIRow(premise, hypothesis, _nli_label(label.strip()))
    return [replace(row, id=str(i)) for i, row in enumerate(data._read_lines(path, parse))]


def _header(path, needed):
    data._no_bom(path)
    head = Path(path).read_bytes().split(b"\n", 1)[0].decode("utf-8", "replace").removesuffix("\r").split("\t")
    missing = [c for c in needed if c not in head]
    if missing:
        raise ValueError(f"{path}:1: the header lacks {', '.join(missing)} (tab-separated)")
    return head


def read_xnli_release(path):
    """[(language, NLIRow)] of an XNLI-1.0 xnli.{dev,test}.tsv; the row id is its pairID."""
    head = _header(path, ["language", "gold_label", "sentence1", "sentence2", "pairID"])
    col = {name: head.index(name) for name in ("language", "gold_label", "sentence1", "sentence2", "pairID")}

    def parse(line):
        cols = line.split("\t")
        if len(cols) != len(head):
            raise ValueError(f"expected {len(head)} tab-separated columns as the header, got {len(cols)}")
        for name in ("language", "sentence1", "sentence2"):
            if not cols[col[name]].strip():
                raise ValueError(f"column {name} is empty")
        return cols[col["language"]], NLIRow(cols[col["sentence1"]], cols[col["sentence2"]],
                                             _nli_label(cols[col["gold_label"]]), cols[col["pairID"]])
    return data._read_lines(path, parse, first=2)


def read_copa_jsonl(path):
    """(X)COPA JSON lines: premise, choice1, choice2, question (cause | effect), label (0 | 1), idx."""
    def parse(line):
        obj = data._json_object(line)
        question, label = data._field(obj, "question"), data._int(obj, "label")
        if question not in ("cause", "effect"):
            raise ValueError(f"field 'question' must be 'cause' or 'effect', got {question!r}")
        if label not in (0, 1):
            raise ValueError(f"field 'label' must be 0 or 1, got {label}")
        return COPARow(data._field(obj, "premise"), [data._field(obj, "choice1"), data._field(obj, "choice2")],
                       question, label, str(data._int(obj, "idx")))
    return data._read_lines(path, parse)


def read_story_tsv(path):
    """XStoryCloze: the header of STORY_HEADER, then story id, four sentences, two endings, the right one (1 | 2)."""
    head = _header(path, STORY_HEADER)
    if head != STORY_HEADER:
        raise ValueError(f"{path}:1: expected the header {' '.join(STORY_HEADER)} (tab-separated)")

    def parse(line):
        cols = data._columns(line, len(STORY_HEADER))
        if cols[7] not in ("1", "2"):
            raise ValueError(f"AnswerRightEnding must be 1 or 2, got {cols[7]!r}")
        return StoryRow(cols[1:5], cols[5:7], int(cols[7]) - 1, cols[0])
    return data._read_lines(path, parse, first=2)


def read_winograd_jsonl(path):
    """The derived form: sentence with one "_" for the blank, option1, option2, answer (1 | 2, or "1" | "2")."""
    def parse(line):
        obj = data._json_object(line)
        sentence = data._field(obj, "sentence")
        if sentence.count("_") != 1:
            raise ValueError(f"field 'sentence' must hold one '_' (the blank), it holds {sentence.count('_')}")
        if str(obj.get("answer")) not in ("1", "2"):
            raise ValueError(f"field 'answer' must be 1 or 2, got {obj.get('answer')!r}")
        before, after = sentence.split("_")
        return WinogradRow(before, [data._field(obj, "option1"), data._field(obj, "option2")], after,
                           int(obj["answer"]) - 1)
    return [replace(row, id=str(i)) for i, row in enumerate(data._read_lines(path, parse))]


PTB = {"``": '"', "''": '"', "`": "'", "-LRB-": "(", "-RRB-": ")"}   # the tokens' quotes and brackets


def _char_spans(sentence, tokens):
    """(start, end) of each token in the sentence: the tokens are its substrings, in order (quotes and brackets
    written as the Penn Treebank writes them)."""
    spans, pos = [], 0
    for tok in tokens:
        tok = PTB.get(tok, tok)
        at = sentence.find(tok, pos)
        if at < 0:
            raise ValueError(f"token {tok!r} is not in the sentence after character {pos}")
        pos = at + len(tok)
        spans.append((at, pos))
    return spans


def read_xwinograd_tsv(path):
    """[(language, WinogradRow)] of XWinograd's dataset.tsv: language, source, "?", sentence, tokens (JSON),
    pronoun [text, [start, end], tokens] (token offsets), candidates [[text, [start, end], tokens, correct]];
    the blank is the pronoun's character span, found from its token offsets."""
    def parse(line):
        cols = line.split("\t")
        if len(cols) != 7:
            raise ValueError(f"expected 7 tab-separated columns, got {len(cols)}")
        lang, sentence = cols[0], cols[3]
        try:
            tokens, pronoun, candidates = (json.loads(c) for c in cols[4:7])
            (p_start, p_end), texts = pronoun[1], [c[0] for c in candidates]
            correct = [bool(c[3]) for c in candidates]
            if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)
                    and 0 <= p_start < p_end <= len(tokens) and all(isinstance(t, str) and t for t in texts)):
                raise TypeError
        except (ValueError, TypeError, IndexError, KeyError):
            raise ValueError("columns 5-7 must be the tokens, the pronoun and the candidates as published "
                             "(JSON)") from None
        if len(texts) < 2 or correct.count(True) != 1:
            raise ValueError(f"expected 2 or more candidates with exactly one correct, got {correct}")
        spans = _char_spans(sentence, tokens)
        start, end = spans[p_start][0], spans[p_end - 1][1]
        return lang, WinogradRow(sentence[:start], texts, sentence[end:], correct.index(True))
    return [(lang, replace(row, id=str(i))) for i, (lang, row) in enumerate(data._read_lines(path, parse))]


def _tsv_header(path):
    data._no_bom(path)
    return Path(path).read_bytes().split(b"\n", 1)[0].decode("utf-8", "replace").removesuffix("\r").split("\t")


def _read_binary_tsv(path, header, make, skip_bad):
    """Rows of a TSV with `header` whose last column is a 0/1 label: make(*columns without it, label)."""
    if _tsv_header(path) != header:
        raise ValueError(f"{path}:1: expected the header {' '.join(header)} (tab-separated)")

    def parse(line):
        *cols, y = data._columns(line, len(header))
        if y not in ("0", "1"):
            raise ValueError(f"label must be 0 or 1, got {y!r}")
        return make(*cols, int(y))
    return data._read_lines(path, parse, skip_bad, first=2)


def read_pawsx_tsv(path, skip_bad=False) -> list:
    """PAWS-X TSV with the header id, sentence1, sentence2, label (1 = paraphrase)."""
    return _read_binary_tsv(path, PAWSX_HEADER, PawsExample, skip_bad)


def read_sentiment_tsv(path, skip_bad=False) -> list:
    """The toy world's sentiment TSV with the header id, sentence, label (1 = good)."""
    return _read_binary_tsv(path, SENTIMENT_HEADER, SentimentRow, skip_bad)


def _knowledge_row(line):
    obj = data._json_object(line)
    choices = obj.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise ValueError("field 'choices' must be a list of at least 2 non-empty strings")
    label = data._int(obj, "label")
    if not 0 <= label < len(choices):
        raise ValueError(f"label {label} is out of range for {len(choices)} choices")
    return dict(obj, id=data._id(obj), question=data._field(obj, "question"))


def read_knowledge_jsonl(path, skip_bad=False) -> list:
    """Knowledge questions {"id","question","choices","label"} (other fields are kept)."""
    return data._read_lines(path, _knowledge_row, skip_bad)


def check(path):
    """A one-line summary of a task file (data.py check), or None when the file is none of these layouts."""
    p = Path(path)
    first = p.read_bytes().split(b"\n", 1)[0].decode("utf-8", "replace").removesuffix("\r")
    if p.name == "dataset.tsv" and first.count("\t") == 6:
        rows = read_xwinograd_tsv(p)
        return f"{p}: XWinograd dataset.tsv, {len(rows)} schemas in {len({l for l, _ in rows})} languages"
    if p.name.startswith("xnli.") and "gold_label" in first:
        rows = read_xnli_release(p)
        return f"{p}: XNLI-1.0 release, {len(rows)} pairs in {len({l for l, _ in rows})} languages"
    if first.split("\t") == STORY_HEADER:
        return f"{p}: XStoryCloze TSV, {len(read_story_tsv(p))} stories"
    if p.suffix == ".jsonl" and '"premise"' in first and '"choice1"' in first:
        return f"{p}: (X)COPA JSON lines, {len(read_copa_jsonl(p))} items"
    if p.suffix == ".jsonl" and '"option1"' in first:
        return f"{p}: XWinograd JSON lines, {len(read_winograd_jsonl(p))} schemas"
    return None


# --------------------------------------------------------------------------------------------------------
# prompts: rows -> MCItem (prefix, choices, label), the template and its words in template_lang
#
# Template words for every language of each task. The authors wrote words for en, zh and ar only (zh as
# theirs; the rest are ours, best effort, and welcome corrections from speakers of the languages).

# PAWS-X (the authors' words; the toy languages' words come from the templates.json beside their files)
TEMPLATE_WORDS = {
    "en": dict(right="right?", yes="Yes", no="No", question="Question", answer="Answer"),
    "de": dict(right="richtig?", yes="Ja", no="Nein", question="Frage", answer="Antwort"),
    "es": dict(right="¿verdad?", yes="Sí", no="No", question="Pregunta", answer="Respuesta"),
    "fr": dict(right="n'est-ce pas?", yes="Oui", no="Non", question="Question", answer="Réponse"),
    "ja": dict(right="ですよね?", yes="はい", no="いいえ", question="質問", answer="答え"),
    "ko": dict(right="맞죠?", yes="예", no="아니요", question="질문", answer="답"),
    "zh": dict(right="对吗?", yes="对", no="不对", question="问题", answer="答案"),
}


def pawsx_item(s1, s2, paws_label, words, id=""):
    """`{s1}, right? {Yes|No}, {s2}`: choices are [Yes, No], so a paraphrase (PAWS label 1) has label 0."""
    return MCItem(f"{s1}, {words['right']}", [f" {words['yes']}, {s2}", f" {words['no']}, {s2}"],
                  0 if paws_label == 1 else 1, id)


def sentiment_item(sentence, good, words, id=""):
    """`{sentence} Is it good? {Yes|No}`: choices are [Yes, No], so a good sentence has label 0."""
    return MCItem(f"{sentence} {words['good']}", [f" {words['yes']}", f" {words['no']}"], 0 if good else 1, id)


def knowledge_item(question, choices, label, words, id=""):
    return MCItem(f"{words['question']}: {question} {words['answer']}:", [f" {c}" for c in choices], label, id)



COPA_WORDS = {  # cause, effect (the question), because, so (the conjunction), the space between words
    "en": ("Cause", "Effect", "because", "so", " "), "zh": ("起因", "影响", "因为", "所以", ""),
    "et": ("Põhjus", "Tagajärg", "sest", "seetõttu", " "), "ht": ("Kòz", "Efè", "paske", "donk", " "),
    "id": ("Sebab", "Akibat", "karena", "maka", " "), "it": ("Causa", "Effetto", "perché", "quindi", " "),
    "qu": ("Imarayku", "Chaymanta", "imaraykuchus", "chayrayku", " "),
    "sw": ("Sababu", "Matokeo", "kwa sababu", "kwa hiyo", " "), "ta": ("காரணம்", "விளைவு", "ஏனெனில்", "எனவே", " "),
    "th": ("สาเหตุ", "ผลลัพธ์", "เพราะ", "ดังนั้น", " "), "tr": ("Sebep", "Sonuç", "çünkü", "bu yüzden", " "),
    "vi": ("Nguyên nhân", "Kết quả", "bởi vì", "vì vậy", " "),
}

NLI_WORDS = {  # premise, hypothesis, question (the word, then the question), answer, the three answers
    "en": ("Premise", "Hypothesis", "Question",
           "What is the relationship between premise and hypothesis, entailment, neutral, or contradiction?",
           "Answer", "entailment", "neutral", "contradiction"),
    "zh": ("前提", "假设", "问题",
           "前提和假设之间是什么关系，蕴涵、中立还是矛盾？",
           "回答", "蕴涵", "中立", "矛盾"),
    "fr": ("Prémisse", "Hypothèse", "Question",
           "Quelle est la relation entre la prémisse et l'hypothèse : implication, neutre ou contradiction ?",
           "Réponse", "implication", "neutre", "contradiction"),
    "es": ("Premisa", "Hipótesis", "Pregunta",
           "¿Cuál es la relación entre la premisa y la hipótesis: implicación, neutral o contradicción?",
           "Respuesta", "implicación", "neutral", "contradicción"),
    "de": ("Prämisse", "Hypothese", "Frage",
           "Welche Beziehung besteht zwischen Prämisse und Hypothese: Folgerung, neutral oder Widerspruch?",
           "Antwort", "Folgerung", "neutral", "Widerspruch"),
    "el": ("Προκείμενη", "Υπόθεση", "Ερώτηση",
           "Ποια είναι η σχέση μεταξύ προκείμενης και υπόθεσης: συνεπαγωγή, ουδέτερη ή αντίφαση;",
           "Απάντηση", "συνεπαγωγή", "ουδέτερη", "αντίφαση"),
    "bg": ("Предпоставка", "Хипотеза", "Въпрос",
           "Каква е връзката между предпоставката и хипотезата: следствие, неутрална или противоречие?",
           "Отговор", "следствие", "неутрална", "противоречие"),
    "ru": ("Посылка", "Гипотеза", "Вопрос",
           "Каково отношение между посылкой и гипотезой: следование, нейтральность или противоречие?",
           "Ответ", "следование", "нейтральность", "противоречие"),
    "tr": ("Öncül", "Hipotez", "Soru",
           "Öncül ile hipotez arasındaki ilişki nedir: çıkarım, nötr mü, çelişki mi?",
           "Cevap", "çıkarım", "nötr", "çelişki"),
    "ar": ("المقدمة", "الفرضية", "السؤال",
           "ما العلاقة بين المقدمة والفرضية: استلزام، محايد، أم تناقض؟",
           "الإجابة", "استلزام", "محايد", "تناقض"),
    "vi": ("Tiền đề", "Giả thuyết", "Câu hỏi",
           "Mối quan hệ giữa tiền đề và giả thuyết là gì: kéo theo, trung lập hay mâu thuẫn?",
           "Trả lời", "kéo theo", "trung lập", "mâu thuẫn"),
    "th": ("ข้อตั้ง", "สมมติฐาน", "คำถาม",
           "ความสัมพันธ์ระหว่างข้อตั้งและสมมติฐานคืออะไร: ตามมา เป็นกลาง หรือขัดแย้ง?",
           "คำตอบ", "ตามมา", "เป็นกลาง", "ขัดแย้ง"),
    "hi": ("आधार वाक्य", "परिकल्पना", "प्रश्न",
           "आधार वाक्य और परिकल्पना के बीच क्या संबंध है: अनुसरण, तटस्थ या विरोधाभास?",
           "उत्तर", "अनुसरण", "तटस्थ", "विरोधाभास"),
    "sw": ("Dhana", "Nadharia", "Swali",
           "Kuna uhusiano gani kati ya dhana na nadharia: ulazima, kutoegemea, au mkanganyiko?",
           "Jibu", "ulazima", "kutoegemea", "mkanganyiko"),
    "ur": ("مقدمہ", "مفروضہ", "سوال",
           "مقدمہ اور مفروضے کے درمیان کیا تعلق ہے: لازم، غیر جانبدار، یا تضاد؟",
           "جواب", "لازم", "غیر جانبدار", "تضاد"),
}
NO_SPACES = ("zh", "ja", "jp")   # languages written without spaces between words and sentences


def _words(table, task, lang):
    if lang not in table:
        raise ValueError(f"{task}: no template words for language {lang!r} (tasks.py has {', '.join(table)})")
    return table[lang]


def copa_item(row, lang):
    """`{Cause|Effect}: {premise} {because|so} {choice}`: the premise without its final stop, the choice with
    a lower-case first letter, as one sentence (lm-evaluation-harness joins COPA that way too)."""
    cause, effect, because, so, space = _words(COPA_WORDS, "xcopa", lang)
    question, conjunction = (cause, because) if row.question == "cause" else (effect, so)
    premise = row.premise.rstrip().rstrip(".。!！")
    choices = [space + (c[:1].lower() + c[1:] if space else c) for c in row.choices]
    return MCItem(f"{question}: {premise}{space}{conjunction}", choices, row.label, row.id)


def nli_item(row, lang):
    """The authors' question, scored on the answer words (entailment, neutral, contradiction) like every other
    task; their code read the next token's A/B/C, which neither their question nor their demos asked for."""
    premise, hypothesis, question_word, question, answer, *labels = _words(NLI_WORDS, "xnli", lang)
    prefix = f"{premise}: {row.premise}\n{hypothesis}: {row.hypothesis}\n{question_word}: {question}\n{answer}:"
    return MCItem(prefix, [f" {w}" for w in labels], row.label, row.id)


def story_item(row, lang):
    """The four sentences, then each ending, joined by a space (none in Chinese and Japanese; the authors
    joined them with none in every language)."""
    space = "" if lang in NO_SPACES else " "
    return MCItem(space.join(row.sentences), [space + e for e in row.endings], row.label, row.id)


def winograd_item(row, lang):
    """The sentence with each option in the blank; scored from the option to the end of the sentence."""
    return MCItem(row.before, [o + row.after for o in row.options], row.label, row.id)


def load_items(task, root, lang, split, template_lang=None):
    """The MCItems of (lang, split), in the template of template_lang (default lang; the cross-lingual
    setting passes "en": English template words around target-language content)."""
    rows = read(task, root, lang, split)
    tl = template_lang or lang
    if task == "pawsx":  # TEMPLATE_WORDS, or a templates.json beside the files (the toy world's)
        words = _template_words(root, tl, ("right", "yes", "no"))
        return [pawsx_item(r.sentence1, r.sentence2, r.label, words, r.id) for r in rows]
    make = {"xnli": nli_item, "xcopa": copa_item, "xstorycloze": story_item, "xwinograd": winograd_item}[task]
    return [make(r, tl) for r in rows]


# --------------------------------------------------------------------------------------------------------
# the toy world's two tasks: {lang}.{split}.tsv (PAWS-style) or .jsonl (knowledge questions) in one directory

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
    """{task_dir}/{lang}.{split}.tsv (PAWS-X or sentiment, told by the header) or .jsonl (knowledge) as MCItems;
    template words from templates.json in task_dir or TEMPLATE_WORDS, in template_lang (default lang: the
    cross-lingual setting passes "en" for an English template around target-language content)."""
    tsv, jsonl = Path(task_dir) / f"{lang}.{split}.tsv", Path(task_dir) / f"{lang}.{split}.jsonl"
    if tsv.exists() and _tsv_header(tsv) == SENTIMENT_HEADER:
        words = _template_words(task_dir, template_lang or lang, ("good", "yes", "no"))
        return [sentiment_item(e.sentence, e.label, words, e.id) for e in read_sentiment_tsv(tsv)]
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
