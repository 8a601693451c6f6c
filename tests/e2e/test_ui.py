"""The real Airflow 3 web UI in headless Chromium (Playwright): sign in on the login page, open
chat_train from the Dags list, fill its Trigger form (the Run Parameters rendered from the DAG's
Params: labels from their titles, help text from their descriptions) and submit it; then follow
the manual run through the REST API to success, see it as Success on its run page, and find the
form's values in the training itself (the MLflow run's params and trigger tag, its loss curve).

Chromium is the system's (`apt-get install chromium`), driven by Playwright's Python package;
`playwright install` is never needed. Screenshots go to reports/test-artifacts/ui/."""

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from urllib.parse import unquote

import pytest

from tasks.ops import stack
from tasks.ops.airflow_client import AirflowClient
from tests.helpers.project import REPO

pytestmark = [pytest.mark.slow, pytest.mark.services]

SHOTS = REPO / "reports" / "test-artifacts" / "ui"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TASKS = ("wait_for_ingest", "check_inputs", "train", "evaluate", "gate", "register", "quantize")
# the form's fields under test: Param name -> (ARIA role of its input, the Param's title = the field's label)
FIELDS = {"profile": ("combobox", "Profile"), "max_steps": ("spinbutton", "Max steps"),
          "zero_stage": ("combobox", "ZeRO stage")}
ACTIVE = ("queued", "running")


@pytest.fixture(scope="session")  # session scope: checked before the package's stack starts
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    if os.environ.get("LLMOPS_SKIP_BROWSER") == "1":
        pytest.skip("no chromium on PATH and LLMOPS_SKIP_BROWSER=1")
    pytest.fail("the web UI test needs Chromium at /usr/bin/chromium: `sudo apt-get install chromium` "
                "(or set LLMOPS_SKIP_BROWSER=1 to skip this test)", pytrace=False)


def _shot(page, name: str, target=None) -> Path:
    path = SHOTS / f"{name}.png"
    (target or page).screenshot(path=path, **({} if target is not None else {"full_page": True}))
    print(f"screenshot: {path}")
    return path


