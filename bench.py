"""
bench.py: speed and memory of the hot paths, every figure measured in the same run.

    python bench.py [--device cpu|cuda] [--repeats 7] [--quick]
    python bench.py --tiled [--tile 1024] [--tiled-pairs 4096,16384,65536]    (the tiled-loss section alone)

Prints one markdown table:
  - the matmul peak of this device (a large square matmul), the reference for model FLOPs utilization (MFU);
  - pretrain and align steps (forward + backward + AdamW) at width 256: tokens/s and MFU;
  - the align step against the authors' way (the pair rows through every block and the output head, in a pass
    of their own) at 4 and 12 blocks: speed ratio, the matmul FLOPs ratio (the saving the skipped work predicts),
    largest difference in loss and gradients;
  - prefix-cached choice scoring against full-sequence scoring at 5-shot (eval.py): items/s, ratio, max diff;
  - the cached contrastive loss at 4,096 pairs against the plain one: peak memory, time, max gradient diff;
  - the tiled InfoNCE (info_nce(tile_size=...)) against the untiled one on the loss alone, (B, 256) embeddings
    at 4,096 / 16,384 / 65,536 pairs: peak memory above the process's baseline, time, max gradient diff, each
    configuration in a process of its own (the untiled one only where its (B, B) matrices fit);
  - with transformers installed (requirements-dev.txt; --no-real skips it): the align step at XGLM-564M's shape
    (random weights, 8 pairs of 64 tokens + 8 instruction rows of 128), ours against the authors' way in
    transformers (two passes, output_hidden_states, the full output head): tokens/s, the FLOPs ratio, and the
    step's peak memory above weights and gradients, each side in a process of its own.
Timings are medians over --repeats, and ratios are taken side by side (interleaved), never across runs.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import data
import xalign
from model import Decoder, ModelConfig


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved_times(fns, device, repeats, warmup=2):
    """Median time of each fn, the fns run in turn so that machine noise hits them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def matmul_peak(device, dtype, repeats):
    """FLOP/s of an n x n matmul: the best this device does on the op that dominates a transformer."""
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n ** 3 / median_time(lambda: a @ b, device, repeats)


def make_model(n_layer, device, vocab=2048, d_model=256, seq=256):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, max_seq_len=seq, n_layer=n_layer, n_head=4, d_model=d_model)
    return Decoder(cfg).to(device)


