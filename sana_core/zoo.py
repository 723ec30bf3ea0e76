"""The tiny offline model zoo: every model the pipeline loads, built with random weights from fixed seeds.

Each model is saved in the format its production loader reads (transformers / diffusers `save_pretrained`,
an open_clip checkpoint plus its config, vLLM-servable VLM folders), so tests and the demo run the real
loading code with no network. `PRODUCTION` names the real checkpoint each tiny model stands in for.

    zoo = ensure_zoo()          # builds what is missing under $SANA_ZOO_DIR or <repo>/.cache/zoo
    zoo.gemma, zoo.dcae         # folders for TextEncoder / Autoencoder .from_pretrained
    zoo.clip_model, zoo.clip_pretrained   # for sana_core.clip.load_clip
    zoo.vlms                    # name -> folder for vllm.LLM(model=folder)

Building is idempotent and safe across processes: an exclusive file lock serialises builders, and each
model is written to a temporary folder that is renamed into place only when complete.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sana_core.errors import SanaError, cli_main

REPO = Path(__file__).resolve().parent.parent
ZOO_VERSION = 2  # bump when a builder changes, so stale caches are rebuilt in a fresh folder

# The real checkpoints the tiny models stand in for (HF ids, open_clip name + pretrained tag).
PRODUCTION = {
    "gemma": "google/gemma-2-2b-it",
    "dcae": "mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers",
    "clip_model": "ViT-L-14",
    "clip_pretrained": "openai",
    "vlms": {
        # one per tiny family, same architecture class as the tiny model
        "llava": "llava-hf/llava-1.5-7b-hf",
        "qwen2vl": "Qwen/Qwen2-VL-7B-Instruct",
        "idefics3": "HuggingFaceTB/SmolVLM-Instruct",
        "gemma3": "google/gemma-3-12b-it",
    },
}

CLIP_TINY_NAME = "sana-tiny-clip"


@dataclass
class Zoo:
    vlms: dict[str, str] = field(default_factory=dict)
    clip_model: str = ""
    clip_pretrained: str = ""
    gemma: str = ""
    dcae: str = ""


# ---------------------------------------------------------------------------------------------- tokenizers

_SUBJECTS = ["a cat", "a dog", "a man", "a woman", "a child", "a bird", "a horse", "a car", "a red car", "a tree",
             "a house", "a boat", "a flower", "a mountain", "a river", "a city street", "a bowl of fruit",
             "a plate of food", "a person", "two people", "a group of people", "a building", "a bicycle",
             "a train", "an airplane", "a cup of coffee", "a laptop", "a book", "a chair", "a table", "the sky",
             "a square", "a circle", "a blue square", "a green circle", "a yellow triangle", "a black and white photo"]
_VERBS = ["sitting on", "standing next to", "lying on", "walking along", "flying over", "parked near", "in front of",
          "behind", "under", "on top of", "looking at", "holding", "covered with", "surrounded by", "painted on"]
_PLACES = ["a wooden table", "the grass", "a sandy beach", "a snowy field", "the road", "a white background",
           "a dark background", "a busy market", "a quiet park", "the water", "a kitchen counter", "a stone wall",
           "a colorful wall", "the window", "a forest", "a garden", "the floor", "a field of flowers"]
_ADJ = ["bright", "dark", "blurry", "sharp", "colorful", "small", "large", "old", "new", "red", "blue", "green",
        "yellow", "white", "black", "orange", "purple", "pink", "brown", "gray", "shiny", "soft", "close-up"]
_STARTS = ["The image shows", "This is a photo of", "A picture of", "The photo shows", "In this image there is",
           "Describe the image.", "Describe this image in one sentence.", "What is in the picture?",
           "Write a short caption for this image.", "The scene contains"]


def caption_corpus(n: int = 600, seed: int = 0) -> list[str]:
    """Caption-like sentences covering common words, so trained tokenizers split real captions sensibly."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = f"{rng.choice(_STARTS)} {rng.choice(_ADJ)} {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_PLACES)}."
        if rng.random() < 0.3:
            s += f" It is {rng.choice(_ADJ)} and {rng.choice(_ADJ)}, with {rng.randint(1, 12)} objects."
        out.append(s)
    out += [" ".join(_ADJ), " ".join(_SUBJECTS), " ".join(_VERBS), " ".join(_PLACES), "0 1 2 3 4 5 6 7 8 9 10 100"]
    return out


