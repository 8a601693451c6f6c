"""DAG integrity: every DAG file loads with no import errors, has tags, retries and docs."""

from datetime import timedelta

import pytest

from tests.helpers.project import REPO

EXPECTED = {"chat_ingest", "chat_train", "chat_deploy", "chat_monitor"}


@pytest.fixture(scope="module")
def dagbag(airflow_home):
    import sys

    from airflow.dag_processing.dagbag import DagBag

    # the dag-processor and task runner put the dags bundle's root on sys.path; so do we
    if str(REPO / "dags") not in sys.path:
        sys.path.insert(0, str(REPO / "dags"))

    return DagBag(dag_folder=str(REPO / "dags"))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert EXPECTED <= set(dagbag.dag_ids)


def test_every_dag_has_tags_retries_docs_and_typed_params(dagbag):
    for dag_id, dag in dagbag.dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert dag.doc_md, f"{dag_id} has no doc_md"
        for t in dag.tasks:
            if (dag_id, t.task_id) in (("chat_deploy", "shadow"), ("chat_deploy", "canary")):
                assert t.retries == 0  # a verdict, deliberately not retried
                continue
            assert t.retries >= 1, f"{dag_id}.{t.task_id} has no retries"
        for name in dag.params:
            param = dag.params.get_param(name)
            assert param.schema.get("type"), f"{dag_id} param {name} has no type"
            assert param.description, f"{dag_id} param {name} has no description (the form's help text)"


def test_chat_ingest_shape(dagbag):
    dag = dagbag.get_dag("chat_ingest")
    assert [t.task_id for t in dag.topological_sort()] == ["ingest", "validate", "snapshot", "shard"]
    # a daily data interval: the run for [D, D+1) ingests dt=D once D is over
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"
    assert dag.timetable.expression == "0 0 * * *" and str(dag.timetable.timezone) == "UTC"
    outlets = {o.name for t in dag.tasks for o in t.outlets}
    assert outlets == {"chat_clean_corpus", "chat_shards"}


def test_chat_train_shape(dagbag):
    dag = dagbag.get_dag("chat_train")
    assert [t.task_id for t in dag.topological_sort()] == ["wait_for_ingest", "check_inputs", "train",
                                                           "evaluate", "gate", "register", "quantize",
                                                           "distill"]
    # a backfill's chat_shards events wait for the backfill to end, holding no worker slot meanwhile
    wait = dag.get_task("wait_for_ingest")
    assert wait.mode == "reschedule" and wait.downstream_task_ids == {"check_inputs"}
    assert dag.get_task("train").pool == dag.get_task("distill").pool == "training"
    assert dag.get_task("distill").upstream_task_ids == {"register", "quantize"}
    assert dag.params.get_param("distill").value is False
    assert type(dag.timetable).__name__ == "AssetOrTimeSchedule"
    assert {p: dag.params.get_param(p).value for p in ("profile", "resume")} == \
        {"profile": "tiny", "resume": True}
    assert {o.name for o in dag.get_task("register").outlets} == {"chat_challenger"}


def test_chat_deploy_shape(dagbag):
    dag = dagbag.get_dag("chat_deploy")
    assert [t.task_id for t in dag.topological_sort()] == ["export", "load", "smoke", "shadow", "canary"]
    assert dag.get_task("canary").retries == 0
    # waiting for traffic holds no worker slot: both rollout phases are sensors that reschedule
    assert {dag.get_task(t).mode for t in ("shadow", "canary")} == {"reschedule"}
    # runs when chat_train registers a challenger
    assert type(dag.timetable).__name__ == "AssetTriggeredTimetable"
    assert "chat_challenger" in str(dag.timetable.asset_condition)
    assert dag.params.get_param("alias").value == "challenger"
    tier = dag.params.get_param("tier")  # the small tier's rollout is the same DAG, pointed at chat-gpt-small
    assert tier.value == "large" and tier.schema["enum"] == ["large", "small"]


def test_chat_monitor_shape(dagbag):
    dag = dagbag.get_dag("chat_monitor")
    assert {t.task_id for t in dag.tasks} == {"drift", "decide", "retrain", "ingest_served", "alert",
                                              "autoscale", "cost"}
    # decide branches to one of: train on new data, ingest the served days first, or alert
    assert dag.get_task("decide").downstream_task_ids == {"retrain", "ingest_served", "alert"}
    assert dag.get_task("decide").upstream_task_ids == {"drift"}
    assert dag.get_task("retrain").trigger_dag_id == "chat_train"
    assert dag.get_task("ingest_served").trigger_dag_id == "chat_ingest"
    assert dag.max_active_runs == 1
    assert type(dag.timetable).__name__ == "DeltaTriggerTimetable", type(dag.timetable)
    assert dag.timetable.delta == timedelta(hours=1)


def test_a_verdict_fails_on_its_first_try_and_a_service_error_is_retried(dagbag):
    """fails_fast (under @task in every stage task): a stage error whose `retryable` is False (bad input, a
    failed gate) becomes AirflowFailException, which Airflow does not retry; a retryable one and any other
    exception pass through to the task's retries."""
    from airflow.sdk.exceptions import AirflowFailException

    from chat_assets import fails_fast
    from tasks.data.ingest import IngestError
    from tasks.judge.registry import GateFailed
    from tasks.train.launch import TrainError

    def raising(exc):
        @fails_fast
        def body(x: int) -> int:
            raise exc
        return body

    for verdict in (GateFailed("gate failed: perplexity 9.1 > 8.0"),
                    IngestError("no raw input for dt=2026-11-05")):
        with pytest.raises(AirflowFailException, match=str(verdict)):
            raising(verdict)(1)
    with pytest.raises(TrainError):
        raising(TrainError("ranks exited with status 1"))(1)
    with pytest.raises(KeyError):  # a bug is not a verdict: it keeps its traceback and its retries
        raising(KeyError("weights"))(1)

    @fails_fast
    def fine(x: int) -> int:
        return x + 1
    assert fine(1) == 2 and fine.__wrapped__.__name__ == "fine"
    # chat_train's gate and chat_ingest's ingest are wrapped: the task's python_callable is
    # fails_fast's wrapper
    for dag_id, task_id in (("chat_train", "gate"), ("chat_train", "register"), ("chat_ingest", "ingest")):
        callable_ = dagbag.get_dag(dag_id).get_task(task_id).python_callable
        assert getattr(callable_, "__wrapped__", None) is not None, \
            f"{dag_id}.{task_id} is not under fails_fast"
