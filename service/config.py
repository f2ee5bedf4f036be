"""All configuration in one Settings object: environment (TTC_*), an optional YAML/TOML/JSON file, defaults.

Settings are read once at start-up and passed down; no other module reads the environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    JsonConfigSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

DEFAULT_POLICY_NAME = "smollm2-135m-instruct"


def default_models_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ttc-gateway" / "models"


def truncated_model_name(name: str, layers: int | None) -> str:
    """Folder of the first-`layers` copy of a bundled model, which the reward worker serves (prepare-models writes
    it); the model's own folder when None."""
    return name if not layers else f"{name}-{layers}l"


class WorkerPoolSettings(BaseModel):
    """One pool of vLLM OpenAI servers serving the same model (policy or reward)."""

    model_config = ConfigDict(extra="forbid")

    # Local folder or model id vLLM can load; in embedded mode the gateway starts vLLM on it.
    model: str = ""
    # Name the workers serve the model under (vLLM --served-model-name) and clients ask for.
    served_name: str = ""
    # Remote mode: base URLs (http://host:port) of running vLLM servers. Empty means embedded.
    urls: list[str] = Field(default_factory=list)
    # Embedded mode: first port for co-located workers; each replica takes the next one.
    port: int = 8101
    replicas: int = 1
    max_model_len: int = 2048
    # "auto": bfloat16 where the CPU has native bf16 (else float32, 7x faster there); vLLM's own choice on GPUs.
    dtype: str = "auto"
    kv_cache_gib: int = 2
    # KV cache block size (vLLM --block-size). None: vLLM's default (128 on the CPU engine), under which a 20-token
    # search step is never a full block and so never reused from the prefix cache.
    block_size: int | None = None
    # Off for embedded CPU workers: see WorkerSpec.chunked_prefill (a vLLM-CPU seed bug).
    chunked_prefill: bool = False
    extra_args: list[str] = Field(default_factory=list)
    # Where the gateway reads the model's config.json for FLOPs metering when `model` is not a local folder.
    config_path: str = ""

    @property
    def embedded(self) -> bool:
        return not self.urls


class KeyPolicy(BaseModel):
    """What one API key may buy."""

    model_config = ConfigDict(extra="forbid")

    max_budget_flops: float | None = None
    default_budget_flops: float | None = None
    # Strategies this key may ask for (None: all); others fall back to the server default strategy.
    strategies: list[str] | None = None
    max_n: int | None = None
    # Cumulative FLOPs this key may spend per window, enforced atomically (Redis when configured).
    flops_quota: float | None = None
    quota_window_s: int = 3600
    # While Redis does not answer: refuse this key's requests (fail_closed) or count them on a local ledger
    # replayed into Redis later (fail_open). None: the server's TTC_QUOTA_ON_REDIS_FAILURE.
    quota_on_redis_failure: Literal["fail_closed", "fail_open"] | None = None


class PolicyPoolSettings(WorkerPoolSettings):
    served_name: str = DEFAULT_POLICY_NAME
    port: int = 8101
    # Tool calling on embedded workers: vLLM's --tool-call-parser for the model's call syntax (with
    # --enable-auto-tool-choice), and a chat template that renders tools. "auto": the bundled model gets "hermes" and
    # the shipped tool-aware template; any other model its own template and no parser ("" = none: tool_choice
    # "required" or a named tool still work through guided decoding, "auto" does not).
    tool_call_parser: str = "auto"
    chat_template: str = ""
    # vLLM's --tool-strict-level with a parser: "parameter" pins every call's arguments to the tool's JSON schema
    # (as if each tool were strict), which turned the bundled model's required/named calls from schema echoes
    # into valid arguments (measured in the README); "auto" leaves it to each tool's `strict`.
    tool_strict_level: str = "parameter"
    # 32, not the CPU engine's 128: tree search re-sends the question and every earlier step each round, and only
    # whole blocks are reused. Measured by benchmarks/prefix_reuse.py (README, Serving performance): prefill computed
    # / requested 0.11-0.18 at 32 against 0.43-0.79 at 128 for beam search and REBASE, decoding no slower. The CPU
    # attention kernel takes multiples of 32 only (16 fails at start-up).
    block_size: int | None = 32