def train_bpe(special_tokens: list[str], vocab_size: int = 640):
    """A byte-level BPE (any text encodes, no unknowns) trained offline on `caption_corpus`.

    Special tokens get ids 0..len(special_tokens)-1 in the order given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(caption_corpus(), trainer=trainer)
    return tok


def _seed(s: int) -> None:
    import torch

    random.seed(s)
    torch.manual_seed(s)


# ---------------------------------------------------------------------------------------------- Gemma-2

GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}<start_of_turn>{{ role }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _gemma_tokenizer():
    """Gemma's special-token layout (pad 0, eos 1, bos 2, unk 3), bos prepended like the real tokenizer."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tok = train_bpe(specials)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="right", model_max_length=8192,
                                   additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
                                   chat_template=GEMMA_CHAT_TEMPLATE)


def build_gemma(out: Path) -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    _seed(1)
    tok = _gemma_tokenizer()
    # hidden 64 matches DiTConfig "tiny" caption_channels; Sana takes the decoder's last hidden state.
    cfg = Gemma2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=1024,
                       sliding_window=256, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = Gemma2ForCausalLM(cfg).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)


# ---------------------------------------------------------------------------------------------- DC-AE

def build_dcae(out: Path) -> None:
    from diffusers import AutoencoderDC

    _seed(2)
    # The Sana DC-AE layout (6 stages -> 32x, 32 latent channels, ResBlocks then EfficientViT blocks,
    # conv down / interpolate up, its scaling factor) at a few channels per stage.
    vae = AutoencoderDC(
        in_channels=3, latent_channels=32, attention_head_dim=8,
        encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
        decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
        encoder_block_out_channels=(8, 16, 16, 16, 32, 32), decoder_block_out_channels=(8, 16, 16, 16, 32, 32),
        encoder_layers_per_block=(1, 1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1, 1),
        encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)), decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        upsample_block_type="interpolate", downsample_block_type="Conv", decoder_norm_types="rms_norm",
        decoder_act_fns="silu", scaling_factor=0.41407,
    ).eval()
    vae.save_pretrained(out)


# ---------------------------------------------------------------------------------------------- CLIP

CLIP_TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CLIP_CKPT = "open_clip_model.safetensors"


def build_clip(out: Path) -> None:
    import open_clip
    from safetensors.torch import save_file

    _seed(3)
    model = open_clip.model.CLIP(**CLIP_TINY_CONFIG).eval()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / CLIP_CKPT))
    # The open_clip hub layout: usable as `local-dir:<folder>` too, and read by sana_core.clip to register the name.
    cfg = {"model_name": CLIP_TINY_NAME, "model_cfg": CLIP_TINY_CONFIG,
           "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}}
    (out / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    (out / f"{CLIP_TINY_NAME}.json").write_text(json.dumps(CLIP_TINY_CONFIG, indent=2))  # for add_model_config


# ---------------------------------------------------------------------------------------------- VLMs
# Four architecture families that vLLM serves on the CPU. Sizes: 2 text layers, hidden 128, head_dim 64
# (vLLM's CPU attention rejects smaller head dims), a 2-layer vision tower; images are tiny (56 px), so an
# engine starts in well under a minute. Chat templates are "openai" style (they walk the content parts and
# emit the model's own image placeholder), which both vLLM's `LLM.chat` and transformers' processors accept.

_TEXT = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 2048}


def _template(user: str, assistant: str, end: str, image: str, gen: str, start: str = "{{ bos_token }}") -> str:
    return (start + "{% for m in messages %}{% if m['role'] == 'assistant' %}" + assistant + "{% else %}" + user
            + "{% endif %}{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
            "{% if c['type'] in ['image', 'image_url', 'image_pil', 'input_image'] %}" + image + "{% elif c['type'] == 'text' %}{{ c['text'] }}"
            "{% endif %}{% endfor %}{% endif %}" + end + "{% endfor %}{% if add_generation_prompt %}" + gen + "{% endif %}")


def _chat_tokenizer(specials: list[str], template: str, **named):
    from transformers import PreTrainedTokenizerFast

    named_tokens = set(named.values())
    extra = [t for t in specials if t not in named_tokens]
    return PreTrainedTokenizerFast(tokenizer_object=train_bpe(specials), chat_template=template,
                                   additional_special_tokens=extra, model_max_length=2048, **named)


def _save_vlm(out: Path, model, processor, rename: Callable[[str], str] | None = None) -> None:
    _mute_blank_tokens(model, processor.tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if rename is not None:
        from safetensors.torch import load_file, save_file

        for f in out.glob("*.safetensors"):
            sd = load_file(str(f))
            save_file({rename(k): v for k, v in sd.items()}, str(f), metadata={"format": "pt"})
        index = out / "model.safetensors.index.json"
        if index.exists():
            data = json.loads(index.read_text())
            data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
            index.write_text(json.dumps(data))


def _vision_model_level(key: str) -> str:
    """transformers 5 saves a CLIP/SigLIP tower as `vision_tower.embeddings...`; vLLM 0.32's LLaVA and
    Gemma-3 loaders want the `vision_tower.vision_model.embeddings...` level of the original checkpoints."""
    for prefix in ("model.vision_tower.", "vision_tower."):
        if key.startswith(prefix) and not key.startswith(prefix + "vision_model."):
            return prefix + "vision_model." + key[len(prefix):]
    return key


def _mute_blank_tokens(model, tok) -> None:
    """Zero the output-embedding rows of tokens that decode to nothing printable (special tokens, newline
    runs, stray bytes of multi-byte characters): their logit becomes 0 while a random model's other logits
    spread around 0, so greedy decoding of random weights emits visible text instead of a caption that
    strips to "" (which the stage reports as a failure). Every tiny VLM gets it (in _save_vlm): which ones
    a random init happens to favour is luck."""
    import torch

    def unprintable(text: str) -> bool:
        # "\ufffd": a lone byte of a multi-byte character; a run of them never becomes text, and vLLM's
        # incremental detokenizer emits nothing for it.
        return not text.strip() or "\ufffd" in text

    blank = [i for i in range(len(tok)) if unprintable(tok.decode([i], skip_special_tokens=True))]
    with torch.no_grad():
        model.get_output_embeddings().weight[blank] = 0


def build_llava(out: Path) -> None:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    _seed(10)
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = _chat_tokenizer(specials, _template("USER: ", "ASSISTANT: ", "{% if m['role'] == 'assistant' %}"
                                              "{{ eos_token }}{% endif %}\n", "<image>\n", "ASSISTANT:"),
                          unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    text = LlamaConfig(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=3, **_TEXT)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
                              image_size=56, patch_size=14, projection_dim=64)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(cfg).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    proc = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=tok.chat_template)
    _save_vlm(out, model, proc, rename=_vision_model_level)


def build_qwen2vl(out: Path) -> None:
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    _seed(11)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tok = _chat_tokenizer(specials, _template("<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n",
                                              "<|vision_start|><|image_pad|><|vision_end|>",
                                              "<|im_start|>assistant\n", start=""),
                          eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = tok.convert_tokens_to_ids
    text = dict(vocab_size=len(tok), rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                      "mrope_section": [8, 12, 12]},
                eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"), bos_token_id=ids("<|endoftext|>"),
                **{k: v for k, v in _TEXT.items() if k != "head_dim"})
    vision = {"depth": 2, "embed_dim": 128, "hidden_size": 128, "num_heads": 2, "mlp_ratio": 2, "patch_size": 14,
              "spatial_merge_size": 2, "temporal_patch_size": 2}
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                        vision_end_token_id=ids("<|vision_end|>"))
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    pixels = {"min_pixels": 56 * 56, "max_pixels": 112 * 112}
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels),
                            video_processor=Qwen2VLVideoProcessor(**pixels), tokenizer=tok,
                            chat_template=tok.chat_template)
    _save_vlm(out, model, proc)


