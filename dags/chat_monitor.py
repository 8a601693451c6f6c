"""
### chat_monitor: drift and SLO checks on the served model; a guarded retrain when they fire

`drift` (the gateway's request logs of the last `monitor.window_hours` against the training
corpus: Evidently drift of prompt features, Evidently embedding drift of the prompts' MiniLM
embeddings, token unigram KL, p99 latency and error rate; HTML reports under reports/drift/) →
`decide` (if it fired: the guards of configs/monitor.yaml, i.e. no chat_train run running or
queued, outside the cooldown, under the weekly cap, enough new request rows; then what there is to
learn from) → one of:
- `ingest_served`: served days of the window are not in the corpus yet (`ingest.sources.requests`
  consented): triggers `chat_ingest` for the latest with the reason; the shards it publishes start
  `chat_train`, which trains on a snapshot that holds the drifted traffic;
- `retrain`: the latest snapshot has days the champion's lacks: triggers `chat_train` with the reason;
- `alert`: nothing new to learn from, so no training (it would reproduce the champion): an alert with
  the drift report under reports/alerts/.
None of them runs when the monitor did not fire or a guard held it back (the reason is in the log).

Beside it: `autoscale` (queue depth, batch fill, tokens/s per instance and utilisation from
Triton's and the gateway's metrics; the scale-out / scale-in recommendation of configs/serve.yaml
`autoscale`, logged and appended to reports/autoscale/recommendations.jsonl) and `cost` ($ per 1M
tokens for training and serving, per model version: reports/cost/<time>/cost.json + .html and tags
on the MLflow versions).

Hourly. Nothing here retrains in a loop: every trigger is recorded in var/monitor/state.json and
the guards read it.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Param, dag, get_current_context, task

from chat_assets import DEFAULT_PROFILE, PROFILES, fails_fast


def _settings():
    from tasks.config import load_settings

    return load_settings(get_current_context()["params"]["profile"])


@dag(
    dag_id="chat_monitor",
    schedule=timedelta(hours=1),
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["llmops", "monitoring"],
    doc_md=__doc__,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=2)},
    render_template_as_native_obj=True,
    params={
        "profile": Param(DEFAULT_PROFILE, type="string", enum=PROFILES, title="Profile",
                         description="Config profile whose paths, tokenizer and monitor settings apply."),
    },
)
def chat_monitor():
    @task
    @fails_fast
    def drift() -> dict:
        from tasks.loop.drift import check

        result = check(_settings())
        return {k: result.get(k) for k in ("verdict", "fire", "reason", "report", "rows", "slo", "token_kl")}

    @task.branch
    def decide(verdict: dict):
        from tasks.loop.drift import plan_retrain

        ctx = get_current_context()
        active = ctx["ti"].get_dr_count(dag_id="chat_train", states=["running", "queued"])
        plan = plan_retrain(_settings(), verdict, active, ctx["params"]["profile"])
        print(f"decision: {plan['action']}: {plan['reason']}")
        ctx["ti"].xcom_push(key="plan", value=plan)
        return {"train": "retrain", "ingest": "ingest_served", "alert": "alert"}.get(plan["action"], [])

    plan = decide(drift())
    conf = "{{ ti.xcom_pull(task_ids='decide', key='plan')['conf'] }}"
    plan >> TriggerDagRunOperator(task_id="retrain", trigger_dag_id="chat_train", conf=conf,
                                  wait_for_completion=False)
    plan >> TriggerDagRunOperator(task_id="ingest_served", trigger_dag_id="chat_ingest", conf=conf,
                                  wait_for_completion=False)

    @task
    def alert() -> dict:
        # the alert itself was raised in decide (logged, reports/alerts/); this task makes it visible in
        # the run's graph, with the record
        plan = get_current_context()["ti"].xcom_pull(task_ids="decide", key="plan")
        print(f"ALERT: {plan['reason']} (record {plan.get('record')})")
        return {k: plan.get(k) for k in ("kind", "reason", "record", "drift_report")}

    plan >> alert()

    @task
    @fails_fast
    def autoscale() -> dict:
        from tasks.loop.autoscale import advise

        return advise(_settings())

    @task
    @fails_fast
    def cost() -> dict:
        from tasks.loop.cost import cost_report

        out = cost_report(_settings())
        return {"report": out.get("report"), "totals": out.get("totals")}

    autoscale()
    cost()


chat_monitor()
