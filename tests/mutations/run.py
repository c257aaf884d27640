"""Mutation check: break each promised behaviour on purpose and see a test fail.

Each mutant below is one deliberate breakage: an exact piece of source text
replaced by a broken version. For every mutant in turn, this script copies
the tree (the files git tracks or would track) to a temporary directory,
applies the breakage there, runs the tests named for it, and records which
test failed first. A mutant no test notices is reported as SURVIVED: either
a test is missing or it cannot fail.

    .venv/bin/python tests/mutations/run.py             # every mutant
    .venv/bin/python tests/mutations/run.py -k cancel   # those whose name has "cancel"
    .venv/bin/python tests/mutations/run.py --list      # names, files, tests

It is not part of `make test` (it runs the chosen tests once per mutant:
about half an hour on two cores); `make mutate` runs it. When the code
moves, a mutant whose text is no longer found is reported as NOT APPLIED,
so a stale mutant is seen, never silently skipped. It exits non-zero when
any mutant survived or could not be applied.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    old: str  # exact text, found exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids or files: keep each selection narrow


SLOW = "tests/test_e2e_slow.py"
ROBUST = "tests/test_robustness.py"
RECOVERY = "tests/test_e2e_recovery.py"
REGISTRY = "tests/test_registry.py"

MUTANTS = [
    # --- cancellation ---------------------------------------------------------
    Mutant(
        "worker ignores cancel",
        "worker/engine.py",
        "        job = self._by_request.get(target)\n",
        "        job = None\n",
        (
            f"{SLOW}::test_a_client_disconnect_cancels_the_generation_in_the_worker",
            "tests/test_e2e_chat.py::test_client_disconnect_cancels_generation",
        ),
    ),
    Mutant(
        "gateway never sends cancel",
        "gateway/rpc.py",
        "        if self.client.is_pending(self.id):\n"
        "            self.client.notify_cancel(self.id)",
        "        pass",
        (
            f"{SLOW}::test_a_client_disconnect_cancels_the_generation_in_the_worker",
            f"{SLOW}::test_request_timeout_is_504_and_cancels_in_the_worker",
        ),
    ),
    # --- memory ceiling -------------------------------------------------------
    Mutant(
        "memory limit never sent to the worker",
        "gateway/supervisor.py",
        '            "memory_limit_mb": self.settings.memory_limit_mb,\n',
        "",
        (f"{ROBUST}::test_workers_at_their_memory_ceiling_make_a_clean_503",),
    ),
    Mutant(
        "worker never over its memory limit",
        "worker/engine.py",
        '        return limit is not None and self.memory.get("active_memory_mb", 0.0) > limit',
        "        return False",
        (f"{ROBUST}::test_workers_at_their_memory_ceiling_make_a_clean_503",),
    ),
    Mutant(
        "out-of-memory step reported as an internal error",
        "worker/engine.py",
        "code = protocol.OUT_OF_MEMORY if _is_oom(exc) else protocol.INTERNAL_ERROR",
        "code = protocol.INTERNAL_ERROR",
        (f"{ROBUST}::test_an_out_of_memory_step_fails_only_that_step_and_the_worker_carries_on",),
    ),
    Mutant(
        "a failed step ends the worker",
        "worker/engine.py",
        "        self._generator.close()\n        mx.clear_cache()\n",
        "        os._exit(1)\n",
        (f"{ROBUST}::test_an_out_of_memory_step_fails_only_that_step_and_the_worker_carries_on",),
    ),
    # --- retries of what the client has not seen ------------------------------
    Mutant(
        "no retry after a worker dies under a request",
        "gateway/pool.py",
        "                if attempt < RETRIES_MAX and not generation.started:",
        "                if False:",
        (
            f"{SLOW}::test_requests_not_yet_seen_by_the_client_are_retried",
            "tests/test_chaos.py::test_every_request_during_a_kill_has_an_answer",
        ),
    ),
    Mutant(
        "held-back tokens count as seen",
        "gateway/rpc.py",
        "        return self.visible\n",
        "        return self.tokens_seen > 0\n",
        (f"{SLOW}::test_requests_not_yet_seen_by_the_client_are_retried",),
    ),
    Mutant(
        # (Dropping `not generation.started` from the retry condition is an
        # equivalent mutant: wait_started only raises before output is seen.)
        "shown tokens never mark a request as seen (streams retried after output)",
        "gateway/rpc.py",
        "            self.visible = bool(",
        "            self.visible = False and bool(",
        ("tests/test_chaos.py::test_every_request_during_a_kill_has_an_answer",),
    ),
    # --- circuit breaking, restarts, liveness ---------------------------------
    Mutant(
        "circuit never opens",
        "gateway/supervisor.py",
        "            if self.probing or len(self._crashes) > self.settings.max_restarts:",
        "            if self.probing:",
        (
            f"{RECOVERY}::test_a_worker_that_keeps_dying_fails_its_model_instead_of_looping",
            f"{ROBUST}::test_failed_model_fails_fast_then_a_probe_brings_it_back",
        ),
    ),
    Mutant(
        "half-open state reported as open",
        "gateway/pool.py",
        '        return "half_open" if any(w.probing for w in self.workers) else "open"',
        '        return "open"',
        (f"{ROBUST}::test_failed_model_fails_fast_then_a_probe_brings_it_back",),
    ),
    Mutant(
        "a worker alive without its pipes counted as a crash",
        "gateway/supervisor.py",
        '                reason = "lost"\n',
        '                reason = "crash"\n',
        (f"{ROBUST}::test_a_worker_that_lives_on_without_its_pipes_is_killed_and_counted_as_lost",),
    ),
    Mutant(
        "restart back-off not capped",
        "gateway/supervisor.py",
        "2**counted, self.settings.restart_backoff_max)",
        "2**counted, 10**9)",
        ("tests/test_supervisor.py",),
    ),
    Mutant(
        "stall detection off",
        "gateway/supervisor.py",
        '        if health.get("active") and now - progress[1] > limit:',
        "        if False:",
        (f"{ROBUST}::test_a_stalled_worker_is_killed_and_its_requests_get_a_clean_error",),
    ),
    Mutant(
        "heartbeat without a timeout",
        "gateway/supervisor.py",
        "            return await client.call(protocol.HEALTH, timeout=timeout)\n        except",
        "            return await client.call(protocol.HEALTH)\n        except",
        (f"{RECOVERY}::test_sigstopped_worker_is_detected_by_heartbeat_and_replaced",),
    ),
    Mutant(
        "no SIGTERM step when stopping a worker",
        "gateway/supervisor.py",
        "            _signal(proc, signal.SIGTERM)\n",
        "",
        ("tests/test_e2e_shutdown.py::test_a_worker_deaf_to_every_request_to_stop_is_sigkilled",),
    ),
    Mutant(
        "restart reason of an out-of-memory abort lost",
        "gateway/supervisor.py",
        '        return "oom"\n',
        '        return "crash"\n',
        (f"{ROBUST}::test_an_out_of_memory_abort_is_a_clean_error_and_counted_as_oom",),
    ),
    # --- admission ------------------------------------------------------------
    Mutant(
        "queue timeout never fires",
        "gateway/pool.py",
        "            done, _ = await asyncio.wait({future}, timeout=self.settings.queue_timeout)",
        "            done, _ = await asyncio.wait({future})",
        (f"{SLOW}::test_queue_gauges_queue_full_and_queue_timeout",),
    ),
    Mutant(
        "Retry-After always 1",
        "gateway/pool.py",
        "        if len(recent) < 2:\n            return 1",
        "        if True:\n            return 1",
        ("tests/test_supervisor.py",),
    ),
    Mutant(
        "per-key limit not enforced",
        "gateway/serving.py",
        "        if count >= self.limit:\n            return False",
        "        if False:\n            return False",
        (f"{ROBUST}::test_per_key_concurrency_limit_is_429",),
    ),
    # --- chat mapping ---------------------------------------------------------
    Mutant(
        "system, developer and tool content blanked",
        "gateway/chat.py",
        '"content": _content(message, index)}',
        '"content": _content(message, index) if role in ("user", "assistant") else ""}',
        ("tests/test_e2e_api.py::test_every_role_and_tool_call_reaches_the_template",),
    ),
    Mutant(
        "assistant tool_calls dropped",
        "gateway/chat.py",
        "    if message.tool_calls:\n",
        "    if False:\n",
        ("tests/test_e2e_api.py::test_every_role_and_tool_call_reaches_the_template",),
    ),
    Mutant(
        "reasoning_effort not passed to the template",
        "gateway/shared.py",
        '    return {"reasoning_effort": effort, "enable_thinking": effort != "none"}',
        '    return {"reasoning_effort": effort}',
        (
            "tests/test_e2e_claims.py::"
            "test_reasoning_effort_and_chat_template_kwargs_reach_the_template",
        ),
    ),
    Mutant(
        "--max-tokens-cap ignored",
        "gateway/shared.py",
        "        if max_tokens is not None and max_tokens > cap:",
        "        if False:",
        ("tests/test_e2e_claims.py::test_max_tokens_cap_refuses_more_and_is_the_default",),
    ),
    Mutant(
        "top_k not passed on",
        "gateway/shared.py",
        '    "top_k",\n',
        "",
        (
            "tests/test_e2e_claims.py::test_samplers_that_leave_one_candidate_make_the_output_greedy",
        ),
    ),
    Mutant(
        "repetition_penalty not passed on",
        "gateway/shared.py",
        '    "repetition_penalty",\n',
        "",
        ("tests/test_e2e_claims.py::test_repetition_penalty_changes_a_greedy_reply",),
    ),
    Mutant(
        "n up to 128",
        "gateway/schemas.py",
        "le=16",
        "le=128",
        ("tests/test_e2e_claims.py::test_unsupported_fields_are_refused_by_name",),
    ),
    Mutant(
        "auto tool calls not parsed",
        "worker/requests.py",
        "    return ToolMode(tools, parser=tokenizer.tool_parser), None",
        "    return None, None",
        (
            "tests/test_e2e_claims.py::"
            "test_auto_tool_calls_in_the_models_own_format_come_back_as_tool_calls",
        ),
    ),
    Mutant(
        "/health says 200 when a model has failed",
        "gateway/ops.py",
        "200 if pool.ready else 503",
        "200",
        (f"{RECOVERY}::test_a_worker_that_keeps_dying_fails_its_model_instead_of_looping",),
    ),
    # --- stop strings and usage -----------------------------------------------
    Mutant(
        "stop strings not held back while forming",
        "worker/job.py",
        "        hold = 0 if finishing else _held_back(buf, self.stops)",
        "        hold = 0",
        ("tests/test_worker.py", "tests/test_job_output.py"),
    ),
    Mutant(
        "completion tokens miscounted",
        "worker/job.py",
        '            "completion_tokens": self.n_tokens,',
        '            "completion_tokens": max(0, self.n_tokens - 1),',
        ("tests/test_worker.py",),
    ),
    # --- metrics --------------------------------------------------------------
    Mutant(
        "request_success_total never counted",
        "gateway/serving.py",
        '            m.request_success.labels(model, result["finish_reason"]).inc()\n',
        "",
        ("tests/test_e2e_chat.py::test_metrics_exposition",),
    ),
    Mutant(
        "generation tokens never counted",
        "gateway/serving.py",
        "            m.generation_tokens.labels(model).inc(n)\n",
        "",
        ("tests/test_e2e_chat.py::test_metrics_exposition",),
    ),
    Mutant(
        "running gauge never raised",
        "gateway/serving.py",
        "        self.metrics.num_requests_running.labels(self.model).inc()\n",
        "",
        (f"{SLOW}::test_queue_gauges_queue_full_and_queue_timeout",),
    ),
    Mutant(
        "queue time never observed",
        "gateway/pool.py",
        "            self.metrics.request_queue_time.labels(self.spec.name).observe(\n"
        "                time.perf_counter() - started",
        "            (lambda _: None)(\n                time.perf_counter() - started",
        (f"{SLOW}::test_queue_gauges_queue_full_and_queue_timeout",),
    ),
    Mutant(
        "protocol errors counted only when the worker ends",
        "gateway/rpc.py",
        "        self._on_protocol_error()\n",
        "",
        (f"{ROBUST}::test_stray_lines_on_the_pipe_are_counted_not_fatal",),
    ),
    Mutant(
        "restart counter never moves",
        "gateway/supervisor.py",
        "            self.restarts += 1\n"
        "            self.metrics.worker_restarts.labels(self.spec.name, self.id, reason).inc()\n",
        "            self.restarts += 1\n",
        (f"{RECOVERY}::test_restart_reasons_of_workers_that_never_serve",),
    ),
    Mutant(
        "client disconnects not counted",
        "gateway/serving.py",
        "        tracker.metrics.client_disconnects.labels(tracker.model).inc()\n",
        "",
        (f"{SLOW}::test_a_client_disconnect_cancels_the_generation_in_the_worker",),
    ),
    # --- access ---------------------------------------------------------------
    Mutant(
        "any bearer token accepted",
        "gateway/middleware.py",
        "            found |= hmac.compare_digest(token, key)",
        "            found = True",
        (f"{ROBUST}::test_api_keys",),
    ),
    # --- framing and the CLI --------------------------------------------------
    Mutant(
        "a frame exactly one byte over the cap accepted",
        "worker/protocol.py",
        "            if end - start > self._max:",
        "            if end - start > self._max + 1:",
        ("tests/test_fuzz.py::test_frame_buffer_on_arbitrary_chunks",),
    ),
    Mutant(
        "environment variables misnamed",
        "gateway/cli.py",
        '    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")',
        '    return ENV_PREFIX + flag.lstrip("-").upper()',
        ("tests/test_cli.py",),
    ),
    Mutant(
        "a stopping engine still starts the requests of its last turn",
        "worker/engine.py",
        "        elif new_jobs:\n            self._insert(new_jobs)",
        "        if new_jobs:\n            self._insert(new_jobs)",
        ("tests/test_commands.py",),
    ),
    Mutant(
        "a request prepared just after a shutdown is never answered",
        "worker/engine.py",
        "            self._refuse(new_jobs)  # prepared just after the engine was told to stop",
        "            pass",
        ("tests/test_commands.py",),
    ),
    Mutant(
        "a request cancelled while it waits to be prepared is neither answered nor dropped",
        "worker/server.py",
        "            if request_id in self._cancelled:",
        "            if False:",
        ("tests/test_commands.py",),
    ),
    Mutant(
        "a sharded worker's followers get a request's prepared job, not its params",
        "worker/commands.py",
        "        return [self.name, self.job.request_id, self.job.source]",
        "        return [self.name, self.job.request_id, self.job.params]",
        ("tests/test_commands.py",),
    ),
    # --- many models ------------------------------------------------------------
    Mutant(
        "a busy model evicted",
        "gateway/eviction.py",
        "if r.evictable and not r.busy and not r.pinned",
        "if r.evictable and not r.pinned",
        (f"{REGISTRY}::test_busy_model_is_not_evicted_and_the_new_one_waits_for_it",),
    ),
    Mutant(
        "the most recently used model evicted",
        "gateway/eviction.py",
        "        key=lambda r: r.last_used,\n",
        "        key=lambda r: -r.last_used,\n",
        (f"{REGISTRY}::test_lru_idle_model_is_evicted_under_the_count_limit",),
    ),
    Mutant(
        "a load per waiting request",
        "gateway/registry.py",
        "        if model.status is not Status.UNLOADED or self._closing:",
        "        if model.status not in (Status.UNLOADED, Status.LOADING) or self._closing:",
        (f"{REGISTRY}::test_twenty_concurrent_first_requests_make_one_load",),
    ),
    Mutant(
        "a failed load leaves its waiters waiting",
        "gateway/registry.py",
        "            pool.fail_waiters(error)\n",
        "",
        (
            f"{REGISTRY}::test_a_crash_during_load_reaches_every_waiter_and_the_model_stays_unloaded",
            # A crash after spawning also reaches waiters through the back-off
            # (_stop asks for a load, which answers with the failure); a load
            # refused before spawning has only this call.
            f"{REGISTRY}::test_too_large_model_is_refused_at_once",
        ),
    ),
    Mutant(
        "idle models never unloaded",
        "gateway/registry.py",
        "                if due <= now:",
        "                if False:",
        (f"{REGISTRY}::test_keep_alive_unloads_an_idle_model_and_a_request_can_extend_it",),
    ),
    Mutant(
        "a model larger than the budget loaded anyway",
        "gateway/eviction.py",
        "    if budget is not None and need > budget:\n        return Plan(",
        "    if False:\n        return Plan(",
        (f"{REGISTRY}::test_too_large_model_is_refused_at_once",),
    ),
    # --- speculation and admission (this round) --------------------------------
    Mutant(
        "batch speculation keeps every row's rejected drafts but the common ones",
        "worker/batch_speculation.py",
        "        if any(extra):\n",
        "        if False:\n",
        (
            "tests/test_batch_speculation.py::test_trimming_rows_leaves_each_the_cache_of_its_kept_entries",
            "tests/test_batch_speculation.py::test_the_batch_drafts_and_gives_the_same_tokens",
        ),
    ),
    Mutant(
        "the batch never drafts",
        "worker/decoder.py",
        "        if speculate_in_batch and speculation is not None and speculation.enabled:\n",
        "        if False:\n",
        ("tests/test_single_sequence.py::test_requests_in_the_batch_speculate_and_answer_alike",),
    ),
    Mutant(
        "batch speculation trims each row by another row's rejected count",
        "worker/batch_speculation.py",
        "        rolled = trim_rows(rows.cache, rejected)\n",
        "        rolled = trim_rows(rows.cache, rejected[::-1])\n",
        ("tests/test_batch_speculation.py::test_the_batch_drafts_and_gives_the_same_tokens",),
    ),
    Mutant(
        "batch speculation accepts greedy drafts without comparing them",
        "worker/batch_speculation.py",
        "                a = accepted_prefix(chosen, drafts[i])\n",
        "                a = len(drafts[i])\n",
        ("tests/test_batch_speculation.py::test_the_batch_drafts_and_gives_the_same_tokens",),
    ),
    Mutant(
        "batch speculation verifies without the request's logits processors",
        "worker/batch_speculation.py",
        "                    processors=processors[i],\n",
        "                    processors=(),\n",
        ("tests/test_batch_speculation.py::test_the_batch_drafts_and_gives_the_same_tokens",),
    ),
    Mutant(
        "batch speculation returns a draft's logprobs for the pending token",
        "worker/batch_speculation.py",
        "            [(v, lp), *zip(d, k, strict=False)]\n",
        "            [(v, k[0] if k else lp), *zip(d, k, strict=False)]\n",
        ("tests/test_single_sequence.py::test_requests_in_the_batch_speculate_and_answer_alike",),
    ),
    # --- a draft model -----------------------------------------------------------
    Mutant(
        "the draft model's cache keeps its rejected drafts",
        "worker/draft_model.py",
        "        if agreed < len(fed):\n",
        "        if False:\n",
        ("tests/test_draft_model.py::test_the_draft_cache_drops_rejected_tokens",),
    ),
    Mutant(
        "the draft model feeds a whole chunk of the prompt at once, past the limit",
        "worker/draft_model.py",
        "            take = min(limit, missing)\n",
        "            take = missing\n",
        (
            "tests/test_draft_model.py::"
            "test_the_draft_model_catches_up_on_a_long_prompt_a_chunk_at_a_time",
        ),
    ),
    Mutant(
        "a draft model proposes its padded vocabulary rows",
        "worker/draft_model.py",
        "        return logits[:, : self.vocab] if 0 < self.vocab < logits.shape[-1] else logits\n",
        "        return logits\n",
        ("tests/test_draft_model.py::test_a_draft_model_never_proposes_rows_past_the_tokenizer",),
    ),
    Mutant(
        "a draft model for every model overrides one named for a model given before it",
        "gateway/cli.py",
        "    for item in sorted(items, key=_names_a_model):\n",
        "    for item in items:\n",
        ("tests/test_draft_model.py::test_a_draft_named_for_a_model_wins_over_one_for_all",),
    ),
    Mutant(
        "health counts a request's drafts only once it ends",
        "worker/decoder.py",
        "        if single is not None:\n            _add_drafts(stats, single)\n",
        "",
        ("tests/test_draft_model.py::test_health_counts_the_drafts_of_a_request_still_running",),
    ),
    Mutant(
        "a draft model of another vocabulary is taken",
        "worker/engine.py",
        "        if draft_tokenizer.get_vocab() != tokenizer.get_vocab():\n",
        "        if False:\n",
        ("tests/test_draft_model.py::test_a_draft_model_of_another_vocabulary_fails_the_load",),
    ),
    Mutant(
        "a loaded draft model never drafts",
        "worker/single.py",
        "    if speculation.draft_model is not None:\n",
        "    if False:\n",
        ("tests/test_draft_model.py::test_a_gateway_drafts_with_a_draft_model_and_counts_it",),
    ),
    Mutant(
        "a request alone with nothing to draft waits for its token before the next pass",
        "worker/single.py",
        "        if isinstance(self.drafter, NgramDrafter) and not self.drafter.has_match():\n",
        "        if False:\n",
        (
            "tests/test_single_sequence.py::"
            "test_a_step_with_nothing_to_draft_queues_the_next_pass_before_reading",
        ),
    ),
    Mutant(
        "the gateway does not pass the draft model to its workers",
        "gateway/supervisor.py",
        '            params["draft_path"] = self.spec.draft_path\n',
        "            pass\n",
        ("tests/test_draft_model.py::test_a_gateway_drafts_with_a_draft_model_and_counts_it",),
    ),
    Mutant(
        "a memory-ceiling refusal counted as a busy worker",
        "gateway/pool.py",
        '    return "worker_memory" if memory or exc.code == OUT_OF_MEMORY else "worker_busy"\n',
        '    return "worker_memory" if exc.code == OUT_OF_MEMORY else "worker_busy"\n',
        (f"{ROBUST}::test_workers_at_their_memory_ceiling_make_a_clean_503",),
    ),
    # --- the CPU: its BLAS and float32 weights ---------------------------------
    Mutant(
        "OpenBLAS loaded where MLX cannot see it",
        "worker/cpublas.py",
        "            library = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)\n",
        "            library = ctypes.CDLL(name)\n",
        ("tests/test_float_weights.py::test_importing_the_worker_first_puts_mlx_on_openblas",),
    ),
    Mutant(
        "widened weights lose their bias",
        "worker/float_weights.py",
        "        layer.bias = module.bias\n",
        "        pass\n",
        (
            "tests/test_float_weights.py::"
            "test_always_widens_every_quantized_layer_to_its_exact_float32_weights",
        ),
    ),
    Mutant(
        "auto widens without a fast BLAS",
        "worker/float_weights.py",
        "    return on_cpu and fast_blas and nbytes <= AUTO_MAX_BYTES\n",
        "    return on_cpu and nbytes <= AUTO_MAX_BYTES\n",
        ("tests/test_float_weights.py::test_auto_widens_on_the_cpu_with_a_fast_blas_when_it_fits",),
    ),
    Mutant(
        "the gateway does not pass --float-weights to its workers",
        "gateway/supervisor.py",
        '            "float_weights": self.settings.float_weights,\n',
        "",
        (
            "tests/test_real_model.py::"
            "test_float_weights_never_serves_the_quantized_kernels_token_for_token",
        ),
    ),
    # --- starting a burst together ----------------------------------------------
    Mutant(
        "an idle engine starts a burst's first request alone",
        "worker/engine.py",
        "        if not self._jobs:\n            self._gather(turn)\n",
        "",
        (
            "tests/test_burst.py::test_clients_answered_together_are_waited_for_and_start_together",
            "tests/test_burst.py::test_requests_still_being_tokenized_are_waited_for",
        ),
    ),
    Mutant(
        "a client that came back is awaited again",
        "worker/engine.py",
        "        self.burst.started(len(jobs))\n",
        "",
        ("tests/test_burst.py::test_the_clients_that_came_back_are_not_awaited_again",),
    ),
    # --- sampling ----------------------------------------------------------------
    Mutant(
        "unseeded requests each get a sampler of their own (rows sampled one by one)",
        "worker/sampling.py",
        "    if params.seed is not None:\n        return _sampler(params)\n",
        "    if True:\n        return _sampler(params)\n",
        ("tests/test_sampling.py::test_unseeded_requests_with_the_same_settings_share_a_sampler",),
    ),
    Mutant(
        "seeded requests share a sampler (and a random stream)",
        "worker/sampling.py",
        "    if params.seed is not None:\n        return _sampler(params)\n",
        "",
        (
            "tests/test_sampling.py::test_a_seeded_request_has_a_sampler_of_its_own",
            "tests/test_worker.py::test_seed_reproduces_output_even_when_batched",
        ),
    ),
    Mutant(
        "a worker is called ready before its first heartbeat",
        "gateway/supervisor.py",
        "            self._observe(await self._heartbeat(client))\n",
        "            pass\n",
        (
            "tests/test_real_model.py::"
            "test_float_weights_never_serves_the_quantized_kernels_token_for_token",
        ),
    ),
    Mutant(
        "a batch mixing samplers is sampled row by row",
        "worker/mlxlm.py",
        "        batch.samplers = [grouped] * len(samplers)\n",
        "        pass\n",
        (
            "tests/test_sampling.py::"
            "test_a_mixed_batch_samples_a_group_at_a_time_and_draws_what_rows_alone_draw",
        ),
    ),
    Mutant(
        "grouped samples come back in group order, not row order",
        "worker/mlxlm.py",
        "        return mx.concatenate(parts, axis=0)[self.inverse]\n",
        "        return mx.concatenate(parts, axis=0)\n",
        (
            "tests/test_sampling.py::"
            "test_a_grouped_call_samples_each_row_with_its_own_sampler_in_row_order",
        ),
    ),
    Mutant(
        "the rows' own samplers are not put back after a grouped step",
        "worker/mlxlm.py",
        "        finally:\n            batch.samplers = samplers\n",
        "        finally:\n            pass\n",
        (
            "tests/test_sampling.py::"
            "test_rows_leaving_a_mixed_batch_leave_the_others_their_own_samplers",
        ),
    ),
    Mutant(
        "a kept prompt cache stays a lazy slice of the batch's KV",
        "worker/engine.py",
        "        mx.async_eval([c.state for c in cache])\n",
        "        pass\n",
        ("tests/test_prefix_cache.py::test_kept_caches_hold_only_their_own_rows",),
    ),
    Mutant(
        "tokens held between notifications are not counted in the delta",
        "worker/engine.py",
        '                delta["tokens"] = 1 + held\n',
        '                delta["tokens"] = 1\n',
        (
            "tests/test_e2e_api.py::"
            "test_a_streamed_reply_carries_every_token_whatever_went_out_together",
        ),
    ),
    Mutant(
        "tokens held between notifications are never read",
        "worker/job.py",
        "            self.output.add([t for t in self.held if t not in eos])\n",
        "            pass\n",
        (
            "tests/test_job_output.py::"
            "test_tokens_held_and_read_together_give_the_text_read_one_by_one",
            "tests/test_e2e_api.py::"
            "test_a_streamed_reply_carries_every_token_whatever_went_out_together",
        ),
    ),
    Mutant(
        "the compare's round ratios are taken against the wrong runs",
        "gateway/bench.py",
        '"gateway_over_engine": _per_round(gateway, engine),',
        '"gateway_over_engine": _per_round(gateway, server),',
        ("tests/test_bench.py::test_compare_runs_engine_gateway_and_mlx_lm_server",),
    ),
    Mutant(
        "a reply ending before any text counts as failed in the bench",
        "gateway/bench.py",
        "(outcome.ttft is not None or outcome.done)",
        "outcome.ttft is not None",
        ("tests/test_bench.py::test_a_reply_ending_before_any_text_is_complete_not_failed",),
    ),
    Mutant(
        "an unloaded quantized model is budgeted by its size on disk",
        "gateway/registry.py",
        "        held = model.weights_bytes or model.quantized.in_memory(\n",
        "        held = model.weights_bytes or model.size_bytes or model.quantized.in_memory(\n",
        (f"{REGISTRY}::test_a_quantized_model_is_budgeted_as_its_workers_will_hold_it",),
    ),
    Mutant(
        "a layer's own quantization width is ignored",
        "gateway/weights.py",
        '            return int(own["bits"])\n',
        '            return int(quant["bits"])\n',
        ("tests/test_weights.py::test_the_widened_size_is_what_the_worker_widens",),
    ),
    Mutant(
        "the workers' reported backend is ignored",
        "gateway/registry.py",
        '                if backend and backend.get("device"):\n'
        "                    return backend\n",
        "                pass\n",
        (f"{REGISTRY}::test_a_quantized_model_is_budgeted_as_its_workers_will_hold_it",),
    ),
    Mutant(
        "a GGUF file's float matrices are counted as widened",
        "gateway/weights.py",
        "        if len(info.dims) == 2 and info.ggml_type not in gguf.FLOAT_TENSOR_TYPES:\n",
        "        if len(info.dims) == 2:\n",
        ("tests/test_real_model.py::test_unquantized_gguf_files_load_as_they_are",),
    ),
    Mutant(
        "a GGUF array of fixed-size items is skipped item by item",
        "worker/gguf.py",
        "        if item in sizes:\n",
        "        if False:\n",
        (
            "tests/test_weights.py::test_a_damaged_gguf_file_is_read_at_once_and_leaves_the_disk_size",
        ),
    ),
    Mutant(
        "the worker ignores --blas-threads",
        "worker/engine.py",
        '                params.get("blas_threads"),\n',
        '                "auto",\n',
        ("tests/test_blas_threads.py::test_the_worker_reports_the_count_its_matmuls_run_on",),
    ),
    Mutant(
        "more BLAS threads are taken when faster at any one batch",
        "worker/blas_threads.py",
        "        if all(t * margin <= times[taken][batch] for batch, t in times[n].items()):\n",
        "        if any(t * margin <= times[taken][batch] for batch, t in times[n].items()):\n",
        ("tests/test_blas_threads.py",),
    ),
    Mutant(
        "a replacement worker times the BLAS threads again",
        "gateway/supervisor.py",
        '            "blas_threads": self.measured_blas_threads or self.settings.blas_threads,\n',
        '            "blas_threads": self.settings.blas_threads,\n',
        (
            "tests/test_blas_threads.py::"
            "test_a_replacement_worker_is_given_the_count_its_predecessor_timed",
        ),
    ),
    Mutant(
        "a model slow on every BLAS thread is timed on fewer",
        "worker/blas_threads.py",
        "_step_time(model, steps[batch], caches[batch]) > SLOW_STEP_S:",
        "_step_time(model, steps[batch], caches[batch]) > math.inf:",
        ("tests/test_blas_threads.py::test_a_model_slow_on_every_thread_keeps_them_all_untimed",),
    ),
    Mutant(
        "a worker that may not time keeps the count a model before left",
        "worker/blas_threads.py",
        "    cpublas.set_threads(initial)  # a model loaded before may have changed it\n",
        "",
        ("tests/test_blas_threads.py",),
    ),
    Mutant(
        "the bench client never keeps a connection",
        "gateway/loadclient.py",
        "            if reply.complete and connection.finish():\n",
        "            if False:\n",
        ("tests/test_loadclient.py::test_a_chunked_stream_is_read_whole_and_its_connection_kept",),
    ),
    Mutant(
        "the bench client fails on a kept connection closed as the request goes out",
        "gateway/loadclient.py",
        "            with contextlib.suppress(LoadError):\n"
        "                return connection, await self._send(connection, request, payload)\n",
        "            return connection, await self._send(connection, request, payload)\n",
        ("tests/test_loadclient.py::test_a_kept_connection_the_server_closed_is_replaced",),
    ),
    Mutant(
        "the bench client takes a cut-off reply as whole",
        "gateway/loadclient.py",
        '                raise LoadError(f"the reply was cut off: {exc}") from None\n',
        "                return\n",
        ("tests/test_loadclient.py::test_a_reply_cut_off_mid_stream_fails_with_a_reason",),
    ),
    Mutant(
        "the batch splits off every row's logprobs",
        "worker/mlxlm.py",
        "        b._next_logprobs = [logprobs[i] if w else None for i, w in enumerate(rows)]\n",
        "        b._next_logprobs = [logprobs[i] for i, w in enumerate(rows)]\n",
        (
            "tests/test_single_sequence.py::test_the_batch_keeps_logprobs_only_for_requests_that_read_them",
        ),
    ),
    Mutant(
        "the lean batch step skips the logits processors",
        "worker/mlxlm.py",
        "        if any(b.logits_processors):\n"
        "            logits, contexts = _processed(b, fed, logits)\n",
        "",
        (
            "tests/test_single_sequence.py::test_the_batch_keeps_logprobs_only_for_requests_that_read_them",
        ),
    ),
    Mutant(
        "a request reading logprobs gets none in the batch",
        "worker/engine.py",
        "                logprobs=[j.logprobs is not None for j in jobs],\n",
        "                logprobs=[False for j in jobs],\n",
        ("tests/test_single_sequence.py::test_requests_in_the_batch_speculate_and_answer_alike",),
    ),
    Mutant(
        "a request alone keeps logprobs it never reads",
        "worker/decoder.py",
        "                logprobs=uids[0] not in self._plain,\n",
        "",
        (
            "tests/test_single_sequence.py::"
            "test_a_request_alone_keeps_logprobs_only_if_it_reads_them",
        ),
    ),
    Mutant(
        "bench load runs send no API key",
        "gateway/bench.py",
        "    headers = auth_headers(args)\n    reports = []\n",
        "    headers = {}\n    reports = []\n",
        ("tests/test_e2e_prompt_cache_disk.py::test_bench_load_runs_carry_the_api_key",),
    ),
    Mutant(
        "mlx-lm alone at one stream measures a sample of the requests",
        "gateway/bench.py",
        "        replies = [one() for _ in range(requests)]\n",
        "        replies = [one() for _ in range(min(requests, 8))]\n",
        ("tests/test_bench.py::test_mlx_lm_alone_counts_one_stream_like_the_http_runs",),
    ),
    Mutant(
        "the body scanner dies of a terminal's Ctrl-C with a traceback",
        "gateway/bodyscan.py",
        "    signal.signal(signal.SIGINT, signal.SIG_IGN)\n",
        "",
        ("tests/test_e2e_shutdown.py::test_ctrl_c_at_a_terminal_stops_the_body_scanner_quietly",),
    ),
    Mutant(
        "a worker's refusal names no field",
        "gateway/errors.py",
        '    param = exc.data.get("param") if isinstance(exc.data, dict) else None\n',
        "    param = None\n",
        ("tests/test_hostile.py::test_a_client_mistake_is_a_400_naming_the_field",),
    ),
    Mutant(
        "a worker's refusal names the worker's param, not the API's",
        "gateway/errors.py",
        "    return aliases.get(param, param) if isinstance(param, str) else None\n",
        "    return param if isinstance(param, str) else None\n",
        ("tests/test_hostile.py::test_a_mistake_the_worker_finds_names_the_apis_own_field",),
    ),
    Mutant(
        "a union field's error is its first member's",
        "gateway/errors.py",
        "        if not _mismatch(error):\n",
        "        if False:\n",
        ("tests/test_hostile.py::test_a_union_field_says_what_its_members_found",),
    ),
    Mutant(
        "a schema the worker cannot compile is blamed on no field",
        "worker/requests.py",
        '            exc.data = {"param": param}\n',
        "            pass\n",
        ("tests/test_hostile.py::test_a_client_mistake_is_a_400_naming_the_field",),
    ),
    Mutant(
        "Anthropic tool_choice without tools is ignored",
        "gateway/messages.py",
        '    if not tools and choice is not None and choice.type in ("any", "tool"):\n',
        "    if False:\n",
        ("tests/test_hostile.py::test_anthropic_tool_choice_without_tools_is_a_400",),
    ),
    Mutant(
        "an Anthropic prefill starts a new turn",
        "gateway/messages.py",
        '        params["continue_final_message"] = True\n',
        "        pass\n",
        (
            "tests/test_real_model.py::test_an_anthropic_prefill_is_continued_as_mlx_lm_continues_it",
        ),
    ),
    Mutant(
        "a prefilled reply loses its lead space",
        "worker/requests.py",
        '    return "messages" not in params or bool(params.get("continue_final_message"))\n',
        '    return "messages" not in params\n',
        (
            "tests/test_real_model.py::test_an_anthropic_prefill_is_continued_as_mlx_lm_continues_it",
        ),
    ),
    Mutant(
        "request headers have no size cap",
        "gateway/connections.py",
        "                if self._header_bytes > MAX_HEADER_BYTES"
        " and not self.transport.is_closing():\n",
        "                if False:\n",
        ("tests/test_hostile.py::test_headers_past_the_cap_are_a_431_with_a_request_id",),
    ),
    Mutant(
        "a reply from below the application has no request id",
        "gateway/connections.py",
        '            f"x-request-id: {rid}\\r\\n"\n',
        "",
        ("tests/test_hostile.py::test_headers_past_the_cap_are_a_431_with_a_request_id",),
    ),
    Mutant(
        "a request that did not wait has no queue time",
        "gateway/pool.py",
        "                self.metrics.request_queue_time.labels(self.spec.name).observe(0.0)\n",
        "",
        ("tests/test_e2e_chat.py::test_metrics_exposition",),
    ),
    Mutant(
        "an engine left idle by cancels reports the batch it had",
        "worker/engine.py",
        "            if not self._jobs:\n"
        "                # Idle now, with no step to refresh them: the memory and KV\n",
        "            if False:\n"
        "                # Idle now, with no step to refresh them: the memory and KV\n",
        ("tests/test_hostile.py::test_abandoned_requests_free_the_workers_and_the_queue",),
    ),
    Mutant(
        "a second Ctrl-C is uvicorn's force quit",
        "gateway/cli.py",
        "                if self._interrupts == 1:\n",
        "                if False:\n",
        ("tests/test_e2e_shutdown.py::test_a_second_ctrl_c_ends_the_grace_cleanly",),
    ),
    Mutant(
        "bytes that are not HTTP get uvicorn's plain-text 400",
        "gateway/connections.py",
        "        def send_400_response(self, msg: str) -> None:\n",
        "        def _unused_400_response(self, msg: str) -> None:\n",
        ("tests/test_hostile.py::test_bytes_that_are_not_http_get_a_json_400_with_a_request_id",),
    ),
]


def tree_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    return [f for f in out.decode().split("\0") if f and (ROOT / f).is_file()]


def copy_tree(dest: Path) -> None:
    for rel in tree_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)


def apply(tree: Path, mutant: Mutant) -> str | None:
    """Break the copy; None on success, else why it could not be applied."""
    path = tree / mutant.file
    if not path.exists():
        return f"{mutant.file} does not exist"
    text = path.read_text()
    found = text.count(mutant.old)
    if found != 1:
        return f"text found {found} times in {mutant.file}"
    path.write_text(text.replace(mutant.old, mutant.new))
    return None


FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_one(mutant: Mutant, python: str, timeout: float) -> tuple[str, float]:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        problem = apply(tree, mutant)
        if problem is not None:
            return f"NOT APPLIED ({problem})", 0.0
        cmd = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mutant.tests]
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
        # Its own process group, so that a timeout or Ctrl-C ends the
        # gateways and workers the tests started along with pytest.
        proc = subprocess.Popen(
            cmd,
            cwd=tree,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return f"TIMEOUT after {timeout:.0f}s (no test failed in time)", timeout
        except BaseException:
            _kill_group(proc)
            raise
        elapsed = time.monotonic() - started
        if proc.returncode == 0:
            return "SURVIVED", elapsed
        if proc.returncode == 5:
            return "NO TESTS COLLECTED", elapsed
        failed = FAILED.findall(output)
        if failed:
            return failed[0], elapsed
        return f"exit {proc.returncode}: {output.strip().splitlines()[-1:]}", elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only mutants whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument(
        "--check", action="store_true", help="only check that every mutant still applies"
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs pytest")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if args.k.lower() in m.name.lower()]
    if args.list:
        for m in chosen:
            print(f"{m.name}\n    {m.file}\n    " + "\n    ".join(m.tests))
        return 0
    if args.check:
        stale = 0
        for m in chosen:
            found = (ROOT / m.file).read_text().count(m.old) if (ROOT / m.file).exists() else 0
            if found != 1:
                stale += 1
                print(f"NOT APPLIED: {m.name} (text found {found} times in {m.file})")
        print(f"{len(chosen) - stale} of {len(chosen)} mutants apply")
        return 1 if stale else 0
    print("| breakage | file | caught by | s |\n|---|---|---|---|", flush=True)
    bad = 0
    for mutant in chosen:
        verdict, elapsed = run_one(mutant, args.python, args.timeout)
        bad += verdict.startswith(("SURVIVED", "NOT APPLIED", "NO TESTS", "TIMEOUT", "exit "))
        print(f"| {mutant.name} | `{mutant.file}` | {verdict} | {elapsed:.0f} |", flush=True)
    print(f"\n{len(chosen) - bad} of {len(chosen)} breakages caught")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
