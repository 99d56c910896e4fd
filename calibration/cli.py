"""``abstain calibrate`` and ``abstain evaluate``: offline, torch-free (numpy + ONNX Runtime).

Only typer and the standard library are imported here; numpy, ONNX Runtime, matplotlib and
rich tables are imported inside the commands so ``abstain --help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

ModelDir = Annotated[Path, typer.Argument(help="models/<name> (latest version) or models/<name>/<version>.")]
DatasetOpt = Annotated[
    str | None,
    typer.Option(
        "--dataset",
        help="Dataset split as training made it (with --split): digits, fashion-mnist, "
        "cifar100 or imagefolder (the last two with --data-root).",
    ),
]
DataOpt = Annotated[
    Path | None,
    typer.Option(
        "--data",
        help="An .npz with arrays x [N, C, H, W] in [0, 1] and y [N], or an ImageFolder "
        "directory <class>/<image>.",
    ),
]
DataRootOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-root",
        help="Folder of --dataset: Fashion-MNIST's IDX files (default: Debian's), "
        "cifar-100-python/'s parent, or imagefolder's train/ and val/ parent.",
    ),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Inference batch size.")]


def parse_targets(values: list[str] | None) -> list[float]:
    """``["0.8,0.9", "0.95"]`` → ``[0.8, 0.9, 0.95]``: repeated options and comma lists both work."""
    out: list[float] = []
    for value in values or []:
        for part in value.replace(" ", ",").split(","):
            if not part:
                continue
            try:
                out.append(float(part))
            except ValueError as exc:
                raise ValueError(f"targets should be numbers in (0, 1], but got {part!r}") from exc
    return out


def calibrate(
    model_dir: ModelDir,
    dataset: DatasetOpt = None,
    split: Annotated[str, typer.Option("--split", help="Split of --dataset: train, val or test.")] = "val",
    data: DataOpt = None,
    data_root: DataRootOpt = None,
    coverage: Annotated[
        list[str] | None,
        typer.Option(
            "--coverage",
            help="Target coverage(s) in (0, 1]: 0.8 0.9 0.95, 0.8,0.9,0.95 or repeated "
            "(default 0.8,0.9,0.95 unless only --risk is given).",
        ),
    ] = None,
    risk: Annotated[
        list[str] | None,
        typer.Option(
            "--risk",
            help="Target selective risk(s) in (0, 1], certified (--method) with probability "
            "1 - delta; several values as for --coverage.",
        ),
    ] = None,
    delta: Annotated[
        float,
        typer.Option(
            "--delta", help="Risk points' failure probability; 1 - delta is also the interval confidence."
        ),
    ] = 0.05,
    score: Annotated[
        str | None,
        typer.Option(
            "--score",
            help="selection, softmax_response, combined, margin or gini (default: the lowest AURC of "
            "--scores).",
        ),
    ] = None,
    scores: Annotated[
        str,
        typer.Option(
            "--scores",
            help="Candidates the lowest AURC is chosen among, comma-separated; delta is split over "
            "them. Add the post-hoc margin and gini here.",
        ),
    ] = "selection,softmax_response,combined",
    batch_size: BatchOpt = 256,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            help="How --risk points are certified: ltt (Learn then Test, fixed sequence) or sgr "
            "(Selection with Guaranteed Risk).",
        ),
    ] = "ltt",
    p_value: Annotated[
        str,
        typer.Option("--p-value", help="LTT's p-value: exact (binomial tail) or hoeffding_bentkus."),
    ] = "exact",
    set_method: Annotated[
        str,
        typer.Option(
            "--set-method",
            help="Conformal prediction set given with each abstention: lac (smallest sets), aps "
            "(adaptive), or none.",
        ),
    ] = "lac",
    set_alpha: Annotated[
        float,
        typer.Option(
            "--set-alpha",
            help="Sets hold the true class of at least 1 - alpha of each point's abstentions.",
        ),
    ] = 0.1,
    per_class: Annotated[
        bool,
        typer.Option(
            "--per-class",
            help="Class-conditional points: each target met per predicted class, one threshold each.",
        ),
    ] = False,
) -> None:
    """Fit operating points on held-out labelled data; write calibration.json next to the graph.

    Example: abstain calibrate models/digits --dataset digits --split val --coverage 0.8,0.9,0.95 --risk 0.02
    """
    from abstain.calibration.abstention_sets import SetSpec
    from abstain.calibration.calibrate import DEFAULT_COVERAGES, run_calibration

    coverages = parse_targets(coverage)
    risks = parse_targets(risk)
    if not coverage and not risks:
        coverages = list(DEFAULT_COVERAGES)
    result = run_calibration(
        model_dir,
        dataset=dataset,
        split=split,
        data=data,
        data_root=data_root,
        coverages=coverages,
        risks=risks,
        delta=delta,
        score=score,
        candidate_scores=[s.strip() for s in scores.split(",") if s.strip()],
        batch_size=batch_size,
        risk_method=method,
        p_value=p_value,
        prediction_set=None if set_method == "none" else SetSpec(method=set_method, alpha=set_alpha),
        per_class=per_class,
    )
    _print_calibration(result)


def _print_calibration(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    cal = result.calibration
    console = Console(width=max(Console().width, 120))  # tables stay whole in logs and CI
    scores = Table(title=f"scores on {cal.data['source']} (n={result.n}, accuracy {result.accuracy:.4f})")
    for col in ("score", "AURC", "E-AURC", "AUGRC"):
        scores.add_column(col)
    for name, m in cal.scores.items():
        mark = " ←" if name == result.chosen_score else ""
        scores.add_row(name + mark, f"{m['aurc']:.5f}", f"{m['eaurc']:.5f}", f"{m['augrc']:.5f}")
    console.print(scores)
    table = Table(title="operating points")
    for col in (
        "name",
        "threshold",
        "coverage",
        "coverage CI",
        "risk",
        "risk CI / bound",
        "est. risk",
        "set size / holds",
    ):
        table.add_column(col)
    for p in cal.operating_points:
        default = " (default)" if p.name == cal.default_operating_point else ""
        if "class_thresholds" in p.extra:  # the class table below says what each class got
            answered = sum(t is not None for t in p.extra["class_thresholds"])
            table.add_row(
                p.name + default,
                f"≥ {p.threshold:.6g}",
                f"{p.coverage:.4f}",
                "",
                f"{p.risk:.4f}",
                f"{answered} of {len(p.extra['class_thresholds'])} classes",
                *_estimate_and_set(p),
            )
        elif p.method == "coverage":
            ci = p.extra["coverage_interval"]
            rci = p.extra["risk_interval"]
            table.add_row(
                p.name + default,
                f"{p.threshold:.6g}",
                f"{p.coverage:.4f}",
                f"[{ci[0]:.4f}, {ci[1]:.4f}]",
                f"{p.risk:.4f}",
                f"[{rci[0]:.4f}, {rci[1]:.4f}]",
                *_estimate_and_set(p),
            )
        else:
            table.add_row(
                p.name + default,
                f"{p.threshold:.6g}",
                f"{p.coverage:.4f}",
                "",
                f"{p.risk:.4f}",
                # LTT certifies by a test (its p-value at δ), SGR by a bound
                f"LTT p = {p.extra['p_value']:.3g}"
                if p.extra.get("risk_method") == "ltt"
                else f"≤ {p.extra['risk_bound']:.4f}",
                *_estimate_and_set(p),
            )
    console.print(table)
    if cal.temperature is not None:
        fit = cal.confidence_calibration
        console.print(
            f"softmax temperature {fit['temperature']:.4f} (NLL {fit['nll_uncalibrated']:.4f} → "
            f"{fit['nll']:.4f}): est. risk = mean(1 - calibrated confidence) of the answered, the "
            "service's label-free live-risk estimate",
            highlight=False,
        )
    sets = [p.extra["prediction_set"] for p in cal.operating_points if "prediction_set" in p.extra]
    if sets:
        console.print(
            f"set: the {sets[0]['method'].upper()} conformal set given with each abstention, at "
            f"{1 - sets[0]['alpha']:.0%} over the point's abstentions; its mean size and how often it "
            "holds the true class, on this data",
            highlight=False,
        )
    for p in cal.operating_points:
        conformal = p.extra.get("prediction_set")
        if conformal is not None and conformal["n_calibration"] == 0:
            console.print(
                f"{p.name} abstains on none of this data: its abstentions get every class as their set.",
                highlight=False,
            )
        elif conformal is not None and conformal["quantile"] is None:
            console.print(
                f"[bold yellow]{p.name}: {conformal['n_calibration']} abstentions on this data, fewer "
                f"than the {conformal['min_samples']} a {1 - conformal['alpha']:.0%} set needs[/]: its "
                "abstentions get every class as their set.",
                highlight=False,
            )
    _print_per_class(console, cal.operating_points)
    for note in result.notes:
        console.print(f"[bold yellow]{note}[/]", highlight=False)
    for u in cal.unmet_targets:
        needed = (
            f"; at least {u['samples_needed']} answered samples with zero errors would be needed"
            if u.get("samples_needed") is not None
            else ""
        )
        console.print(f"[bold yellow]{u['name']}: not met[/] — {u['reason']}{needed}.", highlight=False)
    console.print(f"wrote {result.path}")


def _print_per_class(console: Any, points: Any) -> None:
    """One table per class-conditional point: each class's samples, threshold, coverage, risk."""
    from rich.table import Table

    for p in points:
        if "per_class" not in p.extra:
            continue
        table = Table(title=f"{p.name}: per predicted class")
        for col in ("class", "samples", "threshold", "coverage", "risk"):
            table.add_column(col)
        for c in p.extra["per_class"]:
            table.add_row(
                str(c["class_index"]),
                str(c["n"]),
                "never answered" if c["threshold"] is None else f"{c['threshold']:.6g}",
                "" if c["coverage"] is None else f"{c['coverage']:.4f}",
                "" if c["risk"] is None else f"{c['risk']:.4f}",
            )
        console.print(table)


