"""Layer-dropping distillation: the ``distilled`` compression variant of a fine-tuned encoder.

The student is a copy of the tuned model (the teacher) with fewer encoder layers, each initialised
from the teacher layer it keeps (every other layer by default, the top one always: 6 -> layers
2, 4, 6), so it starts close to the teacher instead of from scratch. It is trained on the training
texts plus any unlabelled texts the pipeline names (the teacher labels them: its logits are the
targets) with loss = alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * CE(labels, labelled
rows only) + hidden * MSE(student hidden state j, teacher hidden state of the layer j was copied
from; real tokens only). Training stops inside ``time_budget_s``: the first batches project an
epoch's time, and a student whose one epoch would not fit is not made (the reason says so).

Works for any transformers model whose encoder layers are one ``nn.ModuleList`` of
``config.num_hidden_layers`` blocks (BERT, RoBERTa, MiniLM, DistilBERT, ...); for another model
:class:`NotApplicable` says why.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

from pipelines.pruning import _batches, _encode, _teacher_logits, count_params, optimizer_step

#: batches timed before the projection of one epoch's time
PROBE_BATCHES = 4


class NotApplicable(RuntimeError):
    """The model has no layers this module can drop, or the budget cannot fit one epoch."""


@dataclass(frozen=True)
class DistillResult:
    model: Any                # the student, eval mode, on the CPU
    details: dict[str, Any]   # kept layers, sizes, losses, epochs run, seconds (child-run params)


def keep_layers(n: int, layers: int | list[int] | None) -> list[int]:
    """Teacher layer indices (0-based) the student keeps. None: every other layer counting from
    the top (n=6: [1, 3, 5]); an int k: k layers spread evenly, the top one included; a list:
    those indices. ValueError naming ``compression.distillation.layers`` when unusable."""
    where = "compression.distillation.layers"
    if layers is None:
        keep = list(range(n - 1, -1, -2))[::-1]
    elif isinstance(layers, int):
        if not 1 <= layers < n:
            raise ValueError(f"{where}: {layers} layers of the teacher's {n}: must be 1..{n - 1}")
        keep = [round((i + 1) * n / layers) - 1 for i in range(layers)]
    else:
        keep = sorted(set(layers))
        bad = [i for i in keep if not 0 <= i < n]
        if bad or not keep or len(keep) >= n:
            raise ValueError(f"{where}: {layers} must name 1..{n - 1} distinct layer indices in "
                             f"0..{n - 1} (the teacher has {n})")
    if len(keep) >= n:
        raise NotApplicable(f"the teacher has {n} layer(s): nothing to drop")
    return keep


def _layer_list(model) -> Any:
    """The encoder's ``nn.ModuleList`` of ``config.num_hidden_layers`` blocks."""
    import torch

    n = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and n and len(module) == n:
            return module
    raise NotApplicable(f"{type(model).__name__} has no nn.ModuleList of num_hidden_layers={n} "
                        "encoder layers to drop")


