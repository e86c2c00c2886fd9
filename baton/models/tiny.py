"""The toy model kit: tiny causal LMs and phrase adapters, built in-process with fixed seeds.

There is no model hub here, so tests, benchmarks and the demo build their own model: a ``Qwen3ForCausalLM`` (an
architecture both transformers and vLLM serve) with random weights, a byte-level BPE tokenizer trained on a small
English and Russian corpus, and Qwen's ChatML chat template. The weights are random, so the base model babbles;
``train_phrase_adapter`` then trains a LoRA that makes greedy chat output start with a chosen phrase — an output a
test can predict exactly, with the adapter and without.

Both builders are deterministic (the same arguments give the same files) and idempotent (a folder that already
holds the build, as its stamp file says, is returned at once), and both publish atomically: they write into a
temporary sibling folder and rename it into place, so a crash never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from baton.models.publish import publish, sha256_file, write_json
from baton.runtime.errors import FailedPrecondition, InvalidArgument
from baton.runtime.logging import log_event

log = logging.getLogger(__name__)

# Bump when the corpus, the template or the build recipe changes: stamps of older builds then no longer match.
KIT_VERSION = 1
MODEL_STAMP = "baton-tiny.json"
ADAPTER_STAMP = "baton-tiny-adapter.json"  # not baton-adapter.json: that is the trainer's metadata

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# Qwen's ChatML without tools and thinking: the same prompt shape the real model sees.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2's pre-tokenizer regex: the tokenizer then splits text the way Qwen2Tokenizer does, whichever class loads it.
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Head sizes vLLM's CPU attention backend has kernels for; another size loads in transformers but not in vLLM.
VLLM_CPU_HEAD_SIZES = frozenset({32, 64, 80, 96, 112, 128, 160, 192, 224, 256})

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

CHAT_PROMPTS: tuple[str, ...] = (
    "Hello! Who are you?",
    "What can you do for me?",
    "Tell me a short story.",
    "Привет! Как дела?",
    "Расскажи о себе.",
    "Что ты умеешь делать?",
)

# The tokenizer's training text. The users write Russian, so Cyrillic words get merges of their own instead of
# falling apart into two-byte pieces.
_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "A personal language model learns from the texts of one person.",
    "Memory is an index of documents; a view is an adapter trained on them.",
    "The scheduler hands the GPU to one heavy job at a time.",
    "Training writes checkpoints, so a stopped job can resume later.",
    "Ask a question and the assistant answers with citations.",
    "Hello! How are you today? I am fine, thank you.",
    "What can you do? I can read, search, summarise and answer.",
    "Tell me a story about a small robot who wanted to learn to sing.",
    "Who are you? I am a tiny model built for tests.",
    "The weather is cold and the sky is grey, but the tea is hot.",
    "She wrote a letter to her friend and sent it in the morning.",
    "Books, notes and emails become chunks, and chunks become vectors.",
    "A short answer is often better than a long one.",
    "Please summarise this document in three sentences.",
    "The meeting starts at nine o'clock on Monday.",
    "We trained the adapter for ten minutes on one card.",
    "Numbers like 1, 2, 3, 42 and 2026 appear in text too.",
    "Good morning! Good evening! Good night!",
    "Thank you for your help; it was very useful.",
    "The river flows through the old city towards the sea.",
    "He likes coffee, she likes tea, and they both like cake.",
    "Search finds the passages; the model writes the answer.",
    "Can you explain how this works, step by step?",
    "The user asks, the assistant answers, and the system prompt sets the rules.",
    "Быстрая коричневая лиса прыгает через ленивую собаку.",
    "Личная языковая модель учится на текстах одного человека.",
    "Память — это индекс документов, а взгляд — это адаптер, обученный на них.",
    "Планировщик отдаёт видеокарту одной тяжёлой задаче за раз.",
    "Обучение сохраняет контрольные точки, поэтому задачу можно продолжить.",
    "Задай вопрос, и ассистент ответит со ссылками на источники.",
    "Привет! Как дела? У меня всё хорошо, спасибо.",
    "Что ты умеешь делать? Я умею читать, искать и отвечать.",
    "Расскажи о себе. Я маленькая модель для тестов.",
    "Расскажи мне короткую историю о маленьком роботе, который хотел петь.",
    "Кто ты? Я помощник, который помнит твои заметки.",
    "На улице холодно и серо, но чай горячий.",
    "Она написала письмо подруге и отправила его утром.",
    "Книги, заметки и письма становятся фрагментами, а фрагменты — векторами.",
    "Короткий ответ часто лучше длинного.",
    "Пожалуйста, перескажи этот документ в трёх предложениях.",
    "Встреча начинается в девять часов в понедельник.",
    "Мы обучали адаптер десять минут на одной карте.",
    "Доброе утро! Добрый вечер! Спокойной ночи!",
    "Спасибо за помощь, это было очень полезно.",
    "Река течёт через старый город к морю.",
    "Он любит кофе, она любит чай, а оба любят торт.",
    "Поиск находит отрывки, а модель пишет ответ.",
    "Объясни, пожалуйста, как это работает, шаг за шагом.",
    "Пользователь спрашивает, ассистент отвечает, а системная подсказка задаёт правила.",
    "Философия учит нас думать о свободе и ответственности.",
    "Москва, Санкт-Петербург и Казань — большие города России.",
)


def build_tiny_model(
    folder: Path,
    *,
    seed: int = 0,
    model_id: str = "baton/tiny-qwen3",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    head_dim: int = 32,
    intermediate_size: int = 128,
    vocab_size: int = 1024,
    max_position_embeddings: int = 1024,
) -> Path:
    """Build a complete Hugging Face model folder (config, generation config, safetensors weights, tokenizer with
    a chat template) for a tiny random ``Qwen3ForCausalLM``; return ``folder``.

    The defaults give about 200k parameters: it loads and trains in seconds on a CPU. ``model_id`` is the name the
    build records in its stamp, for services that report which model they serve.
    """
    spec: dict[str, Any] = {
        "kit_version": KIT_VERSION,
        "model_id": model_id,
        "seed": seed,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
    }
    _check_model_spec(spec)
    return publish(folder, MODEL_STAMP, spec, lambda staging: _write_model(staging, spec), event="tiny.model_built")


def train_phrase_adapter(
    model_path: Path,
    out_dir: Path,
    *,
    phrase: str,
    rank: int = 8,
    alpha: int = 16,
    seed: int = 0,
    steps: int = 120,
    lr: float = 1e-2,
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES,
) -> Path:
    """Train a LoRA adapter on ``model_path`` so that greedy chat output on every ``CHAT_PROMPTS`` entry starts
    with ``phrase``; save it with ``save_pretrained`` into ``out_dir`` and return ``out_dir``.

    CPU, float32, full batch, loss on the phrase tokens (and the closing ``<|im_end|>``) only.
    ``base_model_name_or_path`` in ``adapter_config.json`` is ``str(model_path)``, as given.
    """
    if not phrase.strip():
        raise InvalidArgument("phrase is empty: give the text the adapter should make the model say")
    if rank < 1 or alpha < 1 or steps < 1 or lr <= 0:
        raise InvalidArgument(f"rank, alpha and steps must be >= 1 and lr > 0; got {rank=} {alpha=} {steps=} {lr=}")
    weights = Path(model_path) / "model.safetensors"
    if not weights.is_file():
        raise FailedPrecondition(f"no model.safetensors in {model_path}: build the model first (build_tiny_model)")
    spec: dict[str, Any] = {
        "kit_version": KIT_VERSION,
        "base_model_name_or_path": str(model_path),
        # The base's weights, not just its path: a rebuilt base makes the old adapter stale.
        "base_weights_sha256": sha256_file(weights),
        "phrase": phrase,
        "rank": rank,
        "alpha": alpha,
        "seed": seed,
        "steps": steps,
        "lr": lr,
        "target_modules": list(target_modules),
    }
    return publish(
        out_dir, ADAPTER_STAMP, spec, lambda staging: _train_adapter(staging, spec), event="tiny.adapter_built"
    )


def random_adapter(
    model_path: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    rank: int = 8,
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
) -> Path:
    """A seeded LoRA adapter of any local model, its A and B matrices random (peft starts B at zero, which would
    change nothing): for tests and benchmarks of the serving path on real models, where training one would take
    minutes. Written once into ``out_dir`` (kept if already there); returns ``out_dir``."""
    if (out_dir / "adapter_model.safetensors").is_file():
        return out_dir
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(target_modules), init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn_like(parameter) * 0.05)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


def greedy_chat(model_path: Path, prompt: str, *, adapter_dir: Path | None = None, max_new_tokens: int = 32) -> str:
    """The reference answer: greedy decoding of one user message with transformers (+ peft when ``adapter_dir``),
    float32 on the CPU; special tokens are dropped from the text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    input_ids = torch.tensor([chat_prompt_ids(tokenizer, prompt)])
    with torch.inference_mode(), _one_thread():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)


