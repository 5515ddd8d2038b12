"""The ``maas`` command. One command = one function; handlers and library verbosity are set here.

Exit codes: 0 ok, 1 unexpected error, 2 bad config or arguments, 3 bad data (incl. the GX gate),
4 registry refused (unknown model/version, nothing to roll back to, permission denied on the
tracking server), 5 already running. Every message is passed through ``pipelines.redact``.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import click

DEFAULT_PIPELINE = Path(__file__).with_name("sentiment.yaml")
EXIT_CONFIG, EXIT_DATA, EXIT_REGISTRY, EXIT_BUSY = 2, 3, 4, 5

log = logging.getLogger("maas")


def _setup_logging(verbose: bool) -> None:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bar
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # the per-load "LOAD REPORT"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    from pipelines.redact import RedactingFilter

    for handler in logging.getLogger().handlers:  # credentials never reach the terminal/log
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    sys.excepthook = _redacting_excepthook
    quiet = logging.INFO if verbose else logging.WARNING
    for name in ("mlflow", "optuna", "great_expectations", "bentoml", "alembic", "urllib3",
                 "httpx", "matplotlib", "PIL", "filelock", "huggingface_hub"):
        logging.getLogger(name).setLevel(quiet)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if not verbose:
        warnings.filterwarnings("ignore")


def _errors(fn):
    """Map the known failures to a one-paragraph message and an exit code; no tracebacks."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pipelines.config import ConfigError
        from pipelines.data import DataError
        from pipelines.families.text_classifier import CheckpointError
        from pipelines.run import (RunInProgress, TrackingPermissionDenied, ValidationFailed,
                                   is_permission_error)
        from validation import SuiteError, UnknownSuiteError

        try:
            return fn(*args, **kwargs)
        except (ConfigError, CheckpointError, SuiteError, UnknownSuiteError) as exc:
            _fail(exc, EXIT_CONFIG)
        except (DataError, ValidationFailed) as exc:
            _fail(exc, EXIT_DATA)
        except RunInProgress as exc:
            _fail(exc, EXIT_BUSY)
        except TrackingPermissionDenied as exc:
            _fail(exc, EXIT_REGISTRY)
        except Exception as exc:
            from registry import RegistryError

            if isinstance(exc, RegistryError):
                _fail(exc, EXIT_REGISTRY)
            if is_permission_error(exc):
                _fail(f"permission denied on the tracking server: {exc}", EXIT_REGISTRY)
            raise

    return wrapper


def _redacting_excepthook(kind, value, tb) -> None:
    """Unexpected errors still show their traceback (exit 1), with credentials masked."""
    import traceback

    from pipelines.redact import redact

    sys.stderr.write(redact("".join(traceback.format_exception(kind, value, tb))))


def _fail(exc: object, code: int) -> None:
    """Print ``error: <message>`` (credentials masked) and exit with ``code``."""
    from pipelines.redact import redact

    click.echo(f"error: {redact(str(exc))}", err=True)
    sys.exit(code)


def _parse_overrides(pairs: tuple[str, ...]) -> dict[str, Any]:
    import yaml

    from pipelines.config import ConfigError

    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE (e.g. tuning.n_trials=1)")
        k, v = pair.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"--set {k.strip()}: cannot parse the value {v!r} ({problem}); "
                              "quote it or fix the YAML (e.g. a list is [1, 2])") from None
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Show library logs and warnings.")
def main(verbose: bool) -> None:
    """MaaS: turn a labelled data set into a served model.

    \b
    maas run                      run pipelines/sentiment.yaml on the embedded default
    maas run my.yaml --set tuning.n_trials=1
    maas models NAME              versions, aliases, metrics, promotion decisions
    maas promote NAME VERSION     move the champion alias by hand
    maas rollback NAME            champion back to the previous champion
    maas build NAME@champion      bento from a registry alias

    The MLflow store is the pipeline's tracking_uri, else MLFLOW_TRACKING_URI, else
    sqlite:///mlflow.db in the working directory (see it with `mlflow ui`).
    """
    _setup_logging(verbose)


