"""`llmops status`: one screen on the whole system.

What is up and where (Airflow, MLflow, tritonserver, the gateway), the last runs of each DAG, the
champion and challenger with their key metrics and lineage, what Triton serves, the last drift
decision, and where the reports are. `collect()` gathers it as JSON (`llmops status --json`);
`render()` prints it. Every part degrades to a one-line reason when its source is down.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from rich.console import Console
from rich.table import Table

from tasks.config import Settings

METRICS = ("perplexity", "rouge_l", "bleu", "embedding_similarity", "toxicity_rate", "factuality_fuzzy",
           "latency_p99_ms_b1")
DAGS = ("chat_ingest", "chat_train", "chat_deploy", "chat_monitor")
SHORT = {"perplexity": "ppl", "rouge_l": "ROUGE-L", "bleu": "BLEU", "embedding_similarity": "emb sim",
         "toxicity_rate": "toxic", "factuality_fuzzy": "fact", "latency_p99_ms_b1": "p99 ms"}


def _dag_runs(settings: Settings, per_dag: int) -> dict[str, Any]:
    from tasks.ops.airflow_client import AirflowClient

    client = AirflowClient(settings)
    out = {}
    for dag_id in DAGS:
        r = client.http.get(f"/api/v2/dags/{dag_id}")
        paused = r.json().get("is_paused") if r.status_code == 200 else None
        runs = client.runs(dag_id)[:per_dag] if r.status_code == 200 else []
        out[dag_id] = {"paused": paused, "runs": [
            {"run_id": x["dag_run_id"], "type": x["run_type"], "state": x["state"],
             "start": x.get("start_date"), "end": x.get("end_date")} for x in runs]}
    return out


def _models(settings: Settings, name: str | None = None) -> dict[str, Any]:
    from tasks.tracking import mlflow_client

    client = mlflow_client(settings)
    name = name or settings.tracking.registered_model
    out = {}
    for alias in ("champion", "challenger", "previous"):
        try:
            v = client.get_model_version_by_alias(name, alias)
        except Exception:  # noqa: BLE001 - the alias is not set
            continue
        t = v.tags
        out[alias] = {
            "version": int(v.version),
            "created": dt.datetime.fromtimestamp(v.creation_timestamp / 1000,
                                                 dt.UTC).isoformat(timespec="seconds"),
            "metrics": {m: float(t[f"eval.{m}"]) for m in METRICS if f"eval.{m}" in t},
            "lineage": {k: t.get(k) for k in ("snapshot_hash", "tokenizer.version", "config_hash",
                                              "code_version", "seed", "mlflow_run_id", "model_id")},
            "rollout": t.get("rollout.reason"), "promoted_by": t.get("promoted_by")}
    return out


def _trainings(settings: Settings, n: int = 5) -> list[dict[str, Any]]:
    """The last n training runs in MLflow: why each ran, which new data it saw against the champion's
    snapshot, the gate's verdict, the version it became and what its rollout decided (or why it was not
    registered)."""
    from tasks.tracking import mlflow_client

    client = mlflow_client(settings)
    name = settings.tracking.registered_model
    exp = client.get_experiment_by_name(settings.tracking.experiment)
    if exp is None:
        return []
    versions = {}
    for v in client.search_model_versions(f"name='{name}'"):
        if v.tags.get("variant", "fp32") == "fp32":
            versions[v.run_id] = v
    out = []
    for r in client.search_runs([exp.experiment_id], max_results=n, order_by=["attributes.start_time DESC"]):
        t, v = r.data.tags, versions.get(r.info.run_id)
        if v is not None:
            outcome = (f"v{v.version}: {v.tags['rollout.action']}: {v.tags.get('rollout.reason', '')}"
                       if "rollout.action" in v.tags else f"v{v.version}: registered, not rolled out yet")
        elif "llmops.not_registered" in t:
            outcome = f"not registered: {t['llmops.not_registered']}"
        elif t.get("gate.fp32") == "failed":
            outcome = f"refused by the gate: {t.get('gate.fp32.reason', '')}"
        else:
            outcome = r.info.status.lower()
        out.append({"run": t.get("mlflow.runName", r.info.run_id), "mlflow_run_id": r.info.run_id,
                    "started": dt.datetime.fromtimestamp(r.info.start_time / 1000, dt.UTC)
                    .isoformat(timespec="seconds"),
                    "reason": t.get("llmops.trigger_reason", "schedule, asset event or Trigger"),
                    "new_data": t.get("llmops.trigger_new_data"), "version": int(v.version) if v else None,
                    "outcome": outcome})
    return out


def _latest_json(settings: Settings, sub: str, n: int) -> list[dict[str, Any]]:
    import json

    files = sorted((settings.paths.reports_dir / sub).glob("*.json"))[-n:]
    return [{**json.loads(f.read_text()), "record": str(f)} for f in reversed(files)]


def collect(settings: Settings, per_dag: int = 3) -> dict[str, Any]:
    from tasks.ops import reports, stack
    from tasks.serve import server
    from tasks.serve.repository import read_aliases

    st, sv = stack.status(settings), server.status(settings)
    info: dict[str, Any] = {
        "services": {**{n: {"up": up} for n, up in st["running"].items()},
                     **{n: {"up": up} for n, up in sv["running"].items()}},
        "urls": {"airflow": st["airflow"], "airflow_password_file": st["airflow_password_file"],
                 "mlflow": st["mlflow"], "gateway": sv["gateway"], "triton_http": sv["triton_http"],
                 "triton_grpc": sv["triton_grpc"], "triton_metrics": sv["triton_metrics"]},
        "supervisor": {"running": st["supervisor"]["running"] or sv["supervisor"]["running"],
                       "restarts": {**st["supervisor"]["components"], **sv["supervisor"]["components"]}},
        "served": {"versions": sv["versions"],
                   "aliases": read_aliases(settings.paths.triton_repository,
                                           settings.serve.triton.model_name)},
    }
    try:
        info["dags"] = (_dag_runs(settings, per_dag) if st["running"].get("airflow-api-server")
                        else "Airflow is not running")
    except Exception as e:  # noqa: BLE001 - shown, not fatal
        info["dags"] = f"unavailable: {e}"
    try:
        info["models"] = _models(settings)
    except Exception as e:  # noqa: BLE001
        info["models"] = f"unavailable: {e}"
    try:
        info["trainings"] = _trainings(settings)
    except Exception as e:  # noqa: BLE001
        info["trainings"] = f"unavailable: {e}"
    info["rollouts"] = [{k: r.get(k) for k in ("action", "champion", "challenger", "reason", "at", "record",
                                               "training_data")}
                        for r in _latest_json(settings, "rollout", 5)]
    info["alerts"] = [{k: a.get(k) for k in ("kind", "at", "reason", "drift_report", "record")}
                      for a in _latest_json(settings, "alerts", 3)]
    small = settings.serve.routing.small_model
    try:  # the gateway's small tier (the distilled model), when one is registered
        info["small_tier"] = {"name": small, "models": _models(settings, small),
                              "served": read_aliases(settings.paths.triton_repository, small)}
    except Exception as e:  # noqa: BLE001
        info["small_tier"] = {"name": small, "models": f"unavailable: {e}", "served": {}}
    drift = reports.last_drift(settings)
    info["drift"] = None if drift is None else {k: drift.get(k)
                                                for k in ("verdict", "fire", "reason", "rows", "report")}
    from tasks.loop.drift import load_state

    info["drift_triggers"] = load_state(settings).get("triggers", [])[-3:]
    info["reports"] = reports.summary(settings)
    return info


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _when(iso: str | None) -> str:
    return iso[5:16].replace("T", " ") if iso else ""


def _took(a: str | None, b: str | None) -> str:
    if not (a and b):
        return ""
    secs = (dt.datetime.fromisoformat(b) - dt.datetime.fromisoformat(a)).total_seconds()
    return f"{secs / 60:.1f} min" if secs >= 60 else f"{secs:.0f} s"


def restarts(name: str, r: dict[str, Any]) -> str:
    """One server's restarts as a phrase: "mlflow restarted 2x, last 12-07 10:01 (killed by SIGKILL), back
    in 4.1 s"."""
    text = f"{name} restarted {r['restarts']}x, last {_when(r.get('last_restart'))} ({r.get('last_exit')})"
    if r.get("gave_up"):
        return f"[red]{text}, given up[/]"
    back = r.get("recovery_s")
    return text + (f", back in {back} s" if back is not None else ", not answering yet")