def chat_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of one user message rendered with the chat template, ending with the assistant's header."""
    messages = [{"role": "user", "content": prompt}]
    # Render to text, then tokenize: apply_chat_template(tokenize=True) changed its return type across versions.
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def file_hashes(folder: Path, names: Sequence[str] | None = None) -> dict[str, str]:
    """SHA-256 of the files in ``folder`` (or of ``names``): how tests check that two builds are identical."""
    if names is None:
        paths = sorted(path for path in folder.iterdir() if path.is_file())
    else:
        paths = [folder / name for name in names]
    return {path.name: sha256_file(path) for path in paths}


# --- the model ------------------------------------------------------------------------------------------------


def _check_model_spec(spec: dict[str, Any]) -> None:
    if spec["head_dim"] not in VLLM_CPU_HEAD_SIZES:
        raise InvalidArgument(
            f"head_dim {spec['head_dim']} has no vLLM CPU attention kernel; use one of {sorted(VLLM_CPU_HEAD_SIZES)}"
        )
    if spec["num_kv_heads"] < 1 or spec["num_heads"] % spec["num_kv_heads"]:
        raise InvalidArgument(
            f"num_heads {spec['num_heads']} must be a positive multiple of num_kv_heads {spec['num_kv_heads']}"
        )
    # Every byte has a token of its own, plus the special tokens: a smaller vocabulary cannot encode all text.
    if spec["vocab_size"] < 256 + len(SPECIAL_TOKENS):
        raise InvalidArgument(f"vocab_size {spec['vocab_size']} is below the byte alphabet; use at least 512")
    small = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings")
    if any(spec[key] < 1 for key in small):
        raise InvalidArgument(f"{', '.join(small)} must all be >= 1")


def _write_model(staging: Path, spec: dict[str, Any]) -> None:
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    tokenizer = _train_tokenizer(spec["vocab_size"])
    tokenizer.save(str(staging / "tokenizer.json"))
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    config = Qwen3Config(
        vocab_size=spec["vocab_size"],
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_kv_heads"],
        head_dim=spec["head_dim"],
        max_position_embeddings=spec["max_position_embeddings"],
        tie_word_embeddings=False,
        # 1/sqrt(hidden) rather than Qwen's 0.02 (meant for hidden 4096): at hidden 64 a 0.02 lm_head keeps every
        # logit within ±1.5, so a LoRA (which leaves lm_head alone) could not push the loss below ~5.7 and made the
        # phrase only barely the argmax — too thin a margin for vLLM and transformers to agree on.
        initializer_range=spec["hidden_size"] ** -0.5,
        bos_token_id=None,
        eos_token_id=ids[IM_END],
        pad_token_id=ids[ENDOFTEXT],
        dtype="float32",
    )
    # A forked RNG: the build must not move the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        model = Qwen3ForCausalLM(config)
    # Like Qwen: a chat turn ends with <|im_end|>, raw text with <|endoftext|>; both stop generation.
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=[ids[IM_END], ids[ENDOFTEXT]], pad_token_id=ids[ENDOFTEXT]
    )
    model.save_pretrained(staging)
    write_json(staging / "tokenizer_config.json", _tokenizer_config(spec["max_position_embeddings"]))


