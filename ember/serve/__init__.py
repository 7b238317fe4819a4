"""ember.serve: the OpenAI-compatible HTTP server over the inference engine (ember/infer/engine.py).

    runner.py    the engine on its own thread; asyncio queues per request; aborts; metrics counters
    protocol.py  OpenAI request fields -> RequestParams (400 with the field named), responses, usage
    app.py       FastAPI routes, API keys, body/queue limits, SSE streaming, /metrics, the chat page
    static/      chat.html: the page served at /
"""
