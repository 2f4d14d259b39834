"""The items of one domain to encode, in item-index order: ids, texts and (optionally) image references.

Two sources, tried in this order:

- ``<D>.items.tsv`` (header ``item_id<TAB>text<TAB>image``): rows in item-index order; ``image`` is a path
  relative to the domain folder, an ``http(s)://`` URL, or empty when the item has no image. When
  ``<D>.item2index`` exists, row ``i`` must hold the item that file gives index ``i``.
- ``<D>.text`` (atomic format, text only): item texts placed by ``<D>.item2index`` when present.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from missrec.data.atomic import iter_item_table, read_index_map, read_text
from missrec.errors import DataFormatError, MissingInputError
from missrec.io import sha256_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ItemSource:
    """A domain's items in index order. ``images`` is ``None`` for a text-only source (``<D>.text``)."""

    domain: str
    root: Path  # the domain folder: base of relative image paths
    path: Path  # the file the items came from
    sha256: str  # of that file
    item_ids: tuple[str, ...]
    texts: tuple[str, ...]
    images: tuple[str, ...] | None

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def has_images(self) -> bool:
        return self.images is not None


def read_item_source(domain_dir: str | Path, domain: str) -> ItemSource:
    """Read ``<D>.items.tsv`` (preferred) or ``<D>.text`` of ``domain`` in folder ``domain_dir``.

    Raises :class:`DataFormatError` (file and line) on a malformed table or when its rows disagree with
    ``<D>.item2index``; ``FileNotFoundError`` when neither source exists.
    """
    root = Path(domain_dir)
    table = root / f"{domain}.items.tsv"
    index_path = root / f"{domain}.item2index"
    index = read_index_map(index_path) if index_path.exists() else None
    if table.exists():
        ids, texts, images = _read_items_tsv(table, index, index_path)
        return ItemSource(domain, root, table, sha256_file(table), ids, texts, images)
    text_path = root / f"{domain}.text"
    if text_path.exists():
        texts_l = read_text(text_path, index, len(index) if index is not None else None)
        ids_l = index if index is not None else [str(i) for i in range(len(texts_l))]
        log.info("%s: no %s; text-only items from %s", domain, table.name, text_path.name)
        return ItemSource(domain, root, text_path, sha256_file(text_path), tuple(ids_l), tuple(texts_l), None)
    raise MissingInputError(f"{table}: no item table (and no {text_path.name}) for domain {domain!r}")


def _read_items_tsv(
    path: Path, index: list[str] | None, index_path: Path
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    ids: list[str] = []
    texts: list[str] = []
    images: list[str] = []
    for lineno, raw, text, image in iter_item_table(path):
        row = len(ids)
        if index is not None:
            if row >= len(index):
                raise DataFormatError(path, f"row {row} ({raw!r}) is beyond the {len(index)} items of "
                                            f"{index_path.name}", lineno)
            if index[row] != raw:
                raise DataFormatError(path, f"row {row} holds item {raw!r} but {index_path.name} gives index "
                                            f"{row} to {index[row]!r}: rows must be in item-index order", lineno)
        ids.append(raw)
        texts.append(text.strip())
        images.append(image.strip())
    if index is not None and len(ids) != len(index):
        raise DataFormatError(path, f"{len(ids)} item rows but {index_path.name} lists {len(index)} items "
                                    f"(first absent: {index[len(ids)]!r})")
    if not ids:
        raise DataFormatError(path, "the item table has no rows")
    return tuple(ids), tuple(texts), tuple(images)


__all__ = ["ItemSource", "read_item_source"]
