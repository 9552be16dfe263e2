"""Zero-shot classification, CLIP's standard check: each image gets the class whose prompt ("a photo of a
goldfish.") has the text vector closest to its image vector, with nothing trained on the classes.

Class names come from the dataset: a `words.txt` in its root (Tiny ImageNet ships one, all of WordNet) maps a
class id to its synonyms, "n01443537<TAB>goldfish, Carassius auratus", of which the first is the name; a class it
does not list is named by its folder, with _ and - read as spaces. Several templates are averaged per class as
CLIP does (the mean of the templates' unit text vectors, renormalised). The score is the rank of an image's true
class among all classes (`metrics.hit_ranks`), so top-k accuracy is rank < k, with hit@k's bootstrap intervals.

Text -> image retrieval (hit@k of a caption's image) needs captions; none of the datasets here has them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from simsearch.errors import SimsearchError
from simsearch.evaluation import metrics

log = logging.getLogger(__name__)

NAME = "{name}"  # where a template takes the class name
DEFAULT_TEMPLATES = ("a photo of a {name}.",)
WORDS_FILE = "words.txt"


def read_words(path: Path, wanted: set[str]) -> dict[str, str]:
    """The first synonym of each class id in `wanted` that `path` lists: 'id<TAB>name, synonym, ...' per line."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        wnid, _, synonyms = line.partition("\t")
        if wnid in wanted and synonyms.strip():
            out[wnid] = synonyms.split(",")[0].strip()
    return out


def class_names(root: Path, classes: Sequence[str]) -> list[str]:
    """A readable name per class id (a Tiny ImageNet wnid or a folder name), in the order of `classes`."""
    words = root / WORDS_FILE
    listed = read_words(words, set(classes)) if words.is_file() else {}
    unlisted = [c for c in classes if c not in listed]
    if listed and unlisted:
        log.warning("%s lists %d of %d classes; the others are named by their folder (e.g. %s)", words, len(listed),
                    len(classes), unlisted[0])
    return [listed.get(c) or " ".join(c.replace("_", " ").replace("-", " ").split()) for c in classes]


def prompts(names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every template filled with every name, template-major: prompt t * C + c is templates[t] for names[c]."""
    if not templates:
        raise SimsearchError("zero-shot needs at least one prompt template")
    for t in templates:
        if NAME not in t:
            raise SimsearchError(f"prompt template {t!r} has no {NAME} for the class name")
    # replace, not str.format: a template may hold other braces
    return [t.replace(NAME, name) for t in templates for name in names]


def class_vectors(names: Sequence[str], templates: Sequence[str],
                  embed_text: Callable[[list[str]], np.ndarray]) -> np.ndarray:
    """(C, dim) unit vectors, one per class: the mean of its prompts' text vectors (embed_text: L2-normalised
    (N, dim) rows, as `TextEncoder.embed` gives), renormalised."""
    vectors = embed_text(prompts(names, templates))  # (T * C, dim)
    mean = vectors.reshape(len(templates), len(names), -1).mean(axis=0)  # (T, C, dim) -> (C, dim)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def class_ranks(images: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """0-based rank of each image's true class among all classes by cosine: (N, dim), (N,), (C, dim) -> (N,).

    Ties count in the image's favour, as in hit@k, so top-k accuracy is mean(rank < k).
    """
    return metrics.hit_ranks(images, classes, labels)
