"""Options: from the command line, a ``--config`` TOML file, or the defaults, in that order.

Every option can be set in the TOML file; the command line beats the file, the file beats
the defaults; an unknown key or a wrong value is an error that names it. ``--param KEY=JSON``
adds any other body field; body fields that were never set are left out, never sent as
null; ``--stop`` can be given several times.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pandas as pd
import pytest
from conftest import run_cli

import pipeline
from pipeline.cli import run as run_command
from pipeline.settings import load_config_file
from pipeline.simulator import SimulatorThread


def only_body(sim: SimulatorThread) -> dict[str, Any]:
    """The body of the one request the simulator received."""
    assert len(sim.simulator.requests) == 1, sim.simulator.requests
    body = sim.simulator.requests[0].body
    assert body is not None
    return body


def write_toml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# -- defaults ------------------------------------------------------------------------------


def test_without_options_the_body_is_only_the_default_model_and_the_messages(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    (tmp_path / "in.csv").write_text("prompt\nhello\n", encoding="utf-8")

    result = run_cli(tmp_path, "in.csv", "-o", "out.parquet", "--base-url", simulator.base_url)

    assert result.returncode == 0, result.stderr
    assert only_body(simulator) == {
        "model": "gpt-3.5-turbo",
        "messages": [{"role": "user", "content": "hello"}],
    }  # no temperature, max_tokens, stop, ... and never a null


# -- the config file -------------------------------------------------------------------------


def test_a_config_file_alone_can_set_up_the_whole_run(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    (tmp_path / "in.csv").write_text(
        "key,question\nk1,first?\nk2,second?\nk3,third?\n", encoding="utf-8"
    )
    config = write_toml(
        tmp_path / "run.toml",
        f"""
base_url = "{simulator.base_url}"
model = "gpt-3.5-turbo-0125"
template = "Q: {{question}}"
system = "Be brief."
temperature = 0.2
max_tokens = 64
top_p = 0.9
seed = 7
stop = ["###", "END"]
response_format = "json_object"
id_column = "key"
limit = 1
concurrency = 4
timeout = 30
max_retries = 2
progress = false
summary_json = "summary.json"

[params]
presence_penalty = 0.5
provider = "openai"
""",
    )

    result = run_cli(tmp_path, "in.csv", "-o", "out.parquet", "--config", str(config))

    assert result.returncode == 0, result.stderr
    assert only_body(simulator) == {  # limit = 1: only the first row was sent
        "model": "gpt-3.5-turbo-0125",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Q: first?"},
        ],
        "temperature": 0.2,
        "max_tokens": 64,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["###", "END"],
        "response_format": {"type": "json_object"},
        "presence_penalty": 0.5,
        "provider": "openai",
    }
    assert (tmp_path / "summary.json").exists()
    output = pd.read_parquet(tmp_path / "out.parquet")
    assert output["key"].tolist()[0] == "k1"
    assert output["status"].tolist()[0] == "ok"


def test_command_line_beats_config_file_beats_defaults(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    (tmp_path / "in.csv").write_text("prompt,text\nfrom prompt,from text\n", encoding="utf-8")
    config = write_toml(
        tmp_path / "run.toml",
        f"""
base_url = "{simulator.base_url}"
model = "model-from-file"
prompt_column = "text"
temperature = 0.3
max_tokens = 50
stop = ["file-stop-1", "file-stop-2"]