def _estimate_and_set(point: Any) -> tuple[str, str]:
    """The table's "est. risk" and "set" cells: the label-free risk estimate, and the set's
    level, mean size and coverage over the point's abstentions."""
    estimate = point.extra.get("estimated_risk")
    conformal = point.extra.get("prediction_set")
    if conformal is None:
        cell = ""
    elif conformal["n_calibration"] == 0:
        cell = "no abstentions"
    else:
        cell = f"{conformal['mean_size']:.2f} / {conformal['coverage']:.3f}"
    return ("" if estimate is None else f"{estimate:.4f}", cell)


def evaluate(
    model_dir: ModelDir,
    out: Annotated[Path, typer.Option("--out", help="Directory for evaluation.json and risk_coverage.png.")],
    dataset: DatasetOpt = None,
    split: Annotated[str, typer.Option("--split", help="Split of --dataset: train, val or test.")] = "test",
    data: DataOpt = None,
    data_root: DataRootOpt = None,
    batch_size: BatchOpt = 256,
) -> None:
    """Show what the calibrated operating points do on test data (JSON, PNG and a table).

    Example: abstain evaluate models/digits --dataset digits --split test --out runs/eval
    """
    from rich.console import Console
    from rich.table import Table

    from abstain.calibration.evaluate import run_evaluation
    from abstain.contract import TABLE_COVERAGES

    result = run_evaluation(
        model_dir, out, dataset=dataset, split=split, data=data, data_root=data_root, batch_size=batch_size
    )
    report = result.report
    console = Console(width=max(Console().width, 120))  # tables stay whole in logs and CI
    points = Table(title=f"operating points on {report['data']['source']} (n={report['data']['size']})")
    for col in ("name", "target", "realized coverage", "selective risk", "check", "passed"):
        points.add_column(col)
    for row in report["operating_points"]:
        target = row.get("target_coverage", row.get("target_risk"))
        risk = "—" if row["selective_risk"] is None else f"{row['selective_risk']:.4f}"
        held = "[green]yes[/]" if row.get("check_passed", row["guarantee_held"]) else "[red]no[/]"
        points.add_row(
            row["name"],
            f"{target:g}",
            f"{row['realized_coverage']:.4f}",
            risk,
            row.get("check", "").removeprefix("coverage in "),
            held,
        )
    console.print(points)
    scores = Table(title="risk (%) at coverage, and areas (×100)")
    for col in ("score", *[f"{float(c) * 100:g}%" for c in TABLE_COVERAGES], "AURC", "E-AURC", "AUGRC"):
        scores.add_column(col)
    for name, m in report["scores"].items():
        scores.add_row(
            name,
            *[f"{m['risk_at_coverage'][c] * 100:.2f}" for c in TABLE_COVERAGES],
            f"{m['aurc'] * 100:.3f}",
            f"{m['eaurc'] * 100:.3f}",
            f"{m['augrc'] * 100:.3f}",
        )
    console.print(scores)
    for warning in report["warnings"]:
        console.print(f"[bold yellow]warning:[/] {warning}", highlight=False)
    console.print(f"wrote {result.json_path} and {result.plot_path}")


