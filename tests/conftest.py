import sys
from pathlib import Path

import torch

# the project is a flat directory of modules: make them importable however pytest is started
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


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
