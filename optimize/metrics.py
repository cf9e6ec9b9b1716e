"""Image quality: CLIP score with open_clip, as the original script computed it.

``score = 100 * max(cos(image, text), 0)`` per image, images through open_clip's preprocessing, text
through its tokenizer, both embeddings L2-normalised, scored in batches of 16. The default model is
ViT-g-14 ``laion2b_s34b_b88k``; ``tiny-clip`` is a small random-weight model for offline runs.

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

DEFAULT_MODEL = ("ViT-g-14", "laion2b_s34b_b88k")
TINY_MODEL = ("tiny-clip", None)
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

        from .pipelines import torch_dtype

        if model == TINY_MODEL[0]:
            open_clip.add_model_config(_CONFIGS)
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
