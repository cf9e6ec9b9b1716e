"""Image quality: CLIP score with open_clip, as the original script computed it.

``score = 100 * max(cos(image, text), 0)`` per image, images through open_clip's preprocessing, text
through its tokenizer, both embeddings L2-normalised, scored in batches of 16. The default model is
ViT-g-14 ``laion2b_s34b_b88k``; ``testbed-clip`` with pretrained ``testbed`` is the small trained model
shipped with the package (:mod:`optimize.runtime.testbed`, the default scorer of ``--pipe tiny``); ``tiny-clip``
is a small random-weight model for offline runs of random-weight pipelines.

Example:
    >>> scorer = ClipScorer("tiny-clip", None, device="cpu")
    >>> scores = scorer.score(images, prompts)              # doctest: +SKIP
    >>> float(scores.mean())                                # doctest: +SKIP
    12.3
"""

from __future__ import annotations

import logging
import os

import numpy as np
from ..study.record import PSNR_CAP

DEFAULT_MODEL = ("ViT-g-14", "laion2b_s34b_b88k")
TINY_MODEL = ("tiny-clip", None)
TESTBED_MODEL = ("testbed-clip", "testbed")  # the shipped trained scorer (see optimize.runtime.testbed)
_CONFIGS = os.path.join(os.path.dirname(__file__), "configs")
_BATCH = 16


class MetricError(RuntimeError):
    pass


