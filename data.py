"""
data.py: what the loss eats, in reading order: the alignment record, the paper's cross-lingual instruction
sampling, batches, the tokenizer, the file readers, and `python data.py check FILE`.

One alignment batch, from file to loss (train.py's align stage):
  align.train.jsonl / --pairs / --bactrian  --read_*-->  [AlignExample]  (sentence pair + instruction sample)
  AlignData(examples, tokenizer, ...).batch(step)  -->  dict of tensors (keys below)
  xalign.afp_loss(model, batch)  -->  1.0 * contrastive (pair_*) + 1.5 * instruction (instr_*)

Batch keys (B = rows on this rank; Lp, Li, T = the longest row of the batch, right-padded with the pad id):
  pair_ids     (2B', Lp)  [BOS] sentence [EOS]: rows 0..B'-1 are the x sentences, B'..2B'-1 their translations
  pair_mask    (2B', Lp)  1 on real tokens                        (B' = the contrastive batch, --align-pair-batch-size)
  pair_groups  (B',)      pairs with equal ids share a sentence: never each other's negatives
  instr_ids    (B, Li)    [BOS] prompt response [EOS]: "{instruction} {input} Answer in {Language}: {output}"
  instr_mask   (B, Li)    1 on real tokens
  instr_labels (B, Li)    the token ids on response + EOS, -100 elsewhere (the loss covers the answer only)
and pretraining / replay blocks (PretrainData):
  input_ids (B, T), attention_mask (B, T), labels (B, T) (-100 on padding)
batch(step) depends only on (seed, step, rank), so a resumed run sees exactly the data it would have seen.

Every reader raises ValueError("FILE:LINE: reason") at the first malformed line; `data.py check FILE`
validates any supported file (the toy world's, PAWS-X, Bactrian-X, the paper's five tasks) and exits 2 there.
"""
import argparse
import json
import random
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import hf

SPECIALS = ["<pad>", "<s>", "</s>"]
PAD, BOS, EOS = 0, 1, 2
DEMO_SEP = "</s>"  # joins few-shot examples, as the paper joins demos; tokenizes to EOS
# English language names for "Answer in {name}:" (always English, as in the paper)
LANGUAGE_NAMES = {"en": "English", "de": "German", "es": "Spanish", "fr": "French", "ja": "Japanese",
                  "ko": "Korean", "zh": "Chinese", "ru": "Russian", "ar": "Arabic", "hi": "Hindi",
                  "xa": "Valian", "xb": "Kirosh", "xc": "Temish"}

# -----------------------------------------------------------------------------
# 1. the record: one sentence pair for the contrastive term, one instruction sample for the instruction term


@dataclass
class AlignExample:
    sent0: str             # contrastive pair: x
    sent1: str             # its translation y
    instruction_text: str  # "{instruction} {input} Answer in {Language}: {output}"; the loss covers the response,
    prompt_len: int        # instruction_text[prompt_len:] (prompt_len counts characters)

    def prompt(self):
        return self.instruction_text[:self.prompt_len]

    def response(self):
        return self.instruction_text[self.prompt_len:]


def afp_row(e: AlignExample) -> dict:
    """The record as a row of the authors' JSONL, whose keys name the instruction sample "clm_text"."""
    return dict(sent0=e.sent0, sent1=e.sent1, clm_text=e.instruction_text, clm_prompt_len=e.prompt_len)

# -----------------------------------------------------------------------------
# 2. the paper's cross-lingual instruction samples (shared by the Bactrian-X reader and the toy world)


def cross_lingual_samples(records_by_lang, cross_probability, rng, repeat):
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

# -----------------------------------------------------------------------------
# 3. batching: batch(step) is a pure function of (seed, step, rank), so a resumed run sees the same data


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
    texts += [e.prompt() for e in examples] + [e.response() for e in examples]
    ids, n = encode(tokenizer, texts), len(examples)
    return ids[:n], ids[n:2 * n], ids[2 * n:3 * n], ids[3 * n:]


