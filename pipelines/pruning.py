"""Structured pruning of a fine-tuned BERT-style classifier: really remove attention heads, hidden
width and FFN neurons (torch-pruning's dependency graph, Taylor importance), then recover accuracy
with a short fine-tune distilled from the unpruned model's logits.

The result is a smaller *dense* model whose config describes the new (uniform) shapes, so it saves
and reloads with ``save_pretrained``/``from_pretrained``, logs with MLflow's transformers flavour and
exports to ONNX like the original.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

DEFAULT_AMOUNT = 0.25
DEFAULT_RECOVERY_EPOCHS = 2
DEFAULT_LEARNING_RATE = 1e-4
DEFAULT_DISTILL_ALPHA = 1.0
DEFAULT_TEMPERATURE = 2.0
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
                         "classifiers (embeddings + encoder.layer[i].attention.self.query/key/value,"
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


def _accumulate_gradients(model, tokenizer, texts, labels, max_length, batch_size, device) -> None:
    """Cross-entropy gradients summed over a few training batches (for Taylor importance)."""
    import torch

    model.eval()  # no dropout: the ranking should reflect the deterministic network
    model.zero_grad(set_to_none=True)
    for idx in _batches(len(texts), batch_size)[:IMPORTANCE_BATCHES]:
        enc = _encode(tokenizer, [texts[i] for i in idx], max_length, device)
        target = torch.tensor([labels[i] for i in idx], device=device)
        torch.nn.functional.cross_entropy(model(**enc).logits, target).backward()


def _prune_structure(model, tokenizer, texts, labels, keep_heads: int, importance: str,
                     max_length: int, batch_size: int, device) -> None:
    """Remove heads/hidden width/FFN neurons in place with torch-pruning's MetaPruner."""
    import torch_pruning as tp

    cfg = model.config
    _, layers, classifier = _structure(model)
    heads = cfg.num_attention_heads
    num_heads = {}
    for layer in layers:
        for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
            num_heads[lin] = heads
    removed = (heads - keep_heads) / heads
    if importance == "taylor":
        _accumulate_gradients(model, tokenizer, texts, labels, max_length, batch_size, device)
        imp = tp.importance.GroupTaylorImportance()
    elif importance == "magnitude":
        imp = tp.importance.GroupMagnitudeImportance(p=2)
    else:
        raise ValueError(f"importance must be 'taylor' or 'magnitude', not {importance!r}")
    example = dict(_encode(tokenizer, texts[:2], max_length, device))
    # torch-pruning keeps int(width * (1 - ratio)) channels and removes ceil(heads * ratio) heads:
    # a hair under the exact ratio makes both come out exact (hidden = kept heads x head size).
    ratio = removed - 1e-6
    pruner = tp.pruner.MetaPruner(
        model, example, importance=imp, pruning_ratio=ratio,
        num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=ratio, ignored_layers=[classifier],
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
                           f"FFN {ffn}, {keep_heads} heads x {head_dim}); config cannot describe it")
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


