"""IFEval offline: NLTK's ``punkt_tab`` sentence model for lm-eval's IFEval checkers, without a download.

``milora eval --suite ifeval`` runs lm-eval's own ``ifeval`` task (Google's reference checkers, shipped in
``lm_eval.tasks.ifeval``). Importing those checkers downloads NLTK's ``punkt_tab`` when it is missing. Offline,
`ensure_sentence_tokenizer` writes an untrained Punkt model (default parameters plus common English
abbreviations) into a private data directory first, so that sentence and word counting still work; the two
instructions that count sentences or capitalised words can then differ slightly from the reference on
abbreviation-heavy text.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from milora.io import atomic_write_text

# Abbreviations (lower case, no final period) given to the offline fallback so that "Dr. Smith" or "e.g. this"
# do not end a sentence.
# fmt: off
FALLBACK_ABBREVIATIONS = (
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "e.g", "i.e", "inc", "ltd", "co", "corp",
    "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "no", "fig", "approx",
    "u.s", "u.k", "a.m", "p.m", "dept", "est", "gen", "gov", "lt", "mt", "rev", "sgt", "vol",
)
# fmt: on

FALLBACK_DATA_DIR_ENV = "MILORA_NLTK_DATA"


def _punkt_tab_installed() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        return False
    return True


def _fallback_data_dir() -> Path:
    root = os.environ.get(FALLBACK_DATA_DIR_ENV)
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "milora" / "nltk_data"


def _write_fallback_punkt(data_dir: Path) -> None:
    model_dir = data_dir / "tokenizers" / "punkt_tab" / "english"
    contents = {
        "abbrev_types.txt": "\n".join(FALLBACK_ABBREVIATIONS) + "\n",
        "collocations.tab": "",
        "sent_starters.txt": "",
        "ortho_context.tab": "",
    }
    for name, text in contents.items():
        if not (model_dir / name).exists():
            atomic_write_text(model_dir / name, text)


@functools.cache
def ensure_sentence_tokenizer() -> str:
    """Make NLTK's ``punkt_tab`` loadable, installing the offline fallback if needed; returns its source."""
    import nltk

    if _punkt_tab_installed():
        return "nltk punkt_tab"
    data_dir = _fallback_data_dir()
    _write_fallback_punkt(data_dir)
    if str(data_dir) not in nltk.data.path:
        nltk.data.path.append(str(data_dir))
    if not _punkt_tab_installed():
        raise RuntimeError(f"could not provide NLTK punkt_tab (tried {data_dir})")
    return f"offline fallback at {data_dir}"
