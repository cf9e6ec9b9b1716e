#!/usr/bin/env python
"""Train the testbed: a small Stable Diffusion pipeline and an open_clip scorer on the synthetic world
of optimize.runtime.testbed.world, within a wall-clock budget, with diffusers / transformers / open_clip classes.

Stages (each gets a share of ``--minutes``, measured by the wall clock at every step):
  0. data: render a fixed training set (train split, jittered) as one uint8 tensor on the device;
  1. vae: an AutoencoderKL 64x64x3 -> 16x16x4 (MSE + L1 + a small KL);
  2. clip: an open_clip CLIP (own model config, ViT image tower, small text tower), contrastive on the
     same images and captions (soft targets: equal captions in a batch are not negatives);
  3. unet: a UNet2DConditionModel with SD1.5's block pattern (CrossAttnDown x2 + Down, mirrored,
     two resnets per block, cross-attention) and a CLIPTextModel (real CLIP BPE tokenizer) trained
     jointly: epsilon prediction, SD's scaled-linear betas (0.00085..0.012, 1000 steps), captions
     dropped 10% of the time for classifier-free guidance, min-SNR-5 weighting, EMA weights saved;
  4. save (fp16 safetensors) and a short evaluation.

Output under --out:
  pipeline/          StableDiffusionPipeline.save_pretrained (DDIM scheduler, no safety checker)
  clip/              testbed-clip.json (open_clip model config) + testbed-clip.safetensors
  summary.json       per-stage steps, seconds, final losses; evaluation; sizes
  samples.png        held-out captions: ground truth (odd rows) and generated (even rows)

Install into the package:  rm -rf optimize/runtime/testbed/weights && mkdir -p optimize/runtime/testbed/weights &&
  cp -r OUT/pipeline OUT/clip OUT/summary.json optimize/runtime/testbed/weights/

Examples:
  python benchmarks/train_testbed.py --device cuda --minutes 7 --out /tmp/testbed
  python benchmarks/train_testbed.py --device cpu --minutes 2 --out /tmp/testbed-smoke
"""

from __future__ import annotations

import time

T0 = time.time()  # the budget counts from here: imports and CUDA start-up are part of it

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from optimize.runtime.testbed import world  # noqa: E402

CLIP_NAME = "testbed-clip"
MAX_MB = 25.0
VAE = dict(block_out_channels=(16, 32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
           layers_per_block=1, sample_size=64, down_block_types=("DownEncoderBlock2D",) * 3,
           up_block_types=("UpDecoderBlock2D",) * 3)
TEXT_HIDDEN = 48
UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(48, 96, 96),
            norm_num_groups=16, attention_head_dim=4, cross_attention_dim=TEXT_HIDDEN,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 96, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 3},
}
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
FRACTIONS = {"vae": 0.15, "clip": 0.12, "unet": 0.73}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Clock:
    """The whole run's wall budget, shared out to the stages as they start (what one stage leaves
    unused goes to the next ones); ``reserve`` seconds are kept for saving and evaluation."""

    def __init__(self, minutes: float, reserve: float):
        self.start = T0
        self.deadline = self.start + minutes * 60.0
        self.reserve = reserve

    def stage_end(self, name: str, left: list[str]) -> float:
        avail = max(0.0, self.deadline - self.reserve - time.time())
        share = FRACTIONS[name] / sum(FRACTIONS[k] for k in left)
        return time.time() + avail * share


