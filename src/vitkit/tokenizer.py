"""Text -> token ids for the CLIP and SigLIP text towers, as the libraries that made them do.

A text tower only agrees with its checkpoint when it is fed the ids its training code made: the
same cleaning, the same vocabulary, the same special tokens, truncation and padding. So nothing
here re-implements a tokenizer: each folder's own files are read with the library that wrote them
(`tokenizers` for byte-level BPE, `sentencepiece` for SigLIP's unigram model), and only the
wrapper each Python library puts around them is reproduced:

- "clip": a transformers CLIP folder (`tokenizer.json`, or `vocab.json` + `merges.txt`), as
  transformers 5's `CLIPTokenizer` builds it: the BPE vocabulary and merges from the files, its
  fixed NFC + whitespace + lowercase normalizer and split regex (those stored in a
  `tokenizer.json` are ignored, as transformers ignores them), `<|startoftext|> ... <|endoftext|>`,
  and the special tokens of `tokenizer_config.json` found in the text as transformers finds them
  (in the raw text, or lowercased where the folder marks them `normalized`; a checkpoint whose pad
  token is "!" therefore reads every "!" as token 0, as transformers does). Batches pad to the
  longest with the pad token.
- "open_clip": open_clip's `SimpleTokenizer` over `bpe_simple_vocab_16e6.txt.gz`: ftfy, HTML
  unescaping twice, whitespace collapsed, lowercase, open_clip's regex (with the `regex` module
  when it is installed, as open_clip; else the same pattern through `tokenizers`, which can
  disagree on characters newer than its Unicode tables), `<start_of_text>` / `<end_of_text>`
  matched where the regex meets them, cut to `context_length` with the end token last, padded
  with 0 to `context_length`.
- "siglip": transformers' `SiglipTokenizer` over `spiece.model`: the special tokens split out of
  the raw text first (with their lstrip/rstrip flags from `tokenizer_config.json`), each piece
  lowercased, stripped of `string.punctuation` and of extra whitespace, encoded behind an
  `<unk>` prefix that is then cut off (transformers' trick), `</s>` appended unless the ids
  already end with it, cut to 64, padded to 64 with the pad token (`</s>`).

Files are untrusted: only fixed names inside the folder are read (a symlink may not leave it, nor
a hub snapshot's repository folder), each no larger than `vitkit.limits` JSON_BYTES, and a file
the libraries cannot parse is a `ConfigError` naming it. The libraries are the optional extra
`vitkit[text]`, imported when a tokenizer is loaded.
"""

from __future__ import annotations

import gzip
import html
import importlib
import importlib.util
import io
import itertools
import json
import re
import string
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vitkit import limits
from vitkit.checkpoints._safety import confine
from vitkit.config import read_capped, read_json
from vitkit.errors import CheckpointError, ConfigError

KINDS = ("clip", "open_clip", "siglip")
OPEN_CLIP_VOCAB = "bpe_simple_vocab_16e6.txt.gz"
_TOKENIZER_FILES = (
    "tokenizer.json", "vocab.json", "merges.txt", "spiece.model", "open_clip_config.json"
)  # fmt: skip
_DEFAULT_CONTEXT = {"clip": 77, "open_clip": 77, "siglip": 64}
_MAX_CONTEXT = 1 << 16  # a larger stated model_max_length means "none" (transformers: 1e30)
_NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
          "mask_token")  # fmt: skip
_CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
    r"""[^\s\p{L}\p{N}]+"""
)
_OPEN_CLIP_SPECIALS = ("<start_of_text>", "<end_of_text>")
_OPEN_CLIP_SPLIT = (
    "|".join(_OPEN_CLIP_SPECIALS)
    + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_SPIECE_UNDERLINE = "▁"


@dataclass
class TokenizedText:
    """A batch of token ids, padded: both (N, T) int64."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor  # 1 for real tokens (specials included), 0 for padding


class Tokenizer:
    """Text -> ids for one checkpoint (`load_tokenizer` builds it).

    `encode` gives one text's ids with its special tokens, cut to `context_length`; calling the
    tokenizer on a list pads a batch: by default as the checkpoint's library does (transformers'
    CLIP to the longest text, open_clip and SigLIP to `context_length`), or to `context_length`
    with `padding="max_length"`.
    """

    def __init__(
        self,
        kind: str,
        context_length: int,
        pad_id: int,
        eos_id: int,
        encode: Callable[[str], list[int]],
        *,
        pad_to_max: bool,
        source: str,
    ) -> None:
        self.kind = kind
        self.context_length = context_length
        self.pad_id = pad_id
        self.eos_id = eos_id
        self._encode = encode
        self._pad_to_max = pad_to_max
        self.source = source

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self.kind!r}, context_length={self.context_length}, "
            f"pad_id={self.pad_id}, eos_id={self.eos_id}, source={self.source!r})"
        )

    def encode(self, text: str) -> list[int]:
        """The ids of `text` with the special tokens, cut to `context_length`, not padded."""
        if not isinstance(text, str):
            raise ConfigError(f"text must be a str, got {type(text).__name__}")
        try:
            return self._encode(text)
        except ConfigError:
            raise
        except Exception as exc:  # a library refusing the text (a lone surrogate, ...)
            raise ConfigError(f"{self.source}: cannot tokenize {text[:40]!r}: {exc}") from None

    def __call__(self, texts: Sequence[str], *, padding: str = "default") -> TokenizedText:
        """Ids and attention mask of a batch; `padding` is "default" or "max_length"."""
        if padding not in ("default", "max_length"):
            raise ConfigError(f"padding={padding!r}; choose 'default' or 'max_length'")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence):
            raise ConfigError(f"texts must be a list of str, got {type(texts).__name__}")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ConfigError(f"texts[{i}] must be a str, got {type(t).__name__}")
        rows = [self.encode(t) for t in texts]
        if padding == "max_length" or self._pad_to_max:
            width = self.context_length
        else:
            width = max(map(len, rows), default=0)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
            mask[i, : len(row)] = 1
        return TokenizedText(ids, mask)


def load_tokenizer(
    folder: Path, *, kind: str | None = None, context_length: int | None = None
) -> Tokenizer:
    """The tokenizer of the checkpoint in `folder`.

    kind: "clip" (a transformers CLIP folder), "open_clip" (open_clip's own BPE; its vocabulary
        from the folder, else from the installed open_clip) or "siglip" (`spiece.model`); None
        detects it from `tokenizer_config.json`'s `tokenizer_class` and the files present.
    context_length: the most ids a text may take; the folder's own (`model_max_length`, or
        open_clip's `text_cfg.context_length`) is capped by it. Default 77, SigLIP 64.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a folder (looked for tokenizer files in it)")
    if kind is not None and kind not in KINDS:
        raise ConfigError(f"kind={kind!r}; choose one of {KINDS}")
    if context_length is not None and (
        not limits.is_int(context_length) or not 2 <= context_length <= _MAX_CONTEXT
    ):
        raise ConfigError(f"context_length={context_length!r} must be an int in 2..{_MAX_CONTEXT}")
    files = _Files(folder)
    config = files.json("tokenizer_config.json") if kind != "open_clip" else None
    kind = kind or _detect(files, config)
    if kind == "open_clip":
        return _load_open_clip(files, context_length)
    _check_config(files, config or {}, kind)
    length = _context(config or {}, "model_max_length", files, "tokenizer_config.json", kind)
    length = min(length, context_length) if context_length else length
    if kind == "clip":
        return _load_clip(files, config or {}, length)
    return _load_siglip(files, config or {}, length)


