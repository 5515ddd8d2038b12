"""The toy family's network and its weights file, shared by the family (training) and its
service (copied into the bento beside ``service.py``): an MLP over numeric features."""

from __future__ import annotations

import json
from pathlib import Path

WEIGHTS = "model.safetensors"
LABELS = "labels.json"


def make_net(n_in: int, hidden: int, n_out: int):
    import torch

    return torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, n_out))


def save_net(net, labels: list[str], folder: Path) -> None:
    """Weights as safetensors, labels as JSON (never pickle)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / WEIGHTS))
    (folder / LABELS).write_text(json.dumps(labels), "utf-8")


def load_net(weights: Path, labels: Path):
    """(net in eval mode, labels); the layer sizes come from the weights' shapes."""
    from safetensors.torch import load_file

    state = load_file(str(weights))
    hidden, n_in = state["0.weight"].shape
    net = make_net(int(n_in), int(hidden), int(state["2.weight"].shape[0]))
    net.load_state_dict(state)
    return net.eval(), json.loads(Path(labels).read_text("utf-8"))


def probabilities(net, rows) -> list[list[float]]:
    import torch

    with torch.inference_mode():
        return torch.softmax(net(torch.as_tensor(rows, dtype=torch.float32)), -1).tolist()
