"""The S3 runs: one corpus on the moto server, one config, and the uninterrupted baseline
run that both test_pipeline_s3.py (what a run writes) and test_failures.py (what a
killed, failed and resumed run must end with) check.

The corpus is the quickstart documents, a generated set of hostile files, a copy of one
quickstart document in a file of its own (a duplicate pair split across files, for dedup
on resume), and one file past ``input.max_files``. ``curate.threshold`` is 1, so which
documents reach the final dataset does not depend on the random model's scores: a run
that lost or duplicated work cannot match the baseline.

A WARC file (``w-crawl.warc.gz``) holds two pages wrapped in HTML, one long enough to be
cut into segments, among the records a crawl also holds (requests, metadata, a 404, an
image, a redirect), so WARC reading and segmentation go through every S3 run, resume
included.

The resume date's prefix gets the copy's file (and the one past ``max_files``) only after
its first attempt is killed, like shards still arriving: the resumed run must then catch
the copy against a document the killed attempt kept. Files are read in name order
(``quickstart.jsonl`` before ``y-copy.jsonl``), so in the baseline the original comes first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from hostile import HostileCorpus, write_hostile_corpus
from warc_files import crawl_records, long_document, warc_bytes

from .conftest import ENGINE_TOKEN, ENV_TOKEN, PROXY_PASSWORD, ROOT, S3_KEY_ID, S3_SECRET, BftProcess, engine_settings
from .run_files import RunFiles, key, parquet_paths

BUCKET = "bft-s3"
BASELINE_DATE = "2026-11-22"
RESUME_DATE = "2026-11-23"
INPUT = f"s3://{BUCKET}/crawl/{{date}}/"
RUNS = f"s3://{BUCKET}/runs/{{date}}"
# The copy of qs-002 differs only in case, spacing and a ligature: normalized, it is the same.
ORIGINAL_ID, COPY_ID = "qs-002", "copy-of-qs-002"
COPY_FILE = "y-copy.jsonl"
BEYOND_MAX_FILES = "zz-beyond-max-files.jsonl"
WARC_FILE = "w-crawl.warc.gz"


def warc_pages() -> list[str]:
    """The WARC's page texts: one within filters.max_chars, one cut into segments."""
    return [long_document(16, 3)[:2500], long_document(17, 8)]


@dataclass
class Corpus:
    hostile: HostileCorpus
    names: list[str]  # the files a run reads (input.max_files of them), sorted
    late: dict[str, Path]  # files that reach the resume date's prefix after its first attempt

    def inputs(self, date: str) -> list[str]:
        return [INPUT.format(date=date) + name for name in self.names]

    def arrive_late(self, fs) -> None:
        for name, path in self.late.items():
            fs.put(str(path), f"{BUCKET}/crawl/{RESUME_DATE}/{name}")


def _copy_of(text: str) -> str:
    words = text.split(" ")
    return "  ".join(words[:6]).upper() + " " + " ".join(words[6:]).replace("fi", "\ufb01") + "\n"


def upload_corpus(fs, folder: Path) -> Corpus:
    fs.mkdir(BUCKET)
    hostile = write_hostile_corpus(folder / "hostile")
    docs = ROOT / "examples" / "docs.jsonl"
    original = next(json.loads(line) for line in docs.read_text().splitlines()
                    if f'"{ORIGINAL_ID}"' in line)
    copy = folder / COPY_FILE
    copy.write_text(json.dumps({"id": COPY_ID, "url": "https://mirror.example.net/qs-002",
                                "text": _copy_of(original["text"])}) + "\n")
    beyond = folder / BEYOND_MAX_FILES
    beyond.write_text(json.dumps({"id": "beyond-max-files", "text": original["text"] + " Extra."}) + "\n")
    late = {COPY_FILE: copy, BEYOND_MAX_FILES: beyond}
    warc = folder / WARC_FILE
    warc.write_bytes(warc_bytes(crawl_records(warc_pages())))
    files = {**{p.name: p for p in hostile.files}, "quickstart.jsonl": docs, WARC_FILE: warc, **late}
    for name, path in files.items():
        fs.put(str(path), f"{BUCKET}/crawl/{BASELINE_DATE}/{name}")
        if name not in late:
            fs.put(str(path), f"{BUCKET}/crawl/{RESUME_DATE}/{name}")
    return Corpus(hostile, sorted(set(files) - {BEYOND_MAX_FILES}), late)


