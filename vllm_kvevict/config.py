"""``kv_eviction`` configuration: the server default and per-request overrides.

One pydantic model validates every entry point (``additional_config``, ``--kv-eviction*``
flags, ``SamplingParams.extra_args`` / ``vllm_xargs``). Errors name the field and the valid
values, e.g. ``kv_eviction.budget: must be > 0 and <= 1 (got 1.5)``.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vllm_kvevict.policies import available_policies, format_validation_error, get_policy

CONFIG_KEY = "kv_eviction"
#: default sink/recent protection takes at most this share of a request's block budget beyond
#: its last (partly written, always kept) block; the rest is left to the policy's scores
PROTECTED_SHARE = 0.5
#: budget used when a policy is set but neither ``budget`` nor ``budget_tokens`` is
DEFAULT_BUDGET = 0.5
#: tokens every request keeps whatever its budget (``floor_tokens``'s default). A request of at
#: most this many tokens is never scored or evicted. Measured (benchmarks/bench_floor.py, 25 %
#: budget, HAE / LaProx / SnapKV alike): without a floor 0 of 8 short chats (36-41 tokens) and
#: 0 of 2 note chats of 115 tokens answer as with the full cache - a fraction of such a request
#: keeps one or two blocks, and the template, question or fact goes; with 128, 256 or 512 all
#: 10 do. 256 rather than 128 because ~120-250-token requests (a system prompt, a few turns)
#: are the common chat size; rather than 512 because the floor's cost is paid by every request
#: under ``floor / budget`` tokens: with 256 the 671-token chats keep 35 % instead of 25 %, the
#: 810-token pass key 30 %; with 512 they keep 72 % and 61 %. Long prompts pay nothing.
DEFAULT_FLOOR_TOKENS = 256


#: per-request fields that take ``min`` / ``max`` bounds, and the one that takes ``choices``
NUMERIC_FIELDS = ("budget", "budget_tokens", "floor_tokens", "sink_tokens", "recent_tokens",
                  "recycle_bin_blocks")


class ClientBound(BaseModel):
    """What a client may set one per-request field to: ``min`` / ``max`` for numbers,
    ``choices`` for ``policy`` (an empty bound: any valid value)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None

    def check(self, name: str, value: Any) -> None:
        field = f"{CONFIG_KEY}.{name}"
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{field}: this server lets clients choose only "
                             f"{list(self.choices)} (got {value!r})")
        if self.min is None and self.max is None:
            return
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{field}: must be a number (got {value!r})") from None
        if self.min is not None and number < self.min:
            raise ValueError(f"{field}: this server allows clients >= {self.min:g} (got {value!r})")
        if self.max is not None and number > self.max:
            raise ValueError(f"{field}: this server allows clients <= {self.max:g} (got {value!r})")


