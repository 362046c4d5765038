"""AsyncLLM: the engine behind an asyncio application (the HTTP server), with vLLM's names.

The engine steps in a thread of its own, so the event loop is never blocked by a step: requests and aborts reach
that thread through a queue, and after every step each request's new output goes back to its caller's event loop.
Requests from many callers batch together in the same steps. A caller that stops listening (a closed stream, a
cancelled task, a disconnected client) aborts its request, and its KV blocks come back before the next step.

An exception inside a step is pinned on the request that causes it where the engine allows (each suspect is
retried alone, by recompute): that request fails with RequestFailedError, the others go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from helios.engine.outputs import RequestOutput
from helios.llm import LLM
from helios.sampling_params import SamplingParams

logger = logging.getLogger("helios")

MAX_STRIKES = 3  # a request in this many failed steps fails even if it never fails alone
STATS_INTERVAL_S = 0.25  # how often the engine thread refreshes the stats snapshot while busy


class RequestFailedError(RuntimeError):
    """The engine failed while serving this request (the others go on)."""


class EngineDeadError(RuntimeError):
    """The engine loop is not running (it was shut down)."""


@dataclass
class RequestTimes:
    """When a request arrived, produced its first token and finished (time.monotonic seconds)."""

    arrival: float
    first_token: float | None = None
    finished: float | None = None


@dataclass
class _Entry:
    request: object  # the engine's request (Request, or ControlledRequest under the control plane)
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    times: RequestTimes
    progress: tuple = ()
    strikes: int = 0
    done: bool = False


class RequestStream:
    """The outputs of one submitted request: `async for output in stream` yields a RequestOutput each time new text
    is stable (cumulative, as vLLM's AsyncLLM does; a running sample's text never shrinks), the last one with
    finished=True. Leaving the loop early (break, cancellation) aborts the request."""

    def __init__(self, owner: AsyncLLM, entry: _Entry):
        self._owner, self._entry = owner, entry
        self.request_id: str = entry.request.request_id
        self.times = entry.times
        self.finished = False
        self.recorded = False  # for the application: whether it has accounted for this request's outcome yet

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._outputs()

    async def _outputs(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                item = await self._entry.outputs.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                self.finished = item.finished
                yield item
        finally:
            self.abort()

    def model(self, index: int = 0) -> str:
        """The model that generated the latest tokens of sample `index` (under the control plane: the last of the
        models that served it)."""
        models = getattr(self._entry.request.seqs[index], "models", None)
        return models[-1] if models else self._owner.engine.source.name

    def abort(self) -> None:
        """Stops the request unless it has finished (finish_reason "abort"); its KV blocks are freed before the
        engine's next step."""
        if not self.finished:
            self.finished = True
            self._owner._send(("abort", self._entry))


