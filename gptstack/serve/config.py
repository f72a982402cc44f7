"""The serving configs: the gateway's settings (`ServeConfig`) and moderation training
(`ModerationTrainConfig`). Plain dataclasses with no imports of the serving stack, so the CLI can
build its options from them (each field's trailing comment is its help) without FastAPI installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # address to listen on (loopback by default)
    port: int = 8000  # TCP port
    api_keys: str | None = None  # key file: lines 'KEY [name=N] [rpm=N] [tpm=N]' or JSON ($GPTSTACK_API_KEYS adds keys)
    rpm: float | None = None  # default requests per minute per key
    tpm: float | None = None  # default tokens per minute per key (prompt + max_tokens)
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_waiting: int = 256  # waiting requests per model before 503
    log_dir: str | None = None  # folder for usage.jsonl and feedback.jsonl (none: no logs)
    exact_cache: bool = True  # the exact response cache (deterministic requests only)
    semantic_cache: float | None = None  # semantic cache cosine threshold, e.g. 0.95 (none: off)
    moderation: str | None = None  # moderation classifier folder (gptstack moderation train)
    moderation_policy: dict[str, str] = field(default_factory=dict)  # per category: block | flag | off (default block)
    moderation_every: int = 64  # characters of streamed output between output moderation checks
    route_threshold: float = 0.25  # 'auto' difficulty at which a request goes to the largest model


@dataclass
class ModerationTrainConfig:
    out: str  # folder to write moderation.json
    data: list[str] = field(default_factory=list)  # labelled JSONL files (default: the bundled seed set)
    holdout: float = 0.25  # fraction held out for the reported metrics
    policy: dict[str, str] = field(default_factory=dict)  # per category: block | flag | off (default block)
    seed: int = 0  # seed of the held-out split
