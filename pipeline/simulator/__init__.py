"""A local OpenAI-compatible chat-completions server for the demo, the tests and the benchmarks.

This module owns the simulator: a small HTTP/1.1 server written directly on
``asyncio.Protocol`` (no web framework, so it is never the bottleneck of a throughput
benchmark), its configuration, its fault injection and its recording of what it received.
It does not own any client code; the pipeline talks to it over real HTTP like to any provider.
Run it with ``SimulatorThread`` (sync tests: a daemon thread with its own loop),
``Simulator.start()`` (inside a running loop) or ``run_simulator`` (blocking, for the CLI).

Endpoints
---------
- ``POST /v1/chat/completions`` and ``POST /chat/completions``: a non-streaming chat completion.
- ``GET /v1/models`` (also ``/models``): a tiny model list. ``GET /health``: ``200 ok``.
- Anything else: 404 with an OpenAI error body.

Answers
-------
Answers are deterministic. The request picks one of four answer modes, first match wins:

- **schema**: ``response_format`` is ``{"type": "json_schema", "json_schema": {"schema": S}}``,
  or ``{"type": "json_object"}`` with a message containing ``SCHEMA_PROMPT_MARKER``
  (``"Answer with a JSON object that conforms to this JSON Schema:"``, the text
  ``pipeline.structured`` sends in prompt mode) followed by the schema as JSON. The answer
  is a JSON object (``json.dumps`` spacing, so it has several "tokens") with every property
  of S: strings ``"x"``, integers and numbers ``1``, booleans ``true``, ``null`` for null,
  enums and ``const`` their first value, arrays one item, objects recursively; ``anyOf`` /
  ``oneOf`` take the first non-null branch, local ``$ref`` is followed, ``minimum`` /
  ``maximum`` / ``minLength`` / ``maxLength`` / ``minItems`` / ``maxItems`` are respected.
- **json_object**: ``{"type": "json_object"}`` without that marker: ``{"answer": "<text>"}``
  where <text> is the text-mode answer.
- **labels**: a system (or developer) message has a line ``Labels: a | b | c`` (the line
  ``pipeline.labels.label_instruction`` ends with). The answer is one label, chosen
  by a hash of the conversation.
- **text**: ``"Simulated answer to: "`` plus the first 200 characters of the last user message
  (string content or its text parts joined by a space).

Samples. With a ``seed`` in the body, a text answer ends in `` (seed S)``, and the label and
schema values are drawn from a hash of the conversation, the seed and the choice index, so K
requests with distinct seeds give distinct samples. With ``n`` the reply has n choices: in
text and json_object modes choice i > 0 ends in `` (choice i)``, in label and schema modes
each choice is its own draw; each choice is billed and cut at the token limit by itself.
Without a seed, choice 0 of a schema answer uses the plain values above. With ``ignore_n``
the simulator behaves like servers that do not implement ``n`` (llama.cpp, some vLLM and
Ollama setups): every reply has exactly one choice, whatever ``n`` asks. The "conversation"
is the messages before the first assistant message, so a re-ask (original messages + the
answer + feedback) is the same conversation as the request it corrects.

Wrong answers. With probability ``wrong_rate`` per choice (a separate draw from the fault
draw, made only when ``wrong_rate > 0`` so seeded fault sequences are unchanged), or when a
``wrong`` directive says so, the answer is wrong, of kind ``wrong_kind``:

- ``invalid`` (default): what the request's format rejects: in schema mode either prose
  (``"Sorry, I cannot answer that."``) or the object without its first required property
  (half each; prose when nothing is required); in labels mode ``"I do not know."``, which
  is no label; in json_object mode that prose.
- ``different``: well-formed but not the right answer: the schema object with other values
  (next enum value, ``"x1"``, ``2``, ``false``, ...), the next label, ``{"answer": "I do not
  know."}``.

In text mode both kinds answer ``"I do not know."``.

Token counting is a documented approximation, not a tokenizer: a text has one token per
whitespace-separated word, and at least 1 if it is non-empty. ``prompt_tokens`` sums that over
the text of every message; ``completion_tokens`` counts the answer of every choice. When
``max_completion_tokens`` / ``max_tokens`` (the smaller, if both) is below the answer's count,
the answer keeps that many words and ``finish_reason`` is ``"length"``.

Order of checks for a chat request: record it; ``401`` if ``require_api_key`` does not match;
``400`` (aimlapi flat body) if the body is not a JSON object with ``model`` and ``messages``
(``400`` too for ``stream: true``, which the simulator does not implement);
``429`` from the request-rate limiter; prompt directives; random faults; the answer; ``429``
from the token limiter. ``latency_ms`` (+ jitter + ``sleep_ms``) delays every chat reply,
errors included. Pipelined requests on one connection are answered in order.

Rate limiting
-------------
``rps_limit`` is a token bucket that refills at ``rps_limit`` requests/s and holds at most
``rps_burst`` (default ``max(1, rps_limit)``, a burst of one second's worth).
``rps_schedule`` changes that rate during a run: ``((0, 40), (10, 10), (20, 40))`` is 40
requests/s from the first chat request, 10 from 10 s after it, 40 again from 20 s (the
bucket keeps its level across a change; the CLI spells it ``--rps-schedule 0:40,10:10,20:40``).
Without ``rate_limit_headers`` such a limit is unannounced: only 429s tell it.
``tpm_limit`` is a token bucket of ``tpm_limit`` tokens refilling at ``tpm_limit / 60`` per
second, charged with prompt + completion tokens of each successful answer (an answer larger
than the whole bucket always gets 429, as on OpenAI). A limited request gets 429
``rate_limit_exceeded`` with ``retry-after`` (whole seconds, rounded up, at least 1) and
``retry-after-ms`` (exact).
With ``rate_limit_headers`` every chat reply carries
``x-ratelimit-{limit,remaining,reset}-requests`` (bucket size, whole tokens left, time until
the bucket is full, as a Go duration like ``250ms``, ``1.5s`` or ``6m0s``; a nominal
``10000/10000/0s`` without ``rps_limit``) and, when ``tpm_limit`` is set, the same trio for
``-tokens``.

Random faults
-------------
Per chat request one number ``u`` is drawn from ``random.Random(seed)``; the fault rates are
laid end to end in this order and the first interval containing ``u`` fires: ``rate_429``,
``rate_500``, ``rate_503``, ``rate_timeout``, ``rate_drop``, ``rate_malformed``,
``rate_length``. So each rate is exact as long as their sum is at most 1.

Prompt directives
-----------------
Any message text may carry ``[[sim:ITEM,ITEM,...]]``; an ITEM is ``key=value`` or a bare flag.
Several directives in one request merge, later keys win. An unknown key or a bad value
answers 400 with a message naming it, so a typo in a test never passes silently.

Faults (at most one per request)::

    status=S            answer HTTP S (400..599) with an OpenAI error body
                        (400 invalid_request_error, 401 invalid_api_key, 429 rate_limit_exceeded,
                        5xx server_error, ...)
    context_length      400 (or status=S) with code context_length_exceeded, param messages
    aimlapi_status=S    answer HTTP S with the aimlapi flat body
                        {"message", "path", "requestId", "statusCode": S, "timestamp"}
                        (403 says "out of credits")
    quota               429 insufficient_quota (OpenAI body), no Retry-After
    timeout             never answer; the connection stays open until the client leaves
    drop                close the connection without a response
    malformed           200 whose JSON body is cut in half

Modifiers::

    fail=N              only the first N requests carrying the same prompt (all message texts
                        together) get the fault; later ones succeed. Alone it means status=503.
    retry_after=SECS    add Retry-After: SECS and retry-after-ms to the error
    retry_after_date=1  send Retry-After as an HTTP date instead, and no retry-after-ms
                        (which clients would prefer); needs retry_after
    sleep_ms=N          add N ms of latency to this request
    length              answer normally but cut it in half with finish_reason "length"

Answers (see "Answers" above)::

    label=X             the right answer is exactly X (X cannot contain a comma)
    answer=TEXT         the right answer is exactly TEXT, which may hold commas, braces and
                        brackets: it must be the last item of the last directive in its
                        message and runs to the last "]]" of that message
                        (``[[sim:answer={"tags": ["a", "b"]}]]`` answers that JSON)
    wrong               every answer to this conversation is wrong
    wrong=N             the first N answers to this conversation are wrong (re-asks count
                        as the same conversation, so wrong=1 then a re-ask gets it right)
    wrong_kind=K        invalid | different: overrides the config's wrong_kind

Examples: ``[[sim:status=400]]``, ``[[sim:aimlapi_status=403]]``, ``[[sim:quota]]``,
``[[sim:fail=2,status=429,retry_after=1]]``, ``[[sim:fail=1,drop]]``, ``[[sim:sleep_ms=300]]``,
``[[sim:label=positive]]``, ``[[sim:wrong=1,wrong_kind=different,label=negative]]``.

Statistics
----------
``Simulator.stats`` counts ``connections`` (TCP connections accepted), ``http_requests``
(every request), ``requests`` (chat requests), and outcomes of chat requests: ``ok`` (a
well-formed 200 completion), ``length`` (those of them cut short), ``wrong`` (wrong choices
in them), ``timeout``, ``drop``, ``malformed``, and one key per error status, e.g.
``"429"``, ``"503"`` (unknown paths count as ``"404"``).
"""

from __future__ import annotations

from .app import Simulator
from .config import RecordedRequest, SimulatorConfig, format_go_duration, parse_rps_schedule
from .running import SimulatorThread, run_simulator

__all__ = [
    "RecordedRequest",
    "Simulator",
    "SimulatorConfig",
    "SimulatorThread",
    "format_go_duration",
    "parse_rps_schedule",
    "run_simulator",
]
