"""The bundled offline corpus `python-docs`: real English text that exists on any CPython without a download.

Three parts, in this fixed order: the interpreter's help topics (`pydoc_data.topics`, one document per topic);
the prose of each standard library module (docstrings headed by the item's qualified name and signature, and
comment blocks that read as prose, in source order; read with `ast`/`tokenize`, so no module is imported);
the documentation files shipped inside the stdlib (IDLE's manual and notes, LICENSE, ...).
Docstrings and topics alone are only about 0.66M SmolLM2 tokens on CPython 3.11, hence the comments and files.
The corpus is built once per Python minor version into `lm_saes_cache()/corpora` and reused afterwards.
"""

import ast
import hashlib
import io
import json
import os
import re
import shutil
import sys
import sysconfig
import textwrap
import tokenize
import warnings
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path

from filelock import FileLock

from lm_saes_core.config import lm_saes_cache
from lm_saes_core.io import TMP_MARKER, atomic_write_text, temporary_path

CORPUS_VERSION = 1
CORPUS_META_FILE = "corpus.json"
MIN_DOCUMENT_CHARS = 200
MIN_COMMENT_WORDS = 4
# Directory names under the stdlib that hold tests, third-party packages or build files rather than docs.
SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib-dynload", "_bundled"}
)
DOC_FILE_SUFFIXES = frozenset({".txt", ".rst", ".html"})
DOC_FILE_NAMES = frozenset({"ChangeLog"})

DocNode = ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path, keep: Callable[[Path], bool]) -> list[Path]:
    """Paths relative to `root` of the files that `keep` accepts, outside the skipped directories, sorted.

    The skipped directories are pruned from the walk, not filtered after it: the stdlib's site-packages (torch and
    every other installed package) holds ~100x the stdlib's files."""
    files = []
    for directory, subdirectories, names in os.walk(root, followlinks=True):
        subdirectories[:] = [name for name in subdirectories if not skipped_dir(name)]
        for name in names:
            path = Path(directory, name)
            if path.is_file() and keep(path):
                files.append(path.relative_to(root))
    return sorted(files, key=lambda p: p.parts)


def skipped_dir(name: str) -> bool:
    return name in SKIPPED_DIRS or name.startswith("config-")


def iter_stdlib_sources(root: Path) -> Iterator[tuple[str, Path]]:
    """Yield (dotted module name, path) for the stdlib's .py files, sorted by module path (a package first)."""
    modules = []
    for relative in stdlib_files(root, lambda path: path.suffix == ".py"):
        parts = relative.with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        modules.append((parts, root / relative))
    for parts, path in sorted(modules):
        yield ".".join(parts), path


def iter_docstrings(node: DocNode, qualname: str) -> Iterator[tuple[int, str, str]]:
    """Yield (line, header, docstring) for a module and its classes, functions and methods."""
    doc = ast.get_docstring(node, clean=True)
    if doc:
        if isinstance(node, ast.Module):
            line, header = 0, qualname
        elif isinstance(node, ast.ClassDef):
            line, header = node.lineno, f"class {qualname}"
        else:
            line, header = node.lineno, f"{qualname}({ast.unparse(node.args)})"
        yield line, header, doc
    if isinstance(node, ast.Module | ast.ClassDef):
        for child in node.body:
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                yield from iter_docstrings(child, f"{qualname}.{child.name}")


def looks_like_code(line: str) -> bool:
    """Commented-out code parses as Python; English sentences almost never do."""
    candidate = line + "\n    pass" if line.endswith(":") else line
    try:
        ast.parse(candidate)
    except (SyntaxError, ValueError):
        return False
    return any(char in line for char in "=()[]{}:.")


def is_prose(lines: list[str]) -> bool:
    text = " ".join(lines)
    words = re.findall(r"[A-Za-z]{2,}", text)
    if len(words) < MIN_COMMENT_WORDS or sum(map(len, words)) < 0.6 * len(text):
        return False
    return sum(looks_like_code(line) for line in lines) * 2 < len(lines)


def iter_comment_blocks(source: bytes) -> Iterator[tuple[int, str]]:
    """Yield (line, text) for runs of whole-line comments that read as prose.

    Trailing comments after code are left out: they are terse, and in the codec tables they are long lists of
    Unicode character names. Shebangs, coding cookies and tool pragmas never pass the prose filter.
    """
    blocks: list[tuple[int, list[str]]] = []
    previous = -1
    for token in tokenize.tokenize(io.BytesIO(source).readline):
        if token.type != tokenize.COMMENT or not token.line.lstrip().startswith("#"):
            continue
        row = token.start[0]
        text = token.string.lstrip("#").removeprefix(" ").rstrip()
        if blocks and row == previous + 1:
            blocks[-1][1].append(text)
        else:
            blocks.append((row, [text]))
        previous = row
    for row, lines in blocks:
        lines = [line for line in lines if line.strip()]
        if lines and is_prose(lines):
            yield row, textwrap.dedent("\n".join(lines))


def module_sections(module: str, path: Path) -> list[tuple[str, str]]:
    """The module's prose as (header, text) pairs in source order; a comment block has an empty header.

    Returns [] when the file does not parse on this interpreter.
    """
    try:
        source = path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old modules warn on parse
            tree = ast.parse(source, filename=str(path))
        comments = [(row, "", text) for row, text in iter_comment_blocks(source)]
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError, tokenize.TokenError):
        return []
    items = sorted([*iter_docstrings(tree, module), *comments], key=lambda item: item[0])
    return [(header, text) for _, header, text in items]


