"""Build side of the serving machine check: which variants a bento carries besides the one it
serves, the machine the choice was made on, and the texts a re-check times them on.

The pipeline records, on each variant of the ``maas.variants`` tag, the machine its figures were
measured on (``bentos.machine.describe()``: CPU model, AVX2/AVX-512/VNNI/BF16/AMX, threads). A
bento built from the version's own choice also carries the other variants within budget that its
runtime can serve (``candidates/<name>/`` in the BentoML model), so that the service, started on
a CPU whose features differ from the recorded ones, can time them there and serve the fastest
(``maas_machine.recheck``, ``service.py``). A build on such a CPU times them itself first
(:meth:`Plan.settle`): the fastest becomes the bento's variant and the build machine the recorded
one, so serving on the build machine starts without a re-check. A variant requested explicitly
(``BentoSettings.variant``) is served as asked: no candidates, no re-check.

mlflow is imported inside the functions only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bentos import machine
from bentos.settings import BentoSettings
from bentos.variants import Variant, choose_variant, variant_table

logger = logging.getLogger(__name__)

CANDIDATES_DIR = "candidates"
#: seconds the service may spend timing the candidates at start (then it serves the best so far)
BUDGET_S = 20.0
#: texts per timed call: the example texts cycled up to this many
CALL_TEXTS = 32
#: used when the version stores no example texts (or privacy kept them out): movie-review-like
#: sentences of the lengths a sentiment classifier sees, short to long
DEFAULT_TEXTS = (
    "Great.", "Not worth it.", "A gorgeous, witty film.", "The plot never goes anywhere.",
    "I liked the cast, but the ending dragged on far too long for my taste.",
    "An honest, funny and moving story that earns every one of its quiet moments.",
    "The service was slow and the food arrived cold, although the staff apologised twice.",
    "Battery life is excellent and the screen is sharp, yet the speaker crackles at high "
    "volume and the case scratches easily after a week of ordinary use.",
    "It starts as a clever thriller with a strong premise, loses its nerve in the second hour, "
    "and ends with a twist that anyone who has seen a film of this kind will guess early on.",
    "Worst purchase this year.", "Absolutely loved it!",
    "Fine for the price, nothing more: it works, it is loud, and the manual is useless.",
)


@dataclass
class Plan:
    """What a bento needs for the machine check (empty ``candidates``: nothing to re-check)."""

    recorded: dict[str, Any] | None
    candidates: list[Variant] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    #: what :meth:`settle` measured at build (None: nothing re-timed)
    build_check: dict[str, Any] | None = None

    def settle(self, served: Variant, write_files: Callable[[Variant, Path], dict[str, Any]],
               settings: BentoSettings) -> Variant:
        """At build, on a CPU whose features differ from the recorded ones: time ``served`` and
        the candidates here (their files written to a temporary folder by ``write_files``, run
        with the serving threads) and return the fastest, which the bento then serves; the
        others become its candidates and this machine the recorded one. Else ``served``."""
        here = machine.describe()
        changed = machine.differs(self.recorded, here)
        if not changed or not self.candidates:
            return served
        threads = settings.torch_threads or max(1, machine.threads() // settings.workers)
        with tempfile.TemporaryDirectory(prefix="maas-recheck-") as tmp:
            loaders = {v.name: _loader(v, Path(tmp) / v.name, write_files, settings, threads)
                       for v in (served, *self.candidates)}
            name, _, result = machine.recheck(loaders, served.name, self.texts, BUDGET_S)
        self.build_check = {**result, "differs": changed, "chosen": served.name,
                            "chosen_on": self.recorded}
        logger.warning("machine check at build: this CPU (%s) is not the one variant %s was "
                       "chosen on (%s); texts/s here %s: the bento serves %s",
                       machine.summary(here), served.name, machine.summary(self.recorded),
                       result["texts_per_s"], name)
        self.recorded = here
        if name == served.name:
            return served
        winner = next(c for c in self.candidates if c.name == name)
        self.candidates = [c for c in self.candidates if c.name != name] + [served]
        return dataclasses.replace(winner, chosen=True)

    def write(self, model_dir: Path,
              write_files: Callable[[Variant, Path], dict[str, Any]]) -> dict[str, Any]:
        """Each candidate's files into ``model_dir/candidates/<name>/`` with ``write_files``
        (the build's own writer); returns ``{name: what the writer said}``."""
        out = {}
        for cand in self.candidates:
            dest = model_dir / CANDIDATES_DIR / cand.name
            dest.mkdir(parents=True, exist_ok=True)
            out[cand.name] = write_files(cand, dest)
        return out

    def config(self, written: dict[str, Any]) -> dict[str, Any]:
        """The ``machine_check`` section of ``bento_config.json`` (with the build machine)."""
        return {
            "recorded": self.recorded,
            "built_on": machine.describe(),
            "build_check": self.build_check,
            "budget_s": BUDGET_S,
            "texts": self.texts,
            "candidates": {
                c.name: {"folder": f"{CANDIDATES_DIR}/{c.name}",
                         "variant": {**c.to_dict(), **({"onnx": written[c.name]["onnx"]}
                                                       if "onnx" in written[c.name] else {})}}
                for c in self.candidates},
        }


#: the service-folder file that makes a service able to re-check (the text classifier's has it)
MACHINE_FILE = "maas_machine.py"


def plan(tags: dict[str, str], pinned_uri: str, served: Variant,
         service_folder: Path | None = None, requested: str | None = None) -> Plan:
    """The candidates for ``served`` (the version's own choice): the other variants within budget
    that the same runtime serves; none when a variant was ``requested`` explicitly, the table
    records no machine for it, or the service (``service_folder``) has no ``maas_machine.py``."""
    table = variant_table(tags, pinned_uri)
    recorded = (table.get(served.name) or {}).get("machine")
    recorded = recorded if isinstance(recorded, dict) else None
    able = service_folder is None or (Path(service_folder) / MACHINE_FILE).is_file()
    if requested or not served.chosen or recorded is None or not able:
        return Plan(recorded, [], [])
    candidates = []
    for name, entry in sorted(table.items()):
        if name == served.name or entry.get("runtime") != served.runtime \
                or entry.get("within_budget") is not True or entry.get("error"):
            continue
        try:
            cand = choose_variant(tags, pinned_uri, name)
        except ValueError as exc:
            logger.info("variant %s is not a re-check candidate: %s", name, exc)
            continue
        candidates.append(cand)
    if not candidates:
        return Plan(recorded, [], [])
    logger.info("bento carries %s besides %s for a re-check on a CPU unlike %s",
                ", ".join(c.name for c in candidates), served.name, machine.summary(recorded))
    return Plan(recorded, candidates, _call_texts(example_texts(pinned_uri)))


def _loader(variant: Variant, folder: Path, write_files: Callable[[Variant, Path], dict[str, Any]],
            settings: BentoSettings, threads: int) -> Callable[[], Any]:
    """Writes the variant's files into ``folder`` now; returns a loader of its serving runtime
    (the bento's own ``maas_runtime``)."""
    from bentos.text_classifier import maas_runtime

    folder.mkdir(parents=True, exist_ok=True)
    files = write_files(variant, folder)
    spec = {**variant.to_dict(), **({"onnx": files["onnx"]} if "onnx" in files else {})}
    serving = {**settings.to_dict(), "forward_batch_size": settings.forward_batch_size
               or variant.forward_batch_size}
    return lambda: maas_runtime.load_runtime(spec, folder, serving, files["labels"], threads)


def _call_texts(example_texts: list[str] | None) -> list[str]:
    texts = [t for t in (example_texts or []) if isinstance(t, str) and t.strip()]
    pool = texts + [t for t in DEFAULT_TEXTS if t not in texts]
    return [pool[i % len(pool)] for i in range(CALL_TEXTS)]


def example_texts(model_uri: str) -> list[str]:
    """The input example stored with the registered model (strings only); empty when there is
    none or it cannot be read (the defaults are used then)."""
    try:
        import mlflow
        from mlflow.models import Model

        info = Model.load(model_uri).saved_input_example_info or {}
        if not info.get("artifact_path"):
            return []
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{model_uri.rstrip('/')}/{info['artifact_path']}")
        return _strings(json.loads(Path(path).read_text("utf-8")))[:CALL_TEXTS]
    except Exception as exc:  # the check still runs, on the default texts
        logger.info("no example texts from %s (%s: %s); the machine check uses its defaults",
                    model_uri, type(exc).__name__, exc)
        return []


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []
