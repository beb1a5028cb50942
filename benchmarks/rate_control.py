"""Rate control benchmark: the scenarios of issue 13, measured back to back in one session.

    python benchmarks/rate_control.py                  # all five scenarios, ~5 min on 2 cores
    python benchmarks/rate_control.py --only scattered,unknown
    python benchmarks/rate_control.py --rounds 1       # one round of the scattered comparison

Every server is the project simulator (``python -m pipeline simulate``) pinned to core 0 and
listening on 127.0.0.1; every client is pinned to core 1 (helpers from ``bench.py``).

- scattered: 10% 500 + 5% 429 (Retry-After 1), no limit; 3,000 rows, 64 in flight. Wall
  time of ``pipeline run`` / wall time of a plain per-row-retry client (benchmarks/
  plain_retry.py: aiohttp + semaphore, Retry-After on 429, 0.5 s x 2^k on 5xx, waits outside
  the semaphore), the two back to back on one seed in each round: the median of the rounds'
  ratios (the ratio of each side's median is shown too). Target <= 1.25, every row ok.
- unknown: 20 req/s, burst 5, 429 + Retry-After beyond it, no x-ratelimit headers; 1,200
  rows, 64 in flight, no --rpm. Answers/s over the whole run / 20 (target >= 0.90), share
  of requests answered 429 (<= 5%), and after the first 10 s (< 2%).
- schedule: the limit is 40 -> 10 -> 40 req/s (changes 10 s and 20 s after the first
  request), burst 5; 1,000 rows. For each change: seconds until a 1-s window's answers are
  within 20% of the new limit (target <= 5 s).
- announced: 200 req/s with 20 ms latency, 4,000 rows: (a) --rpm 12000, (b) the simulator
  sends x-ratelimit-* headers. Steady answers/s / 200 and 429 share (today: 1.00, 0.00%).
- two: two ``pipeline run`` processes (600 rows each) on one unknown 20 req/s limit: their
  total answers/s while both run / 20 (>= 0.85) and each one's share (>= 1/3 of the total).

From the simulator's request log (arrival time and request id of every chat request): each
row's last request is its 200 in the limit scenarios (no other faults there), so 429s =
requests - rows ok. Results: benchmarks/results/rate-<time>.json and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402
from bench import (  # noqa: E402
    CLIENT_CPU,
    PY,
    fresh_dir,
    log,
    make_table,
    pinned,
    pipeline_cmd,
    read_summary,
    run_child,
    simulator,
    write_csv,
)

QUESTION = re.compile(r"Question (\d+):")
# children import ``pipeline`` from this tree (not wherever the editable install points)
bench.PIPELINE_SRC = HERE.parent


def read_log(path: Path) -> list[dict[str, Any]]:
    """Request-log lines: arrival time, request id, the row number in the prompt."""
    out = []
    with path.open("rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            rec = json.loads(line)
            body = rec.get("body") or {}
            text = str((body.get("messages") or [{}])[-1].get("content", ""))
            match = QUESTION.search(text)
            out.append(
                {
                    "t": rec["t"],
                    "id": rec.get("client_request_id"),
                    "row": int(match.group(1)) if match else -1,
                }
            )
    return out


def ok_times(reqs: list[dict[str, Any]]) -> list[float]:
    """Each row's last request: its answer (no faults but 429s in these scenarios)."""
    last: dict[Any, float] = {}
    for r in reqs:
        key = r["id"] or r["row"]
        last[key] = max(r["t"], last.get(key, 0.0))
    return sorted(last.values())


def per_second(times: list[float], start: float, end: float) -> list[int]:
    bins = [0] * max(1, int(end - start) + 1)
    for t in times:
        if start <= t < end:
            bins[int(t - start)] += 1
    return bins


def run_pipeline(rdir: Path, inp: Path, base_url: str, *extra: str) -> dict[str, Any]:
    out = rdir / "out.parquet"
    run = run_child(pipeline_cmd(inp, out, base_url, 64, *extra), rdir / "client.log")
    if run.rc not in (0, 1):
        raise RuntimeError(f"pipeline failed (rc {run.rc}): {run.output()[-3000:]}")
    summary = read_summary(out)
    return {"wall_s": run.wall_s, "ok": summary["ok"], "error": summary["error"], "log": run}


# -- scenarios ------------------------------------------------------------------------------


def scattered(work: Path, rounds: int) -> dict[str, Any]:
    rows = 3000
    inp = work / "scattered.csv"
    write_csv(make_table(rows, start=5 * 10**7), inp)
    runs: dict[str, list[dict[str, Any]]] = {"plain": [], "pipeline": []}
    for rep in range(rounds):
        for side in ("plain", "pipeline"):
            rdir = fresh_dir(work, f"scattered-{side}-{rep}")
            sim = simulator(rdir, "sim", rate_500=0.10, rate_429=0.05, retry_after=1, seed=rep)
            with sim as server:
                if side == "plain":
                    cmd = pinned(
                        [
                            PY,
                            str(HERE / "plain_retry.py"),
                            str(inp),
                            "--base-url",
                            server.base_url,
                            "--concurrency",
                            "64",
                        ],
                        CLIENT_CPU,
                    )
                    run = run_child(cmd, rdir / "client.log")
                    line = [ln for ln in run.output().splitlines() if ln.startswith("{")][-1]
                    rec = {"wall_s": run.wall_s, "ok": json.loads(line)["ok"]}
                else:
                    res = run_pipeline(rdir, inp, server.base_url, "--max-retries", "10")
                    rec = {"wall_s": res["wall_s"], "ok": res["ok"]}
            runs[side].append(rec)
            log(f"scattered {side} #{rep}: {rec['wall_s']:.1f} s, {rec['ok']} ok")
            shutil.rmtree(rdir)
    plain = statistics.median(r["wall_s"] for r in runs["plain"])
    ours = statistics.median(r["wall_s"] for r in runs["pipeline"])
    # Paired: each round runs both clients back to back on the same seed. Wall time is ruled
    # by a few unlucky rows (four 500s in a row cost 0.5+1+2+4 s of backoff to either client),
    # so medians of each side taken apart can pair a lucky round with an unlucky one.
    paired = [
        p["wall_s"] and o["wall_s"] / p["wall_s"]
        for p, o in zip(runs["plain"], runs["pipeline"], strict=True)
    ]
    return {
        "rows": rows,
        "plain_wall_s": plain,
        "pipeline_wall_s": ours,
        "ratio": statistics.median(paired),
        "ratio_of_medians": ours / plain,
        "paired_ratios": paired,
        "all_ok": all(r["ok"] == rows for rs in runs.values() for r in rs),
        "runs": runs,
    }


def limited(work: Path, name: str, rows: int, **sim_opts: Any) -> dict[str, Any]:
    """One pipeline run against a simulator limit; the request log analysed."""
    inp = work / f"{name}.csv"
    write_csv(make_table(rows, start=6 * 10**7), inp)
    rdir = fresh_dir(work, name)
    req_log = rdir / "requests.jsonl"
    with simulator(rdir, "sim", request_log=req_log, **sim_opts) as server:
        res = run_pipeline(rdir, inp, server.base_url)
    reqs = read_log(req_log)
    first = min(r["t"] for r in reqs)
    oks = ok_times(reqs)
    end = oks[-1]
    n429 = len(reqs) - res["ok"]
    after10 = [r for r in reqs if r["t"] >= first + 10]
    ok_after10 = sum(1 for t in oks if t >= first + 10)
    rec = {
        "rows": rows,
        "ok": res["ok"],
        "error": res["error"],
        "requests": len(reqs),
        "n429": n429,
        "share_429": n429 / len(reqs),
        "share_429_after_10s": (len(after10) - ok_after10) / max(1, len(after10)),
        "answers_per_s": res["ok"] / (end - first),
        "per_second": per_second(oks, first, end + 1),
        "client_log_tail": res["log"].output()[-1500:],
    }
    shutil.rmtree(rdir)
    return rec


def unknown(work: Path) -> dict[str, Any]:
    rec = limited(work, "unknown", 1200, rps_limit=20, rps_burst=5)
    rec["of_limit"] = rec["answers_per_s"] / 20
    log(
        f"unknown: {rec['of_limit']:.3f} of the limit, 429s {rec['share_429']:.2%} "
        f"({rec['n429']}), after 10 s {rec['share_429_after_10s']:.2%}, ok {rec['ok']}"
    )
    return rec


def schedule(work: Path) -> dict[str, Any]:
    rec = limited(
        work, "schedule", 1000, rps_limit=40, rps_burst=5, rps_schedule="0:40,10:10,20:40"
    )
    series = rec["per_second"]
    followed = {}
    for change, limit in ((10, 10), (20, 40)):
        took = None
        for s in range(change, min(len(series), change + 15)):
            if abs(series[s] - limit) <= 0.2 * limit:
                took = s + 1 - change  # the end of the first good 1-s window
                break
        followed[f"{change}s->{limit}"] = took
    rec["seconds_to_within_20pct"] = followed
    log(f"schedule: {followed}; per second {series}")
    return rec


def announced(work: Path) -> dict[str, Any]:
    rows, limit = 4000, 200
    out: dict[str, Any] = {}
    for side, extra, headers in (
        ("rpm", ["--rpm", str(limit * 60)], False),
        ("headers", [], True),
    ):
        inp = work / "announced.csv"
        write_csv(make_table(rows, start=7 * 10**7), inp)
        rdir = fresh_dir(work, f"announced-{side}")
        req_log = rdir / "requests.jsonl"
        sim = simulator(
            rdir,
            "sim",
            request_log=req_log,
            latency_ms=20,
            rps_limit=limit,
            rate_limit_headers=headers,
        )
        with sim as server:
            res = run_pipeline(rdir, inp, server.base_url, *extra)
        reqs = read_log(req_log)
        first = min(r["t"] for r in reqs)
        oks = ok_times(reqs)
        end = oks[-1]
        steady = sum(1 for t in oks if t > first + 2) / (end - first - 2)
        n429 = len(reqs) - res["ok"]
        out[side] = {
            "steady_over_n": steady / limit,
            "whole_over_n": res["ok"] / (end - first) / limit,
            "share_429": n429 / len(reqs),
            "ok": res["ok"],
        }
        log(f"announced {side}: {out[side]}")
        shutil.rmtree(rdir)
    return out


