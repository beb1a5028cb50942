"""The benchmark suite: five figures of `pipeline run` against local servers.

    python benchmarks/bench.py                 # everything (~20 min on 2 cores)
    python benchmarks/bench.py --quick         # smaller sizes, fewer repetitions (~4 min)
    python benchmarks/bench.py --only 1,2      # some figures

Every server runs as its own process pinned to core 0 (``taskset -c 0``) and listens on
127.0.0.1 only; every client runs pinned to core 1. Nothing is sent anywhere else. The two
sides of a comparison alternate within one run (A, B, A, B, ...) so that load from other
work on the machine hits both alike; the tables give medians and ratios of medians.

1. Zero latency, 20k rows, 64 in flight: rows/s of `pipeline run` end to end (process
   start to exit: read CSV, send, write Parquet) / rows/s of a bare asyncio + aiohttp loop
   (benchmarks/bare_loop.py) doing the same requests. Against the project simulator and
   against Debian's nginx answering a fixed completion (a server that is never the limit).
2. 200 ms latency, 10k rows, 200 in flight: efficiency = rows/s / (200 / 0.2 s).
3. The simulator enforcing N requests/s with 429s: (a) `--rpm 60 N`; (b) no --rpm, the
   simulator sends x-ratelimit-* headers. Achieved rate and share of 429s.
4. Peak RSS of `pipeline run` for 100k and 1M rows (~300-character prompts), input as
   Parquet written as ONE row group and as CSV.
5. Resume with 1M rows done and 1000 appended: time from process start to the first new
   request arriving at the simulator.

Results go to benchmarks/results/bench-<time>.json (gitignored); a Markdown report is
printed at the end (and saved beside the JSON) for benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
PY = sys.executable
HOST = "127.0.0.1"  # the only address any benchmark talks to
SERVER_CPU = "0"
CLIENT_CPU = "1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MODEL = "gpt-3.5-turbo"
# Where children import ``pipeline`` from: None = the installed (editable) work tree;
# set by --src / --rev to benchmark a snapshot while the work tree is being edited.
PIPELINE_SRC: Path | None = None
# Children run here, not in the repo: ``python -m`` puts the current directory first on
# sys.path, which would shadow --src / --rev with the work tree.
CHILD_CWD: Path = Path(tempfile.gettempdir())


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- processes ------------------------------------------------------------------------------


def pinned(cmd: Sequence[str], cpu: str) -> list[str]:
    """``cmd`` under ``taskset -c cpu`` (taskset execs it: same pid, same rusage)."""
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", cpu, *cmd]
    return list(cmd)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        env.pop(name, None)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    # a key in the environment would be sent to the local server; none is needed there
    for name in ("AIMLAPI_API_KEY", "OPENAI_API_KEY"):
        env.pop(name, None)
    if PIPELINE_SRC is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PIPELINE_SRC), env.get("PYTHONPATH", "")) if p
        )
    return env


def export_rev(rev: str, dest: Path) -> Path:
    """``git archive REV pipeline`` unpacked into ``dest``; returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "pipeline"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def code_under_test() -> dict[str, Any]:
    """Which pipeline the children import, and the git state of the work tree."""
    probe = subprocess.run(
        [PY, "-c", "import pipeline; print(pipeline.__file__)"],
        capture_output=True,
        text=True,
        cwd=CHILD_CWD,
        env=child_env(),
        check=True,
    ).stdout.strip()
    info: dict[str, Any] = {"pipeline_imported_from": probe}
    with contextlib.suppress(Exception):
        info["head"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "pipeline"],
            capture_output=True,
            text=True,
        ).stdout.splitlines()
        info["work_tree_pipeline_changes"] = len(dirty)
    return info


@dataclass
class ChildRun:
    """One measured client process."""

    cmd: list[str]
    rc: int
    wall_s: float
    user_s: float
    sys_s: float
    maxrss_mb: float
    launched_at: float  # time.time() just before the fork
    log_path: str

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    def output(self) -> str:
        return Path(self.log_path).read_text(encoding="utf-8", errors="replace")


def run_child(cmd: list[str], log_path: Path, *, timeout: float = 1800.0) -> ChildRun:
    """Run ``cmd`` to the end through measure.py: its own wall time, CPU and peak RSS."""
    res_path = log_path.with_name(log_path.name + ".rusage.json")
    launcher = [
        PY,
        str(HERE / "measure.py"),
        str(res_path),
        str(log_path),
        str(timeout),
        "--",
        *cmd,
    ]
    subprocess.run(launcher, cwd=CHILD_CWD, env=child_env(), check=True)
    res = json.loads(res_path.read_text())
    if res["timed_out"]:
        raise RuntimeError(f"timed out after {timeout}s: {' '.join(cmd)}")
    return ChildRun(
        cmd=cmd,
        rc=res["rc"],
        wall_s=res["wall_s"],
        user_s=res["user_s"],
        sys_s=res["sys_s"],
        maxrss_mb=res["maxrss_mb"],
        launched_at=res["launched_at"],
        log_path=str(log_path),
    )


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            try:
                sock.connect((HOST, port))
                return
            except OSError:
                time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {HOST}:{port} after {timeout}s")