def align_workload(device, vocab=2048, n_pairs=16, pair_len=32, n_instr=16, instr_len=128, seed=0):
    """The fixed workload of the targets: 16 pairs of 32-token sentences, 16 instruction rows of 128 tokens,
    ragged lengths so that the padding paths are exercised."""
    g = torch.Generator().manual_seed(seed)
    pair_ids = torch.randint(3, vocab, (2 * n_pairs, pair_len), generator=g)
    pair_mask = torch.ones_like(pair_ids)
    pair_mask[1::3, pair_len * 3 // 4:] = 0
    instr_ids = torch.randint(3, vocab, (n_instr, instr_len), generator=g)
    instr_mask = torch.ones_like(instr_ids)
    instr_mask[1::4, instr_len * 7 // 8:] = 0
    labels = instr_ids.masked_fill(instr_mask == 0, -100)
    labels[:, : instr_len // 2] = -100                                  # the prompt half carries no loss
    batch = dict(pair_ids=pair_ids, pair_mask=pair_mask, instr_ids=instr_ids, instr_mask=instr_mask,
                 instr_labels=labels, pair_groups=torch.arange(n_pairs))
    return {k: v.to(device) for k, v in batch.items()}


def align_flops(model, batch):
    """Training FLOPs of one align step on `batch` (model.flops_per_token's accounting): (ours, the authors' way).
    Ours: the pair rows run forward and backward through the pooling layer's blocks only; on the instruction
    rows the head runs at response positions only. The authors' way: the pair rows run forward through every
    block and the head, but backward only below the pooling layer (nothing above it reaches the loss); the
    instruction rows run in full.
    Matmuls only (the softmax over skipped logits is not counted): the ratio is the saving that the skipped
    matmuls predict."""
    head = 2 * model.head.weight.numel()                     # forward FLOPs of the head per token
    T_pair, T_instr = batch["pair_ids"].shape[1], batch["instr_ids"].shape[1]
    block = lambda T: (model.flops_per_token(T, training=False) - head) / model.cfg.n_layer  # forward, one block
    n_pair, (n_rows, _) = batch["pair_ids"].numel(), batch["instr_ids"].shape
    at = xalign.scored_positions(batch["instr_labels"])
    k = xalign.AFPConfig().layer
    ours = (n_pair * 3 * k * block(T_pair)
            + n_rows * T_instr * (model.flops_per_token(T_instr) - 3 * head)
            + int(at.sum()) * 3 * head)
    authors = (n_pair * (model.flops_per_token(T_pair, training=False) + 2 * k * block(T_pair))
               + n_rows * T_instr * model.flops_per_token(T_instr))
    return ours, authors


def authors_afp_loss(model, batch, cfg=xalign.AFPConfig()):
    """The authors' way: the pair rows run through the whole decoder, output head included, in a pass of
    their own, and the pooling layer's output is picked afterwards."""
    B = batch["pair_ids"].shape[0] // 2
    out = model(batch["pair_ids"], batch["pair_mask"], output_hidden_states=True)
    z = xalign.pool(out.hidden_states[cfg.layer], batch["pair_mask"], cfg.pooling)
    contrastive = xalign.info_nce(z[:B], z[B:], cfg.temperature, groups=batch["pair_groups"])
    instruction = xalign.clm_loss(model(batch["instr_ids"], batch["instr_mask"]).logits, batch["instr_labels"])
    return cfg.contrastive_weight * contrastive + cfg.instruction_weight * instruction


def loss_and_grads(model, loss_fn, batch):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch)
    loss = loss.total if isinstance(loss, xalign.AFPLoss) else loss
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]


def bench_align(n_layer, device, repeats, autocast):
    model = make_model(n_layer, device)
    batch = align_workload(device)
    with autocast():
        loss_fast, g_fast = loss_and_grads(model, xalign.afp_loss, batch)
        loss_ref, g_ref = loss_and_grads(model, authors_afp_loss, batch)
        t_fast, t_ref = interleaved_times([lambda: loss_and_grads(model, xalign.afp_loss, batch),
                                           lambda: loss_and_grads(model, authors_afp_loss, batch)], device, repeats)
    grad_diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(g_fast, g_ref))
    flops_fast, flops_ref = align_flops(model, batch)
    return dict(n_layer=n_layer, speedup=t_ref / t_fast, flops_ratio=flops_ref / flops_fast,
                loss_diff=abs(loss_fast - loss_ref).item(),
                grad_diff=grad_diff, ms_fast=1e3 * t_fast, ms_authors=1e3 * t_ref)