def predict(
    model_dir: ModelDir,
    input_path: Annotated[
        str | None,
        typer.Argument(
            metavar="[INPUT]",
            help="An image folder (PNG/JPEG, searched recursively; an ImageFolder tree "
            "of the graph's class names gives labels), a Parquet file with a pixels column, "
            "or an .npz with x [N, C, H, W] in [0, 1] and optionally y [N]; with --engine ray "
            "also a folder of Parquet files, and any URI pyarrow.fs opens. Or use --dataset instead.",
        ),
    ] = None,
    out: Annotated[
        str,
        typer.Option(
            "--out",
            help="Where to write one record per input: .jsonl, .csv or .parquet; with "
            "--engine ray a new folder of Parquet partitions (a local path or a URI).",
        ),
    ] = "predictions.jsonl",
    dataset: DatasetOpt = None,
    split: Annotated[str, typer.Option("--split", help="Split of --dataset: train, val or test.")] = "test",
    data_root: DataRootOpt = None,
    operating_point: Annotated[
        str | None,
        typer.Option(
            "--operating-point", help="An operating point of calibration.json (default: its default)."
        ),
    ] = None,
    batch_size: BatchOpt = 256,
    fail_fast: Annotated[
        bool,
        typer.Option(
            "--fail-fast",
            help="Stop at the first unreadable image instead of recording it as an error.",
        ),
    ] = False,
    engine: Annotated[
        str,
        typer.Option(
            "--engine",
            help="local: this process (default); ray: Ray Data actors, on a local Ray or the "
            "cluster at --address (needs the ray extra).",
        ),
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="--engine ray: a running cluster (auto, ray://HOST:PORT or HOST:PORT); "
            "default: start a local one for the run.",
        ),
    ] = None,
    concurrency: Annotated[
        int, typer.Option("--concurrency", min=1, help="--engine ray: actors (graph copies).")
    ] = 1,
    cpus_per_actor: Annotated[
        float,
        typer.Option("--cpus-per-actor", help="--engine ray: CPUs (and ONNX Runtime threads) per actor."),
    ] = 1.0,
) -> None:
    """Decide offline, as the service would: predict or abstain for every input, one record each.

    Example: abstain predict models/digits images/ --out decisions.parquet --operating-point coverage-0.9
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from abstain.calibration.predict import run_predict

    if engine not in ("local", "ray"):
        raise typer.BadParameter(f"should be local or ray, but got {engine!r}", param_hint="--engine")
    if engine == "ray":
        if fail_fast:
            raise typer.BadParameter("records unreadable inputs as errors; drop it", param_hint="--fail-fast")
        from abstain.calibration.ray_engine import run_predict_ray

        _print_predict_summary(
            run_predict_ray(
                model_dir,
                out,
                input_path=input_path,
                dataset=dataset,
                split=split,
                data_root=data_root,
                operating_point=operating_point,
                batch_size=batch_size,
                address=address,
                concurrency=concurrency,
                cpus_per_actor=cpus_per_actor,
            )
        )
        return
    if address is not None or concurrency != 1:
        raise typer.BadParameter("--address and --concurrency are options of --engine ray")

    console = Console(stderr=True)
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("deciding", total=None)
        summary = run_predict(
            model_dir,
            Path(out),
            input_path=None if input_path is None else Path(input_path),
            dataset=dataset,
            split=split,
            data_root=data_root,
            operating_point=operating_point,
            batch_size=batch_size,
            fail_fast=fail_fast,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    _print_predict_summary(summary)


def _print_predict_summary(summary: Any) -> None:
    def pct(value: float | None) -> str:
        return "—" if value is None else f"{value * 100:.2f}%"

    lines = [
        f"{summary.images} inputs at operating point {summary.operating_point}: "
        f"{summary.answered} answered, {summary.decided - summary.answered} abstained, "
        f"{summary.errors} unreadable; coverage {pct(summary.coverage)}"
    ]
    if summary.labelled:
        risk = summary.selective_risk
        lines.append(
            f"with labels ({summary.labelled}): selective risk {pct(risk)}, "
            f"accuracy on the answered {pct(None if risk is None else 1 - risk)}, "
            f"accuracy at full coverage {pct(summary.accuracy)}"
        )
    lines.append(f"wrote {summary.path}")
    typer.echo("\n".join(lines))
