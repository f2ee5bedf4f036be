"""Probe only (issue 15): a vLLM API server whose token_embed requests READ the prefix cache.

vLLM 0.32's PoolingParams._merge_default_parameters sets skip_reading_prefix_cache=True for token_embed and
token_classify; this launcher leaves it False for token_embed, to measure what ALL pooling returns on a prefix hit
(benchmarks/reward_prefix_probe.py, benchmarks/reward_tail_depth.py). Same arguments as the vLLM server:
  python benchmarks/reward_prefix_probe_server.py --model DIR --runner pooling --convert embed \
      --pooler-config '{"task": "token_embed", "use_activation": false}' --enable-prefix-caching --block-size 32 ...
"""
import runpy
import sys

import vllm.pooling_params as pp

_orig = pp.PoolingParams._merge_default_parameters


def _merge(self, model_config):
    if self.task == "token_embed" and self.skip_reading_prefix_cache is None:
        self.skip_reading_prefix_cache = False
    _orig(self, model_config)


pp.PoolingParams._merge_default_parameters = _merge
if __name__ == "__main__":  # multiprocessing spawn re-imports this file as __mp_main__
    sys.argv = ["vllm.entrypoints.openai.api_server"] + sys.argv[1:]
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__")