class Server:
    """A server process pinned to SERVER_CPU; ``cpu_s()`` reads its CPU use so far."""

    def __init__(self, name: str, cmd: list[str], port: int, log_path: Path) -> None:
        self.name = name
        self.cmd = pinned(cmd, SERVER_CPU)
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    def start(self) -> Server:
        fh = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=CHILD_CWD,
            env=child_env(),
            start_new_session=True,
        )
        fh.close()
        try:
            wait_for_port(self.port, self.proc)
        except BaseException:
            self.stop()
            raise
        _LIVE.add(self)
        return self

    def cpu_s(self) -> float:
        assert self.proc is not None
        return proc_cpu_s(self.proc.pid)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        _LIVE.discard(self)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_LIVE: set[Server] = set()


def simulator(
    work: Path, name: str, port: int | None = None, *, request_log: Path | None = None, **opts: Any
) -> Server:
    """``python -m pipeline simulate`` with options given as keywords (True = a flag)."""
    port = port or free_port()
    cmd = [PY, "-m", "pipeline", "simulate", "--host", HOST, "--port", str(port)]
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif value is not None and value is not False:
            cmd += [flag, str(value)]
    if request_log is not None:
        cmd += ["--request-log", str(request_log)]
    return Server(name, cmd, port, work / f"{name}.server.log")


# A fixed, valid chat completion of about the size the simulator answers for a 300-char prompt.
STATIC_ANSWER = "Simulated answer to: " + " ".join(["static"] * 28)
STATIC_COMPLETION = {
    "id": "chatcmpl-static",
    "object": "chat.completion",
    "created": 1700000000,
    "model": MODEL,
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": STATIC_ANSWER, "refusal": None},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ],
    "usage": {
        "prompt_tokens": 56,
        "completion_tokens": 32,
        "total_tokens": 88,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    },
}