[params]
presence_penalty = 0.1
frequency_penalty = 0.2
""",
    )

    result = run_cli(
        tmp_path,
        "in.csv",
        "-o",
        "out.parquet",
        "--config",
        str(config),
        "--model",
        "model-from-cli",
        "--max-tokens",
        "99",
        "--stop",
        "cli-stop",
        "--param",
        "presence_penalty=1.5",
    )

    assert result.returncode == 0, result.stderr
    body = only_body(simulator)
    assert body["model"] == "model-from-cli"  # cli beats file
    assert body["max_tokens"] == 99  # cli beats file
    assert body["stop"] in ("cli-stop", ["cli-stop"])  # cli replaces the file's list
    assert body["presence_penalty"] == 1.5  # cli beats file, key by key
    assert body["temperature"] == 0.3  # file beats the default (unset)
    assert body["frequency_penalty"] == 0.2  # file beats the default (unset)
    assert body["messages"] == [{"role": "user", "content": "from text"}]
    assert "top_p" not in body and "seed" not in body  # never set: left out


def test_file_references_in_a_config_file_are_relative_to_that_file(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    (tmp_path / "in.csv").write_text("text\nThe soup was cold.\n", encoding="utf-8")
    (tmp_path / "conf" / "prompts").mkdir(parents=True)
    (tmp_path / "conf" / "prompts" / "classify.txt").write_text(
        "Sentiment of: {text}", encoding="utf-8"
    )
    (tmp_path / "conf" / "prompts" / "system.txt").write_text("One word.", encoding="utf-8")
    config = write_toml(
        tmp_path / "conf" / "run.toml",
        'template = "@prompts/classify.txt"\nsystem = "@prompts/system.txt"\n',
    )

    result = run_cli(
        tmp_path,
        "in.csv",
        "-o",
        "out.parquet",
        "--config",
        str(config.relative_to(tmp_path)),
        "--base-url",
        simulator.base_url,
    )

    assert result.returncode == 0, result.stderr
    assert only_body(simulator)["messages"] == [
        {"role": "system", "content": "One word."},
        {"role": "user", "content": "Sentiment of: The soup was cold."},
    ]


def test_a_flag_set_in_the_config_file_takes_effect(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    (tmp_path / "in.csv").write_text("prompt\nhello\n", encoding="utf-8")
    (tmp_path / "out.parquet").write_bytes(b"not ours")
    config = write_toml(tmp_path / "run.toml", "overwrite = true\n")

    result = run_cli(
        tmp_path,
        "in.csv",
        "-o",
        "out.parquet",
        "--config",
        str(config),
        "--base-url",
        simulator.base_url,
    )

    assert result.returncode == 0, result.stderr
    assert pd.read_parquet(tmp_path / "out.parquet")["status"].tolist() == ["ok"]


def _sample_toml_value(option: click.Option) -> str:
    if option.is_flag:
        return "true"
    if isinstance(option.type, click.Choice):
        return f'"{option.type.choices[0]}"'
    if option.type is click.INT:
        return "1"
    if option.type is click.FLOAT:
        return "1.0"
    return '"x"'


# TOML key for the options whose name is not simply the long option with "_" for "-".
TOML_KEY = {"no_progress": "progress", "params": "params"}
NOT_CONFIGURABLE = {"output", "config_path", "help"}  # -o OUTPUT and --config itself
RUN_OPTIONS = [
    p for p in run_command.params if isinstance(p, click.Option) and p.name not in NOT_CONFIGURABLE
]


@pytest.mark.parametrize("option", RUN_OPTIONS, ids=[str(p.name) for p in RUN_OPTIONS])
def test_every_run_option_can_be_set_in_the_config_file(
    option: click.Option, tmp_path: Path
) -> None:
    assert option.name is not None
    key = TOML_KEY.get(option.name, option.name)
    value = "{ presence_penalty = 0.5 }" if key == "params" else _sample_toml_value(option)
    if key == "progress":
        value = "false"
    config = write_toml(tmp_path / "run.toml", f"{key} = {value}\n")

    problem = None
    try:
        values = load_config_file(config)
    except pipeline.UsageError as exc:
        problem = str(exc)
    assert problem is None, f"{option.opts[-1]} cannot be set in a config file: {problem}"
    assert key in values


def test_log_format_set_in_the_config_file_takes_effect(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    (tmp_path / "in.csv").write_text("prompt\nhello\n", encoding="utf-8")
    config = write_toml(tmp_path / "run.toml", 'log_format = "json"\n')

    result = run_cli(
        tmp_path,
        "in.csv",
        "-o",
        "out.parquet",
        "--config",
        str(config),
        "--base-url",
        simulator.base_url,
    )

    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("{") for line in lines), result.stderr


# -- config errors name the key ----------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        pytest.param("temprature = 0.5\n", "temprature", id="unknown-key"),
        pytest.param('max_tokens = "many"\n', "max_tokens", id="wrong-type"),
        pytest.param("temperature = 5\n", "temperature", id="out-of-range"),
        pytest.param("[params]\nmodel = 'x'\n", "model", id="param-shadowing-an-option"),
    ],
)
def test_a_bad_config_value_is_an_error_that_names_the_key(
    toml: str, named: str, simulator: SimulatorThread, tmp_path: Path
) -> None:
    (tmp_path / "in.csv").write_text("prompt\nhello\n", encoding="utf-8")
    config = write_toml(tmp_path / "run.toml", toml)

    result = run_cli(
        tmp_path,
        "in.csv",
        "-o",
        "out.parquet",
        "--config",
        str(config),
        "--base-url",
        simulator.base_url,
    )

    assert result.returncode == 2
    assert named in result.stderr
    assert "Traceback" not in result.stderr
    assert simulator.simulator.requests == []
    assert not (tmp_path / "out.parquet").exists()


# -- --param and --stop --------------------------------------------------------------------


def test_param_values_are_parsed_as_json(simulator: SimulatorThread, tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text("prompt\nhello\n", encoding="utf-8")

    result = run_cli(
        tmp_path,
        "in.csv",
        "-o",
        "out.parquet",
        "--base-url",
        simulator.base_url,
        "--param",
        "presence_penalty=0.5",
        "--param",
        "max_completion_tokens=64",
        "--param",
        'logit_bias={"50256": -100}',
        "--param",
        'user="alice"',
        "--param",
        "logprobs=true",
    )

    assert result.returncode == 0, result.stderr
    body = only_body(simulator)
    assert body["presence_penalty"] == 0.5
    assert body["max_completion_tokens"] == 64
    assert isinstance(body["max_completion_tokens"], int)
    assert body["logit_bias"] == {"50256": -100}
    assert body["user"] == "alice"
    assert body["logprobs"] is True


def test_stop_can_be_given_several_times(simulator: SimulatorThread, tmp_path: Path) -> None:
    (tmp_path / "in.csv").write_text("prompt\nhello\n", encoding="utf-8")

    result = run_cli(
        tmp_path,
        "in.csv",
        "-o",
        "out.parquet",
        "--base-url",
        simulator.base_url,
        "--stop",
        "END",
        "--stop",
        "\n\n",
        "--stop",
        "###",
    )

    assert result.returncode == 0, result.stderr
    assert only_body(simulator)["stop"] == ["END", "\n\n", "###"]


# -- the Python API follows the same rules -------------------------------------------------


def test_python_api_keywords_beat_the_config_file(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    config = write_toml(
        tmp_path / "run.toml",
        f'base_url = "{simulator.base_url}"\nmodel = "model-from-file"\n'
        "temperature = 0.4\nprogress = false\n",
    )

    result = pipeline.run(
        pd.DataFrame({"prompt": ["hello"]}),
        output=tmp_path / "out.parquet",
        config=config,
        model="model-from-keyword",
        stop="END",
    )

    assert result["status"].tolist() == ["ok"]
    body = only_body(simulator)
    assert body["model"] == "model-from-keyword"
    assert body["temperature"] == 0.4
    assert body["stop"] in ("END", ["END"])


def test_python_api_rejects_an_unknown_option_by_name(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    with pytest.raises(pipeline.UsageError, match="temprature"):
        pipeline.run(
            pd.DataFrame({"prompt": ["hello"]}),
            output=tmp_path / "out.parquet",
            base_url=simulator.base_url,
            temprature=0.5,
        )
    assert simulator.simulator.requests == []
    assert not (tmp_path / "out.parquet").exists()
