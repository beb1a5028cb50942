"""Opening a job's input: the input source and its prompt builder, with every column the
options name checked before anything else happens (a prompt column, --id-column,
--expected-column, and no input column that OUTPUT would add again). Reads the schema
only; computes no key and touches no checkpoint.
"""

from __future__ import annotations

from typing import Any

from .config import RunConfig
from .errors import ConfigError, InputError
from .prompts import PromptBuilder
from .reader import InputSource, delimiter_hint, open_input
from .records import RESULT_COLUMNS, WIDE_SEPARATOR
from .samples import SAMPLE_COLUMN
from .structured import schema_columns
from .writer import output_spec


def open_job(data: Any, config: RunConfig) -> tuple[InputSource, PromptBuilder]:
    """The input and its prompt builder, with every column the options name checked."""
    source = open_input(
        data, input_format=config.input_format, limit=config.limit, delimiter=config.delimiter
    )
    schema = source.schema()
    columns = list(schema.names)
    try:
        _check_added_columns(source, config)
        kind, value = config.prompt_source
        builder = PromptBuilder(
            kind, value, system=config.system, columns=columns, source_name=source.name
        )
        if config.id_column is not None and config.id_column not in columns:
            raise InputError(
                f"{source.name} has no column '{config.id_column}' for --id-column "
                f"(columns: {', '.join(columns)})."
            )
        if config.expected_column is not None and config.expected_column not in columns:
            raise InputError(
                f"{source.name} has no column '{config.expected_column}' for --expected-column "
                f"(columns: {', '.join(columns)})."
            )
    except InputError as exc:
        hint = delimiter_hint(columns, config.delimiter)
        if hint:
            raise InputError(f"{exc} {hint}") from exc
        raise
    return source, builder


def _check_added_columns(source: InputSource, config: RunConfig) -> None:
    """Refuse, before any request, an input column that OUTPUT would add again (a Parquet
    file cannot hold two columns of one name), naming the option that adds it."""
    schema = source.schema()
    columns = list(schema.names)
    spec = output_spec(config)
    added = spec.schema_for(schema).names[len(columns) :]
    schema_names = (
        {n for n, _ in schema_columns(spec.schema, spec.schema_prefix)} if spec.schema else set()
    )
    seen = set(columns)
    for column in added:
        if column not in seen:
            seen.add(column)
            continue
        where = "the input already has" if column in columns else "OUTPUT already has"
        # with --wide the schema's columns sit in each model's group: {model}__{column}
        own = column.split(WIDE_SEPARATOR, 1)[-1] if config.wide else column
        if own in schema_names:
            raise ConfigError(
                f"--json-schema {config.json_schema}: its property would become the column "
                f"'{column}', which {where}. Set --schema-prefix (e.g. "
                "--schema-prefix answer_) so that the schema's columns get their own names."
            )
        if column in RESULT_COLUMNS:
            because = "which OUTPUT adds for every result (is this an earlier output?)"
        elif column == SAMPLE_COLUMN:
            because = "which --samples long adds; or use --samples list"
        elif column == "model":
            because = "which OUTPUT adds when several models run (--model given more than once)"
        elif column in ("label", "score"):
            because = f"which --{'labels' if column == 'label' else 'score'} adds"
        else:
            because = "which --wide adds (model name + '__' + result column)"
        raise InputError(
            f"{source.name} already has a column '{column}', {because}. Rename or drop it in the "
            "input."
        )
