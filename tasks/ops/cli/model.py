"""The model commands: train, train-pod, evaluate, register, distill, reproduce and promote."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from tasks.errors import LlmopsError
from tasks.ops.cli.common import ProfileOpt, SetOpt, run_stage, settings_for


def train(
    manifest: Annotated[str | None, typer.Option(help="shards manifest.json (default: the "
                                                 "latest snapshot's)")] = None,
    resume: Annotated[bool, typer.Option(help="resume from the newest complete checkpoint of the "
                                         "same run")] = True,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Train the GPT with DeepSpeed ZeRO as real ranks; MLflow run + safetensors weights."""
    from tasks.train.launch import train as run

    s = settings_for(profile, set_)
    run_stage(lambda: run(s, manifest, resume))


def train_pod(
    manifest: Annotated[str | None, typer.Option(help="shards manifest.json the pod trains on (default: the "
                                                 "latest snapshot's)")] = None,
    run_id: Annotated[str, typer.Option(help="names the pod")] = "manual",
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Print the Kubernetes pod (YAML) chat_train starts when train.backend is kubernetes."""
    import yaml

    from tasks.data.shard import latest_manifest
    from tasks.train.k8s import as_dict
    from tasks.train.k8s import train_pod as render

    s = settings_for(profile, set_)
    try:
        manifest = manifest or str(latest_manifest(s))
    except LlmopsError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code) from None
    typer.echo(yaml.safe_dump(as_dict(render(s, manifest, run_id)), sort_keys=False))


def evaluate(
    weights: Annotated[str | None, typer.Option(help="a trained model directory (default: the latest "
                                                "run's final/)")] = None,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Run the evaluation suites on trained weights; writes metrics.json and an HTML report."""
    from tasks.judge.evaluate import evaluate as run
    from tasks.judge.registry import latest_weights

    s = settings_for(profile, set_)
    run_stage(lambda: {k: v for k, v in run(s, weights or latest_weights(s)).items()
                  if k in ("run_id", "metrics", "slices", "report")})


def register(
    weights: Annotated[str | None, typer.Option(help="a trained model directory (default: the latest "
                                                "run's final/)")] = None,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Evaluate, gate against the champion, register as `challenger`; then the int8 and int4 variants
    (`challenger-int8`, `-int4`)."""
    from tasks.judge.registry import latest_weights
    from tasks.judge.release import evaluate_and_register

    s = settings_for(profile, set_)
    run_stage(lambda: evaluate_and_register(s, weights or latest_weights(s)))


def distill(
    teacher: Annotated[str | None, typer.Option(help="teacher weights directory (default: a "
                                                "registered version)")] = None,
    teacher_version: Annotated[int | None, typer.Option(help="teacher: this version "
                                                        "of tracking.registered_model")] = None,
    teacher_alias: Annotated[str | None, typer.Option(help="teacher: this alias "
                                                      "(default distill.teacher_alias)")] = None,
    manifest: Annotated[str | None, typer.Option(help="shards manifest.json (default: the "
                                                 "teacher's shards)")] = None,
    register: Annotated[bool, typer.Option(help="evaluate, gate and register the student "
                                           "as distill.registered_model")] = True,
    resume: Annotated[bool, typer.Option(help="resume from the newest complete checkpoint of the "
                                         "same run")] = True,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Distill a smaller student from a teacher's logits with DeepSpeed; register it as chat-gpt-small."""
    from tasks.judge.release import distill_and_register
    from tasks.train.distill import distill as run
    from tasks.train.distill import resolve_teacher

    s = settings_for(profile, set_)

    def go() -> dict:
        t = resolve_teacher(s, teacher, teacher_version, teacher_alias)
        return distill_and_register(s, t, manifest, resume) if register else run(s, t, manifest, resume)

    run_stage(go)


def reproduce(
    ref: Annotated[str, typer.Argument(help="MODEL@VERSION or MODEL@ALIAS, e.g. chat-gpt@3 "
                                       "or chat-gpt@champion")],
    workdir: Annotated[str | None, typer.Option(help="an empty directory to rebuild in (default "
                                                "var/reproduce/<model>-v<N>-<time>)")] = None,
    force: Annotated[bool, typer.Option(help="retrain even when the checked-out data is not the "
                                        "recorded snapshot")] = False,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Rebuild a registered version from its lineage (DVC snapshot, config, seed) and compare the weights."""
    from tasks.judge.reproduce import reproduce as run

    s = settings_for(profile, set_)
    report: dict[str, Any] = {}

    def go() -> dict:
        report.update(run(s, ref, workdir, force))
        return report

    run_stage(go)
    if not report.get("identical"):
        typer.echo("not identical: differs in "
                   f"{', '.join(report.get('differs') or []) or 'no recorded input'}", err=True)
        raise typer.Exit(1)


def promote(
    version: Annotated[int, typer.Option(help="registered model version to make champion")],
    reason: Annotated[str, typer.Option(help="why (recorded on the version)")],
    who: Annotated[str | None, typer.Option(help="who promotes (default: the OS user)")] = None,
    profile: ProfileOpt = None, set_: SetOpt = None,
) -> None:
    """Point the `champion` alias at a version, recording who, why and what it replaced."""
    from tasks.judge.registry import promote as run

    s = settings_for(profile, set_)
    run_stage(lambda: run(s, version, reason, who))


def safety_calibrate(profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """The safety filter's FP/FN rates on the labelled set, and the classifier threshold that meets
    serve.safety.target_fn_rate (with the FP it costs and the filter version it makes); writes
    reports/safety/calibration.json. Apply it with the printed --set override or in configs/serve.yaml."""
    from tasks.safety import calibrate

    s = settings_for(profile, set_)
    run_stage(lambda: calibrate(s))