@main.command()
@click.argument("pipeline", required=False, type=click.Path(path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config field by its dotted path (repeatable).")
@click.option("--no-build", is_flag=True, help="Skip packaging the champion as a bento.")
@click.option("--storage", help="Optuna RDB storage URL (default: optuna.db beside mlflow.db).")
@click.option("--trigger", default="manual", type=click.Choice(["manual", "schedule"]),
              help="Recorded on the run as maas.trigger; `schedule` (a scheduler's run) takes "
                   "no per-pipeline lock: the scheduler keeps runs apart.")
@click.option("--schedule-attempt", type=click.IntRange(1), hidden=True,
              help="Set by `maas schedule`: the attempt of this fire (tag maas.schedule_attempt).")
@click.option("--no-resume", is_flag=True, help="Never resume an unfinished run.")
@_errors
def run(pipeline: Path | None, overrides: tuple[str, ...], no_build: bool, storage: str | None,
        trigger: str, schedule_attempt: int | None, no_resume: bool) -> None:
    """Run a pipeline file end to end (default: the packaged sentiment pipeline)."""
    from pipelines.config import PipelineConfig
    from pipelines.run import run_pipeline
    from pipelines.scheduling import PipelineBusy, manual_run_lock

    cfg = PipelineConfig.load(pipeline or DEFAULT_PIPELINE, _parse_overrides(overrides))
    try:
        with manual_run_lock(cfg, trigger=trigger):
            result = run_pipeline(cfg, trigger=trigger, schedule_attempt=schedule_attempt,
                                  storage=storage, build=not no_build, resume=not no_resume)
    except PipelineBusy as exc:
        _fail(exc, EXIT_BUSY)
    click.echo(_summary(result))


def _summary(r) -> str:
    from pipelines.redact import redact

    lines = [
        "",
        f"MaaS pipeline {r.pipeline!r} finished in {r.seconds:.0f} s"
        + (" (resumed run)" if r.resumed else ""),
        f"  MLflow run        {r.run_id}  (tracking: {redact(r.tracking_uri)}; "
        "`mlflow ui` to browse)",
        f"  data sha256       {r.data_fingerprint[:16]}...  validation: "
        f"{'passed' if r.validation_success else 'FAILED'}",
        f"  Optuna study      {r.study_name}  best trial #{r.best_trial} {r.best_params}",
        "  test metrics      " + ", ".join(f"{k}={v:.4f}" for k, v in r.test_metrics.items()),
        f"  registered        {r.model_name} version {r.model_version} (alias challenger)",
        *([f"  variant           {r.variant} ({r.variant_speedup:.2f}x fp32 texts/s; table in "
           "the run's compression/variants.md)"] if r.variant else []),
        f"  promoted          {'yes' if r.promoted else 'no'}: {r.decision_reason}",
        f"  champion          {r.model_name}@champion = version {r.champion_version}",
    ]
    if r.bento_tag:
        lines += [f"  bento             {r.bento_tag}",
                  f"  serve with        {r.serve_command}"]
    elif r.champion_version:
        lines += [f"  bento             not rebuilt (champion unchanged); "
                  f"`maas build {r.model_name}@champion` packages it"]
    return redact("\n".join(lines))


@main.command()
@click.argument("pipeline", type=click.Path(path_type=Path))
@click.option("--storage", required=True, envvar="MAAS_OPTUNA_STORAGE",
              help="Optuna RDB storage URL shared by all workers, e.g. postgresql://host/db.")
@click.option("--worker", is_flag=True,
              help="Only add trials to the running pipeline's study, then exit.")
@click.option("--run-id", help="Worker: the parent MLflow run to join (default: the newest "
                               "unfinished run of this pipeline on the same data).")
@click.option("--wait", "wait_s", default=600.0, show_default=True,
              help="Worker: seconds to wait for the coordinator's study to appear.")
@click.option("--seed", type=int, default=None,
              help="Worker: its TPE sampler seed (default: derived from the pid and clock, so "
                   "workers explore different parameters; give distinct seeds to reproduce).")
@click.option("--no-build", is_flag=True, help="Skip packaging the champion as a bento.")
@_errors
def tune(pipeline: Path, storage: str, worker: bool, run_id: str | None, wait_s: float,
         seed: int | None, no_build: bool) -> None:
    """Distributed tuning: many processes/machines share one Optuna study in an RDB storage.

    \b
    coordinator:  maas tune PIPELINE.yaml --storage postgresql://.../optuna
                  (the whole pipeline; it tunes too, then evaluates, registers, promotes)
    workers:      maas tune PIPELINE.yaml --storage postgresql://.../optuna --worker
    The trial budget (tuning.n_trials) is met exactly, whatever the number of workers.
    """
    from pipelines.config import PipelineConfig
    from pipelines.run import join_study, run_pipeline

    cfg = PipelineConfig.load(pipeline)
    if worker:
        name = join_study(cfg, storage, run_id=run_id, wait_s=wait_s, seed=seed)
        click.echo(f"worker done: study {name} has its {cfg.tuning.n_trials} trials")
        return
    result = run_pipeline(cfg, storage=storage, build=not no_build)
    click.echo(_summary(result))


@main.command()
@click.argument("pipeline", required=False, type=click.Path(path_type=Path))
@_errors
def validate(pipeline: Path | None) -> None:
    """Check a pipeline's config and data against its expectation suite only (no MLflow run)."""
    from pipelines.config import PipelineConfig
    from pipelines.data import load_data
    from validation import validate as gx_validate

    cfg = PipelineConfig.load(pipeline or DEFAULT_PIPELINE)
    raw = load_data(cfg.data)
    report = gx_validate(raw.all_rows[["text", "label"]], cfg.validation.suite)
    click.echo(report.summary())
    if not report.success:
        sys.exit(EXIT_DATA)


@main.command()
@click.argument("name")
@click.argument("version")
@_errors
def promote(name: str, version: str) -> None:
    """Make VERSION of model NAME the champion (recorded on the version, with the previous one)."""
    from registry import champion
    from registry import promote as do_promote

    do_promote(name, version, None, actor=f"manual:{os.environ.get('USER', 'unknown')}")
    now = champion(name)
    click.echo(f"{name}@champion = version {now.version if now else None}")


@main.command()
@click.argument("name")
@_errors
def rollback(name: str) -> None:
    """Move the champion alias of NAME back to the previous champion."""
    from registry import rollback as do_rollback

    version = do_rollback(name, actor=f"manual:{os.environ.get('USER', 'unknown')}")
    click.echo(f"{name}@champion = version {version} (rolled back)")


@main.command()
@click.argument("name")
@click.option("--history", "show_history", is_flag=True,
              help="List every move of the champion alias instead: when, who, from -> to, why.")
@_errors
def models(name: str, show_history: bool) -> None:
    """List the versions of NAME with aliases, test metrics and promotion decisions."""
    from registry import describe, format_history, format_table, history

    click.echo(format_history(history(name)) if show_history else format_table(describe(name)))


@main.command()
@click.argument("ref", metavar="NAME@ALIAS")
@click.option("--json", "as_json", is_flag=True, help="Print the card's JSON form instead.")
@_errors
def card(ref: str, as_json: bool) -> None:
    """Print the model card of a registered version: NAME@ALIAS or NAME/VERSION
    (e.g. `maas card sst2-sentiment@champion`), with its aliases, drift evidence and champion
    history as the registry has them now."""
    from registry import card_json, current_card

    name, version = _resolve_ref(ref)
    markdown, facts = current_card(name, version)
    if as_json:
        if facts is None:
            _fail(f"{ref}: version {version} has no JSON model card (registered outside "
                  "`maas run`); its description is printed without --json", EXIT_REGISTRY)
        click.echo(card_json(facts), nl=False)
    else:
        click.echo(markdown or f"(version {version} of {name} has no model card)")


def _resolve_ref(ref: str) -> tuple[str, str]:
    """NAME@ALIAS or NAME/VERSION -> (name, version); unknown ones are a RegistryError."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipelines.config import ConfigError
    from registry import RegistryError

    client = MlflowClient()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return name, str(client.get_model_version_by_alias(name, alias).version)
        if "/" in ref:
            name, version = ref.rsplit("/", 1)
            return name, str(client.get_model_version(name, version).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise RegistryError(f"{ref}: no such registered model version ({exc.message})"
                                ) from None
        raise
    raise ConfigError(f"{ref!r}: expected NAME@ALIAS (or NAME/VERSION)")


@main.command()
@click.argument("ref", metavar="NAME@ALIAS")
@click.option("--quantize", is_flag=True, help="Dynamic int8 quantisation (CPU deployments).")
@click.option("--max-batch-size", type=int, default=32, show_default=True)
@click.option("--max-latency-ms", type=int, default=5000, show_default=True)
@click.option("--variant", default=None, metavar="NAME",
              help="Compression variant to serve (fp32, onnx, onnx-int8, pruned, "
                   "pruned+onnx-int8); default: the version's chosen one (tag maas.variant).")
@_errors
def build(ref: str, quantize: bool, max_batch_size: int, max_latency_ms: int,
          variant: str | None) -> None:
    """Build a bento from a registry alias, e.g. `maas build sst2-sentiment@champion`."""
    from bentos import BentoSettings, build_bento
    from bentos.variants import VariantOutOfBudget
    from pipelines.config import ConfigError

    if "@" in ref:
        name, alias = ref.split("@", 1)
        uri = f"models:/{name}@{alias}"
    elif "/" in ref:
        uri = f"models:/{ref}"
    else:
        raise ConfigError(f"{ref!r}: expected NAME@ALIAS (or NAME/VERSION)")
    try:
        settings = BentoSettings.from_mapping({"quantize": quantize,  # errors name the setting
                                               "max_batch_size": max_batch_size,
                                               "max_latency_ms": max_latency_ms,
                                               "variant": variant})
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        built = build_bento(uri, settings)
    except VariantOutOfBudget as exc:  # a refusal recorded in the registry
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_REGISTRY)
    except ValueError as exc:  # unknown variant, bad variant entry, not a model version
        raise ConfigError(str(exc)) from None
    click.echo(f"bento {built.bento_tag} (model {built.model_name} v{built.model_version}, "
               f"variant {built.variant} on {built.runtime})\n"
               f"serve with: {built.serve_command}")


@main.group()
def suite() -> None:
    """Expectation suites: draft one from a pipeline's own data (`maas suite init`)."""


@suite.command("init")
@click.argument("pipeline", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False),
              help="Suite JSON to write (default: the path the pipeline's validation.suite "
                   "names, else <pipeline name>.suite.json beside the pipeline file).")
@click.option("--name", help="Suite name (default: the file name without .suite.json/.json).")
@click.option("--force", is_flag=True, help="Overwrite an existing suite file.")
@click.option("--pii", is_flag=True, help="Add the PII checks of validation.pii on `text`.")
@click.option("--share-tolerance", type=click.FloatRange(0, 1, max_open=True), default=0.5,
              show_default=True, help="Each class's share may move by this fraction of its "
                                      "observed share.")
@_errors
def suite_init(pipeline: Path, out: Path | None, name: str | None, force: bool, pii: bool,
               share_tolerance: float) -> None:
    """Draft a versioned GX suite from PIPELINE.yaml's data, taken as a trusted sample.

    \b
    Profiles exactly the rows `maas run` validates (loaded with the pipeline's own settings):
    label set, nulls, text length bounds, duplicate rate, per-class share bounds (+ PII with
    --pii); every expectation says why in its meta. Then checks the data passes the draft.
    Review the bounds before trusting the suite: see docs/suites.md.
    """
    import json

    from pipelines.config import ConfigError, PipelineConfig
    from pipelines.data import DataError, load_data
    from validation import ProfileError, draft_suite
    from validation import validate as gx_validate

    cfg = PipelineConfig.load(pipeline)
    target = (out or cfg.validation.suite_path
              or pipeline.parent / f"{cfg.name}.suite.json").expanduser().absolute()
    if target.exists() and not force:
        raise ConfigError(f"{target}: a suite already exists there; pass --force to overwrite "
                          "it, or --out to write elsewhere")
    raw = load_data(cfg.data)
    frame = raw.all_rows[["text", "label"]]
    suite_name = name or target.name.removesuffix(".json").removesuffix(".suite")
    try:
        spec = draft_suite(frame, suite_name, share_tolerance=share_tolerance, pii=pii,
                           fingerprint=raw.fingerprint,
                           source=", ".join(Path(f).name for f in raw.files.values()))
    except ProfileError as exc:
        raise DataError(str(exc)) from None
    except ImportError as exc:  # --pii without validation.pii
        raise ConfigError(f"--pii: {exc}") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("w" if force else "x", encoding="utf-8") as fh:
        fh.write(json.dumps(spec, indent=2, ensure_ascii=False) + "\n")
    click.echo(f"wrote suite {spec['name']!r} v{spec['meta']['version']} "
               f"({len(spec['expectations'])} expectations from {len(frame)} rows) to {target}")
    used = cfg.validation.suite_path
    if used is None or used.resolve() != target.resolve():
        rel = os.path.relpath(target, pipeline.absolute().parent)
        click.echo(f"{pipeline} still uses suite {cfg.validation.suite!r}; to use the draft, set "
                   f"in it:\n  validation:\n    suite: {rel}")
    report = gx_validate(frame, target)
    click.echo(report.summary())
    if not report.success:
        _fail(f"the draft fails on the data it was drafted from (see above; --pii finds personal "
              f"data in it?): edit {target} or clean the data", EXIT_DATA)


@main.group()
def webhook() -> None:
    """Champion-alias webhooks: rebuild the bento whenever NAME@champion moves.

    \b
    maas webhook serve --port 8642            the receiver (secret from $MAAS_WEBHOOK_SECRET)
    maas webhook register NAME --url http://RECEIVER:8642/webhook
    Needs an MLflow tracking server (>= 3.3) with a SQL backend; see docs/webhooks.md.
    """


_SECRET_ENV = "MAAS_WEBHOOK_SECRET"


def _webhook_secret(secret_env: str, secret_file: Path | None) -> str:
    """The shared secret from ``--secret-file`` or ``$secret_env`` (never printed)."""
    from bentos.webhook_register import WebhookSetupError, check_secret
    from pipelines.config import ConfigError

    if secret_file is not None:
        source = f"--secret-file {secret_file}"
        try:
            secret = secret_file.read_text("utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{source}: {exc.strerror or exc}") from None
    else:
        source, secret = f"${secret_env}", os.environ.get(secret_env, "").strip()
    try:
        return check_secret(secret, source)
    except WebhookSetupError as exc:
        raise ConfigError(str(exc)) from None


def _secret_options(fn):
    fn = click.option("--secret-file", type=click.Path(path_type=Path, dir_okay=False),
                      help="Read the shared secret from this file instead.")(fn)
    return click.option("--secret-env", default=_SECRET_ENV, show_default=True, metavar="VAR",
                        help="Environment variable holding the shared HMAC secret.")(fn)


@webhook.command("register")
@click.argument("name")
@click.option("--url", required=True,
              help="The receiver's URL as the tracking server reaches it, e.g. "
                   "http://10.0.0.5:8642/webhook (?model=NAME is added).")
@_secret_options
@click.option("--no-test", is_flag=True, help="Skip MLflow's signed test delivery.")
@_errors
def webhook_register(name: str, url: str, secret_env: str, secret_file: Path | None,
                     no_test: bool) -> None:
    """Create (or update: never a duplicate) NAME's webhook for alias created/deleted events."""
    from bentos.webhook_register import WebhookSetupError, register_webhook, webhook_url
    from pipelines.config import ConfigError
    from pipelines.redact import redact

    secret = _webhook_secret(secret_env, secret_file)
    try:
        webhook_url(url, name)
    except WebhookSetupError as exc:
        raise ConfigError(str(exc)) from None
    try:
        r = register_webhook(name, url, secret, test=not no_test)
    except WebhookSetupError as exc:
        _fail(exc, EXIT_REGISTRY)
    click.echo(f"{'created' if r.created else 'updated'} webhook {r.name} ({r.webhook_id}) -> "
               f"{redact(r.url)}; events model_version_alias.created/deleted"
               + (f"; removed {r.removed_duplicates} duplicate(s)" if r.removed_duplicates
                  else ""))
    if r.test_ok:
        click.echo(f"test delivery: answered HTTP {r.test_status}")
    elif r.test_ok is False:
        click.echo(f"warning: test delivery failed (HTTP {r.test_status}): "
                   f"{redact(r.test_error or '')}; is `maas webhook serve` running there with "
                   "the same secret?", err=True)


@webhook.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8642, show_default=True, type=click.IntRange(1, 65535))
@_secret_options
@click.option("--window-s", default=300, show_default=True, type=click.IntRange(1, 86400),
              help="Accept deliveries whose timestamp is within this many seconds of now.")
