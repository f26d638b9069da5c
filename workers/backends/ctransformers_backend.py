"""Serve GGUF/GGML models on CPU with ctransformers (0.2.27).

Generation is driven token by token (``llm.generate``) rather than through
ctransformers' own text loop, which reports neither counts nor a finish reason
and mangles multi-byte characters: this module supplies ids and token bytes,
:class:`~workers.backends.base.GenerationRun` does the rest. The library's
quirks are handled where noted; see docs/architecture.md, sections
"workers/backends and model files" and "Library facts the code relies on".
"""

from __future__ import annotations

import ctypes
import platform
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workers.backends.base import (
    BackendError,
    Generation,
    GenerationRun,
    PromptTooLongError,
    SamplingParams,
    check_model_file,
)
from workers.contract.modelfile import GGUF_MAGIC, ModelFileError, check_ggml_file, file_magic, ggml_layout
from workers.contract.registry import ModelSpec
from workers.special_tokens import hidden_tokens

_LIB_NAMES = {"Linux": "libctransformers.so", "Darwin": "libctransformers.dylib", "Windows": "ctransformers.dll"}

#: Tokens the repetition penalty looks back over (ctransformers' default).
_LAST_N_TOKENS = 64

def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU feature flags Linux reports; empty where there is no /proc/cpuinfo."""
    try:
        text = cpuinfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def choose_lib(flags: set[str] | None = None) -> str:
    """Path of the ctransformers build this CPU can run.

    Chosen explicitly because ctransformers' own choice calls ``py-cpuinfo``,
    which takes over a second and starts a child process to run CPUID (which a
    daemonic worker process, like Celery's prefork children, may not do).
    The avx build also uses F16C, so it needs both flags, as ctransformers
    itself requires.
    """
    from workers.backends.ctransformers_llm import package_dir

    flags = cpu_flags() if flags is None else flags
    if "avx2" in flags:
        build = "avx2"
    elif "avx" in flags and "f16c" in flags:
        build = "avx"
    else:
        build = "basic"
    name = _LIB_NAMES.get(platform.system())
    if name is None:
        return build  # ctransformers resolves a build name itself
    path = package_dir() / "lib" / build / name
    if not path.is_file():
        raise BackendError(f"ctransformers has no {build} library at {path}; reinstall ctransformers")
    return str(path)


def check_ggml_layout(path: Path, model_type: str) -> None:
    """Raise :class:`BackendError` unless ``path`` is laid out as ``model_type`` expects.

    Only the legacy GGML layouts govgate knows are checked (GGUF files carry
    their architecture; other model types are left to ctransformers); see
    :func:`~workers.contract.modelfile.check_ggml_file`.
    """
    layout = ggml_layout(model_type)
    if layout is None:
        return
    try:
        if file_magic(path) != GGUF_MAGIC:
            check_ggml_file(path, layout)
    except OSError as exc:
        raise BackendError(f"model file {path} cannot be read: {exc}") from None
    except ModelFileError as exc:
        raise BackendError(
            f"model file {path} is not a {model_type!r} GGML file ({exc.reason}); check model_type, or is it truncated?"
        ) from None


class CTransformersModel:
    """A model loaded by ctransformers. One generation at a time; others wait."""

    def __init__(self, spec: ModelSpec, llm: Any, lib: str) -> None:
        self.spec = spec
        self.lib = lib
        self._llm = llm
        self._detokenize = llm.ctransformers_llm_detokenize
        #: Control, unknown and marker tokens: generated, counted, never shown.
        self._hidden = hidden_tokens(spec.path).ids
        bos = llm.bos_token_id
        #: What an empty prompt is sent as when the tokenizer adds no BOS. Old
        #: GGML files (gpt2, gpt_neox, dolly-v2) get no BOS, and generating from
        #: no tokens samples from the *previous* request's logits: noise that
        #: depends on someone else's prompt. So it starts from the model's start
        #: token instead (GPT-2's ``<|endoftext|>``).
        self._start_token = bos if 0 <= bos < llm.vocab_size else llm.eos_token_id
        self._lock = threading.Lock()
        self._owner: int | None = None

    @classmethod
    def load(cls, spec: ModelSpec) -> CTransformersModel:
        """Load ``spec.path``; every failure is a :class:`BackendError` naming the model."""
        # ctransformers looks a path that does not exist up on the Hugging Face
        # hub, and a truncated GGUF loads and then reads past its memory map.
        check_model_file(spec.path)
        # Its GGML loaders trust the file completely: given the wrong model_type
        # (a gpt2 file as gpt_neox) they hang or allocate until the kernel kills
        # the worker, and a truncated file serves garbage.
        check_ggml_layout(spec.path, spec.model_type)
        try:
            from workers.backends.ctransformers_llm import llm_module

            ctransformers_llm = llm_module()  # ctransformers' model class, without its hub client
        except ImportError as exc:
            raise BackendError(f"model {spec.name}: ctransformers is not installed ({exc})") from None
        lib = choose_lib()
        # What ctransformers' AutoModelForCausalLM.from_pretrained does for a local file, minus the hub.
        config = ctransformers_llm.Config(threads=spec.threads, context_length=spec.context_length, gpu_layers=0)
        try:
            llm = ctransformers_llm.LLM(
                model_path=str(spec.path),
                model_type=spec.model_type,  # used for old GGML files only; GGUF names its architecture
                config=config,
                lib=lib,
            )
        except (RuntimeError, ValueError, OSError) as exc:
            raise BackendError(f"model {spec.name}: ctransformers cannot load {spec.path}: {exc}") from None
        if llm.vocab_size <= 0 or llm.context_length <= 0:
            raise BackendError(f"model {spec.name}: {spec.path} loaded without a vocabulary or context")
        return cls(spec, llm, lib)

    @property
    def context_length(self) -> int:
        """Context slots the loaded model really has (what ctransformers allocated).

        Asked of the library because for old GGML files it is the file's
        ``n_ctx`` and the ``context_length`` we passed is ignored.
        """
        return self._llm.context_length

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` as a prompt, exactly as the model will see them.

        llama models get BOS first; GGML-era models get none, except that an
        empty text becomes their start token (see ``_start_token``).
        """
        data = text.encode("utf-8")
        if b"\x00" in data:
            raise BackendError("text contains a NUL character, which the model's C API cannot take")
        # Worst case: BOS, the leading-space piece, then one byte token per byte.
        # Not ``LLM.tokenize``: it allocates len(text) + 1 ints, and the llama
        # tokenizer can write past that (it falls back to one token per byte).
        buffer = (ctypes.c_int * (len(data) + 8))()
        n = self._llm.ctransformers_llm_tokenize(data, True, buffer)
        # Never empty: with no tokens the model would sample stale logits.
        return list(buffer[:n]) or [self._start_token]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def stream(self, prompt: str, params: SamplingParams) -> GenerationRun:
        """Start a generation. Errors about the prompt are raised now, before any piece."""
        tokens = self.tokenize(prompt)
        # Past the context window ctransformers only logs a warning and then
        # produces garbage, so the fit is checked before any evaluation.
        if len(tokens) + params.max_tokens > self.context_length:
            raise PromptTooLongError(len(tokens), params.max_tokens, self.context_length)
        return GenerationRun(
            self._token_ids(tokens, params),
            self._token_bytes,
            prompt_tokens=len(tokens),
            params=params,
        )

    def generate(self, prompt: str, params: SamplingParams) -> Generation:
        return self.stream(prompt, params).collect()

    def _token_bytes(self, token: int) -> bytes:
        if token in self._hidden:  # this build prints an unknown token as "▅"
            return b""
        return self._detokenize(token) or b""

    def _token_ids(self, tokens: list[int], params: SamplingParams) -> Iterator[int]:
        """Sampled ids until end-of-sequence; holds the model while running.

        The lock is taken on the first ``next()`` and released when the run
        ends or is closed, so an abandoned stream frees the model. A second
        stream on the same thread would wait on itself forever, so it fails.
        """
        if self._owner == threading.get_ident():
            raise BackendError(
                f"model {self.spec.name} is already generating on this thread; finish or close that stream first"
            )
        if params.greedy:  # temperature=0 divides by zero in the sampler; greedy is top_k=1
            top_k, top_p, temperature = 1, 1.0, 1.0
        else:
            top_k = params.top_k if params.top_k > 0 else self._llm.vocab_size
            top_p, temperature = params.top_p, params.temperature
        # No seed asks for a fresh one per generation. ctransformers' own -1 seeds with time(NULL), whole
        # seconds: every unseeded request within one second sampled the same text.
        seed = params.seed % 2**31 if params.seed >= 0 else secrets.randbelow(2**31)
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield from self._llm.generate(
                    tokens,
                    top_k=top_k,
                    top_p=top_p,
                    temperature=temperature,
                    repetition_penalty=params.repetition_penalty,
                    last_n_tokens=_LAST_N_TOKENS,
                    seed=seed,
                    threads=self.spec.threads,
                    reset=True,
                )
            except BackendError:
                raise
            except RuntimeError as exc:  # ctransformers' "Failed to evaluate tokens."
                raise BackendError(f"model {self.spec.name}: generation failed: {exc}") from exc
            finally:
                self._owner = None
