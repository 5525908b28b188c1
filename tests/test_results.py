import json
import statistics

import pytest

import results


def fake_eval(p1, ppl, en_acc, other_acc, lang_id=0.5, se=0.02):
    """An evaluate() dict with the keys results.py reads; every figure from the arguments."""
    per = lambda en: {**({"en": {"acc": en_acc, "acc_se": se}} if en else {}), "xa": {"acc": other_acc, "acc_se": se},
                      "xb": {"acc": other_acc + 0.1, "acc_se": 2 * se}, "avg": {"acc": 0.0}}
    mc = {task: {f"{s}_{k}shot": per(s == "in") for s in ("in", "cross") for k in (0, 5)}
          for task in ("knowledge", "sentiment")}
    pairs = {x: {"p1_en_xx": [0.0, p1, 0.0], "p1_xx_en": [0.0, p1 / 2, 0.0]} for x in ("xa", "xb", "xc")}
    return {"mc": mc, "repr": {"pairs": pairs, "lang_id_acc": [0.9, lang_id, 0.9]},
            "ppl": {"en": {"ppl": ppl}, "xb": {"ppl": 2 * ppl}}}


def write_run(path, res, **train):
    (path / "aligned").mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(res))
    (path / "aligned" / "config.json").write_text(json.dumps({"train": {"layer": 1, **train}}))
    return path


def test_seeds_table_is_mean_and_sample_std(tmp_path):
    p1s, ppls = [0.5, 0.7, 0.9], [6.0, 7.0, 9.0]
    dirs = [write_run(tmp_path / f"s{i}", {"base": fake_eval(0.01, 5.0, 0.6, 0.3),
                                           "aligned": fake_eval(p, q, 0.5, 0.4)})
            for i, (p, q) in enumerate(zip(p1s, ppls))]
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in results.seeds_table(dirs).splitlines()[2:]}
    assert rows["P@1 en→xb, aligned layer"][1] == f"{statistics.mean(p1s):.3f} ± {statistics.stdev(p1s):.3f}"
    assert rows["P@1 xb→en, aligned layer"][1] == f"{statistics.mean(p1s) / 2:.3f} ± {statistics.stdev(p1s) / 2:.3f}"
    assert rows["English perplexity"][2].startswith(f"{statistics.mean(ppls) - 5.0:.2f} ± ")
    # gap: English in-language minus the mean of xa (0.4) and xb (0.5)
    assert rows["sentiment 5-shot in-language gap (en − others)"][1] == "0.050 ± 0.000"
    assert rows["sentiment 5-shot cross-lingual gap (en in-language − others)"][0] == "0.250 ± 0.000"


def test_icl_table_per_run_with_standard_errors(tmp_path):
    dirs = [write_run(tmp_path / f"s{i}", {"base": fake_eval(0.01, 5.0, 0.9, 0.3),
                                           "aligned": fake_eval(0.9, 5.0, 0.88, 0.3 + d, se=0.01)})
            for i, d in enumerate([0.05, 0.1])]
    lines = results.icl_table(dirs).splitlines()
    row = next(line for line in lines if line.startswith("| sentiment | in 5-shot | s1 |")).split(" | ")
    assert row[3:5] == ["0.900 ± 0.020", "0.880 ± 0.010"]
    # the others' mean: xa and xb (0.3, 0.4 -> 0.35); its SE from theirs: sqrt(0.02² + 0.04²) / 2
    assert row[5] == f"0.350 ± {(0.02 ** 2 + 0.04 ** 2) ** 0.5 / 2:.3f}"
    se_b, se_a = (0.02 ** 2 + 0.04 ** 2) ** 0.5 / 2, (0.01 ** 2 + 0.02 ** 2) ** 0.5 / 2
    assert row[7] == f"0.100 ± {(se_b ** 2 + se_a ** 2) ** 0.5:.3f}"          # the change, SEs combined
    assert row[8] == "+0.550 → +0.430 |"                                      # en 0.9 - 0.35, 0.88 - 0.45
    mean = next(line for line in lines if line.startswith("| knowledge | cross 5-shot | mean ± std |")).split(" | ")
    assert mean[7] == f"0.075 ± {statistics.stdev([0.05, 0.1]):.3f}"


def test_plot_draws_or_says_what_is_missing(tmp_path, monkeypatch):
    dirs = [write_run(tmp_path / f"s{i}", {"base": fake_eval(0.01, 5.0, 0.9, 0.3), "aligned": fake_eval(0.9, 5.0, 0.9, 0.4)})
            for i in range(2)]
    try:
        import matplotlib  # noqa: F401
        assert results.plot_gap(tmp_path / "gap.png", dirs) and (tmp_path / "gap.png").read_bytes()[:4] == b"\x89PNG"
    except ImportError:
        pass
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)       # import matplotlib now fails
    assert results.plot_gap(tmp_path / "none.png", dirs) is False and not (tmp_path / "none.png").exists()
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        results.main(["plot", str(tmp_path / "none.png"), *map(str, dirs)])


def test_ablation_table_names_the_changed_flags(tmp_path):
    base = write_run(tmp_path / "seed0", {"base": fake_eval(0.01, 5.0, 0.6, 0.3), "aligned": fake_eval(0.8, 6.0, 0.5, 0.4)})
    abl = write_run(tmp_path / "abl", {"aligned": fake_eval(0.2, 9.0, 0.5, 0.4)}, contrastive_weight=1.0, clm_weight=0.0,
                    out="somewhere", seed=3, text=[], symmetric=True, pairs=["a.tsv", "b.tsv"],
                    device="cuda", replay_weight=1.0)
    lines = results.ablation_table([base, abl]).splitlines()[2:]
    assert lines[0].startswith("| seed0 base (no alignment) |  | 0.010 |")
    assert "--seed" not in lines[2] and "--device" not in lines[2]
    assert "--text" not in lines[2] and "--contrastive-weight" not in lines[2]  # [] is the default (), 1.0 too
    assert "| 9.00 |" in lines[2]
    assert "`--pairs a.tsv b.tsv --instruction-weight 0.0 --symmetric`" in lines[2]  # as a command line takes them,
                                                                  # clm_weight (a run saved before the rename) read anew
    assert "| `--replay-weight 0.0` |" in lines[1]  # seed0's config predates the flag: it ran without replay


def test_missing_results_names_the_file(tmp_path):
    (tmp_path / "aligned").mkdir()
    with pytest.raises(FileNotFoundError, match="results.json"):
        results.load_run(tmp_path)
