#!/usr/bin/env python
"""How far a trained VAE's decode stays inside fp16's range: the question behind the ``vae`` lever.

SDXL's pipelines decode an fp16 VAE in fp32 when its config says ``force_upcast``, because the stock
SDXL VAE's decoder activations exceed fp16's largest finite value (65504) and its fp16 decode gives
NaN. The ``vae`` lever decodes in fp16 anyway and fails the call if the output is not finite. Whether
that is safe is a property of the VAE's weights: this script measures it on the trained testbed's VAE
(the only trained VAE offline), on the latents its own pipeline makes for held-out captions:

* the largest |activation| of every module of the decoder in the fp32 decode (forward hooks), and the
  headroom ``65504 / max``: how many times larger the activations could grow before fp16 overflows;
* the fp16 decode of the same latents: finite or not, and its PSNR against the fp32 decode.

    python benchmarks/vae_range.py --captions 32 --out benchmarks/results/vae-range-testbed-cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from optimize.measure.prompts import load_heldout  # noqa: E402
from optimize.runtime.pipelines import load_pipeline, resolve_pipe  # noqa: E402
from optimize.study.files import atomic_write  # noqa: E402


def decode(vae, latents, dtype):
    """Images in [0, 1] and each decoder module's largest |output| (fp32)."""
    import torch

    peaks: dict[str, float] = {}

    def hook(name):
        def record(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            peaks[name] = max(peaks.get(name, 0.0), float(out.detach().abs().float().max()))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in vae.decoder.named_modules() if n]
    try:
        vae.to(dtype)
        with torch.no_grad():
            images = vae.decode(latents.to(dtype) / vae.config.scaling_factor, return_dict=False)[0]
    finally:
        for h in handles:
            h.remove()
        vae.to(torch.float32)
    return (images.float() / 2 + 0.5).clamp(0, 1), peaks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", type=int, default=32, help="held-out captions whose latents are decoded")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import torch

    fp16_max = torch.finfo(torch.float16).max  # 65504
    t0 = time.time()
    pipe = load_pipeline(resolve_pipe("tiny"), "ddim", args.device, "fp32")
    pipe.set_progress_bar_config(disable=True)
    prompts = load_heldout("testbed", 8, args.captions)
    with torch.no_grad():
        latents = torch.cat([pipe(prompt=p, num_inference_steps=args.steps, guidance_scale=7.5, output_type="latent",
                                  generator=torch.Generator("cpu").manual_seed(42 + i)).images
                             for i, p in enumerate(prompts)])
    ref, peaks32 = decode(pipe.vae, latents, torch.float32)
    half, peaks16 = decode(pipe.vae, latents, torch.float16)
    finite = bool(torch.isfinite(half).all())
    mse = ((half - ref) ** 2).flatten(1).mean(1)
    psnr = [math.inf if m == 0 else float(10 * torch.log10(1 / m)) for m in mse]
    top = sorted(peaks32.items(), key=lambda kv: -kv[1])[:5]
    peak = max(peaks32.values())
    result = {"vae": "the trained testbed's (optimize/runtime/testbed)", "device": args.device,
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", *sys.argv]),
              "captions": len(prompts), "latent_abs_max": float(latents.abs().max()),
              "fp32_peak_activation": peak, "fp16_headroom": fp16_max / peak, "largest_modules_fp32": top,
              "fp16_peak_activation": max(peaks16.values()), "fp16_finite": finite,
              "fp16_vs_fp32_psnr_min": min(psnr), "fp16_vs_fp32_psnr_mean": sum(psnr) / len(psnr),
              "fp16_vs_fp32_max_abs": float((half - ref).abs().max()), "seconds": time.time() - t0}
    atomic_write(args.out, json.dumps(result, indent=1) + "\n")
    print(f"testbed VAE, {len(prompts)} held-out captions: fp32 decode peak |activation| {peak:.1f} "
          f"({top[0][0]}), fp16 headroom {fp16_max / peak:.0f}x; fp16 decode finite: {finite}, PSNR vs fp32 "
          f"min {min(psnr):.1f} dB, mean {sum(psnr) / len(psnr):.1f} dB, max abs {result['fp16_vs_fp32_max_abs']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
