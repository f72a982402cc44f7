"""The serving configs: the gateway's settings (`ServeConfig`) and moderation training
(`ModerationTrainConfig`). Plain dataclasses with no imports of the serving stack, so the CLI can
build its options from them (each field's trailing comment is its help) without FastAPI installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gptstack.config import ConfigError


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # address to listen on (loopback by default)
    port: int = 8000  # TCP port
    api_keys: str | None = None  # key file: lines 'KEY [name=N] [rpm=N] [tpm=N]' or JSON ($GPTSTACK_API_KEYS adds keys)
    rpm: float | None = None  # default requests per minute per key
    tpm: float | None = None  # default tokens per minute per key (prompt + max_tokens)
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_waiting: int = 256  # waiting requests per model before 503
    max_jobs: int = 64  # engine requests one request may start (prompts x n); more: 400
    max_prompt_tokens: int = 65536  # prompt tokens one request may send, all prompts together; more: 400
    max_messages: int = 512  # messages one chat request may send; more: 400
    log_dir: str | None = None  # folder for usage.jsonl and feedback.jsonl (none: no logs)
    exact_cache: bool = True  # the exact response cache (deterministic requests only)
    shared_cache: bool = False  # share cached answers across API keys (default: each key sees only its own)
    semantic_cache: float | None = None  # semantic cache cosine threshold, e.g. 0.95 (none: off)
    moderation: str | None = None  # moderation classifier folder (gptstack moderation train)
    moderation_policy: dict[str, str] = field(default_factory=dict)  # per category: block | flag | off (default block)
    moderation_every: int = 64  # characters of streamed output between output moderation checks
    output_judge: str | None = None  # judge of answers (prefix, classifier:DIR, rbrm:CKPT): flags refusals for review
    route_threshold: float = 0.25  # 'auto' difficulty at which a request goes to the largest model
    review_db: str | None = None  # human review queue (SQLite): flagged and thumbs-down answers go there
    rag_index: str | None = None  # retrieval index folder (gptstack rag index) for chat requests with "retrieval"
    max_images: int = 8  # images one chat request may send; more: 400
    max_image_bytes: int = 1 << 20  # bytes of one image (decoded from base64); more: 413 (raise --max-body-bytes too)
    max_image_pixels: int = 4096 * 4096  # pixels of one image, read from its header before decoding; more: 413

    def __post_init__(self) -> None:
        limits = ("max_body_bytes", "max_waiting", "max_jobs", "max_prompt_tokens", "max_messages", "max_image_bytes")
        for name in (*limits, "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    def body_bounds(self) -> tuple[int, int]:
        """The most (arrays and objects, values) a request body may hold, counted before it is parsed:
        room for max_jobs token-id prompts or max_messages messages (each with a content part), max_images
        image parts, and max_prompt_tokens token ids besides the sampling fields. Parsing more would hold
        the event loop."""
        containers = 2 * (self.max_jobs + self.max_messages) + 2 * self.max_images + 64
        return containers, self.max_prompt_tokens + 8 * self.max_messages + 6 * self.max_images + 256


@dataclass
class ModerationTrainConfig:
    out: str  # folder to write moderation.json
    data: list[str] = field(default_factory=list)  # labelled JSONL files (default: the bundled seed set)
    holdout: float = 0.25  # fraction held out for the reported metrics
    policy: dict[str, str] = field(default_factory=dict)  # per category: block | flag | off (default block)
    seed: int = 0  # seed of the held-out split
