"""`svlm serve`: many live streams over one engine batch (docs/serve.md). `protocol` parses what
clients send, `scheduler` drives the batch on its own thread, `app` is the ASGI app."""
