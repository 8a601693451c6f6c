"""`llmops lifecycle`, what `make run` runs: the whole lifecycle on this machine, driven through
Airflow's REST API as a user would drive it, in one live progress view.

    stack     start Airflow + MLflow (what is not running yet)
    serve     start tritonserver + the OpenAI-compatible gateway
    data      sample raw logs: synthetic days FROM..TO with every fault kind, the packaged chatterbot
              corpus, and yesterday (the daily schedule's first run ingests it)
    ingest    chat_ingest backfilled over FROM..TO-1: ingest, validate, snapshot, shard per day
    train     chat_train, as the Trigger form starts it: DeepSpeed ranks, evaluate, gate, register
    deploy    chat_deploy on the chat_challenger Asset: export, load, smoke; the first model is champion
    new day   chat_ingest for TO, a new day of logs: new shards (the chat_shards Asset)
    retrain   chat_train, started by that Asset
    canary    chat_deploy with live traffic: shadow, canary steps, then promote or roll back
    monitor   chat_monitor: drift (Evidently), autoscale advice, cost per 1M tokens

A stage whose inputs are unchanged is skipped (raw bytes, partitions and shards by content hash,
the training run's identity, the version already served), so `make run` again only checks. Each
stage's time is kept in var/lifecycle/history.json, and the view shows an ETA from the last run
that did the work.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from tasks.atomic import write_json
from tasks.config import Settings
from tasks.errors import LlmopsError

DAGS = ("chat_ingest", "chat_train", "chat_deploy", "chat_monitor")
FINISHED = ("success", "failed")
# what the synthetic "yesterday" says (a fixed day's conversations, see _data)
YESTERDAY_CONTENT = "2026-12-05"


class LifecycleError(LlmopsError):
    """A DAG run of the lifecycle failed or did not finish; the message names it and its logs."""


@dataclass
class Stage:
    name: str
    what: str
    fn: Callable[[Lifecycle, Stage], tuple[bool, str]]  # -> (did work, detail); raises on failure
    status: str = "pending"  # pending | running | done | skipped | failed
    detail: str = ""
    t0: float | None = None
    secs: float | None = None

    def elapsed(self) -> float:
        if self.secs is not None:
            return self.secs
        return time.monotonic() - self.t0 if self.t0 is not None else 0.0


def _fmt(secs: float | None) -> str:
    if secs is None:
        return ""
    secs = int(round(secs))
    return f"{secs // 60}m{secs % 60:02d}s" if secs >= 60 else f"{secs}s"


STYLE = {"pending": ("·", "dim"), "running": ("▶", "bold yellow"), "done": ("✓", "green"),
         "skipped": ("=", "cyan"), "failed": ("✗", "bold red")}


@dataclass
class Lifecycle:
    settings: Settings
    first: str
    last: str
    console: Console = field(default_factory=lambda: Console(soft_wrap=True))
    client: Any = None
    stages: list[Stage] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)  # what later stages and the summary need
    _live: Live | None = None
    _said: str = ""

    # ---- the view -------------------------------------------------------------------------------
    @property
    def history_path(self) -> Path:
        return self.settings.paths.var_dir / "lifecycle" / "history.json"

    def history(self) -> dict[str, Any]:
        p = self.history_path
        return json.loads(p.read_text()) if p.is_file() else {}

    def eta(self, st: Stage) -> float | None:
        ran = (self.history().get("stages") or {}).get(st.name, {}).get("ran")
        if ran is None:
            return None
        return (max(ran - st.elapsed(), 0.0) if st.status == "running"
                else (ran if st.status == "pending" else None))

    def __rich__(self) -> Group:
        t = Table(title=f"llmops lifecycle ({self.settings.profile} profile)", title_justify="left",
                  expand=True)
        # one line a stage, so the view fits any terminal: the last column takes what is left, cut with …
        t.add_column("", width=1, no_wrap=True)
        t.add_column("stage", min_width=7, no_wrap=True)
        t.add_column("elapsed", min_width=7, no_wrap=True)
        t.add_column("ETA", min_width=6, no_wrap=True)
        t.add_column("what / status", ratio=1, no_wrap=True, overflow="ellipsis")
        for st in self.stages:
            sym, style = STYLE[st.status]
            eta = self.eta(st)
            t.add_row(Text(sym, style=style), Text(st.name, style=style),
                      _fmt(st.elapsed() if st.t0 else None),
                      _fmt(eta) if eta is not None else ("?" if st.status in ("pending", "running") else ""),
                      st.detail or st.what)
        total = sum(st.elapsed() for st in self.stages)
        left = [self.eta(st) for st in self.stages if st.status in ("pending", "running")]
        known = [x for x in left if x is not None]
        foot = f"elapsed {_fmt(total)}"
        if left and not known:
            foot += ", ETA: none yet (no earlier run to time the stages by)"
        elif left:
            foot += f", ETA {_fmt(sum(known))}" + (" + stages never timed" if len(known) < len(left) else "")
        return Group(t, Text(foot, style="bold"))

    def note(self, st: Stage, detail: str) -> None:
        """Update a stage's detail; without a live terminal, print it when it changes."""
        st.detail = detail
        if self._live is None and detail != self._said:
            self._said = detail
            self.console.print(f"  {st.name}: {detail}")

    # ---- Airflow --------------------------------------------------------------------------------
    def run_ids(self, dag_id: str) -> set[str]:
        return {r["dag_run_id"] for r in self.client.runs(dag_id)}

    def follow(self, st: Stage, dag_id: str, known: set[str], started: list[str] | None = None,
               appear_s: float = 30.0, timeout: float = 3600.0) -> dict[str, dict[str, Any]]:
        """Wait for every run of `dag_id` not in `known` (those `started`, and any the scheduler makes
        meanwhile) to finish, showing its tasks. Waits up to `appear_s` for a first new run."""
        deadline, appear = time.monotonic() + timeout, time.monotonic() + appear_s
        while time.monotonic() < deadline:
            runs = [r for r in self.client.runs(dag_id) if r["dag_run_id"] not in known]
            if not runs and time.monotonic() < appear and not started:
                self.note(st, f"waiting for a {dag_id} run to start")
                time.sleep(2.0)
                continue
            active = [r for r in runs if r["state"] not in FINISHED]
            for r in active[-1:]:
                tasks = self.client.task_states(dag_id, r["dag_run_id"])
                done = sum(1 for s in tasks.values() if s in ("success", "skipped"))
                running = [t for t, s in tasks.items()
                           if s in ("running", "queued", "scheduled", "up_for_retry")]
                self.note(st, f"{dag_id} {r['run_type']} run: {', '.join(running) or r['state']} "
                              f"({done}/{len(tasks) or '?'} tasks done)"
                              + (f"; {len(active) - 1} more queued" if len(active) > 1 else ""))
            if not active:
                out = {}
                for r in runs:
                    tasks = self.client.task_states(dag_id, r["dag_run_id"])
                    if r["state"] == "failed":
                        bad = {t: s for t, s in tasks.items() if s not in ("success", "skipped")}
                        raise LifecycleError(f"{dag_id} run {r['dag_run_id']} failed: {bad}; its task logs "
                                             f"are in the Airflow UI ({self.settings.stack.host}:"
                                             f"{self.settings.stack.airflow_port}/dags/{dag_id}) and "
                                             "under var/airflow/logs/")
                    out[r["dag_run_id"]] = {"run_type": r["run_type"], "tasks": tasks}
                return out
            time.sleep(2.0)
        raise LifecycleError(f"{dag_id} runs still going after {timeout:.0f}s")

    # ---- running --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        t_start = time.monotonic()
        live = self.console.is_terminal
        try:
            if live:
                with Live(self, console=self.console, refresh_per_second=2, transient=False) as self._live:
                    self._run_stages()
            else:
                self._run_stages()
        finally:
            self._live = None
            self._save_history(time.monotonic() - t_start)
        return {"seconds": round(time.monotonic() - t_start, 1),
                "stages": {st.name: {"status": st.status, "seconds": round(st.elapsed(), 1),
                                     "detail": st.detail}
                           for st in self.stages}, **self.facts}

    def _run_stages(self) -> None:
        for st in self.stages:
            st.status, st.t0 = "running", time.monotonic()
            if self._live is None:
                eta = self.eta(st)
                self.console.print(f"▶ {st.name}: {st.what}" + (f" (last time {_fmt(eta)})" if eta else ""))
            try:
                did, detail = st.fn(self, st)
            except BaseException as e:
                st.status, st.secs = "failed", time.monotonic() - st.t0
                st.detail = f"{type(e).__name__}: {e}"[:400]
                raise
            st.status, st.secs, st.detail = ("done" if did else "skipped"), time.monotonic() - st.t0, detail
            if self._live is None:
                self.console.print(f"{STYLE[st.status][0]} {st.name} {_fmt(st.secs)}: {detail}")

    def _save_history(self, total: float) -> None:
        h = self.history()
        stages = h.get("stages") or {}
        for st in self.stages:
            if st.status in ("done", "skipped"):
                stages.setdefault(st.name, {})["ran" if st.status == "done" else "skipped"] = round(
                    st.secs or 0.0, 1)
        h.update(stages=stages, last={"finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                                      "seconds": round(total, 1),
                                      "statuses": {st.name: st.status for st in self.stages}})
        write_json(self.history_path, h)


