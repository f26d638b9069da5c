"""The gateway's pure-Python token counters equal the real backends' counts.

Why against the real backends: the gateway refuses over-long prompts with the
counts of :mod:`workers.contract.tokenizers`, so an off-by-one there either rejects a
prompt the model would take or queues one the worker must refuse. Every text
of a broad corpus is counted by the backend that serves the model and by the
tokenizer, and the two must agree exactly.
"""

from __future__ import annotations

import random
import string
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.family_models import FAMILY_CONTEXT, family_spec
from workers.backends import load_model
from workers.contract.registry import ModelSpec
from workers.tinyggml import FAMILIES, family_file_name
from workers.tinymodel import write_tiny_llama_gguf
from workers.contract.tokenizers import GgmlTokenizer, SpmTokenizer, load_tokenizer


def _corpus() -> list[str]:
    fixed = [
        "",
        " ",
        "  ",
        "     ",
        "hello",
        "Hello world",
        "The quick brown fox jumps over the lazy dog.",
        "the model is a good worker and the queue is long",
        "a gate model policy token queue audit worker request prompt local secret allow deny rule trust",
        " leading space",
        "trailing space ",
        "  both  ",
        "multiple   spaces    between     words",
        "!!!...???,,,;;;:::---",
        "((([[[{{{<<<>>>}}}]]])))",
        "a+b=c; d*e/f%g & h|i ^ j~k`l@m#n$o",
        "line one\nline two\n\nline four\n",
        "\n",
        "\n\n\n\n\n",
        "\t",
        "\ttab\tseparated\tvalues\t",
        "mixed \t \n \r\n whitespace",
        "x\n \n  \n   \n",
        "0",
        "1234567890",
        "3.14159 2.71828 1e-10 -42 +7 1,000,000",
        "in 2023, 12 models and 345 tokens",
        "😀",
        "😀🎉👍🏽 emoji and 🧑‍💻 zwj",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 𐍈 𒀀",
        "日本語のテキストです。",
        "中文文本，没有空格。",
        "한국어 텍스트",
        "café naïve résumé Ångström façade Zürich",
        "Ελληνικά και кириллица",
        "مرحبا بالعالم",
        "<s>",
        "</s>",
        "<unk>",
        "<s>hi</s><unk>",
        "x<s>y</s>z<unk>w",
        " <s> </s> <unk> ",
        "<bos><eos><pad><start_of_turn>user\nhi<end_of_turn>",
        "<div><ul><li>item</li></ul></div> <b>bold</b> <h1>title</h1>",
        "<p> </p> a> </b",
        "[multimodal]<start_of_image><end_of_image>",
        "### Instruction:\nsay hi\n\n### Response:\nhi\n### End",
        "### End the ### Instruction: x### Response:y",
        "it's they're I'll we've he'd I'm can't",
        "'s 't 're 've 'm 'll 'd",
        "\u2581already\u2581escaped",
        "x" * 300,
        "the" * 80,
        "supercalifragilisticexpialidocious" * 5,
        "a" * 1000,
        " " * 40,
        "\n" * 70,
        "\t" * 40,
        "\u00a0non-breaking\u2009thin\u3000ideographic",
        "control\x01\x02\x07\x1b\x7f chars",
        "\u0301combining e\u0301 a\u0308",
    ]
    rng = random.Random(20230707)
    printable = string.printable
    for _ in range(120):
        fixed.append("".join(rng.choice(printable) for _ in range(rng.randint(1, 120))))
    pools = [
        lambda: chr(rng.randint(0x20, 0x7E)),
        lambda: chr(rng.randint(0xA0, 0x2FF)),
        lambda: chr(rng.randint(0x4E00, 0x9FFF)),
        lambda: chr(rng.randint(0x1F300, 0x1F64F)),
        lambda: rng.choice(" \n\t  "),
        lambda: rng.choice(["the ", "model ", "<s>", "</s>", "<b>", "'s ", "  ", "\n\n"]),
    ]
    for _ in range(80):
        fixed.append("".join(rng.choice(pools)() for _ in range(rng.randint(1, 80))))
    return fixed


CORPUS = _corpus()


