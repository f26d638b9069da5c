"""Serve GGUF models on CPU with a current llama.cpp, through ``xllamacpp``.

xllamacpp's one way in is llama.cpp's own server, embedded: ``Server`` loads
the model and runs its loop on threads of its own, ``handle_completions``
calls back once per streamed chunk. This module fits that to the backend
contract; each choice is noted where it is made. See docs/architecture.md,
section "workers/backends and model files" (and "Library facts the code
relies on" for llama.cpp's quirks).
"""

from __future__ import annotations

import http.client
import json
import queue
import secrets
import threading
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import urlsplit

from workers.backends.base import (
    BackendError,
    Generation,
    GenerationRun,
    PromptTooLongError,
    SamplingParams,
    check_model_file,
)
from workers.contract.registry import ModelSpec
from workers.special_tokens import hidden_tokens

#: Tokens the repetition penalty looks back over (as the ctransformers backend).
_LAST_N_TOKENS = 64
#: llama.cpp's sampler chain, in order; the same steps as ctransformers'.
_SAMPLERS = ("penalties", "top_k", "top_p", "temperature")
#: llama.cpp's common log threshold: 1 shows errors only.
_LOG_ERRORS_ONLY = 1
#: Seconds a call to the loopback tokenizer may take.
_HTTP_TIMEOUT_S = 60.0


