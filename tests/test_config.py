"""Configuration: flags, their environment twins, precedence and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedding_server.config import ServerConfig, TableSpec, env_name, load_config


def test_defaults_match_the_documented_ones() -> None:
    config = load_config([], env={})
    assert config == ServerConfig()
    assert (config.port, config.metrics_port, config.device) == (50051, 8000, "auto")


def test_help_shows_every_flag_with_its_own_text() -> None:
    """argparse %-formats help texts: a bare `%` printed its internals instead."""
    from embedding_server.config import OPTIONS, build_parser

    text = build_parser({}).format_help()
    assert "option_strings" not in text and "argparse" not in text
    flat = "".join(text.split())  # argparse wraps lines, and breaks words at hyphens
    for flag, _, _, help_text in OPTIONS:
        assert flag in text
        assert "".join(help_text.replace("%%", "%").split()) in flat, flag


def test_a_grace_shorter_than_the_connection_age_is_warned_about() -> None:
    assert ServerConfig().warnings() == []
    assert ServerConfig(connection_age_s=0, grace_s=1).warnings() == []
    (line,) = ServerConfig(grace_s=30, connection_age_s=30).warnings()
    assert line.startswith("--grace 30 is below 1.1 x --connection-max-age 30: a stop cannot")


def test_tokens_over_plaintext_past_loopback_are_warned_about() -> None:
    for host in ("127.0.0.1", "::1", "[::1]", "localhost"):
        assert ServerConfig(host=host, admin_tokens=("a",)).warnings() == []
    assert ServerConfig(host="0.0.0.0").warnings() == []  # no tokens: nothing to read
    assert ServerConfig(host="0.0.0.0", admin_tokens=("a",), tls_cert="c").warnings() == []
    for host in ("0.0.0.0", "::", "10.0.0.7", "embeddings.internal"):
        (line,) = ServerConfig(host=host, auth_tokens=("d",)).warnings()
        assert line == (
            f"bearer tokens over plaintext on {host}: anyone on the network path can read "
            "them from a call; give --tls-cert and --tls-key (or bind to 127.0.0.1 behind a "
            "TLS proxy)"
        )


def test_the_serving_line_says_how_callers_connect() -> None:
    assert ServerConfig().security() == "plaintext, no credential needed"
    assert ServerConfig(admin_tokens=("a",)).security() == "plaintext, 0 data and 1 admin tokens"
    assert ServerConfig(tls_cert="c", tls_client_ca="ca").security() == (
        "mutual TLS, client certificates"
    )
    assert ServerConfig(tls_cert="c", auth_tokens=("d", "e")).security() == (
        "TLS, 2 data and 0 admin tokens"
    )


def test_flags_set_every_field() -> None:
    config = load_config(
        ["--table", "a=/x/a.npy", "--table", "b=/x/b.pt:emb.weight", "--device", "cuda:1",
         "--port", "1234", "--metrics-port", "0", "--max-ids", "10", "--max-dense-macs", "99",
         "--grace", "2.5", "--log-level", "debug"],
        env={},
    )  # fmt: skip
    assert config.tables == (
        TableSpec("a", Path("/x/a.npy")),
        TableSpec("b", Path("/x/b.pt"), "emb.weight"),
    )
    assert (config.device, config.port, config.metrics_port) == ("cuda:1", 1234, 0)
    assert (config.max_ids, config.max_dense_macs, config.grace_s) == (10, 99, 2.5)
    assert config.log_level == "DEBUG"


def test_environment_twins_apply_and_flags_win() -> None:
    env = {
        "EMBEDDING_PORT": "6000",
        "EMBEDDING_MAX_IDS": "5",
        "EMBEDDING_TABLES": "a=/a.npy,b=/b.npy",
    }
    config = load_config(["--max-ids", "7"], env=env)
    assert config.port == 6000
    assert config.max_ids == 7
    assert [t.name for t in config.tables] == ["a", "b"]
    assert [t.name for t in load_config(["--table", "c=/c.npy"], env=env).tables] == ["c"]


def test_env_names_follow_the_flags() -> None:
    assert env_name("--max-dense-macs") == "EMBEDDING_MAX_DENSE_MACS"


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--port", "70000"], {}, "port must be in 0..65535"),
        (["--device", "tpu"], {}, "device must be auto, cpu, cuda or cuda:N"),
        (["--max-ids", "0"], {}, "must be positive"),
        (["--log-level", "loud"], {}, "log level must be DEBUG"),
        (["--table", "nameonly"], {}, "is not NAME=PATH"),
        (["--table", "a b=/x.npy"], {}, "may hold only letters"),
        (["--table", "a=/x.npy", "--table", "a=/y.npy"], {}, "given twice: a"),
        ([], {"EMBEDDING_PORT": "http"}, "EMBEDDING_PORT='http'"),
        ([], {"EMBEDDING_TABLES": "oops"}, "EMBEDDING_TABLES"),
        (
            ["--workers", "8", "--max-threads", "4"],
            {},
            "--workers (8) must not exceed --max-threads (4)",
        ),
        (
            ["--trim-update-log", "60", "--update-log", "redis://127.0.0.1:1/0"],
            {},
            "--trim-update-log needs --update-log and --snapshot-dir",
        ),
    ],
)
def test_bad_settings_stop_with_a_clear_message(
    argv: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        load_config(argv, env=env)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_describe_lists_every_setting() -> None:
    lines = ServerConfig().describe()
    assert "tables = (none: seeded demo table)" in lines
    assert "port = 50051" in lines
    assert len(lines) == len(ServerConfig.__dataclass_fields__)


def test_a_toml_file_lists_many_tables(tmp_path: Path) -> None:
    config_file = tmp_path / "tables.toml"
    config_file.write_text(
        '[[table]]\nname = "users"\nsource = "users.npy"\ndtype = "float16"\n\n'
        '[[table]]\nname = "items"\nsource = "/data/model.pt:item.weight"\ndevice = "cpu"\n'
        "cache_rows = 1000\n"
    )
    config = load_config(["--config", str(config_file), "--table", "extra=/x/e.npy"], env={})
    assert config.tables == (
        TableSpec("users", tmp_path / "users.npy", dtype="float16"),
        TableSpec("items", Path("/data/model.pt"), "item.weight", device="cpu", cache_rows=1000),
        TableSpec("extra", Path("/x/e.npy")),
    )
    assert load_config([], env={"EMBEDDING_CONFIG": str(config_file)}).tables[0].name == "users"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[table]]\nname = 'a'\n", "#1: needs source"),
        ("[[table]]\nname = 'a'\nsource = 'a.npy'\ndtype = 'int4'\n", "dtype 'int4' is not one of"),
        ("[[table]]\nname = 'a'\nsource = 'a.npy'\ndevice = 'tpu'\n", "device must be auto"),
        ("[[table]]\nname = 'a'\nsource = 'a.npy'\nrows = 3\n", "unknown key(s) rows"),
        ("[[table]]\nname = 'a'\nsource = 'a.npy'\ncache_rows = '9'\n", "cache_rows must be"),
        ("[tables]\n", "unknown top-level key(s) tables"),
        ("name = \n", "not valid TOML"),
        ("", "no [[table]] entries"),
        ("[[table]]\nname='a'\nsource='a.npy'\n[[table]]\nname='a'\nsource='b.npy'\n",
         "table name given twice: a"),
    ],
)  # fmt: skip
def test_a_bad_config_file_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    config_file = tmp_path / "bad.toml"
    config_file.write_text(text)
    with pytest.raises(SystemExit) as stopped:
        load_config(["--config", str(config_file)], env={})
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_a_missing_config_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load_config(["--config", "/nonexistent/tables.toml"], env={})
    assert "/nonexistent/tables.toml: No such file or directory" in capsys.readouterr().err


def test_a_yes_no_flag_alone_means_yes() -> None:
    """`--batching` alone was "expected one argument"; a value still works both ways."""
    assert load_config(["--batching"]).batching is True
    assert load_config(["--batching", "--port", "5"]).port == 5
    assert load_config(["--batching", "false"]).batching is False
    assert load_config(["--reflection", "no"]).reflection is False
    assert load_config([]).batching is False


def test_the_config_files_directories_and_log_and_what_wins(tmp_path: Path) -> None:
    """`table_dirs`, `snapshot_dir` and `update_log` at the top of the TOML file: the
    directories relative to the file's folder; a flag, or its environment twin, wins."""
    (tmp_path / "t.npy").touch()
    for folder in ("incoming", "snaps", "abs", "other", "from-env"):
        (tmp_path / folder).mkdir()
    path = tmp_path / "tables.toml"
    path.write_text(
        f'table_dirs = ["incoming", "{tmp_path / "abs"}"]\nsnapshot_dir = "snaps"\n'
        'update_log = "redis://log:6379/1"\n\n[[table]]\nname = "t"\nsource = "t.npy"\n'
    )
    config = load_config(["--config", str(path)], env={})
    assert config.table_dirs == (str(tmp_path / "incoming"), str(tmp_path / "abs"))
    assert config.snapshot_dir == str(tmp_path / "snaps")
    assert config.update_log == "redis://log:6379/1"
    flags = ["--config", str(path), "--table-dir", str(tmp_path / "other"),
             "--snapshot-dir", str(tmp_path), "--update-log", "redis://mine:6379/0"]  # fmt: skip
    config = load_config(flags, env={})
    assert (config.table_dirs, config.snapshot_dir) == ((str(tmp_path / "other"),), str(tmp_path))
    assert config.update_log == "redis://mine:6379/0"
    env = {"EMBEDDING_TABLE_DIR": str(tmp_path / "from-env"),
           "EMBEDDING_SNAPSHOT_DIR": str(tmp_path / "incoming")}  # fmt: skip
    config = load_config(["--config", str(path)], env=env)
    assert config.table_dirs == (str(tmp_path / "from-env"),)
    assert config.snapshot_dir == str(tmp_path / "incoming")
