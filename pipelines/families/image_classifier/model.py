"""The image model object: a network (``maas_nets``), its spec and its labels; safetensors I/O.

One file holds a whole model: ``model.safetensors`` with the spec and the labels in the
safetensors metadata (JSON strings), so a checkpoint can be fine-tuned from a single file and
the service and the MLflow pyfunc rebuild the network from it. Never pickle.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """The configured image checkpoint cannot be found or read (a config error, exit 2)."""


@dataclass
class ImageModel:
    """A network with what is needed to use it: ``spec`` (arch, in_channels, image_size,
    num_classes and sizes) and ``labels`` (class names in logit order)."""

    net: Any
    spec: dict[str, Any]
    labels: list[str]

    @property
    def channels(self) -> int:
        return int(self.spec["in_channels"])

    @property
    def image_size(self) -> int:
        return int(self.spec["image_size"])


def nets() -> Any:
    from bentos.image_classifier import maas_nets

    return maas_nets


def make_spec(arch: str, channels: int, image_size: int, num_classes: int,
              params: dict[str, Any]) -> dict[str, Any]:
    """The network spec: the architecture's defaults overridden by the trial's ``params``."""
    defaults = nets().DEFAULTS[arch]
    spec = {"arch": arch, "in_channels": channels, "image_size": image_size,
            "num_classes": num_classes}
    spec.update({k: type(v)(params[k]) if k in params else v for k, v in defaults.items()})
    return spec


def build(spec: dict[str, Any], labels: list[str], checkpoint: Path | None,
          seed: int = 0) -> ImageModel:
    """A new model of ``spec``, initialised from ``seed``; with ``checkpoint``, its weights
    loaded where the shapes match (a different class count re-initialises only the last layer,
    logged)."""
    import torch

    torch.manual_seed(seed)
    net = nets().build_net(spec)
    if checkpoint is not None:
        _load_matching(net, checkpoint)
    return ImageModel(net=net, spec=spec, labels=list(labels))


def read_checkpoint(path: Path) -> tuple[dict[str, Any], list[str]]:
    """(spec, labels) from a safetensors file's metadata; CheckpointError naming the file."""
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        raise CheckpointError(f"model.options.checkpoint: {path} is not a .safetensors file "
                              "(pickled weights are not loaded)")
    if not path.is_file():
        raise CheckpointError(f"model.options.checkpoint: file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta["maas.spec"]), json.loads(meta.get("maas.labels", "[]"))
    except KeyError:
        raise CheckpointError(f"model.options.checkpoint: {path} has no maas.spec metadata "
                              "(not saved by a MaaS image pipeline)") from None
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise CheckpointError(f"model.options.checkpoint: cannot read {path}: {exc}") from None


def _load_matching(net: Any, checkpoint: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(checkpoint))
    own = net.state_dict()
    keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(own) - set(keep))
    net.load_state_dict(keep, strict=False)
    if skipped:
        log.info("checkpoint %s: %d tensors re-initialised (shape differs or missing): %s",
                 checkpoint, len(skipped), ", ".join(skipped[:6]))


def save(model: ImageModel, folder: Path) -> Path:
    """``folder/model.safetensors`` with the spec and labels in its metadata."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    path = folder / WEIGHTS_FILE
    save_file(state, str(path), metadata={"maas.spec": json.dumps(model.spec, sort_keys=True),
                                          "maas.labels": json.dumps(model.labels)})
    return path


def load(folder_or_file: Path) -> ImageModel:
    path = Path(folder_or_file)
    path = path / WEIGHTS_FILE if path.is_dir() else path
    spec, labels = read_checkpoint(path)
    net = nets().load_net(spec, str(path))
    return ImageModel(net=net, spec=spec, labels=labels)


def predict_proba(model: ImageModel, arrays: list[np.ndarray] | np.ndarray,
                  batch_size: int = 256) -> np.ndarray:
    """Softmax probabilities, one row per image array ``(C, S, S)``, in label order."""
    import torch

    net = model.net.eval()
    device = next(net.parameters()).device
    batch = np.asarray(arrays, dtype=np.float32)
    out = np.zeros((len(batch), len(model.labels)), dtype=np.float32)
    with torch.inference_mode():
        for i in range(0, len(batch), batch_size):
            logits = net(torch.from_numpy(batch[i:i + batch_size]).to(device)).float()
            out[i:i + batch_size] = torch.softmax(logits, dim=-1).cpu().numpy()
    return out
