"""
### chat_ingest: one day of raw chat logs to validated, versioned token shards

`ingest` (clean parquet + quarantine) → `validate` (Great Expectations gate, Data Docs) →
`snapshot` (DVC version of data/clean, pushed to the remote) → `shard` (BPE tokenizer +
token shards with a manifest).

The partition is the run's data interval start (`dt=YYYY-MM-DD`), or the `day` param of a
manual run, so a retry or a backfill rewrites exactly its own day and gives byte-identical
outputs. Backfill past days with `airflow backfill create --dag-id chat_ingest --from-date
2026-11-01 --to-date 2026-11-03` or the Trigger dialog's Backfill tab. `snapshot` and
`shard` update the `chat_clean_corpus` and `chat_shards` Assets that `chat_train` waits on.

`ingest` first collects the day's served exchanges from the gateway's request logs as the `requests`
source (tasks/data/served.py; consent: `ingest.sources.requests.enabled`). `chat_monitor` triggers a
run for a served day when drift fires and the day is not in the corpus yet; its `reason` rides on the
`chat_shards` event into the training it starts.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import CronDataIntervalTimetable, Param, dag, get_current_context, task

from chat_assets import CHAT_SHARDS, CLEAN_CORPUS, DEFAULT_PROFILE, PROFILES, fails_fast


def _settings():
    from tasks.config import load_settings

    return load_settings(get_current_context()["params"]["profile"])


def _day() -> str:
    ctx = get_current_context()
    if ctx["params"].get("day"):
        return ctx["params"]["day"]
    start = ctx.get("data_interval_start")
    if start is None:  # a manual run without a logical date: yesterday's partition
        start = ctx["dag_run"].run_after - timedelta(days=1)
    return start.strftime("%Y-%m-%d")


@dag(
    dag_id="chat_ingest",
    # interval semantics: the run for [D, D+1) starts after D ends and ingests dt=D
    schedule=CronDataIntervalTimetable("@daily", timezone="UTC"),
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # snapshot/shard version the whole corpus: one day at a time keeps versions ordered
    tags=["llmops", "data"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=20),
                  "execution_timeout": timedelta(hours=2)},
    params={
        "day": Param("", type="string", pattern=r"^(\d{4}-\d{2}-\d{2})?$", title="Day",
                     description="Partition to ingest, YYYY-MM-DD. Empty: the run's data interval start."),
        "profile": Param(DEFAULT_PROFILE, type="string", enum=PROFILES, title="Profile",
                         description="Config profile from configs/profiles/."),
        "reason": Param(None, type=["null", "string"], maxLength=2000, title="Reason",
                        description="Why this day is ingested now (optional; chat_monitor fills it in). "
                                    "Carried on the chat_shards event to the training it starts."),
        "drift_report": Param(None, type=["null", "string"], maxLength=1000, title="Drift report",
                              description="The drift report behind the reason (set by chat_monitor)."),
    },
)
def chat_ingest():
    @task
    @fails_fast  # no raw files for the day, a bad date, the reject gate: the same on every try, so the run
    # fails now with the reason instead of holding the DAG (one run at a time) through its retries
    def ingest() -> dict:
        from tasks.data.ingest import ingest as run

        r = run(_day(), _settings())
        return {k: r.get(k) for k in ("dt", "partition", "content_hash", "clean", "rejected", "reasons",
                                      "quarantine", "served")}

    @task
    @fails_fast
    def validate(ingested: dict) -> dict:
        from tasks.data.validate import validate as run

        r = run(ingested["dt"], _settings())
        return {"dt": r["dt"], "success": r["success"], "data_docs": r["data_docs"]}

    @task(outlets=[CLEAN_CORPUS])
    @fails_fast
    def snapshot(validated: dict) -> dict:
        from tasks.data.snapshot import snapshot as run

        r = run(_settings())
        get_current_context()["outlet_events"][CLEAN_CORPUS].extra = {
            "snapshot_hash": r["snapshot_hash"], "dvc_rev": r["dvc_rev"]}
        return r

    @task(outlets=[CHAT_SHARDS])
    @fails_fast
    def shard(snap: dict) -> dict:
        from tasks.data.shard import shard as run

        r = run(_settings(), snap["snapshot_hash"])
        params = get_current_context()["params"]
        why = {k: params[k] for k in ("reason", "drift_report") if params.get(k)}  # set by chat_monitor
        get_current_context()["outlet_events"][CHAT_SHARDS].extra = {
            "manifest": r["manifest"], "snapshot_hash": r["snapshot_hash"],
            "tokenizer_sha256": r["tokenizer_sha256"], **why}
        return r

    shard(snapshot(validate(ingest())))


chat_ingest()