def collate_align(examples, tokenizer, max_len, groups=None) -> dict:
    """AlignExamples -> one alignment batch (keys and shapes in the module docstring; here B' = B)."""
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
# 4. tokenizer


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
    Face checkpoint follows its family (hf.special_ids)."""
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
        return TextTokenizer(tok, **hf.special_ids(tok, meta, path.parent))
    if meta.get("specials"):
        return TextTokenizer(tok, **meta["specials"])
    if [tok.token_to_id(s) for s in SPECIALS] != [PAD, BOS, EOS]:
        raise ValueError(f"{path}: expected special tokens {SPECIALS} at ids 0, 1, 2")
    return TextTokenizer(tok, BOS, EOS, PAD)


def encode(tokenizer, texts):
    """Token ids of each text, no specials (tokenizers' parallel batch encoder)."""
    return [e.ids for e in tokenizer.encode_batch(texts)]

# -----------------------------------------------------------------------------
# 5. readers: every malformed line raises ValueError("FILE:LINE: reason"); skip_bad=True skips and warns the count


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


def read_translation_pairs(path, seed=0) -> list:
    """A parallel TSV as alignment records: each pair for the contrastive term, and as the instruction sample
    "{a} Translate into {B}: {b}" in a random direction. Language names come from a file name like en-zh.tsv,
    else the prompt is "{a} ="."""
    codes = Path(path).name.split(".")[0].split("-")
    names = [LANGUAGE_NAMES.get(c) for c in codes] if len(codes) == 2 else [None, None]
    rng, out = random.Random(seed), []
    for src, tgt in read_parallel_tsv(path):
        flip = rng.random() < 0.5
        a, b, name = (tgt, src, names[0]) if flip else (src, tgt, names[1])
        prompt = f"{a} Translate into {name}:" if all(names) else f"{a} ="
        out.append(AlignExample(src, tgt, f"{prompt} {b}", len(prompt)))
    return out


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
    """Per-language Bactrian-X JSON files -> cross-lingual instruction samples (see cross_lingual_samples). The first
    language is the pivot; a key missing from LANGUAGE_NAMES is used as the language name itself. Ids absent
    from some language are left out, with a warning giving the count."""
    records = {c: _read_bactrian_file(p) for c, p in paths_by_lang.items()}
    common = set.intersection(*({r["id"] for r in recs} for recs in records.values()))
    missing = len(set().union(*({r["id"] for r in recs} for recs in records.values())) - common)
    if missing:
        warnings.warn(f"read_bactrian: {missing} ids are not in every language and were left out")
    return [ex for *_, ex in cross_lingual_samples(records, cross_probability, random.Random(seed), repeat)]


# -----------------------------------------------------------------------------
# 6. the check command


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
        head = p.read_bytes().split(b"\n", 1)[0].rstrip(b"\r")
        if head == "\t".join(tasks.PAWSX_HEADER).encode():
            rows = tasks.read_pawsx_tsv(p)
            return f"{p}: PAWS-X TSV, {len(rows)} pairs, {sum(e.label for e in rows)} paraphrases"
        if head == "\t".join(tasks.SENTIMENT_HEADER).encode():
            rows = tasks.read_sentiment_tsv(p)
            return f"{p}: sentiment TSV, {len(rows)} sentences, {sum(e.label for e in rows)} good"
        return f"{p}: parallel TSV, {len(read_parallel_tsv(p))} pairs"
    if p.suffix == ".jsonl":
        first = next((line for line in p.read_bytes().split(b"\n") if line.strip()), b"{}")
        try:
            keys = json.loads(first)
        except ValueError:
            keys = {}  # the reader below reports the line
        if isinstance(keys, dict) and "question" in keys:
            return f"{p}: knowledge questions JSONL, {len(tasks.read_knowledge_jsonl(p))} items"
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
    ap = argparse.ArgumentParser(description="Validate a data file of any supported format; exit status 2 with "
                                             "FILE:LINE: reason at the first bad line.")
    ap.add_argument("command", choices=["check"])
    ap.add_argument("file")
    args = ap.parse_args(argv)
    try:
        print("ok:", check_file(args.file))
        return 0
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
