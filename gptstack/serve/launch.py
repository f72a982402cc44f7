"""`gptstack serve`: load the checkpoints into engines and run the app under uvicorn."""

from __future__ import annotations

from pathlib import Path

from gptstack.serve.api import ServeConfig, create_app


def model_name(checkpoint: str | Path) -> str:
    """A checkpoint's served name: its folder's name (the run's name for …/latest or …/step-N)."""
    p = Path(checkpoint).resolve()
    return p.parent.name if p.name == "latest" or p.name.startswith("step-") else p.name


def load_engines(checkpoints: list[str], names: list[str] | None = None, tokenizer: str | None = None,
                 quantize: str | None = None, **engine_config) -> dict:  # fmt: skip
    from gptstack.infer.engine import load_engine

    names = names or []
    if len(names) > len(checkpoints):
        raise ValueError(f"{len(names)} --name for {len(checkpoints)} checkpoints")
    chosen = names + [model_name(c) for c in checkpoints[len(names) :]]
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"two models would be served under one name ({', '.join(chosen)}): give --name")
    if "auto" in chosen:
        raise ValueError("'auto' is the routing model's name; give the checkpoint another --name")
    return {n: load_engine(c, tokenizer=tokenizer, quantize=quantize, **engine_config)
            for n, c in zip(chosen, checkpoints, strict=True)}  # fmt: skip


def serve(engines: dict, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    app = create_app(engines, config)
    print(
        f"serving {', '.join(app.state.server.model_names())} at http://{host}:{port}/ (web chat) and /v1", flush=True
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