def bench_train_step(stage, device, repeats, autocast, peak):
    """One optimizer step; tokens/s and MFU (model FLOPs from model.flops_per_token / matmul peak)."""
    model = make_model(4, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if stage == "pretrain":
        B, T = 16, 256
        ids = torch.randint(3, model.cfg.vocab_size, (B, T), device=device)
        tokens, flops = B * T, B * T * model.flops_per_token(T)
        loss_fn = lambda: xalign.clm_loss(model(ids).logits, ids)
    else:
        batch = align_workload(device)
        n_pair_tok, n_instr_tok = batch["pair_ids"].numel(), batch["instr_ids"].numel()
        tokens = n_pair_tok + n_instr_tok
        flops = align_flops(model, batch)[0]                # what afp_loss runs, not the full model
        loss_fn = lambda: xalign.afp_loss(model, batch).total

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn()
        loss.backward()
        opt.step()

    t = median_time(step, device, repeats)
    return dict(stage=stage, tokens_per_s=tokens / t, mfu=flops / t / peak)


def bench_eval(device, repeats, real_shape=False):
    """Prefix-cached against full-sequence choice scoring at 5 shots (eval.py's scorer), on the 4-block width-256
    model or (real_shape) on XGLM-564M's shape with random weights."""
    import eval as xeval
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    words = "the cat sat on a mat with one dog that ran far away from home today".split()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(words)] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = data.TextTokenizer(tok, data.BOS, data.EOS, data.PAD)
    if real_shape:
        import hf
        torch.manual_seed(0)
        model = Decoder(hf.config_from_hf(XGLM_564M)).to(device).eval()
    else:
        model = make_model(4, device, vocab=tok.get_vocab_size()).eval()
    g = torch.Generator().manual_seed(0)
    sentence = lambda n: " ".join(words[i] for i in torch.randint(len(words), (n,), generator=g).tolist())
    demos = "\n\n".join(f"{sentence(12)}, right? Yes, {sentence(12)}" for _ in range(5))
    n_items = 8 if real_shape else 16
    contexts = [f"{demos}\n\n{sentence(12)}, right?" for _ in range(n_items)]
    choices = [[f" Yes, {sentence(12)}", f" No, {sentence(12)}"] for _ in range(n_items)]
    run = lambda cache: xeval.logprobs_of_choices(model, tok, contexts, choices, batch_size=16, prefix_cache=cache)
    with torch.no_grad():
        cached, full = run(True), run(False)
        t_cached, t_full = interleaved_times([lambda: run(True), lambda: run(False)], device, repeats, warmup=1)
    diff = max(abs(a[0] - b[0]) for ca, cb in zip(cached, full) for a, b in zip(ca, cb))
    return dict(items_per_s_cached=n_items / t_cached, items_per_s_full=n_items / t_full,
                speedup=t_full / t_cached, max_diff=diff)


def rss_kb(field):
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in kB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:    # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        f.write("5")


def contrastive_child(mode, device_name, n_pairs, chunk):
    """Run in a subprocess: one plain or cached contrastive step at n_pairs; prints peak memory, time, grads."""
    device = torch.device(device_name)
    model = make_model(1, device, seq=32)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.cfg.vocab_size, (2 * n_pairs, 32), generator=g).to(device)
    mask = torch.ones_like(ids)
    embed = lambda i, m: xalign.pool(model(i, m, output_hidden_states=True, n_layers=1).hidden_states[1], m)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = rss_kb("VmRSS") * 1024
    t = time.perf_counter()
    if mode == "plain":
        loss = xalign.info_nce(embed(ids[:n_pairs], mask[:n_pairs]), embed(ids[n_pairs:], mask[n_pairs:]))
        loss.backward()
    else:
        loss = xalign.cached_info_nce(embed, (ids[:n_pairs], mask[:n_pairs]), (ids[n_pairs:], mask[n_pairs:]), chunk)
    sync(device)
    seconds = time.perf_counter() - t
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = rss_kb("VmHWM") * 1024 - base
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    torch.save(grads, os.environ["XALIGN_BENCH_GRADS"])
    print(json.dumps(dict(peak_bytes=peak, seconds=seconds, loss=loss.item())))


def bench_contrastive(device, n_pairs, chunk, repeats):
    """Plain vs cached contrastive step, each in a fresh process so that its peak memory is its own."""
    runs = {"plain": [], "cached": []}
    grads = {}
    for r in range(max(1, repeats // 3)):
        for mode in runs:
            path = f"/tmp/xalign_bench_grads_{os.getpid()}_{mode}.pt"
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--device", device.type,
                                  "--pairs", str(n_pairs), "--chunk", str(chunk)], capture_output=True, text=True,
                                 env={**os.environ, "XALIGN_BENCH_GRADS": path}, check=True)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            grads[mode] = torch.load(path)
            os.remove(path)
    med = lambda mode, key: statistics.median(r[key] for r in runs[mode])
    return dict(pairs=n_pairs, chunk=chunk, peak_mb_plain=med("plain", "peak_bytes") / 2**20,
                peak_mb_cached=med("cached", "peak_bytes") / 2**20,
                memory_ratio=med("cached", "peak_bytes") / med("plain", "peak_bytes"),
                s_plain=med("plain", "seconds"), s_cached=med("cached", "seconds"),
                grad_diff=(grads["plain"] - grads["cached"]).abs().max().item())


