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
rolls back at once, all passing steps promote; the first model is promoted directly). Every
decision is a JSON record under reports/rollout/ and tags on the MLflow version, and is printed in
the task log.

Runs when `chat_train` registers a new challenger (the `chat_challenger` Asset) and from the
Trigger form. With `tier` small it rolls out the distilled `chat-gpt-small` the same way: the
gateway's small tier has its own aliases, traffic split, shadow and canary. `drill_delay_ms` > 0 rehearses the automatic roll-back: the exported version is made
that much slower per generated token, so shadow or canary must catch it.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from chat_assets import CHAT_CHALLENGER, DEFAULT_PROFILE, PROFILES


def _settings():
    """The profile's settings, pointed at the small tier's registered and Triton model when `tier` is small."""
    from tasks.config import load_settings

    p = get_current_context()["params"]
    settings = load_settings(p["profile"])
    if p.get("tier", "large") == "large":
        return settings
    small = settings.serve.routing.small_model
    if settings.distill.registered_model != small:
        raise ValueError(f"distill.registered_model={settings.distill.registered_model!r} differs from "
                         f"serve.routing.small_model={small!r}: the small tier is one model, set both alike")
    return load_settings(p["profile"], [f"tracking.registered_model={small}", f"serve.triton.model_name={small}"])


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
                         description="Config profile (configs/profiles/) whose paths and serving settings apply."),
        "alias": Param("challenger", type="string", enum=["challenger", "champion"], title="Alias",
                       description="Which registered version of the tier's model to export and load."),
        "tier": Param("large", type="string", enum=["large", "small"], title="Tier",
                      description="large: the main model (chat-gpt). small: the distilled chat-gpt-small that the "
                                  "gateway's light requests go to; its aliases, traffic split, shadow and canary are its own."),
        "drill_delay_ms": Param(0, type="number", minimum=0, maximum=10_000, title="Roll-back drill (ms per token)",
                                description="Rehearsal: slow the exported version down by this much per generated "
                                            "token, so the rollout must roll it back. 0: no drill."),
    },
)
def chat_deploy():
    @task
    def export() -> dict:
        from tasks.serve.export import export as run

        r = run(_settings(), alias=get_current_context()["params"]["alias"])
        return {k: r[k] for k in ("model", "version", "path", "versions", "aliases", "weights_sha256", "lineage_id")}

    @task
    def load(exported: dict) -> dict:
        from tasks.procs import alive
        from tasks.serve import server

        settings = _settings()
        if not alive(settings, "tritonserver"):
            print("tritonserver is not running here; `llmops serve` starts it with every exported version loaded")
            return {**exported, "loaded": False}
        drill = float(get_current_context()["params"]["drill_delay_ms"])
        if drill > 0:  # writes drill.json beside the version, then reloads
            from tasks.loop.rollout import drill as slow_down

            print(f"roll-back drill: version {exported['version']} is {drill} ms slower per token",
                  slow_down(settings, exported["version"], drill))
        else:
            server.reload(settings, (exported["model"], exported["model"] + "-stream"))
        return {**exported, "loaded": True}

    @task
    def smoke(loaded: dict) -> dict:
        import time

        import httpx

        from tasks.serve import server

        if not loaded["loaded"]:
            return {"skipped": "no server running"}
        settings = _settings()
        body = {"model": f"{loaded['model']}:{loaded['version']}", "max_tokens": 16, "temperature": 0,
                "messages": [{"role": "user", "content": "Hello, can you help me?"}]}
        t0 = time.perf_counter()
        from tasks.serve.gateway import auth_headers

        r = httpx.post(f"{server.urls(settings)['gateway']}/chat/completions", json=body, timeout=120,
                       headers=auth_headers(settings))
        r.raise_for_status()
        out = r.json()
        result = {"reply": out["choices"][0]["message"]["content"], "usage": out["usage"],
                  "latency_ms": round((time.perf_counter() - t0) * 1e3, 1), "version": r.headers["x-model-version"]}
        print(f"smoke test: {result}")
        return result

    @task(retries=0, execution_timeout=timedelta(hours=2))  # a roll-back is a verdict, not a flake
    def shadow(smoked: dict) -> dict:
        import json

        from tasks.loop import rollout

        if smoked.get("skipped"):
            return {"action": "none", "reason": "no server running"}
        out = rollout.shadow(_settings(), on_step=lambda step: print("shadow:", json.dumps(step, default=str)))
        print("shadow verdict:", json.dumps({k: v for k, v in out.items() if k not in ("evidence", "checks")}, default=str))
        return {k: out.get(k) for k in ("action", "verdict", "champion", "challenger", "reason", "report", "record")}

    @task(retries=0, execution_timeout=timedelta(hours=6))
    def canary(shadowed: dict) -> dict:
        import json

        from tasks.loop import rollout

        if shadowed["action"] != "continue":  # no server, or the shadow already rolled back / was inconclusive
            print(f"no canary: {shadowed['action']}: {shadowed['reason']}")
            return {k: shadowed.get(k) for k in ("action", "champion", "challenger", "reason")}
        decision = rollout.canary(_settings(), with_shadow=False,
                                  on_step=lambda step: print("canary step:", json.dumps(step)))
        print("rollout decision:", json.dumps({k: v for k, v in decision.items() if k != "evidence"}))
        return {k: decision[k] for k in ("action", "champion", "challenger", "reason")}

    canary(shadow(smoke(load(export()))))


chat_deploy()
