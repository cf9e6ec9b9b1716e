"""The testbed's synthetic captioned-image world: one flat shape on a flat background, 64x64 pixels.

A scene is five attributes: a shape (circle, square, triangle, diamond), its colour (8), its size
(small, large), its position on a 3x3 grid (top left ... bottom right) and the background colour (4).
Its caption comes from a fixed grammar::

    a small red triangle in the top left on a gray background

and :func:`parse` reads such a caption (and reasonable variants: "centre", "grey", "top-left",
"in the top left corner", "a blue circle" with defaults for what is left out) back into a scene.
Four colour-shape pairs never occur in the training split (:data:`HELDOUT_PAIRS`): their scenes form
the ``heldout`` split, for compositional checks and as the held-out prompts of the testbed pipeline.

Rendering is analytic anti-aliasing of each shape's signed distance, vectorised in torch over a batch
of scenes, so a training set of 100k images renders in seconds. ``jitter`` (training only) moves the
shape by up to 3 pixels, scales it by +-15% and shifts its colours slightly; :func:`render` of a
caption is the canonical, unjittered image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SIZE = 64
SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 230), "yellow": (245, 215, 35),
    "purple": (140, 50, 190), "orange": (250, 130, 20), "pink": (250, 135, 195), "cyan": (40, 210, 220),
}
BACKGROUNDS = {"white": (240, 240, 240), "black": (15, 15, 15), "gray": (128, 128, 128), "brown": (110, 70, 35)}
SIZES = {"small": 7.0, "large": 13.0}  # radius in pixels
# name -> (caption phrase, centre x, centre y) in pixels
POSITIONS = {
    "top left": ("in the top left", 16, 16), "top": ("at the top", 32, 16), "top right": ("in the top right", 48, 16),
    "left": ("on the left", 16, 32), "center": ("in the center", 32, 32), "right": ("on the right", 48, 32),
    "bottom left": ("in the bottom left", 16, 48), "bottom": ("at the bottom", 32, 48),
    "bottom right": ("in the bottom right", 48, 48),
}
COLOUR_NAMES = tuple(COLOURS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)
SIZE_NAMES = tuple(SIZES)
POSITION_NAMES = tuple(POSITIONS)
# Never seen in training: each shape loses one colour, each of these colours one shape.
HELDOUT_PAIRS = (("red", "circle"), ("blue", "square"), ("purple", "triangle"), ("pink", "diamond"))
SPLITS = ("train", "heldout")
_SPLIT_SEED = 20261201


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        return (f"a {self.size} {self.colour} {self.shape} {POSITIONS[self.position][0]} "
                f"on a {self.background} background")

    @property
    def heldout(self) -> bool:
        return (self.colour, self.shape) in HELDOUT_PAIRS

    def codes(self) -> tuple[int, int, int, int, int]:
        return (SHAPES.index(self.shape), COLOUR_NAMES.index(self.colour), SIZE_NAMES.index(self.size),
                POSITION_NAMES.index(self.position), BACKGROUND_NAMES.index(self.background))


def all_scenes() -> list[Scene]:
    return [Scene(s, c, z, p, b) for s in SHAPES for c in COLOUR_NAMES for z in SIZE_NAMES
            for p in POSITION_NAMES for b in BACKGROUND_NAMES]


@lru_cache(maxsize=None)
def _split(split: str) -> tuple[Scene, ...]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    scenes = [s for s in all_scenes() if s.heldout == (split == "heldout")]
    order = np.random.default_rng(_SPLIT_SEED + SPLITS.index(split)).permutation(len(scenes))
    return tuple(scenes[i] for i in order)


def scenes(split: str) -> list[Scene]:
    """The scenes of ``split`` (``train``: 2016, ``heldout``: 288) in a fixed shuffled order."""
    return list(_split(split))


def captions(split: str) -> list[str]:
    """The captions of ``split``, one per scene, in a fixed shuffled order (the same in every run)."""
    return [s.caption for s in _split(split)]


_SYNONYMS = [("grey", "gray"), ("centre", "center"), ("middle", "center"), ("big", "large"), ("little", "small"),
             ("violet", "purple"), ("rhombus", "diamond"), ("box", "square")]


def parse(caption: str) -> Scene:
    """The scene a caption describes; raises ``ValueError`` when it names no shape or is ambiguous.

    The shape's colour is the colour word just before the shape word (default: the first colour word
    that is not the background's); the background is the colour word before ``background`` (default
    white); size defaults to large, position to center.
    """
    text = " " + re.sub(r"[^a-z ]+", " ", caption.lower().replace("-", " ")) + " "
    for a, b in _SYNONYMS:
        text = re.sub(rf"\b{a}s?\b", b, text)
    words = text.split()
    shape_at = [i for i, w in enumerate(words) if w.rstrip("s") in SHAPES or w in SHAPES]
    if len(shape_at) != 1:
        raise ValueError(f"caption {caption!r} must name exactly one shape of {SHAPES}")
    si = shape_at[0]
    shape = words[si] if words[si] in SHAPES else words[si].rstrip("s")
    background = "white"
    bg_at = [i for i, w in enumerate(words) if w == "background"]
    if bg_at and bg_at[0] > 0 and words[bg_at[0] - 1] in BACKGROUNDS:
        background = words[bg_at[0] - 1]
    colour = next((w for w in reversed(words[:si]) if w in COLOURS), None)
    if colour is None:
        colour = next((w for w in words if w in COLOURS), None)
    if colour is None:
        raise ValueError(f"caption {caption!r} names no shape colour of {COLOUR_NAMES}")
    size = next((w for w in words[:si] if w in SIZES), "large")
    vert = next((w for w in words if w in ("top", "bottom")), "")
    horiz = next((w for w in words if w in ("left", "right")), "")
    position = (f"{vert} {horiz}".strip()) or "center"
    return Scene(shape, colour, size, position, background)


# --- rendering ----------------------------------------------------------------------------------

_PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32)
_BG_PALETTE = np.array([BACKGROUNDS[b] for b in BACKGROUND_NAMES], dtype=np.float32)
_CENTRES = np.array([POSITIONS[p][1:] for p in POSITION_NAMES], dtype=np.float32)


def render_codes(codes, jitter: bool = False, seed: int = 0, device: str = "cpu", chunk: int = 4096):
    """Render scenes given as an integer array N x 5 (shape, colour, size, position, background codes)
    as a uint8 torch tensor N x 64 x 64 x 3 on ``device``."""
    import torch

    codes = torch.as_tensor(np.asarray(codes), dtype=torch.long, device=device)
    n = codes.shape[0]
    gen = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty((n, SIZE, SIZE, 3), dtype=torch.uint8, device=device)
    palette = torch.as_tensor(_PALETTE, device=device)
    bg_palette = torch.as_tensor(_BG_PALETTE, device=device)
    centres = torch.as_tensor(_CENTRES, device=device)
    radii = torch.tensor([SIZES[z] for z in SIZE_NAMES], device=device)
    coords = torch.arange(SIZE, dtype=torch.float32, device=device) + 0.5
    for lo in range(0, n, chunk):
        c = codes[lo : lo + chunk]
        b = c.shape[0]
        centre = centres[c[:, 3]]
        r = radii[c[:, 2]]
        fg, bg = palette[c[:, 1]], bg_palette[c[:, 4]]
        if jitter:
            centre = centre + (torch.rand((b, 2), generator=gen, device=device) * 6 - 3)
            r = r * (0.85 + 0.3 * torch.rand((b,), generator=gen, device=device))
            fg = (fg + torch.randn((b, 3), generator=gen, device=device) * 8).clamp(0, 255)
            bg = (bg + torch.randn((b, 3), generator=gen, device=device) * 6).clamp(0, 255)
        dx = (coords[None, None, :] - centre[:, 0, None, None]) / r[:, None, None]  # b x 1 x W
        dy = (coords[None, :, None] - centre[:, 1, None, None]) / r[:, None, None]  # b x H x 1
        adx, ady = dx.abs(), dy.abs()
        circle = (dx * dx + dy * dy).sqrt() - 1.0
        square = torch.maximum(adx, ady) - 0.88
        diamond = (adx + ady - 1.25) / 2**0.5
        h1, h2, w = 1.2, 0.9, 1.2  # apex above the centre, base below it, half-width of the base
        side = ((h1 + h2) * adx - w * (dy + h1)) / ((h1 + h2) ** 2 + w**2) ** 0.5
        triangle = torch.maximum(dy - h2, side)
        sdf = torch.stack(torch.broadcast_tensors(circle, square, triangle, diamond), dim=1)  # b x 4 x H x W
        sdf = sdf.gather(1, c[:, 0].view(b, 1, 1, 1).expand(b, 1, SIZE, SIZE))[:, 0]
        alpha = (0.5 - sdf * r[:, None, None]).clamp(0, 1)[..., None]  # signed distance in pixels
        img = bg[:, None, None, :] * (1 - alpha) + fg[:, None, None, :] * alpha
        out[lo : lo + chunk] = img.round().to(torch.uint8)
    return out


def render_scene(scene: Scene):
    from PIL import Image

    return Image.fromarray(render_codes([scene.codes()])[0].numpy(), "RGB")


def render(caption: str):
    """The ground-truth 64x64 PIL image of a caption (parsed with :func:`parse`)."""
    return render_scene(parse(caption))


def sample_codes(split: str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` scenes of ``split`` drawn uniformly with replacement, as codes N x 5, with the index of
    each one's caption in :func:`captions` as a sixth column."""
    pool = np.array([s.codes() for s in _split(split)], dtype=np.int64)
    idx = np.random.default_rng(seed).integers(0, len(pool), size=n)
    return np.concatenate([pool[idx], idx[:, None]], axis=1)


# --- pixel checks -------------------------------------------------------------------------------


def colour_of(image) -> str:
    """The shape colour an image shows, from its pixels alone: each pixel is labelled with the nearest
    palette colour (shape colours and backgrounds); the most common label on the border is the
    background, and the answer is the most common shape colour among the other pixels."""
    a = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float32)
    if a.max() <= 1.0:
        a = a * 255.0
    full = np.concatenate([_PALETTE, _BG_PALETTE])
    labels = ((a[..., None, :] - full) ** 2).sum(-1).argmin(-1)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    background = np.bincount(border, minlength=len(full)).argmax()
    inner = labels[(labels != background) & (labels < len(_PALETTE))]
    if inner.size == 0:
        return "none"
    return COLOUR_NAMES[np.bincount(inner, minlength=len(_PALETTE)).argmax()]
