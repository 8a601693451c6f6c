"""Architecture rules: tasks/ never imports Airflow; DAG files parse fast with no heavy imports."""

import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.helpers.project import REPO

HEAVY = ("torch", "deepspeed", "great_expectations", "evidently", "mlflow", "dvc", "tokenizers", "pandas")


def test_tasks_never_import_airflow():
    offenders = []
    for path in sorted((REPO / "tasks").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n == "airflow" or n.startswith("airflow.")]
    assert offenders == []


def task_modules() -> list[str]:
    """Every module of the tasks package but the entry point (it runs the CLI) and the Triton model (it
    imports Triton's backend utilities, which exist only inside tritonserver's Python stub)."""
    mods = []
    for path in sorted((REPO / "tasks").rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        if name not in ("tasks.__main__", "tasks.serve.triton_model"):
            mods.append(name)
    return mods


def test_importing_every_task_module_loads_no_airflow():
    mods = task_modules()
    assert len(mods) > 50 and "tasks.judge.release" in mods
    code = (f"import importlib, sys\nfor m in {mods!r}: importlib.import_module(m)\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] == 'airflow'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"


PARSE = """
import json, sys, time
sys.path.insert(0, {dags!r})
t = time.perf_counter()
import runpy
runpy.run_path({path!r}, run_name="dagfile")
secs = time.perf_counter() - t
print(json.dumps({{"secs": secs, "heavy": sorted({{m.split('.')[0] for m in sys.modules}} \
& set({heavy!r}))}}))
"""


def test_each_dag_file_parses_fast_without_heavy_imports():
    # airflow.sdk itself is imported first (it is every DAG file's cost, ~2 s, paid once per parser process)
    for path in sorted((REPO / "dags").glob("*.py")):
        code = "import airflow.sdk\n" + PARSE.format(dags=str(REPO / "dags"), path=str(path), heavy=HEAVY)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"AIRFLOW__CORE__LOAD_EXAMPLES": "False", "PATH": "/usr/bin:/bin",
                                  "AIRFLOW_HOME": str(Path("/tmp") / "llmops-parse-test")})
        res = json.loads(out.stdout.strip().splitlines()[-1])
        assert res["heavy"] == [], f"{path.name} imports {res['heavy']} at parse time"
        # a gross-regression guard only (timings are noise on a shared machine: 0.3 s quiet, up to 1.6 s
        # under load); what keeps parsing fast is the import check above
        assert res["secs"] < 5.0, f"{path.name} took {res['secs']:.2f}s to parse"