# ---- the stages ---------------------------------------------------------------------------------
def _days(first: str, last: str) -> list[str]:
    a, b = dt.date.fromisoformat(first), dt.date.fromisoformat(last)
    return [(a + dt.timedelta(days=i)).isoformat() for i in range((b - a).days + 1)]


def _stack(lc: Lifecycle, st: Stage) -> tuple[bool, str]:
    from tasks.ops import stack
    from tasks.ops.airflow_client import AirflowClient

    r = stack.up(lc.settings)
    lc.client = AirflowClient(lc.settings)
    for dag_id in DAGS:
        lc.note(st, f"waiting for the dag-processor to parse {dag_id}")
        lc.client.wait_for_dag(dag_id, timeout=300)
    where = f"Airflow {r['airflow']}, MLflow {r['mlflow']}"
    return ((True, f"started {', '.join(r['started'])}: {where}") if r["started"]
            else (False, f"already running: {where}"))


def _serve(lc: Lifecycle, st: Stage) -> tuple[bool, str]:
    from tasks.serve import server

    r = server.up(lc.settings)
    where = f"gateway {r['gateway']}, Triton {r['triton_http']}"
    return ((True, f"started {', '.join(r['started'])}: {where}") if r["started"]
            else (False, f"already running: {where}"))


def _raw_hash(settings: Settings) -> str:
    from tasks.atomic import sha256_file, tree_hash

    raw = settings.paths.raw
    return tree_hash({p.relative_to(raw).as_posix(): sha256_file(p) for p in sorted(raw.rglob("*"))
                      if p.is_file()}
                     if raw.is_dir() else {})