def two(work: Path) -> dict[str, Any]:
    rows, limit = 600, 20
    rdir = fresh_dir(work, "two")
    req_log = rdir / "requests.jsonl"
    inputs = []
    for k in range(2):
        inp = rdir / f"in{k}.csv"
        write_csv(make_table(rows, start=k * 10**6), inp)
        inputs.append(inp)
    with simulator(rdir, "sim", request_log=req_log, rps_limit=limit, rps_burst=5) as server:
        import subprocess

        procs = []
        for k in range(2):
            out = rdir / f"out{k}.parquet"
            cmd = pipeline_cmd(inputs[k], out, server.base_url, 64)
            fh = (rdir / f"client{k}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    cmd,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    cwd=bench.CHILD_CWD,
                    env=bench.child_env(),
                )
            )
        for proc in procs:
            proc.wait(timeout=600)
    reqs = read_log(req_log)
    side = [[r for r in reqs if (r["row"] >= 10**6) == bool(k)] for k in range(2)]
    oks = [ok_times(s) for s in side]
    start = max(min(r["t"] for r in s) for s in side)
    both_end = min(o[-1] for o in oks)
    span = both_end - start
    each = [sum(1 for t in o if start <= t < both_end) / span for o in oks]
    total = sum(each)
    summaries = [read_summary(rdir / f"out{k}.parquet") for k in range(2)]
    rec = {
        "both_running_s": span,
        "total_over_limit": total / limit,
        "each_per_s": each,
        "each_share_of_total": [e / total for e in each],
        "ok": [s["ok"] for s in summaries],
        "share_429": (len(reqs) - sum(s["ok"] for s in summaries)) / len(reqs),
    }
    log(f"two: {rec}")
    shutil.rmtree(rdir)
    return rec


def report(res: dict[str, Any]) -> str:
    lines = ["| scenario | measured | target |", "|---|---|---|"]
    if "scattered" in res:
        s = res["scattered"]
        lines.append(
            "| scattered 10% 500 + 5% 429, 3,000 rows | pipeline / plain, median of the "
            f"rounds' ratios **{s['ratio']:.2f}x** (rounds: "
            f"{', '.join(f'{r:.2f}' for r in s['paired_ratios'])}; medians {s['pipeline_wall_s']:.1f}"
            f" s / {s['plain_wall_s']:.1f} s = {s['ratio_of_medians']:.2f}x), all ok: {s['all_ok']} "
            "| <= 1.25x, all ok |"
        )
    if "unknown" in res:
        u = res["unknown"]
        lines.append(
            f"| unknown 20 req/s, burst 5, 1,200 rows | **{u['of_limit']:.2f}** of the limit, "
            f"429s {u['share_429']:.1%} ({u['n429']}), after 10 s {u['share_429_after_10s']:.1%}, "
            f"{u['ok']} ok | >= 0.90, <= 5%, < 2% |"
        )
    if "schedule" in res:
        sc = res["schedule"]
        lines.append(
            f"| 40 -> 10 -> 40 req/s | seconds to within 20%: {sc['seconds_to_within_20pct']}, "
            f"{sc['ok']} ok | <= 5 s each |"
        )
    if "announced" in res:
        for side, a in res["announced"].items():
            lines.append(
                f"| announced 200 req/s ({side}) | steady **{a['steady_over_n']:.2f}** N, "
                f"429s {a['share_429']:.2%} | 1.00, 0.00% |"
            )
    if "two" in res:
        t = res["two"]
        shares = ", ".join(f"{x:.2f}" for x in t["each_share_of_total"])
        lines.append(
            f"| two processes, one 20 req/s limit | total **{t['total_over_limit']:.2f}** of "
            f"the limit, shares {shares}, 429s {t['share_429']:.1%} | >= 0.85, each >= 0.33 |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="scattered,unknown,schedule,announced,two")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    chosen = args.only.split(",")
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
    with tempfile.TemporaryDirectory(prefix="rate-bench-") as tmp:
        work = Path(tmp)
        if "scattered" in chosen:
            results["scattered"] = scattered(work, args.rounds)
        if "unknown" in chosen:
            results["unknown"] = unknown(work)
        if "schedule" in chosen:
            results["schedule"] = schedule(work)
        if "announced" in chosen:
            results["announced"] = announced(work)
        if "two" in chosen:
            results["two"] = two(work)
    bench.RESULTS.mkdir(exist_ok=True)
    path = bench.RESULTS / f"rate-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    text = report(results)
    path.with_suffix(".md").write_text(text + "\n")
    print(text)
    log(f"results: {path}")


if __name__ == "__main__":
    main()
