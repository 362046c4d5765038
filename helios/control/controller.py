"""ControlledEngine: the HELIOS loop over engines, with LLMEngine's interface (LLM drives it the same way).

Cold start: candidates are profiled one after another, each serving the next `profile_requests` live requests
at full depth with every probe exit evaluated (helios.engine.probes); beside the first profile, an interim engine
of the same model (sharing its weights) serves every other request at full depth from the start, until all
candidates are profiled. Then the selector picks model M, depth L,
exits and thresholds (helios.control.selector); only layers 1..L of M are loaded and the KV pool is sized for
them. While serving, tokens forced out at L below threshold are breaches; more than `max_breaches` in the last
`breach_window` tokens trigger the cheaper of growing the depth or switching model (cost model in `_react`).
Every `reprofile_interval` requests after a round's selection (and on set_slo) the candidates are profiled again
beside the active deployment, which keeps serving all other traffic. Engines of one model share weights: a profile
of the deployed model reads only the layers the deployment lacks, and a deployment chosen after a profile reads
none.

Nothing is lost: a request moves between engines whole. With the same tokenizer, its sequences are released by
one engine and adopted by the other (re-prefilled from their tokens); across tokenizers, each sample's text so
far becomes a fixed prefix and a new sequence continues from prompt + that text. The text already returned
never changes. A request never mixes two models' K/V: each engine holds its own pool.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from helios.config import EngineConfig
from helios.control.actions import breach_options
from helios.control.candidates import CandidateEngines
from helios.control.events import EventLog
from helios.control.monitor import BreachMonitor
from helios.control.profiling import ProfilingRun, profiling_pool
from helios.control.repository import ModelRepository
from helios.control.requests import ControlledRequest, ControlledSeq
from helios.control.selector import Plan, interim_plan, plan_candidate, select
from helios.control.slo import SLO
from helios.engine.engine import LLMEngine
from helios.engine.outputs import RequestOutput
from helios.engine.prompts import ChatPrompt, PromptTooLongError, parse_prompt
from helios.exits.config import ExitPolicy
from helios.sampling_params import SamplingParams
from helios.utils.locking import locked


@dataclass
class Deployment:
    model: str
    engine: LLMEngine
    plan: Plan


class ControlledEngine:
    def __init__(self, configs: list[EngineConfig], slo: SLO, repository: str | Path | None = None):
        if not configs:
            raise ValueError("the control plane needs at least one candidate model")
        names = [str(c.model) for c in configs]
        if len(set(names)) != len(names):
            raise ValueError(f"candidate models must differ: {names}")
        self.configs = dict(zip(names, configs, strict=True))
        self.slo = slo
        self.repository = ModelRepository(repository)
        self.events = EventLog()
        self.lock = threading.RLock()
        self.engines = CandidateEngines(self.configs, self.repository)
        self._request_ids = itertools.count()
        self.requests: dict[str, ControlledRequest] = {}
        self.pending: deque[ControlledRequest] = deque()  # waiting for the first deployment
        self.active: Deployment | None = None
        self.profiling: ProfilingRun | None = None
        self._last_profiled: ProfilingRun | None = None  # its weights stay until the selection after it
        self.to_profile: deque[str] = deque()
        self.requests_since_profile = 0
        self.monitor = BreachMonitor(slo.breach_window, slo.max_breaches)
        self._owner: dict[int, ControlledSeq] = {}  # engine seq_id -> the controlled sample it carries
        # the first loadable candidate is built now (bad arguments fail here); its tokenizer reads incoming prompts
        self._start_round("cold start")
        if self.profiling is None:
            raise RuntimeError(f"no candidate could be loaded for profiling ({self.events.events[-1].reason})")
        self.engines.load_tokenizers()
        self.tokenizer = self.profiling.engine.tokenizer
        self.tokenizer_key = self.engines.tokenizer_keys[self.profiling.model]
        self.source = self.profiling.engine.source
        self.max_model_len = self.profiling.engine.max_model_len

    # ---- engines ------------------------------------------------------------------------------------------------
    def _build(self, model: str, **changes) -> LLMEngine:
        """An engine of `model` sharing the weights of a live engine of the same model, if there is one."""
        donor = next((e for m, e in self._live_engines() if m == model), None)
        return self.engines.build(model, donor, **changes)

    def _live_engines(self) -> list[tuple[str, LLMEngine]]:
        """Engines holding weights now, deepest first: the profiling run, the deployment, the last profiled."""
        live = [(r.model, r.engine) for r in (self.profiling, self._last_profiled) if r is not None]
        if self.active is not None:
            live.append((self.active.model, self.active.engine))
        return sorted(live, key=lambda me: -me[1].model.loaded_layers)

    def _start_round(self, reason: str) -> None:
        self._reference: list[ControlledRequest] = []  # prompts every candidate of the round is scored on (bpb)
        self.to_profile = deque(self.configs)
        self.requests_since_profile = 0
        self.events.add("reassess", reason, candidates=list(self.configs))
        if self.active is None:
            self._next_profile()  # cold start: the first candidate's engine now (its tokenizer reads the prompts)
        # else the next request starts the round's first profile: no engine is built for a round without traffic

    def _next_candidate(self) -> None:
        """Starts the next candidate's profile; when none is left (or none could load), selects."""
        self._next_profile()
        if self.profiling is None:
            self._reselect("profiles complete")

    def _next_profile(self) -> None:
        while self.to_profile:
            model = self.to_profile.popleft()
            try:
                engine = self._build(model, num_layers=None, enable_prefix_caching=False,
                                     **profiling_pool(self.configs[model], self.slo))
                self.profiling = ProfilingRun.start(model, engine, self.slo)
            except Exception as e:  # a candidate that cannot load is skipped, the rest go on
                self.events.add("failure", f"loading {model} for profiling failed: {e}", model=model)
                continue
            self.events.add("profile", f"profiling {model} on the next {self.slo.profile_requests} requests",
                            model=model, probe_layers=list(self.profiling.log.layers))
            while self.pending and len(self.profiling.requests) < self.slo.profile_requests:
                self._profile_on(self.pending.popleft())  # requests waiting since the cold start go first
            if self.active is None:
                self._start_interim(self.profiling)
            return
        self.profiling = None

    def _start_interim(self, run: ProfilingRun) -> None:
        """Cold start: beside the first profiling run, an engine of the same model at full depth (sharing its
        weights, with the whole memory budget for KV) serves every request beyond the profile's from the start,
        and goes on until every candidate is profiled: nobody waits for a profile, and the profile's timing is
        its own requests' (plain decoding: no exits, no breaches)."""
        try:
            engine = self._build(run.model, num_layers=None)
        except Exception as e:  # the requests wait for the profiling engine instead (_serve_interim)
            self.events.add("failure", f"starting {run.model} beside its profile failed: {e}", model=run.model)
            return
        engine.set_exit_policy(None)
        depth = engine.model.total_layers
        self.active = Deployment(run.model, engine, interim_plan(run.model, depth, run.log.confidence))
        self.events.add("select", f"interim: {run.model} at full depth serves requests beyond the profile's until "
                        "every candidate is profiled", model=run.model, depth=depth, pending=len(self.pending))
        self._drain_pending()

    # ---- requests (LLMEngine's interface) -------------------------------------------------------------------------
    def make_request(self, prompt, params: SamplingParams) -> ControlledRequest:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        params = params.clone()
        vocab = len(self.tokenizer)
        text, token_ids = parse_prompt(prompt, self.tokenizer, vocab)
        if text is None:
            text = self.tokenizer.decode(token_ids)
        if len(token_ids) >= self.max_model_len:
            raise PromptTooLongError(f"prompt is {len(token_ids)} tokens, longer than max_model_len="
                                     f"{self.max_model_len} (of {self.source.name}) allows")
        return ControlledRequest(f"c{next(self._request_ids)}", text, token_ids, params,
                                 chat=prompt if isinstance(prompt, ChatPrompt) else None)

    @locked
    def add_request(self, request: ControlledRequest) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request {request.request_id!r} was added already")
        self.requests[request.request_id] = request
        # RI counts requests served after a round's selection: those arriving during a round do not count, so a round
        # that spans more than RI requests (a slow candidate's profile) does not start the next one at once
        round_underway = self.profiling is not None or bool(self.to_profile)
        if not round_underway:
            self.requests_since_profile += 1
        if self.requests_since_profile >= self.slo.reprofile_interval and not round_underway:
            self._start_round(f"{self.requests_since_profile} requests since the last profile (RI)")
        if self.profiling is None and self.to_profile and self.active is not None:
            self._next_candidate()
        run = self.profiling
        if run is not None and len(run.requests) < self.slo.profile_requests:
            self._profile_on(request)
        elif self.active is not None:
            self._route(request, self.active.engine, self.active.model)
        else:
            self.pending.append(request)

    def _profile_on(self, request: ControlledRequest) -> None:
        run = self.profiling
        run.requests.append(request)
        request.profiled_by = run.model
        self._route(request, run.engine, run.model)

    def _route(self, request: ControlledRequest, engine: LLMEngine, model: str) -> None:
        """Hands a request (all its samples) to an engine, by token ids when the tokenizer is the first
        candidate's, else by text (a conversation in that model's own chat template)."""
        prompt = self._prompt_on(request, model, engine)
        try:
            inner = engine.make_request(prompt, request.params)
        except ValueError as e:  # e.g. too long for this model: the request ends, visibly
            for cseq in request.seqs:
                cseq.failed = str(e)
            self.events.add("failure", f"request {request.request_id} cannot run on {model}: {e}", model=model)
            return
        engine.add_request(inner)
        for cseq, seq in zip(request.seqs, inner.seqs, strict=True):
            self._attach(cseq, engine, inner, seq, model)

    def _prompt_on(self, request: ControlledRequest, model: str, engine: LLMEngine):
        """The request's prompt for `model`: its token ids when the tokenizer is the first candidate's, else text
        (a conversation in that model's own chat template)."""
        if self.engines.tokenizer_keys.get(model) == self.tokenizer_key:
            return {"prompt": request.prompt_text, "prompt_token_ids": request.prompt_token_ids}
        return request.prompt_for(engine.tokenizer)

    def _attach(self, cseq: ControlledSeq, engine: LLMEngine, inner, seq, model: str) -> None:
        cseq.engine, cseq.inner, cseq.seq = engine, inner, seq
        if not cseq.models or cseq.models[-1] != model:
            cseq.models.append(model)
        self._owner[seq.seq_id] = cseq

    @locked
    def abort(self, request_id: str) -> bool:
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        if request in self.pending:
            self.pending.remove(request)
        for cseq in request.seqs:
            if cseq.seq is None:
                cseq.failed = cseq.failed or "aborted"
            elif not cseq.seq.is_finished:
                cseq.engine.abort(cseq.inner.request_id)
        return True

    def has_unfinished(self) -> bool:
        return any(not r.is_finished for r in self.requests.values())

    @locked
    def output(self, request: ControlledRequest) -> RequestOutput:
        return request.output()

    @locked
    def stable_text(self, cseq: ControlledSeq) -> str:
        return cseq.stable_text()

    @locked
    def reset_prefix_cache(self) -> None:
        if self.active is not None:
            self.active.engine.reset_prefix_cache()

    # ---- the loop ---------------------------------------------------------------------------------------------------
    @locked
    def step(self) -> list:
        if self.active is None and self.profiling is None and self.pending:
            raise RuntimeError("no candidate could be profiled and nothing is deployed: see stats()['events']")
        run = self.profiling
        if run is not None and run.engine.has_unfinished():
            run.step()
        if self.active is not None and self.active.engine.has_unfinished():
            tripped = False
            for seq in self.active.engine.step():
                tripped |= self.monitor.observe(seq.last_breach)
            if tripped:
                self._react()
        self._forget_finished()
        # a run with fewer requests than a profile needs waits for more traffic
        if run is not None and run is self.profiling and len(run.requests) >= self.slo.profile_requests and run.done:
            self._finish_profile(run)
        return []

    def _forget_finished(self) -> None:
        for request_id in [rid for rid, r in self.requests.items() if r.is_finished]:
            request = self.requests.pop(request_id)
            for cseq in request.seqs:
                if cseq.seq is not None:
                    self._owner.pop(cseq.seq.seq_id, None)

    def _finish_profile(self, run: ProfilingRun) -> None:
        profile = run.profile()
        # the round's reference prompts (the first profile's) under this candidate: the quality guard's common text
        run.score_reference(profile, self._reference, lambda request: self._prompt_on(request, run.model, run.engine))
        self.repository.record(profile)
        self.events.add("profile", f"profiled {run.model}", **profile.summary())
        self.profiling = None  # the full-depth copy goes with the run (its finished requests keep what they read)
        if self.active is None:
            self._serve_interim(run, profile)
        if self.to_profile:  # the next candidate is profiled on the next requests (built when one arrives)
            self._drain_pending()
            return
        self._last_profiled = run  # the selection may deploy this model: its layers need not be read again
        try:
            self._reselect("profiles complete")
        finally:
            self._last_profiled = None

    def _serve_interim(self, run: ProfilingRun, profile) -> None:
        """Cold start when no engine could start beside the first profile: its full-depth engine serves the waiting
        requests while the other candidates are profiled (plain decoding: no exits, no breaches)."""
        run.engine.set_probes(None)
        depth = run.engine.model.total_layers
        self.active = Deployment(run.model, run.engine, interim_plan(run.model, depth, profile.confidence,
                                                                     profile.tokens_per_second, profile.prompt_bpb))
        self.events.add("select", f"interim: {run.model} at full depth serves waiting requests until every candidate "
                        "is profiled", model=run.model, depth=depth, pending=len(self.pending))

    # ---- selection and deployment ------------------------------------------------------------------------------------
    def _plans(self) -> list[Plan]:
        plans = []
        for name, candidate in self.repository.candidates.items():
            if name in self.configs and candidate.latest is not None:
                config = self.configs[name]
                plans.append(plan_candidate(candidate.latest, candidate.facts, self.slo, config.memory_budget,
                                            config.max_model_len or 2048))
        return plans

    def _reselect(self, reason: str) -> None:
        plans = self._plans()
        if not plans:
            self.events.add("failure", "no candidate has a profile: nothing to select")
            return
        for plan in plans:
            self.events.add("calibrate", f"live thresholds for {plan.model} at target precision "
                            f"{self.slo.target_precision}", **plan.summary())
        chosen = select(plans, self.slo)
        self.events.add("select", f"{reason}: {chosen.reason}", **chosen.summary())
        self._deploy(chosen)

    def _policy(self, plan: Plan) -> ExitPolicy:
        confidence = self.repository.candidates[plan.model].latest.confidence
        layers = (*plan.exits, plan.depth)
        return ExitPolicy(confidence, layers, {x: plan.thresholds[x] for x in layers})

    def _deploy(self, plan: Plan) -> None:
        """Serves `plan`: the same model deeper grows in place, anything else is a new engine that the running
        requests move to. On failure the current deployment keeps serving."""
        active = self.active
        try:
            if active is not None and active.model == plan.model and active.plan.depth == plan.depth:
                active.engine.set_exit_policy(self._policy(plan))
                active.plan = plan
            elif active is not None and active.model == plan.model and plan.depth > active.plan.depth:
                self._grow(plan, "selection")
            else:
                self._replace(plan)
        except Exception as e:
            self.events.add("failure", f"deploying {plan.model} at depth {plan.depth} failed: {e}; the current "
                            "configuration keeps serving", model=plan.model, depth=plan.depth)
            return
        self.monitor.reset()
        self._drain_pending()

    def _replace(self, plan: Plan, reason: str = "") -> None:
        """A new engine with layers 1..plan.depth of plan.model; the active deployment's requests move to it."""
        engine = self._build(plan.model, num_layers=plan.depth)
        engine.set_exit_policy(self._policy(plan))
        self.events.add("truncate", f"loaded layers 1..{plan.depth} of {plan.model}", model=plan.model,
                        depth=plan.depth, total_layers=engine.model.total_layers,
                        weight_bytes=engine.model.weight_bytes, kv_blocks=engine.kv_cache.num_blocks,
                        max_concurrent_seqs=engine.stats()["max_concurrent_seqs"])
        self._move_all(self.active, Deployment(plan.model, engine, plan), reason)

    def _drain_pending(self) -> None:
        while self.pending and self.active is not None:
            request = self.pending.popleft()
            if request.request_id in self.requests:
                self._route(request, self.active.engine, self.active.model)

    def _grow(self, plan: Plan, reason: str) -> None:
        active = self.active
        before = active.plan.depth
        started = time.perf_counter()
        active.engine.grow(plan.depth, self._policy(plan))
        seconds = time.perf_counter() - started
        facts = self.repository.candidates[active.model].facts
        facts.load_seconds_per_layer = seconds / (plan.depth - before)
        active.plan = plan
        self.events.add("grow", f"{reason}: layers {before + 1}..{plan.depth} of {active.model} loaded",
                        model=active.model, depth_before=before, depth=plan.depth, seconds=round(seconds, 3),
                        kv_blocks=active.engine.kv_cache.num_blocks)

    def _move_all(self, old: Deployment | None, new: Deployment, reason: str = "") -> None:
        """Every unfinished request of the old deployment continues on the new one; the old engine is released."""
        self.active = new
        if old is None:
            return
        same = self.engines.tokenizer_keys.get(old.model) == self.engines.tokenizer_keys.get(new.model)
        moved = 0
        for request_id in list(old.engine.requests):
            inner = old.engine.requests[request_id]
            owners = [self._owner.get(seq.seq_id) for seq in inner.seqs]
            if same:
                new.engine.adopt(old.engine.release(request_id))
                for cseq, seq in zip(owners, inner.seqs, strict=True):
                    if cseq is not None:
                        self._attach(cseq, new.engine, inner, seq, new.model)
            else:
                for cseq, seq in zip(owners, inner.seqs, strict=True):
                    if cseq is None or seq.is_finished:
                        continue
                    cseq.carry_over()
                    request = next(r for r in self.requests.values() if cseq in r.seqs)
                    continued = new.engine.make_request(request.prompt_for(new.engine.tokenizer, cseq.prefix_text),
                                                        cseq.remaining_params(request.params))
                    continued.seqs[0].stop_context = cseq.prefix_text  # a stop string may span the switch
                    new.engine.add_request(continued)
                    self._attach(cseq, new.engine, continued, continued.seqs[0], new.model)
                old.engine.abort(request_id)
            moved += 1
        kind = "switch" if old.model != new.model else "truncate"
        moved_how = "by token ids" if same else "as text"
        self.events.add(kind, f"{reason}{'; ' if reason else ''}{moved} in-flight requests moved from {old.model} "
                        f"(depth {old.plan.depth}) to {new.model} (depth {new.plan.depth}) {moved_how}",
                        model_before=old.model, model=new.model, depth=new.plan.depth, moved=moved)

    def _react(self) -> None:
        """The breach monitor tripped: grow the depth or switch, whichever the cost model says is cheaper over
        the next slo.horizon_tokens tokens (load time + re-prefill of the in-flight tokens + serving time)."""
        active = self.active
        breach = {"breaches": self.monitor.breaches, "window": len(self.monitor.window)}
        inflight = sum(seq.num_tokens for r in active.engine.requests.values() for seq in r.seqs
                       if not seq.is_finished)
        options = breach_options(active.plan, self.repository, self._plans(), inflight, self.slo)
        self.monitor.reset()
        if not options:
            self.events.add("failure", "breach limit exceeded at full depth with no other candidate: nothing to do",
                            **breach)
            return
        best = min(options, key=lambda o: o.cost)
        plan = best.plan
        reason = (f"{breach['breaches']} breaches in {breach['window']} tokens > {self.slo.max_breaches}: "
                  f"{best.action} is cheapest ({round(best.cost, 3)} s for {self.slo.horizon_tokens} tokens)")
        alternatives = {f"{o.action}:{o.plan.model}@{o.plan.depth}": round(o.cost, 3) for o in options}
        try:
            if best.action == "grow":
                self._grow(plan, reason)
            else:
                self._replace(plan, reason)
        except Exception as e:
            self.events.add("failure", f"{best.action} to {plan.model}@{plan.depth} failed: {e}; keeping "
                            f"{active.model}@{active.plan.depth}", **breach)
            return
        self.events.events[-1].data.update(costs=alternatives, **best.numbers, **breach)

    # ---- SLO and telemetry -------------------------------------------------------------------------------------------
    @locked
    def set_slo(self, slo: SLO | str | dict) -> None:
        self.slo = SLO.parse(slo)
        self.monitor = BreachMonitor(self.slo.breach_window, self.slo.max_breaches)
        if self.profiling is None:
            self._start_round("the SLO changed")

    @locked
    def stats(self) -> dict:
        active = self.active
        engine_stats = active.engine.stats() if active is not None else {}
        profiling = self.profiling.engine.stats() if self.profiling is not None else {}
        return {
            **engine_stats,
            "num_running": engine_stats.get("num_running", 0) + profiling.get("num_running", 0),
            "num_waiting": engine_stats.get("num_waiting", 0) + profiling.get("num_waiting", 0) + len(self.pending),
            "control": {
                "slo": dataclasses.asdict(self.slo),
                "active_model": None if active is None else active.model,
                "depth": None if active is None else active.plan.depth,
                "exits": None if active is None else list(active.plan.exits),
                "thresholds": None if active is None else active.plan.thresholds,
                "profiling": None if self.profiling is None else self.profiling.model,
                "pending_requests": len(self.pending),
                "breach_rate": round(self.monitor.rate, 4),
                "breaches_total": self.monitor.total_breaches,
                "tokens_monitored": self.monitor.total_tokens,
                "pht": self.repository.pht(),
                "event_counts": dict(self.events.counts),
            },
            "events": self.events.as_dicts(),
        }
