"""The ``rbyz`` command line (typer): ``run``, ``sweep``, ``list``, ``report``, ``demo``,
``errors``.

Every command checks its whole configuration before it trains: a bad setting ends with exit
status 2 and a message naming the field (``rbyz run cfg.toml --set workers.f=20`` with Krum:
``krum: needs n >= 2f + 3; got n=25, f=20``).

Example::

    rbyz list                                  # every rule and attack, from the declarations
    rbyz run experiment.toml --set train.steps=100 --out runs/one
    rbyz sweep grid.toml --out runs/grid       # re-run to resume; finished runs are skipped
    rbyz report runs/grid                      # tables and plots from finished runs
    rbyz demo                                  # the main job
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

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
) -> None:
    """Train one experiment; writes results.csv, config.toml, report and plots into OUT."""
    from rbyz.sim import config as config_lib
    from rbyz.sim import report, train

    try:
        exp = config_lib.load(config, set_)
        out = out or Path("runs") / exp.name
        train.defence(exp)
        history = train.train(exp, run_dir=out, progress=not quiet)
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
) -> None:
    """Train every experiment of a grid (rules x attacks x f x heterogeneity x seeds); skips
    finished runs, resumes a half-written one; writes the table with each rule's worst-case
    attack, the accuracy plot and the heatmap."""
    from rbyz.sim import config as config_lib
    from rbyz.sim import sweep

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
