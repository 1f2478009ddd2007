"""Pluggable processors: each turns an input into one stage's output, with a name and version.

Owns nothing on disk or on the network: processors read the bytes or the
path they are given and return plain data. `base` holds the shared error
classes, usage counters and deadline; `extract` dispatches a file to
`pdf`, `word`, `mail`, `text` or `image` (with an engine from `ocr`);
`chunk` and `entities` work on extracted text. The version of each is part
of the artifact cache key (see `services.worker.stages`).
"""
