"""
eval.py: what AFP should change, measured on one checkpoint or two side by side.

    python eval.py CKPT [CKPT2] [--data DIR] [--tasks knowledge,pawsx=../shared/data/pawsx] [--shots 0,5]
                   [--split test] [--max-items 500] [--pairs 200] [--batch-size 16] [--no-prefix-cache]
                   [--threads 1] [--out results.json] [--plot pca.png]

1. Few-shot multiple choice by log-likelihood, the paper's protocol. An item is a prefix and choices, scored
   text = prefix + choice. The k demos (prefix + right choice) are the first k rows of one seeded permutation
   of the prompt language's dev set, the same for every query, skipping the query: its row (when queries come
   from dev too), its id and equal rows (rows and ids are parallel across languages, so its translation is
   skipped too). Demos are joined by the model's EOS ("</s>" in the toy world, as in its pretraining
   corpus's few-shot documents and in the authors' code for XGLM and BLOOM). Settings: "in" = demos and
   template in the query's language; "cross" = demos and template in English around target-language content
   (not run for English, where it equals "in").
   acc: argmax of the summed log-prob of the choice's tokens; acc_norm: of that sum / the choice's characters.
   Token boundary: [BOS] + context + choice is tokenized as one string, and the choice's tokens are those from
   the first token that ends past the context (character offsets). A token spanning the join (zh "答案"+"对"
   -> one token, " cat"+"s" -> " cats") is scored with the choice, and the text is tokenized as in training.
   The tokens before that boundary which all choices share run once (batch 1, KV cache, model.repeat_kv), the
   choices follow batched; consecutive items also reuse the cache over their common prefix (the demos).
   --no-prefix-cache scores every full sequence on its own, the authors' way (same scores within 1e-4).
   Too long for the model: whole demos are dropped from the left, then context tokens ("truncated" counts
   the items); an item whose choice alone is too long is not scored ("skipped").
2. Representations per layer (0 = embeddings, which last-token pooling reduces to one token; i = block i) of
   held-out en-xx translation pairs (DATA/pairs/en-xx.SPLIT.tsv): retrieval P@1 both ways (is the nearest
   cosine neighbour among all N candidates the translation? chance 1/N), mean cosine of translation pairs
   and of all other pairs, and language identification accuracy of a nearest-centroid classifier (cosine,
   centred on the training mean) fitted on the even rows of every language and tested on the odd rows
   (chance 1/#languages; lower = languages less separated). Perplexity per language on
   DATA/text/LANG.SPLIT.txt (else the pair sentences).

results (evaluate() returns one dict; the CLI writes {checkpoint name: dict}):
  checkpoint, stage, step, data_dir, config (EvalConfig), seconds {mc, repr, total}
  mc[task][SETTING_Kshot][lang]  {acc, acc_norm, n (scored), truncated, skipped}, and for knowledge tasks
                                 {acc_en_only, n_en_only}: facts stated only in English during pretraining
  mc[task][SETTING_Kshot]["avg"] {acc, acc_norm}: mean over that entry's languages  (SETTING: in | cross)
  repr  {layers [0..n_layer], langs, lang_id_acc [per layer], lang_id_chance,
         pairs {xx: {n, p1_en_xx, p1_xx_en, cos_pair, cos_random  (lists over layers)}}}
  ppl   {lang: {ppl (per token, EOS included), bits_per_char, tokens}}
  pca   {layer, lang [per point], xy [[x, y], ...]}   only with --plot (EvalConfig.pca_points > 0)
"""

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import hf
import tasks
import xalign
from model import load_model, repeat_kv


@dataclass
class EvalConfig:
    tasks: list = field(default_factory=list)  # names under DATA/tasks or "name=dir"; empty = every task there
    shots: tuple = (0, 5)
    settings: tuple = ("in", "cross")
    split: str = "test"             # queries and pairs; "dev" for tuning. Demos always come from dev
    max_items: int = 500            # queries per task and language: a seeded sample, the same rows in each language
    n_pairs: int = 200              # translation pairs per language
    batch_size: int = 16
    prefix_cache: bool = True
    separator: str | None = None    # between demos; None = the text of the tokenizer's EOS ("</s>" as in the
                                    # paper for the toy world, XGLM and BLOOM; "<|endoftext|>" for GPT-2, Qwen2)
    pooling: str = "last"
    pca_points: int = 0             # sentences per language in results["pca"] (--plot: 100)
    pca_layer: int = 1              # the layer AFP aligns
    seed: int = 1234
    device: str = "cpu"
    threads: int = 1                # torch intra-op threads while evaluating (restored after): the many small
                                    # forward passes only wait on each other, many times slower on a busy machine
    progress: bool = True