# ------------------------------------------------------------------------------ files
class _Files:
    """The fixed file names of one folder, confined to it (or to a hub snapshot's repository
    folder, whose files link to `../../blobs/`), read with a size limit."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        snapshot = folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir()
        self.root = folder.parent.parent if snapshot else folder

    def path(self, name: str) -> Path | None:
        try:
            path = confine(name, self.folder, root=self.root)
        except CheckpointError as exc:
            raise ConfigError(str(exc)) from None
        if not path.exists():
            return None
        if not path.is_file():
            raise ConfigError(f"{path}: not a regular file")
        return path

    def json(self, name: str) -> dict[str, Any] | None:
        path = self.path(name)
        return None if path is None else read_json(path, "tokenizer file", obj=True)

    def missing(self, *names: str) -> ConfigError:
        return ConfigError(f"{self.folder}: no tokenizer files (looked for {', '.join(names)})")


def _need(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"tokenizing text needs the {module!r} package: install vitkit[text]"
        ) from None


def _detect(files: _Files, config: dict[str, Any] | None) -> str:
    cls = (config or {}).get("tokenizer_class")
    if isinstance(cls, str) and cls.startswith("Siglip"):
        return "siglip"
    if isinstance(cls, str) and cls.startswith("CLIP"):
        return "clip"
    if files.path("spiece.model"):
        return "siglip"
    if files.path("tokenizer.json") or (files.path("vocab.json") and files.path("merges.txt")):
        return "clip"
    if files.path("open_clip_config.json"):
        return "open_clip"
    raise files.missing(*_TOKENIZER_FILES)


def _check_config(files: _Files, config: dict[str, Any], kind: str) -> None:
    where = files.folder / "tokenizer_config.json"
    cls = config.get("tokenizer_class")
    want = {"clip": "CLIPTokenizer", "siglip": "SiglipTokenizer"}[kind]
    if cls is not None and not (isinstance(cls, str) and cls.startswith(want)):
        raise ConfigError(
            f"{where}: tokenizer_class={cls!r}, not {want}; vitkit reads CLIP and SigLIP "
            f"tokenizers only"
        )
    for key in ("padding_side", "truncation_side"):
        if config.get(key, "right") != "right":
            raise ConfigError(f"{where}: {key}={config[key]!r} is not supported (only 'right')")
    if not isinstance(config.get("do_lower_case", True), bool):
        raise ConfigError(f"{where}: do_lower_case must be true or false")


def _context(config: dict[str, Any], key: str, files: _Files, name: str, kind: str) -> int:
    value = config.get(key)
    if value is None or (limits.is_int(value) and value > _MAX_CONTEXT):
        return _DEFAULT_CONTEXT[kind]
    if not limits.is_int(value) or value < 2:
        raise ConfigError(f"{files.folder / name}: {key}={value!r} is not a length of at least 2")
    return int(value)


# ------------------------------------------------------------------------------ special tokens
def _token(value: Any, where: str) -> dict[str, Any] | None:
    """A special token as written in a config (a str, or a dict with "content"), as AddedToken
    fields; None for none."""
    if value is None:
        return None
    if isinstance(value, str):  # transformers makes it AddedToken(value, special=True)
        return {"content": value, "special": True}
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
        out = {k: value[k] for k in flags if k in value}
        if not all(isinstance(v, bool) for v in out.values()):
            raise ConfigError(f"{where}: the flags of token {value['content']!r} must be booleans")
        return {"content": value["content"], **out}
    raise ConfigError(f"{where}: {value!r:.80} is not a token (a string or {{'content': ...}})")


def _added_token(tk: Any, t: dict[str, Any], named: bool) -> Any:
    """`tokenizers.AddedToken` of a token's fields, as transformers makes it: `normalized`
    defaults to not `special`, and a named special token is made special after that."""
    special = bool(t.get("special", False))
    return tk.AddedToken(
        t["content"],
        single_word=t.get("single_word", False),
        lstrip=t.get("lstrip", False),
        rstrip=t.get("rstrip", False),
        normalized=t.get("normalized", not special),
        special=special or named,
    )


def _special_tokens(
    files: _Files, config: dict[str, Any], defaults: dict[str, str], tokenizer_json: Any = None
) -> tuple[dict[str, dict[str, Any]], list[tuple[int, dict[str, Any]]], list[str]]:
    """(named tokens, (id, token) of the added tokens in id order, extra special tokens), as
    transformers' `from_pretrained` gathers them: `tokenizer_config.json`'s named tokens and
    `added_tokens_decoder`; without the latter, `special_tokens_map.json` over the named ones and
    the `added_tokens` of `tokenizer.json`."""
    where = str(files.folder / "tokenizer_config.json")
    values = {k: config[k] for k in _NAMED if k in config}
    extra = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
    added: list[tuple[int, dict[str, Any]]] = []
    if "added_tokens_decoder" in config:
        table = config["added_tokens_decoder"]
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: added_tokens_decoder must map ids to tokens")
        for key, value in table.items():
            if not (isinstance(key, str) and key.isdigit() and isinstance(value, dict)):
                raise ConfigError(f"{where}: added_tokens_decoder[{key!r}] is not id -> token")
            token = _token(value, where)
            assert token is not None
            added.append((int(key), token))
    else:
        smap = files.json("special_tokens_map.json") or {}
        for key, value in smap.items():
            if key in _NAMED:  # a dict here is made AddedToken(**value, special=True)
                values[key] = {**value, "special": True} if isinstance(value, dict) else value
            elif key in ("extra_special_tokens", "additional_special_tokens") and value:
                extra = value
        listed = (tokenizer_json or {}).get("added_tokens") or []
        for i, value in enumerate(listed if isinstance(listed, list) else [None]):
            name = str(files.folder / "tokenizer.json")
            if not (isinstance(value, dict) and limits.is_int(value.get("id"))):
                raise ConfigError(f"{name}: added_tokens[{i}] is not a token with an id")
            token = _token(value, name)
            assert token is not None
            added.append((int(value["id"]), token))
    added.sort(key=lambda item: item[0])
    by_content = {t["content"]: t for _, t in added}
    named: dict[str, dict[str, Any]] = {}
    for key in _NAMED:
        token = _token(values.get(key, defaults.get(key)), where)
        if token is not None:
            named[key] = by_content.get(token["content"], token)
    if isinstance(extra, dict):  # transformers 5: model-specific named tokens
        extra = list(extra.values())
    if not isinstance(extra, list):
        raise ConfigError(f"{where}: extra_special_tokens must be a list")
    extras = [t["content"] for t in (_token(v, where) for v in extra) if t is not None]
    return named, added, extras


# ------------------------------------------------------------------------------ CLIP
def _load_clip(files: _Files, config: dict[str, Any], length: int) -> Tokenizer:
    tk = _need("tokenizers")
    from tokenizers.models import BPE

    stored = files.json("tokenizer.json")
    if stored is not None:
        source = str(files.folder / "tokenizer.json")
        model = stored.get("model")
        if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
            raise ConfigError(f"{source}: its model is not a BPE (not a CLIP tokenizer)")
        vocab, merges = model.get("vocab"), model.get("merges")
        if not isinstance(vocab, dict) or not isinstance(merges, list):
            raise ConfigError(f"{source}: model.vocab must be a dict and model.merges a list")
        try:
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
        except TypeError:
            raise ConfigError(f"{source}: model.merges holds a non-pair") from None
    else:
        vocab_path, merges_path = files.path("vocab.json"), files.path("merges.txt")
        if vocab_path is None or merges_path is None:
            raise files.missing("tokenizer.json", "vocab.json + merges.txt")
        source = f"{vocab_path} + merges.txt"
        read_capped(vocab_path), read_capped(merges_path)  # the size checks
        try:
            vocab, merges = BPE.read_file(str(vocab_path), str(merges_path))
        except Exception as exc:
            raise ConfigError(f"{source}: unreadable ({exc})") from None
    defaults = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}  # fmt: skip
    named, added, extras = _special_tokens(files, config, defaults, stored)
    try:
        tok = tk.Tokenizer(
            BPE(
                vocab=vocab,
                merges=merges,
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix="</w>",
                fuse_unk=False,
                unk_token=named.get("unk_token", {}).get("content"),
            )
        )
    except Exception as exc:
        raise ConfigError(f"{source}: not a usable BPE vocabulary ({exc})") from None
    tok.normalizer = tk.normalizers.Sequence(
        [tk.normalizers.NFC(), tk.normalizers.Replace(tk.Regex(r"\s+"), " "),
         tk.normalizers.Lowercase()]
    )  # fmt: skip
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence(
        [
            tk.pre_tokenizers.Split(tk.Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    # transformers adds the added tokens in id order, then the named ones not among them
    is_named = {t["content"] for t in named.values()} | set(extras)
    tokens = [t for _, t in added]
    seen = {t["content"] for t in tokens}
    for t in [*named.values(), *({"content": c, "special": True} for c in extras)]:
        if t["content"] not in seen:
            seen.add(t["content"])
            tokens.append(t)
    tok.add_tokens([_added_token(tk, t, t["content"] in is_named) for t in tokens])
    ids = {k: tok.token_to_id(t["content"]) for k, t in named.items()}
    if ids.get("bos_token") is None or ids.get("eos_token") is None:
        raise ConfigError(f"{source}: the bos and eos tokens are not in the vocabulary")
    tok.post_processor = tk.processors.RobertaProcessing(
        (named["eos_token"]["content"], ids["eos_token"]),
        (named["bos_token"]["content"], ids["bos_token"]),
        trim_offsets=False,
        add_prefix_space=False,
    )
    tok.no_padding()
    tok.enable_truncation(max_length=length)
    pad = ids.get("pad_token")

    def encode(text: str) -> list[int]:
        return list(tok.encode(text).ids)

    return Tokenizer(
        "clip",
        length,
        ids["eos_token"] if pad is None else pad,
        ids["eos_token"],
        encode,
        pad_to_max=False,
        source=source,
    )


# ------------------------------------------------------------------------------ open_clip
def _load_open_clip(files: _Files, context_length: int | None) -> Tokenizer:
    tk = _need("tokenizers")
    ftfy = _need("ftfy")
    from tokenizers.models import BPE

    oc = files.json("open_clip_config.json")
    where = str(files.folder / "open_clip_config.json")
    model_cfg = (oc or {}).get("model_cfg") or {}
    text_cfg = (model_cfg.get("text_cfg") if isinstance(model_cfg, dict) else None) or {}
    if not isinstance(model_cfg, dict) or not isinstance(text_cfg, dict):
        raise ConfigError(f"{where}: model_cfg.text_cfg must be an object")
    if text_cfg.get("hf_tokenizer_name"):
        raise ConfigError(
            f"{where}: this model uses the Hugging Face tokenizer "
            f"{text_cfg['hf_tokenizer_name']!r}, not open_clip's BPE; put its tokenizer files "
            f"(tokenizer_config.json with tokenizer.json or spiece.model) in the folder"
        )
    kwargs = text_cfg.get("tokenizer_kwargs") or {}
    if kwargs not in ({}, {"clean": "lower"}):
        raise ConfigError(f"{where}: tokenizer_kwargs={kwargs!r} are not supported")
    length = _context(text_cfg, "context_length", files, "open_clip_config.json", "open_clip")
    length = min(length, context_length) if context_length else length

    path = files.path(OPEN_CLIP_VOCAB) or _installed_open_clip_vocab()
    vocab, merges = open_clip_vocabulary(path, where=files.folder)
    try:
        bpe = BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>")
    except Exception as exc:
        raise ConfigError(f"{files.folder}: not open_clip's BPE vocabulary ({exc})") from None
    byte_encoder = _bytes_to_unicode()
    specials = {s: vocab[s] for s in _OPEN_CLIP_SPECIALS}
    sot, eot = specials["<start_of_text>"], specials["<end_of_text>"]
    split = _open_clip_splitter(tk)

    def encode(text: str) -> list[int]:
        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
        text = " ".join(text.split()).strip().lower()
        ids: list[int] = []
        # each piece gives one id or more, and only the first length - 2 ids are kept
        for piece in itertools.islice(split(text), length - 2):
            if piece in specials:
                ids.append(specials[piece])
            else:
                units = "".join(byte_encoder[b] for b in piece.encode("utf-8"))
                ids.extend(t.id for t in bpe.tokenize(units))
        return [sot, *ids[: length - 2], eot]

    return Tokenizer("open_clip", length, 0, eot, encode, pad_to_max=True, source=str(path))


def open_clip_vocabulary(
    path: Path | None = None, *, where: Path | str = "."
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocabulary, merges) of open_clip's `bpe_simple_vocab_16e6.txt.gz` (at `path`, else the
    installed open_clip's), the BPE of OpenAI's CLIP: 256 byte units, the same with "</w>",
    48,894 merges, then `<start_of_text>` (49406) and `<end_of_text>` (49407)."""
    path = path or _installed_open_clip_vocab()
    if path is None:
        raise ConfigError(
            f"{where}: no {OPEN_CLIP_VOCAB} in it, and open_clip is not installed to "
            f"take it from (pip install open_clip_torch, or copy the file into the folder)"
        )
    cap = limits.limit("JSON_BYTES")
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(read_capped(path))) as f:
            data = f.read(cap + 1)
        if len(data) > cap:
            limits.check(len(data), "JSON_BYTES", "uncompressed size in bytes", str(path))
        lines = data.decode("utf-8").split("\n")
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{path}: not open_clip's BPE vocabulary ({exc})") from None
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    if not merges or any(len(m) != 2 for m in merges):
        raise ConfigError(f"{path}: not open_clip's BPE vocabulary (merges are not pairs)")
    units = list(_bytes_to_unicode().values())
    words = units + [u + "</w>" for u in units]
    words += ["".join(m) for m in merges] + list(_OPEN_CLIP_SPECIALS)
    return dict(zip(words, range(len(words)))), merges  # type: ignore[return-value]


