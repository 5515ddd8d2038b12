"""Structured pruning of a fine-tuned BERT-style classifier: really remove FFN neurons and/or
attention heads with the hidden width (torch-pruning's dependency graph, Taylor importance), then
recover accuracy with a short fine-tune distilled from the unpruned model (its logits, and its
hidden states where the width is kept). Defaults: half the FFN neurons, measured in
docs/compression.md ("Pruning settings").

The result is a smaller *dense* model whose config describes the new (uniform) shapes, so it saves
and reloads with ``save_pretrained``/``from_pretrained``, logs with MLflow's transformers flavour
and exports to ONNX like the original.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

DEFAULT_ATTENTION = 0.0
DEFAULT_FFN = 0.5
DEFAULT_STEPS = 1
DEFAULT_RECOVERY_EPOCHS = 2
DEFAULT_LEARNING_RATE = 1e-4
DEFAULT_DISTILL_ALPHA = 1.0
DEFAULT_TEMPERATURE = 2.0
DEFAULT_DISTILL_HIDDEN = 10.0
IMPORTANCE_BATCHES = 4


@dataclass(frozen=True)
class PruneResult:
    model: Any  # the pruned, recovered transformers model (dense, smaller), eval mode, CPU
    params_before: int
    params_after: int
    nonembedding_before: int
    nonembedding_after: int
    details: dict[str, Any]  # what was pruned (ratios, new sizes), recovery epochs/loss, seconds


def count_params(model) -> tuple[int, int]:
    """(total, non-embedding) parameter counts; non-embedding leaves out the word, position and
    token-type embedding tables (the embedding LayerNorm counts as non-embedding)."""
    import torch

    total = sum(p.numel() for p in model.parameters())
    emb = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)
              for p in m.parameters(recurse=False))
    return total, total - emb


def _structure(model) -> tuple[Any, list[Any], Any]:
    """(base model, encoder layers, classifier output layer) or ValueError naming the class."""
    import torch

    name = type(model).__name__
    cfg = getattr(model, "config", None)
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    needed = ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers")
    ok = (cfg is not None and all(hasattr(cfg, k) for k in needed)
          and getattr(base, "embeddings", None) is not None
          and isinstance(getattr(base.embeddings, "word_embeddings", None), torch.nn.Embedding)
          and layers is not None and len(layers) > 0)
    for layer in layers if ok else []:
        att = getattr(layer, "attention", None)
        parts = [getattr(getattr(att, "self", None), k, None) for k in ("query", "key", "value")]
        parts += [getattr(getattr(att, "output", None), "dense", None),
                  getattr(getattr(layer, "intermediate", None), "dense", None),
                  getattr(getattr(layer, "output", None), "dense", None)]
        ok = ok and all(isinstance(p, torch.nn.Linear) for p in parts)
        ok = ok and not getattr(layer, "add_cross_attention", False)
    heads = [m for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and not n.startswith(f"{model.base_model_prefix}.")]
    if not ok or not heads or heads[-1].out_features != cfg.num_labels:
        raise ValueError(f"cannot prune {name}: structured pruning supports BERT-style sequence "
                         "classifiers (embeddings + "
                         "encoder.layer[i].attention.self.query/key/value,"
                         " intermediate.dense, output.dense, a classification head)")
    if getattr(cfg, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise ValueError(f"cannot prune {name}: position_embedding_type="
                         f"{cfg.position_embedding_type!r} (only 'absolute' is supported)")
    return base, list(layers), heads[-1]


def _batches(n: int, batch_size: int, generator=None) -> list[list[int]]:
    import torch

    order = torch.randperm(n, generator=generator).tolist() if generator else list(range(n))
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def _encode(tokenizer, texts: list[str], max_length: int, device):
    return tokenizer(texts, padding="longest", truncation=True, max_length=max_length,
                     return_tensors="pt").to(device)


def _accumulate_gradients(model, tokenizer, texts, labels, max_length, batch_size, device,
                          batches: int) -> None:
    """Cross-entropy gradients summed over the first ``batches`` training batches (0 = all), for
    Taylor importance."""
    import torch

    model.eval()  # no dropout: the ranking should reflect the deterministic network
    model.zero_grad(set_to_none=True)
    for idx in _batches(len(texts), batch_size)[:batches or None]:
        enc = _encode(tokenizer, [texts[i] for i in idx], max_length, device)
        target = torch.tensor([labels[i] for i in idx], device=device)
        torch.nn.functional.cross_entropy(model(**enc).logits, target).backward()


def _prune_step(model, tokenizer, texts, labels, keep_heads: int, keep_ffn: int,
                importance: str, max_length: int, batch_size: int, device,
                importance_batches: int) -> None:
    """One torch-pruning MetaPruner pass, in place, down to ``keep_heads`` heads per layer (and
    hidden = kept heads x head size) and ``keep_ffn`` FFN neurons per layer."""
    import torch_pruning as tp

    cfg = model.config
    _, layers, classifier = _structure(model)
    heads, ffn = cfg.num_attention_heads, cfg.intermediate_size
    if keep_heads == heads and keep_ffn == ffn:
        return
    if importance == "taylor":
        _accumulate_gradients(model, tokenizer, texts, labels, max_length, batch_size, device,
                              importance_batches)
        imp = tp.importance.GroupTaylorImportance()
    elif importance == "magnitude":
        imp = tp.importance.GroupMagnitudeImportance(p=2)
    else:
        raise ValueError(f"importance must be 'taylor' or 'magnitude', not {importance!r}")
    num_heads = {lin: heads for layer in layers for lin in
                 (layer.attention.self.query, layer.attention.self.key,
                  layer.attention.self.value)}
    # torch-pruning keeps int(width * (1 - ratio)) channels and removes ceil(heads * ratio) heads:
    # a hair under the exact ratio makes both come out exact (hidden = kept heads x head size).
    head_ratio = max((heads - keep_heads) / heads - 1e-6, 0.0)
    ffn_ratio = max((ffn - keep_ffn) / ffn - 1e-6, 0.0)
    example = dict(_encode(tokenizer, texts[:2], max_length, device))
    pruner = tp.pruner.MetaPruner(
        model, example, importance=imp, pruning_ratio=head_ratio,
        pruning_ratio_dict={layer.intermediate.dense: ffn_ratio for layer in layers},
        num_heads=num_heads, prune_num_heads=head_ratio > 0, prune_head_dims=False,
        head_pruning_ratio=head_ratio, ignored_layers=[classifier],
        output_transform=lambda out: out.logits)
    pruner.step()
    model.zero_grad(set_to_none=True)
    _sync_config(model, keep_heads)


def _sync_config(model, keep_heads: int) -> None:
    """Write the new uniform shapes into the config and attention modules; check every layer."""
    cfg = model.config
    base, layers, _ = _structure(model)
    hidden = base.embeddings.word_embeddings.embedding_dim
    ffn = {layer.intermediate.dense.out_features for layer in layers}
    qkv = {layer.attention.self.query.out_features for layer in layers}
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    if len(ffn) != 1 or qkv != {hidden} or hidden != keep_heads * head_dim:
        raise RuntimeError(f"pruning gave non-uniform shapes (hidden {hidden}, q/k/v {qkv}, "
                           f"FFN {ffn}, {keep_heads} heads x {head_dim}); config cannot "
                           "describe it")
    for layer in layers:
        att = layer.attention.self
        att.num_attention_heads = keep_heads
        att.all_head_size = keep_heads * att.attention_head_size
    cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size = hidden, keep_heads, ffn.pop()


def _teacher_logits(teacher, tokenizer, texts, max_length, batch_size, device):
    import torch

    teacher.eval()
    out = []
    with torch.inference_mode():
        for idx in _batches(len(texts), batch_size * 2):
            enc = _encode(tokenizer, [texts[i] for i in idx], max_length, device)
            out.append(teacher(**enc).logits.float())
    return torch.cat(out).clone()


@dataclass(frozen=True)
class Recovery:
    """Recovery fine-tune settings: loss = (1-alpha)*CE(labels) + alpha*T^2*KL(teacher/T ||
    student/T) + hidden * mean over layers of the MSE between student and teacher hidden states
    (real tokens only; used when the widths match, i.e. the attention/hidden width is kept)."""
    epochs: int
    lr: float
    alpha: float
    temperature: float
    hidden: float
    max_length: int
    batch_size: int


def _step_loss(model, teacher, enc, target, soft_logits, r: Recovery):
    import torch
    import torch.nn.functional as F

    use_hidden = r.hidden > 0 and teacher is not None
    out = model(**enc, output_hidden_states=use_hidden)
    loss = torch.zeros((), device=out.logits.device)
    if r.alpha < 1.0:
        loss = loss + (1.0 - r.alpha) * F.cross_entropy(out.logits, target)
    if r.alpha > 0.0:
        soft = F.log_softmax(soft_logits / r.temperature, dim=-1)
        kd = F.kl_div(F.log_softmax(out.logits / r.temperature, dim=-1), soft,
                      reduction="batchmean", log_target=True)
        loss = loss + r.alpha * r.temperature ** 2 * kd
    if use_hidden:
        with torch.no_grad():
            ref = teacher(**enc, output_hidden_states=True).hidden_states
        mask = enc["attention_mask"].unsqueeze(-1).to(out.logits.dtype)
        norm = mask.sum() * out.hidden_states[0].shape[-1]
        mse = [((s - t) ** 2 * mask).sum() / norm
               for s, t in zip(out.hidden_states[1:], ref[1:], strict=True)]
        loss = loss + r.hidden * torch.stack(mse).mean()
    return loss


def optimizer_step(model, loss, optimizer, scheduler) -> None:
    """Backward, clip the gradient norm to 1, step the optimizer and the schedule, clear."""
    import torch

    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _recover(model, teacher, tokenizer, texts, labels, teacher_logits, r: Recovery, *,
             seed: int, device, progress: bool) -> list[float]:
    """Fine-tune ``model`` in place with the :class:`Recovery` loss; mean loss per epoch."""
    import torch
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from pipelines.families.text_classifier_model import adamw

    generator = torch.Generator().manual_seed(seed)
    steps = math.ceil(len(texts) / r.batch_size) * r.epochs
    optimizer = adamw(model, r.lr, 0.01)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.1 * steps), steps)
    losses = []
    for epoch in range(r.epochs):
        model.train()
        total, seen = 0.0, 0
        bar = tqdm(_batches(len(texts), r.batch_size, generator), desc=f"recover {epoch + 1}",
                   leave=False, unit="batch", disable=not progress)
        for idx in bar:
            enc = _encode(tokenizer, [texts[i] for i in idx], r.max_length, device)
            target = torch.tensor([labels[i] for i in idx], device=device)
            loss = _step_loss(model, teacher, enc, target, teacher_logits[idx].to(device), r)
            optimizer_step(model, loss, optimizer, scheduler)
            total, seen = total + loss.item() * len(idx), seen + len(idx)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        losses.append(total / max(seen, 1))
    return losses


# Heads and channels are ranked by Taylor importance (|weight x gradient| of the cross-entropy on
# the first ``importance_batches`` training batches, 0 = all; ``importance="magnitude"``: L2
# weight norms) within torch-pruning groups, so coupled weights go together. ``steps`` > 1 prunes
# iteratively: the targets are reached in equal steps, each re-ranked on the recovered model and
# followed by its share of the ``recovery_epochs`` of AdamW on the training texts with the
# :class:`Recovery` loss against the input model (logits, and hidden states with weight
# ``distill_hidden`` where the widths match).
def prune_and_recover(model, tokenizer, train_texts: list[str], train_label_ids: list[int], *,
                      attention: float = DEFAULT_ATTENTION, ffn: float = DEFAULT_FFN,
                      steps: int = DEFAULT_STEPS, recovery_epochs: int = DEFAULT_RECOVERY_EPOCHS,
                      max_length: int = 128, batch_size: int = 32,
                      learning_rate: float = DEFAULT_LEARNING_RATE, seed: int = 42,
                      progress: bool = False, distill_alpha: float = DEFAULT_DISTILL_ALPHA,
                      temperature: float = DEFAULT_TEMPERATURE,
                      distill_hidden: float = DEFAULT_DISTILL_HIDDEN, importance: str = "taylor",
                      importance_batches: int = IMPORTANCE_BATCHES) -> PruneResult:
    """Prune a copy of ``model`` (left untouched: it is the distillation teacher) and recover it.

    ``attention``: the share of attention heads removed in every layer, rounded to whole heads
    (0 = none; otherwise at least one removed and one kept). BERT's config derives the head size
    from hidden / heads, so the hidden width (embeddings, residual stream, pooler) shrinks with
    the heads: hidden = kept heads x head size. ``ffn``: the share of each layer's FFN neurons
    removed (0 = none); it touches nothing else. The layer count and the vocabulary are kept.
    On all-MiniLM-L6-v2, attention=0.25 keeps 9 of 12 heads and hidden 288 of 384; ffn=0.5 keeps
    768 of 1536 FFN neurons. Ranking, steps and recovery: see the comment above.
    """
    import torch

    schedule = _schedule(model, train_texts, train_label_ids, attention, ffn, steps,
                         recovery_epochs)
    texts, labels = list(train_texts), [int(y) for y in train_label_ids]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    was_training = model.training
    before, old = count_params(model), _sizes(model)
    start = time.perf_counter()
    teacher, soft, hidden = _teacher(model, tokenizer, texts, schedule, distill_hidden,
                                     max_length, batch_size, device)
    student = copy.deepcopy(model).to(device)
    prune_s, recover_s, losses = time.perf_counter() - start, 0.0, []
    for i, (keep_heads, keep_ffn, epochs) in enumerate(schedule):
        start = time.perf_counter()
        _prune_step(student, tokenizer, texts, labels, keep_heads, keep_ffn, importance,
                    max_length, batch_size, device, importance_batches)
        prune_s, start = prune_s + time.perf_counter() - start, time.perf_counter()
        r = Recovery(epochs, learning_rate, distill_alpha, temperature, hidden, max_length,
                     batch_size)
        losses += _recover(student, teacher, tokenizer, texts, labels, soft, r, seed=seed + i,
                           device=device, progress=progress)
        recover_s += time.perf_counter() - start
    del teacher
    model.train(was_training)
    student.to("cpu").eval()
    student.zero_grad(set_to_none=True)
    after, new = count_params(student), _sizes(student)
    details = {
        "attention": attention, "ffn": ffn, "steps": steps, "importance": importance,
        "importance_batches": importance_batches, **{k: f"{old[k]}->{new[k]}" for k in old},
        "param_reduction": 1.0 - after[0] / before[0],
        "nonembedding_reduction": 1.0 - after[1] / before[1],
        "recovery_epochs": recovery_epochs, "recovery_loss": losses,
        "learning_rate": learning_rate, "distill_alpha": distill_alpha,
        "temperature": temperature, "distill_hidden": hidden,
        "prune_seconds": prune_s, "recovery_seconds": recover_s,
    }
    return PruneResult(student, before[0], after[0], before[1], after[1], details)


def _teacher(model, tokenizer, texts, schedule, distill_hidden: float, max_length: int,
             batch_size: int, device):
    """The fp32 teacher (kept only when the hidden-state loss needs it every step), its soft
    logits on the training texts, and the hidden-state weight (0 when the width changes)."""
    teacher = copy.deepcopy(model).to(device).eval()
    soft = _teacher_logits(teacher, tokenizer, texts, max_length, batch_size, device)
    hidden = distill_hidden if schedule[-1][0] == model.config.num_attention_heads else 0.0
    return (teacher if hidden > 0 else None), soft, hidden


def _sizes(model) -> dict[str, int]:
    keys = ("num_attention_heads", "hidden_size", "intermediate_size", "num_hidden_layers")
    return {k: int(getattr(model.config, k)) for k in keys}


def _schedule(model, texts, labels, attention: float, ffn: float, steps: int,
              epochs: int) -> list[tuple[int, int, int]]:
    """Validate the arguments; per step (heads kept, FFN neurons kept, recovery epochs)."""
    for name, share in (("attention", attention), ("ffn", ffn)):
        if not 0.0 <= share < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {share}")
    if attention == 0.0 and ffn == 0.0:
        raise ValueError("nothing to prune: attention and ffn are both 0")
    if steps < 1 or epochs < 0:
        raise ValueError(f"steps must be >= 1 and recovery_epochs >= 0, got {steps}, {epochs}")
    _structure(model)
    heads, width = model.config.num_attention_heads, model.config.intermediate_size
    if attention > 0 and heads < 2:
        raise ValueError(f"cannot prune heads of {type(model).__name__}: it has a single one")
    if len(texts) != len(labels) or not texts:
        raise ValueError("train_texts and train_label_ids must be non-empty and the same length")
    cut_heads = min(max(round(heads * attention), 1), heads - 1) if attention > 0 else 0
    cut_ffn = min(max(round(width * ffn), 1), width - 1) if ffn > 0 else 0
    return [(heads - round(cut_heads * i / steps), width - round(cut_ffn * i / steps),
             epochs * i // steps - epochs * (i - 1) // steps) for i in range(1, steps + 1)]
