"""Configuration: typed, validated at the edge, every problem named with file and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ConfigError, load_config, parse_config

GOOD = """
region = "a"
role = "active"
data_dir = "{d}"
[vault]
endpoint = "http://127.0.0.1:1"
bucket = "dragent-vault"
access_key = "env:TEST_S3_KEY"
secret_key = "file:{d}/secret"
[keys]
provider = "local"
key_file = "{d}/a.key"
[[peers]]
name = "b"
[peers.vault]
bucket = "vault-b"
[peers.keys]
provider = "aws-kms"
kms_key_id = "alias/dragent-b"
[[streams]]
name = "synthetic"
kind = "synthetic"
segment_max_age = "250ms"
segment_max_bytes = "4MiB"
[http]
listen = "127.0.0.1:7070"
token = "env:TEST_TOKEN"
"""


@pytest.fixture
def good(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TEST_S3_KEY", "AKIA-not-a-real-key")
    monkeypatch.setenv("TEST_TOKEN", "tok-123456")
    (tmp_path / "secret").write_text("s3cr3t-value\n")
    path = tmp_path / "agent.toml"
    path.write_text(GOOD.format(d=tmp_path))
    return path


def test_good_file_loads_with_units_and_secrets(good: Path) -> None:
    cfg = load_config(good)
    stream = cfg.stream("synthetic")
    assert stream.segment_max_age == pytest.approx(0.25)
    assert int(stream.segment_max_bytes) == 4 * 1024 * 1024
    assert cfg.vault.secret_key is not None
    assert cfg.vault.secret_key.reveal() == "s3cr3t-value"
    assert cfg.peers[0].keys.provider == "aws-kms"


def test_secrets_never_show_in_repr(good: Path) -> None:
    cfg = load_config(good)
    text = repr(cfg) + str(cfg.model_dump())
    assert "s3cr3t-value" not in text
    assert "tok-123456" not in text
    assert "AKIA-not-a-real-key" not in text


def test_every_problem_is_named_with_file_and_key(good: Path) -> None:
    bad = good.read_text().replace('role = "active"', 'role = "leader"')
    bad = bad.replace('segment_max_age = "250ms"', 'segment_max_age = "soon"\ncolour = 1')
    bad = bad.replace('token = "env:TEST_TOKEN"', 'token = "plain-text-token"')
    good.write_text(bad)
    with pytest.raises(ConfigError) as info:
        load_config(good)
    problems = info.value.problems
    text = str(info.value)
    assert all(line.startswith(f"{good}: ") for line in text.splitlines())
    assert any(p.startswith("role:") and "'leader'" in p for p in problems)
    assert any(p.startswith("streams[synthetic].segment_max_age:") for p in problems)
    assert any(p.startswith("streams[synthetic].colour: unknown key") for p in problems)
    assert any(p.startswith("http.token:") and "env:NAME" in p for p in problems)
    assert "plain-text-token" not in text  # a secret written inline is never echoed
    assert len(problems) == 4


def test_missing_env_secret_is_a_problem(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_TOKEN")
    with pytest.raises(ConfigError, match=r"http\.token: environment variable 'TEST_TOKEN'"):
        load_config(good)


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('region = "a"\ndata_dir = \n')
    with pytest.raises(ConfigError, match=r"broken.toml: not valid TOML: .*line 2"):
        load_config(path)


def test_cross_field_rules() -> None:
    base = {
        "region": "a",
        "data_dir": "/tmp/x",
        "vault": {"bucket": "v"},
        "keys": {"provider": "local", "key_file": "/k"},
    }
    with pytest.raises(ConfigError, match="lists itself as a peer"):
        peer = {"name": "a", "vault": {"bucket": "v"}, "keys": base["keys"]}
        parse_config({**base, "peers": [peer]})
    with pytest.raises(ConfigError, match="duplicate names"):
        parse_config({**base, "streams": [{"name": "s", "kind": "synthetic"}] * 2})
    with pytest.raises(ConfigError, match="multipart_chunk must be at least 5MiB"):
        parse_config({**base, "vault": {"bucket": "v", "multipart_chunk": "1MiB"}})


def test_cli_config_check_exit_codes(good: Path, tmp_path: Path) -> None:
    env = {"TEST_S3_KEY": "x", "TEST_TOKEN": "y", "PATH": "/usr/bin:/bin"}
    ok = subprocess.run(
        [sys.executable, "-m", "agent", "config", "check", str(good)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "ok (region a, role active" in ok.stdout
    broken = tmp_path / "bad.toml"
    broken.write_text(good.read_text().replace('kind = "synthetic"', 'kind = "carrier-pigeon"'))
    bad = subprocess.run(
        [sys.executable, "-m", "agent", "config", "check", str(broken)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert bad.returncode == 2
    assert f"{broken}: streams[synthetic].kind: Input should be 'synthetic'" in bad.stderr


def test_a_fencing_budget_longer_than_the_lease_is_refused_and_explained(good: Path) -> None:
    """fence_after + renew_interval + dial_timeout + fence_timeout + margin < lease_ttl:
    a lease of 10 s with fence_after 6 s (the old defaults) could expire before the
    active region has fenced itself; the defaults (12 s, fence_after 5 s) pass."""
    load_config(good)
    good.write_text(good.read_text() + '[failover]\nlease_ttl = "10s"\nfence_after = "6s"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(good)
    (problem,) = caught.value.problems
    assert "fence_after 6s + renew_interval 1s + [etcd] dial_timeout 1s" in problem
    assert "fence_timeout 3s + margin 1s = 12s, expected below lease_ttl 10s" in problem
    out = subprocess.run(
        [sys.executable, "-m", "agent", "config", "check", str(good)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "fencing budget exceeded" in out.stderr + out.stdout


def test_every_subcommand_has_a_help_of_its_own() -> None:
    """Each command's --help says what that command does, not its parent's text."""
    import argparse

    from agent.cli import build_parser

    seen: dict[str, str] = {}

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    seen[f"{path} {name}".strip()] = child.description or ""
                    walk(child, f"{path} {name}")

    walk(build_parser(), "")
    assert len(seen) > 30
    missing = sorted(k for k, v in seen.items() if not v)
    assert not missing, f"subcommands without a description: {missing}"
    texts = list(seen.values())
    repeated = sorted({t for t in texts if texts.count(t) > 1})
    assert not repeated, f"descriptions shared by several subcommands: {repeated}"


def test_failover_dsn_is_a_secret_and_probes_carry_no_password(good: Path) -> None:
    base = good.read_text()
    inline = "postgresql://dragent:hunter2-pw@db:5432/app"
    good.write_text(base + f'[failover]\npostgres_dsn = "{inline}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(good)
    assert "failover.postgres_dsn:" in str(info.value) and "env:NAME" in str(info.value)
    assert "hunter2-pw" not in str(info.value)
    for probe in (inline, "postgresql://probe@db/app?password=hunter2-pw"):
        good.write_text(base + f'[failover]\npeer_probes = {{ b = ["{probe}"] }}\n')
        with pytest.raises(ConfigError) as info:
            load_config(good)
        assert "peer_probes.b: a password is written in the file" in str(info.value)
        assert "hunter2-pw" not in str(info.value)
    (good.parent / "dsn").write_text(inline)
    probe = "postgresql://probe@db/app"
    good.write_text(
        base + f'[failover]\npostgres_dsn = "file:{good.parent}/dsn"\n'
        f'peer_probes = {{ b = ["{probe}"] }}\n'
    )
    cfg = load_config(good)
    assert cfg.failover.dsn == inline and "hunter2-pw" not in repr(cfg)
