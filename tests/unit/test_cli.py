import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tasks.ops.cli import app
from tests.helpers.project import REPO

runner = CliRunner()
COMMANDS = ["config", "synth", "ingest", "validate", "snapshot", "shard", "days", "trigger", "backfill",
            "status", "stack up", "stack down", "stack status", "rollout shadow", "rollout canary", "drift",
            "autoscale", "cost", "train-pod", "lifecycle", "reports"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_on_every_command(cmd):
    r = runner.invoke(app, [*cmd.split(), "--help"])
    assert r.exit_code == 0 and "Usage" in r.output


@pytest.mark.parametrize("stage", ["ingest", "validate", "snapshot", "shard", "train", "evaluate",
                                   "export", "serve"])
def test_python_dash_m_tasks_stage(stage):
    r = subprocess.run([sys.executable, "-m", "tasks", stage, "--help"], capture_output=True,
                       text=True, cwd=REPO)
    assert r.returncode == 0 and f"python -m tasks {stage}" in r.stdout


def test_bad_config_exits_2_naming_the_key(tmp_path):
    r = runner.invoke(app, ["ingest", "--day", "2026-11-01", "--set", f"paths.root={tmp_path}",
                            "--set", "ingest.max_reject_rate=2"])
    assert r.exit_code == 2
    assert "ingest.max_reject_rate" in r.output and "got 2" in r.output


def test_synth_then_ingest_prints_json(tmp_path):
    root = ["--set", f"paths.root={tmp_path}"]
    assert runner.invoke(app, ["synth", "--days", "1", "--records", "50", "--faults", *root]).exit_code == 0
    r = runner.invoke(app, ["ingest", "--day", "2026-11-01", *root])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert out["clean"] == 50 and out["rejected"] == 10


def test_the_first_snapshot_prints_only_its_json_on_stdout(tmp_path):
    """DVC's own loggers write INFO lines to stdout; the snapshot that initialises the DVC project must still
    leave stdout to its JSON (scripts parse it)."""
    root = ["--set", f"paths.root={tmp_path}"]
    assert runner.invoke(app, ["synth", "--days", "1", "--records", "30", *root]).exit_code == 0
    assert runner.invoke(app, ["ingest", "--day", "2026-11-01", *root]).exit_code == 0
    r = subprocess.run([sys.executable, "-m", "tasks", "snapshot", *root], capture_output=True, text=True,
                       cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["snapshot_hash"], r.stdout
    assert "initialised a DVC project" in r.stderr


def test_data_error_exits_1_with_message(tmp_path):
    r = runner.invoke(app, ["ingest", "--day", "2026-11-05", "--set", f"paths.root={tmp_path}"])
    assert r.exit_code == 1 and "no raw input for dt=2026-11-05" in r.output


def test_synth_traffic_writes_request_logs(tmp_path):
    r = runner.invoke(app, ["synth", "--traffic", "40", "--drifted", "--hours", "0.5",
                            "--set", f"paths.root={tmp_path}"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert out["rows"] == 40 and out["drifted"] is True
    lines = [json.loads(x) for p in out["paths"] for x in open(p, encoding="utf-8")]
    assert len(lines) == 40 and all(x["synthetic"] and x["prompt"] for x in lines)


def test_readme_cli_reference_is_the_commands_own_help():
    """The README's CLI section is generated (`llmops cli-reference`); it must not drift from the code."""
    from tasks.ops.cli import reference

    readme = (REPO / "README.md").read_text()
    start, end = "<!-- cli-reference:start -->\n```\n", "```\n<!-- cli-reference:end -->"
    assert start in readme and end in readme, "README.md lacks the cli-reference markers"
    block = readme.split(start, 1)[1].split(end, 1)[0]
    assert block == reference(), \
        "README.md's CLI reference is stale: paste `llmops cli-reference` between the markers"