def _data(lc: Lifecycle, st: Stage) -> tuple[bool, str]:
    from tasks.data.synth import copy_chatterbot, synth_day

    s = lc.settings
    before = _raw_hash(s)
    days = _days(lc.first, lc.last)
    yesterday = (dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)).isoformat()
    for d in days:
        synth_day(s, d, records=200, faults=True)
    # yesterday's logs (the daily schedule's first run ingests them) say the same whatever the date, so
    # every `make run` trains, evaluates and gates the same corpus: its verdicts do not move with the calendar
    synth_day(s, yesterday, records=200, faults=True, content_of=YESTERDAY_CONTENT)
    copy_chatterbot(s, lc.first)
    what = f"{len(days)} synthetic days {lc.first}..{lc.last} + yesterday ({yesterday}), chatterbot corpus"
    return ((False, f"unchanged: {what}") if _raw_hash(s) == before
            else (True, f"wrote {what} under {s.paths.raw}"))


def _snapshot_days(settings: Settings) -> set[str]:
    from tasks.data.snapshot import SnapshotError, load_snapshot

    try:
        return set(load_snapshot(settings)["partitions"])
    except SnapshotError:
        return set()


def _ingested(settings: Settings, days: list[str]) -> bool:
    """Every day's partition is current with its raw bytes, in the latest snapshot, and sharded."""
    from tasks.data.ingest import is_current
    from tasks.data.shard import latest_manifest

    try:
        latest_manifest(settings)
    except Exception:  # noqa: BLE001 - no shards yet
        return False
    return all(is_current(settings, d) for d in days) and set(days) <= _snapshot_days(settings)


