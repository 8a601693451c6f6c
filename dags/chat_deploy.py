"""
### chat_deploy: export a registered version to Triton and serve it

`export` (the MLflow version the `alias` param names, `challenger` by default, written to the
Triton model repository `models/triton/` with its lineage; versions no alias names any more are
removed) → `load` (re-loads the model in the running tritonserver through its repository API, so
champion and challenger are served side by side; skipped with a message when no server runs)
→ `smoke` (one chat completion through the gateway against the new version; its reply, token
counts and latency are in the task log) → `shadow` (the gateway mirrors `rollout.shadow_percent`
of the champion's requests to the challenger, users see only the champion; the pairs are scored:
reply embedding similarity, toxicity, safety verdicts, length, latency; report under
reports/shadow/) → `canary` (configs/rollout.yaml: 5 % → 25 % → 50 % → 100 % of sessions to the
challenger, each step judged on the request logs against the champion; the first failing step
rolls back at once, all passing steps promote; the first model is promoted directly). Shadow and
canary are sensors in reschedule mode: while too few requests came in they wait, holding no worker
slot, up to `rollout.deadline_s` per step; past it the rollout is `inconclusive` (the challenger is
taken out of the routes, or kept with `rollout.on_inconclusive: keep`) and the run fails with that
reason: a rollout without a decision never ends green. Every
decision is a JSON record under reports/rollout/ and tags on the MLflow version, and is printed in
the task log.

Runs when `chat_train` registers a new challenger (the `chat_challenger` Asset) and from the
Trigger form. With `tier` small it rolls out the distilled `chat-gpt-small` the same way: the
gateway's small tier has its own aliases, traffic split, shadow and canary. `drill_delay_ms` > 0
rehearses the automatic roll-back: the exported version is made that much slower per generated
token, so shadow or canary must catch it.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, PokeReturnValue, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from chat_assets import CHAT_CHALLENGER, DEFAULT_PROFILE, PROFILES, fails_fast


def _settings():
    """The profile's settings for the tier this run deploys (the small tier has its own model and aliases)."""
    from tasks.serve.tiers import tier_settings

    p = get_current_context()["params"]
    return tier_settings(p["profile"], p.get("tier", "large"))


def _outcome(out: dict | None) -> PokeReturnValue:
    """A rollout phase's poll as a sensor's answer: wait (None), done, or failed when inconclusive."""
    if out is not None and out["action"] == "inconclusive":
        raise AirflowFailException(f"rollout inconclusive: {out['reason']} (record {out.get('record')})")
    return PokeReturnValue(is_done=out is not None, xcom_value=out)


@dag(
    dag_id="chat_deploy",
    schedule=CHAT_CHALLENGER,
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["llmops", "serving"],
    doc_md=__doc__,
    default_args={"retries": 1, "retry_delay": timedelta(seconds=20)},
    params={
        "profile": Param(DEFAULT_PROFILE, type="string", enum=PROFILES, title="Profile",
                         description="Config profile (configs/profiles/) whose paths and serving "
                                     "settings apply."),
        "alias": Param("challenger", type="string", enum=["challenger", "champion"], title="Alias",
                       description="Which registered version of the tier's model to export and load."),
        "tier": Param("large", type="string", enum=["large", "small"], title="Tier",
                      description="large: the main model (chat-gpt). small: the distilled chat-gpt-small "
                                  "that the gateway's light requests go to; its aliases, traffic split, "
                                  "shadow and canary are its own."),
        "drill_delay_ms": Param(0, type="number", minimum=0, maximum=10_000,
                                title="Roll-back drill (ms per token)",
                                description="Rehearsal: slow the exported version down by this much per "
                                            "generated token, so the rollout must roll it back. 0: "
                                            "no drill."),
    },
)
def chat_deploy():
    @task
    @fails_fast
    def export() -> dict:
        from tasks.serve.export import export as run

        r = run(_settings(), alias=get_current_context()["params"]["alias"])
        return {k: r[k] for k in ("model", "version", "path", "versions", "aliases", "weights_sha256",
                                  "lineage_id")}

    @task
    @fails_fast
    def load(exported: dict) -> dict:
        from tasks.loop.rollout import load_exported

        return load_exported(_settings(), exported, float(get_current_context()["params"]["drill_delay_ms"]))

    @task
    @fails_fast
    def smoke(loaded: dict) -> dict:
        from tasks.serve import server

        if not loaded["loaded"]:
            return {"skipped": "no server running"}
        return server.smoke(_settings(), loaded["model"], loaded["version"])

    # Shadow and canary wait for traffic as sensors in reschedule mode: between looks (every 10 s) the task
    # gives its worker slot back, however long the windows, and the rollout's state lives on disk
    # (tasks/loop/rollout.py poll()). No verdict by `rollout.deadline_s` fails the task as inconclusive:
    # a run without a decision is never green. A roll-back is a verdict, not a flake: no retries.
    @task.sensor(poke_interval=10, timeout=30 * 24 * 3600, mode="reschedule", retries=0)
    def shadow(smoked: dict) -> PokeReturnValue:
        from tasks.loop.rollout import shadow_step

        out = shadow_step(_settings(), smoked, get_current_context()["run_id"])
        return _outcome(out)

    @task.sensor(poke_interval=10, timeout=30 * 24 * 3600, mode="reschedule", retries=0)
    def canary(shadowed: dict) -> PokeReturnValue:
        from tasks.loop.rollout import canary_step

        return _outcome(canary_step(_settings(), shadowed, get_current_context()["run_id"]))

    canary(shadow(smoke(load(export()))))


chat_deploy()
