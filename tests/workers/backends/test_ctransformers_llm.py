"""ctransformers' model class loaded without the package's ``__init__`` (and so without ``huggingface_hub``).

``workers/backends/ctransformers_llm.py`` loads the installed package's
directory under a private name. These check, on the real library and the
real tiny model, that the model it loads is the one ctransformers' own
``AutoModelForCausalLM.from_pretrained`` loads for a local file, that the hub
client and the real package stay out of the process, and that the real
package still imports normally beside it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest_models import tiny_model_path, tiny_spec  # noqa: F401 - fixtures
from workers.backends import load_model
from workers.backends.ctransformers_backend import CTransformersModel, choose_lib
from workers.backends.ctransformers_llm import PACKAGE, llm_module, package_dir
from workers.contract.registry import ModelSpec

REPO = Path(__file__).resolve().parents[3]

#: Loads the tiny model through the backend in a fresh interpreter and reports what that imported.
_LOAD_AND_LIST = """
import json, sys
from pathlib import Path
from workers.backends import load_model
from workers.contract.registry import ModelSpec
model = load_model(ModelSpec(name="t", path=Path(sys.argv[1]), context_length=64))
text = model.generate("Hello", __import__("workers.contract.sampling", fromlist=["x"]).SamplingParams(
    max_tokens=4, temperature=0)).text
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("ctransformers", "huggingface_hub", %r))
import ctransformers  # the real package, untouched, still imports (and brings its hub client)
print(json.dumps({"loaded": loaded, "text": text, "real": ctransformers.LLM is not sys.modules[%r].LLM,
                  "hub_after": "huggingface_hub" in sys.modules}))
""" % (PACKAGE, f"{PACKAGE}.llm")


def test_loading_a_model_imports_neither_the_package_init_nor_the_hub(tiny_model_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", _LOAD_AND_LIST, str(tiny_model_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["loaded"] == [PACKAGE, f"{PACKAGE}.lib", f"{PACKAGE}.llm", f"{PACKAGE}.logger", f"{PACKAGE}.utils"]
    assert report["text"]  # it generated
    assert report["real"] and report["hub_after"]  # the real package is separate, and its __init__ did run then


def test_the_model_is_the_one_ctransformers_own_loader_makes(tiny_spec: ModelSpec) -> None:
    """Same architecture, vocabulary, context, tokens and greedy continuation as ``from_pretrained``."""
    from ctransformers import AutoModelForCausalLM

    ours = load_model(tiny_spec)
    assert isinstance(ours, CTransformersModel)
    theirs = AutoModelForCausalLM.from_pretrained(str(tiny_spec.path), model_type=tiny_spec.model_type,
                                                  lib=choose_lib(), threads=tiny_spec.threads,
                                                  context_length=tiny_spec.context_length, gpu_layers=0,
                                                  local_files_only=True)
    llm = ours._llm
    assert type(llm).__module__ == f"{PACKAGE}.llm"
    assert llm.model_type == theirs.model_type
    assert (llm.vocab_size, llm.context_length, llm.bos_token_id, llm.eos_token_id) == (
        theirs.vocab_size, theirs.context_length, theirs.bos_token_id, theirs.eos_token_id)
    prompt = "The quick brown fox"
    assert llm.tokenize(prompt) == theirs.tokenize(prompt)
    greedy = {"top_k": 1, "temperature": 1.0, "seed": 1, "max_new_tokens": 6}  # greedy by top_k (0 divides by 0)
    text = llm(prompt, **greedy)
    assert text and text == theirs(prompt, **greedy)


def test_it_is_loaded_once_and_lives_in_the_installed_package() -> None:
    assert llm_module() is llm_module()
    assert Path(llm_module().__file__) == package_dir() / "llm.py"
    assert (package_dir() / "__init__.py").is_file()


def test_without_ctransformers_installed_it_is_module_not_found_and_leaves_nothing_behind() -> None:
    """An interpreter without site-packages (``-S``): the error names the package, no half-made module stays."""
    script = ("import sys; sys.path.insert(0, %r)\n"
              "from workers.backends.ctransformers_llm import llm_module\n"
              "try:\n    llm_module()\nexcept ModuleNotFoundError as exc:\n    print(exc.name)\n"
              "print(sorted(m for m in sys.modules if 'ctransformers' in m))\n") % str(REPO)
    done = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["ctransformers", "['workers.backends.ctransformers_llm']"]
