"""`python -m tasks.ops.cli`: the `llmops` CLI."""

from tasks.ops.cli import main

if __name__ == "__main__":
    main()
