"""The learned PRM's pooling worker: vLLM's OpenAI server whose token_embed requests READ the prefix cache.

vLLM 0.32's `PoolingParams._merge_default_parameters` sets `skip_reading_prefix_cache=True` for token_embed
requests, so a candidate that extends one sent before is recomputed whole. Left False, the worker skips the cached
blocks and returns only the rows it computed, bitwise equal to the same rows of a whole pass (measured:
benchmarks/results/reward_prefix_findings.md); PRMClient treats them as the last rows and scores new steps from them.
A fresh `cache_salt` still forces a whole pass.

The patch is applied only if the method does what 0.32's does (checked on a token_embed PoolingParams); otherwise a
warning is logged and stock vLLM runs: it returns every row and PRMClient keeps whole passes.
Same arguments as `python -m vllm.entrypoints.openai.api_server`.
"""

from __future__ import annotations

import logging
import runpy
import sys

log = logging.getLogger("ttc.pooling_server")


def _stock_skips(pp: object) -> bool:
    """Whether the unpatched method behaves as measured: a token_embed request with no explicit flag gets True."""
    from types import SimpleNamespace

    from vllm.config import PoolerConfig

    params = pp.PoolingParams(task="token_embed")  # type: ignore[attr-defined]
    params._merge_default_parameters(SimpleNamespace(pooler_config=PoolerConfig(task="token_embed")))
    return params.skip_reading_prefix_cache is True


def patch() -> bool:
    """Makes token_embed read the prefix cache. False (and stock behaviour) when vLLM is not what was measured."""
    try:
        import vllm.pooling_params as pp

        original = pp.PoolingParams._merge_default_parameters
        if getattr(original, "_ttc_reads_prefix_cache", False):
            return True
        if not _stock_skips(pp):
            raise RuntimeError("token_embed does not default to skip_reading_prefix_cache=True")
    except Exception as exc:  # any mismatch: run stock vLLM, the client degrades to whole passes
        log.warning("not patching vLLM pooling (prefix-cache reads stay off for token_embed): %s", exc)
        return False

    def merge(self, model_config):  # type: ignore[no-untyped-def]
        # Only the flag's default changes; an explicit value (a plugin or caller's) is kept.
        if self.task == "token_embed" and self.skip_reading_prefix_cache is None:
            self.skip_reading_prefix_cache = False
        original(self, model_config)

    merge._ttc_reads_prefix_cache = True  # type: ignore[attr-defined]
    pp.PoolingParams._merge_default_parameters = merge
    return True


# At import, not under __main__: vLLM's spawned processes re-import this module as __mp_main__ and need it too.
PATCHED = patch()

if __name__ == "__main__":
    sys.argv = ["vllm.entrypoints.openai.api_server"] + sys.argv[1:]
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
