"""Scheduling policies, free of any engine import.

A policy sees requests as `ReqState` values and answers the few questions an
iteration-level scheduler asks: in what order do running requests take the token
budget, how large is the budget, may a waiting prompt be admitted, and should this
step run prefills only. `vllm_ext.engine.scheduling` applies the answers inside vLLM's
scheduler, which `vllm_ext.tools.driver` runs without a model for testing.
"""

from vllm_ext.schedulers.mnemosyne import MnemosyneConfig, MnemosynePolicy
from vllm_ext.schedulers.prefill_first import PrefillFirstPolicy
from vllm_ext.schedulers.request import ReqState
from vllm_ext.schedulers.sarathi import KV_ADMISSION, SarathiConfig, SarathiPolicy

__all__ = ["KV_ADMISSION", "MnemosyneConfig", "MnemosynePolicy", "PrefillFirstPolicy", "ReqState",
           "SarathiConfig", "SarathiPolicy"]