def lr_at(base: float, step: int, warmup: int, frac: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% over the stage's wall time."""
    frac = min(max(frac, 0.0), 1.0)
    return base * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train(name, params, base_lr, end, step_fn, warmup, log_every=100, ema=None):
    """Run ``step_fn(step) -> loss tensor`` until the wall clock reaches ``end`` (never starting a step
    it expects to end after it); returns steps, seconds and the mean loss of the last 10% of steps."""
    opt = torch.optim.AdamW(params, lr=base_lr, betas=(0.9, 0.99), weight_decay=0.0)
    start = time.time()
    losses, step, step_time = [], 0, 0.0
    while True:
        now = time.time()
        if now + step_time > end and step > 0 or now >= end:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(base_lr, step, warmup, (now - start) / max(end - start, 1e-9))
        loss = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            ema.update(step)
        if step % 10 == 0:  # a host sync every 10 steps, not every step
            losses.append(float(loss.detach()))
        step += 1
        t = time.time() - now
        step_time = t if step_time == 0 else 0.9 * step_time + 0.1 * t
        if step % log_every == 0:
            log(f"{name} step {step} loss {np.mean(losses[-max(1, log_every // 10):]):.5f} lr {opt.param_groups[0]['lr']:.2e} "
                f"({step_time * 1000:.0f} ms/step, {end - time.time():.0f} s left)")
    tail = losses[-max(1, len(losses) // 10):]
    result = {"steps": step, "seconds": round(time.time() - start, 1), "final_loss": float(np.mean(tail)) if losses else None}
    log(f"{name} done: {result}")
    return result


class EMA:
    def __init__(self, modules, max_decay: float):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.max_decay = max_decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.max_decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [-1, 1]."""
    return images_u8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def clip_pixels(images_u8: torch.Tensor) -> torch.Tensor:
    """What open_clip's preprocessing gives for a 64x64 image: [0, 1], then OpenAI mean/std."""
    x = images_u8.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(OPENAI_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def mb(state: dict) -> float:
    return sum(v.numel() * 2 for v in state.values()) / 2**20  # fp16


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--minutes", type=float, default=7.0, help="total wall-clock budget, all stages included")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=None, help="training images [cuda: 150000, cpu: 6000]")
    ap.add_argument("--batch", type=int, default=None, help="UNet batch [cuda: 1024, cpu: 16]")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast for the training forward passes [default: on for cuda, off for cpu]")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    args = ap.parse_args(argv)

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU here")
    if args.threads:
        torch.set_num_threads(args.threads)
    reserve = max(10.0, 0.04 * args.minutes * 60) if cuda else max(15.0, 0.06 * args.minutes * 60)
    clock = Clock(args.minutes, reserve)
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    bf16 = cuda if args.bf16 is None else args.bf16
    amp = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731 - weights stay fp32
    n_images = args.images or (150_000 if cuda else 6_000)
    # A step of these small models costs about the same at any batch up to ~1k on a GPU (it is bound by
    # kernel launches), so large batches buy samples for free.
    unet_batch = args.batch or (1024 if cuda else 16)
    vae_batch, clip_batch = (128, 1024) if cuda else (8, 64)
    warmup = 200 if cuda else 20
    os.makedirs(args.out, exist_ok=True)
    summary = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "device": args.device,
               "device_name": torch.cuda.get_device_name(dev) if cuda else platform.processor() or platform.machine(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "minutes": args.minutes, "seed": args.seed, "torch": torch.__version__, "stages": {}}
    summary["bf16_autocast"] = bf16
    log(f"device {args.device}, budget {args.minutes} min, {n_images} images, reserve {reserve:.0f} s, bf16 autocast {bf16}")

    # --- 0. data --------------------------------------------------------------------------------
    t = time.time()
    train_caps = world.captions("train")
    codes = world.sample_codes("train", n_images, seed=args.seed)
    images = world.render_codes(codes[:, :5], jitter=True, seed=args.seed, device=args.device)
    cap_idx = torch.as_tensor(codes[:, 5], device=dev)
    import open_clip

    from optimize.runtime.pipelines import clip_tokenizer

    tokenizer = clip_tokenizer()
    empty = len(train_caps)
    text_ids = tokenizer(train_caps + [""], padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(dev)
    cfg_dir = tempfile.mkdtemp(prefix="testbed-clip-cfg-")
    with open(os.path.join(cfg_dir, f"{CLIP_NAME}.json"), "w") as f:
        json.dump(CLIP_CONFIG, f, indent=4)
    open_clip.add_model_config(cfg_dir)
    clip_tok = open_clip.get_tokenizer(CLIP_NAME)
    clip_ids = clip_tok(train_caps).to(dev)
    heldout = world.captions("heldout")
    held_imgs = world.render_codes([world.parse(c).codes() for c in heldout], device=args.device)
    summary["stages"]["data"] = {"images": n_images, "unique_captions": len(train_caps), "seconds": round(time.time() - t, 1)}
    log(f"data: {n_images} images ({images.numel() / 2**20:.0f} MiB) in {time.time() - t:.1f} s")
    gen = torch.Generator(device=dev).manual_seed(args.seed + 1)

    def batch_idx(n):
        return torch.randint(0, n_images, (n,), device=dev, generator=gen)

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(**VAE).to(dev)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN, num_attention_heads=4, num_hidden_layers=3,
        vocab_size=49408, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, max_position_embeddings=77,
        projection_dim=TEXT_HIDDEN, hidden_act="quick_gelu")).to(dev)
    unet = UNet2DConditionModel(**UNET).to(dev)
    clip_model, _, _ = open_clip.create_model_and_transforms(CLIP_NAME, pretrained=None)
    clip_model = clip_model.to(dev)
    sizes = {"vae": mb(vae.state_dict()), "text_encoder": mb(text_encoder.state_dict()),
             "unet": mb(unet.state_dict()), "clip": mb(clip_model.state_dict())}
    total = sum(sizes.values()) + 1.5  # + the tokenizer files
    log("model sizes (fp16 MiB): " + ", ".join(f"{k} {v:.2f}" for k, v in sizes.items()) + f"; total with tokenizer ~{total:.1f}")
    if total > MAX_MB:
        raise SystemExit(f"models too large: {total:.1f} MiB > {MAX_MB}")

    # --- 1. vae -----------------------------------------------------------------------------------
    end = clock.stage_end("vae", ["vae", "clip", "unet"])
    chunk = 1024 if cuda else 64  # the stage includes encoding every training image once it is trained
    with torch.no_grad():  # timed at the chunk size the encoding uses, after a warm-up (cudnn autotuning)
        vae.encode(to_unit(images[:chunk]))
        if cuda:
            torch.cuda.synchronize()
        t = time.time()
        vae.encode(to_unit(images[-chunk:]))
        if cuda:
            torch.cuda.synchronize()
        encode_s = (time.time() - t) * n_images / min(chunk, n_images)
        end -= min(encode_s, 0.3 * (end - time.time()))  # an estimate gone wrong must not eat the stage

    def vae_step(step):
        x = to_unit(images[batch_idx(vae_batch)])
        post = vae.encode(x).latent_dist  # fp32 (TF32): a 4.6-min GPU run with bf16 autocast ended at loss 0.89
        rec = vae.decode(post.sample()).sample
        return F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-7 * post.kl().float().mean()

    vae.train()
    summary["stages"]["vae"] = train("vae", list(vae.parameters()), 1e-3, end, vae_step, warmup)
    vae.eval()
    with torch.no_grad():
        t = time.time()
        means = []
        for i in range(0, n_images, chunk):  # fp32: the latents every UNet step reads
            means.append(vae.encode(to_unit(images[i : i + chunk])).latent_dist.mean.float())
        latents = torch.cat(means)
        scaling = float(1.0 / latents.std())
        latents.mul_(scaling)
        vae.register_to_config(scaling_factor=scaling)
        x = to_unit(held_imgs[:256])
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        summary["stages"]["vae"].update(scaling_factor=scaling, heldout_mse=float(F.mse_loss(rec, x)),
                                        encode_seconds=round(time.time() - t, 1))
    log(f"vae: scaling factor {scaling:.4f}, held-out reconstruction MSE {summary['stages']['vae']['heldout_mse']:.5f}")

    # --- 2. clip ----------------------------------------------------------------------------------
    end = clock.stage_end("clip", ["clip", "unet"])

    def clip_step(step):
        idx = batch_idx(clip_batch)
        cap = cap_idx[idx]
        with amp():
            fi = clip_model.encode_image(clip_pixels(images[idx]), normalize=True).float()
            ft = clip_model.encode_text(clip_ids[cap], normalize=True).float()
        logits = clip_model.logit_scale.clamp(max=math.log(100)).exp() * fi @ ft.T
        same = (cap[:, None] == cap[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        return 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean() + torch.sum(-target * logits.log_softmax(0).T, 1).mean())

    clip_model.train()
    summary["stages"]["clip"] = train("clip", list(clip_model.parameters()), 1e-3, end, clip_step, warmup)
    clip_model.eval()
    with torch.no_grad():
        summary["stages"]["clip"].update(
            heldout_top1_32=retrieval(clip_model, clip_tok, heldout[:32], held_imgs[:32], dev),
            heldout_top1_288=retrieval(clip_model, clip_tok, heldout, held_imgs, dev),
            train_top1_256=retrieval(clip_model, clip_tok, *train_sample(train_caps, 256, args.device), dev))
    log("clip: " + json.dumps({k: v for k, v in summary["stages"]["clip"].items() if "top1" in k}))
    # saved now: a later failure keeps the scorer
    clip_dir = os.path.join(args.out, "clip")
    os.makedirs(clip_dir, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu", torch.float16).contiguous() for k, v in clip_model.state_dict().items()},
              os.path.join(clip_dir, f"{CLIP_NAME}.safetensors"))
    with open(os.path.join(clip_dir, f"{CLIP_NAME}.json"), "w") as f:
        json.dump(CLIP_CONFIG, f, indent=4)

    # --- 3. unet + text encoder -------------------------------------------------------------------
    end = clock.stage_end("unet", ["unet"])
    noise_sched = DDIMScheduler(**SCHEDULER)
    alphas = noise_sched.alphas_cumprod.to(dev)
    ema = EMA([unet, text_encoder], 0.999)

    def unet_step(step, batch=None):
        idx = batch_idx(batch or unet_batch)
        lat = latents[idx]
        cap = cap_idx[idx]
        cap = torch.where(torch.rand(cap.shape, device=dev, generator=gen) < 0.1, torch.full_like(cap, empty), cap)
        noise = torch.randn(lat.shape, device=dev, generator=gen)
        ts = torch.randint(0, 1000, (lat.shape[0],), device=dev, generator=gen)
        a = alphas[ts].view(-1, 1, 1, 1)
        noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
        with amp():
            enc = text_encoder(text_ids[cap]).last_hidden_state
            pred = unet(noisy, ts, enc).sample.float()
        snr = alphas[ts] / (1 - alphas[ts])
        weight = snr.clamp(max=5.0) / snr
        return (((pred - noise) ** 2).mean(dim=(1, 2, 3)) * weight).mean()

    unet.train()
    text_encoder.train()
    if cuda and not args.batch:
        unet_batch = probe_batch(lambda n: unet_step(0, n).backward(), [256, 512, 1024, 2048])
        unet.zero_grad(set_to_none=True)
        text_encoder.zero_grad(set_to_none=True)
    summary["stages"]["unet_batch"] = unet_batch
    summary["stages"]["unet"] = train("unet", list(unet.parameters()) + list(text_encoder.parameters()), 8e-4 if cuda else 1e-3,
                                      end, unet_step, warmup, ema=ema)
    ema.copy_to_model()
    unet.eval()
    text_encoder.eval()

    # --- 4. save and evaluate ---------------------------------------------------------------------
    t = time.time()
    pipe_dir = os.path.join(args.out, "pipeline")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to("cpu", torch.float16)
    pipe.save_pretrained(pipe_dir, safe_serialization=True)
    # Weights stored in fp16 (half the size), loaded in fp32 by a plain from_pretrained: diffusers does so
    # for the UNet and VAE, transformers follows the config's dtype, which must then say float32 too.
    te_config = os.path.join(pipe_dir, "text_encoder", "config.json")
    with open(te_config) as f:
        config = json.load(f)
    config.update({k: "float32" for k in ("dtype", "torch_dtype") if k in config})
    with open(te_config, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    # transformers writes the fast tokenizer's tokenizer.json (3.6 MB); CLIP's vocab.json + merges.txt
    # (1.5 MB) load to the same tokenizer with CLIPTokenizer.from_pretrained.
    import shutil

    from optimize.runtime.pipelines import clip_tokenizer_dir

    tok_dir = os.path.join(pipe_dir, "tokenizer")
    if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        os.remove(os.path.join(tok_dir, "tokenizer.json"))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(clip_tokenizer_dir(), name), os.path.join(tok_dir, name))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs
               if os.path.join(d, f).startswith((pipe_dir, clip_dir))) / 2**20
    summary["size_mib"] = round(size, 2)
    summary["stages"]["save_seconds"] = round(time.time() - t, 1)
    log(f"saved {pipe_dir} and {clip_dir}: {size:.2f} MiB")
    if size > MAX_MB:
        log(f"WARNING: {size:.2f} MiB is over the {MAX_MB} MiB budget")
    try:
        n_eval, eval_steps = (32, 20) if cuda else (4, 10)
        if time.time() < clock.deadline:
            summary["eval"] = evaluate(pipe_dir, clip_model, clip_tok, heldout[:n_eval], held_imgs[:n_eval], args.device,
                                       args.out, eval_steps)
        else:
            summary["eval"] = {"skipped": "no time left in the budget"}
    except Exception as e:  # noqa: BLE001 - the weights are saved; a failed evaluation is reported, not fatal
        summary["eval"] = {"error": f"{type(e).__name__}: {e}"}
    summary["seconds_total"] = round(time.time() - clock.start, 1)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log("summary: " + json.dumps({k: (v.get("final_loss") if isinstance(v, dict) else v) for k, v in summary["stages"].items()}))
    log(f"eval: {json.dumps(summary['eval'])}")
    log(f"total {summary['seconds_total']} s of {args.minutes * 60:.0f} s; wrote {os.path.join(args.out, 'summary.json')}")
    return 0


def probe_batch(step, batches: list[int]) -> int:
    """The largest batch whose training step takes at most 1.5x the smallest one's: while a step is bound by
    kernel launches, a larger batch is free samples; once it is bound by compute, it costs steps."""
    times = {}
    for n in batches:
        for _ in range(2):
            step(n)
        torch.cuda.synchronize()
        t = time.time()
        for _ in range(4):
            step(n)
        torch.cuda.synchronize()
        times[n] = (time.time() - t) / 4
    log("unet batch probe (s/step): " + ", ".join(f"{n}: {v:.3f}" for n, v in times.items()))
    return max(n for n in batches if times[n] <= 1.5 * times[batches[0]])


def train_sample(caps, n, device):
    idx = np.random.default_rng(1).choice(len(caps), n, replace=False)
    sub = [caps[i] for i in idx]
    return sub, world.render_codes([world.parse(c).codes() for c in sub], device=device)


@torch.no_grad()
def retrieval(model, tok, caps, imgs_u8, dev) -> float:
    """Text-to-image top-1 accuracy: for each caption, is its own image the closest of the set?"""
    fi = model.encode_image(clip_pixels(imgs_u8.to(dev)), normalize=True).float()
    ft = model.encode_text(tok(caps).to(dev), normalize=True).float()
    return float(((ft @ fi.T).argmax(1) == torch.arange(len(caps), device=dev)).float().mean())


@torch.no_grad()
def evaluate(pipe_dir, clip_model, clip_tok, caps, truth_u8, device, out, steps) -> dict:
    """Reload the saved pipeline (as users will), generate held-out captions, check colours and CLIP."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    imgs = pipe(caps, num_inference_steps=steps, guidance_scale=7.5, output_type="np",
                generator=torch.Generator("cpu").manual_seed(0)).images
    u8 = torch.from_numpy((np.asarray(imgs) * 255).round().astype(np.uint8))
    colours = [world.colour_of(a) == world.parse(c).colour for a, c in zip(u8.numpy(), caps)]
    fi = clip_model.encode_image(clip_pixels(u8.to(device)), normalize=True).float()
    ft = clip_model.encode_text(clip_tok(caps).to(device), normalize=True).float()
    cos = ft @ fi.T
    rows = []
    for i in range(0, len(caps), 8):
        rows.append(np.concatenate(list(truth_u8[i : i + 8].cpu().numpy()), axis=1))
        rows.append(np.concatenate(list(u8[i : i + 8].numpy()), axis=1))
    rows = [np.pad(r, ((0, 0), (0, rows[0].shape[1] - r.shape[1]), (0, 0))) for r in rows]
    Image.fromarray(np.concatenate(rows, axis=0)).save(os.path.join(out, "samples.png"))
    return {"prompts": len(caps), "steps": steps, "colour_agreement": float(np.mean(colours)),
            "clip_own_caption": float(cos.diag().mean()), "clip_other_captions": float((cos.sum() - cos.diag().sum()) / (len(caps) ** 2 - len(caps))),
            "clip_top1": float((cos.argmax(1) == torch.arange(len(caps), device=cos.device)).float().mean())}


if __name__ == "__main__":
    sys.exit(main())
