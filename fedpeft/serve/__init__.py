"""`fedpeft serve`: one base in memory, many adapters (base, global, personal/<user>, folders), an
OpenAI-compatible HTTP API.

- catalog: which adapters a run folder, a device store or `--adapter NAME=PATH` offers, checked at start;
- engine: the peft model holding every adapter, and the decode loop that runs requests for different
  adapters in one forward (peft's mixed-adapter batches);
- batcher: the thread that owns the model and groups the requests that arrive together;
- api: the HTTP routes (FastAPI), server-sent events, the API key;
- command: the `serve` subcommand and uvicorn.
"""