def _wait_idle(client: AirflowClient, dag_id: str, timeout: float) -> None:
    """Until the DAG has no queued or running run (max_active_runs=1: ours would wait behind it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [r for r in client.runs(dag_id) if r["state"] in ACTIVE]:
            return
        time.sleep(3.0)
    raise AssertionError(f"{dag_id} still busy after {timeout:.0f}s: "
                         f"{[(r['dag_run_id'], r['state']) for r in client.runs(dag_id)]}")


def _wait_started(client: AirflowClient, run_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while client.run_state("chat_train", run_id) == "queued":
        if time.monotonic() > deadline:
            raise AssertionError(f"chat_train run {run_id} still queued after {timeout:.0f}s: "
                                 f"{[(r['dag_run_id'], r['state']) for r in client.runs('chat_train')]}")
        time.sleep(3.0)


def _prepare(s, client: AirflowClient) -> None:
    """Shards to train on, no deploy started by the registration, chat_train unpaused and idle."""
    for dag_id in ("chat_ingest", "chat_train", "chat_deploy", "chat_monitor"):
        client.wait_for_dag(dag_id, timeout=180)
    client.pause("chat_deploy")  # our registration must not start a rollout
    if not any(s.paths.shards.glob("*/manifest.json")):  # run alone: ingest a day first, as test_stack does
        client.unpause("chat_ingest")
        run_id = client.trigger("chat_ingest", {"day": "2026-11-01"})
        assert client.wait_run("chat_ingest", run_id, timeout=600) == "success", \
            client.task_states("chat_ingest", run_id)
    # no new shards (chat_ingest's daily schedule) nor drift verdicts (chat_monitor) start other
    # trainings meanwhile
    client.pause("chat_ingest")
    client.pause("chat_monitor")
    if client.http.get("/api/v2/dags/chat_train").json()["is_paused"]:
        # unpausing makes the weekly schedule run the latest missed Monday at once (catchup off): let the
        # scheduler create it now and run it first, so the manual run below does not queue behind it
        client.unpause("chat_train")
        time.sleep(10.0)
    _wait_idle(client, "chat_train", timeout=1200)


def _select(page, combobox, option: str) -> None:
    combobox.click()
    page.get_by_role("option", name=option, exact=True).click()


def _switch(checkbox, on: bool) -> None:
    """A Chakra switch: its input is visually hidden, the label around it takes the click."""
    if checkbox.is_checked() != on:
        checkbox.locator("xpath=..").click()
    from playwright.sync_api import expect

    expect(checkbox).to_be_checked(checked=on)


def test_trigger_chat_train_from_the_web_ui(chromium, running):
    import mlflow
    from playwright.sync_api import expect, sync_playwright

    s, info = running
    base = info["airflow"]
    password = json.loads(
        (stack.airflow_home(s) / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
    client = AirflowClient(s)
    _prepare(s, client)
    params = client.http.get("/api/v2/dags/chat_train/details").json()["params"]
    for key, (_, title) in FIELDS.items():
        assert params[key]["schema"]["title"] == title and params[key]["description"], params[key]
    known = {r["dag_run_id"] for r in client.runs("chat_train")}
    started = time.time()
    # tagged on the MLflow run: proves the form's conf reached training
    reason = f"ui test {uuid.uuid4().hex[:8]}"
    SHOTS.mkdir(parents=True, exist_ok=True)
    expect.set_options(timeout=30_000)

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.set_default_timeout(60_000)
        try:
            # 1. the login page
            page.goto(f"{base}/")
            expect(page).to_have_url(re.compile(r"/auth/login"))
            page.get_by_label("Username").fill("admin")
            page.get_by_label("Password").fill(password)
            _shot(page, "01-login")
            page.get_by_role("button", name="Sign in").click()
            expect(page).not_to_have_url(re.compile(r"/auth/login"))

            # 2. the Dags list -> chat_train's page
            page.get_by_role("link", name="Dags", exact=True).first.click()  # the navigation bar's
            expect(page).to_have_url(re.compile(r"/dags/?$"))
            expect(page.get_by_role("heading", name=re.compile(r"^\d+ Dags$"))).to_be_visible()
            page.get_by_role("link", name="chat_train", exact=True).click()
            expect(page).to_have_url(re.compile(r"/dags/chat_train$"))
            expect(page.get_by_role("heading", name="chat_train", exact=True)).to_be_visible()
            # the grid's tasks
            expect(page.get_by_role("link", name="check_inputs", exact=True)).to_be_visible()
            _shot(page, "02-dag")

            # 3. the Trigger form: Run Parameters (an accordion section, open by default)
            page.get_by_role("button", name="Trigger Dag").click()
            dialog = page.get_by_role("dialog")
            expect(dialog.get_by_role("heading", name="Trigger Dag - chat_train")).to_be_visible()
            section = dialog.get_by_role("button", name="Run Parameters")
            if section.get_attribute("aria-expanded") != "true":
                section.click()
            form = dialog.get_by_role("region")  # the open section's body
            for key, (role, title) in FIELDS.items():
                # named by its <label>: the Param's title
                field = form.get_by_role(role, name=title, exact=True)
                expect(field).to_be_visible()
                # the field's group: label, input, help text (`has` is matched inside each group)
                group = form.get_by_role("group").filter(has=page.get_by_role(role, name=title, exact=True))
                expect(group).to_contain_text(title)
                expect(group).to_contain_text(params[key]["description"])
            expect(form.get_by_role("spinbutton", name="Max steps")).to_have_accessible_description(
                params["max_steps"]["description"])
            _select(page, form.get_by_role("combobox", name="Profile", exact=True), "tiny")
            form.get_by_role("spinbutton", name="Max steps", exact=True).fill("30")
            _select(page, form.get_by_role("combobox", name="ZeRO stage", exact=True), "3")
            # ZeRO-3 is not the profile's stage, so the MLflow run's params show the form's value arrived;
            # Force + no resume: the run must train now, whatever was registered or checkpointed before
            _switch(form.get_by_role("checkbox", name="Force"), True)
            _switch(form.get_by_role("checkbox", name="Resume"), False)
            # and the small tier: a student distilled from the champion, registered as chat-gpt-small
            _switch(form.get_by_role("checkbox", name="Distill a small tier"), True)
            # Reason (optional) proves the conf reached training; its input has no accessible name in 3.3
            form.get_by_role("group").filter(has_text=re.compile(r"^Reason")).get_by_role("textbox").fill(reason)
            for title, shown in (("Profile", "tiny"), ("ZeRO stage", "3")):
                expect(form.get_by_role("group").filter(
                    has=page.get_by_role("combobox", name=title, exact=True))).to_contain_text(shown)
            expect(form.get_by_role("spinbutton", name="Max steps", exact=True)).to_have_value("30")
            _shot(page, "03-trigger-form", dialog)
            # the conf the form built, as Advanced Options shows it
            dialog.get_by_role("button", name="Advanced Options").click()
            editor = dialog.get_by_role("group").filter(has_text="Configuration JSON")  # a Monaco editor
            for key, value in (("profile", "tiny"), ("max_steps", 30), ("zero_stage", 3), ("resume", False),
                               ("force", True), ("distill", True), ("reason", reason)):
                expect(editor).to_contain_text(f'"{key}": {json.dumps(value)}')
            _shot(page, "04-trigger-conf", dialog)
            submit = dialog.get_by_role("button", name="Trigger", exact=True)
            expect(submit).to_be_enabled()
            submit.click()
            expect(page.get_by_text("Dag Run Triggered").first).to_be_visible()  # the toast
            page.wait_for_url(re.compile(r"/dags/chat_train/runs/manual__"))
            shown_run = unquote(page.url.rsplit("/runs/", 1)[1]).rstrip("/")
            _shot(page, "05-triggered")

            # 4. the new manual run, found through REST by its conf
            new = [r for r in client.runs("chat_train", run_type="manual") if r["dag_run_id"] not in known
                   and r["conf"].get("max_steps") == 30 and r["conf"].get("zero_stage") == 3
                   and r["conf"].get("reason") == reason]
            assert len(new) == 1, client.runs("chat_train")
            run_id = new[0]["dag_run_id"]
            assert run_id == shown_run, (run_id, page.url)
            assert new[0]["conf"]["profile"] == "tiny" and new[0]["conf"]["force"] is True, new[0]["conf"]
            _wait_started(client, run_id, timeout=900)  # a run the schedules started meanwhile may go first
            state = client.wait_run("chat_train", run_id, timeout=900)
            states = client.task_states("chat_train", run_id)
            assert state == "success" and states == dict.fromkeys((*TASKS, "distill"), "success"), \
                (state, states)

            # 5. the run page says Success
            page.reload()
            header = page.get_by_role("heading", name=run_id, exact=True).locator("xpath=..")
            expect(header.get_by_test_id("state-badge")).to_have_text("Success")
            expect(page.get_by_role("row").filter(has=page.get_by_role("link", name="train", exact=True))
                   ).to_contain_text("Success")
            _shot(page, "06-run-success")
        except BaseException:
            try:
                _shot(page, "failure")
            except Exception as e:  # the page may be gone; the original error matters
                print(f"no failure screenshot: {e}")
            raise
        finally:
            browser.close()

    # 6. the form's values reached the training: the MLflow run of this Airflow run's `train` task
    trained = client.xcom("chat_train", run_id, "train")
    mlc = mlflow.MlflowClient(tracking_uri=f"http://127.0.0.1:{s.stack.mlflow_port}")
    run = mlc.get_run(trained["mlflow_run_id"])
    assert run.info.experiment_id == mlc.get_experiment_by_name("chat-gpt").experiment_id
    assert run.info.status == "FINISHED" and run.info.start_time >= started * 1000, run.info  # trained now
    assert run.data.params["train.zero_stage"] == "3" and run.data.params["train.max_steps"] == "30", \
        run.data.params
    assert run.data.tags["llmops.trigger_reason"] == reason, run.data.tags
    assert len(mlc.get_metric_history(run.info.run_id, "loss")) == 30
    registered = client.xcom("chat_train", run_id, "register")
    assert mlc.get_model_version("chat-gpt", str(registered["version"])).run_id == run.info.run_id
    # 7. the distill task: the student registered as its own model, its teacher named, and in the tiers report
    distilled = client.xcom("chat_train", run_id, "distill")
    student = mlc.get_model_version("chat-gpt-small", str(distilled["registered"]["version"]))
    # the teacher: the champion when the task ran (chat_deploy may have promoted this run's version since)
    teacher = mlc.get_model_version("chat-gpt", str(distilled["teacher"]["version"]))
    assert student.tags["teacher.registered_model"] == "chat-gpt" and \
        student.tags["teacher.version"] == teacher.version
    assert student.tags["teacher.weights_sha256"] == teacher.tags["weights_sha256"], \
        (student.tags, teacher.tags)
    assert mlc.get_run(student.run_id).data.tags["llmops.stage"] == "distill"
    tiers = json.loads(Path(distilled["tiers_report"]).with_name("tiers.json").read_text())
    assert tiers["tiers"] == ["fp32", "int8", "int4", "distilled"] and \
        tiers["values"]["distilled"]["memory_mb"] > 0
    assert tiers["values"]["int4"]["memory_mb"] < tiers["values"]["int8"]["memory_mb"] < \
        tiers["values"]["fp32"]["memory_mb"]
