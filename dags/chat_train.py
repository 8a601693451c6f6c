"""
### chat_train: train the chat GPT with DeepSpeed ZeRO on the latest token shards

`wait_for_ingest` (while a `chat_ingest` run is queued or running, e.g. a backfill, newer shards are
on their way: the run waits for them, in reschedule mode so no worker slot is held, and a 30-day
backfill trains once, on the corpus it leaves) → `check_inputs` (the shards of the latest snapshot;
every shard's sha256 verified; which days and rows by source it adds to the champion's snapshot; when a
version trained from the same shards, config, seed and code is already registered, or that training
was refused by the gate, the run skips the rest with the reason, unless the `force` param is set) →
`train` (launches the
ranks as separate processes with torchrun or the deepspeed launcher, streams their logs here and
their metrics to MLflow, writes safetensors weights with lineage) → `evaluate` (perplexity, ROUGE-L,
BLEU, embedding similarity, toxicity, factuality, latency; HTML report attached to the MLflow run;
skipped with the reason when the weights equal a registered version's byte for byte) →
`gate` (configs/eval.yaml bounds and allowed regression vs the `champion`; fails the run with the
reason when it does not pass) → `register` (MLflow model `chat-gpt`, alias `challenger`, lineage
tags; emits the `chat_challenger` Asset that `chat_deploy` runs on) → `quantize` (the dynamic int8
variant, evaluated by the same suite and gated against its fp32 parent; registered as
`challenger-int8` only if it passes, then the group-wise int4 variant the same way as
`challenger-int4`; the tiers report puts fp32, int8 and int4 side by side: quality, tokens/s, p99,
memory, $ per 1M tokens, each as a ratio to fp32) → `distill` (with the `distill` param: a smaller
student trained against the champion's logits, evaluated by the same suite and gate, registered as
`chat-gpt-small`, added to the tiers report).

Runs weekly (Monday 03:00 UTC), whenever `chat_ingest` publishes new shards, and from the Trigger
form. `train` runs in the `training` pool (one slot), so two trainings never share the machine,
and a retry resumes from the newest complete checkpoint of the same run.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import (
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    Param,
    PokeReturnValue,
    dag,
    get_current_context,
    task,
)
from airflow.sdk.exceptions import AirflowSkipException

from chat_assets import CHAT_CHALLENGER, CHAT_SHARDS, DEFAULT_PROFILE, PROFILES, fails_fast


def _settings():
    from tasks.config import load_settings

    p = get_current_context()["params"]
    overrides = [f"train.{k}={p[k]}" for k in ("max_steps", "zero_stage", "world_size", "lr")
                 if p.get(k) is not None]
    return load_settings(p["profile"], overrides)


def _train_in_cluster(settings, inputs: dict, ctx) -> dict:
    """KubernetesPodOperator with the pod tasks/train/k8s.py renders from `train.kubernetes`; its log is
    streamed into this task's. The pod writes to the same volume and MLflow; its result is read back by the
    run id check_inputs computed (the pod trains exactly that run), never as "the newest run"."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    from tasks.train.k8s import train_pod as render_pod
    from tasks.train.launch import read_result

    p = ctx["params"]
    overrides = tuple(f"train.{k}={p[k]}" for k in ("max_steps", "zero_stage", "world_size", "lr")
                      if p.get(k) is not None)
    kc = settings.train.kubernetes
    train_pod = KubernetesPodOperator(task_id="train_pod", namespace=kc.namespace, get_logs=True,
                                      full_pod_spec=render_pod(settings, inputs["manifest"], ctx["run_id"],
                                                               overrides),
                                      startup_timeout_seconds=kc.startup_timeout_s,
                                      on_finish_action="delete_succeeded_pod")
    train_pod.execute(ctx)
    return read_result(settings, inputs["run_id"])