class LlamaCppModel:
    """A model loaded by llama.cpp (xllamacpp). One generation at a time; others wait."""

    def __init__(self, spec: ModelSpec, server: Any, api_key: str) -> None:
        self.spec = spec
        self._server = server
        self._api_key = api_key
        address = urlsplit(server.listening_address)
        if address.hostname is None or address.port is None:
            raise BackendError(f"model {spec.name}: llama.cpp listens on {server.listening_address!r}, not host:port")
        self._host, self._port = address.hostname, address.port
        self._lock = threading.Lock()
        self._owner: int | None = None
        # llama.cpp leaves control tokens out but prints user-defined ones
        # verbatim (Gemma's ``<start_of_image>``); every token's bytes go through
        # ``self._hidden.strip`` so no marker reaches a client.
        self._hidden = hidden_tokens(spec.path)
        self._n_ctx = min(spec.context_length, self._server_context() or spec.context_length)

    @classmethod
    def load(cls, spec: ModelSpec) -> LlamaCppModel:
        """Load ``spec.path``; every failure is a :class:`BackendError` naming the model."""
        check_model_file(spec.path)
        # Imported here, not at module level: importing this module must load no
        # native library and start no thread (workers fork after importing it).
        # A loaded server runs threads of its own (seven to nine: its loop, the
        # HTTP listener, the compute pool), so models are loaded after fork.
        try:
            import xllamacpp
        except ImportError as exc:
            raise BackendError(f"model {spec.name}: xllamacpp is not installed ({exc})") from None
        api_key = secrets.token_urlsafe(32)
        params = xllamacpp.CommonParams()
        params.model.path = str(spec.path)
        params.n_ctx = spec.context_length
        params.n_parallel = 1
        params.n_gpu_layers = 0
        params.cpuparams.n_threads = spec.threads
        params.cpuparams_batch.n_threads = spec.threads
        params.ctx_shift = False
        # No state between requests: no prompt cache (KV cache or host memory),
        # so the same request gives the same output whatever ran before and one
        # principal's prompt cannot speed up, and so reveal itself to, another.
        # The price is re-evaluating shared prefixes.
        params.cache_prompt = False
        params.cache_ram_mib = 0
        params.cache_idle_slots = False
        params.n_ctx_checkpoints = 0
        params.fit_params = False
        # llama.cpp logs every request at its default verbosity; only its errors
        # reach stderr (the worker's log), e.g. why a file did not load.
        params.verbosity = _LOG_ERRORS_ONLY
        # The embedded server always listens on loopback HTTP too. Anyone on the
        # machine could use the model through it, ungoverned and unaudited, so it
        # gets a random key only this object knows, and no web UI or slot endpoints.
        params.hostnames = ["127.0.0.1"]
        params.port = 0
        params.api_keys = [api_key]
        params.ui = False
        params.endpoint_slots = False
        params.endpoint_metrics = False
        params.n_threads_http = 1
        try:
            server = xllamacpp.Server(params)
        except (RuntimeError, ValueError) as exc:
            raise BackendError(
                f"model {spec.name}: llama.cpp cannot load {spec.path} ({exc}); its reason is in the log"
            ) from None
        _wait_for_task_loop(server, spec)
        return cls(spec, server, api_key)

    def close(self) -> None:
        """Stop the server's threads and free the model (also done when garbage-collected)."""
        with self._lock:
            self._server = None

    @property
    def context_length(self) -> int:
        """Context slots the loaded model really has (the server's slot size, at most the spec's)."""
        return self._n_ctx

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` as a prompt: BOS first if the model adds one, specials as text."""
        # xllamacpp has no tokenize call; the loopback server's /tokenize is the
        # model's own tokenizer. Special tokens are not parsed, so a user's
        # ``<end_of_turn>`` stays text, and the ids are sent as the prompt:
        # ``count_tokens`` is exactly what the model is fed.
        reply = self._http("POST", "/tokenize", {"content": text, "add_special": True, "parse_special": False})
        tokens = reply.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise BackendError(f"model {self.spec.name}: llama.cpp's tokenizer answered {str(reply)[:200]}")
        return tokens

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def stream(self, prompt: str, params: SamplingParams) -> GenerationRun:
        """Start a generation. Errors about the prompt are raised now, before any piece."""
        tokens = self.tokenize(prompt)
        if not tokens:
            raise BackendError(f"model {self.spec.name}: the prompt is empty and this model adds no BOS token")
        # llama.cpp quietly stops early when prompt plus completion outgrow the
        # window, so that is checked here, before generating.
        if len(tokens) + params.max_tokens > self.context_length:
            raise PromptTooLongError(len(tokens), params.max_tokens, self.context_length)
        pieces: list[bytes] = []

        def positions() -> Iterator[int]:
            source = self._token_pieces(tokens, params)
            try:
                for piece in source:
                    pieces.append(piece)
                    yield len(pieces) - 1
            finally:
                source.close()  # cancels the completion now, not when garbage-collected

        return GenerationRun(positions(), lambda i: self._hidden.strip(pieces[i]), prompt_tokens=len(tokens),
                             params=params)

    def generate(self, prompt: str, params: SamplingParams) -> Generation:
        return self.stream(prompt, params).collect()

    def request_body(self, tokens: list[int], params: SamplingParams) -> dict[str, Any]:
        """The completion request llama.cpp gets: pinned sampling, no stops, no cache.

        ``repetition_penalty`` 1.0 (the request gave none) falls back to the
        registry's default for this model.

        Sampling is pinned rather than left to llama.cpp's defaults (which add
        ``min_p = 0.05`` among others): the same steps as ctransformers, the
        repetition penalty over the last 64 tokens, temperature 0 greedy; greedy
        output is the same text as ctransformers' on the same file. No stop
        strings are given, so a final ``"stop"`` can only mean end-of-generation.
        """
        penalty = params.repetition_penalty if params.repetition_penalty != 1.0 else self.spec.repetition_penalty
        body: dict[str, Any] = {
            "prompt": tokens,
            "max_tokens": params.max_tokens,
            "stream": True,
            "timings_per_token": True,
            "cache_prompt": False,
            "stop": [],
            "samplers": list(_SAMPLERS),
            "temperature": params.temperature,
            "top_k": max(params.top_k, 0),
            "top_p": params.top_p,
            "min_p": 0.0,
            "typical_p": 1.0,
            "repeat_penalty": penalty,
            "repeat_last_n": _LAST_N_TOKENS,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
            "n_probs": 0,
        }
        if params.seed >= 0:
            body["seed"] = params.seed % 2**31
        return body

    def _token_pieces(self, tokens: list[int], params: SamplingParams) -> Iterator[bytes]:
        """Each generated token's bytes until end-of-sequence; holds the model while running.

        The lock is taken on the first ``next()`` and released when the run
        ends or is closed (the completion is cancelled first), so an abandoned
        stream frees the model. A second stream on the same thread would wait
        on itself forever, so it fails.
        """
        if self._owner == threading.get_ident():
            raise BackendError(
                f"model {self.spec.name} is already generating on this thread; finish or close that stream first"
            )
        with self._lock:
            if self._server is None:
                raise BackendError(f"model {self.spec.name} has been closed")
            self._owner = threading.get_ident()
            completion = _Completion(self._server, self.request_body(tokens, params), self.spec.name)
            try:
                yield from token_pieces(completion.chunks(), self.spec.name)
            finally:
                completion.close()
                self._owner = None

    def _server_context(self) -> int | None:
        """The slot's context size as the server reports it, or None if it does not."""
        try:
            props = self._http("GET", "/props")
        except BackendError:
            return None
        n_ctx = (props.get("default_generation_settings") or {}).get("n_ctx")
        return n_ctx if isinstance(n_ctx, int) and n_ctx > 0 else None

    def _http(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One request to the embedded server's loopback listener.

        ``http.client`` rather than ``urllib``: urllib honours ``HTTP_PROXY``,
        and a proxy must never see (or be asked to reach) this listener.
        """
        if self._server is None:
            raise BackendError(f"model {self.spec.name} has been closed")
        data = None if body is None else json.dumps(body).encode("ascii")
        headers = {"Authorization": f"Bearer {self._api_key}", "Content-Type": "application/json"}
        connection = http.client.HTTPConnection(self._host, self._port, timeout=_HTTP_TIMEOUT_S)
        try:
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            raw = response.read()
        except OSError as exc:
            raise BackendError(f"model {self.spec.name}: llama.cpp's {path} cannot be reached: {exc}") from None
        finally:
            connection.close()
        try:
            reply = json.loads(raw)
        except ValueError:
            reply = None
        if response.status != 200 or not isinstance(reply, dict):
            raise BackendError(f"model {self.spec.name}: llama.cpp's {path} answered {response.status}: {raw[:300]!r}")
        return reply


def _wait_for_task_loop(server: Any, spec: ModelSpec) -> None:
    """Return once the server's task loop has answered a task (a prompt of one token, nothing generated).

    Why: the server's destructor stops that loop by clearing its ``running`` flag, and the loop sets the
    flag when it starts, so a server dropped before its loop thread got going waited for it for ever:
    a model closed soon after its load hung its process (a test-busy run; 1 in ~50 loads and closes under
    a CPU burner). The constructor returns before that thread runs; its HTTP listener answering proves
    nothing, as ``/props`` and ``/tokenize`` never reach the loop. Costs one prefill of one token at load.
    """
    reply = server.handle_completions({"prompt": [0], "max_tokens": 0, "stream": False, "cache_prompt": False})
    if not isinstance(reply, dict) or "error" in reply:
        raise BackendError(f"model {spec.name}: llama.cpp's first task failed: {str(reply)[:300]}")


_END = object()


class _Completion:
    """One ``handle_completions`` call on a helper thread, its chunks on a queue.

    Why a thread: xllamacpp delivers chunks by calling back from inside a
    blocking call, while :class:`GenerationRun` pulls tokens one at a time.
    The callback only enqueues, so it never blocks llama.cpp. Closing asks the
    callback to answer "stop" (xllamacpp then drops the response, which
    cancels the task in llama.cpp) and waits for the call to return, so the
    model is free once :meth:`close` returns; that takes at most one more
    token (or the prompt's evaluation, if no token came yet).
    """

    def __init__(self, server: Any, body: dict[str, Any], model: str) -> None:
        self._model = model
        self._chunks: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(server, body), name=f"llama.cpp {model}", daemon=True)
        self._thread.start()

    def _run(self, server: Any, body: dict[str, Any]) -> None:
        try:
            server.handle_completions(body, self._on_chunk)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer's thread
            self._chunks.put(exc)
        finally:
            self._chunks.put(_END)

    def _on_chunk(self, chunk: Any) -> bool:
        if self._cancel.is_set():
            return True
        self._chunks.put(chunk)
        return False

    def chunks(self) -> Iterator[dict[str, Any]]:
        while True:
            item = self._chunks.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise BackendError(f"model {self._model}: generation failed: {item}") from item
            yield item

    def close(self) -> None:
        self._cancel.set()
        self._thread.join()


def token_pieces(chunks: Iterable[dict[str, Any]], model: str = "llama.cpp") -> Iterator[bytes]:
    """The bytes of each generated token, from llama.cpp's streamed completion chunks.

    Each chunk's ``timings.predicted_n`` counts the tokens generated so far;
    tokens that sent no chunk of their own (they ended inside a UTF-8
    character) get empty bytes and the chunk's text goes to its last token.
    A token is yielded only once the next chunk shows it was not the last;
    when the final chunk's ``finish_reason`` is ``"stop"``, the last token was
    end-of-generation and is not yielded. Tokens counted by the final chunk
    alone (a character left unfinished at the limit) are yielded without bytes:
    llama.cpp drops an unfinished character's bytes.

    Chunks carry text, not ids, so :class:`~workers.backends.base.GenerationRun`
    sees positions rather than vocabulary ids; nothing it does needs the ids.
    Holding each token until the next chunk costs one token of latency.
    """
    held: bytes | None = None
    counted = 0
    for chunk in chunks:
        error = chunk.get("error") if isinstance(chunk, dict) else chunk
        if error is not None:
            message = error.get("message") if isinstance(error, dict) else error
            raise BackendError(f"model {model}: llama.cpp refused the completion: {message}")
        if not chunk.get("choices"):
            continue  # a chunk about no choice (usage only): nothing to count
        choice = chunk["choices"][0]
        text = (choice.get("text") or "").encode("utf-8")
        total = _tokens_so_far(chunk, model)
        new = total - counted
        counted = max(counted, total)
        finish = choice.get("finish_reason")
        if finish is None:
            if new <= 0:  # text without a token: it belongs to the held one
                held = (held or b"") + text
                continue
            if held is not None:
                yield held
            for _ in range(new - 1):
                yield b""
            held = text
            continue
        pending = ([] if held is None else [held]) + [b""] * max(new, 0)
        if text:
            pending = pending or [b""]
            pending[-1] += text
        if finish == "stop" and pending:
            pending.pop()  # the end-of-generation token
        yield from pending
        return
    raise BackendError(f"model {model}: llama.cpp ended the completion without a final chunk")


def _tokens_so_far(chunk: dict[str, Any], model: str) -> int:
    timings = chunk.get("timings") or {}
    total = timings.get("predicted_n")
    if total is None:
        total = (chunk.get("usage") or {}).get("completion_tokens")
    if not isinstance(total, int):
        raise BackendError(f"model {model}: llama.cpp sent a chunk without a token count; is xllamacpp too old?")
    return total
