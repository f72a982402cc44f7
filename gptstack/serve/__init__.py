"""The OpenAI-compatible server (`gptstack serve`): app.py (routes), completion.py (one request),
server.py (shared state, errors), runner.py (the engine thread), gateway.py (keys, limits, routing),
cache.py (response caches), moderation.py, metrics.py, config.py (ServeConfig), launch.py, web/."""
