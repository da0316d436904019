"""The engines layer without Ray or vLLM: which pools a config gets, and the shared pool's
per-document programs (``engines/programs.py``) on a small fake engine with bft's real
templates, parsers and stage writer. What the programs write must be exactly what a pool
per stage writes for the same replies."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bft.config import ConfigError, StorageConfig, load_config
from bft.context import RunContext
from bft.engines import Pool, layout
from bft.engines.per_stage import finish_batch
from bft.engines.programs import BatchLedger, Passes, run_batch
from bft.planning import load_templates
from bft.resume import scan_run
from bft.stages import COLUMNS, FOLDERS, LLM_STAGES
from bft.steps.llm import EngineReply
from bft.storage import Storage
from bft.writers.parquet import StageWriter, batch_name

STORAGE = Storage(StorageConfig())
TEXT = "A document about repotting plants, long enough to be a real answer. " * 4


def cfg_with(*overrides: str):
    return load_config(None, ["model=/models/m", *overrides])


# --- layout -------------------------------------------------------------------------------

def test_stages_on_one_engine_share_one_pool_by_default():
    assert layout(cfg_with()) == [Pool(("generate", "curate", "rewrite"), "shared")]
    assert layout(cfg_with("engine.sharing=per_stage")) == [Pool((name,), "per_stage") for name in LLM_STAGES]


def test_auto_shares_only_consecutive_stages_on_the_same_engine():
    judge = cfg_with("curate.model=/models/judge-70b")
    assert layout(judge) == [Pool((name,), "per_stage") for name in LLM_STAGES]
    last = cfg_with("rewrite.model=/models/chat")
    assert layout(last) == [Pool(("generate", "curate"), "shared"), Pool(("rewrite",), "per_stage")]
    # sampling and prompts are per request: they do not split a pool
    assert len(layout(cfg_with("curate.sampling.temperature=0.2", "rewrite.structured_output_regex=x"))) == 1


def test_shared_with_different_engines_fails_naming_the_fields():
    with pytest.raises(ConfigError) as err:
        cfg_with("engine.sharing=shared", "curate.model=/models/judge", "rewrite.batch_size=8")
    message = str(err.value)
    assert "engine.sharing" in message
    assert "curate.model ('/models/judge') != generate.model ('/models/m')" in message
    assert "rewrite.batch_size (8) != generate.batch_size (32)" in message


# --- the shared pool's programs on a fake engine -----------------------------------------

class FakeEngine:
    """Replies by stage; ``hold`` keeps one row's request of one stage waiting until
    released, ``fail_at`` raises (an engine that dies) on the first request of a stage."""

    REPLIES = {"generate": "How do I repot a plant?", "curate": "Clear and on point.\nScore: {score}",
               "rewrite": "[RES]Water it the day before, then lift it out by the base.[/RES]"}

    def __init__(self, scores: dict[str, int], fail_at: str | None = None):
        self.scores, self.fail_at = scores, fail_at
        self.requests: list[tuple[str, str]] = []  # (stage, document id), in submission order
        self.held: dict[tuple[str, str], asyncio.Event] = {}

    async def submit(self, stage: str, request: dict) -> EngineReply:
        doc_id = next(i for i in self.scores if f"[{i}]" in request["prompt"])
        self.requests.append((stage, doc_id))
        if stage == self.fail_at:
            raise RuntimeError("engine died")
        if (stage, doc_id) in self.held:
            await self.held[(stage, doc_id)].wait()
        await asyncio.sleep(0)
        return EngineReply(text=self.REPLIES[stage].format(score=self.scores[doc_id]), prompt_tokens=100,
                           completion_tokens=10, cached_tokens=64 if stage != "generate" else 0)


def filtered_row(i: int) -> dict:
    return {"id": f"d{i}", "url": None, "source": "in.jsonl", "source_row": i, "text": f"[d{i}] {TEXT}",
            "n_chars": len(TEXT), "n_tokens": 50}


@pytest.fixture()
def run(tmp_path, tiny_model):
    cfg = load_config(None, [f"model={tiny_model}", "curate.threshold=4", f"output.uri={tmp_path}"])
    return cfg, load_templates(cfg), str(tmp_path / "run")


def run_program(cfg, templates, run_uri, engine, joining, writes=None):
    writer = StageWriter(STORAGE, run_uri)
    ledger = BatchLedger(LLM_STAGES, joining)
    starts = ledger.restore(writer.read_batch)

    async def write(stage, kept, dropped, started, replace):
        if writes is not None:
            writes.append(stage)
        writer.write(stage, kept, dropped, started, replace)

    return asyncio.run(run_batch(ledger, starts, Passes(LLM_STAGES, cfg, templates), engine.submit, write))


def stage_rows(run_uri: str, stage: str) -> tuple[list[dict], list[dict]]:
    folder = Path(run_uri) / FOLDERS[stage]
    kept = pq.read_table(folder).to_pylist() if folder.exists() else []
    dropped_dir = Path(run_uri) / "dropped"
    dropped = [r for f in sorted(dropped_dir.glob(f"{stage}-*.parquet")) for r in pq.read_table(f).to_pylist()]
    return kept, dropped


def test_each_document_runs_all_passes_and_each_stage_is_written_once(run):
    cfg, templates, run_uri = run
    engine = FakeEngine({"d1": 5, "d2": 2, "d3": 4})
    writes: list[str] = []
    final = run_program(cfg, templates, run_uri, engine, {"generate": [filtered_row(i) for i in (1, 2, 3)]}, writes)
    assert sorted(r["id"] for r in final) == ["d1", "d3"]
    assert writes == ["generate", "curate", "rewrite"]  # in stage order, once each
    kept, dropped = stage_rows(run_uri, "curate")
    assert sorted(r["id"] for r in kept) == ["d1", "d3"]
    assert [(r["id"], r["reason"], r["score"], r["cached_tokens"]) for r in dropped] == [("d2", "below_threshold", 2, 64)]
    rewritten, _ = stage_rows(run_uri, "rewrite")
    assert {r["response"] for r in rewritten} == {"Water it the day before, then lift it out by the base."}
    assert all(r["rewrite_cached_tokens"] == 64 and r["curate_cached_tokens"] == 64 for r in rewritten)
    assert pq.read_table(f"{run_uri}/rewritten").schema.names == list(COLUMNS["rewrite"])
    # no document was prompted twice at any stage
    assert sorted(engine.requests) == sorted(set(engine.requests))


def test_a_document_goes_on_without_waiting_for_its_batch(run):
    cfg, templates, run_uri = run
    engine = FakeEngine({"d1": 5, "d2": 5})
    engine.held[("generate", "d2")] = release = asyncio.Event()

    async def go():
        ledger = BatchLedger(LLM_STAGES, {"generate": [filtered_row(1), filtered_row(2)]})
        writer = StageWriter(STORAGE, run_uri)
        starts = ledger.restore(writer.read_batch)
        writes = []

        async def write(stage, kept, dropped, started, replace):
            writes.append(stage)
            writer.write(stage, kept, dropped, started, replace)

        task = asyncio.ensure_future(run_batch(ledger, starts, Passes(LLM_STAGES, cfg, templates), engine.submit, write))
        for _ in range(50):
            await asyncio.sleep(0)
        # d1 reached rewrite while d2 still waits at generate; nothing is written yet
        assert ("rewrite", "d1") in engine.requests and writes == []
        release.set()
        await task
        return writes

    assert asyncio.run(go()) == ["generate", "curate", "rewrite"]


def test_rows_join_at_the_stage_they_reached(run):
    cfg, templates, run_uri = run
    engine = FakeEngine({"d1": 5, "d2": 5, "d3": 5})
    generated = {**filtered_row(2), "instruction": "Why repot?", "generate_raw": "Why repot?"}
    curated = {**filtered_row(3), "instruction": "When to repot?", "generate_raw": "x", "score": 5,
               "curate_reasoning": "fine", "curate_raw": "fine\nScore: 5"}
    final = run_program(cfg, templates, run_uri, engine,
                        {"generate": [filtered_row(1)], "curate": [generated], "rewrite": [curated]})
    assert sorted(r["id"] for r in final) == ["d1", "d2", "d3"]
    assert sorted(engine.requests) == [("curate", "d1"), ("curate", "d2"), ("generate", "d1"),
                                       ("rewrite", "d1"), ("rewrite", "d2"), ("rewrite", "d3")]
    kept, _ = stage_rows(run_uri, "curate")
    assert sorted(r["id"] for r in kept) == ["d1", "d2"]


def test_a_retried_batch_picks_up_what_its_first_run_wrote(run):
    """The replica dies at curate after generate's files are written; the retry (same batch)
    reads them back, asks the engine only for what is missing, and each row ends once per stage."""
    cfg, templates, run_uri = run
    rows = {"generate": [filtered_row(i) for i in (1, 2, 3)]}
    with pytest.raises(RuntimeError, match="engine died"):
        run_program(cfg, templates, run_uri, FakeEngine({"d1": 5, "d2": 2, "d3": 4}, fail_at="curate"), rows)
    assert len(stage_rows(run_uri, "generate")[0]) == 3 and stage_rows(run_uri, "curate") == ([], [])

    retry = FakeEngine({"d1": 5, "d2": 2, "d3": 4})
    final = run_program(cfg, templates, run_uri, retry, rows)
    assert sorted(r["id"] for r in final) == ["d1", "d3"]
    assert not [r for r in retry.requests if r[0] == "generate"]  # generate was not asked again
    for stage in LLM_STAGES:
        kept, dropped = stage_rows(run_uri, stage)
        ids = [r["id"] for r in kept + dropped]
        assert len(ids) == len(set(ids)), (stage, ids)
    state = scan_run(STORAGE, run_uri)
    assert state.finished.count("curate") == 3 and state.finished.count("rewrite") == 2


def test_a_stage_left_half_written_is_replaced_whatever_its_new_split(run):
    """An earlier run wrote curate's dropped file but died before its kept file; the rerun
    keeps all three rows (another sampling): the stale dropped file must go."""
    cfg, templates, run_uri = run
    rows = {"generate": [filtered_row(i) for i in (1, 2, 3)]}
    run_program(cfg, templates, run_uri, FakeEngine({"d1": 5, "d2": 2, "d3": 4}), rows)
    writer = StageWriter(STORAGE, run_uri)
    name = batch_name("curate", stage_rows(run_uri, "generate")[0])
    Path(writer.kept_uri("curate", name)).unlink()
    for path in Path(run_uri, "rewritten").glob("*.parquet"):
        path.unlink()
    assert Path(writer.dropped_uri("curate", name)).exists()

    rerun = FakeEngine({"d1": 5, "d2": 5, "d3": 5})
    final = run_program(cfg, templates, run_uri, rerun, rows)
    assert sorted(r["id"] for r in final) == ["d1", "d2", "d3"]
    kept, dropped = stage_rows(run_uri, "curate")
    assert sorted(r["id"] for r in kept) == ["d1", "d2", "d3"] and dropped == []
    assert not [r for r in rerun.requests if r[0] == "generate"]


def test_shared_and_per_stage_write_the_same_rows(run, tmp_path):
    """The same replies through a pool per stage (finish_batch on ray.data.llm's output
    rows) and through the shared programs give the same stage files, row for row."""
    cfg, templates, run_uri = run
    scores = {"d1": 5, "d2": 2, "d3": 4}
    run_program(cfg, templates, run_uri, FakeEngine(scores), {"generate": [filtered_row(i) for i in (1, 2, 3)]})

    other = str(tmp_path / "per-stage")
    ctx = RunContext(config=cfg, storage=STORAGE, run_uri=other, templates=templates)
    rows = [filtered_row(i) for i in (1, 2, 3)]
    for stage in LLM_STAGES:
        outputs = [{**row, "generated_text": FakeEngine.REPLIES[stage].format(score=scores[row["id"]]),
                    "num_input_tokens": 100, "num_generated_tokens": 10, "__inference_error__": ""} for row in rows]
        rows = finish_batch(pa.Table.from_pylist(outputs), stage, ctx).to_pylist()

    def comparable(rows):  # what ray.data.llm cannot report, and timing metadata, aside
        drop = {"generate_cached_tokens", "curate_cached_tokens", "rewrite_cached_tokens", "cached_tokens"}
        return sorted(({k: v for k, v in r.items() if k not in drop} for r in rows), key=lambda r: r["id"])

    for stage in LLM_STAGES:
        shared_kept, shared_dropped = stage_rows(run_uri, stage)
        per_kept, per_dropped = stage_rows(other, stage)
        assert comparable(shared_kept) == comparable(per_kept), stage
        assert comparable(shared_dropped) == comparable(per_dropped), stage


# --- the shared pool's replica, its engine patched out ------------------------------------

def fake_output(text: str, cached: int = 40):
    from types import SimpleNamespace

    return SimpleNamespace(outputs=[SimpleNamespace(text=text, token_ids=[7] * 5, finish_reason="stop")],
                           prompt_token_ids=[7] * 100,
                           num_cached_tokens=cached, finished=True)


class FakeVllm:
    """Answers like FakeEngine, through the engine interface SharedEngine drives."""

    TASKS = {"Task: work out": "generate", "Task: decide": "curate", "Task: rewrite": "rewrite"}

    def __init__(self):
        self.stages: list[str] = []
        self.priorities: dict[str, int] = {}
        self.adapters: dict[str, set] = {}

    async def generate(self, request_id, prompt, params, priority=0, lora_request=None):
        stage = next(s for marker, s in self.TASKS.items() if marker in prompt)
        self.stages.append(stage)
        self.priorities[stage] = priority
        self.adapters.setdefault(stage, set()).add(lora_request and (lora_request.lora_name, lora_request.lora_path))
        return fake_output(FakeEngine.REPLIES[stage].format(score=5))

    def shutdown(self):
        pass


def test_a_shared_replica_takes_rows_joining_at_any_stage(run, monkeypatch):
    """Rows of filter and of generate, put in the pool's input schema by mark_entry, go
    through SharedEngine: each from its own stage on, every stage file written, the
    last pass's rows handed on with rewrite's columns."""
    from bft.engines import shared
    from bft.schema import to_table

    from bft.engines.adapters import Adapter

    cfg, templates, run_uri = run
    engine = FakeVllm()
    started_with = {}
    monkeypatch.setattr(shared, "start_engine", lambda stage, extra=None: started_with.update(extra) or engine)
    # generate and curate on adapters of their own, rewrite on the base model
    adapters = {name: Adapter(name, f"/adapters/{name}", sha * 64, 8, ("adapter_config.json",))
                for name, sha in (("generate", "a"), ("curate", "b"))}
    replica = shared.SharedEngine(LLM_STAGES, RunContext(config=cfg, storage=STORAGE, run_uri=run_uri,
                                                         templates=templates, adapters=adapters))
    generated = {**filtered_row(2), "instruction": "Why repot?", "generate_raw": "Why repot?"}
    batch = pa.concat_tables([
        shared.mark_entry(to_table([filtered_row(1)], COLUMNS["filter"]), LLM_STAGES, "generate"),
        shared.mark_entry(to_table([generated], COLUMNS["generate"]), LLM_STAGES, "curate")])
    assert batch.schema.names == [*COLUMNS["curate"], shared.ENTRY_COLUMN]

    async def collect():
        return [table async for table in replica(batch)]

    (out,) = asyncio.run(collect())
    assert out.schema.names == list(COLUMNS["rewrite"]) and sorted(out.column("id").to_pylist()) == ["d1", "d2"]
    assert sorted(engine.stages) == ["curate", "curate", "generate", "rewrite", "rewrite"]
    # a document's later passes go ahead of new documents' first ones
    assert engine.priorities["rewrite"] < engine.priorities["curate"] < engine.priorities["generate"]
    # one engine, each stage's requests on its own adapter
    assert started_with == {"enable_lora": True, "max_loras": 2, "max_lora_rank": 8}
    assert engine.adapters == {"generate": {(adapters["generate"].name, "/adapters/generate")},
                               "curate": {(adapters["curate"].name, "/adapters/curate")}, "rewrite": {None}}
    assert [r["id"] for r in stage_rows(run_uri, "generate")[0]] == ["d1"]
    assert sorted(r["id"] for r in stage_rows(run_uri, "curate")[0]) == ["d1", "d2"]
    assert {r["rewrite_cached_tokens"] for r in stage_rows(run_uri, "rewrite")[0]} == {40}


# --- the in-process engine and its stepping thread -----------------------------------------

class FakeLLMEngine:
    """vllm.LLMEngine's calls SteppedEngine makes: one step finishes every request added;
    a prompt "bad" is refused when added, "boom" breaks the step it is in."""

    def __init__(self):
        self.pending: dict[str, str] = {}
        self.aborted: list[str] = []

    def add_request(self, request_id, prompt, params, priority=0, lora_request=None):
        if prompt["prompt"] == "bad":
            raise ValueError("prompt refused")
        self.pending[request_id] = prompt["prompt"]

    def has_unfinished_requests(self):
        return bool(self.pending)

    def step(self):
        import time

        time.sleep(0.01)
        if "boom" in self.pending.values():
            raise RuntimeError("engine core died")
        done, self.pending = self.pending, {}
        from types import SimpleNamespace

        return [SimpleNamespace(request_id=i, finished=True, text=p.upper()) for i, p in done.items()]

    def abort_request(self, ids):
        self.aborted += ids
        for i in ids:
            self.pending.pop(i, None)


def test_the_stepped_engine_answers_each_request_and_fails_only_a_bad_one():
    from bft.engines.vllm_engine import SteppedEngine

    engine = SteppedEngine(FakeLLMEngine())

    async def go():
        return await asyncio.gather(engine.generate("1", "one", None), engine.generate("2", "bad", None),
                                    engine.generate("3", "three", None), return_exceptions=True)

    one, bad, three = asyncio.run(go())
    assert (one.text, three.text) == ("ONE", "THREE")
    assert isinstance(bad, ValueError) and "refused" in str(bad)
    engine.shutdown()


def test_a_broken_step_fails_every_request_in_the_engine_and_after_it():
    from bft.engines.vllm_engine import EngineStopped, SteppedEngine, fatal_errors

    engine = SteppedEngine(FakeLLMEngine())

    async def go():
        return await asyncio.gather(engine.generate("1", "fine", None), engine.generate("2", "boom", None),
                                    return_exceptions=True)

    results = asyncio.run(go())
    assert all(isinstance(r, EngineStopped) for r in results), results
    assert EngineStopped in fatal_errors()  # the replica exits and Ray Data retries its batches

    async def later():
        return await engine.generate("3", "fine", None)

    with pytest.raises(EngineStopped):
        asyncio.run(later())


def test_a_cancelled_request_is_aborted_in_the_engine():
    from bft.engines.vllm_engine import SteppedEngine

    fake = FakeLLMEngine()
    fake.step = lambda: (__import__("time").sleep(0.05), [])[1]  # never finishes anything
    engine = SteppedEngine(fake)

    async def go():
        task = asyncio.ensure_future(engine.generate("7", "slow", None))
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.sleep(0.2)

    asyncio.run(go())
    assert fake.aborted == ["7"]
    engine.shutdown()


def test_engine_errors_become_drops_and_fatal_ones_propagate():
    from bft.engines.vllm_engine import EngineStopped, generate

    class Raising:
        def __init__(self, exc):
            self.exc = exc

        async def generate(self, *args, **kwargs):
            raise self.exc

    request = {"prompt": "p", "sampling_params": {"temperature": 1.0, "max_tokens": 4}}
    reply = asyncio.run(generate(Raising(ValueError("too long")), "1", request))
    assert reply.error == "ValueError: too long" and reply.text == ""
    with pytest.raises(EngineStopped):
        asyncio.run(generate(Raising(EngineStopped("gone")), "2", request))
    ok = asyncio.run(generate(type("E", (), {"generate": staticmethod(
        lambda *a, **k: asyncio.sleep(0, fake_output("fine", cached=12)))})(), "3", request))
    assert (ok.text, ok.prompt_tokens, ok.completion_tokens, ok.cached_tokens) == ("fine", 100, 5, 12)
