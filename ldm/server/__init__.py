"""An AUTOMATIC1111-compatible HTTP API and web page over :class:`ldm.pipeline.Txt2ImgPipeline`.

A thin layer: it translates requests into pipeline calls and nothing else.

* :mod:`ldm.server.schemas`: the request and response bodies, field for field as AUTOMATIC1111's
  ``modules/api/models.py`` names them;
* :mod:`ldm.server.limits`: the size, step, batch and prompt limits, checked before any work;
* :mod:`ldm.server.catalogue`: the models a request may name (only those found in the models folder);
* :mod:`ldm.server.options`: the settings ``/sdapi/v1/options`` shows and changes;
* :mod:`ldm.server.generation`: one request -> pipeline calls -> PNGs with their ``parameters`` text;
* :mod:`ldm.server.worker`: the queue and the one worker thread that owns the model, progress, interrupt;
* :mod:`ldm.server.app`: the FastAPI application (routes, basic auth, body limit, error bodies);
* :mod:`ldm.server.process`: the server in a child process on a free loopback port (tests, benchmarks);
* ``static/``: the page served at ``/`` (plain HTML and JavaScript, no network needed).

``python scripts/serve.py`` (:mod:`ldm.cli.serve`) runs it with uvicorn. Needs the ``serve`` extra
(``pip install -e ".[serve]"``: fastapi, uvicorn).
"""
