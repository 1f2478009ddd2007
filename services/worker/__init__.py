"""The Celery worker: runs one stage of one document per task and reports it over gRPC.

Owns the artifacts it writes (see `artifacts`) and nothing in Postgres: no
SQL here. `app` is the Celery app and its tasks, `runner` the protocol of a
run (report started, cache check, stage, cost events, report result),
`stages` what each stage reads and writes, `processors` the pluggable
extractors, OCR engines, chunker and entity recognisers, `reporting` the
gRPC calls. A worker never enqueues work.
"""