# --------------------------------------------------------------------------------------------------------
# Log-likelihood of choices

def encode_choices(tokenizer, contexts, choices, max_len):
    """[BOS] + tokens(context + choice) per item and choice (no BOS where the model's family has none), and
    the index of the choice's first token. Returns (seqs, starts, n_cut); n_cut items lost context tokens to fit
    max_len; an item whose choice alone does not fit gets None."""
    flat = [c + ch for c, chs in zip(contexts, choices) for ch in chs]
    encs = iter(tokenizer.encode_batch(flat))
    start = tokenizer.start
    seqs, starts, n_cut = [], [], 0
    for context, chs in zip(contexts, choices):
        item_seqs, item_starts = [], []
        for ch in chs:
            if not ch:
                raise ValueError(f"empty choice after {context[-60:]!r}")
            enc = next(encs)
            ends = np.array([e for _, e in enc.offsets])
            # the first token reaching into the choice; never token 0, which no logit predicts
            item_starts.append(max(1, len(start) + int(np.argmax(ends > len(context)))))
            item_seqs.append(start + enc.ids)
        cut, n = max(map(len, item_seqs)) - max_len, len(start)
        if cut > 0 and cut >= min(item_starts) - n:                      # one context token must stay
            item_seqs = item_starts = None
        elif cut > 0:                                                    # drop context tokens after BOS
            item_seqs, item_starts = [s[:n] + s[n + cut:] for s in item_seqs], [t - cut for t in item_starts]
            n_cut += 1
        seqs.append(item_seqs)
        starts.append(item_starts)
    return seqs, starts, n_cut


def common_prefix_len(a, b):
    n = min(len(a), len(b))
    diff = (torch.as_tensor(a[:n]) != torch.as_tensor(b[:n])).nonzero()
    return int(diff[0]) if len(diff) else n


def pad_right(seqs):
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.as_tensor(s), 1
    return ids, mask


def summed_logprobs(pred_logits, targets, score_mask):
    """sum over scored positions of log p(target), and their count: pred_logits (B, L, V), the rest (B, L)."""
    logp = pred_logits.float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    return (logp * score_mask).sum(-1), score_mask.sum(-1)


@torch.no_grad()
def score_full(model, seqs, starts, batch_size, bar=None):
    """The authors' way: each full sequence through the model, longest first, batched and right-padded."""
    dev = next(model.parameters()).device
    flat = sorted(((i, j) for i, s in enumerate(seqs) if s is not None for j in range(len(s))),
                  key=lambda ij: -len(seqs[ij[0]][ij[1]]))
    out = [None if s is None else [None] * len(s) for s in seqs]
    for b in range(0, len(flat), batch_size):
        chunk = flat[b:b + batch_size]
        ids, mask = (t.to(dev) for t in pad_right([seqs[i][j] for i, j in chunk]))
        logits = model(ids, mask).logits                                         # (B, L, V)
        first = torch.tensor([starts[i][j] for i, j in chunk], device=dev)
        pos = torch.arange(1, ids.shape[1], device=dev)                         # position of each target
        sums, counts = summed_logprobs(logits[:, :-1], ids[:, 1:], (pos >= first[:, None]) & mask[:, 1:].bool())
        for (i, j), s, c in zip(chunk, sums.tolist(), counts.tolist()):
            out[i][j] = (s, int(c))
        if bar is not None:
            bar.update(len(chunk) * len(seqs) / len(flat))                      # in items
    return out