class RewardPoolSettings(WorkerPoolSettings):
    served_name: str = "prm"
    port: int = 8111
    # What the reward worker serves (service/workers/step_prm.py): "head" = the bundled learned head over a
    # token_embed pooling worker; "qwen-prm" = Qwen2.5-Math-PRM (STEP pooler, <extra_0>); "math-shepherd" = a
    # Math-Shepherd-style PRM (STEP pooler over the "+"/"-" rows of the LM head at " ки").
    format: Literal["head", "qwen-prm", "math-shepherd"] = "head"
    # Step-tag PRMs: the tag text and the token id the PRM was trained on (defaults per format); the gateway checks
    # at start-up that the worker's tokenizer agrees and refuses to serve otherwise.
    step_tag: str = ""
    step_tag_id: int | None = None
    # Column of the pooled row meaning "good step" (default per format: Qwen [bad, good] -> 1, Math-Shepherd -> 0).
    good_index: int | None = None
    # Learned head only: the worker reads its prefix cache (service/workers/pooling_server.py) and the gateway scores
    # a new step from its rows plus the parent's running state, so tree-search reward FLOPs grow linearly with depth,
    # not quadratically (README, Prefix reuse in tree search). Off: stock vLLM, every candidate re-encoded whole.
    # On, the embedded worker runs float32 (dtype "auto"; an explicit bfloat16 turns this off): bf16 rows depend on
    # the pass's shape, so cached and whole passes would score differently.
    prefix_reads: bool = True
    # Parent states kept in-process for that (one d-float sum per step prefix, ~5 KB at d=576).
    tail_states: int = Field(4096, ge=0)
    # 32 like the policy worker: only whole blocks are reused, and a search step is ~20-40 tokens.
    block_size: int | None = 32


