"""OpenAI-compatible HTTP serving over `lmstack.engine`: several models, A/B splits, metrics, a chat page.

    lmstack serve --model smollm2-135m-instruct          # then open http://127.0.0.1:8000/

Library use (tests, notebooks): `build_app(ServeOptions(models=[...], ab=[]))` returns the FastAPI
app; `running_server(app)` serves it from a thread on a free port. See docs/serving.md.
"""

from lmstack.serve.server import ServeOptions, build_app, running_server, serve

__all__ = ["ServeOptions", "build_app", "running_server", "serve"]