TILED_D = 256


def tiled_child(mode, n_pairs, tile, warm_steps):
    """Run in a subprocess: info_nce + backward on random (n_pairs, 256) fp32 embeddings, untiled (loss-plain)
    or tiled (loss-tiled). The peak is the resident set's high-water mark above the baseline taken after the
    inputs exist and a warm-up at 512 pairs (so: the loss, its graph, the backward and the gradients, not the
    kernels' code and buffers loaded on first use); the first step is cold, the time is the median of
    warm_steps more (the cold step's when there are none)."""
    tile = tile if mode == "loss-tiled" else None
    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, TILED_D, generator=g, requires_grad=True)
    xalign.info_nce(w, w.detach() + 1, tile_size=None if tile is None else min(tile, 128)).backward()
    x = torch.randn(n_pairs, TILED_D, generator=g)
    y = (x + torch.randn(n_pairs, TILED_D, generator=g)).requires_grad_()
    x.requires_grad_()
    reset_peak_rss()
    base = rss_kb("VmRSS") * 1024
    times = []
    for _ in range(1 + warm_steps):
        x.grad = y.grad = None                          # the last step's gradients are freed before the next
        t = time.perf_counter()
        loss = xalign.info_nce(x, y, tile_size=tile)
        loss.backward()
        times.append(time.perf_counter() - t)
    peak = rss_kb("VmHWM") * 1024 - base
    torch.save(torch.cat([x.grad, y.grad]), os.environ["XALIGN_BENCH_GRADS"])
    print(json.dumps(dict(peak_bytes=peak, base_bytes=base, seconds=statistics.median(times[1:] or times),
                          warm=len(times) > 1, loss=loss.item())))


