"""The own-module contract, shared by every family: load the user's ``torch.nn.Module`` class by
file path, give its constructor what the data decides, and check it on one batch before training.

``model.module: path/to/file.py:ClassName`` (relative to the pipeline file) and ``model.init``
(constructor kwargs; ``init.NAME`` in ``tuning.search_space`` / ``fixed`` tunes them). A family
states its forward contract as a ``kind``: ``text`` calls ``forward(input_ids, attention_mask)``
or ``forward(input_ids)``; ``image`` calls ``forward(x)`` (float ``[B, C, S, S]``). The family
passes the data's facts (:data:`FACTS`) to the constructor for the parameters named like them.
A class whose constructor takes ``num_labels`` must return logits ``[B, num_labels]``; one that
does not returns hidden states (``[B, H]`` or ``[B, T, H]``) and gets a pooled linear head.
Every failure is a :class:`ModuleError` (a ``FamilyError``: exit 2) naming the file, the class
and the mismatch.
"""

from __future__ import annotations

import inspect
import logging
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.families.base import FamilyError

log = logging.getLogger(__name__)

#: what the data decides, per kind: passed to the constructor's parameters of these names
FACTS: dict[str, tuple[str, ...]] = {
    "text": ("vocab_size", "num_labels", "max_length", "pad_token_id"),
    "image": ("in_channels", "num_labels", "image_size"),
}
CALLS = {"text": "forward(input_ids, attention_mask) or forward(input_ids)",
         "image": "forward(x)"}
INIT_PREFIX = "init."


class ModuleError(FamilyError):
    """The user's module cannot be used (missing file or class, wrong signature, a forward that
    raises or returns the wrong shape, a non-finite loss): exit 2, nothing registered."""


@dataclass(frozen=True)
class ModuleSpec:
    """``model.module`` resolved: the source file, the class name and the file's sha256."""

    path: Path
    class_name: str
    sha256: str

    @property
    def label(self) -> str:
        return f"{self.path.name}:{self.class_name}"


@dataclass(frozen=True)
class Contract:
    """How the pipeline calls a checked class: its constructor kwargs and forward mode."""

    init: dict[str, Any]
    takes_mask: bool
    takes_num_labels: bool


def spec_of(cfg: Any) -> ModuleSpec:
    """The resolved ``model.module`` of a pipeline config (config.py made the path absolute and
    checked that the file exists)."""
    from pipelines.families.own_runtime import sha256_file

    raw = cfg.model.module
    path, _, name = raw.rpartition(":")
    path_ = Path(path)
    if not path_.is_file():
        raise ModuleError(f"model.module: file not found: {path_}")
    return ModuleSpec(path_, name, sha256_file(path_))


def _where(exc: BaseException, path: Path) -> str:
    """" (file.py line N)" of the deepest traceback frame in the user's file, if any."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if Path(f.filename).name == path.name]
    return f" ({path.name} line {frames[-1].lineno})" if frames else ""


def load_user_class(spec: ModuleSpec) -> type:
    """The ``torch.nn.Module`` subclass ``spec`` names (imported by path, see own_runtime)."""
    from torch import nn

    from pipelines.families.own_runtime import load_class

    try:
        cls = load_class(spec.path, spec.class_name)
    except AttributeError:
        import sys

        mod = sys.modules.get(f"maas_user_{spec.sha256[:16]}")
        found = sorted(k for k, v in vars(mod).items()
                       if isinstance(v, type) and issubclass(v, nn.Module)) if mod else []
        raise ModuleError(f"model.module: {spec.path} has no class {spec.class_name!r} "
                          f"(its nn.Module classes: {found or 'none'})") from None
    except Exception as exc:  # noqa: BLE001 - any import-time error is the module's
        raise ModuleError(f"model.module: importing {spec.path} raised {type(exc).__name__}: "
                          f"{exc}{_where(exc, spec.path)}") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModuleError(f"model.module: {spec.label} is not a torch.nn.Module subclass "
                          f"(it is {type(cls).__name__} {cls!r})")
    return cls


def _positional(fn: Any) -> tuple[list[str], list[str], bool]:
    """(required positional names, all positional names, takes *args) of ``fn`` minus self."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    pos = [p for p in params if p.kind in kinds]
    required = [p.name for p in pos if p.default is inspect.Parameter.empty]
    required += [p.name for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY
                 and p.default is inspect.Parameter.empty]
    star = any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params)
    return required, [p.name for p in pos], star


def forward_mode(cls: type, kind: str, label: str) -> bool:
    """Whether ``forward`` takes the attention mask (text); ModuleError when it cannot be called
    the way the family calls it."""
    required, names, star = _positional(cls.forward)
    limit = 2 if kind == "text" else 1
    if len(required) > limit or (not names and not star):
        shown = ", ".join(names) or "no inputs"
        raise ModuleError(f"model.module: {label}.forward({shown}) has the wrong signature: "
                          f"it needs {len(required)} argument(s) {required}; the {kind} family "
                          f"calls {CALLS[kind]}")
    return kind == "text" and (len(names) >= 2 or star)