class ClipScorer:
    """Scores images against their prompts with an open_clip model (loaded once, reused by every trial)."""

    def __init__(self, model: str = DEFAULT_MODEL[0], pretrained: str | None = DEFAULT_MODEL[1],
                 device: str = "cpu", dtype: str = "fp32"):
        import open_clip
        import torch

        from ..runtime.pipelines import torch_dtype

        if model == TINY_MODEL[0]:
            open_clip.add_model_config(_CONFIGS)
        elif model == TESTBED_MODEL[0]:
            from ..runtime import testbed

            testbed.register_clip_config()
            if pretrained == TESTBED_MODEL[1]:
                pretrained = testbed.clip_weights()  # a local file: open_clip loads it as the checkpoint
        root = logging.getLogger()
        level = root.level
        try:
            with torch.random.fork_rng(devices=[]):
                if pretrained is None:
                    torch.manual_seed(0)  # a random model must be the same in every run of a study
                    root.setLevel(logging.ERROR)  # open_clip warns that it has no weights: by design
                self.model, _, self.preprocess = open_clip.create_model_and_transforms(
                    model, pretrained=pretrained, device=device
                )
        except Exception as e:  # noqa: BLE001 - missing weights offline: one clear line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MetricError(f"cannot load CLIP model {model} ({pretrained}): {first}") from e
        finally:
            root.setLevel(level)
        self.model.eval().to(dtype=torch_dtype(dtype))
        self.tokenizer = open_clip.get_tokenizer(model)
        self.device, self.dtype = device, torch_dtype(dtype)
        if pretrained is None:
            self._calibrate_random_model()

    def _calibrate_random_model(self) -> None:
        """Make a random model's image-text cosines positive.

        With random weights the cosine between any image and any text is about the same value, and it
        is negative about half the time, which makes every score 0 and the loss 0/0. Flipping the text
        projection flips the sign of every cosine and keeps their differences, which is all an offline
        run needs from the scorer.
        """
        import torch
        from PIL import Image

        probe = [Image.new("RGB", (64, 64), (128, 128, 128))]
        if self._cosines(probe, ["a photo"])[0] < 0:
            with torch.no_grad():
                self.model.text_projection.neg_()

    def _cosines(self, images, prompts) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(images), _BATCH):
                pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images[i : i + _BATCH]])
                tokens = self.tokenizer(prompts[i : i + _BATCH])
                img = self.model.encode_image(pixels.to(self.device, self.dtype)).float()
                txt = self.model.encode_text(tokens.to(self.device)).float()
                img = img / img.norm(dim=-1, keepdim=True)
                txt = txt / txt.norm(dim=-1, keepdim=True)
                out.append((img * txt).sum(-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def score(self, images, prompts) -> np.ndarray:
        """Per-image CLIP scores, ``100 * max(cos, 0)``."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        return 100.0 * np.maximum(self._cosines(images, prompts), 0.0)


def score_loss(base: float, score: float) -> float:
    """Relative CLIP score loss ``(s_base - s) / s_base``; a zero baseline is an error, never NaN."""
    if not base > 0:
        raise MetricError(
            f"baseline CLIP score is {base}: the loss relative to it is undefined (the scorer sees no match "
            "between any image and its prompt)"
        )
    return (base - score) / base


# --- fidelity to the baseline image ---------------------------------------------------------------
# Every measured trial also compares each image with the baseline image of the same prompt and seed:
# PSNR and SSIM always (torchmetrics' functional metrics), LPIPS (AlexNet) when torchvision's AlexNet
# weights are in the local torch cache: they cannot be downloaded during a run.

LPIPS_NET = "alexnet"
_FIDELITY_BATCH = 8


def lpips_weights_path() -> str:
    """Where torchvision keeps (and would download) the AlexNet weights LPIPS needs."""
    import torch
    import torchvision

    url = getattr(torchvision.models, "AlexNet_Weights").DEFAULT.url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def lpips_available() -> bool:
    return os.path.isfile(lpips_weights_path())


def _to_tensor(images):
    """PIL images (or HxWx3 uint8 arrays) as one uint8 tensor N x 3 x H x W (a quarter of float32's memory:
    32 SDXL images are 100 MB)."""
    import torch

    arrays = [np.asarray(im.convert("RGB") if hasattr(im, "convert") else im, dtype=np.uint8) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class FidelityScorer:
    """PSNR, SSIM and (optionally) LPIPS of images against the baseline images of the same prompts.

    PSNR is per image, in dB over 8-bit pixel values, capped at :data:`PSNR_CAP` so an identical image
    stays finite (JSON-safe); SSIM uses an 11x11 Gaussian window (smaller on images under 11 pixels).
    The returned values are means over the images.
    """

    def __init__(self, reference_images, device: str = "cpu", lpips: bool = False):
        import torch

        self.reference = _to_tensor(reference_images)
        self.device = torch.device(device)
        self.lpips = None
        if lpips:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            if not lpips_available():
                raise MetricError(f"LPIPS needs torchvision's AlexNet weights at {lpips_weights_path()}")
            self.lpips = LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="none", normalize=True)
            self.lpips.eval().to(self.device)
        if self.device.type == "cuda":
            # a process's first PSNR/SSIM on a GPU pays a one-off start (2.7 s in an H100 study's first trial):
            # paid here, with the baseline, not by the first trial, whose stored parts would show it as fidelity
            self._compare(self.reference[:1], self.reference[:1], 1)

    def score(self, images) -> dict[str, float]:
        """Means over the images of :meth:`per_image`."""
        return {k: float(np.mean(v)) for k, v in self.per_image(images).items()}

    def per_image(self, images) -> dict[str, np.ndarray]:
        """``psnr``, ``ssim`` (and ``lpips``) of each image against the baseline image of its prompt."""
        if len(images) != len(self.reference):
            raise ValueError(f"{len(images)} images for {len(self.reference)} baseline images")
        current = _to_tensor(images)
        if current.shape != self.reference.shape:
            raise ValueError(f"images of shape {tuple(current.shape[1:])}, baseline {tuple(self.reference.shape[1:])}")
        return self._compare(current, self.reference, _FIDELITY_BATCH)

    def _compare(self, current, reference, batch: int) -> dict[str, np.ndarray]:
        import torch
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

        side = min(current.shape[-2:])
        kernel = min(11, side if side % 2 else side - 1)
        psnr, ssim, lpips = [], [], []
        with torch.no_grad():
            for i in range(0, len(current), batch):
                x = current[i : i + batch].to(self.device).float().div_(255.0)
                y = reference[i : i + batch].to(self.device).float().div_(255.0)
                p = peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3))
                psnr.append(torch.nan_to_num(p, posinf=PSNR_CAP).clamp(max=PSNR_CAP).cpu())
                ssim.append(structural_similarity_index_measure(
                    x, y, data_range=1.0, reduction="none", kernel_size=kernel).reshape(-1).cpu())
                if self.lpips is not None:
                    lpips.append(self.lpips(x, y).reshape(-1).cpu())
        out = {"psnr": torch.cat(psnr).double().numpy(), "ssim": torch.cat(ssim).double().numpy()}
        if lpips:
            out["lpips"] = torch.cat(lpips).double().numpy()
        return out


def testbed_scorer(device: str = "cpu", dtype: str = "fp32") -> ClipScorer:
    """A :class:`ClipScorer` on the testbed's trained open_clip model (:mod:`optimize.runtime.testbed`),
    loaded with ``open_clip.create_model_and_transforms("testbed-clip", pretrained=<the shipped file>)``."""
    from ..runtime import testbed

    testbed.clip_weights()  # a missing file is one clear error, not open_clip's
    return ClipScorer(testbed.CLIP_NAME, testbed.CLIP_PRETRAINED, device=device, dtype=dtype)