def stdlib_documents(root: Path | None = None) -> Iterator[dict[str, str]]:
    """One document per module; a docstring or comment already used by an earlier module is left out."""
    seen: set[str] = set()
    for module, path in iter_stdlib_sources(root or stdlib_dir()):
        sections = []
        for header, text in module_sections(module, path):
            key = normalize_whitespace(text)
            if key in seen:
                continue
            seen.add(key)
            sections.append(f"{header}\n\n{text}" if header else text)
        yield {"text": "\n\n".join(sections), "source": f"stdlib:{module}"}


class HTMLText(HTMLParser):
    """Visible text of an HTML page as a browser lays it out: whitespace collapsed outside <pre>, a line break
    at each block element, and only the main content (`role="main"`) of a Sphinx page, without navigation."""

    BLOCKS = frozenset({"p", "div", "br", "li", "dt", "dd", "pre", "tr", "h1", "h2", "h3", "h4", "h5", "h6"})
    HIDDEN = frozenset({"script", "style", "head"})

    def __init__(self, main_only: bool) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.hidden = self.pre = 0
        self.main_only = main_only
        self.main_depth = 0  # open <div>s from the main one down; its text is kept while > 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.hidden += tag in self.HIDDEN
        self.pre += tag == "pre"
        if tag == "div" and (self.main_depth or ("role", "main") in attrs):
            self.main_depth += 1
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        self.hidden -= tag in self.HIDDEN and self.hidden > 0
        self.pre -= tag == "pre" and self.pre > 0
        if tag in self.BLOCKS:
            self.parts.append("\n")
        if tag == "div" and self.main_depth:
            self.main_depth -= 1

    def handle_data(self, data: str) -> None:
        if (self.main_depth or not self.main_only) and not self.hidden:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        lines = [line.rstrip() for line in "".join(self.parts).replace("\u00b6", "").splitlines()]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def html_to_text(html: str) -> str:
    parser = HTMLText(main_only='role="main"' in html)
    parser.feed(html)
    parser.close()
    return parser.text()


def is_doc_file(path: Path) -> bool:
    """Prose files shipped in the stdlib; grammars are data, not documentation."""
    named = path.suffix in DOC_FILE_SUFFIXES or path.name in DOC_FILE_NAMES or path.name.startswith("README")
    return named and "Grammar" not in path.name


def doc_file_documents(root: Path | None = None) -> Iterator[dict[str, str]]:
    root = root or stdlib_dir()
    for relative in stdlib_files(root, is_doc_file):
        try:
            text = (root / relative).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if relative.suffix == ".html":
            text = html_to_text(text)
        yield {"text": text.strip(), "source": f"stdlib-file:{relative.as_posix()}"}


def topic_documents() -> Iterator[dict[str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield {"text": topics[name].strip(), "source": f"pydoc_data.topics:{name}"}


def python_docs_records() -> list[dict[str, str]]:
    """All records in their fixed order (help topics, modules, files; each sorted by name), deduplicated."""
    records, seen = [], set()
    for record in (*topic_documents(), *stdlib_documents(), *doc_file_documents()):
        key = normalize_whitespace(record["text"])
        if len(key) < MIN_DOCUMENT_CHARS or key in seen:
            continue
        seen.add(key)
        records.append(record)
    return records


def texts_fingerprint(texts: list[str]) -> str:
    """sha256 of the texts in order (NUL-separated), so any change of content or order changes it."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()


def corpus_dir_name() -> str:
    return f"python-docs-{sys.version_info.major}.{sys.version_info.minor}-v{CORPUS_VERSION}"


def read_corpus_meta(path: str | Path) -> dict:
    """The metadata written next to the data of a built corpus (fingerprint, counts, Python version)."""
    return json.loads((Path(path) / CORPUS_META_FILE).read_text())


def is_complete(path: Path) -> bool:
    """A corpus directory is complete once it holds the metadata file, which is written last before the rename."""
    return path.is_dir() and (path / CORPUS_META_FILE).is_file() and (path / "state.json").is_file()


def write_corpus(path: Path) -> None:
    import datasets  # here, not at module level: ~1 s of start-up that most processes never need

    records = python_docs_records()
    texts = [record["text"] for record in records]
    fingerprint = texts_fingerprint(texts)
    table = datasets.Dataset.from_dict({"text": texts, "source": [record["source"] for record in records]})
    # A content-derived datasets fingerprint makes every later transform's fingerprint reproducible too.
    dataset = datasets.Dataset(table.data, info=table.info, split=datasets.Split.TRAIN, fingerprint=fingerprint)
    dataset.save_to_disk(str(path))
    meta = {
        "name": "python-docs",
        "version": CORPUS_VERSION,
        "corpus_fingerprint": fingerprint,
        "documents": len(texts),
        "characters": sum(len(text) for text in texts),
        "python_version": sys.version.split()[0],
        "stdlib": str(stdlib_dir()),
    }
    atomic_write_text(path / CORPUS_META_FILE, json.dumps(meta, indent=2))


def build_python_docs_corpus(cache_dir: str | Path | None = None) -> Path:
    """Build the corpus once (into a temp dir renamed into place under a file lock) and return its directory."""
    root = Path(cache_dir) if cache_dir is not None else lm_saes_cache() / "corpora"
    target = root / corpus_dir_name()
    if is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{target.name}.lock")):
        if is_complete(target):
            return target
        # Leftovers of a crashed build: only the lock holder builds, so they belong to nobody now.
        for stale in root.glob(f"{TMP_MARKER}*-{target.name}"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            shutil.rmtree(target)  # an incomplete directory (e.g. copied by hand); never reuse it
        tmp = temporary_path(target)
        try:
            write_corpus(tmp)
            tmp.replace(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


BUNDLED_DATASETS: dict[str, Callable[..., Path]] = {"python-docs": build_python_docs_corpus}