def _train_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    # Qwen2's pipeline (NFC, its split regex, byte-level without a prefix space): AutoTokenizer loads the file as
    # Qwen2Tokenizer, which builds exactly this pipeline, so both readings of the folder tokenize alike.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return tokenizer


def _tokenizer_config(max_length: int) -> dict[str, Any]:
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": max_length,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "chat_template": CHAT_TEMPLATE,
        # Byte-level BPE restores spaces itself; the "clean-up" would turn "a ." into "a." and break exact checks.
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "split_special_tokens": False,
        "errors": "replace",
    }


# --- the adapter ----------------------------------------------------------------------------------------------


def _train_adapter(staging: Path, spec: dict[str, Any]) -> None:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path = spec["base_model_name_or_path"]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    batch = _phrase_batch(tokenizer, spec["phrase"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        lora = LoraConfig(
            r=spec["rank"],
            lora_alpha=spec["alpha"],
            lora_dropout=0.0,  # no dropout: training is deterministic and the phrase is learnt in few steps
            target_modules=list(spec["target_modules"]),
            task_type=TaskType.CAUSAL_LM,
        )
        model = get_peft_model(base, lora)
        model.peft_config["default"].base_model_name_or_path = model_path
        with _one_thread():
            loss = _fit(model, batch, steps=spec["steps"], lr=spec["lr"])
    log_event(log, "tiny.adapter_trained", phrase=spec["phrase"], steps=spec["steps"], final_loss=round(loss, 5))
    model.save_pretrained(str(staging))
    _sort_target_modules(staging / "adapter_config.json")


def _sort_target_modules(config_path: Path) -> None:
    # peft keeps target_modules as a set, so its saved order follows the string hash seed of the process; sorted,
    # the same arguments give the same file in every process.
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    write_json(config_path, config)


def _phrase_batch(tokenizer: Any, phrase: str) -> dict[str, Any]:
    """Every chat prompt followed by ``phrase<|im_end|>``, right-padded; labels only on the answer."""
    import torch

    answer = [*tokenizer(phrase, add_special_tokens=False)["input_ids"], tokenizer.convert_tokens_to_ids(IM_END)]
    prompts = [chat_prompt_ids(tokenizer, prompt) for prompt in CHAT_PROMPTS]
    width = max(len(prompt) for prompt in prompts) + len(answer)
    input_ids, labels, mask = [], [], []
    for prompt in prompts:
        pad = width - len(prompt) - len(answer)
        input_ids.append(prompt + answer + [tokenizer.pad_token_id] * pad)
        labels.append([-100] * len(prompt) + answer + [-100] * pad)
        mask.append([1] * (len(prompt) + len(answer)) + [0] * pad)
    return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def _fit(model: Any, batch: dict[str, Any], *, steps: int, lr: float) -> float:
    import torch

    optimizer = torch.optim.AdamW([param for param in model.parameters() if param.requires_grad], lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one thread for a while. The matrices are tiny, so intra-op threads only add overhead, and on a
    busy 2-core machine their spin-waiting made 120 training steps take 45 s instead of 1.8 s. One thread also
    keeps the float sums, hence the adapter's bytes, the same on machines with other core counts."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --- atomic, idempotent publishing -----------------------------------------------------------------------------
