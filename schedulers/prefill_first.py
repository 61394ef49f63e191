"""Prefill-first scheduling: the Orca / vLLM-V0 baseline that Sarathi-Serve beats.

Whenever a waiting prompt can be admitted, the step runs whole prompts only and
every running decode waits; decodes run only in steps with nothing to admit. Long
prompts arriving during decoding therefore stall every decode for the length of
their prefill ("generation stalls").
"""

from __future__ import annotations


class PrefillFirstPolicy:
    @staticmethod
    def prefill_only(has_waiting: bool, head_fits: bool, last_step_was_empty: bool) -> bool:
        """Whether this step should hold back decodes to run waiting prompts.

        `head_fits` is the engine's cheap guess that the first waiting prompt can be
        admitted; if it was wrong the step comes out empty, and the next one lets
        decodes run so the engine always makes progress.
        """
        return has_waiting and head_fits and not last_step_was_empty