class AsyncLLM:
    """`AsyncLLM(model, **kwargs)` takes LLM's arguments (several models and slo=... run the control plane).

        llm = AsyncLLM("smollm2-135m")
        async for output in llm.generate("Hello", SamplingParams(max_tokens=32)):
            print(output.outputs[0].text)
    """

    def __init__(self, model=None, *, llm: LLM | None = None, **kwargs):
        if (model is None) == (llm is None):
            raise TypeError("pass a model (with LLM's keyword arguments) or an existing llm=LLM(...), not both")
        self.llm = llm if llm is not None else LLM(model, **kwargs)
        self.engine = self.llm.engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._entries: dict[str, _Entry] = {}  # submitted and not yet finished, by request id (engine thread only)
        self._stats: dict = self.engine.stats()
        self._stats_time = 0.0
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.num_failed_steps = 0

    @classmethod
    def from_llm(cls, llm: LLM) -> AsyncLLM:
        return cls(llm=llm)

    def get_tokenizer(self):
        return self.llm.get_tokenizer()

    @property
    def max_model_len(self) -> int:
        return self._stats.get("max_model_len") or self.engine.max_model_len

    # ---- requests ---------------------------------------------------------------------------------------------
    def submit(self, prompt, sampling_params: SamplingParams | None = None) -> RequestStream:
        """Validates and tokenizes the prompt now (ValueError / TypeError naming what is wrong), queues the request
        and returns its stream. Must be called from a running event loop (the outputs come back to it)."""
        if self._stopping:
            raise EngineDeadError("the engine is shutting down and takes no new requests")
        (request,) = self.llm._requests([prompt], sampling_params)
        entry = _Entry(request, asyncio.get_running_loop(), asyncio.Queue(), RequestTimes(time.monotonic()))
        self._start()
        self._send(("add", entry))
        return RequestStream(self, entry)

    async def generate(self, prompt, sampling_params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        """Yields the request's RequestOutput as its text grows; the last one is finished. Stopping early aborts."""
        stream = self.submit(prompt, sampling_params)
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()  # closing this generator does not close the stream's own iterator at once

    async def abort(self, request_id: str) -> None:
        entry = next((e for e in list(self._entries.values()) if e.request.request_id == request_id), None)
        if entry is not None:
            self._send(("abort", entry))

    @property
    def alive(self) -> bool:
        """True until shutdown (the engine thread starts with the first request)."""
        return not self._stopping and (self._thread is None or self._thread.is_alive())

    def stats(self) -> dict:
        """The engine's stats() as of the last step (refreshed at most every STATS_INTERVAL_S while busy): reading
        it never waits for a step."""
        return self._stats

    # ---- lifecycle --------------------------------------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="helios-engine", daemon=True)
            self._thread.start()

    def _send(self, message: tuple) -> None:
        self._inbox.put(message)
        self._wake.set()

    def shutdown(self, timeout: float | None = 60.0) -> None:
        """Aborts what is still running (its callers see finish_reason "abort") and stops the engine thread."""
        self._stopping = True
        self._send(("stop", None))
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("the engine thread did not stop within %.0f s", timeout)

    async def __aenter__(self) -> AsyncLLM:
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.to_thread(self.shutdown)

    # ---- the engine thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                self._wake.clear()
                if not self._drain_inbox():
                    return
                if self.engine.has_unfinished():
                    self._step()
                else:
                    self._refresh_stats(force=True)
                    self._wake.wait()
            except Exception as e:  # a bug outside a step: the loop must live on, so what was in flight fails
                logger.exception("engine loop failed; failing the requests in flight")
                for entry in list(self._entries.values()):
                    with contextlib.suppress(Exception):
                        self.engine.abort(entry.request.request_id)
                    self._fail(entry, RequestFailedError(f"the engine loop failed: {e}"))

    def _drain_inbox(self) -> bool:
        """Carries out queued adds and aborts; False once told to stop (after aborting everything)."""
        stop = False
        while True:
            try:
                kind, entry = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                self._add(entry)
            elif kind == "abort":
                self._abort(entry)
            else:
                stop = True
        if stop:
            for entry in list(self._entries.values()):
                self._abort(entry)
            self._refresh_stats(force=True)
        return not stop

    def _add(self, entry: _Entry) -> None:
        if self._stopping:
            self._fail(entry, EngineDeadError("the engine shut down before this request started"))
            return
        try:
            self.engine.add_request(entry.request)
        except Exception as e:  # a request the engine refuses fails alone
            self._fail(entry, RequestFailedError(f"the engine refused the request: {e}"))
            return
        self._entries[entry.request.request_id] = entry

    def _abort(self, entry: _Entry) -> None:
        if entry.done:
            return
        self.engine.abort(entry.request.request_id)
        self._publish(entry)  # its final output, finish_reason "abort" (nobody may be listening any more)

    def _step(self) -> None:
        try:
            self.engine.step()
        except Exception as e:
            self.num_failed_steps += 1
            logger.exception("engine step failed; finding the request that causes it")
            self._isolate_fault(e)
        for entry in list(self._entries.values()):
            self._publish(entry)
        self._refresh_stats()

    def _publish(self, entry: _Entry) -> None:
        """Sends the request's output to its caller if a sample advanced or it finished."""
        request = entry.request
        progress = (tuple(s.num_output_tokens for s in request.seqs), request.is_finished)
        if progress == entry.progress:
            return
        entry.progress = progress
        try:
            output = self.engine.output(request)
            for completion, seq in zip(output.outputs, request.seqs, strict=True):
                if completion.finish_reason is None:
                    completion.text = self.engine.stable_text(seq)
        except Exception as e:  # building one request's output (detokenizing) failed: that request fails
            self.engine.abort(request.request_id)
            self._fail(entry, RequestFailedError(f"building the output failed: {e}"))
            return
        now = time.monotonic()
        if entry.times.first_token is None and any(progress[0]):
            entry.times.first_token = now
        if output.finished:
            entry.times.finished = now
            entry.done = True
            self._entries.pop(request.request_id, None)
        entry.loop.call_soon_threadsafe(_put, entry.outputs, output)

    def _fail(self, entry: _Entry, error: BaseException) -> None:
        entry.done = True
        entry.times.finished = time.monotonic()
        self._entries.pop(entry.request.request_id, None)
        entry.loop.call_soon_threadsafe(_put, entry.outputs, error)

    def _isolate_fault(self, error: Exception) -> None:
        """After a failed step: every unfinished request is a suspect. Where the engine can take requests out and
        put them back (recomputing their K/V), each suspect runs one step alone; the ones that fail alone, or that
        were in MAX_STRIKES failed steps, fail; the rest go on. Otherwise every suspect fails."""
        suspects = [e for e in self._entries.values() if not e.request.is_finished]
        if not hasattr(self.engine, "release"):
            for entry in suspects:
                self.engine.abort(entry.request.request_id)
                self._fail(entry, RequestFailedError(f"the engine failed: {error}"))
            return
        for entry in suspects:
            self.engine.release(entry.request.request_id)
        for entry in suspects:
            entry.strikes += 1
            failure = error if entry.strikes >= MAX_STRIKES else self._try_alone(entry)
            if failure is not None:
                self._fail(entry, RequestFailedError(f"the engine failed on this request: {failure}"))
        for entry in suspects:
            if not entry.done and not entry.request.is_finished and entry.request.request_id not in \
                    self.engine.requests:
                self.engine.adopt(entry.request)

    def _try_alone(self, entry: _Entry) -> Exception | None:
        """One step of this request alone; it leaves the engine again afterwards (unless it finished)."""
        rid = entry.request.request_id
        self.engine.adopt(entry.request)
        try:
            self.engine.step()
        except Exception as e:
            self.engine.release(rid)
            return e
        if rid in self.engine.requests:
            self.engine.release(rid)
        return None

    def _refresh_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._stats_time >= STATS_INTERVAL_S:
            self._stats, self._stats_time = self.engine.stats(), now


def _put(outputs: asyncio.Queue, item) -> None:
    outputs.put_nowait(item)
