"""A provider's batch discount (configs/prices.toml ``[batch."HOST"] share``): the batch price
of a model without batch prices of its own, in a batch run's ``cost_usd`` and in ``pipeline
estimate --batch``; a model's own batch prices still win; an unlisted provider bills half."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from batch_server import BatchServer
from conftest import run_job

from pipeline.config import RunConfig
from pipeline.errors import ConfigError
from pipeline.pricing import PriceTable
from pipeline.runner import estimate_job

LLAMA = "meta-llama/Llama-3.3-70B-Instruct-Turbo"  # no batch prices of its own in the table


def _prices(path: Path, text: str) -> Path:
    path.write_text(text, "utf-8")
    return path


def test_a_providers_share_prices_each_row_of_a_batch_run(tmp_path: Path) -> None:
    data = tmp_path / "in.csv"
    pd.DataFrame({"prompt": [f"item number {i}" for i in range(5)]}).to_csv(data, index=False)
    prices = _prices(
        tmp_path / "p.toml",
        '[models."m"]\ninput = 1.0\noutput = 2.0\n\n[batch."127.0.0.1"]\nshare = 0.25\n',
    )
    with BatchServer() as server:
        run_job(
            data, tmp_path / "out.parquet", base_url=server.base_url, model="m",
            prices=str(prices), batch=True, poll_interval=0.01,
        )  # fmt: skip
    frame = pd.read_parquet(tmp_path / "out.parquet")
    assert (frame["cost_source"] == "batch_table").all()
    want = (frame["prompt_tokens"] * 1.0 + frame["completion_tokens"] * 2.0) / 1e6 * 0.25
    assert frame["cost_usd"].tolist() == pytest.approx(want.tolist())


def test_estimate_batch_uses_the_share_of_the_base_urls_provider(tmp_path: Path) -> None:
    data = tmp_path / "in.csv"
    pd.DataFrame({"prompt": ["a question", "another one"]}).to_csv(data, index=False)

    def typical(base_url: str, batch: bool) -> float:
        config = RunConfig(base_url=base_url, model=LLAMA, batch=batch, max_tokens=100)
        (result,) = estimate_job(data, None, config, typical_completion=50)
        assert result.cost_typical is not None
        return result.cost_typical

    online = typical("https://api.groq.com/openai/v1", batch=False)
    assert typical("https://api.groq.com/openai/v1", batch=True) == pytest.approx(online * 0.75)
    assert typical("https://api.deepinfra.com/v1/openai", True) == pytest.approx(online * 0.8)
    assert typical("http://127.0.0.1:9/v1", batch=True) == pytest.approx(online * 0.5)


def test_a_models_own_batch_prices_win_over_the_providers_share() -> None:
    table = PriceTable.load()
    price = table.price("gpt-4o-mini")
    assert price is not None and price.batch_input is not None
    own, source = price.batch(table.batch_share("https://api.groq.com/openai/v1"))
    assert (own.input, own.output, source) == (price.batch_input, price.batch_output, "batch_table")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[batch."h"]\nshare = 1.5\n', 'batch."h"]: share must be a number above 0'),
        ('[batch."h"]\nshares = 0.5\n', 'batch."h"]: give share (and source, date) only'),
    ],
)
def test_a_bad_share_names_the_file_and_host(tmp_path: Path, text: str, message: str) -> None:
    prices = _prices(tmp_path / "p.toml", text)
    with pytest.raises(ConfigError) as error:
        PriceTable.load(prices)
    assert str(prices) in str(error.value) and message in str(error.value)