@torch.no_grad()
def score_cached(model, seqs, starts, batch_size, bar=None):
    """Three levels of sharing, every level batched:
    1. the prefix common to every sequence (the demos: the same for every query) runs once, batch 1;
    2. the query part of each item (its tokens shared by all its choices) runs for batch_size items at once on
       top of that cache; right padding leaves pads in the middle, which the model's masks and positions skip;
    3. the rest of every choice runs on its item's cache (repeat_kv, then one row per choice)."""
    dev = next(model.parameters()).device
    live = [i for i, s in enumerate(seqs) if s is not None]
    out = [None if s is None else [None] * len(s) for s in seqs]
    if not live:
        return out
    # P_i: tokens shared by every choice of item i and before its first scored token
    item_p = {i: min([*starts[i], *(common_prefix_len(seqs[i][0], s) for s in seqs[i][1:])]) for i in live}
    # P0: shared by every item, and one token short of each P_i so that every item runs a query token
    p0 = min(item_p[i] - 1 for i in live)
    for i in live[1:]:
        p0 = min(p0, common_prefix_len(seqs[live[0]][0], seqs[i][0]))
    shared = model(torch.tensor([seqs[live[0]][0][:p0]], device=dev), use_cache=True).past_kv if p0 else None

    for b in range(0, len(live), batch_size):
        items = live[b:b + batch_size]
        n = len(items)
        q_ids, q_mask = (t.to(dev) for t in pad_right([seqs[i][0][p0:item_p[i]] for i in items]))
        ones = q_mask.new_ones(n, p0)
        res = model(q_ids, torch.cat([ones, q_mask], 1), past_kv=repeat_kv(shared, n) if shared else None,
                    use_cache=True)
        last = res.logits[torch.arange(n, device=dev), q_mask.sum(1) - 1]          # (n, V): predicts token P_i
        rows = [(k, j) for k, i in enumerate(items) for j in range(len(seqs[i]))]  # (item in batch, choice)
        for r in range(0, len(rows), batch_size):
            chunk = rows[r:r + batch_size]
            which = torch.tensor([k for k, _ in chunk], device=dev)
            c_ids, c_mask = (t.to(dev) for t in pad_right([seqs[items[k]][j][item_p[items[k]]:] for k, j in chunk]))
            past = [(key[which], value[which]) for key, value in res.past_kv]       # each row its item's cache
            mask = torch.cat([ones[which], q_mask[which], c_mask], 1)
            logits = model(c_ids, mask, past_kv=past).logits
            pred = torch.cat([last[which][:, None], logits[:, :-1]], dim=1)         # the logits predicting each token
            p_i = torch.tensor([item_p[items[k]] for k, _ in chunk], device=dev)
            first = torch.tensor([starts[items[k]][j] for k, j in chunk], device=dev)
            pos = p_i[:, None] + torch.arange(c_ids.shape[1], device=dev)           # position of each target
            sums, counts = summed_logprobs(pred, c_ids, (pos >= first[:, None]) & c_mask.bool())
            for (k, j), s_, c_ in zip(chunk, sums.tolist(), counts.tolist()):
                out[items[k]][j] = (s_, int(c_))
        if bar is not None:
            bar.update(n)
    return out


def logprobs_of_choices(model, tokenizer, contexts, choices, batch_size=16, prefix_cache=True, bar=None,
                        return_cut=False):
    """[[(sum of log p(choice tokens | context), number of choice tokens) per choice] per item]. Too long:
    context tokens go from the left; an item whose choice alone is too long is None with return_cut (then
    returns (scores, n_cut)), else an error."""
    model.eval()
    seqs, starts, n_cut = encode_choices(tokenizer, contexts, choices, model.cfg.max_seq_len)
    scores = (score_cached if prefix_cache else score_full)(model, seqs, starts, batch_size, bar)
    if return_cut:
        return scores, n_cut
    if None in scores:
        raise ValueError(f"item {scores.index(None)}: a choice alone exceeds max_seq_len={model.cfg.max_seq_len}")
    return scores


# --------------------------------------------------------------------------------------------------------
# Few-shot prompts

def pick_demos(pool, k, seed, query=None, query_index=None):
    """The first k of one seeded permutation of the pool, the same for every query, skipping the query: the
    pool's row query_index, rows with its id, rows equal to it."""
    def is_query(j):
        return j == query_index or (query is not None and (pool[j] == query or (query.id and pool[j].id == query.id)))
    for m in (min(len(pool), k + 2), len(pool)):     # k + 2 rows are enough unless the pool repeats the query
        picked = [pool[j] for j in random.Random(seed).sample(range(len(pool)), m) if not is_query(j)][:k]
        if len(picked) == k:
            return picked
    raise ValueError(f"{k}-shot: only {len(picked)} demos in a pool of {len(pool)} besides the query")


def sample_items(items, n, seed):
    """(row indices, rows): a seeded sample of n rows in their original order (all when there are fewer)."""
    idx = sorted(random.Random(seed).sample(range(len(items)), n)) if len(items) > n else list(range(len(items)))
    return idx, [items[i] for i in idx]


