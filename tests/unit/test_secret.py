"""Per-install secrets: created once with mode 0600 and reused, the environment wins, a file others may
read is refused; the Triton admin key comes from them, and only while serve.triton.restrict_admin is on."""

from __future__ import annotations

import multiprocessing
import os
import stat

import pytest

from tasks.credentials import SecretError, install_secret
from tasks.serve import triton
from tests.helpers.project import make_settings


def test_a_secret_is_created_0600_once_and_then_reused(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMOPS_TEST_KEY", raising=False)
    path = tmp_path / "var" / "secrets" / "k"
    old = os.umask(0)  # whatever the umask, the file is the owner's alone
    try:
        key = install_secret(path, env="LLMOPS_TEST_KEY")
    finally:
        os.umask(old)
    assert len(key) >= 43  # token_urlsafe(32): 256 bits
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert install_secret(path, env="LLMOPS_TEST_KEY") == key
    assert [p.name for p in path.parent.iterdir()] == ["k"]  # no temporary file left behind
    other = install_secret(tmp_path / "var" / "secrets" / "other")
    assert other != key


def _racer(path: str, q) -> None:
    from pathlib import Path

    q.put(install_secret(Path(path)))


def test_processes_starting_at_once_get_the_same_key(tmp_path):
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(str(tmp_path / "k"), q)) for _ in range(6)]
    for p in procs:
        p.start()
    keys = {q.get(timeout=30) for _ in procs}
    for p in procs:
        p.join(30)
    assert len(keys) == 1 and keys == {(tmp_path / "k").read_text().strip()}


def test_the_environment_wins_and_a_bad_value_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "k"
    monkeypatch.setenv("LLMOPS_TEST_KEY", "from-the-environment-0123456789")
    assert install_secret(path, env="LLMOPS_TEST_KEY") == "from-the-environment-0123456789"
    assert not path.exists()  # nothing written when the environment holds it
    monkeypatch.setenv("LLMOPS_TEST_KEY", "short")
    with pytest.raises(SecretError, match=r"\$LLMOPS_TEST_KEY \(or the file .*\) must be 16 to 512"):
        install_secret(path, env="LLMOPS_TEST_KEY")
    monkeypatch.setenv("LLMOPS_TEST_KEY", "has:a,colon=and-comma-in-it")  # would break Triton's flag
    with pytest.raises(SecretError, match="LLMOPS_TEST_KEY"):
        install_secret(path, env="LLMOPS_TEST_KEY")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_a_file_others_may_read_is_refused_naming_it(tmp_path, mode):
    path = tmp_path / "k"
    install_secret(path)
    path.chmod(mode)
    with pytest.raises(SecretError, match=rf"secret file {path} has mode {mode:04o}.*chmod 600 {path}"):
        install_secret(path)
    path.chmod(0o600)
    install_secret(path)


def test_a_symlink_or_a_bad_file_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    install_secret(target)
    link = tmp_path / "k"
    link.symlink_to(target)
    with pytest.raises(SecretError, match=rf"secret file {link} cannot be read as a plain file"):
        install_secret(link)
    bad = tmp_path / "empty"
    bad.touch(mode=0o600)
    with pytest.raises(SecretError, match=rf"secret file {bad} does not hold a usable key"):
        install_secret(bad)


def test_the_triton_admin_key_is_per_install_and_off_with_restrict_admin(tmp_path, monkeypatch):
    monkeypatch.delenv(triton.ADMIN_KEY_ENV, raising=False)
    s = make_settings(tmp_path / "a")
    key = triton.admin_key(s)
    assert (s.paths.var_dir / "secrets" / "triton_admin_key").read_text().strip() == key
    assert triton.admin_headers(s) == {"llmops-admin-key": key}
    assert triton.grpc_admin_headers(s) == {"triton-grpc-protocol-llmops-admin-key": key}
    assert triton.admin_key(make_settings(tmp_path / "b")) != key  # another install, another key
    monkeypatch.setenv(triton.ADMIN_KEY_ENV, "one-key-for-every-container")
    assert triton.admin_key(make_settings(tmp_path / "b")) == "one-key-for-every-container"
    off = make_settings(tmp_path / "c", "serve.triton.restrict_admin=false")
    assert triton.admin_key(off) is None and triton.admin_headers(off) == triton.grpc_admin_headers(off) == {}
    assert not (off.paths.var_dir / "secrets").exists()


def test_a_deployment_hands_the_key_as_a_file(tmp_path, monkeypatch):
    """docker-compose.yml mounts a secret under /run/secrets/ and names it in <NAME>_FILE: every
    replica then uses that one key, and none is generated."""
    f = tmp_path / "run" / "key"
    f.parent.mkdir()
    f.write_text("k" * 32 + "\n")
    monkeypatch.delenv("LLMOPS_TEST_KEY", raising=False)
    monkeypatch.setenv("LLMOPS_TEST_KEY_FILE", str(f))
    assert install_secret(tmp_path / "secrets" / "x", env="LLMOPS_TEST_KEY") == "k" * 32
    assert not (tmp_path / "secrets" / "x").exists()