def render(info: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console(soft_wrap=True)
    u = info["urls"]
    up = {n: x["up"] for n, x in info["services"].items()}
    ok = "[green]up[/]"
    down = "[red]down[/]"
    t = Table(title="services", title_justify="left")
    for c in ("service", "state", "where"):
        t.add_column(c)
    airflow_up = all(v for n, v in up.items() if n.startswith("airflow"))
    t.add_row("Airflow (api-server, scheduler, dag-processor, triggerer)", ok if airflow_up else down,
              f"{u['airflow']}  user admin, password in {u['airflow_password_file']}")
    t.add_row("MLflow", ok if up.get("mlflow") else down, u["mlflow"])
    t.add_row("tritonserver", ok if up.get("tritonserver") else down,
              f"http {u['triton_http']}, grpc {u['triton_grpc']}, metrics {u['triton_metrics']}")
    t.add_row("chat gateway (OpenAI API)", ok if up.get("gateway") else down, u["gateway"])
    if "memory-worker" in up:
        t.add_row("memory worker", ok if up["memory-worker"] else down, "embeds session memories")
    console.print(t)
    sup = info.get("supervisor") or {}
    console.print(f"supervisor            : {'running' if sup.get('running') else '[red]not running[/]'}"
                  + "".join(f"; {restarts(n, r)}" for n, r in (sup.get("restarts") or {}).items()
                            if r.get("restarts")))

    if isinstance(info["dags"], dict):
        t = Table(title="last DAG runs", title_justify="left")
        for c in ("DAG", "type", "state", "started (UTC)", "took"):
            t.add_column(c, no_wrap=True)
        for dag_id, d in info["dags"].items():
            name = dag_id + (" (paused)" if d["paused"] else "")
            if not d["runs"]:
                t.add_row(name, "none yet", "", "", "")
            for i, r in enumerate(d["runs"]):
                color = {"success": "green", "failed": "red"}.get(r["state"], "yellow")
                t.add_row(name if i == 0 else "", r["type"], f"[{color}]{r['state']}[/]", _when(r["start"]),
                          _took(r["start"], r["end"]))
        console.print(t)
    else:
        console.print(f"DAG runs: {info['dags']}")

    if isinstance(info["models"], dict) and info["models"]:
        t = Table(title="registered model (MLflow); Triton serves "
                        f"{info['served']['aliases'] or 'nothing yet'}",
                  title_justify="left")
        for c in ("alias", "version", *SHORT.values()):
            t.add_column(c, no_wrap=True)
        for alias, m in info["models"].items():
            t.add_row(alias, str(m["version"]),
                      *(f"{m['metrics'][k]:.3g}" if k in m["metrics"] else "" for k in SHORT))
        console.print(t)
        for alias, m in info["models"].items():
            lin = m["lineage"]
            console.print(f"  {alias} v{m['version']}: snapshot {str(lin['snapshot_hash'])[:12]}, tokenizer "
                          f"{lin['tokenizer.version']}, code {lin['code_version']}, seed {lin['seed']}, "
                          f"MLflow run {lin['mlflow_run_id']}"
                          + (f"; {m['rollout'][:120]}" if m.get("rollout") else ""))
    else:
        console.print(f"registered model: {info['models'] or 'nothing registered yet'}")
    small = info.get("small_tier") or {}
    if isinstance(small.get("models"), dict) and small["models"]:
        versions = ", ".join(f"{a} v{m['version']} "
                             f"(perplexity {m['metrics'].get('perplexity', float('nan')):.3g})"
                             for a, m in small["models"].items())
        console.print(f"small tier {small['name']:<11}: {versions}; Triton serves "
                      f"{small['served'] or 'nothing yet'}")

    d = info["drift"]
    console.print(f"last drift check      : {d['verdict']} ({_cut(d['reason'], 200)}), {d['rows']} requests; "
                  f"{d['report']}"
                  if d else "last drift check      : none yet (chat_monitor runs hourly once unpaused)")
    if info["drift_triggers"]:
        console.print(f"retrains by drift     : {', '.join(info['drift_triggers'])}")
    if isinstance(info.get("trainings"), list) and info["trainings"]:
        console.print("trainings (newest first):")
        for r in info["trainings"]:
            console.print(f"  {_when(r['started'])} {r['run']}: {_cut(r['reason'], 100)}; data: "
                          f"{_cut(r['new_data'] or 'not recorded', 160)}; {_cut(r['outcome'], 200)}")
    for d in info.get("rollouts") or []:
        color = {"promote": "green", "rollback": "red"}.get(d["action"], "yellow")
        console.print(f"rollout {_when(d['at'])}: [{color}]{d['action']}[/] v{d['challenger']} vs champion "
                      f"v{d['champion']}: {_cut(d['reason'], 200)}")
    for a in info.get("alerts") or []:
        console.print(f"[red]ALERT[/] {_when(a['at'])} {a['kind']}: {_cut(a['reason'], 300)}")
    console.print(f"reports (all, linked) : {info['reports']['index']}")
    for title, path in info["reports"]["latest"].items():
        console.print(f"  {title:<20}: {path}")
    if up.get("gateway"):
        console.print(f"try it                : curl -s {u['gateway']}/chat/completions "
                      "-H 'content-type: application/json' "
                      """-d '{"model": "chat-gpt", "messages": """
                      """[{"role": "user", "content": "Hi, my order is late"}]}'""")
        console.print("                        llmops chat")