def few_shot_accuracy(model, tokenizer, items, demos, k, seed, item_index=None, separator=None,
                      batch_size=16, prefix_cache=True, bar=None, per_item=False):
    """{acc, acc_norm, n, truncated, skipped} of k-shot prompting. demos: the prompt pool; item_index: each
    item's row in that pool's split when the queries come from it too. per_item adds "correct" (None = skipped)."""
    contexts, truncated = [], 0
    separator = tokenizer.id_to_token(tokenizer.eos) if separator is None else separator
    for n, item in enumerate(items):
        shots = pick_demos(demos, k, seed, item, None if item_index is None else item_index[n]) if k else []
        while True:
            context = "".join(tasks.demo_text(d) + separator for d in shots) + item.prefix
            longest = max(map(len, data.encode(tokenizer, [context + c for c in item.choices])))
            if not shots or len(tokenizer.start) + longest <= model.cfg.max_seq_len:
                break
            shots = shots[1:]                                        # too long: drop the leftmost demo
        truncated += len(shots) < k
        contexts.append(context)
    scores, n_cut = logprobs_of_choices(model, tokenizer, contexts, [it.choices for it in items], batch_size,
                                        prefix_cache, bar, return_cut=True)
    correct = [None if s is None else max(range(len(s)), key=lambda j: s[j][0]) == it.label
               for it, s in zip(items, scores)]
    correct_norm = [None if s is None else max(range(len(s)), key=lambda j: s[j][0] / len(it.choices[j])) == it.label
                    for it, s in zip(items, scores)]
    n = len(items) - correct.count(None)
    acc = sum(filter(None, correct)) / max(n, 1)
    out = {"acc": acc, "acc_norm": sum(filter(None, correct_norm)) / max(n, 1),
           "acc_se": math.sqrt(acc * (1 - acc) / n) if n else 0.0,     # the standard error of acc over the items
           "n": n, "truncated": truncated if k else n_cut, "skipped": len(items) - n}
    return dict(out, correct=correct) if per_item else out


# --------------------------------------------------------------------------------------------------------
# Representations

@torch.no_grad()
def sentence_embeddings(model, tokenizer, sentences, layer=None, pooling="last", batch_size=64):
    """Pooled hidden states of data.sentence_row ([BOS] sentence EOS): (N, D) at `layer`, or (n_layer + 1, N, D)
    for layer=None."""
    model.eval()
    dev = next(model.parameters()).device
    seqs = [data.sentence_row(ids, model.cfg.max_seq_len, tokenizer) for ids in data.encode(tokenizer, sentences)]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))       # similar lengths share a batch
    parts = []
    for b in range(0, len(order), batch_size):
        ids, mask = (t.to(dev) for t in pad_right([seqs[i] for i in order[b:b + batch_size]]))
        hidden = model(ids, mask, output_hidden_states=True, n_layers=layer, compute_logits=False).hidden_states
        hidden = hidden if layer is None else hidden[layer:]
        parts.append(torch.stack([xalign.pool(h, mask, pooling).float() for h in hidden]))   # (layers, B, D)
    emb = torch.cat(parts, dim=1)
    emb[:, order] = emb.clone()                                          # back to the input order
    return emb if layer is None else emb[0]


def cosine_matrix(a, b):
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def retrieval_p1(a, b):
    """(P@1 a->b, P@1 b->a): how often the cosine nearest neighbour of a_i among all b is b_i, and back."""
    sim = cosine_matrix(a, b)
    target = torch.arange(len(a), device=sim.device)
    return (sim.argmax(1) == target).float().mean().item(), (sim.argmax(0) == target).float().mean().item()


def pair_cosines(a, b):
    """(mean cosine of the pairs (a_i, b_i), mean cosine of all pairs (a_i, b_j), i != j)."""
    sim, n = cosine_matrix(a, b), len(a)
    return sim.diag().mean().item(), ((sim.sum() - sim.diag().sum()) / max(n * (n - 1), 1)).item()


def language_id_accuracy(groups):
    """groups[l]: (N_l, D) vectors of language l. Accuracy on the odd rows of a nearest-centroid classifier
    (cosine, after centring on the mean of the training rows) fitted on the even rows."""
    mean = torch.cat([g[0::2] for g in groups]).mean(0)
    centroids = F.normalize(torch.stack([g[0::2].mean(0) - mean for g in groups]), dim=-1)   # (n_lang, D)
    hits = sum(int(((F.normalize(g[1::2] - mean, dim=-1) @ centroids.T).argmax(1) == l).sum())
               for l, g in enumerate(groups))
    return hits / max(sum(len(g[1::2]) for g in groups), 1)


