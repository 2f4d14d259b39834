"""The embedded default dataset: a seeded, multi-domain synthetic catalogue in the atomic-file format.

Latent structure (what a model can learn):

- ``num_interests`` interests, shared by all domains (so pre-training on some domains transfers to
  others). Interest ``k`` is a pair (style ``a``, palette ``b``) with ``a = k % n_a``, ``b = k // n_a``.
- Text reveals the style strongly (style words) and the palette weakly (an occasional colour name);
  the image reveals the palette strongly (shape colour) and the style weakly (shape kind). Only both
  together pin down the interest; ``modality_split`` sets how strong "strongly" is.
- Within an interest the items form a chain (their "level"); a user mostly steps a little forward
  along the chain of the current interest, so the next item is predictable from the last one beyond
  popularity. Users hold 1-3 interests, switch among them now and then, and draw by a Zipf popularity
  when (re-)entering an interest; a little uniform noise is mixed in.

``generate_catalogue`` writes, per domain ``out/<D>/``: ``<D>.{train,valid,test}.inter``, ``<D>.text``,
``<D>.item2index``, ``<D>.user2index``, ``<D>.items.tsv`` (``item_id<TAB>text<TAB>image``),
``images/<raw_id>.png`` and (by default) proxy features ``<D>.feat1CLS`` / ``<D>.feat3CLS``; then
``out/catalogue.json`` last, which marks the catalogue complete. Same config, same bytes.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from missrec.data.atomic import ITEM_TABLE_HEADER, Split, write_index_map, write_inter, write_text
from missrec.errors import ConfigError
from missrec.features.proxy import write_proxy_features
from missrec.io import atomic_open, write_json

log = logging.getLogger(__name__)

FORMAT = "missrec-synthetic/1"

_SYLLABLES = ("ka", "lo", "mi", "ren", "tu", "vo", "sha", "del", "pri", "zen", "mar", "qui",
              "bo", "fen", "gal", "ist", "jor", "lux", "nel", "ory", "pax", "rho", "sil", "tam")
_PALETTE = (("red", (220, 40, 40)), ("blue", (40, 80, 220)), ("green", (40, 170, 60)),
            ("yellow", (235, 205, 40)), ("purple", (140, 60, 190)), ("orange", (245, 130, 30)),
            ("teal", (30, 170, 170)), ("pink", (240, 120, 180)), ("brown", (130, 80, 40)),
            ("black", (30, 30, 30)), ("lime", (160, 220, 40)), ("navy", (20, 30, 110)))
_SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "ring", "stripes")
_SIZES = ("mini", "small", "medium", "large", "jumbo")
_FILLER = ("with", "for", "and", "set", "pack", "new", "premium", "everyday", "home", "quality")
_NOUNS = {"Kitchen": ("pan", "kettle", "mug", "knife", "bowl", "grater"),
          "Garden": ("hose", "planter", "trowel", "rake", "lantern", "bench"),
          "Office": ("stapler", "binder", "desk", "pen", "folder", "lamp"),
          "Toys": ("puzzle", "robot", "doll", "kite", "blocks", "car")}
_STEPS = np.cumsum([0.6, 0.3, 0.1])  # forward step 1, 2, 3 along a chain


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the synthetic catalogue. Noise levels are probabilities unless noted."""

    seed: int = 0
    domains: tuple[str, ...] = ("Kitchen", "Garden", "Office", "Toys")
    target_domains: tuple[str, ...] = ("Office", "Toys")  # the rest are pre-training sources
    items_per_domain: int = 300
    users_per_domain: int = 600
    num_interests: int = 12  # shared across domains
    min_len: int = 5  # history length range per user (>= 4: one train, one valid, one test target)
    max_len: int = 20
    max_history: int = 50  # histories written to .inter keep their last max_history items
    image_size: int = 32  # px
    modality_split: float = 0.85  # P(text shows the style right) = P(image shows the palette right)
    secondary_prob: float = 0.2  # items with a secondary interest (a word and a corner mark)
    missing_image_frac: float = 0.05  # items written without an image
    text_noise: float = 0.3  # expected noise words per signal word
    image_noise: float = 0.06  # pixel noise std, fraction of 255
    interaction_noise: float = 0.05  # P(next item uniform over the domain)
    step_prob: float = 0.75  # P(step along the chain) vs. popularity draw within the interest
    switch_prob: float = 0.15  # P(switch to another of the user's interests) per step
    zipf_a: float = 1.1  # popularity skew within an interest
    proxy_features: bool = True  # also write hashed-text / pixel proxy features
    proxy_dim: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "domains", tuple(self.domains))
        object.__setattr__(self, "target_domains", tuple(self.target_domains))
        bad = []
        if not self.domains or len(set(self.domains)) != len(self.domains):
            bad.append(f"domains must be non-empty and unique, got {self.domains}")
        if any(not d or not d.replace("_", "").isalnum() for d in self.domains):
            bad.append(f"domain names must be alphanumeric, got {self.domains}")
        if not set(self.target_domains) <= set(self.domains):
            bad.append(f"target_domains {self.target_domains} not all in domains {self.domains}")
        if self.num_interests < 2 or self.items_per_domain < 2 * self.num_interests:
            bad.append("need num_interests >= 2 and items_per_domain >= 2 * num_interests")
        if self.users_per_domain < 1 or not 4 <= self.min_len <= self.max_len:
            bad.append("need users_per_domain >= 1 and 4 <= min_len <= max_len")
        if self.max_history < 1 or self.image_size < 8 or self.proxy_dim < 1:
            bad.append("need max_history >= 1, image_size >= 8, proxy_dim >= 1")
        for f in ("modality_split", "secondary_prob", "missing_image_frac", "interaction_noise",
                  "step_prob", "switch_prob"):
            if not 0.0 <= getattr(self, f) <= 1.0:
                bad.append(f"{f} must be in [0, 1], got {getattr(self, f)}")
        if self.text_noise < 0 or self.image_noise < 0 or self.zipf_a < 0:
            bad.append("text_noise, image_noise and zipf_a must be >= 0")
        if bad:
            raise ConfigError("bad SyntheticConfig: " + "; ".join(bad))

    @property
    def source_domains(self) -> tuple[str, ...]:
        return tuple(d for d in self.domains if d not in self.target_domains)

    @property
    def grid(self) -> tuple[int, int]:
        """(n_styles, n_palettes): interest ``k`` is style ``k % n_a`` and palette ``k // n_a``."""
        n_a = math.ceil(math.sqrt(self.num_interests))
        return n_a, math.ceil(self.num_interests / n_a)


