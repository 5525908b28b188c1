"""
results.py: the tables of RESULTS.md, read from the files that train.py and eval.py write.

    python results.py seeds runs/seed0 runs/seed1 runs/seed2     # base vs aligned, mean ± std over the runs
    python results.py icl runs/seed0 runs/seed1 runs/seed2       # the 5-shot gap per run, ± standard errors
    python results.py plot gap.png runs/seed0 runs/seed1 runs/seed2   # the same as bars (needs matplotlib)
    python results.py ablations runs/seed0 runs/abl-*            # one row per run: its aligned model

A run directory holds results.json ({"base": ..., "aligned": ...} from `train.py`, or {"aligned": ...} from
`eval.py --out`) and aligned/config.json, whose training config names the aligned layer (representations are
read there) and the flags that differ from train.py's defaults (the ablation column).
"""

import json
import math
import statistics
import sys
from dataclasses import fields
from pathlib import Path

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


def task_names(r):
    return list(r["mc"])


def seed_rows(tasks, shots):
    rows = [("P@1 en→xb, aligned layer", "p1:en-xb"), ("P@1 xb→en, aligned layer", "p1:xb-en"),
            ("P@1 en→xa", "p1:en-xa"), ("P@1 en→xc", "p1:en-xc"),
            ("language-id accuracy, aligned layer", "lang_id"), ("English perplexity", "ppl:en"),
            ("xb perplexity", "ppl:xb")]
    for task in tasks:
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
    tasks = task_names(runs[0][0]["aligned"])
    shots = sorted({int(s.split("_")[1][:-4]) for r, _ in runs for t in tasks for s in r["aligned"]["mc"][t]})
    out = ["| figure | base | aligned | change (per run) |", "|---|---|---|---|"]
    for name, key in seed_rows(tasks, shots):
        digits = 2 if key.startswith("ppl") else 3
        b = [figure(r["base"], key, cfg["layer"]) for r, cfg in runs]
        a = [figure(r["aligned"], key, cfg["layer"]) for r, cfg in runs]
        out.append(f"| {name} | {mean_std(b, digits)} | {mean_std(a, digits)} | "
                   f"{mean_std([y - x for x, y in zip(b, a)], digits)} |")
    return "\n".join(out)


def others_with_se(per):
    """(mean accuracy of the languages other than English, its standard error from theirs)."""
    rows = [v for lang, v in per.items() if lang not in ("en", "avg")]
    return (sum(v["acc"] for v in rows) / len(rows),
            math.sqrt(sum(v.get("acc_se", 0.0) ** 2 for v in rows)) / len(rows))


def english_and_others(r, task, setting, k):
    """(English in-language, its SE, the others' mean in `setting`, its SE) at k shots of one evaluate() dict."""
    en = r["mc"][task][f"in_{k}shot"]["en"]
    return (en["acc"], en.get("acc_se", 0.0), *others_with_se(r["mc"][task][f"{setting}_{k}shot"]))


def icl_table(run_dirs, k=5):
    """Per task, setting and run: English and the mean of the others, base and aligned, each ± its standard error
    over the items (the change's is the two combined, as if independent), then mean ± std over the runs."""
    runs = [(Path(d).name, load_run(d)[0]) for d in run_dirs]
    pm = lambda v, se: f"{v:.3f} ± {se:.3f}"
    out = [f"| task | setting | run | English, base | English, aligned | others, base | others, aligned | "
           f"others' change | gap (en − others), base → aligned |", "|---" * 9 + "|"]
    for task in task_names(runs[0][1]["aligned"]):
        for setting in ("in", "cross"):
            cols = []
            for name, r in runs:
                eb, eb_se, ob, ob_se = english_and_others(r["base"], task, setting, k)
                ea, ea_se, oa, oa_se = english_and_others(r["aligned"], task, setting, k)
                cols.append((eb, ea, ob, oa, oa - ob, eb - ob, ea - oa))
                out.append(f"| {task} | {setting} {k}-shot | {name} | {pm(eb, eb_se)} | {pm(ea, ea_se)} | "
                           f"{pm(ob, ob_se)} | {pm(oa, oa_se)} | {pm(oa - ob, math.hypot(ob_se, oa_se))} | "
                           f"{eb - ob:+.3f} → {ea - oa:+.3f} |")
            m = [mean_std(c, 3) for c in zip(*cols)]
            out.append(f"| {task} | {setting} {k}-shot | mean ± std | {m[0]} | {m[1]} | {m[2]} | {m[3]} | {m[4]} | "
                       f"{m[5]} → {m[6]} |")
    return "\n".join(out)