def write_config(path: Path, corpus: Corpus) -> Path:
    """The quickstart with the S3 credentials in the config itself (so redaction of
    config secrets is exercised, not only of the environment)."""
    data = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    data["storage"] = {"access_key_id": S3_KEY_ID, "secret_access_key": S3_SECRET, "region": "us-west-2"}
    data["input"] = {"uri": INPUT, "max_files": len(corpus.names)}
    data["output"] = {"uri": RUNS}
    data["curate"]["threshold"] = 1
    for stage in ("generate", "curate", "rewrite"):  # vLLM's own hf_token argument (the model is local)
        data[stage]["engine_kwargs"] = {**data[stage]["engine_kwargs"], "hf_token": ENGINE_TOKEN}
    path.write_text(yaml.safe_dump(data))
    return path


def command(config: Path, date: str, tiny_model: Path, *extra: str) -> list[str]:
    return ["run", str(config), "--date", date, *engine_settings(tiny_model), *extra]


def env_for(s3_server, endpoint: str) -> dict[str, str]:
    """Credentials come from the config file; the environment only points at the server."""
    env = {k: v for k, v in s3_server.env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env["AWS_ENDPOINT_URL_S3"] = endpoint
    # planted: must be masked wherever bft writes (the proxy serves nothing: every address used is local)
    env.update({"HF_TOKEN": ENV_TOKEN, "HTTPS_PROXY": f"http://bft:{PROXY_PASSWORD}@127.0.0.1:9",
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
    return env


def runs_folder(date: str) -> str:
    return RUNS.format(date=date).removeprefix("s3://")


def started_run(fs, date: str) -> str | None:
    """The run id a dated run recorded when it started, once it has."""
    marker = f"{runs_folder(date)}/_started/{date}.json"
    fs.invalidate_cache()
    return json.loads(fs.cat(marker))["run_id"] if fs.exists(marker) else None


def original_filtered(fs, date: str) -> bool:
    """Has the dated run kept the original of the duplicate pair in filtered/?"""
    run_id = started_run(fs, date)
    if run_id is None:
        return False
    for path in parquet_paths(fs, f"{runs_folder(date)}/{run_id}/filtered"):
        with fs.open(path, "rb") as fh:
            if ORIGINAL_ID in pq.read_table(fh, columns=["id"]).column("id").to_pylist():
                return True
    return False


@dataclass
class Baseline:
    files: RunFiles
    run: BftProcess
    run_id: str
    ray_tmp: Path

    @property
    def final_keys(self) -> list[tuple[str, int, int]]:
        return sorted(names(self.files.kept["sft"]))

    @property
    def drop_records(self) -> list[tuple]:
        return sorted(drop_records(self.files))


def names(rows: list[dict]) -> list[tuple[str, int, int]]:
    """Row keys with the file name only (runs of two dates read two prefixes); segment 0
    for a whole document, so the keys sort."""
    return [(source.rsplit("/", 1)[-1], row, segment or 0) for source, row, segment in map(key, rows)]


def drop_records(files: RunFiles) -> list[tuple]:
    return [(*name, r["stage"], r["reason"]) for name, r in zip(names(files.dropped), files.dropped)]


def run_baseline(fs, s3_server, config: Path, tiny_model: Path, ray_tmp: Path) -> Baseline:
    """The uninterrupted dated run, with its report, in the other engine layout (a
    ``ray.data.llm`` pool per stage): the faults test's run in the default layout must end
    with the same rows and drops."""
    run = BftProcess(command(config, BASELINE_DATE, tiny_model, "--report", "--set", "engine.sharing=per_stage"),
                     {**env_for(s3_server, s3_server.endpoint), "RAY_TMPDIR": str(ray_tmp)})
    assert run.wait() == 0, run.output[-5000:]
    run_id = started_run(fs, BASELINE_DATE)
    return Baseline(RunFiles(fs, f"{runs_folder(BASELINE_DATE)}/{run_id}"), run, run_id, ray_tmp)
