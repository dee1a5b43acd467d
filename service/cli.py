"""`mml serve` and `mml ab srm`. Light at import: the service is imported inside the commands."""

from __future__ import annotations

from pathlib import Path

import typer


def register(groups: dict[str, typer.Typer]) -> None:
    @groups["root"].command("serve")
    def serve(
        bundle: Path = typer.Option(..., help="bundle directory (mml export --out DIR)"),
        host: str = typer.Option("127.0.0.1", help="interface to listen on"),
        port: int = typer.Option(8000, min=1, max=65535),
        workers: int = typer.Option(1, min=1, help="uvicorn worker processes (each loads the bundle)"),
        arms: Path | None = typer.Option(None, help="A/B arms config, YAML or JSON (default: one arm 'mml')"),
        redis_url: str | None = typer.Option(None, help="redis://host:port/db (default: in-process state)"),
        log_level: str = typer.Option("info", help="uvicorn log level"),
        startup_timeout: int = typer.Option(
            120,
            min=1,
            help="seconds a new worker may take to load the bundle when uvicorn restarts workers "
            "(SIGHUP: one by one, each old worker retired once its replacement is ready)",
        ),
    ) -> None:
        """Serve POST /recall over a bundle. Other settings come from the environment (docs/service.md);
        the admin token only from MML_ADMIN_TOKEN, so it never shows in the process list."""
        import os
        import shutil
        import tempfile

        from mml.bundle import verify_bundle
        from mml.errors import MMLError
        from service.ab import load_arms

        if not bundle.is_dir():
            raise MMLError(f"--bundle {bundle}: not a directory")
        verify_bundle(bundle)  # fail fast, in one line, before starting workers
        load_arms(arms)
        os.environ["MML_BUNDLE"] = str(bundle.absolute())  # a symlink stays one: SIGHUP follows it
        if arms is not None:
            os.environ["MML_ARMS_CONFIG"] = str(arms.absolute())
        if redis_url is not None:
            os.environ["REDIS_URL"] = redis_url
        control_dir = None
        if workers > 1:  # what the workers serve, so that a reload reaches all of them (service/workers.py)
            from service.workers import WorkerGroup

            control_dir = tempfile.mkdtemp(prefix="mml-control-")
            os.environ.update(WorkerGroup.create(Path(control_dir), bundle, workers).environment())
        own_metrics_dir = None
        if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            own_metrics_dir = tempfile.mkdtemp(prefix="mml-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = own_metrics_dir
        elif os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # stale files of an earlier run would be summed in
            directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
            directory.mkdir(parents=True, exist_ok=True)
            for stale in directory.glob("*.db"):
                stale.unlink()

        import uvicorn

        try:
            uvicorn.run(
                "service.app:create_app",
                factory=True,
                host=host,
                port=port,
                workers=workers,
                log_level=log_level,
                access_log=False,
                timeout_graceful_shutdown=30,
                timeout_worker_healthcheck=startup_timeout,
            )
        finally:
            for folder in (own_metrics_dir, control_dir):
                if folder:
                    shutil.rmtree(folder, ignore_errors=True)

    @groups["ab"].command("srm")
    def srm(
        exposures: str = typer.Option(..., help="exposure log (JSON lines) or redis://host:port/db (stream)"),
        arms: Path | None = typer.Option(None, envvar="MML_ARMS_CONFIG", help="arms config with the weights"),
        prefix: str = typer.Option("mml:", help="Redis key prefix of the exposure stream"),
    ) -> None:
        """Sample-ratio-mismatch check: users per arm against the configured weights (chi-square).
        Exit status 1 when p < 0.001 (the split is broken; do not read the experiment)."""
        from service.ab import count_users, load_arms, read_exposures, srm_check

        config = load_arms(arms)
        weights = {a.name: a.weight for a in config.arms}
        result = srm_check(count_users(read_exposures(exposures, prefix)), weights)
        total = sum(result.observed.values())
        for arm, observed in result.observed.items():
            share = observed / total
            expected_share = result.expected[arm] / total
            typer.echo(f"{arm:>16}  users {observed:>9}  share {share:.4f}  expected {expected_share:.4f}")
        for arm, count in result.unknown_arms.items():
            typer.echo(f"{arm:>16}  users {count:>9}  (not in the config: left out)")
        typer.echo(f"chi2 = {result.chi2:.3f}, df = {result.df}, p = {result.p_value:.3g}")
        if result.mismatch:
            typer.secho("SRM detected: the assignment does not match the weights", fg="red", err=True)
            raise SystemExit(
                1
            )  # (mml.cli runs click with standalone_mode=False, which swallows typer.Exit codes)
        typer.echo("no sample ratio mismatch")

    @groups["ab"].command("report")
    def report(
        exposures: str = typer.Option(..., help="exposure log (JSON lines) or redis://host:port/db (stream)"),
        events: str = typer.Option(
            ..., help="events (JSON lines: user_id, item_id, ts) or redis://host:port/db (stored histories)"
        ),
        arms: Path | None = typer.Option(None, envvar="MML_ARMS_CONFIG", help="arms config with the weights"),
        bundle: Path | None = typer.Option(
            None,
            help="bundle whose catalogue gives coverage and the new-item share (absent: those two are left out)",
        ),
        window: str = typer.Option(
            "30m", help="how long after an exposure its next event may come (s, m, h)"
        ),
        control: str | None = typer.Option(None, help="control arm (default: 'control', else the first arm)"),
        ci: str = typer.Option(
            "delta", help="interval of the ratio metrics: delta or bootstrap (over users)"
        ),
        bootstrap: int = typer.Option(
            1000, help="bootstrap replicates (coverage; ratio metrics with --ci bootstrap)"
        ),
        seed: int = typer.Option(0, help="seed of the bootstrap"),
        prefix: str = typer.Option("mml:", help="Redis key prefix of the exposure stream and the histories"),
        as_json: bool = typer.Option(False, "--json", help="print the report as JSON instead of a table"),
    ) -> None:
        """Which arm's candidates users engaged with: each exposure joined with the user's next event;
        hit rate@10/50/100, MRR, coverage and new-item share per arm, each against the control with a
        95% interval clustered by user and a p-value. The SRM check runs first: exit status 1, and no
        comparison, when it fails (docs/service.md, "Reading an experiment")."""
        from pydantic import ValidationError

        from mml.errors import MMLError
        from service.ab import load_arms
        from service.ab_report import (
            ReportConfig,
            build_report,
            load_catalogue,
            load_events,
            load_exposures,
            parse_window,
            print_report,
        )

        if arms is None:
            raise MMLError(
                "--arms: the arms config is required (its weights are the SRM check's expectation)"
            )
        try:
            config = ReportConfig(
                window_s=parse_window(window), control=control, ci=ci, bootstrap=bootstrap, seed=seed
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            raise MMLError(f"--{'-'.join(str(p) for p in first['loc'])}: {first['msg']}") from exc
        result = build_report(
            load_exposures(exposures, prefix),
            load_events(events, prefix),
            load_arms(arms),
            config,
            load_catalogue(bundle) if bundle else None,
        )
        if as_json:
            typer.echo(result.model_dump_json(indent=2))
        else:
            print_report(result)
        if result.refused:
            raise SystemExit(1)  # the SRM gate: do not read this experiment
