"""What the arm scripts (engine_arms.py, ray_arms.py) share: their command line, and the
check that every pass can run on one engine."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable

from bft.config import BftConfig, LLMStageConfig, load_config
from bft.stages import LLM_STAGES


def parse_args(arms: Iterable[str], doc: str | None) -> tuple[argparse.Namespace, BftConfig]:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arm", choices=sorted(arms))
    parser.add_argument("--config", required=True)
    parser.add_argument("--run-dir", required=True, help="a finished bft run of the same config and documents")
    parser.add_argument("--out", required=True, help="JSON file for the measurements")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    return args, load_config(args.config, args.overrides)


def single_engine(cfg: BftConfig) -> LLMStageConfig:
    """The settings of the one engine an arm runs every pass on; exits when the passes'
    engine settings differ (the criterion bft's own pools share by, ``engine_groups``)."""
    if len({json.dumps(cfg.llm_stage(name).engine_settings(), sort_keys=True) for name in LLM_STAGES}) != 1:
        first = cfg.llm_stage(LLM_STAGES[0])
        raise SystemExit(f"this arm runs one engine: {', '.join(LLM_STAGES)} need the same engine settings "
                         f"({', '.join(first.ENGINE_FIELDS)})")
    return cfg.llm_stage(LLM_STAGES[0])