@dataclass
class _Vocab:
    style_words: list[list[str]]  # [n_a][4]
    colour_names: list[str]  # [n_b]
    colours: np.ndarray  # [n_b, 3] RGB
    noise_words: list[str]


def _rng(cfg: SyntheticConfig, *key: int | str) -> np.random.Generator:
    parts = [cfg.seed] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in key]
    return np.random.default_rng(parts)


def _pseudo_words(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = "".join(_SYLLABLES[i] for i in rng.integers(len(_SYLLABLES), size=int(rng.integers(2, 4))))
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


def _vocab(cfg: SyntheticConfig) -> _Vocab:
    """Shared across domains (it depends on the seed only), so words mean the same everywhere."""
    rng = _rng(cfg, "vocab")
    n_a, n_b = cfg.grid
    taken = {w for ws in (_SIZES, _FILLER, *_NOUNS.values()) for w in ws} | {p[0] for p in _PALETTE}
    style = [_pseudo_words(rng, 4, taken) for _ in range(n_a)]
    names = [p[0] for p in _PALETTE[:n_b]]
    cols = [p[1] for p in _PALETTE[:n_b]]
    for i in range(len(cols), n_b):  # more palettes than named colours: spread hues
        names += _pseudo_words(rng, 1, taken)
        h = (i * 0.618034) % 1.0
        cols.append(tuple(int(255 * (0.5 + 0.45 * math.cos(2 * math.pi * (h + j / 3)))) for j in range(3)))
    return _Vocab(style, names, np.asarray(cols, dtype=np.float64), _pseudo_words(rng, 60, taken))


def _domain_nouns(cfg: SyntheticConfig, name: str, vocab: _Vocab) -> tuple[str, ...]:
    if name in _NOUNS:
        return _NOUNS[name]
    taken = set(vocab.noise_words) | {w for ws in vocab.style_words for w in ws}
    return tuple(_pseudo_words(_rng(cfg, "nouns", name), 6, taken))


# --------------------------------------------------------------------------------------------- items


@dataclass
class _Items:
    primary: np.ndarray  # [n] interest
    secondary: np.ndarray  # [n] interest or -1
    level: np.ndarray  # [n] position in the primary chain / (len - 1), in [0, 1]
    chains: list[np.ndarray]  # per interest: item indices in chain order
    pop_cdf: list[np.ndarray]  # per interest: Zipf popularity CDF over chain positions
    has_image: np.ndarray  # [n] bool


def _make_items(cfg: SyntheticConfig, rng: np.random.Generator) -> _Items:
    n, k_all = cfg.items_per_domain, cfg.num_interests
    primary = rng.permutation(np.arange(n) % k_all)
    sec = np.where(rng.random(n) < cfg.secondary_prob, (primary + rng.integers(1, k_all, n)) % k_all, -1)
    level = np.zeros(n)
    chains, cdfs = [], []
    for k in range(k_all):
        chain = list(rng.permutation(np.flatnonzero(primary == k)))
        level[chain] = np.arange(len(chain)) / max(len(chain) - 1, 1)
        for it in np.flatnonzero(sec == k):  # secondary members join the chain at a random spot
            chain.insert(int(rng.integers(len(chain) + 1)), int(it))
        chain_arr = np.asarray(chain, dtype=np.int64)
        w = 1.0 / (rng.permutation(len(chain_arr)) + 1.0) ** cfg.zipf_a
        chains.append(chain_arr)
        cdfs.append(np.cumsum(w) / w.sum())
    has_image = np.ones(n, dtype=bool)
    has_image[rng.choice(n, size=round(cfg.missing_image_frac * n), replace=False)] = False
    return _Items(primary, sec, level, chains, cdfs, has_image)


def _item_text(cfg: SyntheticConfig, rng: np.random.Generator, vocab: _Vocab, nouns: tuple[str, ...],
               interest: int, secondary: int, level: float) -> str:
    n_a, _ = cfg.grid
    a, b = interest % n_a, interest // n_a
    desc = [_SIZES[min(int(level * len(_SIZES)), len(_SIZES) - 1)]] if rng.random() < 0.7 else []
    for _ in range(2):  # the style, strongly (a wrong style now and then)
        a_used = a if rng.random() < cfg.modality_split else int(rng.integers(n_a))
        desc.append(vocab.style_words[a_used][int(rng.integers(4))])
    if rng.random() < 1.0 - cfg.modality_split:  # the palette, weakly
        desc.append(vocab.colour_names[b])
    if secondary >= 0:
        desc.append(vocab.style_words[secondary % n_a][int(rng.integers(4))])
    n_noise = int(rng.poisson(cfg.text_noise * (len(desc) + 1)))
    desc += [vocab.noise_words[i] for i in rng.integers(len(vocab.noise_words), size=n_noise)]
    rng.shuffle(desc)
    tail = [_FILLER[i] for i in rng.integers(len(_FILLER), size=int(rng.integers(0, 3)))]
    return " ".join(desc + [nouns[int(rng.integers(len(nouns)))]] + tail)


def _polygon(cx: float, cy: float, r: float, n: int, rot: float, inner: float = 1.0) -> list:
    m = n if inner == 1.0 else 2 * n  # a star alternates outer and inner vertices
    rad = [r if i % 2 == 0 else r * inner for i in range(m)]
    return [(cx + rad[i] * math.cos(rot + 2 * math.pi * i / m), cy + rad[i] * math.sin(rot + 2 * math.pi * i / m))
            for i in range(m)]


def _render(cfg: SyntheticConfig, rng: np.random.Generator, vocab: _Vocab, interest: int,
            secondary: int, level: float) -> Image.Image:
    """An ``image_size`` x ``image_size`` RGB picture: palette -> colour (strong), style -> shape (weak)."""
    s, (n_a, n_b) = cfg.image_size, cfg.grid
    a, b = interest % n_a, interest // n_a
    b_used = b if rng.random() < cfg.modality_split else int(rng.integers(n_b))
    shape = _SHAPES[a % len(_SHAPES)] if rng.random() < 1.0 - cfg.modality_split else \
        _SHAPES[int(rng.integers(len(_SHAPES)))]
    bg = np.clip(rng.uniform(170, 240) + rng.normal(0, 12, 3), 0, 255)
    img = Image.fromarray(np.broadcast_to(bg.astype(np.uint8), (s, s, 3)).copy(), "RGB")
    draw = ImageDraw.Draw(img)
    fill = tuple(int(v) for v in np.clip(vocab.colours[b_used] + rng.normal(0, 18, 3), 0, 255))
    cx, cy = s / 2 + rng.uniform(-0.08, 0.08) * s, s / 2 + rng.uniform(-0.08, 0.08) * s
    r = s * (0.22 + 0.16 * level)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=fill)
    elif shape in ("triangle", "diamond", "star"):
        n, rot, inner = {"triangle": (3, -math.pi / 2, 1.0), "diamond": (4, 0.0, 1.0),
                         "star": (5, -math.pi / 2, 0.45)}[shape]
        draw.polygon(_polygon(cx, cy, r, n, rot, inner), fill=fill)
    elif shape == "cross":
        w = 0.3 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(2, int(0.35 * r)))
    else:  # stripes
        step = max(2, int(r / 2))
        for y in range(int(cy - r), int(cy + r), 2 * step):
            draw.rectangle([cx - r, y, cx + r, y + step - 1], fill=fill)
    if secondary >= 0:  # a corner mark in the secondary interest's colour
        m = max(2, s // 6)
        draw.rectangle([1, 1, m, m], fill=tuple(int(v) for v in vocab.colours[secondary // n_a]))
    arr = np.asarray(img, dtype=np.float64) + rng.normal(0, cfg.image_noise * 255, (s, s, 3))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------------------- users


def _free(chain: np.ndarray, start: int, seen: set[int]) -> int | None:
    """First chain position at or after ``start`` (cyclically) whose item is not in ``seen``."""
    for j in range(len(chain)):
        p = (start + j) % len(chain)
        if int(chain[p]) not in seen:
            return p
    return None


def _make_sequences(cfg: SyntheticConfig, rng: np.random.Generator, items: _Items) -> list[list[int]]:
    n, k_all = cfg.items_per_domain, cfg.num_interests
    prior = rng.dirichlet(np.full(k_all, 5.0))  # the domain's taste for each interest
    seqs = []
    for _ in range(cfg.users_per_domain):
        m = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
        mine = rng.choice(k_all, size=m, replace=False, p=prior)
        weights = rng.dirichlet(np.full(m, 2.0))
        length = cfg.min_len + min(int((cfg.max_len - cfg.min_len + 1) * rng.random() ** 1.5),
                                   cfg.max_len - cfg.min_len)
        cur = int(rng.choice(m, p=weights))
        pos: dict[int, int] = {}
        seq: list[int] = []
        seen: set[int] = set()
        while len(seq) < length:
            if seq and m > 1 and rng.random() < cfg.switch_prob:
                w = np.where(np.arange(m) == cur, 0.0, weights)
                cur = int(rng.choice(m, p=w / w.sum()))
            k = int(mine[cur])
            chain = items.chains[k]
            if rng.random() < cfg.interaction_noise:
                it = int(rng.integers(n))
                if it not in seen:
                    seq.append(it)
                    seen.add(it)
                    continue
            if k in pos and rng.random() < cfg.step_prob:
                start = pos[k] + 1 + int(np.searchsorted(_STEPS, rng.random()))
            else:
                start = int(np.searchsorted(items.pop_cdf[k], rng.random()))
            p = _free(chain, start, seen)
            if p is None:  # the whole chain is used up: allow a repeat
                p = start % len(chain)
            pos[k] = p
            seq.append(int(chain[p]))
            seen.add(int(chain[p]))
        seqs.append(seq)
    return seqs


def _splits(seqs: list[list[int]], max_history: int) -> dict[str, Split]:
    """Every training prefix; valid and test are leave-one-out (second-to-last, last)."""
    rows: dict[str, list] = {"train": [], "valid": [], "test": []}
    for u, s in enumerate(seqs):
        n = len(s)
        for t in range(1, n - 2):
            rows["train"].append((u, s[max(0, t - max_history):t], s[t]))
        rows["valid"].append((u, s[max(0, n - 2 - max_history):n - 2], s[n - 2]))
        rows["test"].append((u, s[max(0, n - 1 - max_history):n - 1], s[n - 1]))
    return {k: Split.from_rows(v) for k, v in rows.items()}


# --------------------------------------------------------------------------------------------- output


def _write_domain(cfg: SyntheticConfig, out_dir: Path, name: str, vocab: _Vocab) -> dict:
    ddir = out_dir / name
    (ddir / "images").mkdir(parents=True, exist_ok=True)
    items = _make_items(cfg, _rng(cfg, name, "items"))
    nouns = _domain_nouns(cfg, name, vocab)
    trng, irng = _rng(cfg, name, "text"), _rng(cfg, name, "image")
    item_ids = [f"{name}-{i:06d}" for i in range(cfg.items_per_domain)]
    texts, image_col = [], []
    for i, raw in enumerate(item_ids):
        k, sec, lev = int(items.primary[i]), int(items.secondary[i]), float(items.level[i])
        texts.append(_item_text(cfg, trng, vocab, nouns, k, sec, lev))
        img = _render(cfg, irng, vocab, k, sec, lev)  # always drawn: keeps the stream independent
        if items.has_image[i]:
            rel = f"images/{raw}.png"
            img.save(ddir / rel, format="PNG", optimize=False)
            image_col.append(rel)
        else:
            image_col.append("")
    wanted = {Path(r).name for r in image_col if r}
    for stale in (ddir / "images").glob("*.png"):  # left over from an earlier generation here
        if stale.name not in wanted:
            stale.unlink()
    seqs = _make_sequences(cfg, _rng(cfg, name, "users"), items)
    splits = _splits(seqs, cfg.max_history)
    for split, data in splits.items():
        write_inter(ddir / f"{name}.{split}.inter", data)
    write_index_map(ddir / f"{name}.item2index", item_ids)
    write_index_map(ddir / f"{name}.user2index", [f"{name}-U{u:06d}" for u in range(len(seqs))])
    write_text(ddir / f"{name}.text", item_ids, texts)
    with atomic_open(ddir / f"{name}.items.tsv") as fh:
        fh.write(ITEM_TABLE_HEADER + "\n")
        for raw, text, rel in zip(item_ids, texts, image_col):
            fh.write(f"{raw}\t{text}\t{rel}\n")
    if cfg.proxy_features:
        write_proxy_features(ddir, name, dim=cfg.proxy_dim)
    lens = [len(s) for s in seqs]
    return {
        "num_items": cfg.items_per_domain, "num_users": len(seqs), "num_interactions": sum(lens),
        "rows": {k: len(v) for k, v in splits.items()}, "missing_images": int((~items.has_image).sum()),
        "avg_len": round(sum(lens) / len(lens), 4), "role": "target" if name in cfg.target_domains else "source",
    }


def generate_catalogue(out_dir: str | Path, cfg: SyntheticConfig = SyntheticConfig(),
                       show_progress: bool = False) -> dict:
    """Write the synthetic catalogue under ``out_dir`` (one folder per domain) and return its summary.

    The summary (also written last as ``out_dir/catalogue.json``) holds the config, the source and
    target domains and per-domain counts. Deterministic: the same config gives byte-identical files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "catalogue.json").unlink(missing_ok=True)  # not complete until rewritten at the end
    vocab = _vocab(cfg)
    domains = {}
    for name in tqdm(cfg.domains, desc="synthetic domains", disable=not show_progress):
        domains[name] = _write_domain(cfg, out_dir, name, vocab)
        log.info("synthetic domain %s: %s", name, domains[name])
    conf = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}
    summary = {"format": FORMAT, "config": conf, "source_domains": list(cfg.source_domains),
               "target_domains": list(cfg.target_domains), "domains": domains}
    write_json(out_dir / "catalogue.json", summary)
    return summary


__all__ = ["SyntheticConfig", "generate_catalogue"]
