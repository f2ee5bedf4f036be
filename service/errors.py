"""What can go wrong with a request, in the gateway's own words. Serving and the budget raise these; only
`api/errors.py` knows which HTTP status and OpenAI error type each one is answered with."""

from __future__ import annotations


class ServiceError(Exception):
    """A request the gateway will not or cannot serve. `param` names the field to blame, `code` is the OpenAI-style
    error code clients match on, `retry_after_s` says when a retry may succeed (None: do not wait for it)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: int | None = None):
        super().__init__(message)
        self.message, self.param, self.code, self.retry_after_s = message, param, code, retry_after_s


class InvalidParameter(ServiceError):
    """The request itself is wrong or asks for what the configuration does not allow."""


class UnknownModel(ServiceError):
    """The request names a model this gateway does not serve."""


class NotAllowed(ServiceError):
    """The API key may not do this (e.g. a strategy outside its list)."""


class BudgetExceeded(InvalidParameter):
    """The request's budget can never pay for an answer (retrying the same request cannot help)."""

    def __init__(self, message: str, param: str | None = "X-TTC-Budget-FLOPs"):
        super().__init__(message, param=param, code="budget_exceeded")


class QuotaExhausted(ServiceError):
    """The API key's cumulative FLOPs quota cannot cover this request now; it may after `retry_after_s`."""


class Overloaded(ServiceError):
    """Admission control is full (running and queued requests at their bounds)."""


class Unavailable(ServiceError):
    """Something the request needs is down for now: workers, the quota store, or the gateway is draining."""


class UpstreamError(ServiceError):
    """A worker failed the request (5xx or a broken answer)."""


class UpstreamRejected(ServiceError):
    """A worker refused the request as invalid (its 4xx): the client's request, not the worker, is at fault."""


class DeadlineExceeded(ServiceError):
    """X-TTC-Deadline-Ms passed before an answer was ready."""