def _mismatches(model, tokenizer) -> list[tuple[str, int, int]]:
    out = []
    for text in CORPUS:
        expected = model.count_tokens(text)
        got = tokenizer.count(text)
        if expected != got:
            out.append((text[:60], expected, got))
    return out


def _close(model) -> None:
    close = getattr(model, "close", None)
    if close is not None:
        close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("tok") / "tiny.gguf", context_length=256)


@pytest.fixture(scope="module")
def ggml_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tok-ggml")
    return {
        family: entry.writer(folder / family_file_name(family), context_length=FAMILY_CONTEXT)
        for family, entry in FAMILIES.items()
        if entry.file_format != "GGUF"
    }


def test_corpus_is_broad() -> None:
    assert len(CORPUS) > 250
    assert "" in CORPUS


@pytest.mark.parametrize("backend", ["ctransformers", "llama.cpp"])
def test_tiny_llama_gguf_counts_match_backend(tiny_gguf: Path, backend: str) -> None:
    spec = ModelSpec(name=f"tiny-{backend}", path=tiny_gguf, backend=backend, context_length=256)
    tokenizer = load_tokenizer(spec)
    assert isinstance(tokenizer, SpmTokenizer)
    model = load_model(spec)
    try:
        assert _mismatches(model, tokenizer) == []
    finally:
        _close(model)


@pytest.mark.parametrize("family", ["cerebras-gpt", "dolly-v2", "stablelm"])
def test_ggml_family_counts_match_backend(ggml_files: dict[str, Path], family: str) -> None:
    spec = family_spec(family, ggml_files[family])
    tokenizer = load_tokenizer(spec)
    assert isinstance(tokenizer, GgmlTokenizer)
    model = load_model(spec)
    try:
        assert _mismatches(model, tokenizer) == []
    finally:
        _close(model)


def test_dolly_instruction_markers_are_single_tokens(ggml_files: dict[str, Path]) -> None:
    tokenizer = load_tokenizer(family_spec("dolly-v2", ggml_files["dolly-v2"]))
    assert tokenizer.count("### End") == 1
    assert tokenizer.count("### Instruction:### Response:") == 2


def test_empty_prompt_counts(tiny_gguf: Path, ggml_files: dict[str, Path]) -> None:
    assert load_tokenizer(ModelSpec(name="t", path=tiny_gguf)).count("") == 1  # BOS
    assert load_tokenizer(family_spec("stablelm", ggml_files["stablelm"])).count("") == 1  # start token


def test_unsupported_kinds_give_none(tmp_path: Path, ggml_files: dict[str, Path]) -> None:
    from gguf import GGUFWriter

    assert load_tokenizer(ModelSpec(name="missing", path=tmp_path / "nope.gguf")) is None
    bpe = tmp_path / "bpe.gguf"
    writer = GGUFWriter(bpe, arch="llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert load_tokenizer(ModelSpec(name="bpe", path=bpe, backend="llama.cpp")) is None
    other = family_spec("stablelm", ggml_files["stablelm"])
    assert load_tokenizer(ModelSpec(name="mpt", path=other.path, model_type="mpt")) is None


@pytest.fixture(scope="module")
def gemma_spec(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelSpec]:
    from workers.default_model import assemble_gemma
    from workers.contract.registry import default_model_spec

    var = tmp_path_factory.mktemp("gemma-var")
    spec = default_model_spec(var)
    assemble_gemma(spec.path)
    yield spec


@pytest.mark.slow
def test_gemma_counts_match_llamacpp(gemma_spec: ModelSpec) -> None:
    tokenizer = load_tokenizer(gemma_spec)
    assert isinstance(tokenizer, SpmTokenizer)
    model = load_model(gemma_spec)
    try:
        assert _mismatches(model, tokenizer) == []
        # Every user-defined token llama.cpp splits out of plain text, and the
        # one it does not ("</s>", which it treats as a control token).
        for special in ["<s>", "</s>", "<b>", "</div>", "[multimodal]", "<start_of_image>", "\n" * 31, " " * 31]:
            text = f"a{special}a"
            assert tokenizer.count(text) == model.count_tokens(text), repr(text)
    finally:
        _close(model)