def write_clip_vocab(folder: str | Path, source: Path | None = None) -> Path:
    """Write open_clip's vocabulary (`open_clip_vocabulary`) into `folder` as a transformers
    CLIP tokenizer reads it, `vocab.json` + `merges.txt` (the special tokens spelled
    `<|startoftext|>` / `<|endoftext|>`, the same ids): a folder saved from an open_clip
    checkpoint then carries its tokenizer."""
    from vitkit._io import atomic_write_text

    vocab, merges = open_clip_vocabulary(source)
    names = dict(zip(_OPEN_CLIP_SPECIALS, ("<|startoftext|>", "<|endoftext|>")))
    vocab = {names.get(word, word): i for word, i in vocab.items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    atomic_write_text(folder / "merges.txt", text)
    return folder


def _installed_open_clip_vocab() -> Path | None:
    """open_clip's vocabulary file where the package is installed, found without importing it
    (its __init__ imports its models)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / OPEN_CLIP_VOCAB
        if path.is_file():
            return path
    return None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (open_clip's `bytes_to_unicode`)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _open_clip_splitter(tk: Any) -> Callable[[str], Iterator[str]]:
    """open_clip's `re.findall(pat, text)`, lazily: with the `regex` module open_clip uses when
    it is installed, else the same pattern in `tokenizers` (Oniguruma)."""
    try:
        regex = importlib.import_module("regex")
    except ImportError:
        split = tk.pre_tokenizers.Split(tk.Regex(_OPEN_CLIP_SPLIT), behavior="removed", invert=True)
        return lambda text: (p for p, _ in split.pre_tokenize_str(text))
    pattern = regex.compile(_OPEN_CLIP_SPLIT, regex.IGNORECASE)
    return lambda text: (m.group() for m in pattern.finditer(text))


# ------------------------------------------------------------------------------ SigLIP
def _load_siglip(files: _Files, config: dict[str, Any], length: int) -> Tokenizer:
    spm = _need("sentencepiece")
    path = files.path("spiece.model")
    if path is None:
        raise files.missing("spiece.model")
    # (legacy=false makes transformers turn add_dummy_prefix off, which the <unk> prefix
    # below makes moot: the ids are the same)
    data = read_capped(path)
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
    except Exception as exc:
        raise ConfigError(f"{path}: not a SentencePiece model ({exc})") from None
    lower = config.get("do_lower_case", True)
    defaults = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
    named, added, extras = _special_tokens(files, config, defaults)

    # transformers' added tokens: the stated ones at their stated ids, then each named token not
    # among them (lstrip/rstrip off) at its id in the model, else after the vocabulary
    decoder = dict(added)
    encoder = {t["content"]: i for i, t in decoder.items()}
    special = list(dict.fromkeys([t["content"] for t in named.values()] + extras))
    size = sp.get_piece_size()
    for content in special:
        if content in encoder:
            continue
        i = sp.piece_to_id(content)
        if not (i < size and sp.id_to_piece(i) == content):
            i = size + len([j for j in decoder if j >= size])
        decoder[i] = {"content": content}
        encoder[content] = i
    flags = {c: decoder[i] for c, i in encoder.items()}
    split = _splitter(list(encoder))
    if "unk_token" not in named or "eos_token" not in named:
        raise ConfigError(f"{path}: the folder states no unk or no eos token")
    unk = named["unk_token"]["content"]
    unk_length = len(sp.encode(unk, out_type=str))
    special_set = set(special)

    def chunk_pieces(chunk: str) -> list[str]:  # SiglipTokenizer._tokenize
        if lower:
            chunk = chunk.lower()
        chunk = re.sub(r"\s+", " ", chunk.translate(_PUNCTUATION)).strip()
        pieces = sp.encode(unk + chunk, out_type=str)
        return pieces[unk_length:] if len(pieces) >= unk_length else pieces

    def tokenize(text: str) -> list[str]:  # SiglipTokenizer.tokenize, PreTrainedTokenizer's
        parts = split(_SPIECE_UNDERLINE + text.replace(_SPIECE_UNDERLINE, " "))
        for i, part in enumerate(parts):
            if part not in encoder:
                continue
            f = flags[part]
            left = parts[i - 1] if i > 0 else None
            right = parts[i + 1] if i < len(parts) - 1 else None
            if f.get("rstrip") and right:
                parts[i + 1] = right.lstrip()
            if f.get("lstrip") and left:
                parts[i - 1] = left.rstrip()
            if f.get("single_word"):
                if left and left[-1] != " ":
                    parts[i - 1] += part
                    parts[i] = ""
                elif right and right[0] != " ":
                    parts[i + 1] = part + parts[i + 1]
                    parts[i] = ""
        tokens: list[str] = []
        for part in parts:
            if not part:
                continue
            if part in encoder or part in special_set:
                tokens.append(part)
            else:
                tokens.extend(chunk_pieces(part))
        if len(tokens) > 1 and tokens[0] == _SPIECE_UNDERLINE and tokens[1] in special_set:
            tokens = tokens[1:]
        return tokens

    def to_id(token: str) -> int:
        return encoder[token] if token in encoder else sp.piece_to_id(token)

    eos = to_id(named["eos_token"]["content"])
    pad = to_id(named["pad_token"]["content"]) if "pad_token" in named else eos

    def encode(text: str) -> list[int]:
        ids = [to_id(t) for t in tokenize(text)]
        ids = ids[: length - 1] if len(ids) + 1 > length else ids
        return ids if ids and ids[-1] == eos else [*ids, eos]

    return Tokenizer("siglip", length, pad, eos, encode, pad_to_max=True, source=str(path))


def _splitter(tokens: list[str]) -> Callable[[str], list[str]]:
    """Text cut around the added tokens, leftmost and longest first (transformers' Trie); the
    tokens kept as parts, no empty parts."""
    if not tokens:
        return lambda text: [text] if text else []
    pattern = re.compile(
        "(" + "|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) + ")"
    )
    return lambda text: [p for p in pattern.split(text) if p]