@dag(
    dag_id="chat_train",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 3 * * 1", timezone="UTC"),
                                 assets=CHAT_SHARDS),
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["llmops", "training"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30)},
    params={
        "profile": Param(DEFAULT_PROFILE, type="string", enum=PROFILES, title="Profile",
                         description="Model and training profile from configs/profiles/ (tiny trains in "
                                     "minutes on a CPU)."),
        "max_steps": Param(None, type=["null", "integer"], minimum=1, maximum=1_000_000, title="Max steps",
                           description="Optimizer steps to train. Empty: the profile's train.max_steps."),
        "zero_stage": Param(None, type=["null", "integer"], enum=[None, 0, 1, 2, 3], title="ZeRO stage",
                            description="DeepSpeed ZeRO stage: 0 plain data parallel, 1 optimizer, 2 "
                                        "+gradients, 3 +parameters sharded. Empty: the profile's."),
        "world_size": Param(None, type=["null", "integer"], minimum=1, maximum=64, title="World size",
                            description="Ranks (CPU processes or GPUs) on this node. Empty: the "
                                        "profile's train.world_size."),
        "lr": Param(None, type=["null", "number"], exclusiveMinimum=0, maximum=1, title="Learning rate",
                    description="Peak learning rate after warmup. Empty: the profile's train.lr."),
        "resume": Param(True, type="boolean", title="Resume",
                        description="Continue from the newest complete checkpoint of the same run if "
                                    "one exists."),
        "force": Param(False, type="boolean", title="Force",
                       description="Train and register even when a version from the same shards, "
                                   "config, seed and code is already registered (otherwise the run skips: "
                                   "nothing would change)."),
        "distill": Param(False, type="boolean", title="Distill a small tier",
                         description="Also distill a smaller student (configs/distill.yaml) from the "
                                     "champion (the version this run registers when there is none yet), "
                                     "evaluate and gate it, and register it as chat-gpt-small for the "
                                     "gateway's light tier."),
        "reason": Param(None, type=["null", "string"], maxLength=2000, title="Reason",
                        description="Why this training runs (optional); chat_monitor fills it in. Tagged on "
                                    "the MLflow run."),
        "drift_report": Param(None, type=["null", "string"], title="Drift report",
                              description="The drift report that triggered this run (set by chat_monitor)."),
    },
)
def chat_train():
    @task.sensor(poke_interval=20, timeout=6 * 3600, mode="reschedule")
    def wait_for_ingest() -> PokeReturnValue:
        ctx = get_current_context()
        busy = ctx["ti"].get_dr_count(dag_id="chat_ingest", states=["running", "queued"])
        if busy:
            print(f"chat_ingest has {busy} run(s) queued or running: the training waits for the shards "
                  "they publish, so it trains once on the corpus they leave")
        return PokeReturnValue(is_done=not busy)

    @task
    @fails_fast
    def check_inputs() -> dict:
        from tasks.judge.release import check_inputs as run

        ctx = get_current_context()
        params = ctx["params"]
        events = ctx.get("triggering_asset_events") or {}
        # every chat_shards event since the previous asset-triggered run comes along; the newest carries
        # the reason chat_monitor gave when it asked for the ingest. The shards trained are the latest
        # snapshot's: chat_ingest runs that ended after this run was created are in them too.
        newest = max((ev for evs in events.values() for ev in evs if (ev.extra or {}).get("manifest")),
                     key=lambda ev: ev.timestamp, default=None)
        extra = (newest.extra or {}) if newest is not None else {}
        settings = _settings()
        r = run(settings)
        r["trigger"] = {k: params.get(k) or extra.get(k) for k in ("reason", "drift_report")
                        if params.get(k) or extra.get(k)}
        r["trigger"]["new_data"] = r["data"]["summary"]
        print(f"data: {r['data']['summary']}")
        if params["force"]:
            return r
        if r["registered"] is not None:
            # the same shards, config, seed and code were trained and registered: training again changes
            # nothing
            raise AirflowSkipException(f"unchanged: run {r['run_id']} is registered as "
                                       f"{settings.tracking.registered_model} "
                                       f"version {r['registered']}; trigger with force to train it again")
        if r["refused"] is not None:
            raise AirflowSkipException(f"unchanged: run {r['run_id']} was trained from these shards, config, "
                                       f"seed and code and refused by the gate ({r['refused']}); trigger "
                                       "with force to train it again")
        return r

    @task(pool="training", execution_timeout=timedelta(hours=12))
    @fails_fast
    def train(inputs: dict) -> dict:
        from tasks.train.launch import train as run

        ctx = get_current_context()
        settings = _settings()
        if settings.train.backend == "kubernetes":  # the ranks run in a pod on a GPU node of the cluster
            return _train_in_cluster(settings, inputs, ctx)
        resume = ctx["params"]["resume"] or ctx["ti"].try_number > 1  # a retry always resumes
        return {**run(settings, inputs["manifest"], resume=resume, trigger=inputs["trigger"]),
                "data": inputs["data"]}

    @task
    @fails_fast
    def evaluate(trained: dict) -> dict:
        from pathlib import Path

        from tasks.judge.release import evaluate_trained, skip_identical

        settings = _settings()
        if (why := skip_identical(settings, Path(trained["weights"]).parent)) is not None:
            raise AirflowSkipException(why)
        return evaluate_trained(settings, Path(trained["weights"]).parent)

    @task
    @fails_fast  # a failed gate is a verdict, not a flake: no retry
    def gate(evaluated: dict) -> dict:
        from tasks.judge.release import require_gate

        return require_gate(evaluated)

    @task(outlets=[CHAT_CHALLENGER])  # chat_deploy runs on it
    @fails_fast
    def register(evaluated: dict) -> dict:
        from tasks.judge.release import register_evaluated

        return register_evaluated(_settings(), evaluated)

    @task
    @fails_fast
    def quantize(registered: dict, evaluated: dict) -> dict:
        from tasks.judge.release import quantize_and_report

        return quantize_and_report(_settings(), evaluated, registered)

    @task(pool="training", execution_timeout=timedelta(hours=12))
    @fails_fast
    def distill(registered: dict, quantized: dict) -> dict:
        from tasks.judge.release import distill_and_report

        if not get_current_context()["params"]["distill"]:
            raise AirflowSkipException("the distill param is off")
        return distill_and_report(_settings(), registered["version"], quantized["tier_metrics"])

    inputs = check_inputs()
    wait_for_ingest() >> inputs
    gated = gate(evaluate(train(inputs)))
    registered = register(gated)
    distill(registered, quantize(registered, gated))


chat_train()