class ConfidenceSettings(BaseModel):
    """The `confidence` verifier (DeepConf, service/rewards/confidence.py): zero FLOPs, from the policy's top-k
    token log-probabilities returned with the samples."""

    model_config = ConfigDict(extra="forbid")

    metric: Literal["lowest_group", "bottom10", "tail", "mean"] = "lowest_group"
    # The paper's 2,048-token windows fit its long traces; the bundled model's answers are 30-150 tokens.
    window: int = Field(32, ge=1)
    tail: int = Field(32, ge=1)
    top_k: int = Field(20, ge=1, le=20)
    # Step score = C / (C + scale) (C: the metric, in nats): monotone, so only products with other verifiers see it.
    scale: float = Field(5.0, gt=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TTC_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    host: str = "127.0.0.1"
    port: int = 8000
    # Gateway processes (uvicorn workers); more than one needs worker URLs and aggregates metrics across processes.
    workers: int = Field(1, ge=1)
    log_level: str = "info"
    models_dir: Path = Field(default_factory=default_models_dir)

    policy: PolicyPoolSettings = Field(default_factory=PolicyPoolSettings)
    reward: RewardPoolSettings = Field(default_factory=RewardPoolSettings)
    # The learned PRM head applied to the reward worker's hidden states (shipped with the package).
    prm_head_path: str = ""
    # The calibrated (difficulty bin, budget) -> strategy table behind `auto` (ttc-gateway calibrate writes one).
    policy_table_path: str = ""

    # Embedded workers: CPU threading of vLLM-CPU (one core reserved by default costs ~30% throughput).
    vllm_cpu_threads: str = "auto"
    worker_start_timeout_s: float = 300.0
    worker_restart: bool = True
    health_interval_s: float = 2.0

    # Strategy for requests that name none ("none" = plain pass-through to the policy worker).
    default_strategy: str = "none"
    # Step verifier for search strategies: "arith" (calculator, no model), "prm" (learned head on the reward worker)
    # or "prm*arith" (both, step scores multiplied); "confidence" (the policy's own token confidence, DeepConf) alone
    # or multiplied with either.
    reward_backend: Literal["arith", "prm", "prm*arith", "confidence", "confidence*arith", "prm*confidence"] = \
        "prm*arith"
    confidence: ConfidenceSettings = Field(default_factory=ConfidenceSettings)

    # Budgets (X-TTC-Budget-* headers or the body's ttc object). Defaults apply when a request names none; caps
    # bound what any request may ask for. Per-key policies (by sha256 of the key) tighten both.
    default_budget_flops: float | None = None
    max_budget_flops: float | None = None
    default_deadline_ms: int | None = None
    # At the deadline: "best" returns the best answer found so far (search) or 504 when there is none; "error" 504s.
    deadline_action: Literal["best", "error"] = "best"
    key_policies: dict[str, KeyPolicy] = Field(default_factory=dict)
    # Quotas while Redis does not answer: "fail_closed" refuses requests of keys with a quota (503, no overspend
    # possible); "fail_open" admits them against a local ledger that is replayed into Redis when it is back.
    quota_on_redis_failure: Literal["fail_closed", "fail_open"] = "fail_closed"

    # Limits
    # Requests running at once (searches and pass-through alike) and requests allowed to wait for a slot.
    max_concurrency: int = 64
    max_queue: int = 128
    queue_timeout_s: float = 30.0
    # SIGTERM: /ready turns 503 at once, new requests are refused, in-flight ones get this long to finish.
    drain_timeout_s: float = 30.0
    max_body_bytes: int = 1_048_576
    max_n: int = 64
    max_tokens_cap: int = 4096
    default_max_tokens: int = 512
    request_timeout_s: float = 600.0
    # Front door: request headers must arrive within this (slowloris), up to this size; idle keep-alive connections
    # are closed after keep_alive_s.
    header_timeout_s: float = 10.0
    max_header_bytes: int = 65536
    keep_alive_s: int = 5
    upstream_connect_timeout_s: float = 2.0
    retry_after_s: int = 5

    # Cache: Redis when a URL is set (shared by gateway replicas), else an in-process LRU.
    redis_url: str = ""
    cache_key_prefix: str = "ttc:"
    redis_socket_timeout_s: float = 0.1
    redis_connect_timeout_s: float = 0.1
    redis_breaker_failures: int = 5
    redis_breaker_reset_s: float = 10.0
    redis_max_connections: int = 32
    cache_memory_max_entries: int = 10_000
    cache_memory_max_bytes: int = 64 * 1024 * 1024
    cache_max_samples: int = 256
    cache_response_ttl_s: float = 3600.0
    cache_prm_ttl_s: float = 86400.0
    cache_samples_ttl_s: float = 3600.0
    metrics_max_label_values: int = 64

    # Auth: sha256 hex digests of accepted API keys ("sha256:<hex>" or bare hex). Empty disables auth.
    api_key_hashes: list[str] = Field(default_factory=list)
    protect_metrics: bool = False

    @field_validator("api_key_hashes")
    @classmethod
    def _normalise_hashes(cls, v: list[str]) -> list[str]:
        return [h.removeprefix("sha256:").strip().lower() for h in v if h.strip()]

    @field_validator("key_policies")
    @classmethod
    def _normalise_policy_keys(cls, v: dict[str, KeyPolicy]) -> dict[str, KeyPolicy]:
        return {k.removeprefix("sha256:").strip().lower(): p for k, p in v.items()}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("TTC_CONFIG_FILE")
        if config_file:
            sources.append(_file_source(settings_cls, Path(config_file)))
        return tuple(sources)


def _file_source(settings_cls: type[BaseSettings], path: Path) -> PydanticBaseSettingsSource:
    if not path.is_file():
        raise FileNotFoundError(f"TTC_CONFIG_FILE={path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return YamlConfigSettingsSource(settings_cls, yaml_file=path)
    if suffix == ".toml":
        return TomlConfigSettingsSource(settings_cls, toml_file=path)
    if suffix == ".json":
        return JsonConfigSettingsSource(settings_cls, json_file=path)
    raise ValueError(f"TTC_CONFIG_FILE must be .yaml, .toml or .json, not {suffix!r}")