@torch.no_grad()
def perplexity(model, tokenizer, texts, batch_size=16):
    """{ppl per token, bits_per_char, tokens} of [BOS] text EOS; a text too long is cut (and loses EOS).
    Without a BOS (GPT-2, BLOOM, Qwen2) the first token is not scored."""
    dev, max_len, start = next(model.parameters()).device, model.cfg.max_seq_len, tokenizer.start
    seqs, chars = [], 0
    for text, enc in zip(texts, tokenizer.encode_batch(texts)):
        keep = max_len - len(start)
        fits = len(enc.ids) + 1 <= keep
        seqs.append(start + (enc.ids + [tokenizer.eos] if fits else enc.ids[:keep]))
        chars += len(text) + 1 if fits else enc.offsets[keep - 1][1]     # + 1: the end of the text
        chars -= 0 if start or not enc.ids else enc.offsets[0][1]          # the unscored first token
    nll = tokens = 0.0
    for b in range(0, len(seqs), batch_size):
        ids, mask = (t.to(dev) for t in pad_right(seqs[b:b + batch_size]))
        s, c = summed_logprobs(model(ids, mask).logits[:, :-1], ids[:, 1:], mask[:, 1:].float())
        nll, tokens = nll - s.sum().item(), tokens + c.sum().item()
    return {"ppl": math.exp(nll / tokens), "bits_per_char": nll / math.log(2) / chars, "tokens": int(tokens)}


# --------------------------------------------------------------------------------------------------------
# Whole evaluation

def resolve_tasks(data_dir, names):
    """{name: task dir} of "name=dir" items, bare names under DATA/tasks, and "all" (or none): every task there."""
    out = {}
    for spec in names or ["all"]:
        name, _, d = spec.partition("=")
        if not d and not data_dir:
            raise ValueError(f"task {name!r}: no data dir to look in (give {name}=DIR or --data DIR)")
        root = Path(data_dir or ".") / "tasks"
        if not d and name == "all":
            if not root.is_dir():
                raise FileNotFoundError(f"{root}: no tasks directory (give --tasks name=DIR)")
            out.update({p.name: p for p in sorted(root.iterdir()) if p.is_dir()})
        else:
            out[name] = Path(d) if d else root / name
            if not out[name].is_dir():
                raise FileNotFoundError(f"task {name!r}: no directory {out[name]}")
    return out


def task_source(name, task_dir):
    """(languages, load(lang, split, template_lang) -> MCItems, has(lang, split)) of a task: the paper's five
    by name (tasks.py: xnli, pawsx, xcopa, xstorycloze, xwinograd), else a directory of {lang}.{split}.tsv or
    .jsonl files (the toy world's tasks). XWinograd has no splits: its queries are its demo pool."""
    if name in tasks.TASKS:
        return (tasks.languages(name, task_dir), partial(tasks.load_items, name, task_dir),
                lambda lang, split: name != "xwinograd" and tasks.task_file(name, task_dir, lang, split) is not None)
    return (tasks.task_languages(task_dir), partial(tasks.load_mc_task, task_dir),
            lambda lang, split: (Path(task_dir) / f"{lang}.{split}.tsv").exists()
            or (Path(task_dir) / f"{lang}.{split}.jsonl").exists())


