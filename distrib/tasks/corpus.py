"""The language model's text: by default the Python standard library's own source files, found on every machine that
runs Python, or any UTF-8 text file or directory of them. Whole files are held out for validation."""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

HOLD_OUT = 10  # every tenth file (the 10th, 20th, ... of the sorted list) is validation text
# Under the standard library, but not of it: installed packages, and the test suites (odd encodings on purpose).
_NOT_STDLIB = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class Corpus:
    """Training and validation text as bytes (uint8 tensors), and the files each came from, relative to root."""

    root: Path
    train: torch.Tensor
    val: torch.Tensor
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]

    def unigram_entropy(self) -> float:
        """Bits per byte of the best model that ignores context: the training text's byte frequencies, on the
        validation text (the cross-entropy a model must beat to have learned more than frequencies)."""
        counts = torch.bincount(self.train.long(), minlength=256).double() + 1  # add-one: every byte possible
        log_p = (counts / counts.sum()).log2()
        return float(-log_p[self.val.long()].mean())


def stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library's directory and its .py files, sorted by relative path (the same list on every rank)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _NOT_STDLIB & set(p.relative_to(root).parts[:-1]) and p.is_file()]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def text_files(path: Path) -> tuple[Path, list[Path]]:
    """`path` itself, or every file under the directory `path` (hidden ones aside), sorted; ValueError if none."""
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise ValueError(f"{path} does not exist: name a UTF-8 text file or a directory of them")
    files = [p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path))]
    if not files:
        raise ValueError(f"{path} holds no files: name a UTF-8 text file or a directory of them")
    return path, sorted(files, key=lambda p: p.relative_to(path).as_posix())


def load(path: Path | None = None) -> Corpus:
    """The corpus of `path` (None: the standard library); ValueError, one line, for a path that is empty, cannot be
    read, or holds something other than UTF-8 text."""
    root, files = stdlib_files() if path is None else text_files(path)
    texts = [_read(f) for f in files]
    if len(files) == 1:  # one file: hold out its last tenth, cut at a line end where there is one
        data = texts[0]
        cut = len(data) - max(1, len(data) // HOLD_OUT)
        cut = data.rfind(b"\n", 0, cut) + 1 or cut
        parts, names = ([data[:cut]], [data[cut:]]), ((files[0].name,), (files[0].name,))
    else:
        held = set(range(HOLD_OUT - 1, len(files), HOLD_OUT)) or {len(files) - 1}
        parts = ([t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held])
        relative = [f.relative_to(root).as_posix() for f in files]
        names = (
            tuple(r for i, r in enumerate(relative) if i not in held),
            tuple(r for i, r in enumerate(relative) if i in held),
        )
    where = path if path is not None else root
    for kind, part in zip(("training", "validation"), parts):
        if not sum(map(len, part)):
            total, count = sum(map(len, texts)), f"{len(files)} file{'s' * (len(files) != 1)}"
            raise ValueError(f"{where} leaves no {kind} text ({total} bytes in {count}): give it more text")
    train, val = (torch.frombuffer(bytearray(b"".join(p)), dtype=torch.uint8) for p in parts)
    return Corpus(root, train, val, *names)


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _read(file: Path) -> bytes:
    try:
        data = file.read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {file}: {error.strerror or error}") from None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"{file} is not UTF-8 text (byte {data[error.start]:#04x} on line {line}): "
            "name UTF-8 text files, or a directory holding only those"
        ) from None
    if b"\0" in data:  # valid UTF-8, but binary all the same
        raise ValueError(f"{file} holds NUL bytes, so it is not text: name UTF-8 text files only")
    return data
