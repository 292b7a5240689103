"""Where training text comes from: the embedded default corpus, a text file, or a folder of text files.

The default corpus is the English documentation that every CPython installation ships in `pydoc_data.topics`
(the texts of `help("topic")`, about 465 kB), so that training works out of the box with nothing to download.
"""

from __future__ import annotations

from pathlib import Path

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


def default_corpus() -> str:
    """The pydoc topics of this Python, sorted by topic name and joined by blank lines (the same text on every
    machine with the same Python version)."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[name].strip() for name in sorted(topics)) + "\n"


def read_text(path: str | Path) -> str:
    """The UTF-8 text of a file, or of every text file (.txt, .md, .rst, .text) under a folder, in sorted path order
    and joined by blank lines. Raises a clear error for a missing, empty or unreadable file or folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"training text {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"folder {path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
        text = "\n\n".join(_read_file(f) for f in files)
    else:
        text = _read_file(path)
    if not text.strip():
        raise ValueError(f"training text {path} is empty")
    return text


def _read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); convert it, or give a "
                         f"pre-tokenized .bin file") from None
    except OSError as error:
        raise OSError(f"cannot read {path}: {error.strerror}") from None
