"""Training an image model: AdamW, cross-entropy, shuffled mini-batches, optional random shifts.

One :class:`Trainer` per trial (the pipeline's tuning loop calls ``train_epoch`` once per epoch
and scores the validation split itself). On CPU plain fp32; on CUDA bf16 autocast (fp16 + a
gradient scaler without bf16), like the text family.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.families.image_classifier.model import ImageModel

log = logging.getLogger(__name__)

#: hyperparameters and defaults (the names a search space may use); net sizes go to the spec
HYPERPARAMETERS: dict[str, Any] = {
    "learning_rate": 1e-3,
    "batch_size": 64,
    "weight_decay": 0.0,
    "dropout": 0.0,
    "conv1": 32,
    "conv2": 64,
    "dense": 64,
    "width": 64,
}


@dataclass(frozen=True)
class TrainSetup:
    """What one training run needs besides the model: the inputs ``(N, C, S, S)`` float32, the
    class ids, the hyperparameters, the seed and the augmentation's largest shift (pixels)."""

    inputs: np.ndarray
    label_ids: np.ndarray
    params: dict[str, Any]
    seed: int
    max_shift: int = 0
    threads: int | None = None


#: networks under this many parameters train on one CPU thread by default
SMALL_NET_PARAMS = 5_000_000


def train_threads(net: Any, configured: int | None) -> int | None:
    """CPU threads for training ``net``: ``configured``, else 1 for a small network, else None
    (torch's default). A small convolution is split into pieces too small to pay for the threads'
    synchronisation: the digits CNN trains an epoch in 0.2 s on one thread and 0.5 s on two of an
    idle 2-core CPU, 1.4-1.8 s against 6.7-11.8 s on the same CPU under load."""
    if configured is not None:
        return configured
    return 1 if sum(p.numel() for p in net.parameters()) < SMALL_NET_PARAMS else None


def random_shift(batch: Any, max_shift: int, generator: Any) -> Any:
    """Each image moved by up to ``max_shift`` pixels in x and y (zero fill), independently."""
    import torch

    if max_shift <= 0:
        return batch
    n, _, h, w = batch.shape
    pad = torch.nn.functional.pad(batch, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).tolist()
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator).tolist()
    return torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


class Trainer:
    """One training run of ``model`` on ``setup`` (see the module docstring)."""

    def __init__(self, model: ImageModel, setup: TrainSetup) -> None:
        import torch

        from pipelines.families.text_classifier_model import adamw, amp_dtype, precision_name

        torch.manual_seed(setup.seed)
        self.model = model
        self.setup = setup
        p = {**HYPERPARAMETERS, **setup.params}
        self.batch_size = int(p["batch_size"])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.net.to(self.device)
        self.amp_dtype = amp_dtype(self.device)
        self.precision = precision_name(self.amp_dtype)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.optimizer = adamw(self.model.net, float(p["learning_rate"]), float(p["weight_decay"]))
        self.generator = torch.Generator().manual_seed(setup.seed)
        self.x = torch.from_numpy(np.ascontiguousarray(setup.inputs, dtype=np.float32))
        self.y = torch.from_numpy(np.asarray(setup.label_ids, dtype=np.int64))
        self.threads = (train_threads(model.net, setup.threads)
                        if self.device.type == "cpu" else None)
        log.info("training %s on %s in %s (%d images, batch %d, %s CPU threads)",
                 model.spec["arch"], self.device, self.precision, len(self.y), self.batch_size,
                 self.threads or torch.get_num_threads())

    def train_epoch(self, desc: str = "train") -> float:
        """One pass over the training images (on :attr:`threads` CPU threads, put back after);
        the mean loss."""
        import torch

        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            return self._epoch(desc)
        finally:
            torch.set_num_threads(before)

    def _epoch(self, desc: str) -> float:
        import torch

        from pipelines.progress import progress

        net = self.model.net.train()
        order = torch.randperm(len(self.y), generator=self.generator)
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        total, seen = 0.0, 0
        for idx in progress(batches, desc=desc, leave=False, unit="batch"):
            x = random_shift(self.x[idx], self.setup.max_shift, self.generator).to(self.device)
            y = self.y[idx].to(self.device)
            with _autocast(self.device, self.amp_dtype):
                loss = torch.nn.functional.cross_entropy(net(x).float(), y)
            self._step(loss)
            total += loss.item() * len(idx)
            seen += len(idx)
        net.eval()
        return total / max(seen, 1)

    def _step(self, loss: Any) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()


def _autocast(device: Any, dtype: Any) -> Any:
    import contextlib

    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