def build_idefics3(out: Path) -> None:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        LlamaConfig,
    )

    _seed(12)
    grid = [f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)]
    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                "<global-img>"] + grid
    tok = _chat_tokenizer(specials, _template("<|im_start|>User:", "<|im_start|>Assistant:", "<end_of_utterance>\n",
                                              "<image>", "<|im_start|>Assistant:", start=""),
                          bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|endoftext|>")
    ids = tok.convert_tokens_to_ids
    text = LlamaConfig(vocab_size=len(tok), bos_token_id=ids("<|im_start|>"), eos_token_id=ids("<end_of_utterance>"),
                       pad_token_id=ids("<|endoftext|>"), **_TEXT)
    # 56 px / patch 14 = 4x4 patches, pixel-shuffled by scale_factor 2 -> 4 image tokens
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 1,
              "image_size": 56, "patch_size": 14}
    cfg = Idefics3Config(vision_config=vision, text_config=text.to_dict(), scale_factor=2,
                         image_token_id=ids("<image>"), pad_token_id=ids("<|endoftext|>"))
    model = Idefics3ForConditionalGeneration(cfg).eval()
    ip = Idefics3ImageProcessor(size={"longest_edge": 56}, max_image_size={"longest_edge": 56},
                                do_image_splitting=False)
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=tok.chat_template)
    _save_vlm(out, model, proc)


