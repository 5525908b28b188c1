"""
checkpoint.py: a run's checkpoints, written so that a crash never leaves a half-written one, read back
without unpickling anything (weights_only=True), and the Ctrl-C that asks for one before stopping.

A checkpoint is a directory: config.json (model config and run metadata), model.pt (the state dict),
tokenizer.json, and, for the latest checkpoint of a stage, state.pt (optimizer, scheduler, random states and
progress) from which --resume continues.
"""

import json
import os
import random
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from model import CheckpointError


def save_checkpoint(path, model, tokenizer, meta, state=None):
    """model.pt, config.json (meta), tokenizer.json and state.pt (when given) in the directory path, atomically."""
    tmp = fresh_tmp(path)
    torch.save(model.state_dict(), tmp / "model.pt")
    (tmp / "config.json").write_text(json.dumps(meta, indent=1))
    tokenizer.save(tmp / "tokenizer.json")
    if state is not None:
        torch.save(state, tmp / "state.pt")
    swap_in(tmp, path)


def fresh_tmp(path):
    """An empty <path>.tmp to write a directory's new content into before swap_in."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def swap_in(tmp, path):
    """Make the written directory tmp the directory path: fsync it, then swap: a crash leaves the old content
    or the new one (at <path>.old between the two renames, where recover_checkpoint finds it)."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    for f in [*tmp.iterdir(), tmp]:
        fsync(f)
    if path.exists():
        os.replace(path, old)  # a directory cannot be renamed over a non-empty one: move the old one aside
    os.replace(tmp, path)
    fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def recover_checkpoint(path):
    """Undo what a crash inside save_checkpoint left: the checkpoint at <path>.old goes back, a half-written
    <path>.tmp goes away."""
    old = path.with_name(path.name + ".old")
    if old.exists() and not path.exists():
        os.replace(old, path)
    for leftover in (old, path.with_name(path.name + ".tmp")):
        shutil.rmtree(leftover, ignore_errors=True)


def rng_state():
    """Every random state as tensors, numbers and lists, so that state.pt loads with weights_only=True."""
    version, mt, gauss = random.getstate()
    key, keys, pos, has_gauss, cached = np.random.get_state()
    return dict(python=[version, list(mt), gauss], numpy=[key, torch.from_numpy(keys.astype(np.int64)), pos,
                                                         has_gauss, cached],
                torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(s):
    version, mt, gauss = s["python"]
    random.setstate((version, tuple(mt), gauss))
    key, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((key, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def load_state(ckpt_dir):
    """state.pt of ckpt_dir: tensors, numbers, strings, lists and dicts only; a pickled object is refused, never run."""
    path = Path(ckpt_dir) / "state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several kinds for a truncated or foreign file
        raise CheckpointError(f"--resume: {path} does not load safely (weights_only): not a state file of this project, "
                          "or one written before xalign stored its random state as tensors and lists, which cannot "
                          f"be resumed: start the stage again ({type(e).__name__})") from None


class Interrupted(KeyboardInterrupt):
    """Ctrl-C: a resumable checkpoint was saved."""


class StopFlag:
    """Ctrl-C (or SIGTERM) during training asks for a checkpoint at the end of the step; a second one quits at
    once. Every rank must agree to stop, at the same step."""

    def __init__(self):
        self.requested, self.old_handlers = False, {}

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"\n{signal.Signals(signum).name}: saving a resumable checkpoint after this step "
                   "(again to quit without saving)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # where Python delivers signals
            self.old_handlers = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.old_handlers.items():
            signal.signal(s, handler)

    def agreed(self, env):
        flag = torch.tensor([float(self.requested)], device=env.device)
        if env.ddp:
            dist.all_reduce(flag)
        return flag.item() > 0
