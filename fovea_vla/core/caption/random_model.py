"""Randomly initialised SmolVLM-family models, saved like a downloaded one, for tests and benchmarks.

The robot loads real checkpoints (e.g. HuggingFaceTB/SmolVLM-256M-Instruct saved to a local folder).
These builders exist because this project must run offline: the ``tiny`` preset exercises the real
loading and generation path in milliseconds; ``smolvlm-256m`` has SmolVLM-256M's architecture and
size, so it costs what the real model costs to run (its captions are gibberish: never deploy it).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["PRESETS", "build_random_vlm"]

_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% else %} {{ part['text'] }}"
    "{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
_CORPUS = [
    "a robot arm pushes the red block onto the green square on the table",
    "the gripper holds a yellow cup; a person walks past the camera in the background",
    "The robot's task is. Measured by its vision pipeline: Gaze Scene Robot Task moving still",
    "User: Assistant: describe in one short sentence what is happening in the close-up",
]

# (vision, text, image size, scale factor); SmolVLM-256M: SigLIP-B/16 at 512 px, a 30-layer 576-wide
# Llama-style decoder, pixel shuffle 4 (64 image tokens per 512 px image).
PRESETS = {
    "tiny": (
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
        224,
        2,
    ),
    "smolvlm-256m": (
        dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49280,
        ),
        512,
        4,
    ),
}


def build_random_vlm(folder: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Save a randomly initialised Idefics3 (SmolVLM) model, its processor and a byte-level BPE
    tokenizer trained on a few sentences to ``folder``; returns the folder.

    Raises:
        ValueError: unknown preset.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: must be one of {sorted(PRESETS)}")
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        PreTrainedTokenizerFast,
    )

    # transformers >= 5.20 names the PIL processor ...Pil; earlier 5.x releases call it Idefics3ImageProcessor.
    image_processor_class = (
        getattr(transformers, "Idefics3ImageProcessorPil", None) or transformers.Idefics3ImageProcessor
    )

    vision, text, image_size, scale_factor = PRESETS[preset]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=_SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=_SPECIAL_TOKENS[3:],
    )
    patch = 16
    image_seq_len = (image_size // patch) ** 2 // scale_factor**2
    image_processor = image_processor_class(
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
        do_image_splitting=False,
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len, chat_template=_CHAT_TEMPLATE
    )
    text = {"model_type": "llama", "max_position_embeddings": 2048, "vocab_size": len(tokenizer), **text}
    config = Idefics3Config(
        vision_config={**vision, "image_size": image_size, "patch_size": patch},
        text_config=text,
        scale_factor=scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
