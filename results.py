"""
results.py: the tables of RESULTS.md, read from the files that train.py and eval.py write.

    python results.py seeds runs/seed0 runs/seed1 runs/seed2     # base vs aligned, mean ± std over the runs
    python results.py ablations runs/seed0 runs/abl-*            # one row per run: its aligned model

A run directory holds results.json ({"base": ..., "aligned": ...} from `train.py`, or {"aligned": ...} from
`eval.py --out`) and aligned/config.json, whose training config names the aligned layer (representations are
read there) and the flags that differ from train.py's defaults (the ablation column).
"""

import json
import statistics
import sys
from dataclasses import fields
from pathlib import Path

TASKS = ("knowledge", "pawsx")
SKIP_FLAGS = {"out", "init", "stage", "seed", "data_dir", "eval", "resume", "device", "compile",
              "grad_checkpointing", "contrastive_tile_size"}   # where and how a run ran, not how it was aligned
BEFORE_THE_FLAG = {"replay_weight": 0.0}  # runs saved before --replay-weight existed trained without replay


def load_run(run_dir):
    """(results.json as a dict, the aligned model's training config as a dict)."""
    run = Path(run_dir)
    path = run / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no results file (train.py writes it; eval.py --out for an ablation)")
    config = json.loads((run / "aligned" / "config.json").read_text())
    return json.loads(path.read_text()), config["train"]


def figure(r, key, layer):
    """One number of an evaluate() dict: p1:en-xb, p1:xb-en, lang_id, ppl:LANG, or TASK:SETTING:LANG|others|gap,
    where gap = English in-language accuracy minus the mean of the other languages in SETTING."""
    if key.startswith("p1:"):
        a, b = key[3:].split("-")
        return r["repr"]["pairs"][b]["p1_en_xx"][layer] if a == "en" else r["repr"]["pairs"][a]["p1_xx_en"][layer]
    if key == "lang_id":
        return r["repr"]["lang_id_acc"][layer]
    if key.startswith("ppl:"):
        return r["ppl"][key[4:]]["ppl"]
    task, setting, lang = key.split(":")
    per = r["mc"][task][setting]
    others = [v["acc"] for l, v in per.items() if l not in ("en", "avg")]
    if lang == "others":
        return sum(others) / len(others)
    if lang == "gap":
        return r["mc"][task][setting.replace("cross", "in")]["en"]["acc"] - sum(others) / len(others)
    return per[lang]["acc"]


def seed_rows(shots):
    rows = [("P@1 en→xb, aligned layer", "p1:en-xb"), ("P@1 xb→en, aligned layer", "p1:xb-en"),
            ("P@1 en→xa", "p1:en-xa"), ("P@1 en→xc", "p1:en-xc"),
            ("language-id accuracy, aligned layer", "lang_id"), ("English perplexity", "ppl:en"),
            ("xb perplexity", "ppl:xb")]
    for task in TASKS:
        for k in shots:
            rows += [(f"{task} {k}-shot in-language: English acc", f"{task}:in_{k}shot:en"),
                     (f"{task} {k}-shot in-language: mean of the others", f"{task}:in_{k}shot:others"),
                     (f"{task} {k}-shot in-language gap (en − others)", f"{task}:in_{k}shot:gap"),
                     (f"{task} {k}-shot cross-lingual: mean of the others", f"{task}:cross_{k}shot:others"),
                     (f"{task} {k}-shot cross-lingual gap (en in-language − others)", f"{task}:cross_{k}shot:gap")]
    return rows


def mean_std(values, digits):
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def seeds_table(run_dirs):
    """Base vs aligned over runs of the default experiment: mean ± sample standard deviation (± 0 for one run);
    the change column is over the per-run differences (aligned minus base of the same run)."""
    runs = [load_run(d) for d in run_dirs]
    shots = sorted({int(s.split("_")[1][:-4]) for r, _ in runs for s in r["aligned"]["mc"].get("pawsx", {})})
    out = ["| figure | base | aligned | change (per run) |", "|---|---|---|---|"]
    for name, key in seed_rows(shots):
        digits = 2 if key.startswith("ppl") else 3
        b = [figure(r["base"], key, cfg["layer"]) for r, cfg in runs]
        a = [figure(r["aligned"], key, cfg["layer"]) for r, cfg in runs]
        out.append(f"| {name} | {mean_std(b, digits)} | {mean_std(a, digits)} | "
                   f"{mean_std([y - x for x, y in zip(b, a)], digits)} |")
    return "\n".join(out)


def changed_flags(cfg):
    """The training flags of cfg that differ from train.py's defaults, as a command line would give them."""
    import config  # the defaults live there; imported here so that the seeds table needs no torch
    flags, cfg = [], {**BEFORE_THE_FLAG, **{config.RENAMED.get(k, k): v for k, v in cfg.items()}}
    for f in fields(config.TrainConfig):
        default = list(f.default) if isinstance(f.default, tuple) else f.default    # JSON has lists
        if f.name not in SKIP_FLAGS and f.name in cfg and cfg[f.name] != default:
            name, value = f"--{f.name.replace('_', '-')}", cfg[f.name]
            if isinstance(value, bool):
                flags.append(name if value else f"--no-{name[2:]}")
            else:
                flags.append(f"{name} {' '.join(map(str, value)) if isinstance(value, list) else value}")
    return " ".join(flags)


def ablation_table(run_dirs):
    """One row per run: its aligned model (the first run's base model gives the first row). The knowledge
    columns are mc averages: in-language over every language (English included), cross over the others."""
    out = ["| run | flags | P@1 en→xb | P@1 xb→en | P@1 en→xa / en→xc | lang-id | English ppl | "
           "knowledge 5-shot in / cross avg |", "|---|---|---|---|---|---|---|---|"]
    runs = [(Path(d).name, *load_run(d)) for d in run_dirs]
    name, r, cfg = runs[0]
    rows = ([(f"{name} base (no alignment)", "", r["base"], cfg["layer"])] if "base" in r else [])
    rows += [(n, changed_flags(c), r["aligned"], c["layer"]) for n, r, c in runs]
    for n, flags, r, layer in rows:
        p = lambda key: f"{figure(r, key, layer):.3f}"
        knowledge = [f"{r['mc']['knowledge'][s]['avg']['acc']:.3f}" for s in ("in_5shot", "cross_5shot")]
        out.append(f"| {n} | {f'`{flags}`' if flags else ''} | {p('p1:en-xb')} | {p('p1:xb-en')} | "
                   f"{p('p1:en-xa')} / {p('p1:en-xc')} | {p('lang_id')} | {figure(r, 'ppl:en', layer):.2f} | "
                   f"{' / '.join(knowledge)} |")
    return "\n".join(out)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] not in ("seeds", "ablations"):
        sys.exit(__doc__.strip())
    print(seeds_table(argv[1:]) if argv[0] == "seeds" else ablation_table(argv[1:]))


if __name__ == "__main__":
    main()
