"""Small MlflowClient helpers on registered models and their versions, shared by the registry's
modules: lookups that raise :class:`RegistryError`, the paginated version search, tag writes."""

from __future__ import annotations

import logging

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

logger = logging.getLogger(__name__)

#: MLflow's error codes for a missing model / version / alias
NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


class RegistryError(ValueError):
    """A registry operation could not be done (unknown model/version, nothing to roll back...)."""


def get_model(client, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"unknown registered model {name!r}") from exc
        raise


def get_version(client, name: str, version: str) -> ModelVersion:
    get_model(client, name)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code in NOT_FOUND:
            raise RegistryError(f"model {name!r} has no version {version!r}") from exc
        raise


def alias_version(client, name: str, alias: str) -> str | None:
    """The version behind ``alias`` as a string; None if the model or the alias is missing."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code in NOT_FOUND:
            return None
        raise


def search_versions(client, name: str, extra: str | None = None) -> list[ModelVersion]:
    """All versions of ``name`` (every page), optionally filtered by ``AND <extra>``."""
    filter_string = f"name = {quote(name)}" + (f" AND {extra}" if extra else "")
    out: list[ModelVersion] = []
    token = None
    while True:
        page = client.search_model_versions(filter_string, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def quote(value: str) -> str:
    """``value`` as a string literal of a registry search filter."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise RegistryError(f"cannot use {value!r} in a registry search (contains both quote kinds)")


def set_tags(client, name: str, version: str, tags: dict[str, str]) -> None:
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)


def restore_tags(client, name: str, version: str, before: dict[str, str | None]) -> None:
    """Put tags back as they were (None: absent); best effort while another error propagates."""
    for k, v in before.items():
        try:
            if v is None:
                client.delete_model_version_tag(name, version, k)
            else:
                client.set_model_version_tag(name, version, k, v)
        except Exception:  # best effort while another error propagates
            logger.debug("could not restore tag %s on %s/%s", k, name, version, exc_info=True)


def try_set_tag(client, name: str, version: str, key: str, value: str) -> None:
    """Set a tag, logging (not raising) a failure."""
    try:
        client.set_model_version_tag(name, version, key, value)
    except Exception:  # best effort
        logger.debug("could not record %s on %s/%s", key, name, version, exc_info=True)
