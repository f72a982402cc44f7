"""`gptstack serve`: load the checkpoints into engines and run the app under uvicorn.

engines = load_engines(["runs/small", "runs/large"], load=LoadConfig(checkpoint="", quantize="int8"))
serve(engines, ServeConfig(api_keys="keys.txt", port=8000))
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import uvicorn

from gptstack.infer.engine import Engine, EngineConfig
from gptstack.infer.load import LoadConfig, load_engine
from gptstack.serve.app import create_app
from gptstack.serve.config import ServeConfig


def model_name(checkpoint: str | Path) -> str:
    """A checkpoint's served name: its folder's name (the run's name for …/latest or …/step-N)."""
    p = Path(checkpoint).resolve()
    return p.parent.name if p.name == "latest" or p.name.startswith("step-") else p.name


def load_engines(
    checkpoints: list[str],
    names: list[str] | None = None,
    load: LoadConfig | None = None,
    engine: EngineConfig | None = None,
) -> dict[str, Engine]:
    """An engine per checkpoint, by served name: the n-th of `names`, else the folder's name. `load`
    applies to every checkpoint (its own `checkpoint` is ignored), `engine` schedules each."""
    names = names or []
    if len(names) > len(checkpoints):
        raise ValueError(f"{len(names)} --name for {len(checkpoints)} checkpoints")
    chosen = names + [model_name(c) for c in checkpoints[len(names) :]]
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"two models would be served under one name ({', '.join(chosen)}): give --name")
    if "auto" in chosen:
        raise ValueError("'auto' is the routing model's name; give the checkpoint another --name")
    load = load or LoadConfig(checkpoint="")
    return {n: load_engine(replace(load, checkpoint=str(c)), engine) for n, c in zip(chosen, checkpoints, strict=True)}


def serve(engines: dict[str, Engine], config: ServeConfig) -> None:
    app = create_app(engines, config)
    names = ", ".join(app.state.server.model_names())
    print(f"serving {names} at http://{config.host}:{config.port}/ (web chat) and /v1", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=5)
