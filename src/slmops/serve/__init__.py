"""Serving: an OpenAI-compatible HTTP server over any slmops Engine (FastAPI + uvicorn).

`scheduler` batches requests in front of each engine (continuous batching where the engine allows),
`protocol` holds the OpenAI request/response models, `app` the routes, `manager` which models are loaded.
"""