@click.option("--model", "models", multiple=True, metavar="NAME",
              help="Only rebuild these models (repeatable; default: any model whose webhook "
                   "points here).")
@click.option("--set", "pairs", multiple=True, metavar="KEY=VALUE",
              help="A bento setting for the rebuilds (repeatable), e.g. --set quantize=true.")
@_errors
def webhook_serve(host: str, port: int, secret_env: str, secret_file: Path | None,
                  window_s: int, models: tuple[str, ...], pairs: tuple[str, ...]) -> None:
    """Receive MLflow alias webhooks; rebuild models:/NAME@champion when champion moves."""
    import mlflow

    from bentos import BentoSettings
    from bentos.webhook import serve
    from pipelines.config import ConfigError
    from pipelines.redact import redact

    secret = _webhook_secret(secret_env, secret_file)
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise ConfigError(f"--set {bad[0]!r}: expected KEY=VALUE (e.g. quantize=true)")
    try:
        settings = BentoSettings.from_mapping(dict(p.split("=", 1) for p in pairs))
    except ValueError as exc:
        raise ConfigError(f"--set: {exc}") from None
    log.info("webhook receiver: tracking %s, BentoML home %s",
             redact(mlflow.get_tracking_uri()), os.environ.get("BENTOML_HOME", "~/bentoml"))
    serve(secret, host=host, port=port, window_s=window_s, settings=settings,
          models=frozenset(models) or None)


def _register_subcommands() -> None:
    from pipelines.scheduling.cli import schedule_command

    main.add_command(schedule_command, "schedule")


_register_subcommands()

if __name__ == "__main__":  # pragma: no cover
    main()
