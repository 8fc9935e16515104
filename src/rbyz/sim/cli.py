"""The ``rbyz`` command line (typer): ``run``, ``sweep``, ``list``, ``report``, ``privacy``,
``demo``, ``errors``.

Every command checks its whole configuration before it trains: a bad setting ends with exit
status 2 and a message naming the field (``rbyz run cfg.toml --set workers.f=20`` with Krum:
``krum: needs n >= 2f + 3; got n=25, f=20``).

Example::

    rbyz list                                  # every rule and attack, from the declarations
    rbyz run experiment.toml --set train.steps=100 --out runs/one
    rbyz run experiment.toml --cpu-devices 8 --set parallel.devices=8   # sharded over 8
    rbyz run experiment.toml --processes 2 --cpu-devices 2              # 2 processes x 2
    rbyz sweep grid.toml --out runs/grid       # re-run to resume; finished runs are skipped
    rbyz report runs/grid                      # tables and plots from finished runs
    rbyz privacy experiment.toml --epsilon 8   # the run's ε, and the noise for ε = 8
    rbyz demo                                  # the main job
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from rbyz.sim.launch import COLLECTIVE_TIMEOUT_S, HEARTBEAT_TIMEOUT_S  # stdlib only

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="rbyz: Byzantine-robust distributed training experiments.")

SET_HELP = "Override a field: section.field=value (TOML value), e.g. train.steps=100."


def _fail(err: Exception) -> None:
    typer.echo(f"rbyz: error: {err}", err=True)
    raise typer.Exit(2)


@app.command("run")
def run_command(
    config: Path = typer.Argument(..., help="The experiment's TOML file."),
    out: Path | None = typer.Option(None, help="The run directory (default runs/<name>)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    quiet: bool = typer.Option(False, help="No progress bar."),
    cpu_devices: int = typer.Option(
        0, help="Simulate this many CPU devices (per process), e.g. with parallel.devices."),
    processes: int = typer.Option(
        0, help="Start this many CPU processes on 127.0.0.1 (a test of a multi-host run), one "
                "run across all their devices (--cpu-devices each, default 1)."),
    distributed: bool = typer.Option(
        False, help="Join a cluster run: jax.distributed reads SLURM / Open MPI / TPU env."),
    coordinator: str | None = typer.Option(None, help="HOST:PORT of process 0 (cluster run)."),
    num_processes: int | None = typer.Option(None, help="Processes of the run (cluster run)."),
    process_id: int | None = typer.Option(None, help="This process's index (cluster run)."),
    heartbeat_timeout: int = typer.Option(
        HEARTBEAT_TIMEOUT_S,
        help="Seconds without a heartbeat before the runtime ends every process."),
    collective_timeout: int = typer.Option(
        COLLECTIVE_TIMEOUT_S,
        help="Seconds a CPU collective waits for another process before it fails."),
) -> None:
    """Train one experiment; writes results.csv, config.toml, report and plots into OUT.

    Across processes (--processes, --distributed, --coordinator) the workers are spread over
    every device of every process (parallel.devices = 1 becomes 0: all); a process that dies
    ends the others with an error, and the same command resumes from the last checkpoint.
    """
    from rbyz.sim import config as config_lib

    try:
        exp = config_lib.load(config, set_)
    except ValueError as err:
        _fail(err)
    out = out or Path("runs") / exp.name
    if processes:
        from rbyz.sim import defences, launch

        try:  # every setting checked here, before any process starts
            defences.defence(exp)
        except ValueError as err:
            _fail(err)
        argv = [str(config), "--out", str(out), *(f"--set={s}" for s in set_)]
        argv += ["--quiet"] if quiet else []
        # Local processes are for testing: they run on the CPU (one device each by default).
        raise typer.Exit(launch.launch(argv, processes, cpu_devices=cpu_devices or 1,
                                       heartbeat_timeout=heartbeat_timeout,
                                       collective_timeout=collective_timeout))
    across = distributed or coordinator is not None
    try:
        if across:
            from rbyz.sim import launch

            launch.initialize(coordinator=coordinator, num_processes=num_processes,
                              process_id=process_id, cpu_devices=cpu_devices, auto=distributed,
                              heartbeat_timeout=heartbeat_timeout,
                              collective_timeout=collective_timeout)
            if exp.parallel.devices == 1:  # one device cannot hold a run across processes
                exp = config_lib.override(exp, ["parallel.devices=0"])
        elif cpu_devices:
            import jax

            jax.config.update("jax_num_cpu_devices", cpu_devices)
    except ValueError as err:
        _fail(err)
    _train_and_report(exp, out, quiet)


def _train_and_report(exp, out: Path, quiet: bool) -> None:
    import jax

    from rbyz.sim import launch, report, train

    try:
        history = train.train(exp, run_dir=out, progress=not quiet)
    except ValueError as err:
        _fail(err)
    except Exception as err:  # across processes: another one died; exit now, never hang
        launch.fail_fast(err)
        raise
    if jax.process_index() != 0:
        return
    try:
        written = report.report(out)
    except ValueError as err:
        _fail(err)
    last = history.rows[-1]
    typer.echo(f"{exp.rule_label} / {exp.attack_label}: test accuracy "
               f"{100 * last['test_accuracy']:.1f}% after {last['step']} steps")
    typer.echo(f"wrote {out / 'results.csv'}, " + ", ".join(str(p) for p in written.values()))


@app.command("sweep")
def sweep_command(
    config: Path = typer.Argument(..., help="A TOML file with a [sweep] table of axes."),
    out: Path | None = typer.Option(None, help="The sweep directory (default runs/<name>)."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    quiet: bool = typer.Option(False, help="No progress bars."),
    cpu_devices: int = typer.Option(
        0, help="Simulate this many CPU devices, e.g. for runs with parallel.devices."),
) -> None:
    """Train every experiment of a grid (rules x attacks x f x heterogeneity x seeds); skips
    finished runs, resumes a half-written one; writes the table with each rule's worst-case
    attack, the accuracy plot and the heatmap."""
    from rbyz.sim import config as config_lib
    from rbyz.sim import sweep

    if cpu_devices:
        import jax

        jax.config.update("jax_num_cpu_devices", cpu_devices)
    try:
        document = config_lib.read(config)
        out = out or Path("runs") / str(document.get("name", "sweep"))
        sweep.run_sweep(document, out, overrides=set_, progress=not quiet)
    except ValueError as err:
        _fail(err)
    typer.echo((out / "report.md").read_text())
    typer.echo(f"wrote {out}/results.csv, report.md, accuracy.png, heatmap.png")


@app.command("list")
def list_command(
    kind: str | None = typer.Argument(
        None, help="aggregator, preaggregator, attack or algorithm (default: all)."),
) -> None:
    """Every rule and attack: its constraint on n and f, key, state, cost and reference."""
    from rbyz.sim import catalogue

    try:
        typer.echo(catalogue.table(kind))
    except ValueError as err:
        _fail(err)


@app.command("report")
def report_command(directory: Path = typer.Argument(..., help="A run or sweep directory.")) -> None:
    """Tables and plots from finished runs (every results.csv under DIRECTORY)."""
    from rbyz.sim import report

    try:
        written = report.report(directory)
    except ValueError as err:
        _fail(err)
    typer.echo(written["report"].read_text() if "report" in written else "")
    typer.echo("wrote " + ", ".join(str(p) for p in written.values()))


@app.command("privacy")
def privacy_command(
    config: Path = typer.Argument(..., help="The experiment's TOML file."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    epsilon: float | None = typer.Option(
        None, help="Also print the noise that gives every worker this ε (at privacy.delta)."),
) -> None:
    """The ε of a run without training: per worker size, its sampling rate, noise multiplier
    and ε after train.steps steps (privacy.enabled is switched on if the file leaves it off)."""
    from tabulate import tabulate

    from rbyz.sim import config as config_lib
    from rbyz.sim import private, train

    try:
        exp = config_lib.load(config, set_)
        if not exp.privacy.enabled:
            typer.echo("(privacy.enabled is off in the file; shown as if it were on)")
            exp = config_lib.override(exp, ["privacy.enabled=true"])
        t = train.task(exp)
        rows = private.describe(exp, t.privacy.dataset_sizes, epsilon)
    except ValueError as err:
        _fail(err)
    p = t.privacy
    typer.echo(f"{exp.rule_label}: {p.sampling} sampling, {p.noise} noise at the "
               f"{p.at}, clip C = {p.clip:g} ({p.norm}), {exp.train.steps} steps, "
               f"{p.accountant.upper()} accountant, delta = {p.delta:g}, neighbouring relation "
               f"{p.relation}" + (f", capacity {p.capacity}" if p.sampling == "poisson" else "")
               + ".")
    typer.echo(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".4g"))
    typer.echo(f"epsilon of the run (the weakest worker's): {max(r['epsilon'] for r in rows):.4g}")
    if epsilon:
        typer.echo(f"for epsilon <= {epsilon:g}: b = {rows[0]['b_for_target']:.4g} "
                   f"(privacy.b), e.g. --set privacy.epsilon={epsilon:g}")


@app.command("demo")
def demo_command(
    out: Path = typer.Option(Path("runs/demo"), help="The output directory."),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    quiet: bool = typer.Option(False, help="No progress bars."),
    show: bool = typer.Option(False, help="Print the demo's sweep file (to copy) and exit."),
) -> None:
    """The main job: mean, median, trimmed mean, Krum, Bulyan, geometric median, centered
    clipping, NNM + Krum and DETOX under no attack, ALIE and IPM; n = 25, f = 5."""
    from rbyz.sim import demo

    if show:
        typer.echo(demo.source())
        return
    try:
        text = demo.main(out, overrides=set_, progress=not quiet)
    except ValueError as err:
        _fail(err)
    typer.echo(text)


@app.command("errors", context_settings={"allow_extra_args": True,
                                         "ignore_unknown_options": True})
def errors_command(ctx: typer.Context) -> None:
    """The aggregation-error table on synthetic gradients (every rule x every attack, one
    aggregation; options --n --f --d --sigma --seed --out)."""
    from rbyz.sim import errors

    errors.main(list(ctx.args))


def main() -> None:
    """Entry point of the ``rbyz`` console script."""
    app(prog_name="rbyz")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
