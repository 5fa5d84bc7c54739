"""A tokenizer as a dict of file bytes, so checkpoints are self-contained for export.

The names come back from a checkpoint, which may come from someone else: only plain base names from
`TOKENIZER_FILE_NAMES` (the files Hugging Face tokenizers save) are written, and only into a temporary
folder of our own; anything else (`/abs/x`, `../x`, `a/b`, an unknown name) is refused.
"""
from __future__ import annotations

import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath

TOKENIZER_FILE_NAMES = frozenset({
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
})


def check_tokenizer_files(files: object, source: str = "the checkpoint") -> dict[str, bytes]:
    """`files` if it maps allow-listed plain file names to bytes; one sentence naming the first bad entry otherwise."""
    if not isinstance(files, dict):
        raise ValueError(f"Tokenizer files in {source} must be a dict of file name -> bytes, got {type(files).__name__}.")
    for name, data in files.items():
        plain = isinstance(name, str) and name == PurePosixPath(name).name == PureWindowsPath(name).name
        if not plain or name not in TOKENIZER_FILE_NAMES:
            raise ValueError(
                f"Tokenizer file name {name!r} in {source} is not allowed; expected a plain file name, one of "
                f"{', '.join(sorted(TOKENIZER_FILE_NAMES))}."
            )
        if not isinstance(data, bytes):
            raise ValueError(f"Tokenizer file {name!r} in {source} must hold bytes, got {type(data).__name__}.")
    return files


def tokenizer_to_files(tokenizer) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
    return check_tokenizer_files(files, source="the files tokenizer.save_pretrained wrote")


def tokenizer_from_files(files: dict[str, bytes], source: str = "the checkpoint"):
    from transformers import AutoTokenizer

    check_tokenizer_files(files, source)
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return AutoTokenizer.from_pretrained(tmp)
