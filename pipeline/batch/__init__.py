"""Batch mode: answers through a provider's Batch API instead of one request per row.

``executor.BatchExecutor`` is an executor of the engine (``engine.Executor``): planning,
checkpoint parts, dedup, budgets, stopping and OUTPUT are the same code as an online run.
Modules: ``journal`` (the crash-exact record of every part: intent before each remote call,
result after), ``parts`` (asks -> JSONL part files, one model each, cut by count and bytes),
``openai`` (the Files + Batches dialect over HTTP), ``lines`` (result lines -> row results),
``executor`` (submit, poll, download, merge, resubmit).
"""
