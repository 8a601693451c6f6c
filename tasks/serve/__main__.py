from tasks.cli import run_stage

run_stage("serve")
