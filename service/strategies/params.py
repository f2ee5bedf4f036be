"""Validated parameters of each strategy (the names are fixed by the product spec).

Every model forbids unknown fields. Cross-field rules live in field validators (not model validators) so that a
failure names the parameter at fault; `validate_params` turns pydantic's error into `StrategyParamError(param, msg)`.
A maximum for `n` (the gateway's `max_n`) comes in through the validation context.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

Selection = Literal["majority", "best", "weighted"]
Aggregation = Literal["last", "min", "prod", "mean"]

# The bundled model writes one calculation per line and rarely leaves blank lines, so with the papers' "\n\n" a
# whole solution would be one step and step-level search would degenerate into best-of-N. One line = one step here.
DEFAULT_STEP_DELIMITER = "\n"


class StrategyParamError(ValueError):
    """A strategy parameter is invalid; `param` names it (for a 400 response that points at the field)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


def _at_most_n(value: int, info: ValidationInfo) -> int | None:
    """n (validated before `value`), after checking value <= n; None when n itself was invalid."""
    n = info.data.get("n")
    if n is not None and value > n:
        raise ValueError(f"must be <= n ({n})")
    return n


def _divides_n(value: int, info: ValidationInfo, why: str) -> int:
    n = _at_most_n(value, info)
    if n is not None and n % value:
        raise ValueError(f"must divide n ({n}) exactly: {why}")
    return value


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Sampled(_Params):
    n: int = Field(8, ge=1, strict=True)
    # None: the request's temperature (see `sampling_temperature`). 0 is refused: N identical samples are useless
    # and vLLM rejects n > 1 at temperature 0.
    temperature: float | None = Field(None, gt=0.0, le=2.0)
    selection: Selection = "weighted"
    # Snell et al.: the last step's score beat min and prod as the score of a whole answer.
    aggregation: Aggregation = "last"

    @field_validator("n")
    @classmethod
    def _n_within_max(cls, n: int, info: ValidationInfo) -> int:
        max_n = (info.context or {}).get("max_n")
        if max_n is not None and n > max_n:
            raise ValueError(f"must be <= {max_n} (the gateway's max_n)")
        return n


class _Stepped(_Sampled):
    step_delimiter: str = Field(DEFAULT_STEP_DELIMITER, min_length=1, max_length=16)
    # Snell's 40 iterations (search-and-learn's default); the last round generates to the end of the answer.
    max_rounds: int = Field(40, ge=1, le=200, strict=True)


class GreedyParams(_Params):
    pass


ConfidenceMetric = Literal["lowest_group", "bottom10", "tail", "mean"]


class BestOfNParams(_Sampled):
    # "confidence": DeepConf's offline filter and vote on the policy's own token log-probabilities, no verifier.
    selection: Literal["majority", "best", "weighted", "confidence"] = "weighted"
    # With selection confidence: keep the eta % most confident samples (DeepConf-low 10, -high 90) and vote over
    # them weighted by confidence; window, tail and top-k define the confidence (rewards/confidence.py).
    eta: float = Field(90.0, gt=0.0, le=100.0)
    confidence_metric: ConfidenceMetric = "lowest_group"
    # The paper's 2,048-token windows fit its 10k-token traces; the bundled model's answers are 30-150 tokens.
    confidence_window: int = Field(32, ge=1, le=4096, strict=True)
    confidence_tail: int = Field(32, ge=1, le=4096, strict=True)
    top_logprobs: int = Field(20, ge=1, le=20, strict=True)
    # Online threshold (see best_of_n): set from this many first samples at the eta percentile.
    warmup: int = Field(4, ge=1, strict=True)
    # Adaptive sampling: stop drawing batches of `warmup` samples once the leading answer holds this share of the
    # confidence-weighted vote (DeepConf's tau, 0.95 in the paper); 1 = draw all n in one call.
    consensus: float = Field(1.0, gt=0.5, le=1.0)
    # DeepConf online: after the warm-up, every sample is its own request, aborted in the engine as soon as its
    # running group confidence falls below the warm-up threshold (policies that cannot: reported only).
    online: bool = Field(False, strict=True)
    # Early stopping (strategies/stopping.py, the same rule the bank replay measures): draw `round_size` samples at
    # a time and stop when the vote is settled (Adaptive-Consistency: the posterior probability that the leader is
    # the majority answer exceeds `stop_threshold`, from `stop_min_samples` samples on) or hopeless (after exactly
    # `hopeless_k` samples no answer repeats and every verifier score is below `hopeless_score`). Off by default.
    stopping: Literal["none", "beta", "dirichlet"] = "none"
    stop_threshold: float = Field(0.95, gt=0.5, lt=1.0)
    stop_prior: float = Field(1.0, gt=0.0, le=100.0)
    stop_min_samples: int = Field(2, ge=1, strict=True)
    hopeless_k: int | None = Field(None, ge=2, strict=True)
    hopeless_score: float = Field(0.2, gt=0.0, le=1.0)
    # 1 decides after every sample, as the replay does; larger rounds trade FLOPs for fewer engine calls.
    round_size: int = Field(1, ge=1, strict=True)
    # Under a budget that cut N on the worst case (every sample to max_tokens), draw again once the first samples'
    # real cost is metered, while the budget pays for more (best_of_n._top_up). False: one call, lower latency.
    top_up: bool = Field(True, strict=True)

    @field_validator("online")
    @classmethod
    def _online_after_warmup(cls, online: bool, info: ValidationInfo) -> bool:
        if not online:
            return online
        if info.data.get("selection") != "confidence":
            raise ValueError("needs selection 'confidence' (the threshold is a confidence)")
        n, warmup = info.data.get("n"), info.data.get("warmup")
        if n is not None and warmup is not None and warmup >= n:
            raise ValueError(f"needs warmup < n (warmup {warmup}, n {n}): no sample would be left to stop")
        return online

    @field_validator("stopping")
    @classmethod
    def _stopping_votes(cls, stopping: str, info: ValidationInfo) -> str:
        if stopping != "none" and info.data.get("selection") == "confidence":
            raise ValueError("cannot be combined with selection 'confidence' (its adaptive sampling is `consensus`)")
        return stopping

    @field_validator("hopeless_k")
    @classmethod
    def _hopeless_needs_scores(cls, k: int | None, info: ValidationInfo) -> int | None:
        if k is None:
            return k
        if info.data.get("selection") in ("majority", "confidence"):
            raise ValueError("needs verifier scores: use selection 'weighted' or 'best'")
        _at_most_n(k, info)
        return k

    @field_validator("round_size")
    @classmethod
    def _rounds_need_a_rule(cls, size: int, info: ValidationInfo) -> int:
        if size > 1 and info.data.get("stopping", "none") == "none" and info.data.get("hopeless_k") is None:
            raise ValueError("needs a stopping rule (stopping or hopeless_k): rounds without one only split the call")
        _at_most_n(size, info)
        return size


