"""Tests for train.py: tiny runs of both stages, checkpoints, exact resume after Ctrl-C, the NaN stop,
2 processes (gloo) against 1, and bad arguments. Runs call train.main(argv) in-process where they can."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import config
import data
import hf
import toyworld
import train
import xalign
from conftest import REPO as ROOT
from model import Decoder, ModelConfig, load_model

TINY = ["--preset", "tiny", "--no-eval"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One tiny toy world for every run here (as `python train.py --preset tiny` would build it)."""
    out = tmp_path_factory.mktemp("world")
    cfg = toyworld.WorldConfig(seed=0, pretrain_words=config.PRESETS["tiny"]["world_words"], **config.TINY_WORLD)
    toyworld.write_world(toyworld.build_world(cfg), out)
    return str(out)


@pytest.fixture(scope="module")
def run_dir(world, tmp_path_factory):
    """A complete tiny run: pretrain then align."""
    out = tmp_path_factory.mktemp("run")
    train.main([*TINY, "--data-dir", world, "--out", str(out)])
    return out


def read_json(path):
    return json.loads(Path(path).read_text())


def weights(ckpt):
    return torch.load(Path(ckpt) / "model.pt", weights_only=True)


def digest(ckpt):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(ckpt).iterdir())}


def at_step(monkeypatch, n, action):
    """Call action(losses, grad_norm, tokens, flops) on what training step n (1-based, counted over the whole stage)
    computed, before its update; its return value is what the loop sees."""
    real = train.forward_backward

    def patched(fwd, stage, cfg, env, step):
        out = real(fwd, stage, cfg, env, step)
        return action(*out) if step + 1 == n else out
    monkeypatch.setattr(train, "forward_backward", patched)


def interrupt_at(monkeypatch, n):
    """A real SIGINT (Ctrl-C) during step n: the run saves a resumable checkpoint at the end of that step."""
    at_step(monkeypatch, n, lambda *out: (os.kill(os.getpid(), signal.SIGINT), out)[1])


def nan_at(monkeypatch, n):
    """A NaN loss at step n."""
    at_step(monkeypatch, n, lambda losses, *rest: ({**losses, "loss": float("nan")}, *rest))


def run_interrupted(monkeypatch, argv, n):
    """train.main(argv) stopped by Ctrl-C during step n."""
    with monkeypatch.context() as m, pytest.raises(train.Interrupted, match="--resume"):
        interrupt_at(m, n)
        train.main(argv)


# -----------------------------------------------------------------------------
# checkpoints and logs of a tiny run

def test_tiny_run_writes_valid_checkpoints(run_dir):
    steps = dict(pretrain=config.PRESETS["tiny"]["pretrain_steps"], align=config.PRESETS["tiny"]["align_steps"])
    for stage, name in train.STAGE_DIR.items():
        best, last = run_dir / name, run_dir / f"{name}.last"
        assert {f.name for f in best.iterdir()} == {"config.json", "model.pt", "tokenizer.json"}
        assert {f.name for f in last.iterdir()} == {"config.json", "model.pt", "tokenizer.json", "state.pt"}
        meta = read_json(best / "config.json")
        assert meta["stage"] == stage and 1 <= meta["step"] <= steps[stage] and math_finite(meta["dev_loss"])
        assert meta["train"]["preset"] == "tiny" and Path(meta["data_dir"]).is_dir()
        assert read_json(last / "config.json")["step"] == steps[stage]
        model = load_model(best)  # model.pt loads with weights_only=True
        tok = data.load_tokenizer(best / "tokenizer.json")
        assert model.cfg.vocab_size == tok.get_vocab_size()
        ids = torch.tensor([[data.BOS] + tok.encode("Kalib sells the red apple.").ids])
        assert torch.isfinite(model(ids).logits).all()
        state = torch.load(last / "state.pt", weights_only=True)
        assert state["step"] == steps[stage] and {"optimizer", "scheduler", "rng"} <= set(state)
    assert not any(p.suffix in (".tmp", ".old") for p in run_dir.iterdir())  # no half-written ones
    base, aligned = weights(run_dir / "base"), weights(run_dir / "aligned")
    assert any(not torch.equal(base[k], aligned[k]) for k in base)

    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    train_steps = [r for r in records if "loss" in r]
    assert {r["stage"] for r in train_steps} == {"pretrain", "align"}
    assert all({"lr", "tok_s", "grad_norm", "tokens"} <= set(r) for r in train_steps)
    assert all({"contrastive", "instruction"} <= set(r) for r in train_steps if r["stage"] == "align")
    assert any("dev_loss" in r and r["stage"] == "align" for r in records)
    share = [r for r in records if "alignment_share" in r][-1]
    assert share["alignment_tokens"] == read_json(run_dir / "aligned.last" / "config.json")["tokens"]
    cost = [r for r in records if "alignment_flops_share" in r][-1]
    assert cost["pretrain_flops"] == read_json(run_dir / "base.last" / "config.json")["flops"] > 0
    assert cost["alignment_flops_share"] == pytest.approx(cost["alignment_flops"] / cost["pretrain_flops"])