def _recover(model, tokenizer, texts, labels, teacher_logits, *, epochs: int, lr: float,
             alpha: float, temperature: float, max_length: int, batch_size: int, seed: int,
             device, progress: bool) -> list[float]:
    """Fine-tune in place: (1-alpha)*CE(labels) + alpha*T^2*KL(teacher/T || student/T)."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    generator = torch.Generator().manual_seed(seed)
    steps = math.ceil(len(texts) / batch_size) * epochs
    no_decay = ("bias", "LayerNorm.weight", "layernorm", "norm")
    groups = [{"params": [p for n, p in model.named_parameters()
                          if not any(k in n for k in no_decay)], "weight_decay": 0.01},
              {"params": [p for n, p in model.named_parameters()
                          if any(k in n for k in no_decay)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.1 * steps), steps)
    losses = []
    for epoch in range(epochs):
        model.train()
        total, seen = 0.0, 0
        bar = tqdm(_batches(len(texts), batch_size, generator), desc=f"recover {epoch + 1}",
                   leave=False, unit="batch", disable=not progress)
        for idx in bar:
            enc = _encode(tokenizer, [texts[i] for i in idx], max_length, device)
            logits = model(**enc).logits
            loss = torch.zeros((), device=device)
            if alpha < 1.0:
                target = torch.tensor([labels[i] for i in idx], device=device)
                loss = loss + (1.0 - alpha) * F.cross_entropy(logits, target)
            if alpha > 0.0:
                soft = F.log_softmax(teacher_logits[idx].to(device) / temperature, dim=-1)
                kd = F.kl_div(F.log_softmax(logits / temperature, dim=-1), soft,
                              reduction="batchmean", log_target=True)
                loss = loss + alpha * temperature ** 2 * kd
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            total, seen = total + loss.item() * len(idx), seen + len(idx)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        losses.append(total / max(seen, 1))
    return losses


def prune_and_recover(model, tokenizer, train_texts: list[str], train_label_ids: list[int], *,
                      amount: float = DEFAULT_AMOUNT,
                      recovery_epochs: int = DEFAULT_RECOVERY_EPOCHS,
                      max_length: int = 128, batch_size: int = 32,
                      learning_rate: float = DEFAULT_LEARNING_RATE, seed: int = 42,
                      progress: bool = False, distill_alpha: float = DEFAULT_DISTILL_ALPHA,
                      temperature: float = DEFAULT_TEMPERATURE,
                      importance: str = "taylor") -> PruneResult:
    """Prune a copy of ``model`` (left untouched: it is the distillation teacher) and recover it.

    ``amount`` is the fraction of attention heads removed in every layer, rounded to whole heads
    (at least one head is kept and at least one removed); the same fraction is removed from the
    hidden width (embedding dimension, residual stream, pooler: hidden = kept heads x head size)
    and from each layer's FFN neurons. The layer count and the vocabulary are unchanged. On
    all-MiniLM-L6-v2, amount=0.25 keeps 9 of 12 heads, hidden 288 of 384, FFN 1152 of 1536.

    Heads and channels are ranked by Taylor importance (|weight x gradient| of the cross-entropy
    on a few training batches; ``importance="magnitude"`` uses L2 weight norms) within torch-pruning
    groups, so coupled weights go together. Recovery: ``recovery_epochs`` of AdamW with loss
    ``(1-distill_alpha)*CE + distill_alpha*T^2*KL`` against the input model's logits.
    """
    import torch

    keep_heads = _check_inputs(model, train_texts, train_label_ids, amount)
    texts, labels = list(train_texts), [int(y) for y in train_label_ids]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    was_training = model.training
    before, old = count_params(model), _sizes(model)
    start = time.perf_counter()
    teacher = copy.deepcopy(model).to(device)
    soft = _teacher_logits(teacher, tokenizer, texts, max_length, batch_size, device)
    del teacher
    student = copy.deepcopy(model).to(device)
    _prune_structure(student, tokenizer, texts, labels, keep_heads, importance, max_length,
                     batch_size, device)
    prune_s, start = time.perf_counter() - start, time.perf_counter()
    losses = _recover(student, tokenizer, texts, labels, soft, epochs=recovery_epochs,
                      lr=learning_rate, alpha=distill_alpha, temperature=temperature,
                      max_length=max_length, batch_size=batch_size, seed=seed, device=device,
                      progress=progress)
    recover_s = time.perf_counter() - start
    model.train(was_training)
    student.to("cpu").eval()
    student.zero_grad(set_to_none=True)
    after, new = count_params(student), _sizes(student)
    details = {
        "amount": amount, "importance": importance,
        **{k: f"{old[k]}->{new[k]}" for k in old},
        "param_reduction": 1.0 - after[0] / before[0],
        "nonembedding_reduction": 1.0 - after[1] / before[1],
        "recovery_epochs": recovery_epochs, "recovery_loss": losses,
        "learning_rate": learning_rate, "distill_alpha": distill_alpha,
        "temperature": temperature, "prune_seconds": prune_s, "recovery_seconds": recover_s,
    }
    return PruneResult(student, before[0], after[0], before[1], after[1], details)


def _sizes(model) -> dict[str, int]:
    keys = ("num_attention_heads", "hidden_size", "intermediate_size", "num_hidden_layers")
    return {k: int(getattr(model.config, k)) for k in keys}


def _check_inputs(model, texts, labels, amount: float) -> int:
    """Validate the arguments; the number of heads to keep per layer."""
    if not 0.0 < amount < 1.0:
        raise ValueError(f"amount must be in (0, 1), got {amount}")
    _structure(model)
    heads = model.config.num_attention_heads
    if heads < 2:
        raise ValueError(f"cannot prune {type(model).__name__}: it has a single attention head")
    if len(texts) != len(labels) or not texts:
        raise ValueError("train_texts and train_label_ids must be non-empty and the same length")
    return min(max(round(heads * (1.0 - amount)), 1), heads - 1)