def constructor(cls: type, kind: str, init: dict[str, Any], label: str,
                facts: dict[str, Any] | None = None) -> Contract:
    """The constructor kwargs: ``facts`` (by name, where the constructor has the parameter) and
    ``init``; ModuleError for an init key the data decides, an unknown one, or one missing.
    ``facts`` None: check the names only (before the data is read)."""
    sig = inspect.signature(cls.__init__)
    params = {n: p for n, p in list(sig.parameters.items())[1:]
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    names = FACTS[kind]
    for key in init:
        if key in names:
            raise ModuleError(f"model.init.{key}: decided by the data ({kind} family passes "
                              f"{', '.join(names)}); remove it")
        if key not in params and not var_kw:
            raise ModuleError(f"model.init.{key}: {label}.__init__ takes no argument {key!r} "
                              f"(it takes: {', '.join(params) or 'none'})")
    given = {n: (facts or {}).get(n) for n in names if n in params}
    missing = [n for n, p in params.items() if p.default is p.empty and n not in init
               and n not in given]
    if missing:
        raise ModuleError(f"model.init: {label}.__init__ needs {missing}: give them in "
                          f"model.init (the data gives {', '.join(names)})")
    kwargs = {**given, **init} if facts is not None else dict(init)
    return Contract(kwargs, forward_mode(cls, kind, label), "num_labels" in params)


def init_of(cfg: Any, params: dict[str, Any]) -> dict[str, Any]:
    """``model.init`` overridden by a trial's ``init.NAME`` parameters."""
    tuned = {k[len(INIT_PREFIX):]: v for k, v in params.items() if k.startswith(INIT_PREFIX)}
    return {**cfg.model.init, **tuned}


def check_config(cfg: Any, kind: str) -> ModuleSpec:
    """Before any work: the file imports, the class is an nn.Module, forward can be called the
    family's way, and ``model.init`` + the tuned ``init.*`` names fit the constructor."""
    spec = spec_of(cfg)
    cls = load_user_class(spec)
    names = {**cfg.tuning.fixed, **{k: None for k in cfg.tuning.search_space}}
    constructor(cls, kind, init_of(cfg, names), spec.label)
    _warn_fine_tuning_rate(cfg)
    return spec


#: learning rates below this are fine-tuning rates: from scratch they barely move the weights
SCRATCH_LR = 5e-4


def _warn_fine_tuning_rate(cfg: Any) -> None:
    """A warning (not an error: it may be meant) when every learning rate the study can try is
    a fine-tuning one, e.g. the range `maas init` writes for the packaged checkpoint."""
    space, fixed = cfg.tuning.space(True).get("learning_rate"), cfg.tuning.fixed
    high = getattr(space, "high", None) if space is not None else fixed.get("learning_rate")
    if isinstance(high, (int, float)) and high < SCRATCH_LR:
        log.warning("tuning: learning_rate is at most %g, a fine-tuning rate; a module trained "
                    "from scratch (model.module) usually needs 1e-3 to 3e-3", high)


def construct(cls: type, contract: Contract, label: str, seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    try:
        return cls(**contract.init)
    except Exception as exc:  # noqa: BLE001 - the user's constructor
        path = Path(inspect.getsourcefile(cls) or label)
        raise ModuleError(f"model.module: {label}({_kwargs(contract.init)}) raised "
                          f"{type(exc).__name__}: {exc}{_where(exc, path)}") from None


def _kwargs(init: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in init.items())


def probe(net: Any, contract: Contract, batch: tuple[Any, Any], num_labels: int,
          label: str) -> int | None:
    """One forward pass on a training batch; the hidden width when the class returns hidden
    states (None: logits). ModuleError naming the exception, type, dtype or shape."""
    from pipelines.families.own_runtime import as_tensor

    x, mask = batch
    try:
        out = as_tensor(net(x, mask) if contract.takes_mask else net(x))
    except Exception as exc:  # noqa: BLE001 - the user's forward
        path = Path(inspect.getsourcefile(type(net)) or label)
        raise ModuleError(f"model.module: {label}.forward on one training batch (input "
                          f"{tuple(x.shape)} {x.dtype}) raised {type(exc).__name__}: "
                          f"{exc}{_where(exc, path)}") from None
    if not out.is_floating_point():
        raise ModuleError(f"model.module: {label}.forward returned dtype {out.dtype}; logits "
                          "must be floating point")
    batch_size = x.shape[0]
    if out.dim() not in (2, 3) or out.shape[0] != batch_size:
        raise ModuleError(f"model.module: {label}.forward returned shape {tuple(out.shape)} for "
                          f"a batch of {batch_size}; expected [{batch_size}, {num_labels}]")
    if contract.takes_num_labels:
        if out.dim() != 2 or out.shape[1] != num_labels:
            raise ModuleError(f"model.module: {label}.forward returned shape "
                              f"{tuple(out.shape)}; it takes num_labels={num_labels}, so it "
                              f"must return logits [{batch_size}, {num_labels}]")
        return None
    return int(out.shape[-1])


def check_loss(model: Any, batch: tuple[Any, Any], y: Any, label: str) -> None:
    """The classifier's cross-entropy on one batch is finite and reaches the parameters."""
    import torch

    loss = torch.nn.functional.cross_entropy(model(*batch).float(), y)
    if not torch.isfinite(loss):
        raise ModuleError(f"model.module: {label}: the loss on one training batch is "
                          f"{loss.item()} (not finite): check the forward for divisions by "
                          "zero, log of 0 or an untrained scale")
    loss.backward()
    if not any(p.grad is not None for p in model.parameters()):
        raise ModuleError(f"model.module: {label}: no parameter gets a gradient from the loss")
    model.zero_grad(set_to_none=True)
