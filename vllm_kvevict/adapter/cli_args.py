"""``--kv-eviction*`` flags for ``vllm serve``, carried into ``additional_config``.

vLLM loads general plugins inside ``AsyncEngineArgs.add_cli_args`` before the engine flags are
added, so wrapping ``EngineArgs.add_cli_args`` lets the flags appear in ``vllm serve --help``.
``from_cli_args`` keeps only dataclass fields, so the flags are merged into
``additional_config["kv_eviction"]`` there.
"""

from __future__ import annotations

import argparse
import json

from vllm_kvevict.config import CONFIG_KEY, parse_config
from vllm_kvevict.policies import available_policies

# flag dest -> config field
_FLAGS = {
    "kv_eviction": "policy",
    "kv_eviction_budget": "budget",
    "kv_eviction_budget_tokens": "budget_tokens",
    "kv_eviction_floor_tokens": "floor_tokens",
    "kv_eviction_interval": "interval",
    "kv_eviction_recycle_bin": "recycle_bin_blocks",
    "kv_eviction_pool_pressure": "pool_pressure",
    "kv_eviction_prefill": "prefill_eviction",
    "kv_eviction_prefill_query": "prefill_query",
    "kv_eviction_client_options": "client_options",
}


def add_flags(parser) -> None:
    if any(a.dest == "kv_eviction" for a in parser._actions):
        return
    group = parser.add_argument_group(
        "KV-cache eviction (vllm-kvevict)",
        "Evict KV blocks of running requests. Same settings as "
        "--additional-config '{\"kv_eviction\": {...}}'; per request via vllm_xargs.",
    )
    group.add_argument("--kv-eviction", default=None, metavar="POLICY",
                       help=f"eviction policy, one of {available_policies()} (default: off)")
    group.add_argument("--kv-eviction-budget", type=float, default=None, metavar="FRACTION",
                       help="fraction of each sequence's KV kept, 0 < B <= 1 (default 0.5)")
    group.add_argument("--kv-eviction-budget-tokens", type=int, default=None, metavar="N",
                       help="tokens of KV kept per sequence (instead of --kv-eviction-budget)")
    group.add_argument("--kv-eviction-floor-tokens", type=int, default=None, metavar="N",
                       help="tokens every request keeps whatever its budget; requests of at "
                       "most N tokens are never evicted (default 256; 0: no floor)")
    group.add_argument("--kv-eviction-interval", type=int, default=None, metavar="STEPS",
                       help="decode steps between eviction checks (default 16)")
    group.add_argument("--kv-eviction-recycle-bin", type=int, default=None, metavar="BLOCKS",
                       help="per request: evicted blocks parked (restorable) before release")
    group.add_argument("--kv-eviction-pool-pressure", action="store_true", default=None,
                       help="when the KV pool is full, evict the globally least important "
                       "blocks instead of preempting requests")
    group.add_argument("--kv-eviction-prefill", action="store_true", default=None,
                       help="evict between the chunks of a chunked prefill: a request holds "
                       "about its budget plus one chunk, so prompts longer than the KV pool "
                       "are served")
    group.add_argument("--kv-eviction-prefill-query", default=None, choices=("chunk", "probe", "keywords"),
                       help="with --kv-eviction-prefill: score the prompt's earlier chunks by "
                       "their own last queries (chunk), by the prompt's tail, the question, "
                       "run once beside the first chunk (probe), or by their own queries plus "
                       "the tail's rare tokens they hold (keywords)")
    group.add_argument("--kv-eviction-client-options", default=None, metavar="SPEC",
                       help="per-request kv_eviction fields clients may set: 'all' (default), "
                       "'none', a comma list (budget,policy) or a JSON object with bounds "
                       "('{\"budget\": {\"min\": 0.1}}'); others get HTTP 400")
    group.add_argument("--kv-eviction-config", default=None, metavar="JSON",
                       help="full kv_eviction config as JSON (flags above override its fields)")


def merge_into_additional_config(args: argparse.Namespace) -> None:
    """Move the flags into ``args.additional_config['kv_eviction']`` (validated)."""
    raw = getattr(args, "kv_eviction_config", None)
    fields: dict = {}
    if raw:
        try:
            fields = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--kv-eviction-config: not valid JSON ({exc.msg})") from None
        if not isinstance(fields, dict):
            raise ValueError("--kv-eviction-config: expected a JSON object")
    for dest, name in _FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            fields[name] = value
    for dest in [*_FLAGS, "kv_eviction_config"]:
        if hasattr(args, dest):
            delattr(args, dest)
    if not fields:
        return
    additional = getattr(args, "additional_config", None) or {}
    if isinstance(additional, str):
        additional = json.loads(additional)
    merged = dict(additional.get(CONFIG_KEY) or {})
    merged.update(fields)
    parse_config(merged)  # fail at startup, naming the field
    args.additional_config = {**additional, CONFIG_KEY: merged}


def install_cli() -> None:
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs, "_kvevict_cli", False):
        return
    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__

    def add_cli_args(parser, *a, **k):
        parser = original_add(parser, *a, **k)
        add_flags(parser)
        return parser

    def from_cli_args(cls, args: argparse.Namespace):
        merge_into_additional_config(args)
        return original_from(cls, args)

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
    EngineArgs._kvevict_cli = True