def nginx_server(work: Path) -> Server | None:
    """Debian's nginx answering every request with STATIC_COMPLETION, or None if absent."""
    binary = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if binary is None:
        return None
    root = work / "nginx"
    root.mkdir(exist_ok=True)
    port = free_port()
    body = json.dumps(STATIC_COMPLETION, separators=(",", ":"))
    assert "'" not in body and "\\" not in body
    temp_paths = "\n".join(
        f"  {kind}_temp_path {root / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = f"""# generated by benchmarks/bench.py: a static chat-completions stand-in
worker_processes 1;
daemon off;
master_process off;
error_log {root / "error.log"} warn;
pid {root / "nginx.pid"};
events {{ worker_connections 4096; multi_accept on; }}
http {{
  access_log off;
{temp_paths}
  keepalive_requests 10000000;
  keepalive_timeout 75s;
  client_body_buffer_size 64k;
  client_max_body_size 8m;
  server {{
    listen {HOST}:{port} backlog=1024;
    location / {{
      default_type application/json;
      return 200 '{body}';
    }}
  }}
}}
"""
    (root / "nginx.conf").write_text(conf)
    cmd = [binary, "-p", str(root), "-e", str(root / "error.log"), "-c", str(root / "nginx.conf")]
    return Server("nginx", cmd, port, work / "nginx.server.log")


def check_static_server(server: Server) -> None:
    """One POST through the stand-in: it must answer a parseable completion."""
    import http.client

    conn = http.client.HTTPConnection(HOST, server.port, timeout=5)
    payload = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    conn.request(
        "POST", "/v1/chat/completions", body=payload, headers={"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    data = json.loads(response.read())
    conn.close()
    if response.status != 200 or data["choices"][0]["message"]["content"] != STATIC_ANSWER:
        raise RuntimeError(f"nginx stand-in answered {response.status}: {data}")


# -- data -----------------------------------------------------------------------------------

_CORPUS: str | None = None


def corpus() -> str:
    """~4 MB of random lower-case words to cut prompts from."""
    global _CORPUS
    if _CORPUS is None:
        rng = np.random.default_rng(20240601)
        letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
        freq = np.array(
            [
                12.7,
                9.1,
                8.2,
                7.5,
                7.0,
                6.7,
                6.3,
                6.1,
                6.0,
                4.3,
                4.0,
                2.8,
                2.8,
                2.4,
                2.4,
                2.2,
                2.0,
                2.0,
                1.9,
                1.5,
                1.0,
                0.8,
                0.2,
                0.2,
                0.1,
                0.1,
            ]
        )
        lengths = rng.integers(2, 10, size=6000)
        vocab = ["".join(rng.choice(letters, size=k, p=freq / freq.sum())) for k in lengths]
        words = rng.choice(np.array(vocab), size=700_000)
        _CORPUS = " ".join(words.tolist())
    return _CORPUS


def make_table(n: int, start: int = 0, seed: int = 1) -> pa.Table:
    """``n`` rows: ``id`` and a ~300-character ``prompt`` (unique: it names its row)."""
    text = corpus()
    rng = np.random.default_rng(seed + start)
    offsets = rng.integers(0, len(text) - 400, size=n).tolist()
    prompts = []
    for i, off in enumerate(offsets, start=start):
        head = f"Question {i}: summarise "
        prompts.append(head + text[off : off + 300 - len(head)])
    return pa.table(
        {
            "id": pa.array(np.arange(start, start + n, dtype=np.int64)),
            "prompt": pa.array(prompts, pa.string()),
        }
    )


def write_csv(table: pa.Table, path: Path, *, append: bool = False) -> None:
    if not append:
        pacsv.write_csv(table, path)
        return
    sink = pa.BufferOutputStream()
    pacsv.write_csv(table, sink, write_options=pacsv.WriteOptions(include_header=False))
    with path.open("ab") as fh:
        fh.write(sink.getvalue().to_pybytes())


def write_parquet_one_group(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, row_group_size=max(1, table.num_rows))
    groups = pq.ParquetFile(path).num_row_groups
    assert groups == 1, f"{path} has {groups} row groups, wanted 1"


# -- clients --------------------------------------------------------------------------------


def bare_cmd(inp: Path, base_url: str, concurrency: int, *, uvloop: bool = False) -> list[str]:
    cmd = [
        PY,
        str(HERE / "bare_loop.py"),
        str(inp),
        "--base-url",
        base_url,
        "--concurrency",
        str(concurrency),
        "--model",
        MODEL,
    ]
    if uvloop:
        cmd.append("--uvloop")
    return pinned(cmd, CLIENT_CPU)


def pipeline_cmd(inp: Path, out: Path, base_url: str, concurrency: int, *extra: str) -> list[str]:
    cmd = [
        PY,
        "-m",
        "pipeline",
        "run",
        str(inp),
        "-o",
        str(out),
        "--base-url",
        base_url,
        "--model",
        MODEL,
        "--concurrency",
        str(concurrency),
        "--no-progress",
        "--summary-json",
        str(summary_path(out)),
        *extra,
    ]
    return pinned(cmd, CLIENT_CPU)


def summary_path(out: Path) -> Path:
    return out.with_name(out.name + ".summary.json")


def read_summary(out: Path) -> dict[str, Any]:
    return json.loads(summary_path(out).read_text())


def bare_result(run: ChildRun) -> dict[str, Any]:
    lines = [ln for ln in run.output().splitlines() if ln.startswith("{")]
    if run.rc != 0 or not lines:
        raise RuntimeError(f"bare loop failed (rc {run.rc}): {run.output()[-2000:]}")
    return json.loads(lines[-1])


def fresh_dir(work: Path, name: str) -> Path:
    path = work / name
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def read_request_log(path: Path, offset: int = 0) -> list[dict[str, Any]]:
    """Simulator request-log lines from byte ``offset`` on: t (time.time()) and the request id."""
    out = []
    if not path.exists():
        return out
    with path.open("rb") as fh:
        fh.seek(offset)
        for line in fh:
            if not line.strip():
                continue
            rec = json.loads(line)
            out.append({"t": rec["t"], "id": rec.get("client_request_id")})
    return out


def med(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# -- figure 1 -------------------------------------------------------------------------------


def figure1(work: Path, cfg: Config) -> dict[str, Any]:
    rows, conc = cfg.f1_rows, 64
    inp = work / "f1.csv"
    write_csv(make_table(rows), inp)
    warm = work / "f1-warm.csv"
    write_csv(make_table(2000, start=10**8), warm)
    sides = [
        ("bare_asyncio", "bare asyncio + aiohttp loop"),
        ("pipeline", "pipeline run (read CSV, send, write Parquet)"),
        ("bare_uvloop", "bare aiohttp loop on uvloop (reference)"),
    ]
    result: dict[str, Any] = {"rows": rows, "concurrency": conc, "reps": cfg.reps1, "backends": {}}
    servers: dict[str, Server] = {"simulator": simulator(work, "f1-sim")}
    ngx = nginx_server(work)
    if ngx is None:
        result["nginx"] = "not installed: simulator only (apt-get install nginx-light)"
    else:
        servers["nginx"] = ngx
    # Both servers run for the whole figure (an idle one costs nothing) and every round
    # goes through every (server, client) pair, so rows are comparable across servers too.
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {b: defaultdict(list) for b in servers}
    try:
        for server in servers.values():
            server.start()
        if "nginx" in servers:
            check_static_server(servers["nginx"])
        for backend, server in servers.items():
            log(f"figure 1 [{backend}] warm-up")
            run_child(bare_cmd(warm, server.base_url, conc), work / "warm-bare.log")
            wdir = fresh_dir(work, "f1-warm-out")
            run_child(
                pipeline_cmd(warm, wdir / "o.parquet", server.base_url, conc),
                work / "warm-pipe.log",
            )
        for rep in range(cfg.reps1):
            for backend, server in servers.items():
                for side, _ in sides:
                    rdir = fresh_dir(work, f"f1-{backend}-{side}-{rep}")
                    if side == "pipeline":
                        cmd = pipeline_cmd(inp, rdir / "out.parquet", server.base_url, conc)
                    else:
                        cmd = bare_cmd(inp, server.base_url, conc, uvloop=side == "bare_uvloop")
                    cpu0 = server.cpu_s()
                    run = run_child(cmd, rdir / "client.log")
                    server_cpu = server.cpu_s() - cpu0
                    if side == "pipeline":
                        if run.rc != 0:
                            raise RuntimeError(f"pipeline failed: {run.output()[-3000:]}")
                        ok = read_summary(rdir / "out.parquet")["ok"]
                    else:
                        ok = bare_result(run)["ok"]
                    if ok != rows:
                        raise RuntimeError(f"{side}: {ok} of {rows} rows ok")
                    rec = {
                        "rep": rep,
                        "wall_s": run.wall_s,
                        "rows_per_s": rows / run.wall_s,
                        "client_cpu_s": run.cpu_s,
                        "client_cpu_us_per_row": run.cpu_s / rows * 1e6,
                        "client_maxrss_mb": run.maxrss_mb,
                        "server_cpu_s": server_cpu,
                        "server_busy": server_cpu / run.wall_s,
                    }
                    runs[backend][side].append(rec)
                    log(
                        f"figure 1 [{backend}] {side} #{rep}: {rec['rows_per_s']:.0f} rows/s, "
                        f"client CPU {run.cpu_s:.2f}s, server busy {rec['server_busy']:.0%}"
                    )
                    shutil.rmtree(rdir)
    finally:
        for server in servers.values():
            server.stop()
    for backend in servers:
        summary = {}
        for side, label in sides:
            rs = runs[backend][side]
            summary[side] = {
                "label": label,
                "rows_per_s": med([r["rows_per_s"] for r in rs]),
                "client_cpu_us_per_row": med([r["client_cpu_us_per_row"] for r in rs]),
                "client_maxrss_mb": med([r["client_maxrss_mb"] for r in rs]),
                "server_busy": med([r["server_busy"] for r in rs]),
                "runs": rs,
            }
        bare = summary["bare_asyncio"]["rows_per_s"]
        pipe = summary["pipeline"]["rows_per_s"]
        per_round = [
            p["rows_per_s"] / b["rows_per_s"]
            for p, b in zip(runs[backend]["pipeline"], runs[backend]["bare_asyncio"], strict=True)
        ]
        result["backends"][backend] = {
            "sides": summary,
            "ratio": pipe / bare,
            "ratio_per_round": per_round,
            "ratio_vs_uvloop": pipe / summary["bare_uvloop"]["rows_per_s"],
            "bare_faster_than_pipeline": bare > pipe,
        }
    return result


# -- figure 2 -------------------------------------------------------------------------------


def figure2(work: Path, cfg: Config) -> dict[str, Any]:
    rows, conc, latency = cfg.f2_rows, 200, 0.2
    ideal = conc / latency
    inp = work / "f2.csv"
    write_csv(make_table(rows, start=2 * 10**7), inp)
    sides = ["bare_asyncio", "pipeline"]
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rep in range(cfg.reps2):
        for side in sides:
            rdir = fresh_dir(work, f"f2-{side}-{rep}")
            req_log = rdir / "requests.jsonl"
            with simulator(rdir, "sim", latency_ms=latency * 1000, request_log=req_log) as server:
                if side == "pipeline":
                    run = run_child(
                        pipeline_cmd(inp, rdir / "out.parquet", server.base_url, conc),
                        rdir / "client.log",
                    )
                    if run.rc != 0:
                        raise RuntimeError(f"pipeline failed: {run.output()[-3000:]}")
                    ok = read_summary(rdir / "out.parquet")["ok"]
                else:
                    run = run_child(bare_cmd(inp, server.base_url, conc), rdir / "client.log")
                    ok = bare_result(run)["ok"]
            reqs = read_request_log(req_log)
            times = sorted(r["t"] for r in reqs)
            active = times[-1] - times[0] + latency
            rec = {
                "rep": rep,
                "ok": ok,
                "requests": len(reqs),
                "wall_s": run.wall_s,
                "rows_per_s_e2e": ok / run.wall_s,
                "active_s": active,
                "rows_per_s_active": ok / active,
                "efficiency_active": ok / active / ideal,
                "efficiency_e2e": ok / run.wall_s / ideal,
                "startup_s": times[0] - run.launched_at,
                "client_cpu_s": run.cpu_s,
            }
            runs[side].append(rec)
            log(
                f"figure 2 {side} #{rep}: active {rec['efficiency_active']:.3f}, "
                f"end to end {rec['efficiency_e2e']:.3f}, first request after {rec['startup_s']:.2f}s"
            )
            shutil.rmtree(rdir)
    out: dict[str, Any] = {
        "rows": rows,
        "concurrency": conc,
        "latency_s": latency,
        "ideal_rows_per_s": ideal,
        "sides": {},
    }
    for side in sides:
        rs = runs[side]
        out["sides"][side] = {
            key: med([r[key] for r in rs])
            for key in (
                "efficiency_active",
                "efficiency_e2e",
                "rows_per_s_active",
                "rows_per_s_e2e",
                "startup_s",
                "wall_s",
            )
        }
        out["sides"][side]["runs"] = rs
    return out


# -- figure 3 -------------------------------------------------------------------------------


def figure3(work: Path, cfg: Config) -> dict[str, Any]:
    limit, rows, latency_ms, conc = cfg.f3_limit, cfg.f3_rows, 20, 64
    inp = work / "f3.csv"
    write_csv(make_table(rows, start=3 * 10**7), inp)
    sides = {
        "rpm": {
            "label": f"--rpm {limit * 60}",
            "extra": ["--rpm", str(limit * 60)],
            "headers": False,
        },
        "headers": {"label": "no --rpm; x-ratelimit-* headers", "extra": [], "headers": True},
    }
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rep in range(cfg.reps3):
        for side, spec in sides.items():
            rdir = fresh_dir(work, f"f3-{side}-{rep}")
            req_log = rdir / "requests.jsonl"
            out = rdir / "out.parquet"
            sim = simulator(
                rdir,
                "sim",
                latency_ms=latency_ms,
                rps_limit=limit,
                rate_limit_headers=spec["headers"],
                request_log=req_log,
            )
            with sim as server:
                run = run_child(
                    pipeline_cmd(inp, out, server.base_url, conc, *spec["extra"]),
                    rdir / "client.log",
                )
            if run.rc not in (0, 1):
                raise RuntimeError(f"pipeline failed: {run.output()[-3000:]}")
            summary = read_summary(out)
            table = pq.read_table(out, columns=["status", "attempts"])
            attempts = int(pa.compute.sum(table.column("attempts")).as_py() or 0)
            reqs = read_request_log(req_log)
            last_by_id: dict[str, float] = {}
            for r in reqs:
                last_by_id[r["id"]] = max(r["t"], last_by_id.get(r["id"], 0.0))
            first = min(r["t"] for r in reqs)
            ok_times = sorted(last_by_id.values())  # each row's last attempt is its 200
            end = ok_times[-1]
            skip = 2.0  # the first seconds ride on the server's initial burst of N
            steady = sum(1 for t in ok_times if t > first + skip) / (end - first - skip)
            n429 = len(reqs) - summary["ok"]
            if attempts != len(reqs):
                log(f"figure 3: the output counts {attempts} attempts, the server {len(reqs)}")
            rec = {
                "rep": rep,
                "ok": summary["ok"],
                "errors": summary["error"],
                "requests": len(reqs),
                "attempts_in_output": attempts,
                "n429": n429,
                "share_429": n429 / len(reqs),
                "rate_whole": summary["ok"] / (end - first),
                "rate_steady": steady,
                "rate_whole_over_n": summary["ok"] / (end - first) / limit,
                "rate_steady_over_n": steady / limit,
                "sending_s": end - first,
                "wall_s": run.wall_s,
            }
            runs[side].append(rec)
            log(
                f"figure 3 {side} #{rep}: steady {steady:.1f}/s ({rec['rate_steady_over_n']:.3f} N), "
                f"whole {rec['rate_whole_over_n']:.3f} N, 429s {rec['share_429']:.2%} ({n429}), errors {summary['error']}"
            )
            shutil.rmtree(rdir)
    res: dict[str, Any] = {
        "limit_rps": limit,
        "rows": rows,
        "latency_ms": latency_ms,
        "concurrency": conc,
        "sides": {},
    }
    for side, spec in sides.items():
        rs = runs[side]
        res["sides"][side] = {
            "label": spec["label"],
            **{
                k: med([r[k] for r in rs])
                for k in (
                    "rate_steady_over_n",
                    "rate_whole_over_n",
                    "share_429",
                    "rate_steady",
                    "rate_whole",
                )
            },
            "errors": sum(r["errors"] for r in rs),
            "runs": rs,
        }
    return res


# -- figures 4 and 5 ------------------------------------------------------------------------


def checkpoint_part_rows(out: Path) -> list[int]:
    """Rows in each checkpoint part of OUTPUT (from the Parquet footers)."""
    parts = sorted((out.parent / (out.name + ".checkpoint") / "parts").glob("part-*.parquet"))
    return [pq.ParquetFile(path).metadata.num_rows for path in parts]


def reader_rss(path: Path, pre_buffer: bool | None) -> float:
    """Peak RSS (MB) of a process that only iterates the Parquet file's batches."""
    opts = "" if pre_buffer is None else f"pre_buffer={pre_buffer}, buffer_size=1 << 20"
    code = (
        "import pyarrow.parquet as pq\n"
        f"pf = pq.ParquetFile({str(path)!r}{', ' + opts if opts else ''})\n"
        "n = sum(b.num_rows for b in pf.iter_batches(batch_size=8192, columns=['prompt']))\n"
        "print(n)\n"
    )
    run = run_child(
        pinned([PY, "-c", code], CLIENT_CPU), path.with_suffix(f".reader-{pre_buffer}.log")
    )
    if run.rc != 0:
        raise RuntimeError(run.output())
    return run.maxrss_mb


def figure4(
    work: Path, cfg: Config, state: dict[str, Any], only_setup: bool = False
) -> dict[str, Any]:
    small, big, conc = cfg.f4_small, cfg.f4_big, 64
    data = work / "f4-data"
    data.mkdir(exist_ok=True)
    log(f"figure 4: writing inputs ({small} and {big} rows, CSV and one-row-group Parquet)")
    inputs: dict[tuple[str, int], Path] = {}
    for n in (small, big):
        table = make_table(n, start=4 * 10**7)
        for fmt in ("parquet", "csv"):
            if only_setup and not (fmt == "csv" and n == big):
                continue
            path = data / f"in-{n}.{fmt}"
            if fmt == "csv":
                write_csv(table, path)
            else:
                write_parquet_one_group(table, path)
            inputs[(fmt, n)] = path
        del table
    port = free_port()
    state["f45_port"] = port
    order = [("parquet", small), ("parquet", big), ("csv", small), ("csv", big)]
    if only_setup:
        order = [("csv", big)]
    res: dict[str, Any] = {"small": small, "big": big, "concurrency": conc, "runs": {}}
    with simulator(work, "f4-sim", port) as server:
        for fmt, n in order:
            rdir = fresh_dir(work, f"f4-{fmt}-{n}")
            out = rdir / "out.parquet"
            log(f"figure 4: pipeline run on {n} rows of {fmt} ...")
            run = run_child(
                pipeline_cmd(inputs[(fmt, n)], out, server.base_url, conc),
                rdir / "client.log",
                timeout=3600,
            )
            if run.rc != 0:
                raise RuntimeError(f"pipeline failed: {run.output()[-3000:]}")
            summary = read_summary(out)
            if summary["ok"] != n:
                raise RuntimeError(f"figure 4: {summary['ok']} of {n} rows ok")
            part_rows = checkpoint_part_rows(out)
            res["runs"][f"{fmt}-{n}"] = {
                "format": fmt,
                "rows": n,
                "input_mb": inputs[(fmt, n)].stat().st_size / 2**20,
                "maxrss_mb": run.maxrss_mb,
                "wall_s": run.wall_s,
                "rows_per_s": n / run.wall_s,
                "client_cpu_s": run.cpu_s,
                "checkpoint_parts": len(part_rows),
                "median_rows_per_part": med(part_rows),
            }
            log(f"figure 4: {len(part_rows)} checkpoint parts, median {med(part_rows):.0f} rows")
            log(
                f"figure 4: {fmt} {n} rows: peak RSS {run.maxrss_mb:.0f} MB, {n / run.wall_s:.0f} rows/s, {run.wall_s:.0f}s"
            )
            if fmt == "csv" and n == big:
                state["f5"] = {"input": inputs[(fmt, n)], "output": out, "rows": n, "port": port}
            else:
                shutil.rmtree(rdir)
    if only_setup:
        return res
    for fmt in ("parquet", "csv"):
        a, b = res["runs"][f"{fmt}-{small}"], res["runs"][f"{fmt}-{big}"]
        res[f"ratio_{fmt}"] = b["maxrss_mb"] / a["maxrss_mb"]
    # context: the bare imports, and a reader alone with and without pre-buffering
    floor = run_child(
        pinned(
            [PY, "-c", "import pipeline.cli, pipeline.runner, pyarrow.parquet, pandas"], CLIENT_CPU
        ),
        work / "floor.log",
    )
    res["import_floor_mb"] = floor.maxrss_mb
    big_pq = inputs[("parquet", big)]
    res["reader_only_mb"] = {
        "pyarrow_default": reader_rss(big_pq, None),
        "pre_buffer_false": reader_rss(big_pq, False),
    }
    return res


def figure5(work: Path, cfg: Config, state: dict[str, Any]) -> dict[str, Any]:
    f5 = state["f5"]
    inp, out, port = f5["input"], f5["output"], f5["port"]
    done = f5["rows"]
    req_log = work / "f5-requests.jsonl"
    add = 1000
    runs = []
    with simulator(work, "f5-sim", port, request_log=req_log) as server:
        for rep in range(cfg.reps5):
            start_id = 5 * 10**7 + rep * add
            write_csv(make_table(add, start=start_id), inp, append=True)
            offset = req_log.stat().st_size if req_log.exists() else 0
            run = run_child(pipeline_cmd(inp, out, server.base_url, 64), work / f"f5-{rep}.log")
            if run.rc != 0:
                raise RuntimeError(f"resume failed: {run.output()[-3000:]}")
            summary = read_summary(out)
            reqs = read_request_log(req_log, offset)
            first = min(r["t"] for r in reqs)
            rec = {
                "rep": rep,
                "done_before": done,
                "sent": summary["sent"],
                "resumed": summary["resumed"],
                "requests": len(reqs),
                "first_request_s": first - run.launched_at,
                "wall_s": run.wall_s,
                "maxrss_mb": run.maxrss_mb,
            }
            runs.append(rec)
            log(
                f"figure 5 #{rep}: {done} done, first new request {rec['first_request_s']:.2f}s after start, "
                f"sent {summary['sent']}, whole run {run.wall_s:.1f}s"
            )
            if summary["sent"] != add:
                raise RuntimeError(f"resume sent {summary['sent']} rows, expected {add}")
            done += add
    return {
        "done_rows": f5["rows"],
        "appended": add,
        "first_request_s": med([r["first_request_s"] for r in runs]),
        "wall_s": med([r["wall_s"] for r in runs]),
        "runs": runs,
    }


# -- report ---------------------------------------------------------------------------------


@dataclass
class Config:
    quick: bool
    f1_rows: int = 20_000
    reps1: int = 3
    f2_rows: int = 10_000
    reps2: int = 3
    f3_limit: int = 200
    f3_rows: int = 4000
    reps3: int = 3
    f4_small: int = 100_000
    f4_big: int = 1_000_000
    reps5: int = 3
    notes: list[str] = field(default_factory=list)

    @classmethod
    def make(cls, quick: bool) -> Config:
        if not quick:
            return cls(quick=False)
        return cls(
            quick=True, reps2=1, f3_rows=2000, reps3=1, f4_small=20_000, f4_big=200_000, reps5=1
        )


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    versions = {}
    for mod in ("aiohttp", "httpx", "uvloop", "pyarrow", "numpy", "orjson"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    ngx = shutil.which("nginx")
    if ngx:
        with contextlib.suppress(Exception):
            versions["nginx"] = (
                subprocess.run([ngx, "-v"], capture_output=True, text=True)
                .stderr.strip()
                .removeprefix("nginx version: nginx/")
            )
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": mem,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "versions": versions,
        "loadavg_start": os.getloadavg(),
    }


def yes(ok: bool) -> str:
    return "**pass**" if ok else "**FAIL**"


def report(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"Run {results['started']} ({'--quick' if results['config']['quick'] else 'full'}), "
        f"{results['elapsed_s'] / 60:.1f} min. Machine: {m['nproc']} cores ({m['cpu']}), {m['memory']}, "
        f"Python {m['python']}, Linux {m['kernel']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f". Load average at start {m['loadavg_start'][0]:.2f}, at end {results['loadavg_end'][0]:.2f}.",
        "",
        f"Command: `{results['command']}`",
        "",
    ]
    code = results.get("code", {})
    if code:
        where = (
            f"git revision {code['rev']} of pipeline/ (commit {code.get('head')})"
            if code.get("rev")
            else f"the work tree at commit {code.get('head')} "
            f"({code.get('work_tree_pipeline_changes', '?')} uncommitted changes in pipeline/)"
        )
        lines += [
            f"Code under test: {where}; imported from `{code['pipeline_imported_from']}`.",
            "",
        ]
    figs = results["figures"]
    if "1" in figs:
        f = figs["1"]
        lines += [
            f"### 1. Zero latency, {f['rows']:,} rows, {f['concurrency']} in flight (medians of {f['reps']} alternating runs)",
            "",
            "| server | client | rows/s | client CPU µs/row | client peak RSS MB | server core busy |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for backend, b in f["backends"].items():
            for side in ("bare_asyncio", "pipeline", "bare_uvloop"):
                s = b["sides"][side]
                lines.append(
                    f"| {backend} | {s['label']} | {s['rows_per_s']:,.0f} | {s['client_cpu_us_per_row']:.0f} | "
                    f"{s['client_maxrss_mb']:.0f} | {s['server_busy']:.0%} |"
                )
        lines += [
            "",
            "| server | pipeline / bare asyncio: ratio of medians (target >= 0.7) | per round (their median) | pipeline / bare uvloop | bare faster than pipeline |",
            "| --- | ---: | --- | ---: | --- |",
        ]
        for backend, b in f["backends"].items():
            lines.append(
                f"| {backend} | {b['ratio']:.2f} {yes(b['ratio'] >= 0.7)} | "
                + ", ".join(f"{r:.2f}" for r in b["ratio_per_round"])
                + f" ({med(b['ratio_per_round']):.2f})"
                + f" | {b['ratio_vs_uvloop']:.2f} | {'yes' if b['bare_faster_than_pipeline'] else 'NO'} |"
            )
        if "nginx" in f:
            lines += ["", f"nginx: {f['nginx']}"]
        lines.append("")
    if "2" in figs:
        f = figs["2"]
        lines += [
            f"### 2. {f['latency_s'] * 1000:.0f} ms latency, {f['rows']:,} rows, {f['concurrency']} in flight (ideal {f['ideal_rows_per_s']:,.0f} rows/s)",
            "",
            "| client | efficiency while sending (target >= 0.95) | per run | efficiency end to end | rows/s sending | first request after start |",
            "| --- | ---: | --- | ---: | ---: | ---: |",
        ]
        for side, s in f["sides"].items():
            mark = f" {yes(s['efficiency_active'] >= 0.95)}" if side == "pipeline" else ""
            per_run = ", ".join(f"{r['efficiency_active']:.3f}" for r in s["runs"])
            lines.append(
                f"| {side} | {s['efficiency_active']:.3f}{mark} | {per_run} | {s['efficiency_e2e']:.3f} | "
                f"{s['rows_per_s_active']:,.0f} | {s['startup_s']:.2f} s |"
            )
        lines.append("")
    if "3" in figs:
        f = figs["3"]
        lines += [
            f"### 3. Server enforcing N = {f['limit_rps']} requests/s with 429s ({f['rows']:,} rows, {f['latency_ms']} ms latency, --concurrency {f['concurrency']})",
            "",
            "| pipeline | achieved / N, steady (after 2 s) | achieved / N, whole run | 429s / requests | per run | rows failed | target | met |",
            "| --- | ---: | ---: | ---: | --- | ---: | --- | --- |",
        ]
        targets = {"rpm": (0.97, 0.005), "headers": (0.9, 0.02)}
        for side, s in f["sides"].items():
            rate_t, share_t = targets[side]
            ok = s["rate_steady_over_n"] >= rate_t and s["share_429"] < share_t
            lines.append(
                f"| {s['label']} | {s['rate_steady_over_n']:.3f} | {s['rate_whole_over_n']:.3f} | "
                f"{s['share_429']:.2%} | "
                + ", ".join(f"{r['share_429']:.2%}" for r in s["runs"])
                + f" | {s['errors']} | >= {rate_t} N, < {share_t:.1%} | {yes(ok)} |"
            )
        lines.append("")
    if "4" in figs:
        f = figs["4"]
        lines += [
            f"### 4. Peak RSS of `pipeline run`, {f['small']:,} vs {f['big']:,} rows (~300-char prompts, --concurrency {f['concurrency']}, zero latency)",
            "",
            "| input | rows | input MB | peak RSS MB | rows/s | wall s | checkpoint parts (median rows) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in f["runs"].values():
            label = "Parquet, one row group" if r["format"] == "parquet" else "CSV"
            lines.append(
                f"| {label} | {r['rows']:,} | {r['input_mb']:.0f} | {r['maxrss_mb']:.0f} | {r['rows_per_s']:,.0f} | {r['wall_s']:.0f} | "
                f"{r['checkpoint_parts']:,} ({r['median_rows_per_part']:.0f}) |"
            )
        lines += [
            "",
            "| input | big / small (target <= 1.2) | big <= 300 MB | met |",
            "| --- | ---: | --- | --- |",
        ]
        for fmt in ("parquet", "csv"):
            ratio = f[f"ratio_{fmt}"]
            big_mb = f["runs"][f"{fmt}-{f['big']}"]["maxrss_mb"]
            small_mb = f["runs"][f"{fmt}-{f['small']}"]["maxrss_mb"]
            ok = ratio <= 1.2 and big_mb <= 300 and small_mb <= 300
            lines.append(f"| {fmt} | {ratio:.2f} | {big_mb:.0f} MB | {yes(ok)} |")
        ro = f["reader_only_mb"]
        lines += [
            "",
            f"Context: interpreter + pipeline/pyarrow/pandas imports alone peak at {f['import_floor_mb']:.0f} MB. "
            f"A process that only iterates the {f['big']:,}-row one-row-group Parquet's batches peaks at "
            f"{ro['pyarrow_default']:.0f} MB with pyarrow's defaults and {ro['pre_buffer_false']:.0f} MB with "
            "`pre_buffer=False, buffer_size=1 MiB` (what pipeline/reader.py uses).",
            "",
        ]
    if "5" in figs:
        f = figs["5"]
        ok = f["first_request_s"] < 3.0
        lines += [
            f"### 5. Resume with {f['done_rows']:,} rows done, {f['appended']} appended (CSV)",
            "",
            "| measure | median | runs | target | met |",
            "| --- | ---: | --- | --- | --- |",
            f"| process start -> first new request at the simulator | {f['first_request_s']:.2f} s | "
            + ", ".join(f"{r['first_request_s']:.2f}" for r in f["runs"])
            + f" | < 3 s | {yes(ok)} |",
            f"| whole resume run (incl. rewriting the output) | {f['wall_s']:.1f} s | "
            + ", ".join(f"{r['wall_s']:.1f}" for r in f["runs"])
            + " | | |",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")
    parser.add_argument("--only", default="1,2,3,4,5", help="comma-separated figures, e.g. 1,3")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    parser.add_argument(
        "--report", type=Path, metavar="RESULTS.json", help="only print the report of a saved run"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--src", type=Path, help="import pipeline from this directory")
    source.add_argument(
        "--rev", help="benchmark this git revision of pipeline/ (e.g. HEAD), exported to a temp dir"
    )
    args = parser.parse_args()
    if args.report is not None:
        print(report(json.loads(args.report.read_text())))
        return
    wanted = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = [x for x in wanted if x not in {"1", "2", "3", "4", "5"}]
    if bad:
        parser.error(f"--only: unknown figure(s) {bad}")
    cfg = Config.make(args.quick)
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "started": started,
        "command": "python benchmarks/bench.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "config": {k: v for k, v in cfg.__dict__.items() if k != "notes"},
        "figures": {},
    }
    work = Path(tempfile.mkdtemp(prefix="bpp-bench-"))
    log(f"work directory {work}")
    global PIPELINE_SRC, CHILD_CWD
    CHILD_CWD = work
    if args.src is not None:
        PIPELINE_SRC = args.src.resolve()
    elif args.rev:
        PIPELINE_SRC = export_rev(args.rev, work / "src")
    results["code"] = {"rev": args.rev, **code_under_test()}
    log(f"pipeline under test: {results['code']}")
    state: dict[str, Any] = {}
    try:
        if "1" in wanted:
            results["figures"]["1"] = figure1(work, cfg)
        if "2" in wanted:
            results["figures"]["2"] = figure2(work, cfg)
        if "3" in wanted:
            results["figures"]["3"] = figure3(work, cfg)
        if "4" in wanted:
            results["figures"]["4"] = figure4(work, cfg, state)
        if "5" in wanted:
            if "f5" not in state:
                figure4(work, cfg, state, only_setup=True)
            results["figures"]["5"] = figure5(work, cfg, state)
    finally:
        for server in list(_LIVE):
            server.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["elapsed_s"] = time.perf_counter() - t0
    results["loadavg_end"] = os.getloadavg()
    out = RESULTS / f"bench-{stamp}.json"
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    md = report(results)
    (RESULTS / f"bench-{stamp}.md").write_text(md + "\n")
    print(md)
    log(f"results: {out}")


if __name__ == "__main__":
    main()