def plain_fits(n_pairs):
    """The untiled loss keeps the (B, B) logits and their log-softmax for backward and builds their gradient:
    about 12 * B^2 bytes at the peak in fp32. Run it only where that stays under half the memory."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return 12 * n_pairs ** 2 < total / 2


def bench_tiled(pair_counts, tile, repeats):
    """Tiled vs untiled InfoNCE (loss + backward, CPU) at each pair count, each run in a fresh process; the
    two alternate, median over the rounds."""
    out = []
    for n in pair_counts:
        modes = ["loss-tiled"] + (["loss-plain"] if plain_fits(n) else [])
        warm = max(0, min(repeats, round(4e8 / n ** 2)))   # warm steps per process: several at 4,096, 1 at 16,384
        rounds = 2 if n <= 16384 else 1
        runs, grads = {m: [] for m in modes}, {}
        for _ in range(rounds):
            for mode in modes:
                path = f"/tmp/xalign_bench_grads_{os.getpid()}_{mode}.pt"
                res = subprocess.run([sys.executable, __file__, "--child", mode, "--device", "cpu", "--pairs",
                                      str(n), "--tile", str(tile), "--repeats", str(warm)], capture_output=True,
                                     text=True, env={**os.environ, "XALIGN_BENCH_GRADS": path}, check=True)
                runs[mode].append(json.loads(res.stdout.strip().splitlines()[-1]))
                grads[mode] = torch.load(path)
                os.remove(path)
        med = lambda mode, key: statistics.median(r[key] for r in runs[mode])
        row = dict(pairs=n, tile=tile, rounds=rounds, warm_steps=warm,
                   peak_mb_tiled=med("loss-tiled", "peak_bytes") / 2**20, s_tiled=med("loss-tiled", "seconds"),
                   base_mb=med("loss-tiled", "base_bytes") / 2**20)
        if "loss-plain" in runs:
            row.update(peak_mb_plain=med("loss-plain", "peak_bytes") / 2**20, s_plain=med("loss-plain", "seconds"),
                       grad_diff=(grads["loss-plain"] - grads["loss-tiled"]).abs().max().item(),
                       loss_diff=abs(med("loss-plain", "loss") - med("loss-tiled", "loss")))
        out.append(row)
    return out


def tiled_rows(figures):
    rows = []
    for t in figures:
        name = f"tiled vs untiled InfoNCE (CPU), {t['pairs']:,} pairs x {TILED_D}, tile {t['tile']}"
        us = lambda s: 1e6 * s / t["pairs"]                                                  # noqa: E731
        if "peak_mb_plain" in t:
            rows.append((name, f"peak above baseline {t['peak_mb_tiled']:,.0f} vs {t['peak_mb_plain']:,.0f} MB "
                         f"({t['peak_mb_tiled'] / t['peak_mb_plain']:.3f}x), "
                         f"{t['s_tiled']:.2f} vs {t['s_plain']:.2f} s "
                         f"({us(t['s_tiled']):.1f} vs {us(t['s_plain']):.1f} us/pair, "
                         f"{t['s_tiled'] / t['s_plain']:.2f}x), max diff loss {t['loss_diff']:.1e}, "
                         f"grads {t['grad_diff']:.1e}"))
        else:
            rows.append((name, f"peak above baseline {t['peak_mb_tiled']:,.0f} MB, {t['s_tiled']:.1f} s "
                         f"({us(t['s_tiled']):.1f} us/pair{'' if t['warm_steps'] else ', one cold step'}); untiled "
                         f"not run: its (B, B) fp32 matrices need ~12 B^2 = {12 * t['pairs'] ** 2 / 2**30:.0f} GiB"))
    return rows


# the published XGLM-564M config.json, dropout off so that both sides compute the same loss
XGLM_564M = dict(model_type="xglm", vocab_size=256008, max_position_embeddings=2048, d_model=1024, ffn_dim=4096,
                 num_layers=24, attention_heads=16, activation_function="gelu", scale_embedding=True,
                 dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1, decoder_start_token_id=2)


def real_workload(device, vocab):
    return align_workload(device, vocab=vocab, n_pairs=8, pair_len=64, n_instr=8, instr_len=128)


def transformers_afp_loss(model, batch, cfg=xalign.AFPConfig()):
    """The authors' way on a transformers model: the pairs in a pass of their own with output_hidden_states
    and the full head, then the instruction rows with logits at every position."""
    B = batch["pair_ids"].shape[0] // 2
    out = model(batch["pair_ids"], attention_mask=batch["pair_mask"], output_hidden_states=True)
    z = xalign.pool(out.hidden_states[cfg.layer], batch["pair_mask"], cfg.pooling)
    contrastive = xalign.info_nce(z[:B], z[B:], cfg.temperature, groups=batch["pair_groups"])
    logits = model(batch["instr_ids"], attention_mask=batch["instr_mask"]).logits
    return cfg.contrastive_weight * contrastive + cfg.instruction_weight * xalign.clm_loss(logits, batch["instr_labels"])


def real_child(mode, device_name, repeats):
    """Run in a subprocess: the align step at XGLM-564M's shape, ours (--child real-xalign) or the authors' way
    in transformers (real-transformers), the same random weights; prints tokens/s, peak memory, loss."""
    import hf
    import transformers
    device = torch.device(device_name)
    cfg = hf.config_from_hf(XGLM_564M)
    torch.manual_seed(0)
    model = Decoder(cfg)
    if mode == "real-transformers":
        ref = transformers.XGLMForCausalLM(transformers.XGLMConfig(**XGLM_564M))
        ref.load_state_dict(hf.state_to_hf(model), strict=False)          # lm_head: tied to the embeddings
        model, loss_fn = ref, transformers_afp_loss
    else:
        loss_fn = lambda m, b: xalign.afp_loss(m, b).total
    model = model.to(device).train()
    batch = real_workload(device, cfg.vocab_size)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else \
        (lambda: torch.autocast("cpu", enabled=False))

    def step():
        model.zero_grad(set_to_none=False)                               # gradients stay allocated
        with autocast():
            loss = loss_fn(model, batch)
        loss.backward()
        sync(device)
        return loss.item()
    loss = step()                                                        # warm-up; allocates the gradients
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = rss_kb("VmRSS") * 1024
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_kb("VmHWM") * 1024) - base
    tokens = int(batch["pair_mask"].sum() + batch["instr_mask"].sum())
    print(json.dumps(dict(tokens_per_s=tokens / statistics.median(times), s=statistics.median(times),
                          peak_bytes=peak, loss=loss)))


def bench_real(device, repeats):
    """Ours against the authors' way in transformers at XGLM-564M's shape, each side in a fresh process."""
    import hf
    runs = {}
    for mode in ("real-xalign", "real-transformers"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--device", device.type,
                              "--repeats", str(repeats)], capture_output=True, text=True, check=True)
        runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    with torch.device("meta"):                                         # counts only
        model = Decoder(hf.config_from_hf(XGLM_564M))
    ours, authors = align_flops(model, real_workload("cpu", model.cfg.vocab_size))
    x, t = runs["real-xalign"], runs["real-transformers"]
    return dict(tokens_per_s_ours=x["tokens_per_s"], tokens_per_s_transformers=t["tokens_per_s"],
                speedup=x["tokens_per_s"] / t["tokens_per_s"], flops_ratio=authors / ours,
                peak_mb_ours=x["peak_bytes"] / 2**20, peak_mb_transformers=t["peak_bytes"] / 2**20,
                memory_ratio=x["peak_bytes"] / t["peak_bytes"], loss_diff=abs(x["loss"] - t["loss"]))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per figure (median reported)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and 512 contrastive pairs (a smoke run)")
    p.add_argument("--pairs", type=int, default=4096, help="pairs for the cached-contrastive comparison")
    p.add_argument("--chunk", type=int, default=256, help="chunk size of the cached contrastive loss")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--no-real", action="store_true", help="skip the XGLM-564M-shape comparison with transformers")
    p.add_argument("--tiled", action="store_true", help="run only the tiled-InfoNCE section (CPU)")
    p.add_argument("--tile", type=int, default=1024, help="tile size of the tiled InfoNCE")
    p.add_argument("--tiled-pairs", default="4096,16384,65536", help="pair counts of the tiled-InfoNCE section")
    p.add_argument("--child", choices=["plain", "cached", "real-xalign", "real-transformers", "loss-plain",
                                       "loss-tiled"], help=argparse.SUPPRESS)
    return p.parse_args()


def measure(args, tiled_pairs):
    """Every figure of the default run, as a dict (also what --json writes)."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
        peak = matmul_peak(device, torch.bfloat16, args.repeats)
    else:
        autocast = lambda: torch.autocast("cpu", enabled=False)
        peak = matmul_peak(device, torch.float32, args.repeats)
    figures = dict(device=str(device), threads=torch.get_num_threads(), matmul_peak_gflops=peak / 1e9)
    figures["pretrain"] = bench_train_step("pretrain", device, args.repeats, autocast, peak)
    figures["align"] = bench_train_step("align", device, args.repeats, autocast, peak)
    figures["align_vs_authors"] = [bench_align(n, device, args.repeats, autocast) for n in (4, 12)]
    try:
        figures["eval"] = bench_eval(device, args.repeats)
    except ImportError as e:
        figures["eval"] = dict(error=f"eval.py not importable: {e}")
    figures["contrastive"] = bench_contrastive(device, args.pairs, args.chunk, args.repeats)
    figures["tiled"] = bench_tiled(tiled_pairs, args.tile, args.repeats)
    try:
        import transformers  # noqa: F401  (test-only: requirements-dev.txt)
        figures["real"] = None if args.no_real else bench_real(device, max(2, args.repeats // 2))
        figures["eval_real"] = None if args.no_real else bench_eval(device, 2, real_shape=True)
    except ImportError:
        figures["real"] = dict(error="transformers is not installed (pip install -r requirements-dev.txt)")
    return figures


def table_rows(f):
    """(figure, measured) rows of the markdown table, from measure()'s dict."""
    rows = [("matmul peak", f"{f['matmul_peak_gflops']:.1f} GFLOP/s ({f['device']}, {f['threads']} threads)")]
    for stage in ("pretrain", "align"):
        s = f[stage]
        rows.append((f"{stage} step, width 256, 4 blocks", f"{s['tokens_per_s']:,.0f} tokens/s, MFU {100 * s['mfu']:.0f}% of matmul peak"))
    for a in f["align_vs_authors"]:
        rows.append((f"align step vs authors' way, {a['n_layer']} blocks",
                     f"{a['speedup']:.2f}x ({a['ms_fast']:.1f} vs {a['ms_authors']:.1f} ms; FLOPs ratio "
                     f"{a['flops_ratio']:.2f}x), "
                     f"max diff loss {a['loss_diff']:.1e}, grads {a['grad_diff']:.1e}"))
    e = f["eval"]
    rows.append(("prefix-cached vs full scoring, 5-shot",
                 e.get("error") or f"{e['speedup']:.2f}x ({e['items_per_s_cached']:.1f} vs {e['items_per_s_full']:.1f} items/s), "
                                   f"max diff {e['max_diff']:.1e}"))
    c = f["contrastive"]
    rows.append((f"cached vs plain contrastive, {c['pairs']} pairs, chunk {c['chunk']}",
                 f"peak {c['peak_mb_cached']:.0f} vs {c['peak_mb_plain']:.0f} MB ({c['memory_ratio']:.3f}x), "
                 f"{c['s_cached']:.2f} vs {c['s_plain']:.2f} s, max grad diff {c['grad_diff']:.1e}"))
    rows += tiled_rows(f["tiled"])
    r = f["real"]
    if r is not None:
        rows.append(("align step at XGLM-564M's shape vs the authors' way in transformers",
                     r.get("error") or f"{r['speedup']:.2f}x ({r['tokens_per_s_ours']:,.0f} vs "
                     f"{r['tokens_per_s_transformers']:,.0f} tokens/s; FLOPs ratio {r['flops_ratio']:.2f}x), "
                     f"peak memory above weights and gradients {r['peak_mb_ours']:,.0f} vs "
                     f"{r['peak_mb_transformers']:,.0f} MB ({r['memory_ratio']:.2f}x), loss diff {r['loss_diff']:.1e}"))
    e = f.get("eval_real")
    if e is not None:
        rows.append(("prefix-cached vs full scoring, 5-shot, XGLM-564M's shape",
                     f"{e['speedup']:.2f}x ({e['items_per_s_cached']:.2f} vs {e['items_per_s_full']:.2f} items/s), "
                     f"max diff {e['max_diff']:.1e}"))
    return rows


def print_table(rows):
    print("| figure | measured |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


def main():
    args = parse_args()
    if args.child in ("real-xalign", "real-transformers"):
        return real_child(args.child, args.device, args.repeats)
    if args.child in ("loss-plain", "loss-tiled"):
        return tiled_child(args.child, args.pairs, args.tile, args.repeats)
    if args.child:
        return contrastive_child(args.child, args.device, args.pairs, args.chunk)
    tiled_pairs = [1024, 4096] if args.quick else [int(n) for n in args.tiled_pairs.split(",")]
    if args.tiled:
        figures = dict(tiled=bench_tiled(tiled_pairs, args.tile, args.repeats))
        print(f"CPU, {torch.get_num_threads()} threads; one-way InfoNCE, tau 0.05, loss + backward; peak = the child "
              "process's resident-set high-water mark minus its resident set once the inputs exist (after a warm-up "
              "at 512 pairs)\n")
        print_table(tiled_rows(figures["tiled"]))
    else:
        if args.quick:
            args.repeats, args.pairs = 3, 512
        figures = measure(args, tiled_pairs)
        print_table(table_rows(figures))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)


if __name__ == "__main__":
    main()
