"""The plain client of the rate-control benchmark: aiohttp + a semaphore, each row retried alone.

    python benchmarks/plain_retry.py IN.csv --base-url URL [--concurrency 64]

One task per row; a semaphore holds requests in flight to ``--concurrency``. A 429 waits its
Retry-After, a 5xx or a dropped connection 0.5 s x 2^k, and every wait is outside the
semaphore (the slot goes to another row). No rate control at all: what a careful script does.
Prints one JSON line: rows, ok, requests, 429s, wall seconds. Talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import time

import aiohttp


def read_prompts(path: str) -> list[str]:
    with open(path, newline="", encoding="utf-8") as fh:
        return [row["prompt"] for row in csv.DictReader(fh)]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("input")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--model", default="gpt-3.5-turbo")
    parser.add_argument("--max-attempts", type=int, default=30)
    args = parser.parse_args()
    started = time.monotonic()
    prompts = read_prompts(args.input)
    url = args.base_url.rstrip("/") + "/chat/completions"
    slots = asyncio.Semaphore(args.concurrency)
    counts = {"ok": 0, "requests": 0, "429": 0, "5xx": 0}
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(prompt: str) -> None:
            body = {"model": args.model, "messages": [{"role": "user", "content": prompt}]}
            for attempt in range(args.max_attempts):
                wait = 0.5 * 2**attempt
                async with slots:
                    counts["requests"] += 1
                    try:
                        async with session.post(url, json=body) as response:
                            await response.read()
                            status = response.status
                            retry_after = response.headers.get("retry-after")
                    except aiohttp.ClientError:
                        status, retry_after = 599, None
                if status == 200:
                    counts["ok"] += 1
                    return
                if status == 429:
                    counts["429"] += 1
                    if retry_after is not None:
                        wait = float(retry_after)
                else:
                    counts["5xx"] += 1
                await asyncio.sleep(min(wait, 30.0))  # outside the semaphore

        await asyncio.gather(*(one(p) for p in prompts))
    print(
        json.dumps(
            {
                "rows": len(prompts),
                "ok": counts["ok"],
                "requests": counts["requests"],
                "n429": counts["429"],
                "n5xx": counts["5xx"],
                "wall_s": time.monotonic() - started,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