class EvictionConfig(BaseModel):
    """What to evict, how much to keep, and what is never evicted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str = Field("none", description="scorer name, or 'none' to evict nothing")
    budget: float | None = Field(
        None, description="fraction of the sequence's KV kept, 0 < budget <= 1 (default 0.5)"
    )
    budget_tokens: int | None = Field(None, description="tokens of KV kept (instead of budget)")
    floor_tokens: int = Field(
        DEFAULT_FLOOR_TOKENS, ge=0, description="tokens every request keeps whatever its budget: "
        "requests of at most this many tokens are never evicted (0: no floor)"
    )
    sink_tokens: int = Field(4, ge=0, description="first tokens never evicted (whole blocks)")
    recent_tokens: int = Field(64, ge=0, description="most recent tokens never evicted")
    interval: int = Field(16, ge=1, description="decode steps between eviction checks")
    recycle_bin_blocks: int = Field(
        0, ge=0, description="per request: evicted blocks parked (restorable) before release"
    )
    recycle_bin_total_blocks: int = Field(
        4096, ge=0, description="all requests together: parked blocks held at most"
    )
    pool_pressure: bool = Field(
        False, description="evict globally least important blocks instead of preempting"
    )
    prefill_eviction: bool = Field(
        False, description="evict between the chunks of a chunked prefill, so a request holds "
        "about its budget plus one chunk (prompts longer than the KV pool)"
    )
    prefill_query: Literal["chunk", "probe", "keywords"] = Field(
        "keywords", description="with prefill_eviction, what scores the prompt's earlier chunks "
        "for a windowed policy: 'chunk', each chunk's own last queries; 'probe', the prompt's "
        "tail (the question), run once beside the first chunk (adapter/probe.py); 'keywords', "
        "the chunk's own queries plus the tail's rare tokens each block holds "
        "(adapter/keywords.py)"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="policy-specific options")
    client_options: dict[str, ClientBound] | None = Field(
        None, description="server only: the per-request fields clients may set, with bounds "
        "(None: every per-request field; {}: none)"
    )

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in available_policies():
            raise ValueError(f"unknown policy {value!r}; valid policies: {available_policies()}")
        return value

    @field_validator("budget")
    @classmethod
    def _budget_range(cls, value: float | None) -> float | None:
        if value is not None and not (0.0 < value <= 1.0):
            raise ValueError("must be > 0 and <= 1")
        return value

    @field_validator("budget_tokens")
    @classmethod
    def _budget_tokens_range(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be >= 1")
        return value

    @model_validator(mode="after")
    def _one_budget_and_valid_options(self) -> EvictionConfig:
        if self.budget is not None and self.budget_tokens is not None:
            raise ValueError("give either budget or budget_tokens, not both")
        if self.policy != "none":
            get_policy(self.policy, self.options)  # raises ValueError naming the option
        elif self.options:
            raise ValueError("options given but policy is 'none'")
        return self

    @property
    def enabled(self) -> bool:
        return self.policy != "none"

    @field_validator("client_options", mode="before")
    @classmethod
    def _client_options_forms(cls, value: Any) -> Any:
        return parse_client_options(value)

    def keep_tokens(self, seq_len: int) -> int:
        """Tokens of KV a sequence of ``seq_len`` tokens may keep: its budget (a fraction of
        ``seq_len`` or ``budget_tokens``), but never fewer than ``floor_tokens``."""
        if self.budget_tokens is not None:
            return max(self.budget_tokens, self.floor_tokens)
        fraction = DEFAULT_BUDGET if self.budget is None else self.budget
        return max(math.ceil(fraction * seq_len), self.floor_tokens)

    def below_floor(self, seq_len: int) -> bool:
        """A sequence this short is never scored or evicted (not even by a policy that
        selects within its budget, such as HAE's visual pruning, nor under pool pressure)."""
        return seq_len <= self.floor_tokens

    def keep_blocks(self, seq_len: int, block_size: int) -> int:
        """Whole blocks a sequence of ``seq_len`` tokens may keep: the budget is met in blocks,
        so a partly filled last block is never over it (budget 1.0 never evicts or scores)."""
        return math.ceil(self.keep_tokens(seq_len) / block_size)

    def peak_blocks(self, max_len: int, chunk_tokens: int, block_size: int) -> int:
        """Blocks one request of at most ``max_len`` tokens can hold at once.

        Without prefill eviction the whole prompt is resident before the first decision, so
        ``max_len`` tokens. With it, a decision after each prefill chunk (and every
        ``interval`` decode steps) brings the request back to its budget; until the next one
        it grows by one chunk (``chunk_tokens``, vLLM's ``max_num_batched_tokens``) or
        ``interval`` tokens, plus a partly written block on either side.
        """
        if not (self.enabled and self.prefill_eviction):
            return math.ceil(max_len / block_size)
        growth = math.ceil(max(chunk_tokens, self.interval) / block_size)
        return min(self.keep_blocks(max_len, block_size) + growth + 2,
                   math.ceil(max_len / block_size))

    def protection(self, keep_blocks: int, block_size: int) -> tuple[int, int | None]:
        """Protected blocks for a request allowed ``keep_blocks`` blocks: ``(sink blocks, most
        full recent blocks or None for all that ``recent_tokens`` reach)``.

        The defaults (4 sink + 64 recent tokens: 1 + 2 full blocks of 32) would take a tight
        budget whole — at 10 % of 1k tokens, 4 blocks, nothing would be left to score. So
        default protection shrinks to at most ``PROTECTED_SHARE`` of the blocks beyond the
        last one, recent blocks first, then the sink: 2 blocks keep 1 scored, 4 keep the sink
        and 2 scored, 7 and more the full defaults. Windowed policies still keep their
        observation window (the question) through their own scores. A ``sink_tokens`` or
        ``recent_tokens`` set explicitly (server default or request) is used as given.
        """
        sink = math.ceil(self.sink_tokens / block_size)
        cap = int(PROTECTED_SHARE * max(keep_blocks - 1, 0))
        if "sink_tokens" not in self.model_fields_set:
            sink = min(sink, cap)
        recent = None if "recent_tokens" in self.model_fields_set else max(cap - sink, 0)
        return sink, recent

    def with_overrides(self, overrides: dict[str, Any]) -> EvictionConfig:
        """A per-request config: the server default with ``overrides`` applied and validated."""
        if not isinstance(overrides, dict):
            raise ValueError(
                f"{CONFIG_KEY}: per-request options must be a JSON object, got {type(overrides).__name__}"
            )
        allowed = set(PER_REQUEST_FIELDS)
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise ValueError(
                f"{CONFIG_KEY}.{unknown[0]}: not a per-request option; valid: {sorted(allowed)}"
            )
        self.check_client_overrides(overrides)
        merged = self.model_dump(exclude_unset=True)  # explicit fields stay explicit
        if "policy" in overrides and overrides["policy"] != self.policy:
            merged["options"] = {}
        if "budget" in overrides:
            merged["budget_tokens"] = None
        if "budget_tokens" in overrides:
            merged["budget"] = None
        merged.update(overrides)
        return parse_config(merged)

    def check_client_overrides(self, overrides: dict[str, Any]) -> None:
        """Refuse overrides the operator's ``client_options`` do not allow (``ValueError``
        naming the field and what is allowed). No ``client_options``: everything is."""
        if self.client_options is None:
            return
        allowed = sorted(self.client_options)
        for name, value in overrides.items():
            bound = self.client_options.get(name)
            if bound is None:
                raise ValueError(
                    f"{CONFIG_KEY}.{name}: this server does not let clients set it; "
                    + (f"settable: {allowed}" if allowed else "no kv_eviction options are settable"))
            bound.check(name, value)


PER_REQUEST_FIELDS = (
    "policy", "budget", "budget_tokens", "floor_tokens", "sink_tokens", "recent_tokens",
    "recycle_bin_blocks", "prefill_eviction", "prefill_query", "options",
)
def parse_client_options(value: Any) -> Any:
    """``client_options`` in any of its forms, as ``{field: bound dict}`` (or None).

    Forms: None (every per-request field), ``"all"``, ``"none"`` / ``""`` / ``[]`` (no field),
    a list or comma-separated string of field names (any valid value), or a JSON object /
    dict ``{"budget": {"min": 0.1}, "policy": {"choices": ["snapkv", "hae"]}, "options": {}}``.
    Raises ``ValueError`` naming an unknown field or a bound that does not fit the field.
    """
    if value is None or isinstance(value, str) and value.strip() == "all":
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            value = _json_object(text, f"{CONFIG_KEY}.client_options", "must be")
        else:
            value = [] if text in ("", "none") else [f.strip() for f in text.split(",")]
    if isinstance(value, list | tuple):
        value = {name: {} for name in value}
    if not isinstance(value, dict):
        raise ValueError("expected 'all', 'none', a list of fields or a JSON object")
    out = {}
    for name, bound in value.items():
        if name not in PER_REQUEST_FIELDS:
            raise ValueError(f"{name!r} is not a per-request field; valid: "
                             f"{list(PER_REQUEST_FIELDS)}")
        bound = dict(bound.model_dump(exclude_none=True) if isinstance(bound, ClientBound)
                     else bound or {})
        numeric = bound.get("min") is not None or bound.get("max") is not None
        if numeric and name not in NUMERIC_FIELDS:
            raise ValueError(f"{name}: min/max bound only {list(NUMERIC_FIELDS)}")
        if "choices" in bound:
            if name != "policy":
                raise ValueError(f"{name}: a choices bound is for policy only")
            unknown = sorted(set(bound["choices"]) - set(available_policies()))
            if unknown:
                raise ValueError(f"policy: unknown policy {unknown[0]!r}; valid "
                                 f"policies: {available_policies()}")
        out[name] = bound
    return out



def request_overrides(extra_args: dict[str, Any] | None) -> dict[str, Any] | None:
    """The per-request ``kv_eviction`` overrides in a request's ``extra_args``, or None.

    Accepted forms (over HTTP ``vllm_xargs`` values cannot be objects, hence the last two):
    ``{"kv_eviction": {...}}``, ``{"kv_eviction": "<JSON object>"}`` and flat keys
    ``{"kv_eviction.budget": 0.25, "kv_eviction.policy": "snapkv"}`` (``kv_eviction.options``
    as a JSON string). Raises ``ValueError`` naming the offending field.
    """
    if not extra_args:
        return None
    prefix = CONFIG_KEY + "."
    flat = {k[len(prefix):]: v for k, v in extra_args.items() if k.startswith(prefix)}
    if CONFIG_KEY not in extra_args and not flat:
        return None
    raw = _json_object(extra_args.get(CONFIG_KEY, {}), CONFIG_KEY, "per-request options must be")
    if "options" in flat:
        flat["options"] = _json_object(flat["options"], f"{CONFIG_KEY}.options", "must be")
    return {**raw, **flat}


def _json_object(value: Any, field: str, what: str) -> dict:
    """``value`` as a dict: a dict as is, a string parsed as a JSON object; else ValueError."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{field}: not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{field}: {what} a JSON object, got {type(value).__name__}")
    return value


def parse_config(raw: Any) -> EvictionConfig:
    """Validate a ``kv_eviction`` value (dict, JSON string or None) into ``EvictionConfig``."""
    if raw is None:
        return EvictionConfig()
    if isinstance(raw, EvictionConfig):
        return raw
    raw = _json_object(raw, CONFIG_KEY, "expected")
    try:
        return EvictionConfig(**raw)
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, prefix=CONFIG_KEY)) from None


def config_from_additional(additional_config: Any) -> EvictionConfig | None:
    """The engine's eviction config, or None when ``kv_eviction`` is absent (plugin inert)."""
    if not isinstance(additional_config, dict) or CONFIG_KEY not in additional_config:
        return None
    return parse_config(additional_config[CONFIG_KEY])
