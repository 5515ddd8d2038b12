"""``run_study`` and memory between trials: the garbage a trial leaves (reference cycles, as a
trainer's model and optimizer state make) is collected when the trial ends, and the heap freeze
that makes that collection cheap is undone when the study ends, also when it ends in an error.
A real Optuna study on SQLite; the objective is a probe that leaves one cycle per trial."""

from __future__ import annotations

import gc
import weakref

import pytest
from helpers import write_pipeline

from pipelines import tuning
from pipelines.config import PipelineConfig


class _Cycle:
    def __init__(self) -> None:
        self.me = self                      # freed by the cycle collector only
        self.payload = bytearray(1 << 20)


class CycleObjective:
    """Each trial leaves a cycle behind and records whether the previous trial's was still
    alive when it started; ``stop_at`` raises KeyboardInterrupt in that trial."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.refs: list[weakref.ref] = []
        self.previous_alive: list[bool] = []
        self.stop_at = stop_at

    def __call__(self, trial) -> float:
        self.previous_alive.append(any(r() is not None for r in self.refs))
        self.refs.append(weakref.ref(_Cycle()))
        if trial.number == self.stop_at:
            raise KeyboardInterrupt
        return 0.5


@pytest.fixture
def study(tmp_path):
    # the study needs the config's tuning section only: no checkpoint is read
    cfg = PipelineConfig.load(write_pipeline(tmp_path, tmp_path / "no-checkpoint"))
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = tuning.open_study(cfg, tuning.make_storage(url), "memory")
    return study, url


@pytest.fixture
def no_automatic_gc():
    """Only run_study's own collections may free the cycles."""
    was = gc.isenabled()
    gc.disable()
    yield
    if was:
        gc.enable()


def test_each_trials_cycles_are_freed_when_it_ends(study, no_automatic_gc):
    study, url = study
    objective = CycleObjective()
    tuning.run_study(study, objective, n_trials=3, storage_url=url, show_progress_bar=False)
    assert objective.previous_alive == [False, False, False]
    assert [r() for r in objective.refs] == [None, None, None]
    assert gc.get_freeze_count() == 0               # the heap is not left frozen


def test_the_heap_is_unfrozen_when_the_study_is_interrupted(study, no_automatic_gc):
    study, url = study
    objective = CycleObjective(stop_at=1)
    with pytest.raises(KeyboardInterrupt):
        tuning.run_study(study, objective, n_trials=3, storage_url=url, show_progress_bar=False)
    assert objective.previous_alive == [False, False]
    assert gc.get_freeze_count() == 0
