"""The response cache: a rerun pays only for requests it has not seen, and the cache is safe.

A response is stored under a key made from the base URL and the request body (JSON key order
and spacing ignored; never the API key), read back byte for byte, survives several processes
writing the same key at once, reads a damaged entry as a miss, and can be measured and pruned
by age and by size, least recently used first.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.cache import ResponseCache, canonical_json, normalise_base_url, request_key

BASE = "https://api.aimlapi.com/v1"
SECRET = "sk-test-0123456789abcdef"
RESPONSE = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"positive"},'
    b'"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":1,'
    b'"total_tokens":13}}'
)


def body(**fields: object) -> bytes:
    data = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Sentiment: great product"}],
        **fields,
    }
    return json.dumps(data).encode()


def every_byte(root: Path) -> bytes:
    return b"".join(p.read_bytes() + p.name.encode() for p in root.rglob("*") if p.is_file())


# -- keys -------------------------------------------------------------------------------------


def test_key_ignores_json_key_order_and_spacing_but_not_values() -> None:
    a = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0}'
    b = b'{ "temperature": 0, "messages": [ {"content": "hi", "role": "user"} ], "model": "m" }'
    assert request_key(BASE, a) == request_key(BASE, b)
    assert request_key(BASE, a) != request_key(BASE, a.replace(b'"hi"', b'"hi!"'))
    assert request_key(BASE, a) != request_key(BASE, a.replace(b":0}", b":0.5}"))
    # message order is part of the request
    two = b'{"messages":[{"role":"system","content":"s"},{"role":"user","content":"u"}]}'
    swapped = b'{"messages":[{"role":"user","content":"u"},{"role":"system","content":"s"}]}'
    assert request_key(BASE, two) != request_key(BASE, swapped)


def test_a_body_built_canonically_needs_no_reparse_and_keys_the_same() -> None:
    data = {"model": "m", "messages": [{"role": "user", "content": "héllo"}], "seed": 1}
    built = canonical_json(data)
    assert request_key(BASE, built, canonical=True) == request_key(BASE, json.dumps(data).encode())


def test_key_depends_on_the_endpoint_but_not_on_how_its_url_is_spelled() -> None:
    assert request_key(BASE, body()) == request_key("HTTPS://API.aimlapi.com:443/v1/", body())
    assert request_key(BASE, body()) != request_key("https://api.openai.com/v1", body())
    assert request_key(BASE, body()) != request_key("http://127.0.0.1:8000/v1", body())


def test_key_never_depends_on_credentials() -> None:
    with_userinfo = f"https://user:{SECRET}@api.aimlapi.com/v1"
    assert normalise_base_url(with_userinfo) == BASE
    assert request_key(with_userinfo, body()) == request_key(BASE, body())


def test_key_of_a_body_that_is_not_json_uses_the_bytes() -> None:
    assert request_key(BASE, b"not json") != request_key(BASE, b"not json ")


# -- get / put --------------------------------------------------------------------------------


def test_round_trip_returns_the_bytes_as_received(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path / "cache")
    key = cache.key(BASE, body())
    assert cache.get(key) is None
    assert not cache.contains(key)
    cache.put(key, RESPONSE, {"model": "gpt-4o-mini", "base_url": BASE})
    assert cache.get(key) == RESPONSE
    assert cache.contains(key)
    assert cache.keys() == {key}
    found = cache.get_entry(key)
    assert found is not None
    content, meta = found
    assert content == RESPONSE
    assert meta["model"] == "gpt-4o-mini" and meta["host"] == "api.aimlapi.com"
    # a second cache object over the same directory (another run) sees it
    assert ResponseCache(tmp_path / "cache").get(key) == RESPONSE
    # a different request misses
    assert cache.get(cache.key(BASE, body(temperature=1))) is None


def test_nothing_stored_holds_the_api_key_or_headers(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = ResponseCache(root)
    base_with_key = f"https://bearer:{SECRET}@api.aimlapi.com/v1"
    cache.put(cache.key(base_with_key, body()), RESPONSE, {"base_url": base_with_key})
    stored = every_byte(root)
    assert SECRET.encode() not in stored
    assert b"bearer" not in stored.lower()
    assert b"authorization" not in stored.lower()
    for meta in ({"authorization": f"Bearer {SECRET}"}, {"headers": {"x": "y"}}, {"model": 3}):
        with pytest.raises(ValueError, match="meta"):
            cache.put(cache.key(BASE, body()), RESPONSE, meta)
    assert SECRET.encode() not in every_byte(root)


def test_a_later_put_replaces_the_entry(tmp_path: Path) -> None:
    cache = ResponseCache(tmp_path)
    key = cache.key(BASE, body())
    cache.put(key, b"first", {})
    cache.put(key, b"second", {})
    assert cache.get(key) == b"second"
    assert cache.stats()["entries"] == 1


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # a torn write
        lambda data: data[:-1] + b"X",  # a flipped byte in the body
        lambda data: b"",  # an empty file
        lambda data: b"garbage\n" + data,  # not an entry at all
        lambda data: data.replace(b'"sha256"', b'"sha257"'),  # header without checksum
    ],
)
def test_a_corrupt_entry_reads_as_a_miss(tmp_path: Path, damage: Callable[[bytes], bytes]) -> None:
    cache = ResponseCache(tmp_path)
    key = cache.key(BASE, body())
    cache.put(key, RESPONSE, {})
    path = cache.path_for(key)
    path.write_bytes(damage(path.read_bytes()))
    assert cache.get(key) is None
    assert cache.stats()["entries"] == 1  # still counted, and prune can remove it
    cache.put(key, RESPONSE, {})  # the next run's answer heals it
    assert cache.get(key) == RESPONSE


def test_a_malformed_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cache key"):
        ResponseCache(tmp_path).get("../../etc/passwd")


def _put_many(root: str, key: str, worker: int, rounds: int) -> None:
    cache = ResponseCache(root)
    for i in range(rounds):
        cache.put(key, f"response from worker {worker} round {i} ".encode() * 500, {})
        cache.get(key)


def test_concurrent_puts_of_one_key_from_several_processes_leave_a_whole_entry(
    tmp_path: Path,
) -> None:
    root = tmp_path / "cache"
    key = request_key(BASE, body())
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_put_many, args=(str(root), key, worker, 25)) for worker in range(4)
    ]
    for process in workers:
        process.start()
    cache = ResponseCache(root)
    hits = 0
    while any(p.is_alive() for p in workers):
        content = cache.get(key)
        if content is None:
            # before the first put completes; after it, a reader always finds a whole entry
            assert hits == 0, "an entry read as a miss while another process replaced it"
            continue
        hits += 1
        assert content.startswith(b"response from worker ")
        half = len(content) // 2
        assert content[:half] * 2 == content
    for process in workers:
        process.join(timeout=60)
        assert process.exitcode == 0
    final = cache.get(key)
    assert final is not None and final.startswith(b"response from worker ")
    stats = cache.stats()
    assert stats["entries"] == 1 and stats["temp_files"] == 0


# -- stats and prune ----------------------------------------------------------------------


def fill(cache: ResponseCache, ages: dict[str, float], now: float) -> dict[str, str]:
    """One entry per name, last used ``ages[name]`` seconds before ``now``."""
    keys = {}
    for name, age in ages.items():
        key = cache.key(BASE, body(user=name))
        cache.put(key, name.encode() * 100, {"model": "m"})
        os.utime(cache.path_for(key), (now - age, now - age))
        keys[name] = key
    return keys


def test_stats_counts_entries_bytes_and_ages(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    cache = ResponseCache(tmp_path / "cache", clock=lambda: now)
    empty = cache.stats()
    assert (empty["entries"], empty["bytes"], empty["oldest"], empty["newest"]) == (
        0,
        0,
        None,
        None,
    )
    assert not (tmp_path / "cache").exists()  # looking does not create the directory
    fill(cache, {"a": 300, "b": 200, "c": 100}, now)
    stats = cache.stats()
    assert stats["entries"] == 3
    assert stats["bytes"] == sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*.bin"))
    assert stats["bytes"] > 300
    assert stats["oldest"] == pytest.approx(now - 300)
    assert stats["newest"] == pytest.approx(now - 100)


def test_prune_by_age_removes_entries_unused_for_longer(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    cache = ResponseCache(tmp_path, clock=lambda: now)
    keys = fill(cache, {"old": 10 * 86400, "older": 20 * 86400, "fresh": 60}, now)
    result = cache.prune(older_than_seconds=7 * 86400)
    assert result["removed"] == 2 and result["entries"] == 1
    assert cache.get(keys["fresh"]) is not None
    assert cache.get(keys["old"]) is None and cache.get(keys["older"]) is None


def test_prune_by_size_removes_the_least_recently_used_first(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    cache = ResponseCache(tmp_path, clock=lambda: now)
    keys = fill(cache, {"a": 400, "b": 300, "c": 200, "d": 100}, now)
    # a hit makes "a" the most recently used
    assert cache.get(keys["a"]) is not None
    entry_size = cache.path_for(keys["b"]).stat().st_size
    result = cache.prune(max_bytes=2 * entry_size + 10)
    assert result["removed"] == 2 and result["entries"] == 2
    assert result["bytes"] <= 2 * entry_size + 10
    assert cache.get(keys["b"]) is None and cache.get(keys["c"]) is None
    assert cache.get(keys["a"]) is not None and cache.get(keys["d"]) is not None
    assert cache.prune(max_bytes=0)["entries"] == 0
    assert cache.stats()["entries"] == 0


def test_prune_removes_temp_files_of_dead_writers_only(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    cache = ResponseCache(tmp_path, clock=lambda: now)
    key = cache.key(BASE, body())
    cache.put(key, RESPONSE, {})
    shard = cache.path_for(key).parent
    dead = shard / f".{key}.999.dead.tmp"
    live = shard / f".{key}.998.live.tmp"
    dead.write_bytes(b"partial")
    live.write_bytes(b"partial")
    os.utime(dead, (now - 7200, now - 7200))
    os.utime(live, (now - 5, now - 5))
    assert cache.stats()["temp_files"] == 2
    result = cache.prune()
    assert result["temp_removed"] == 1 and result["removed"] == 0
    assert not dead.exists() and live.exists()
    assert cache.get(key) == RESPONSE
