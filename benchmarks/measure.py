"""Run one command; write its wall time, CPU time, peak RSS and exit code as JSON.

    python benchmarks/measure.py RESULT.json LOG TIMEOUT_S -- CMD [ARGS...]

bench.py starts every measured client through this small launcher. Reason: on Linux a
child's ``ru_maxrss`` starts from the peak RSS of the process it was forked from (the
high-water mark of the pre-``exec`` memory is kept), so a child forked straight from
bench.py, which holds generated tables of up to a million rows, would report bench.py's
peak instead of its own. Spawned from this launcher (~10 MB), it reports its own.

``launched_at`` is ``time.time()`` just before the spawn; ``wall_s`` runs from there to the
end of the process (interpreter start-up included).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def main() -> None:
    result_path, log_path, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
    if sys.argv[4] != "--":
        raise SystemExit("usage: measure.py RESULT.json LOG TIMEOUT_S -- CMD [ARGS...]")
    cmd = sys.argv[5:]
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    launched = time.time()
    start = time.perf_counter()
    pid = os.posix_spawnp(
        cmd[0],
        cmd,
        os.environ,
        file_actions=[(os.POSIX_SPAWN_DUP2, fd, 1), (os.POSIX_SPAWN_DUP2, fd, 2)],
    )
    timed_out = False

    def on_alarm(signum: int, frame: object) -> None:
        nonlocal timed_out
        timed_out = True
        os.kill(pid, signal.SIGKILL)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    signal.setitimer(signal.ITIMER_REAL, 0)
    with open(result_path, "w", encoding="utf-8") as fh:
        json.dump(
            {
                "rc": os.waitstatus_to_exitcode(status),
                "timed_out": timed_out,
                "launched_at": launched,
                "wall_s": wall,
                "user_s": usage.ru_utime,
                "sys_s": usage.ru_stime,
                "maxrss_mb": usage.ru_maxrss / 1024.0,
            },
            fh,
        )


if __name__ == "__main__":
    main()
