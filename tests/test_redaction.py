"""Secrets masked by value (redaction.py): in what bft prints, and kept off `bft submit`'s command line."""

from __future__ import annotations

import io
import json

from bft.config import StorageConfig, load_config
from bft.redaction import (SECRET_SETS_ENV, Masker, MaskedStream, configured_secrets, environment_secrets,
                           is_secret_override)
from bft.storage import Storage
from bft.writers.manifest import write_manifest

from e2e.conftest import run_bft

HF = "hf_plantedToken1234567"


def test_secret_overrides_are_told_from_plain_ones():
    assert is_secret_override("storage.secret_access_key=abc")
    assert is_secret_override("generate.env_vars.HF_TOKEN=x")
    assert is_secret_override("rewrite.engine_kwargs.hf_token=x")
    assert is_secret_override("storage.endpoint_url=https://user:pw@minio:9000")
    # whole sections given at once
    assert is_secret_override("generate.env_vars={HF_TOKEN: x, OTHER: y}")
    assert is_secret_override("storage={secret_access_key: abc, region: us-east-1}")
    assert is_secret_override("curate={engine_kwargs: {hf_token: x}}")
    assert is_secret_override("generate.env_vars.HF_TOKEN=a: b")  # a value that parses as a mapping
    assert not is_secret_override("generate.sampling={max_tokens: 128, temperature: 0.7}")
    assert not is_secret_override("generate.sampling.max_tokens=128")  # a token count is no token
    assert not is_secret_override("input.uri=s3://bucket/crawl/")


def test_every_configured_and_environment_secret_is_known_by_value():
    cfg = load_config(None, ["model=/m", "storage.secret_access_key=s3-secret-value-1",
                             f"generate.env_vars.HF_TOKEN={HF}", "curate.engine_kwargs.hf_token=hf-second-12345",
                             "storage.endpoint_url=https://minio:proxy-pass-777@minio:9000"])
    assert {"s3-secret-value-1", HF, "hf-second-12345", "proxy-pass-777"} <= configured_secrets(cfg)
    env = {"HF_TOKEN": "hf-env-value-999", "HTTPS_PROXY": "http://bob:env-proxy-pass@proxy:3128",
           "HOME": "/root", "PWD": "/work/project", "RAY_AUTH_TOKEN_PATH": "/secrets/ray-token",
           SECRET_SETS_ENV: json.dumps(["storage.session_token=session-tok-42"])}
    found = environment_secrets(env)
    assert {"hf-env-value-999", "env-proxy-pass", "session-tok-42"} <= found
    assert not {"/root", "/work/project", "/secrets/ray-token"} & found  # names of paths, not secrets


def test_a_masked_stream_masks_every_known_value_and_keeps_short_ones():
    masker = Masker()
    masker.loaded_environment = True  # this test's values only
    masker.add([HF, "true", "hf_plantedToken"])
    assert masker.mask(f"token={HF} flag=true") == "token=********** flag=true"


def test_a_secret_is_masked_inside_json_text_too():
    masker = Masker()
    masker.loaded_environment = True
    secret = 'pa"ss\\word-123'
    masker.add([secret])
    assert secret not in masker.mask(secret) and "word-123" not in masker.mask(json.dumps({"k": secret}))


def test_a_worker_that_unpickles_the_run_context_masks_the_configs_secrets(tmp_path):
    """Ray workers get the config inside the pickled RunContext; their error records and
    engine-error details must mask its secrets, not only their environment's."""
    import subprocess
    import sys

    from bft.context import RunContext

    cfg = load_config(None, ["model=/m", "generate.engine_kwargs.hf_token=hf-only-in-config-4242"])
    ctx = RunContext(config=cfg, storage=Storage(StorageConfig()), run_uri=str(tmp_path), templates={})
    (tmp_path / "ctx.pkl").write_bytes(__import__("pickle").dumps(ctx))
    code = ("import pickle, sys; from bft.redaction import mask; pickle.loads(open(sys.argv[1], 'rb').read()); "
            "print(mask('engine said: bad token hf-only-in-config-4242'))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "ctx.pkl")], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "engine said: bad token **********"


def test_secret_values_in_a_written_manifest_are_masked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HF)
    from bft import redaction

    monkeypatch.setattr(redaction, "MASKER", Masker())
    uri = write_manifest(Storage(StorageConfig()), str(tmp_path), {"first_error": f"OSError: 401 for token {HF}"})
    text = (tmp_path / "manifest.json").read_text()
    assert HF not in text and "token **********" in text and uri.endswith("manifest.json")


def test_an_error_quoting_a_secret_is_printed_masked(tmp_path):
    """Issue 17: only config fields were redacted, by name; a secret inside a message went out as is."""
    leaky = tmp_path / HF / "crawl"
    result = run_bft("run", "examples/quickstart.yaml", "--set", f"input.uri={leaky}",
                     "--set", f"output.uri={tmp_path / 'out'}", env={"HF_TOKEN": HF})
    assert result.returncode == 2 and "no input files found" in result.stderr
    assert HF not in result.stderr + result.stdout and "/**********/crawl" in result.stderr


def test_bft_submit_keeps_secret_overrides_off_the_command_line():
    from bft.submit import run_command, runtime_env

    sets = ["rewrite.min_response_chars=10", f"generate.env_vars.HF_TOKEN={HF}"]
    command = run_command("c.yaml", "r1", [s for s in sets if not is_secret_override(s)], None, None, None)
    env = runtime_env(None, False, [s for s in sets if is_secret_override(s)])
    assert HF not in " ".join(command) and "rewrite.min_response_chars=10" in command
    assert json.loads(env["env_vars"][SECRET_SETS_ENV]) == [f"generate.env_vars.HF_TOKEN={HF}"]


def test_masked_stream_passes_other_calls_through():
    buffer = io.StringIO()
    stream = MaskedStream(buffer)
    stream.write("plain\n")
    stream.flush()
    assert buffer.getvalue() == "plain\n" and stream.getvalue() == "plain\n"
