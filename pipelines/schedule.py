"""`maas schedule`: placeholder until the scheduler lands."""

import click


@click.command()
def schedule_command() -> None:
    """Run pipelines on their cron schedules (not yet available)."""
    raise click.ClickException("maas schedule is not available yet")