def _ingest(lc: Lifecycle, st: Stage) -> tuple[bool, str]:
    s, c = lc.settings, lc.client
    days = _days(lc.first, lc.last)[:-1] or _days(lc.first, lc.last)
    # one training when the data is in, not one per day's chat_shards event: chat_train waits paused
    # (a paused DAG does not queue Asset events)
    c.pause("chat_train")
    known = lc.run_ids("chat_ingest")
    c.unpause("chat_ingest")  # the daily schedule: its first run ingests yesterday
    if _ingested(s, days):
        lc.follow(st, "chat_ingest", known, appear_s=3)  # yesterday's scheduled run, if it just started
        return False, f"unchanged: {days[0]}..{days[-1]} ingested from the same raw bytes, config and code"
    bf = c.backfill("chat_ingest", days[0], days[-1], "completed")
    states = c.wait_backfill(
        "chat_ingest", bf, timeout=3600, expect=len(days), on_progress=lambda states: lc.note(
            st, f"backfill {bf}: " + ", ".join(f"{d} {states.get(d, 'waiting')}" for d in days)))
    if any(v != "success" for v in states.values()):
        raise LifecycleError(f"chat_ingest backfill {bf}: {states}; see the failed run's task logs in the "
                             "Airflow UI")
    lc.follow(st, "chat_ingest",
              known | {r["dag_run_id"] for r in c.runs("chat_ingest", run_type="backfill")},
              appear_s=0)  # yesterday's scheduled run, if it still runs
    from tasks.data.snapshot import load_snapshot

    snap = load_snapshot(s)
    return True, (f"{len(days)} days backfilled; snapshot {snap['snapshot_hash'][:12]} "
                  f"({len(snap['partitions'])} partitions)")


def _latest_registered(settings: Settings) -> tuple[str, int | None]:
    """(run identity of the latest snapshot's shards, the version registered from it or None):
    chat_train's own check_inputs."""
    from tasks.judge.release import check_inputs

    inputs = check_inputs(settings)
    return inputs["run_id"], inputs["registered"]


def _train_conf(settings: Settings) -> dict[str, Any]:
    """The Trigger conf of a chat_train run the lifecycle starts. When this very training was refused by
    the gate before, chat_train would skip it as unchanged; a user running `make run` again asks for it to
    be judged again (`force`: the finished run is resumed, so only the evaluation and the gate run)."""
    from tasks.judge.release import check_inputs

    return {"profile": settings.profile, **({"force": True} if check_inputs(settings)["refused"] else {})}


def _train_result(lc: Lifecycle, runs: dict[str, dict[str, Any]]) -> tuple[bool, str]:
    for run_id, r in runs.items():
        if r["tasks"].get("register") == "success":
            reg = lc.client.xcom("chat_train", run_id, "register")
            trained = lc.client.xcom("chat_train", run_id, "train")
            lc.facts["registered"] = reg["version"]
            return True, (f"version {reg['version']} registered as {reg['alias']} ({r['run_type']} run; loss "
                          f"{trained['final_loss']:.3f}, {trained['tokens_per_s']:.0f} tok/s)")
    version = _latest_registered(lc.settings)[1]
    if version is None:
        raise LifecycleError(f"chat_train ran ({list(runs)}) but registered nothing; see its task logs")
    return False, f"unchanged: the latest shards, config and code are version {version} already"