def plot_gap(path, run_dirs, k=5):
    """Bars of k-shot accuracy per task, setting and language, base and aligned, mean over the runs with their
    standard deviation as error bars. False when matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs = [load_run(d)[0] for d in run_dirs]
    tasks = task_names(runs[0]["aligned"])
    fig, axes = plt.subplots(len(tasks), 2, figsize=(9, 3.2 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        for ax, setting in zip(row, ("in", "cross")):
            langs = [l for l in runs[0]["aligned"]["mc"][task][f"{setting}_{k}shot"] if l != "avg"]
            for j, stage in enumerate(("base", "aligned")):
                accs = [[r[stage]["mc"][task][f"{setting}_{k}shot"][l]["acc"] for r in runs] for l in langs]
                sd = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs]
                ax.bar([i + 0.4 * j for i in range(len(langs))], [statistics.mean(a) for a in accs], 0.4,
                       yerr=sd, label=stage, capsize=3)
            en = statistics.mean(r["base"]["mc"][task][f"in_{k}shot"]["en"]["acc"] for r in runs)
            ax.axhline(en, color="grey", linestyle="--", linewidth=1, label="English in-language, base")
            ax.set_xticks([i + 0.2 for i in range(len(langs))], langs)
            ax.set_title(f"{task}, {setting}-language {k}-shot" if setting == "in" else
                         f"{task}, cross-lingual {k}-shot (English demos)", fontsize=10)
            ax.set_ylim(0, 1)
            ax.set_ylabel("accuracy")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


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
    """One row per run: its aligned model (the first run's base model gives the first row). Per task, 5-shot
    accuracy: English, and the mean of the other languages in-language / cross-lingual."""
    runs = [(Path(d).name, *load_run(d)) for d in run_dirs]
    tasks = task_names(runs[0][1]["aligned"])
    out = ["| run | flags | P@1 en→xb | P@1 xb→en | P@1 en→xa / en→xc | lang-id | English ppl | " +
           " | ".join(f"{t} 5-shot: en / others in / others cross" for t in tasks) + " |", "|---" * (7 + len(tasks)) + "|"]
    name, r, cfg = runs[0]
    rows = ([(f"{name} base (no alignment)", "", r["base"], cfg["layer"])] if "base" in r else [])
    rows += [(n, changed_flags(c), r["aligned"], c["layer"]) for n, r, c in runs]
    for n, flags, r, layer in rows:
        p = lambda key: f"{figure(r, key, layer):.3f}"
        icl = [" / ".join(f"{figure(r, key, layer):.3f}" for key in (f"{t}:in_5shot:en", f"{t}:in_5shot:others",
                                                                     f"{t}:cross_5shot:others")) for t in tasks]
        out.append(f"| {n} | {f'`{flags}`' if flags else ''} | {p('p1:en-xb')} | {p('p1:xb-en')} | "
                   f"{p('p1:en-xa')} / {p('p1:en-xc')} | {p('lang_id')} | {figure(r, 'ppl:en', layer):.2f} | "
                   f"{' | '.join(icl)} |")
    return "\n".join(out)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] not in ("seeds", "icl", "plot", "ablations") or (argv[0] == "plot" and len(argv) < 3):
        sys.exit(__doc__.strip())
    if argv[0] == "plot":
        if not plot_gap(argv[1], argv[2:]):
            sys.exit("results.py: plot needs matplotlib (pip install matplotlib)")
        return
    print({"seeds": seeds_table, "icl": icl_table, "ablations": ablation_table}[argv[0]](argv[1:]))


if __name__ == "__main__":
    main()
