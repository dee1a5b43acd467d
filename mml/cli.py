"""The `mml` command line. Each pipeline stage registers its own commands from a small `cli.py`
module of its package (which imports heavy libraries such as torch only inside the command)."""

from __future__ import annotations

import importlib
import sys

import typer

from mml.errors import MMLError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="mml-recall: MML cold-start recall.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare datasets and item features.")
ab_app = typer.Typer(no_args_is_help=True, help="A/B test tools.")
app.add_typer(data_app, name="data")
app.add_typer(ab_app, name="ab")

GROUPS: dict[str, typer.Typer] = {"root": app, "data": data_app, "ab": ab_app}

# Stage order = pipeline order: data -> features -> training -> export -> service -> benchmarks.
COMMAND_MODULES = [
    "training.data.cli",
    "training.features.cli",
    "training.cli",
    "training.export.cli",
    "training.evaluation.cli",
    "service.cli",
    "mml.bench",
]


def _register() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a stage not built yet: its commands are simply absent
            if exc.name and name.startswith(exc.name):
                continue
            raise
        module.register(GROUPS)


_register()


def main() -> None:
    try:
        code = app(standalone_mode=False)  # without standalone mode click returns exit codes
        if isinstance(code, int) and code:
            sys.exit(code)
    except MMLError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted", fg="red", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as exc:  # click usage errors carry their own exit code
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