def _train(lc: Lifecycle, st: Stage) -> tuple[bool, str]:
    c, s = lc.client, lc.settings
    known = lc.run_ids("chat_train")
    lc.facts["deploys_before_train"] = lc.run_ids("chat_deploy")
    c.unpause("chat_deploy")  # register's chat_challenger Asset starts the deploy
    # the first unpause also runs the latest weekly tick: it skips, as unchanged, or trains
    c.unpause("chat_train")
    run_id, version = _latest_registered(s)
    if version is not None:  # what check_inputs would find: no run needed
        return False, f"unchanged: run {run_id} (these shards, config, seed and code) is version {version}"
    run_id = c.trigger("chat_train", _train_conf(s))
    lc.facts["train_run"] = run_id
    return _train_result(lc, lc.follow(st, "chat_train", known, started=[run_id]))


def _deploy(lc: Lifecycle, st: Stage, known: set[str], expect: bool) -> tuple[bool, str]:
    """Follow the chat_deploy run the registration started (or start one when a challenger is not yet
    served), with live traffic whenever a champion serves (shadow and canary need requests to judge)."""
    from tasks.loop.traffic import Load
    from tasks.serve import server
    from tasks.serve.gateway import auth_headers
    from tasks.serve.repository import read_aliases
    from tasks.tracking import mlflow_client

    s = lc.settings
    name = s.serve.triton.model_name
    aliases = read_aliases(s.paths.triton_repository, name)
    try:
        challenger = int(mlflow_client(s).get_model_version_by_alias(s.tracking.registered_model,
                                                                     "challenger").version)
    except Exception:  # noqa: BLE001 - no challenger alias: the last one was promoted or rolled back
        challenger = None
    runs_now = lc.run_ids("chat_deploy") - known
    if not expect and not runs_now and (challenger is None
                                        or challenger in (aliases.get("champion"), aliases.get("rejected"))):
        return False, f"unchanged: champion is version {aliases.get('champion')}, no new challenger"
    started = []
    if not expect and not runs_now:
        started = [lc.client.trigger("chat_deploy", {"profile": s.profile, "alias": "challenger"})]
    load = None
    # users asking what the corpus asks: the canary judges, the monitor sees no drift
    if "champion" in aliases:
        from tasks.loop.drift import reference_prompts

        load = Load(server.urls(s)["gateway"], clients=2, prompt=None, max_tokens=8, headers=auth_headers(s),
                    prompts=reference_prompts(s)).start()
    try:
        runs = lc.follow(st, "chat_deploy", known, started=started, appear_s=60)
    finally:
        if load is not None:
            load.stop()
    run_id = next(iter(runs))  # the newest (runs come newest first)
    canary = lc.client.xcom("chat_deploy", run_id, "canary")
    shadow = lc.client.xcom("chat_deploy", run_id, "shadow")
    lc.facts.setdefault("deploys", []).append({"run": run_id, "shadow": shadow, "canary": canary,
                                               "requests": len(load.statuses) if load else 0,
                                               "failed_requests": (sum(1 for x in load.statuses if x != 200)
                                                                   if load else 0)})
    after = read_aliases(s.paths.triton_repository, name)
    detail = f"{canary['action']}: {canary['reason']}; serving {after}"
    if load is not None:
        detail += f"; {len(load.statuses)} live requests, {sum(1 for x in load.statuses if x != 200)} failed"
    return True, detail


def _first_deploy(lc: Lifecycle, st: Stage) -> tuple[bool, str]:
    return _deploy(lc, st, lc.facts["deploys_before_train"], expect="registered" in lc.facts)


def _new_day(lc: Lifecycle, st: Stage) -> tuple[bool, str]:
    s = lc.settings
    lc.facts.pop("registered", None)
    lc.facts["trains_before_new_day"] = lc.run_ids("chat_train")
    lc.facts["deploys_before_new_day"] = lc.run_ids("chat_deploy")
    if _ingested(s, _days(lc.first, lc.last)):
        return False, f"unchanged: {lc.last} already ingested and sharded"
    known = lc.run_ids("chat_ingest")
    run_id = lc.client.trigger("chat_ingest", {"day": lc.last, "profile": s.profile})
    lc.follow(st, "chat_ingest", known, started=[run_id])
    shard = lc.client.xcom("chat_ingest", run_id, "shard")
    tokens = sum(shard["tokens"].values()) if isinstance(shard["tokens"], dict) else shard["tokens"]
    return True, (f"dt={lc.last} ingested; new shards {Path(shard['manifest']).parent.name} "
                  f"({tokens:,} tokens)")