def test_replay_adds_a_weighted_lm_loss_on_the_base_models_pretraining_text(world, run_dir, tmp_path):
    """Replay is on by default (not in the paper). With your own alignment data (here a TSV) and no --text, it
    replays the text that the --init model was pretrained on: its toy world, named in its config.json."""
    pairs = str(Path(world) / "pairs" / "en-xb.dev.tsv")
    args = [*TINY, "--stage", "align", "--init", str(run_dir / "base"), "--pairs", pairs]
    train.main([*args, "--out", str(tmp_path / "replay"), "--replay-weight", "2.0", "--replay-batch-size", "3"])
    train.main([*args, "--out", str(tmp_path / "plain"), "--replay-weight", "0"])
    records, plain = ([json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
                      for run in ("replay", "plain"))
    steps = [r for r in records if r.get("stage") == "align" and "loss" in r]
    assert steps and all("replay" in r for r in steps) and any("dev_replay" in r for r in records)
    for r in steps:  # the tiny preset keeps the paper's weights 1.0 and 1.5
        assert r["replay"] > 0 and abs(r["loss"] - (r["contrastive"] + 1.5 * r["instruction"] + 2.0 * r["replay"])) < 1e-4
    assert not any("replay" in r or "dev_replay" in r for r in plain)  # --replay-weight 0: the paper's loss
    for r in (r for r in plain if r.get("stage") == "align" and "loss" in r):
        assert abs(r["loss"] - (r["contrastive"] + 1.5 * r["instruction"])) < 1e-4
    # each step also ran 3 pretraining blocks: more tokens than the same alignment without replay
    tokens = lambda recs: [r for r in recs if "alignment_tokens" in r][-1]["alignment_tokens"]
    assert tokens(records) > tokens(plain)


def math_finite(x):
    return x == x and abs(x) != float("inf")


# -----------------------------------------------------------------------------
# Ctrl-C, resume, NaN

@pytest.mark.parametrize("stage", ["pretrain", "align"])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(stage, world, run_dir, tmp_path, monkeypatch):
    args = [*TINY, "--data-dir", world, "--stage", stage, f"--{stage}-steps", "12", "--eval-every", "5"]
    if stage == "align":
        args += ["--init", str(run_dir / "base")]
    last = f"{train.STAGE_DIR[stage]}.last"
    train.main([*args, "--out", str(tmp_path / "a")])
    run_interrupted(monkeypatch, [*args, "--out", str(tmp_path / "b")], 7)
    assert read_json(tmp_path / "b" / last / "config.json")["step"] == 7
    train.main([*args, "--out", str(tmp_path / "b"), "--resume"])
    a, b = weights(tmp_path / "a" / last), weights(tmp_path / "b" / last)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    opt_a = torch.load(tmp_path / "a" / last / "state.pt", weights_only=True)["optimizer"]["state"]
    opt_b = torch.load(tmp_path / "b" / last / "state.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])
    best_a, best_b = weights(tmp_path / "a" / train.STAGE_DIR[stage]), weights(tmp_path / "b" / train.STAGE_DIR[stage])
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_never_runs_code_from_state_pt(world, tmp_path, monkeypatch):
    """state.pt holds tensors, numbers and lists only and loads with weights_only=True: one carrying a pickled
    callable is refused with a clear error, and the callable never runs."""
    args = [*TINY, "--data-dir", world, "--stage", "pretrain", "--eval-every", "5", "--out", str(tmp_path)]
    run_interrupted(monkeypatch, args, 5)
    state = tmp_path / "base.last/state.pt"
    torch.load(state, weights_only=True)                               # what we write loads safely
    marker = tmp_path / "ran"
    torch.save(dict(torch.load(state, weights_only=True), payload=Payload(str(marker))), state)
    with pytest.raises(hf.CheckpointError, match="state.pt does not load safely"):
        train.main([*args, "--resume"])
    assert not marker.exists()


def test_nan_loss_stops_and_leaves_the_last_checkpoint_untouched(world, tmp_path, monkeypatch):
    args = [*TINY, "--data-dir", world, "--stage", "pretrain", "--eval-every", "5", "--out", str(tmp_path)]
    run_interrupted(monkeypatch, args, 5)
    before = {d: digest(tmp_path / d) for d in ("base", "base.last")}
    nan_at(monkeypatch, 8)
    with pytest.raises(train.Diverged, match=r"non-finite loss nan .* at step 8; .*base\.last is untouched"):
        train.main([*args, "--resume"])
    assert {d: digest(tmp_path / d) for d in ("base", "base.last")} == before


# -----------------------------------------------------------------------------
# 2 processes

def torchrun_2(args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                        str(ROOT / "train.py"), *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def assert_same_weights(a, b, atol=1e-5):
    one, two = weights(a), weights(b)
    for k in one:
        if k.endswith("attn.k.bias"):  # its gradient is 0 up to rounding (softmax ignores a shift shared by all
            continue                  # keys), and Adam turns rounding noise into steps of size ~lr
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{a} {k}: {m}")


def last_train_record(run, stage):
    records = [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("stage") == stage and "loss" in r][-1]


def test_two_processes_match_one(world, tmp_path):
    """torchrun with 2 gloo processes sees the global batches of 1 process, split in two: the same training.
    Losses are per-process means that DDP averages, equal to the global mean only when both processes hold as
    many tokens: seed 1 draws no part-filled last block in these pretraining steps (Adam's first steps are nearly
    sign(gradient), so even a small gradient difference moves weights by up to 2 * lr), and the instruction
    term's token count varies (as in HF's Trainer), so with it the align stage agrees only closely."""
    args = [*TINY, "--data-dir", world, "--seed", "1", "--pretrain-steps", "4", "--align-steps", "3",
            "--replay-weight", "0"]  # the paper's loss; the replayed blocks are pretraining's, tested above
    torchrun_2([*args, "--out", str(tmp_path / "two")])
    train.main([*args, "--out", str(tmp_path / "one")])
    assert read_json(tmp_path / "two" / "base.last" / "config.json")["tokens"] == 4 * 8 * 64  # full blocks only
    assert_same_weights(tmp_path / "one" / "base.last", tmp_path / "two" / "base.last")
    one, two = last_train_record(tmp_path / "one", "align"), last_train_record(tmp_path / "two", "align")
    assert one["tokens"] == two["tokens"] and abs(one["contrastive"] - two["contrastive"]) < 1e-2 * one["contrastive"]
    assert abs(one["grad_norm"] - two["grad_norm"]) < 1e-2 * one["grad_norm"]

    # the contrastive term alone is exact: negatives gathered from both processes (and unused blocks skipped)
    args = [*TINY, "--data-dir", world, "--seed", "1", "--stage", "align", "--align-steps", "3", "--instruction-weight", "0"]
    torchrun_2([*args, "--init", str(tmp_path / "two" / "base"), "--out", str(tmp_path / "two_cl")])
    train.main([*args, "--init", str(tmp_path / "one" / "base"), "--out", str(tmp_path / "one_cl")])
    assert_same_weights(tmp_path / "one_cl" / "aligned.last", tmp_path / "two_cl" / "aligned.last")


# -----------------------------------------------------------------------------
# bad arguments: a clear error before any work

@pytest.fixture(scope="module")
def broken_ckpt(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("broken")
    for f in ("model.pt", "tokenizer.json"):
        (out / f).write_bytes((run_dir / "base" / f).read_bytes())
    (out / "config.json").write_text('{"model": {"n_layer": 2, "d_model": 32, "flavour": "gpt"}}')
    other = tmp_path_factory.mktemp("mismatch")  # a config.json whose model is not the one in model.pt
    for f in ("model.pt", "tokenizer.json"):
        (other / f).write_bytes((run_dir / "base" / f).read_bytes())
    meta = read_json(run_dir / "base" / "config.json")
    meta["model"]["d_model"] = 64
    (other / "config.json").write_text(json.dumps(meta))
    orphan = tmp_path_factory.mktemp("orphan")  # a good checkpoint whose pretraining text is not on this machine
    for f in ("model.pt", "tokenizer.json"):
        (orphan / f).write_bytes((run_dir / "base" / f).read_bytes())
    meta = read_json(run_dir / "base" / "config.json")
    (orphan / "config.json").write_text(json.dumps({**meta, "data_dir": "/no/such/world"}))
    return out, other, orphan


@pytest.mark.parametrize("argv, message", [
    (["--align-lr", "-1"], "learning rate must be positive"),
    (["--pretrain-steps", "0"], "steps must be positive"),
    (["--temperature", "0"], "temperature must be > 0"),
    (["--warmup-ratio", "1.5"], "warmup-ratio"),
    (["--layer", "3"], "--layer 3 is out of range for a model of 2 blocks"),
    (["--n-head", "3"], "not divisible by n_head"),
    (["--contrastive-weight", "0", "--instruction-weight", "0"], "nothing to train"),
    (["--text", "/no/such.txt"], "no such file"),
    (["--bactrian", "en.json"], "lang=path"),
    (["--init", "{base}"], "--init is for --stage align"),
    (["--stage", "align", "--init", "/no/such/ckpt"], "not a checkpoint directory"),
    (["--stage", "align"], "run --stage pretrain with this --out first"),
    (["--stage", "align", "--init", "{base}", "--layer", "5"], "out of range"),
    (["--stage", "align", "--init", "{base}", "--max-len", "4096"], "exceeds the init model's max_seq_len"),
    (["--stage", "align", "--init", "{broken}"], "incompatible config.json"),
    (["--stage", "align", "--init", "{mismatch}"], "model.pt does not match"),
    (["--data-dir", "{base}"], "not a toy world"),
    (["--device", "gpu0"], "is not a device"),
    (["--replay-weight", "-1"], "--replay-weight -1.0 must be >= 0"),
    (["--stage", "align", "--init", "{orphan}", "--pairs", "{pairs}"], "names no pretraining text that exists here"),
    (["--stage", "align", "--init", "{orphan}"], "names no pretraining text that exists here"),   # toy alignment data too
])
def test_bad_values_fail_before_any_work(argv, message, run_dir, broken_ckpt, world, tmp_path):
    argv = [a.format(base=run_dir / "base", broken=broken_ckpt[0], mismatch=broken_ckpt[1], orphan=broken_ckpt[2],
                     pairs=Path(world) / "pairs" / "en-xb.dev.tsv") for a in argv]
    out = tmp_path / "out"
    with pytest.raises(train.ConfigError, match=message.replace("[", r"\[")):
        train.main([*TINY, *argv, "--out", str(out)])
    assert not out.exists()


def test_command_line_errors_and_help():
    cases = [(["--bogus"], 2, "unrecognized arguments: --bogus"),
             (["--stage", "align", "--init", "/no/such/ckpt"], 2, "train.py: error: --init /no/such/ckpt: not a "
                                                                   "checkpoint directory"),
             (["--help"], 0, "--cross-probability")]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv, "--out", "/nonexistent/never"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for argv, _, _ in cases]
    for p, (argv, code, message) in zip(procs, cases):
        out, err = p.communicate(timeout=120)
        assert p.returncode == code and message in out + err, (argv, p.returncode, err[-2000:])
    assert not Path("/nonexistent/never").exists()


def test_bad_input_files_stop_the_run_before_pretraining(world, tmp_path):
    """Every input file is read before any work: a bad row of an alignment file stops --stage all before the
    base model is trained; empty or degenerate inputs get one clear message, not a crash inside numpy."""
    good = "".join(f"the cat {i}.\tdie Katze {i}.\n" for i in range(20))
    files = {"bad.tsv": good + "only one column\n", "empty.tsv": "", "one.txt": "a single document\n",
             "two.txt": "the cat sat.\n\nthe dog ran.\n",
             "empty.jsonl": "", "en.json": "[]"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    cases = [
        (["--text", "{two.txt}", "--pairs", "{bad.tsv}"], r"bad.tsv:21: expected 2 tab-separated columns"),
        (["--text", "{one.txt}"], r"one.txt: 1 document\(s\)"),
        (["--stage", "align", "--init", "{base}", "--pairs", "{empty.tsv}"], r"empty.tsv: no rows in the file"),
        (["--stage", "align", "--init", "{base}", "--afp-jsonl", "{empty.jsonl}"], r"empty.jsonl: no rows"),
        (["--bactrian", "en={en.json}"], "--bactrian needs two languages or more"),
        (["--align-batch-size", "1", "--align-pair-batch-size", "0"], "needs 2 pairs or more a step"),
    ]
    base = tmp_path / "run"
    train.main([*TINY, "--data-dir", world, "--stage", "pretrain", "--pretrain-steps", "2", "--out", str(base)])
    for argv, message in cases:
        for key, path in [("{base}", base / "base")] + [("{%s}" % k, tmp_path / k) for k in files]:
            argv = [a.replace(key, str(path)) for a in argv]
        out = tmp_path / "out"
        with pytest.raises(train.ConfigError, match=message):
            train.main([*TINY, *argv, "--out", str(out)])
        assert not (out / "base").exists() and not (out / "aligned").exists()


def test_a_non_finite_gradient_stops_the_run_too(world, tmp_path, monkeypatch):
    args = [*TINY, "--data-dir", world, "--stage", "pretrain", "--eval-every", "5", "--out", str(tmp_path)]
    at_step(monkeypatch, 2, lambda losses, grad_norm, *rest: (losses, float("inf"), *rest))
    with pytest.raises(train.Diverged, match=r"\(grad norm inf\) at step 2"):
        train.main(args)


def test_resume_reads_flags_saved_under_their_old_names(tmp_path):
    """A run saved before --cl-weight became --contrastive-weight: its value still counts."""
    (tmp_path / "aligned.last").mkdir()
    (tmp_path / "aligned.last/config.json").write_text(json.dumps({"train": {"cl_weight": 0.5}}))
    cfg = config.parse_config(["--stage", "align", "--init", str(tmp_path), "--out", str(tmp_path), "--resume"])
    with pytest.raises(config.ConfigError, match="--contrastive-weight was 0.5 when"):
        config.check_resume(cfg)


def test_divergence_before_the_first_save_says_so(world, tmp_path, monkeypatch):
    args = [*TINY, "--data-dir", world, "--stage", "pretrain", "--eval-every", "5", "--out", str(tmp_path)]
    nan_at(monkeypatch, 3)
    with pytest.raises(train.Diverged, match=r"at step 3; .*No checkpoint was saved before it \(the first comes at "
                                             r"step 5\)"):
        train.main(args)


def test_resume_takes_a_new_learning_rate_and_refuses_other_changes(world, tmp_path, monkeypatch):
    args = [*TINY, "--data-dir", world, "--stage", "pretrain", "--pretrain-steps", "12", "--eval-every", "5",
            "--log-every", "1", "--out", str(tmp_path)]
    run_interrupted(monkeypatch, args, 5)
    with pytest.raises(train.ConfigError, match=r"--pretrain-batch-size was 8 when .*base.last was saved, now 4"):
        train.main([*args, "--resume", "--pretrain-batch-size", "4"])
    with pytest.raises(train.ConfigError, match=r"--world-words was 20000 .* now 1500000 \(the preset was 'tiny'"):
        train.main([*args[2:], "--resume"])                                       # the preset dropped
    moved = [*args[:-1], str(tmp_path) + "/", "--log-every", "2", "--temperature", "0.1"]  # the same run, and an
                                                                                           # align flag: free here
    config.check_resume(config.parse_config([*moved, "--resume"]))
    train.main([*args, "--resume", "--pretrain-lr", "1e-4"])
    cfg = train.parse_config(args)
    warmup = -(-cfg.warmup_ratio * 12 // 1)
    logged = {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines())
              if "lr" in r}
    for step in (6, 12):                                       # the lr that optimizer step `step` used
        want = 1e-4 * train.lr_factor(step - 1, 12, int(warmup), cfg.min_lr_ratio)
        assert logged[step] == pytest.approx(want, rel=1e-9)
    assert read_json(tmp_path / "base.last/config.json")["train"]["pretrain_lr"] == 1e-4   # config.json agrees


def test_a_crashed_save_is_recovered_and_its_leftovers_removed(world, tmp_path, monkeypatch):
    """A crash between save_checkpoint's two renames leaves base.old and no base (best or last alike), and a
    half-written base.tmp: the next run puts both checkpoints back and removes the leftovers."""
    args = [*TINY, "--data-dir", world, "--stage", "pretrain", "--eval-every", "5", "--out", str(tmp_path)]
    run_interrupted(monkeypatch, args, 5)
    for name in ("base", "base.last"):
        (tmp_path / name).rename(tmp_path / f"{name}.old")
        (tmp_path / f"{name}.tmp").mkdir()
    best = digest(tmp_path / "base.old")
    run_interrupted(monkeypatch, [*args, "--resume"], 6)
    assert read_json(tmp_path / "base.last/config.json")["step"] == 6          # resumed from the recovered step 5
    assert digest(tmp_path / "base") == best                                   # no dev evaluation since
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("base")) == ["base", "base.last"]


CLI_BAD_INPUTS = [
    (["train.py", "--stage", "align", "--init", "/no/such/ckpt", "--out", "{out}"], "not a checkpoint directory"),
    (["train.py", "--preset", "tiny", "--text", "{bom}", "--out", "{out}"], "byte-order mark"),
    (["train.py", "--align-lr", "-1", "--out", "{out}"], "learning rate must be positive"),
    (["eval.py", "/no/such/ckpt"], "not a checkpoint directory"),
    (["data.py", "check", "{bom}"], "byte-order mark"),
    (["data.py", "check", "/no/such.tsv"], "no such file"),
]


@pytest.mark.parametrize("argv, message", CLI_BAD_INPUTS)
def test_cli_bad_inputs_exit_2_with_one_line_and_no_traceback(argv, message, tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfthe cat sat.\n\nthe dog ran.\n")
    argv = [str(ROOT / argv[0])] + [a.replace("{bom}", str(bom)).replace("{out}", str(tmp_path / "o"))
                                    for a in argv[1:]]
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1 and message in lines[0], r.stderr


def test_cut_and_repeated_alignment_rows_are_reported(run_dir, tmp_path, capsys):
    pairs = tmp_path / "en-de.tsv"
    long = "word " * 80
    pairs.write_text("".join(f"the cat {i}.\tdie Katze {i}.\n" for i in range(30)) + "the cat 0.\tdie Katze 0.\n" * 4
                     + f"{long}\tkurz.\n" * 3)
    argv = [*TINY, "--stage", "align", "--init", str(run_dir / "base"), "--pairs", str(pairs), "--align-steps", "1",
            "--out", str(tmp_path / "o")]
    train_ex, _ = train.align_examples(train.parse_config(argv), None)
    want_long = sum(e.sent0 == long for e in train_ex)
    want_repeats = len(train_ex) - len({(e.sent0, e.sent1) for e in train_ex})
    assert want_long and want_repeats                            # the split keeps some of each in training
    train.main(argv)
    rep = next(json.loads(line) for line in (tmp_path / "o/log.jsonl").read_text().splitlines()
               if "repeated_pairs" in line)
    assert (rep["long_pairs"], rep["long_instruction_rows"], rep["repeated_pairs"]) == (want_long, want_long,
                                                                                         want_repeats)
    assert f"{want_long} pairs and {want_long} instruction rows are longer than --max-len 64" in capsys.readouterr().out


def test_help_shows_no_test_hooks_and_one_flag_per_setting(capsys):
    with pytest.raises(SystemExit, match="0"):
        train.main(["--help"])
    text = capsys.readouterr().out
    assert "python train.py --preset tiny" in text                # train.py's usage, not config.py's docstring
    assert "debug" not in text and "--steps" not in text and "--pretrain-steps" in text
    with pytest.raises(SystemExit, match="2"):                   # argparse: unrecognized arguments
        config.parse_config(["--steps", "5"])                  # the old shorthand is gone, not silently kept


def test_train_flops_counts_pair_rows_through_their_blocks_only():
    model = Decoder(ModelConfig(vocab_size=50, max_seq_len=32, n_layer=4, n_head=2, d_model=16))
    mask = lambda n, T, real: (torch.arange(T)[None, :] < torch.tensor(real)[:, None]).long()
    labels = torch.full((2, 10), -100)
    labels[0, 6:], labels[1, 4:7] = 5, 5                        # 4 + 3 scored (response) positions
    batch = dict(pair_ids=torch.zeros(4, 6, dtype=torch.long), pair_mask=mask(4, 6, [6, 5, 4, 6]),
                 instr_ids=torch.zeros(2, 10, dtype=torch.long), instr_mask=mask(2, 10, [10, 7]), instr_labels=labels,
                 input_ids=torch.zeros(3, 8, dtype=torch.long), attention_mask=mask(3, 8, [8, 8, 2]))
    head = 2 * 50 * 16                                          # forward FLOPs per token of the (tied) head
    one_block = (model.flops_per_token(6, training=False) - head) / 4
    instr = 17 * (model.flops_per_token(10) - 3 * head) + 7 * 3 * head   # the head runs where the loss is read
    want = instr + 18 * model.flops_per_token(8) + 21 * 3 * one_block * 1
    assert train.train_flops(model, batch, layer=1) == pytest.approx(want)
    assert train.train_flops(model, batch, layer=-1) == pytest.approx(want + 21 * 3 * one_block * 3)


def test_tiled_contrastive_loss_trains_like_the_plain_one(run_dir, tmp_path, monkeypatch):
    """--contrastive-tile-size computes the same loss and gradients in tiles (xalign.info_nce(tile_size=)):
    the same run in tiles of 5 pairs (which do not divide the 16 of a step) ends with the same weights."""
    args = [*TINY, "--stage", "align", "--init", str(run_dir / "base"), "--align-steps", "3",
            "--align-pair-batch-size", "16"]
    train.main([*args, "--out", str(tmp_path / "plain")])
    calls, real = [], xalign.tiled_cross_entropy
    monkeypatch.setattr(xalign, "tiled_cross_entropy", lambda *a, tile_size: calls.append(tile_size) or real(*a, tile_size))
    train.main([*args, "--out", str(tmp_path / "tiled"), "--contrastive-tile-size", "5"])
    assert calls and set(calls) == {5}                          # the tiled path ran, with the flag's tile size
    plain, tiled = last_train_record(tmp_path / "plain", "align"), last_train_record(tmp_path / "tiled", "align")
    assert tiled["contrastive"] == pytest.approx(plain["contrastive"], rel=1e-5)
    assert_same_weights(tmp_path / "plain" / "aligned.last", tmp_path / "tiled" / "aligned.last", atol=1e-5)