def make_student(teacher, keep: list[int]):
    """A deep copy of ``teacher`` holding only the layers ``keep`` (in order)."""
    import torch

    student = copy.deepcopy(teacher)
    layers = _layer_list(student)
    kept = torch.nn.ModuleList([layers[i] for i in keep])
    for parent in student.modules():  # swap the list in place wherever it hangs
        for name, child in parent.named_children():
            if child is layers:
                setattr(parent, name, kept)
    student.config.num_hidden_layers = len(keep)
    for j, layer in enumerate(kept):  # layers that know their index (caches) get the new one
        attn = getattr(getattr(layer, "attention", None), "self", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = j
    return student


def _loss(out, t_hidden, mapping, target, soft, s) -> Any:
    import torch
    import torch.nn.functional as F

    loss = torch.zeros((), device=out.logits.device)
    if s.distill_alpha > 0:
        kd = F.kl_div(F.log_softmax(out.logits / s.temperature, dim=-1),
                      F.log_softmax(soft / s.temperature, dim=-1),
                      reduction="batchmean", log_target=True)
        loss = loss + s.distill_alpha * s.temperature ** 2 * kd
    if s.distill_alpha < 1 and bool((target >= 0).any()):
        loss = loss + (1 - s.distill_alpha) * F.cross_entropy(out.logits, target,
                                                              ignore_index=-100)
    if t_hidden is not None:
        mask = t_hidden[1].unsqueeze(-1).to(out.logits.dtype)
        norm = mask.sum() * out.hidden_states[0].shape[-1]
        mse = [((out.hidden_states[j] - t_hidden[0][i]) ** 2 * mask).sum() / norm
               for j, i in enumerate(mapping)]
        loss = loss + s.distill_hidden * torch.stack(mse).mean()
    return loss


@dataclass
class _Session:
    """One distillation's moving parts (internal to :func:`distill`)."""

    student: Any
    ref: Any                  # the teacher on the training device
    tokenizer: Any
    texts: list[str]
    soft: Any                 # the teacher's logits on ``texts``
    targets: Any              # class ids, -100 for unlabelled texts
    mapping: list[int]        # student hidden state j <- teacher hidden state mapping[j]
    s: Any                    # DistillationConfig
    optimizer: Any
    scheduler: Any
    device: Any
    max_length: int
    start: float              # perf_counter at the start (the budget counts from it)

    def epoch(self, batches: list[list[int]], first: bool, desc: str) -> float:
        """One pass; its mean loss. The first epoch's first batches project its time and stop
        a student that cannot fit the budget."""
        import torch
        from tqdm.auto import tqdm

        s, t0, total, seen = self.s, time.perf_counter(), 0.0, 0
        self.student.train()
        for b, idx in enumerate(tqdm(batches, desc=desc, leave=False, unit="batch",
                                     disable=None)):  # a bar on a terminal only
            enc = _encode(self.tokenizer, [self.texts[i] for i in idx], self.max_length,
                          self.device)
            t_hidden = None
            if s.distill_hidden > 0:
                with torch.no_grad():
                    t_hidden = (self.ref(**enc, output_hidden_states=True).hidden_states,
                                enc["attention_mask"])
            out = self.student(**enc, output_hidden_states=s.distill_hidden > 0)
            loss = _loss(out, t_hidden, self.mapping, self.targets[idx].to(self.device),
                         self.soft[idx].to(self.device), s)
            optimizer_step(self.student, loss, self.optimizer, self.scheduler)
            total, seen = total + loss.item() * len(idx), seen + len(idx)
            if first and b + 1 == PROBE_BATCHES:
                self._check_budget((time.perf_counter() - t0) / PROBE_BATCHES * len(batches))
        return total / max(seen, 1)

    def _check_budget(self, projected: float) -> None:
        if time.perf_counter() - self.start + projected > self.s.time_budget_s:
            raise NotApplicable(
                f"one distillation epoch would take ~{projected:.0f} s (projected from "
                f"{PROBE_BATCHES} batches): over compression.distillation.time_budget_s "
                f"= {self.s.time_budget_s:g} s" + (
                    "" if self.s.run_deadline_s is None else
                    f" (at most what was left of run_deadline_s = {self.s.run_deadline_s:g} s "
                    "when the compress step began)"))


def distill(teacher, tokenizer, texts: list[str], labels: list[int], s, *, max_length: int,
            seed: int, batch_size: int = 32) -> DistillResult:
    """Train a student of ``teacher`` (left untouched). ``labels``: class ids, -100 for
    unlabelled texts; ``s``: ``pipelines.config.DistillationConfig``."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    from pipelines.families.text_classifier_model import adamw

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    keep = keep_layers(int(teacher.config.num_hidden_layers), s.layers)
    was_training = teacher.training
    ref = copy.deepcopy(teacher).to(device).eval()
    soft = _teacher_logits(ref, tokenizer, texts, max_length, batch_size, device)
    student = make_student(ref, keep).to(device)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    steps = math.ceil(len(texts) / batch_size) * s.epochs
    optimizer = adamw(student, s.learning_rate, 0.01)
    run = _Session(student, ref, tokenizer, texts, soft, torch.tensor(labels, dtype=torch.long),
                   [0] + [i + 1 for i in keep], s, optimizer,
                   get_linear_schedule_with_warmup(optimizer, int(0.1 * steps), steps),
                   device, max_length, start)
    losses, epoch_s = [], []
    for epoch in range(s.epochs):
        if epoch_s and time.perf_counter() + epoch_s[-1] > start + s.time_budget_s:
            break  # the next epoch would not fit the budget
        t0 = time.perf_counter()
        losses.append(run.epoch(_batches(len(texts), batch_size, generator), epoch == 0,
                                f"distill {epoch + 1}"))
        epoch_s.append(time.perf_counter() - t0)
    del run, ref
    teacher.train(was_training)
    student.to("cpu").eval()
    student.zero_grad(set_to_none=True)
    before, after = count_params(teacher), count_params(student)
    details = {
        "layers_kept": keep, "layers": f"{teacher.config.num_hidden_layers}->{len(keep)}",
        "params_before": before[0], "params_after": after[0],
        "texts": len(texts), "unlabelled_texts": int(sum(1 for y in labels if y < 0)),
        "epochs": s.epochs, "epochs_run": len(losses), "distill_loss": losses,
        "epoch_seconds": epoch_s,
        "learning_rate": s.learning_rate, "temperature": s.temperature,
        "distill_alpha": s.distill_alpha, "distill_hidden": s.distill_hidden,
        "time_budget_s": s.time_budget_s, "distill_seconds": time.perf_counter() - start,
    }
    return DistillResult(student, details)
