"""Durable jobs: requests that prefer `respond-async` are stored, run later, and kept.

prefer.py     RFC 7240 parsing: does a request ask for respond-async (pure)
model.py      states, the job's public JSON, stored records as bytes (pure)
seal.py       AES-GCM encryption at rest, key ids, rotation (pure)
store.py      SQLite (WAL, synchronous=FULL) with group commit
gateway.py    the proxy-port side: 202 submissions and the job endpoints
runner.py     dispatch, attempts through the pipeline, retries, crash recovery
callbacks.py  allowed callback URLs, HMAC signatures, delivery
durable.py    the feature assembled from one JobsConfig
operator.py   `luxsci-proxy jobs list|show|cancel|retry|purge|keygen`
"""
