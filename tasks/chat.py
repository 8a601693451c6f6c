"""`python -m tasks.chat`: the terminal chat client (same as `llmops chat`)."""

if __name__ == "__main__":
    from tasks.cli import run_stage

    run_stage("chat")
