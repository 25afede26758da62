"""The serving layer's serve options (serving/options.py): the table covers the
settings, the layer's messages name only flags it defines and take them from the
table, and the parsed values become the ServeConfig and Limits they say.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from number_service.serving import Limits, ServeConfig, options, settings

SERVING = Path(options.__file__).resolve().parent
FLAG = re.compile(r"--[a-z][a-z-]*")


def sources() -> list[Path]:
    return sorted(SERVING.rglob("*.py"))


def test_every_flag_the_layer_names_is_one_it_defines() -> None:
    """Docstrings and comments included: a service served by the layer has each."""
    defined = {option.flag for option in options.OPTIONS}
    named = {(path.name, found) for path in sources() for found in FLAG.findall(path.read_text())}
    assert {(name, found) for name, found in named if found not in defined} == set()


def _strings_outside_docstrings(tree: ast.AST) -> list[ast.Constant]:
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        if id(node) not in docstrings
    ]


def test_the_layers_messages_take_flag_names_from_the_table() -> None:
    """No string of the layer's code outside options.py spells a flag out (a status,
    a log line, the supervisor's worker command): each calls ``settings.flag``, so a
    flag renamed there cannot leave a stale message behind."""
    spelt = [
        f"{path.relative_to(SERVING)}:{node.lineno}: {node.value!r}"
        for path in sources()
        if path.name != "options.py"
        for node in _strings_outside_docstrings(ast.parse(path.read_text()))
        if FLAG.search(str(node.value))
    ]
    assert spelt == []


def test_every_flag_a_message_takes_is_one_a_serve_command_has() -> None:
    """``settings.flag(setting)`` only spells a name: each setting the layer's code
    names with it is one a serve option sets (a misspelt one would name no flag)."""
    called = {
        (path.name, node.args[0].value)
        for path in sources()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "flag"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    }
    assert len(called) > 10, called  # the statuses, the log lines, the supervisor
    settings_ = {option.setting for option in options.OPTIONS}
    assert {(name, setting) for name, setting in called if setting not in settings_} == set()


def test_each_flag_is_its_settings_name_with_dashes() -> None:
    assert options.flag("max_connections") == settings.flag("max_connections")
    assert settings.flag("max_connections") == "--max-connections"
    assert [o.flag for o in options.OPTIONS] == [settings.flag(o.setting) for o in options.OPTIONS]


def test_the_table_covers_every_setting_of_limits_and_serve_config() -> None:
    limits = {field.name for field in dataclasses.fields(Limits)}
    config = {field.name for field in dataclasses.fields(ServeConfig)}
    to = {where: {o.setting for o in options.OPTIONS if o.to == where} for where in ("limits",)}
    to["config"] = {o.setting for o in options.OPTIONS if o.to == "config"}
    # Not flags: set by the serve command itself (tls, workers, worker) or by the
    # application (name, trace_messages).
    assert to["limits"] == limits
    assert to["config"] == config - {
        "tls",
        "workers",
        "worker",
        "limits",
        "name",
        "trace_messages",
    }
    assert len({o.flag for o in options.OPTIONS}) == len(options.OPTIONS)
    for o in options.OPTIONS:
        if o.to == "limits" and not o.zero_is_off:
            assert o.default == getattr(Limits(), o.setting), o.setting


def test_an_unknown_setting_is_an_error_not_a_silent_default() -> None:
    with pytest.raises(KeyError, match="no serve option sets 'max_conections'"):
        options.flag("max_conections")
    with pytest.raises(KeyError):
        options.serve_options("X_", defaults={"max_conections": 1})
    with pytest.raises(KeyError):
        options.serve_options("X_", exclude=["wrokers"])


def run(args: list[str], base: ServeConfig, **kwargs: Any) -> tuple[ServeConfig | None, str]:
    """A command built with ``serve_options(**kwargs)``: the ServeConfig it builds
    from ``args`` (None if it failed) and its output."""
    built: list[ServeConfig] = []

    @click.command()
    @options.serve_options("APP_", **kwargs)
    def command(**values: Any) -> None:
        built.append(options.serve_config(values, base))

    result = CliRunner().invoke(command, args, env={"APP_GRACE": "3"})
    return (built[0] if built else None), result.output


def test_values_become_the_serve_config_and_its_limits() -> None:
    base = ServeConfig(name="app", limits=Limits(max_message_size=99))
    args = ["--port", "0", "--max-connections", "0", "--idle-timeout", "7"]
    args += ["--max-resets", "5", "--tls-handshake-timeout", "2.5"]
    config, out = run(
        args,
        base,
        defaults={"max_message_size": 1234},
    )
    assert config is not None, out
    assert (config.name, config.port, config.grace, config.metrics_port) == ("app", 0, 3.0, None)
    assert config.tls is None
    assert config.limits == Limits(
        max_message_size=1234,  # the command's default, over the table's
        max_connections=None,  # 0: no cap
        idle_timeout=7.0,
        max_resets=5,
        tls_handshake_timeout=2.5,
    )


def test_an_excluded_option_keeps_the_base_value() -> None:
    base = ServeConfig(port=4321, limits=Limits(max_message_size=99))
    config, out = run([], base, exclude=["port", "max_message_size", "workers"])
    assert config is not None, out
    assert (config.port, config.limits.max_message_size) == (4321, 99)
    _, out = run(["--workers", "2"], base, exclude=["workers"])
    assert "No such option" in out
    assert "--workers" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together: give both"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca needs --tls-cert and --tls-key"),
    ],
)
def test_incomplete_tls_files_are_a_usage_error(args: list[str], message: str) -> None:
    config, out = run(args, ServeConfig())
    assert config is None
    assert message in out


@pytest.mark.parametrize("given", [["--grace", "nan"], ["--idle-timeout", "NaN"]])
def test_a_number_of_seconds_that_is_not_a_number_is_a_usage_error(given: list[str]) -> None:
    """nan passes FloatRange's bounds (each comparison with it is false); Seconds
    refuses it, from the command line and from the environment."""
    config, out = run(given, ServeConfig())
    assert config is None
    assert "is not a number of seconds" in out
    built: list[ServeConfig] = []

    @click.command()
    @options.serve_options("APP_")
    def command(**values: Any) -> None:
        built.append(options.serve_config(values, ServeConfig()))

    result = CliRunner().invoke(command, [], env={"APP_GRACE": "nan"})
    assert result.exit_code == 2, result.output
    assert "is not a number of seconds" in result.output
    assert not built
    config, out = run(["--grace", "inf", "--idle-timeout", "2.5"], ServeConfig())
    assert config is not None, out  # a bound that is a number still passes
    assert (config.grace, config.limits.idle_timeout) == (float("inf"), 2.5)