def mc_eval(model, tokenizer, task_dirs, cfg):
    """results["mc"] for {name: task dir}: every task x setting x language x shots."""
    jobs, pools = [], {}
    for name, task_dir in task_dirs.items():
        langs, load, has = task_source(name, task_dir)
        if not langs:
            raise FileNotFoundError(f"task {name!r}: no files of its layout in {task_dir} (see tasks.py)")
        for setting in cfg.settings:
            if setting == "cross" and "en" not in langs:
                print(f"eval.py: {name}: no English data in {task_dir}, so no cross-lingual setting (English demos)",
                      file=sys.stderr)
                continue
            for lang in langs if setting == "in" else [l for l in langs if l != "en"]:
                prompt_lang = lang if setting == "in" else "en"
                # a language with only a dev split (the shared PAWS-X and XCOPA) takes its queries from dev
                # too; they skip themselves as demos
                split = cfg.split if has(lang, cfg.split) else "dev"
                items = load(lang, split, prompt_lang)
                idx, items = sample_items(items, cfg.max_items, cfg.seed)
                facts = Path(task_dir) / f"{lang}.{split}.jsonl"     # knowledge: the facts stated only in English
                facts = tasks.read_knowledge_jsonl(facts) if facts.exists() else []
                en_only = {r["id"]: r.get("en_only") for r in facts}
                for k in cfg.shots:
                    if k and (name, prompt_lang) not in pools:
                        pools[name, prompt_lang] = load(prompt_lang, "dev")
                    jobs.append((name, f"{setting}_{k}shot", lang, k, items, idx if split == "dev" else None,
                                 pools.get((name, prompt_lang), []), en_only))
    results = {}
    bar = tqdm(total=sum(len(j[4]) for j in jobs), desc="few-shot", unit="item", disable=not cfg.progress, leave=False)
    for name, key, lang, k, items, idx, pool, en_only in jobs:
        r = few_shot_accuracy(model, tokenizer, items, pool, k, cfg.seed, idx, cfg.separator, cfg.batch_size,
                              cfg.prefix_cache, bar, per_item=True)
        if r["skipped"] or r["truncated"]:     # the figure rests on fewer items or shorter prompts: say so
            tqdm.write(f"eval.py: {name} {key} {lang}: {r['n']} of {len(items)} items scored ({r['skipped']} longer "
                       f"than the model's {model.cfg.max_seq_len} tokens), {r['truncated']} with fewer demos or a "
                       "cut context", file=sys.stderr)
        sub = [c for it, c in zip(items, r.pop("correct")) if c is not None and en_only.get(it.id)]
        if sub:
            r.update(acc_en_only=sum(sub) / len(sub), n_en_only=len(sub))
        results.setdefault(name, {}).setdefault(key, {})[lang] = r
    bar.close()
    for entries in results.values():
        for per_lang in entries.values():
            rows = [r for r in per_lang.values() if r["n"]]
            per_lang["avg"] = {m: sum(r[m] for r in rows) / max(len(rows), 1) for m in ("acc", "acc_norm")}
    return results


def repr_eval(model, tokenizer, data_dir, cfg):
    """results["repr"], ["ppl"] and (cfg.pca_points) ["pca"] from DATA/pairs/en-xx.SPLIT.tsv and DATA/text."""
    files = sorted(Path(data_dir).glob(f"pairs/en-*.{cfg.split}.tsv"))
    if not files:
        raise FileNotFoundError(f"{Path(data_dir) / 'pairs'}: no en-xx.{cfg.split}.tsv files")
    pairs, texts, groups = {}, {}, {}                            # groups[lang]: (L+1, N, D) sentence vectors
    for f in files:
        xx = f.name.split(".")[0][3:]
        _, rows = sample_items(data.read_parallel_tsv(f), cfg.n_pairs, cfg.seed)
        en, tgt = [r[0] for r in rows], [r[1] for r in rows]
        e_en, e_xx = (sentence_embeddings(model, tokenizer, s, None, cfg.pooling, 4 * cfg.batch_size)
                      for s in (en, tgt))
        if "en" not in groups:
            groups["en"], texts["en"] = e_en, en
        groups[xx], texts[xx] = e_xx, tgt
        p1, cos = zip(*[(retrieval_p1(a, b), pair_cosines(a, b)) for a, b in zip(e_en, e_xx)])
        pairs[xx] = {"n": len(rows), "p1_en_xx": [p[0] for p in p1], "p1_xx_en": [p[1] for p in p1],
                     "cos_pair": [c[0] for c in cos], "cos_random": [c[1] for c in cos]}
    layers = list(range(model.cfg.n_layer + 1))
    out = {"repr": {"layers": layers, "langs": list(groups), "pairs": pairs, "lang_id_chance": 1 / len(groups),
                    "lang_id_acc": [language_id_accuracy([g[l] for g in groups.values()]) for l in layers]}}
    docs = {lang: Path(data_dir) / "text" / f"{lang}.{cfg.split}.txt" for lang in texts}
    out["ppl"] = {lang: perplexity(model, tokenizer, data.read_text(docs[lang]) if docs[lang].exists() else sents,
                                   cfg.batch_size) for lang, sents in texts.items()}
    if cfg.pca_points:
        layer = min(cfg.pca_layer, layers[-1])
        pts = {lang: g[layer][:cfg.pca_points] for lang, g in groups.items()}
        x = torch.cat(list(pts.values()))
        x = x - x.mean(0)
        xy = x @ torch.linalg.svd(x, full_matrices=False).Vh[:2].T        # the two leading principal components
        out["pca"] = {"layer": layer, "lang": [lang for lang, p in pts.items() for _ in p],
                      "xy": [[round(a, 4), round(b, 4)] for a, b in xy.tolist()]}
    return out


