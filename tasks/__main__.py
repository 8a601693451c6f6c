"""`python -m tasks <command> ...`: the same commands as `llmops` (tasks/ops/cli/), e.g.

    python -m tasks ingest --day 2026-11-01
"""

from tasks.ops.cli import app

app(prog_name="python -m tasks")
