import pytest

from tasks.config import ConfigError, load_settings


def config_dir(tmp_path, **files: str):
    """A configs/ directory with a tiny profile and the given <section>.yaml texts."""
    cfg = tmp_path / "configs"
    (cfg / "profiles").mkdir(parents=True)
    (cfg / "profiles" / "tiny.yaml").write_text(files.pop("profile", "{}\n"))
    for name, text in files.items():
        (cfg / f"{name}.yaml").write_text(text)
    return cfg


def test_defaults_and_profile(tmp_path):
    s = load_settings("tiny", [f"paths.root={tmp_path}"])
    assert s.profile == "tiny"
    assert s.shard.vocab_size == 2048  # from configs/profiles/tiny.yaml over configs/shard.yaml
    assert load_settings("small").shard.vocab_size == 8192
    assert s.paths.clean == tmp_path / "data" / "clean"


def test_override_wins_and_is_typed():
    s = load_settings("tiny", ["ingest.max_reject_rate=0.35", "ingest.near_dup.enabled=false"])
    assert s.ingest.max_reject_rate == 0.35
    assert s.ingest.near_dup.enabled is False


def test_hash_is_stable_and_sensitive():
    a, b = load_settings("tiny"), load_settings("tiny")
    assert a.hash() == b.hash() and len(a.hash()) == 64
    c = load_settings("tiny", ["shard.vocab_size=3000"])
    assert c.hash() != a.hash()
    assert c.hash("ingest") == a.hash("ingest")  # per-stage hash ignores other sections
    assert load_settings("tiny", ["paths.root=/elsewhere"]).hash() == a.hash()  # where is not what


def test_unknown_key_names_key_and_source():
    with pytest.raises(ConfigError) as e:
        load_settings("tiny", ["ingest.max_rejct_rate=0.1"])
    msg = str(e.value)
    assert "ingest.max_rejct_rate: unknown key" in msg and "--set ingest.max_rejct_rate=0.1" in msg


def test_bad_value_names_key_value_and_file(tmp_path):
    cfg = config_dir(tmp_path, ingest="max_reject_rate: 3\n", profile="seed: 1\n")
    with pytest.raises(ConfigError) as e:
        load_settings("tiny", config_dir=cfg)
    msg = str(e.value)
    assert "ingest.max_reject_rate" in msg and "got 3" in msg and str(cfg / "ingest.yaml") in msg


def test_unknown_file_profile_and_override_syntax(tmp_path):
    cfg = config_dir(tmp_path, trainer="lr: 1\n")
    with pytest.raises(ConfigError, match="trainer.yaml: unknown config file"):
        load_settings("tiny", config_dir=cfg)
    with pytest.raises(ConfigError, match="profile 'huge'"):
        load_settings("huge")
    with pytest.raises(ConfigError, match="profile '../x'"):
        load_settings("../x")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_settings("tiny", ["ingest.max_reject_rate"])


def test_bad_yaml_names_file(tmp_path):
    cfg = config_dir(tmp_path, shard="vocab_size: [1,\n")
    with pytest.raises(ConfigError, match="shard.yaml: not valid YAML"):
        load_settings("tiny", config_dir=cfg)


def test_multi_node_launch_from_a_deepspeed_hostfile(tmp_path):
    from pathlib import Path

    from tasks.config import TrainConfig
    from tasks.train.launch import launch_command

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# the training nodes\nnode-a slots=8\nnode-b slots=8  # second\n")
    t = TrainConfig(launcher="deepspeed", hostfile=hostfile, world_size=8, master_addr="node-a")
    cmd = launch_command(t, Path("/x/spec.json"), 29500)
    assert cmd[0].endswith("deepspeed") and f"--hostfile={hostfile}" in cmd and "--num_nodes=2" in cmd
    assert "--num_gpus=8" in cmd and "--master_addr=node-a" in cmd and cmd[-2:] == ["--spec", "/x/spec.json"]
    single = launch_command(TrainConfig(world_size=2), Path("/x/spec.json"), 29500)
    assert "--nnodes=1" in single and "--nproc_per_node=2" in single
    with pytest.raises(ValueError, match="fewer slots"):
        launch_command(TrainConfig(launcher="deepspeed", hostfile=hostfile, world_size=16), Path("s"), 1)
    hostfile.write_text("node-a slots=8\nnode-b eight\n")
    with pytest.raises(ValueError, match=r"hostfile:2: expected 'host slots=N'"):
        launch_command(t, Path("s"), 1)
    with pytest.raises(ValueError, match="launcher=deepspeed"):
        TrainConfig(hostfile=hostfile)


def test_stack_urls_come_from_the_config_with_secrets_from_the_environment(tmp_path, monkeypatch):
    from tasks.ops.stack import StackError, airflow_env

    # an Airflow variable left in the caller's environment (a test harness, a shell) changes nothing
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "sqlite:////elsewhere/airflow.db")
    env = airflow_env(load_settings("tiny", [f"paths.root={tmp_path}"]))
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == \
        f"sqlite:///{tmp_path / 'var' / 'airflow' / 'airflow.db'}"
    monkeypatch.setenv("LLMOPS_TEST_DB_PASSWORD", "from-the-env")
    s = load_settings("prod-local", [f"paths.root={tmp_path}",
                                     "stack.airflow_db_url=postgresql+psycopg://af:${LLMOPS_TEST_DB_PASSWORD}@db:5432/af",
                                     "stack.mlflow_auth=false"])
    env = airflow_env(s)
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == \
        "postgresql+psycopg://af:" + "from-the-env@db:5432/af"
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor" and \
        env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")
    monkeypatch.delenv("LLMOPS_TEST_DB_PASSWORD")
    with pytest.raises(StackError, match=r"stack.airflow_db_url refers to \$\{LLMOPS_TEST_DB_PASSWORD\}"):
        airflow_env(s)