def _retrain(lc: Lifecycle, st: Stage) -> tuple[bool, str]:
    s = lc.settings
    known = lc.facts["trains_before_new_day"]
    pending = _latest_registered(s)[1] is None
    if not pending and not (lc.run_ids("chat_train") - known):
        return _train_result(lc, {})
    # started by the chat_shards Asset
    runs = lc.follow(st, "chat_train", known, appear_s=60 if pending else 3)
    if _latest_registered(s)[1] is None:  # no run came, or it trained other shards
        runs |= lc.follow(st, "chat_train", known | set(runs),
                          started=[lc.client.trigger("chat_train", _train_conf(s))])
    return _train_result(lc, runs)


def _canary(lc: Lifecycle, st: Stage) -> tuple[bool, str]:
    return _deploy(lc, st, lc.facts["deploys_before_new_day"], expect="registered" in lc.facts)


def _monitor(lc: Lifecycle, st: Stage) -> tuple[bool, str]:
    from tasks.loop.rollout import read_requests
    from tasks.ops.reports import last_drift_at

    c = lc.client
    known = lc.run_ids("chat_monitor")
    c.unpause("chat_monitor")  # hourly from now on
    last = last_drift_at(lc.settings)
    if last is not None and not read_requests(lc.settings, last[0], dt.datetime.now(dt.UTC)):
        return False, (f"unchanged: no requests since the last check ({last[0]:%H:%M} UTC): "
                       f"{last[1]['verdict']}")
    # unpausing runs the latest hourly tick when it has not run yet: that run is the check; else
    # trigger one
    runs = lc.follow(st, "chat_monitor", known, appear_s=10)
    if not runs:
        runs = lc.follow(st, "chat_monitor", known,
                         started=[c.trigger("chat_monitor", {"profile": lc.settings.profile})])
    run_id = next(iter(runs))
    drift = c.xcom("chat_monitor", run_id, "drift")
    scale = c.xcom("chat_monitor", run_id, "autoscale")
    acted = {t: runs[run_id]["tasks"].get(t) == "success" for t in ("retrain", "ingest_served", "alert")}
    lc.facts["drift"] = drift
    return True, (f"drift: {drift['verdict']} ({drift['reason']}); autoscale: {scale['action']}"
                  + ("; a retrain was triggered (chat_train)" if acted["retrain"] else "")
                  + ("; the served day is ingested first (chat_ingest), its shards start chat_train"
                     if acted["ingest_served"] else "")
                  + ("; ALERT: drift without new data to learn from (reports/alerts/)"
                     if acted["alert"] else ""))


def lifecycle(settings: Settings, first: str, last: str, console: Console | None = None) -> Lifecycle:
    lc = Lifecycle(settings, first, last, **({"console": console} if console else {}))
    lc.stages = [
        Stage("stack", "start Airflow + MLflow on 127.0.0.1", _stack),
        Stage("serve", "start tritonserver + the chat gateway", _serve),
        Stage("data", f"sample raw logs {first}..{last}, chatterbot corpus, yesterday", _data),
        Stage("ingest", f"chat_ingest backfill {first}..: ingest, validate, snapshot, shard", _ingest),
        Stage("train", "chat_train: DeepSpeed ranks, evaluate, gate, register", _train),
        Stage("deploy", "chat_deploy: export to Triton, load, smoke, promote", _first_deploy),
        Stage("new day", f"chat_ingest for {last}: new shards", _new_day),
        Stage("retrain", "chat_train on the chat_shards Asset", _retrain),
        Stage("canary", "chat_deploy with live traffic: shadow, canary steps, promote or roll back", _canary),
        Stage("monitor", "chat_monitor: drift, autoscale, cost", _monitor),
    ]
    return lc