def evaluate_model(model, tokenizer, data_dir, cfg=EvalConfig()):
    """Few-shot accuracy on cfg.tasks and, when data_dir has pairs/, the representation analysis."""
    t0, threads = time.time(), torch.get_num_threads()
    res = {"data_dir": str(data_dir) if data_dir else None, "config": asdict(cfg)}
    try:
        torch.set_num_threads(cfg.threads or threads)
        res["mc"] = mc_eval(model, tokenizer, resolve_tasks(data_dir, cfg.tasks), cfg) if cfg.shots else {}
        t1 = time.time()
        if data_dir and (Path(data_dir) / "pairs").is_dir():
            res.update(repr_eval(model, tokenizer, data_dir, cfg))
    finally:
        torch.set_num_threads(threads)
    res["seconds"] = {"mc": round(t1 - t0, 2), "repr": round(time.time() - t1, 2), "total": round(time.time() - t0, 2)}
    return res


def evaluate(ckpt_dir, data_dir=None, tasks=None, shots=None, cfg=None):
    """A checkpoint (config.json, model.pt, tokenizer.json in it or beside it; or a Hugging Face checkpoint
    directory) on data_dir, by default the checkpoint's "data_dir"; tasks and shots override cfg's."""
    cfg = replace(cfg or EvalConfig(), **({"tasks": list(tasks)} if tasks is not None else {}),
                  **({"shots": tuple(shots)} if shots is not None else {}))
    ckpt = Path(ckpt_dir)
    model = load_model(ckpt, cfg.device)
    meta = json.loads((ckpt / "config.json").read_text())
    tok_file = next((p for p in (ckpt / "tokenizer.json", ckpt.parent / "tokenizer.json") if p.is_file()), None)
    tok_file = ckpt if tok_file == ckpt / "tokenizer.json" else tok_file   # the checkpoint's own special ids
    if tok_file is None:
        raise FileNotFoundError(f"{ckpt}: no tokenizer.json in it or beside it")
    tokenizer = data.load_tokenizer(tok_file)
    if tokenizer.get_vocab_size() > model.cfg.vocab_size:
        raise hf.CheckpointError(f"{tok_file}: the tokenizer has {tokenizer.get_vocab_size()} tokens, more than the "
                                 f"model's {model.cfg.vocab_size}: it is not this model's tokenizer")
    data_dir = data_dir or meta.get("data_dir")
    res = {"checkpoint": str(ckpt), "stage": meta.get("stage"), "step": meta.get("step")}
    return dict(res, **evaluate_model(model, tokenizer, data_dir, cfg))


# --------------------------------------------------------------------------------------------------------
# Report

