"""Shared by the test files: the import path, a one-thread fixture, random weights, and a small toy world."""
import sys
from pathlib import Path

import pytest
import torch

# the project is a flat directory of modules: make them importable however pytest is started
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import toyworld  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared/data"
SMALL_WORLD = dict(pretrain_words=40_000, n_eval_pairs=(30, 60), n_knowledge=(20, 40), n_sentiment=(20, 40), n_text_docs=4)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine threads that wait for each
    other make such tests many times slower: use one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_weights_(model, std):
    """Every parameter random with O(1) scores (the init's tiny weights and zero biases hide bugs): matrices
    N(0, std), vectors N(0, 0.1), norm gains 1 + N(0, 0.1). In place; returns the model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std if p.dim() > 1 else 0.1)
    return model


def write(path, text):
    """Write str (UTF-8) or bytes to path; returns the path."""
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


@pytest.fixture(scope="session")
def world():
    """A small toy world (SMALL_WORLD), shared by the data and toyworld tests."""
    return toyworld.build_world(toyworld.WorldConfig(**SMALL_WORLD))


@pytest.fixture(scope="session")
def world_dir(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    toyworld.write_world(world, out)
    return out
