"""The reference client of the benchmarks: a bare asyncio + aiohttp loop.

It sends the same requests as ``pipeline run`` would for a CSV with a ``prompt`` column:
the same URL, the same JSON body (``{"model", "messages": [{"role": "user", ...}]}``, UTF-8,
``ensure_ascii=False``), the same headers, N requests in flight over one keep-alive pool of N
connections, and it parses every JSON answer. It keeps the answers in memory and writes no
output file, retries nothing, paces nothing: the fastest straightforward loop, the one the
pipeline is measured against.

    python benchmarks/bare_loop.py in.csv --base-url http://127.0.0.1:PORT/v1 --concurrency 64

Prints one JSON line on stdout: rows, ok, errors, status counts, and the sending phase's
first/last request times (``time.time()``).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
import time
from collections import Counter


def read_prompts(path: str, column: str) -> list[str]:
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        return [row[column] for row in reader]


async def main_async(args: argparse.Namespace, prompts: list[str]) -> dict[str, object]:
    import aiohttp

    url = args.base_url.rstrip("/") + "/chat/completions"
    headers = {
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": "bare-loop/0.1",
    }
    connector = aiohttp.TCPConnector(limit=args.concurrency, limit_per_host=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    answers: list[str | None] = [None] * len(prompts)
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    next_index = iter(range(len(prompts)))
    first_last = [float("inf"), 0.0]

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            for i in next_index:
                body = json.dumps(
                    {"model": args.model, "messages": [{"role": "user", "content": prompts[i]}]},
                    ensure_ascii=False,
                ).encode()
                sent = time.time()
                if sent < first_last[0]:
                    first_last[0] = sent
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        content = await response.read()
                        statuses[response.status] += 1
                        if response.status == 200:
                            data = json.loads(content)
                            answers[i] = data["choices"][0]["message"]["content"]
                except Exception as exc:  # counted, not retried
                    errors[type(exc).__name__] += 1
                first_last[1] = time.time()

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))

    ok = sum(1 for a in answers if a is not None)
    return {
        "rows": len(prompts),
        "ok": ok,
        "statuses": {str(k): v for k, v in statuses.items()},
        "errors": dict(errors),
        "first_request": first_last[0],
        "last_answer": first_last[1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="CSV with a prompt column")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", default="gpt-3.5-turbo")
    parser.add_argument("--prompt-column", default="prompt")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument(
        "--uvloop", action="store_true", help="run on uvloop instead of asyncio's own loop"
    )
    args = parser.parse_args()
    prompts = read_prompts(args.input, args.prompt_column)
    if args.uvloop:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result = runner.run(main_async(args, prompts))
    else:
        result = asyncio.run(main_async(args, prompts))
    print(json.dumps(result), flush=True)
    sys.exit(0 if result["ok"] == result["rows"] else 1)


if __name__ == "__main__":
    main()