class _Beamed(_Stepped):
    # M: beam search keeps n / M survivors and expands each M times; DVTS grows n / M subtrees, M candidates each.
    beam_width: int = Field(4, ge=1, strict=True)

    @field_validator("beam_width")
    @classmethod
    def _width_divides_n(cls, width: int, info: ValidationInfo) -> int:
        return _divides_n(width, info, "n / beam_width survivors (or subtrees) are kept")


class BeamSearchParams(_Beamed):
    # k greedy steps rolled out from each candidate; the reward scores the END of the rollout.
    lookahead: int = Field(0, ge=0, le=8, strict=True)


class DVTSParams(_Beamed):
    pass


class RebaseParams(_Stepped):
    # Wu et al.'s paper text says T_b = 0.1; their released hyper-parameters (rebase.yaml), which produced the
    # reported numbers, use 0.2. With scores in [0, 1], 0.1 gives the best node up to e^10 times the width of the
    # worst, close to greedy; 0.2 keeps more diversity. We follow the code.
    balance_temperature: float = Field(0.2, gt=0.0, le=10.0)


class ParticleFilteringParams(_Stepped):
    # Weights are softmax(logit(score) / weight_temperature) over the live particles (Puri et al. 2025); lower is
    # greedier. (The sampling temperature is `temperature`, as for every strategy.)
    weight_temperature: float = Field(1.0, gt=0.0, le=100.0)
    resampling: Literal["multinomial", "systematic"] = "multinomial"
    # Resample only when the effective sample size falls below this share of the live particles; 1 = every round.
    ess_threshold: float = Field(1.0, gt=0.0, le=1.0)


class RevisionsParams(_Sampled):
    # L sequential revisions per chain; n / L chains run in parallel.
    chain_length: int = Field(4, ge=1, strict=True)

    @field_validator("chain_length")
    @classmethod
    def _length_divides_n(cls, length: int, info: ValidationInfo) -> int:
        return _divides_n(length, info, "n / chain_length parallel chains")


def validate_params(model: type[_Params], params: dict[str, Any] | None, max_n: int | None = None) -> _Params:
    if params is not None and not isinstance(params, dict):
        raise StrategyParamError("params", "must be an object")
    try:
        return model.model_validate(params or {}, context={"max_n": max_n})
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or "params"
        raise StrategyParamError(param, first["msg"].removeprefix("Value error, ")) from None


def sampling_temperature(params: _Sampled, request_temperature: float) -> float:
    """The strategy's own temperature, else the request's; a request at 0 gets search-and-learn's 0.8 (see above)."""
    if params.temperature is not None:
        return params.temperature
    return request_temperature if request_temperature > 0 else 0.8
