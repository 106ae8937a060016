"""The one `Settings` of the gateway: every knob with its `KVROUTE_*` environment variable,
default and description (README's settings table is generated from it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final, Literal

from pydantic import AliasChoices, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kvroute.core import IngestLimits, LoadSource, PolicyName
from kvroute.errors import ConfigError
from kvroute.index.limits import IndexLimits
from kvroute.routing.backlog import DEFAULT_PREFILL_TOK_PER_S
from kvroute.routing.eviction import DEFAULT_EVICTING_WINDOW_S
from kvroute.routing.types import CostWeights

__all__ = [
    "ENV_PREFIX",
    "LogFormat",
    "Settings",
    "load_settings",
    "settings_env_names",
    "settings_markdown_table",
]

ENV_PREFIX = "KVROUTE_"
LogFormat = Literal["kv", "json"]
# The components own these defaults; the fields below read them so each number is written once.
_LIMITS: Final = IndexLimits()
_WEIGHTS: Final = CostWeights()
# A simulated engine at full load publishes ~70 events/s (~1,000 blocks/s) in 0.06 MB/s; a
# fast GPU a few thousand blocks/s in ~0.3 MB/s (README "Limits").
_INGEST: Final = IngestLimits(
    source_events_per_s=50_000,
    source_bytes_per_s=1024 * 1024,
    total_events_per_s=200_000,
    total_bytes_per_s=64 * 1024 * 1024,
    burst_s=2.0,
    max_batch_events=65_536,
    max_batch_blocks=65_536,
)


class Settings(BaseSettings):
    """Gateway settings: build one (environment plus keyword overrides) and pass it in."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=False,
        extra="forbid",
        frozen=True,
        validate_by_name=True,
        validate_by_alias=True,
    )

    # --- HTTP service
    host: str = Field("0.0.0.0", description="Address `kvroute serve` listens on.")
    port: int = Field(
        8080,
        ge=0,
        le=65535,
        description="Port `kvroute serve` listens on. It listens before anything starts, so a "
        "port in use is one line on stderr and exit 2; connections made during start-up wait "
        "for it to finish.",
    )
    picker_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description='Port of the Envoy ext_proc endpoint picker (gRPC; README "Behind Envoy"); '
        "unset: off. Checked and bound before anything starts, like `port`, and not shared "
        "with another process (no `SO_REUSEPORT`).",
    )
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate chain: serve HTTPS (with `tls_key_file`); unset: HTTP."
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of `tls_cert_file`.")
    max_connections: int = Field(
        4096,
        gt=0,
        description="Client connections served at once (idle kept-alive ones count). A new "
        "one past it has its request read and answered with a 503 (`too_many_connections`, "
        "`Connection: close`) instead of queueing; the connections already served are not "
        "affected.",
    )
    keep_alive_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Seconds an idle kept-alive client connection stays open (whole seconds). "
        "Longer than clients keep theirs (aiohttp 15 s, Go and reqwest 90 s, curl 118 s, "
        "load balancers 60 s), so the client closes an idle connection first: a server that "
        "closes one as the client reuses it drops that request. Set it above the idle timeout "
        "of any proxy in front that keeps connections longer.",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Seconds a client has to send a request's headers, from its connection "
        "(or its first byte after a response); then the connection is closed (slowloris).",
    )
    body_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Seconds a client has to send a request's body once its headers arrived; "
        "then it gets a 408.",
    )
    max_header_bytes: int = Field(
        16 * 1024,
        ge=1024,
        description="Largest request line plus headers; a larger one gets a 400 and the "
        "connection is closed.",
    )
    admin_token_file: Path | None = Field(
        None,
        description="File holding a bearer token that `/v1/route` and `/debug/*` then require "
        "(`Authorization: Bearer <token>`; `/metrics` too with `metrics_require_token`); "
        "unset: open.",
    )
    metrics_require_token: bool = Field(
        False, description="`/metrics` also requires the admin token (needs `admin_token_file`)."
    )
    engine_api_key_file: Path | None = Field(
        None,
        description="File holding the engines' API key (vLLM `--api-key`): sent as "
        "`Authorization: Bearer <key>` instead of the client's; unset: the client's is "
        "forwarded.",
    )
    strip_client_headers: str = Field(
        "cookie",
        description="Comma-separated client headers never forwarded to engines.",
    )
    fleet_file: Path | None = Field(
        None,
        description="Fleet YAML (engines, URLs, event endpoints); reloaded when it changes.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level of kvroute's loggers."
    )
    access_log: bool = Field(
        True,
        description="One info line per proxied request on logger `kvroute.access` (method, "
        "path, model, engine, status, prompt and matched tokens, latency, request id).",
    )
    log_format: LogFormat = Field(
        "kv", description="Log line format: `kv` (key=value) or `json` (one object per line)."
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto",
        description="`kvroute serve`'s event loop: `auto` is uvloop where it is installed (a "
        "dependency on Linux and macOS), else asyncio's own.",
    )

    # --- routing
    policy: PolicyName = Field(
        PolicyName.KV_AWARE,
        description="Routing policy: kv_aware, least_loaded, round_robin or random; only "
        "kv_aware tokenizes prompts.",
    )
    seed: int = Field(0, description="Seed for tie-breaking and the random policy.")
    w_prefill: float = Field(
        _WEIGHTS.w_prefill,
        ge=0,
        description="kv_aware cost weight of prompt tokens the engine must prefill.",
    )
    # Why 0.1 and not the reference design's 1.0: docs/design.md §6, CostWeights.
    w_load: float = Field(
        _WEIGHTS.w_load,
        ge=0,
        description="kv_aware cost weight of an engine's outstanding (prompt + max output) tokens.",
    )
    medium_weight_gpu: float = Field(
        _WEIGHTS.medium_weight("GPU"),
        ge=0,
        description="Value of a prompt token cached on GPU (kv_aware).",
    )
    medium_weight_cpu: float = Field(
        _WEIGHTS.medium_weight("CPU"),
        ge=0,
        description="Value of a prompt token cached in CPU memory (kv_aware).",
    )
    medium_weight_other: float = Field(
        _WEIGHTS.other_medium,
        ge=0,
        description="Value of a prompt token cached in any other medium (kv_aware).",
    )
    w_queue: float = Field(
        _WEIGHTS.w_queue,
        ge=0,
        description="kv_aware cost weight of the prompt tokens queued for prefill at an engine "
        "(1: queued and own prefill in one unit, a predicted time to first token).",
    )
    w_evict: float = Field(
        _WEIGHTS.w_evict,
        ge=0,
        description="kv_aware cost weight of the cached tokens a prefill at an engine would "
        "evict: its uncached tokens beyond what its KV pool has unfilled (pool size from "
        "`vllm:cache_config_info`, scraped; no report: no term). 0: off.",
    )
    w_queue_evicting: float = Field(
        _WEIGHTS.w_queue_evicting,
        ge=0,
        description="kv_aware's `w_queue` while every engine's pool is evicting (BlockRemoved "
        "within `evicting_window_s`), blended by the evicting share in between: with full "
        "pools, where a prefix lives decides later hits.",
    )
    saturated_queue_ratio: float = Field(
        _WEIGHTS.saturated_queue_ratio,
        ge=0,
        description="kv_aware weighs the queue as `w_queue_evicting` for a prompt while even "
        "the least queued healthy engine has this many times the prompt's tokens queued for "
        "prefill (a saturated fleet: moving a prompt off its prefix only adds its prefill to "
        "the backlog). 0: off.",
    )
    evicting_window_s: float = Field(
        DEFAULT_EVICTING_WINDOW_S,
        gt=0,
        description="How long after its last BlockRemoved event an engine counts as evicting.",
    )
    prefill_tok_per_s: float = Field(
        DEFAULT_PREFILL_TOK_PER_S,
        gt=0,
        description="An engine's prefill speed in prompt tokens per second: how fast kv_aware "
        "drains the prefill queued at an engine.",
    )
    imbalance_tokens: int = Field(
        _WEIGHTS.imbalance_tokens,
        ge=0,
        description="kv_aware cap: only engines within this many outstanding tokens of the "
        "least loaded compete (0: off).",
    )
    speculative_ttl_s: float = Field(
        _LIMITS.speculative_ttl_s,
        ge=0,
        description="Lifetime of a routed prompt's speculative blocks until events confirm them.",
    )

    # --- index
    index_impl: Literal["auto", "native", "python"] = Field(
        "auto",
        description="Index implementation: native (compiled core), python (reference), auto.",
    )
    max_index_bytes: int = Field(
        _LIMITS.max_index_bytes,
        ge=1 << 20,
        description="Memory budget of the index; least recently stored blocks of the largest "
        "source dropped beyond.",
    )
    max_blocks_per_source: int = Field(
        _LIMITS.max_blocks_per_source,
        ge=0,
        description="Optional cap on blocks per engine source (0: none, the budget rules).",
    )
    max_blocks_total: int = Field(
        _LIMITS.max_blocks_total,
        ge=0,
        description="Optional cap on blocks over all sources (0: none, the budget rules).",
    )
    indexed_group: int = Field(
        _LIMITS.indexed_group,
        ge=0,
        description="KV-cache group whose events are indexed (hybrid models).",
    )

    # --- KV events
    kv_event_sync_enabled: bool = Field(
        True,
        validation_alias=AliasChoices(
            "kv_event_sync_enabled",
            "KVROUTE_KV_EVENT_SYNC_ENABLED",
            "AIBRIX_KV_EVENT_SYNC_ENABLED",
        ),
        description="Subscribe to engines' KV events; false: no index, kv_aware → least_loaded.",
    )
    silent_source_s: float = Field(
        30.0,
        ge=0,
        description="A source that receives nothing this long while its engine answers "
        "requests is flagged silent (log, /metrics, /debug/engines); 0: never.",
    )
    ingest_coalesce_ms: float = Field(
        0.0,
        ge=0,
        le=100,
        description="Drain a source whose messages come faster than one per this window once "
        "per window instead of once per message: less CPU per message for up to this much "
        "added latency (e.g. 1: 55 → 21 µs per message at 5,000 messages/s); 0: off.",
    )
    receive_impl: Literal["auto", "native", "python"] = Field(
        "auto",
        description="Event receive loop: native (compiled, over pyzmq's libzmq), python "
        "(pyzmq's calls), auto.",
    )
    # --- client requests (README "Limits")
    max_request_body_bytes: int = Field(
        32 * 1024 * 1024,
        gt=0,
        description="Largest request body taken: refused with 413 as soon as the declared "
        "length or the bytes read pass it, before the rest is read.",
    )
    max_prompt_tokens: int = Field(
        1_048_576,
        ge=0,
        description="Longest prompt in tokens (0: no limit): a longer one gets a 400; token-id "
        "prompts are refused before they are matched; a policy that does not tokenize counts "
        "text at 4 characters a token.",
    )
    max_json_depth: int = Field(
        128,
        ge=2,
        description="Deepest nesting of arrays and objects in a request body; deeper gets a 400.",
    )
    prompt_workers: int = Field(
        1,
        ge=0,
        description="Worker processes that parse (and, with a local tokenizer, tokenize) large "
        "request bodies off the event loop; 0: every body on the loop.",
    )
    prompt_offload_bytes: int = Field(
        64 * 1024,
        gt=0,
        description="Request bodies of at least this size go to a prompt worker (with "
        "`prompt_workers` > 0); smaller ones are parsed on the loop in well under a millisecond.",
    )
    replay_timeout_s: float = Field(
        2.0, gt=0, description="Deadline of one replay request to an engine's ROUTER."
    )
    max_concurrent_replays: int = Field(
        4, gt=0, description="Replays running at once over all sources."
    )
    curve_secret_key_file: Path | None = Field(
        None,
        description="The gateway's CURVE key pair (`kvroute keys generate`: the `.key_secret` "
        "file) for engines with a `curve_server_key` (a `kvroute relay`); unset: plain ZeroMQ "
        "only.",
    )
    curve_public_key_file: Path | None = Field(
        None,
        description="The public half (`.key`) of `curve_secret_key_file`, checked against it.",
    )
    # Ingest budgets (events/budget.py, README "Limits").
    source_events_per_s: float = Field(
        _INGEST.source_events_per_s,
        ge=0,
        description="Events per second one source may feed the index (0: no limit); over it "
        "the source is stale until a replay catches it up.",
    )
    source_bytes_per_s: float = Field(
        _INGEST.source_bytes_per_s,
        ge=0,
        description="Event bytes per second one source may feed the index (0: no limit).",
    )
    total_events_per_s: float = Field(
        _INGEST.total_events_per_s,
        ge=0,
        description="Events per second all sources together may feed the index (0: no limit).",
    )
    total_bytes_per_s: float = Field(
        _INGEST.total_bytes_per_s,
        ge=0,
        description="Event bytes per second all sources together may feed the index (0: none).",
    )
    ingest_burst_s: float = Field(
        _INGEST.burst_s,
        gt=0,
        description="Seconds of each ingest rate a quiet source saves up for a burst.",
    )
    max_batch_events: int = Field(
        _INGEST.max_batch_events,
        ge=0,
        description="Most events one batch may carry (0: no limit); a larger batch is refused "
        "whole and its source is stale until it clears or resyncs.",
    )
    max_batch_blocks: int = Field(
        _INGEST.max_batch_blocks,
        ge=0,
        description="Most block hashes one batch may carry, stored and removed (0: no limit).",
    )
    max_replay_batches: int = Field(
        20_000,
        ge=0,
        description="Most batches read from one replay reply (0: no limit); vLLM keeps "
        "10,000 by default. The rest is asked for by the next replay.",
    )
    max_replay_bytes: int = Field(
        256 * 1024 * 1024,
        ge=0,
        description="Most payload bytes read from one replay reply (0: no limit).",
    )
    max_event_message_bytes: int = Field(
        16 * 1024 * 1024,
        ge=0,
        description="Largest event or replay message taken (ZeroMQ MAXMSGSIZE; 0: no limit). "
        "A larger one closes that connection: the source reconnects and starts over.",
    )
    retry_backoff_min_s: float = Field(
        0.5, gt=0, description="First delay before retrying a failed replay or connection."
    )
    retry_backoff_max_s: float = Field(
        10.0, gt=0, description="Longest delay between retries (exponential backoff)."
    )
    snapshot_path: Path | None = Field(
        None,
        description="Snapshot file of the index and each source's recovery state: written "
        "every `snapshot_interval_s` and on shutdown, loaded at start (unconfirmed until each "
        "engine's replay confirms it). Unset: no snapshots, cold starts.",
    )
    snapshot_interval_s: float = Field(
        30.0,
        ge=0,
        description="Seconds between snapshots (written by a forked child; 0: only on shutdown).",
    )
    fleet_name: str = Field(
        "default",
        min_length=1,
        description="Names this fleet in snapshots: a snapshot written for another name is "
        "refused at start.",
    )
    ready_bootstrap_deadline_s: float = Field(
        10.0,
        ge=0,
        description="`/readyz` waits this long for a new source's first bootstrap replay (the "
        "engine's buffer in the index) before giving up on that source.",
    )
    tail_check_s: float = Field(
        5.0,
        ge=0,
        description="Seconds a source may be quiet before kvroute asks its replay buffer for "
        "anything after the last seq (a lost final batch); 0 disables.",
    )

    # --- fleet
    health_interval_s: float = Field(2.0, gt=0, description="Seconds between `/health` probes.")
    unhealthy_after: int = Field(
        3, gt=0, description="Consecutive failed probes (or connect failures) before ejection."
    )
    # 0.25 s: a request of the demo lasts ~1 s; replicas routing on a report much older than
    # that herd onto the same engine (docs/design.md §15). A scrape costs ~1 ms of CPU.
    scrape_interval_s: float = Field(
        0.25,
        gt=0,
        description="Seconds between scrapes of engines' `vllm:` metrics (their reported queue "
        "feeds `load_source`).",
    )
    load_source: LoadSource = Field(
        LoadSource.LOCAL,
        description="Load used for routing: `local` (requests this replica sent, plus the other "
        "replicas' with a shared store), `engine` (the engines' reported running + waiting) or "
        "`blended` (the report plus what this replica sent since; for clients that bypass "
        'kvroute; README "Several replicas").',
    )
    watch_interval_s: float = Field(
        2.0, gt=0, description="Seconds between checks of the fleet file for changes."
    )

    # --- several replicas (README "Several replicas")
    shared_state_url: str | None = Field(
        None,
        description="Redis or Valkey URL (`redis://host:6379/0`) where replicas share in-flight "
        "counts and speculative entries; unset: off.",
    )
    shared_state_interval_s: float = Field(
        0.05,
        gt=0,
        description="Seconds between rewrites of this replica's in-flight counts in the shared "
        "store and reads of the others' (heartbeat and repair; changes are pushed at once).",
    )
    shared_state_ttl_s: float = Field(
        2.0,
        gt=0,
        description="Lifetime of a replica's counts in the shared store unless rewritten (a "
        "replica gone this long counts no more).",
    )
    shared_state_key_prefix: str = Field(
        "kvroute",
        min_length=1,
        description="Prefix of the shared store's keys and channel (one per kvroute fleet).",
    )

    # --- Kubernetes discovery (README "Run on Kubernetes")
    k8s_namespace: str | None = Field(
        None,
        description="Namespace whose Ready pods form the fleet (Kubernetes discovery, instead of "
        "a fleet file); unset: off.",
    )
    k8s_label_selector: str = Field(
        "kvroute.io/engine=vllm",
        description="Label selector of the vLLM pods (ignored with `k8s_inference_pool`).",
    )
    k8s_inference_pool: str | None = Field(
        None,
        description="InferencePool (Gateway API Inference Extension) whose selector and first "
        "target port pick the pods.",
    )
    kubeconfig: Path | None = Field(
        None,
        description="kubeconfig file; unset: in-cluster credentials in a pod, else `$KUBECONFIG` "
        "or `~/.kube/config`.",
    )
    k8s_watch_timeout_s: float = Field(
        300.0, gt=0, description="Seconds one pod watch lasts before it is resumed."
    )

    # --- tokenization
    use_remote_tokenizer: bool = Field(
        False,
        validation_alias=AliasChoices(
            "use_remote_tokenizer",
            "KVROUTE_USE_REMOTE_TOKENIZER",
            "AIBRIX_USE_REMOTE_TOKENIZER",
        ),
        description="Tokenize with an engine's `/tokenize` even when a local tokenizer is set.",
    )
    tokenizer_path: Path | None = Field(
        None, description="Local Hugging Face `tokenizer.json`; unset: remote tokenization."
    )
    chat_template_path: Path | None = Field(
        None, description="Jinja2 chat template used with the local tokenizer."
    )
    tokenizer_cache_size: int = Field(
        4096, ge=0, description="Tokenized prompts kept in the LRU cache (0 disables it)."
    )
    tokenizer_cache_bytes: int = Field(
        256 * 1024 * 1024,
        ge=0,
        description="Bound on the tokenizer cache's memory, estimated on the high side (0: "
        "entries only); a prompt larger than it is not cached.",
    )
    tokenizer_piece_cache_bytes: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="Bound on the local tokenizer's cache of text pieces (the parts of a prompt "
        "between its added tokens, cut after a space every 512 characters where the tokenizer "
        "splits at spaces first), estimated on the high side; 0: encode whole texts.",
    )
    tokenizer_timeout_s: float = Field(
        2.0, gt=0, description="Deadline of one remote `/tokenize` call."
    )

    # --- upstream proxy
    upstream_connect_timeout_s: float = Field(
        2.0, gt=0, description="Connect timeout to an engine; a failure retries the next-best."
    )
    upstream_read_timeout_s: float = Field(
        600.0, gt=0, description="Longest wait for the next bytes of an engine's response."
    )
    upstream_max_connections: int = Field(
        1000,
        gt=0,
        description="Pooled HTTP connections to engines, over all engines; a request past it "
        "waits for one (up to `upstream_read_timeout_s`). Health probes and scrapes have a "
        "pool of their own.",
    )
    upstream_keep_alive_s: float = Field(
        2.0,
        gt=0,
        description="Seconds an idle pooled connection to an engine is kept for reuse. Keep "
        "it below the engines' own idle timeout (vLLM: 5 s, `VLLM_HTTP_TIMEOUT_KEEP_ALIVE`): "
        "a request sent as the engine closes the connection fails with a 502.",
    )

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file: expected both or neither")
        return self

    @model_validator(mode="after")
    def _check_curve(self) -> Settings:
        if (self.curve_secret_key_file is None) != (self.curve_public_key_file is None):
            raise ValueError(
                "curve_secret_key_file and curve_public_key_file: expected both or neither"
            )
        return self

    @model_validator(mode="after")
    def _check_backoff(self) -> Settings:
        if self.fleet_file is not None and self.k8s_namespace is not None:
            raise ValueError(
                "fleet_file and k8s_namespace: expected one source of engines, got both"
            )
        if self.shared_state_url is not None and not self.shared_state_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError(
                "shared_state_url: expected a redis://, rediss:// or unix:// URL (Redis or "
                f"Valkey), got {self.shared_state_url!r}"
            )
        if self.shared_state_ttl_s <= self.shared_state_interval_s:
            raise ValueError(
                "shared_state_ttl_s: expected > shared_state_interval_s "
                f"({self.shared_state_interval_s}), got {self.shared_state_ttl_s}"
            )
        if self.retry_backoff_max_s < self.retry_backoff_min_s:
            raise ValueError(
                "retry_backoff_max_s: expected >= retry_backoff_min_s "
                f"({self.retry_backoff_min_s}), got {self.retry_backoff_max_s}"
            )
        return self

    @property
    def ingest_limits(self) -> IngestLimits:
        return IngestLimits(
            source_events_per_s=self.source_events_per_s,
            source_bytes_per_s=self.source_bytes_per_s,
            total_events_per_s=self.total_events_per_s,
            total_bytes_per_s=self.total_bytes_per_s,
            burst_s=self.ingest_burst_s,
            max_batch_events=self.max_batch_events,
            max_batch_blocks=self.max_batch_blocks,
        )

    @property
    def local_tokenizer(self) -> bool:
        """True when a local tokenizer is configured and remote tokenization is not forced."""
        return self.tokenizer_path is not None and not self.use_remote_tokenizer


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment with `overrides` on top; invalid values raise ConfigError."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            f" (got {err.get('input')!r})"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {problems}") from exc


def settings_env_names(name: str) -> list[str]:
    """Environment variables read for one field, in priority order."""
    field = Settings.model_fields[name]
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [c for c in alias.choices if isinstance(c, str) and c.upper() == c]
    return [f"{ENV_PREFIX}{name}".upper()]


def settings_markdown_table() -> str:
    """README's settings table: a row per field (name, env variables, default, description)."""
    rows = [
        "| setting | environment variable | default | description |",
        "|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        env = ", ".join(f"`{e}`" for e in settings_env_names(name))
        default = field.default
        shown = "unset" if default is None else f"`{_default_text(default)}`"
        description = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | {env} | {shown} | {description} |")
    return "\n".join(rows) + "\n"


def _default_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}"
    return str(value)