def markdown_table(results):
    """Markdown tables of {name: evaluate() dict}; with two checkpoints a cell reads "a → b (+change)"."""
    runs = list(results.values())

    def get(d, *keys):
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else d[k] if isinstance(d, list) and k < len(d) else None
        return d

    def fmt(vals, scale=100.0, digits=1):
        if None in vals:
            return ""
        s = [f"{v * scale:.{digits}f}" for v in vals]
        if len(s) == 1:
            return s[0]
        change = round((vals[1] - vals[0]) * scale, digits) + 0.0            # + 0.0 turns -0.0 into 0.0
        return f"{s[0]} → {s[1]} ({change:+.{digits}f})"

    def cell(keys, *args):
        return fmt([get(r, *keys) for r in runs], *args)

    def table(title, head, rows):
        return ["", title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + \
               ["| " + " | ".join(r) + " |" for r in rows]

    out = ["checkpoints: " + " vs ".join(f"{n} ({r.get('checkpoint')})" for n, r in results.items())]
    for task, entries in runs[0].get("mc", {}).items():   # one table per task, its languages as columns
        langs = list(dict.fromkeys(l for per in entries.values() for l in per if l != "avg"))
        rows = []
        for key, per in entries.items():
            rows.append([key] + [cell(("mc", task, key, l, "acc")) for l in langs + ["avg"]])
            if any("acc_en_only" in v for v in per.values()):
                rows.append([key + ", en-only facts"] + [cell(("mc", task, key, l, "acc_en_only")) for l in langs]
                            + [""])
        n = sorted({r["n"] for per in entries.values() for l, r in per.items() if l != "avg"})
        se = max(get(r, "mc", task, key, l, "acc_se") or 0 for r in runs for key in entries for l in langs)
        out += table(f"{task}: few-shot accuracy (acc, %; {n[0]}–{n[-1]} items a cell, standard error at most "
                     f"{100 * se:.1f})", ["setting"] + langs + ["avg"], rows)
    rep = runs[0].get("repr")
    if rep:
        xx, rows = list(rep["pairs"]), []
        for metric, scale, digits in (("p1_en_xx", 100, 1), ("p1_xx_en", 100, 1), ("cos_pair", 1, 3),
                                      ("cos_random", 1, 3)):
            for l in rep["layers"]:
                avg = [sum(get(r, "repr", "pairs", x, metric, l) or 0 for x in xx) / len(xx) for r in runs]
                rows.append([metric, str(l)] + [cell(("repr", "pairs", x, metric, l), scale, digits) for x in xx]
                            + [fmt(avg, scale, digits)])
        rows += [["lang_id_acc", str(l)] + [""] * len(xx) + [cell(("repr", "lang_id_acc", l))] for l in rep["layers"]]
        out += table(f"Representations per layer (P@1 and language-id accuracy in %, lang-id chance "
                     f"{100 * rep['lang_id_chance']:.0f}%)", ["metric", "layer"] + xx + ["avg"], rows)
    if runs[0].get("ppl"):
        pl = list(runs[0]["ppl"])
        out += table("Held-out text", ["metric"] + pl,
                     [[m] + [cell(("ppl", l, m), 1, 2) for l in pl] for m in ("ppl", "bits_per_char")])
    return "\n".join(out)


def plot_pca(results, path):
    """results["pca"] of each checkpoint side by side, coloured by language. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("the PCA picture needs matplotlib: pip install matplotlib", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.5), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        xy, langs = np.array(r["pca"]["xy"]), np.array(r["pca"]["lang"])
        for lang in dict.fromkeys(r["pca"]["lang"]):
            ax.scatter(*xy[langs == lang].T, s=6, label=lang)
        ax.set_title(f"{name}, layer {r['pca']['layer']}")
        ax.legend(markerscale=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description="Few-shot accuracy and representation analysis of one or two checkpoints.")
    ap.add_argument("ckpt", nargs="+", help="checkpoint directories (two: side by side)")
    ap.add_argument("--data", help="toy world directory (default: the checkpoint's data_dir)")
    ap.add_argument("--tasks", default="", help="comma-separated names under DATA/tasks, name=DIR, or all (default)")
    ap.add_argument("--shots", default="0,5")
    ap.add_argument("--settings", default="in,cross")
    ap.add_argument("--split", default="test", help="queries and pairs: test, or dev for tuning")
    ap.add_argument("--max-items", type=int, default=EvalConfig.max_items, help="queries per task and language")
    ap.add_argument("--pairs", type=int, default=EvalConfig.n_pairs, help="translation pairs per language")
    ap.add_argument("--batch-size", type=int, default=EvalConfig.batch_size)
    ap.add_argument("--no-prefix-cache", action="store_true", help="score each full sequence (the authors' way)")
    ap.add_argument("--seed", type=int, default=EvalConfig.seed)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=EvalConfig.threads, help="torch threads (0 = leave as is)")
    ap.add_argument("--out", help="results JSON")
    ap.add_argument("--plot", help="PNG of a 2-D PCA of the sentence vectors (needs matplotlib)")
    args = ap.parse_args(argv)
    if len(args.ckpt) > 2:
        ap.error("give one or two checkpoints")
    split = lambda s: [x for x in s.split(",") if x]
    cfg = EvalConfig(tasks=split(args.tasks), shots=tuple(map(int, split(args.shots))),
                     settings=tuple(split(args.settings)), split=args.split, max_items=args.max_items,
                     n_pairs=args.pairs, batch_size=args.batch_size, prefix_cache=not args.no_prefix_cache,
                     seed=args.seed, device=args.device, threads=args.threads, pca_points=100 if args.plot else 0)
    names = [Path(c).name for c in args.ckpt]
    names = names if len(set(names)) == len(names) else args.ckpt
    try:
        results = {n: evaluate(c, args.data, cfg=cfg) for n, c in zip(names, args.ckpt)}
    except (FileNotFoundError, ValueError) as e:  # a checkpoint, task directory or data file (FILE:LINE) at fault
        print(f"eval.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(markdown_table(results))
    print("seconds: " + ", ".join(f"{n} {r['seconds']['total']:.1f}" for n, r in results.items()), file=sys.stderr)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, ensure_ascii=False))
    if args.plot and "pca" in next(iter(results.values())) and plot_pca(results, args.plot):
        print(f"PCA picture: {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