def build_gemma3(out: Path) -> None:
    from tokenizers import AddedToken
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        PreTrainedTokenizerFast,
    )

    _seed(13)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                "<end_of_image>", "<image_soft_token>"]
    template = _template("<start_of_turn>user\n", "<start_of_turn>model\n", "<end_of_turn>\n", "<start_of_image>",
                         "<start_of_turn>model\n")
    bpe = train_bpe(specials)
    # Gemma's SentencePiece vocabulary has newline runs as single tokens, and vLLM's Gemma-3 processor
    # looks them up by their literal text (vocab["\n\n"]), which a byte-level BPE spells differently.
    bpe.add_tokens([AddedToken("\n" * n, normalized=False) for n in (4, 3, 2, 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, chat_template=template, model_max_length=2048,
                                  pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
                                  additional_special_tokens=specials[4:],
                                  extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                                        "image_token": "<image_soft_token>"})
    ids = tok.convert_tokens_to_ids
    text = dict(vocab_size=len(tok), pad_token_id=0, eos_token_id=[1, ids("<end_of_turn>")], bos_token_id=2,
                query_pre_attn_scalar=64, sliding_window=256, **{k: v for k, v in _TEXT.items()})
    text["num_key_value_heads"] = 1
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 1,
              "image_size": 56, "patch_size": 14, "vision_use_head": False}
    # 4x4 patches average-pooled to 2x2 = 4 soft tokens per image
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                       boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
                       image_token_index=ids("<image_soft_token>"))
    model = Gemma3ForConditionalGeneration(cfg).eval()
    ip = Gemma3ImageProcessor(size={"height": 56, "width": 56})
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4, chat_template=template)
    _save_vlm(out, model, proc, rename=_vision_model_level)


# name -> builder of a tiny VLM that vLLM serves
VLM_BUILDERS: dict[str, Callable[[Path], None]] = {"llava": build_llava, "qwen2vl": build_qwen2vl,
                                                       "idefics3": build_idefics3, "gemma3": build_gemma3}


# ---------------------------------------------------------------------------------------------- building

def default_root() -> Path:
    return Path(os.environ.get("SANA_ZOO_DIR") or REPO / ".cache" / "zoo")


@contextlib.contextmanager
def _locked(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # a second builder waits here, then finds everything built
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _built_version(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / ".complete").read_text()).get("version", 1))
    except (OSError, ValueError):
        return None


def _build_once(root: Path, name: str, builder: Callable[[Path], None], log: Callable[[str], None]) -> Path:
    final = root / name
    version = BUILDER_VERSIONS.get(name, 1)
    if _built_version(final) == version:
        return final
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    builder(tmp)
    (tmp / ".complete").write_text(json.dumps({"zoo_version": ZOO_VERSION, "version": version,
                                               "built_s": round(time.time() - t0, 2)}))
    if final.exists():  # an older build of this model, or one without its completion marker
        shutil.rmtree(final)
    os.rename(tmp, final)
    log(f"built {name} in {time.time() - t0:.1f}s -> {final}")
    return final


# A model's folder is rebuilt when its builder's version here is newer than the one it was built with.
BUILDER_VERSIONS = {"vlm-gemma3": 4, "vlm-llava": 3, "vlm-qwen2vl": 3, "vlm-idefics3": 3}


CORE_BUILDERS: dict[str, Callable[[Path], None]] = {"gemma2": build_gemma, "dcae": build_dcae, "clip": build_clip}


def ensure_zoo(root: str | Path | None = None, vlms: bool = True, log: Callable[[str], None] | None = None) -> Zoo:
    """Build (once) and return the tiny zoo under `root` (default $SANA_ZOO_DIR or <repo>/.cache/zoo)."""
    root = Path(root) if root is not None else default_root()
    if root.exists() and not root.is_dir():
        raise SanaError(f"zoo root {root} exists and is not a folder")
    root = root / f"v{ZOO_VERSION}"
    log = log or (lambda s: None)
    with _locked(root):
        paths = {name: _build_once(root, name, b, log) for name, b in CORE_BUILDERS.items()}
        vlm_paths = {}
        if vlms:
            for name, b in VLM_BUILDERS.items():
                vlm_paths[name] = str(_build_once(root, f"vlm-{name}", b, log))
    return Zoo(vlms=vlm_paths, clip_model=CLIP_TINY_NAME, clip_pretrained=str(paths["clip"] / CLIP_CKPT),
               gemma=str(paths["gemma2"]), dcae=str(paths["dcae"]))


@cli_main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build the tiny offline model zoo (random weights, fixed seeds) "
                                             "and print where each model lives.")
    ap.add_argument("--root", default=None, help="cache folder (default $SANA_ZOO_DIR or <repo>/.cache/zoo)")
    ap.add_argument("--no-vlms", action="store_true", help="build only Gemma-2, DC-AE and CLIP")
    args = ap.parse_args(argv)
    t0 = time.time()
    zoo = ensure_zoo(args.root, vlms=not args.no_vlms, log=print)
    print(f"gemma:           {zoo.gemma}\ndcae:            {zoo.dcae}\n"
          f"clip_model:      {zoo.clip_model}\nclip_pretrained: {zoo.clip_pretrained}")
    for k, v in zoo.vlms.items():
        print(f"vlm {k + ':':12s} {v}")
    print(f"zoo ready in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
