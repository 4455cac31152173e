"""vitkit.tokenizer against the libraries themselves, on a few hundred labels and hostile strings.

No download: the CLIP folders are made from open_clip's own vocabulary (the one OpenAI's CLIP and
every transformers CLIP checkpoint use) and saved by transformers; the SigLIP folders hold a small
SentencePiece unigram model trained here, with SigLIP's piece ids (pad 0, eos 1, unk 2, no bos),
saved by transformers' `SiglipTokenizer`.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import train_spiece
from vitkit.errors import ConfigError
from vitkit.tokenizer import TokenizedText, Tokenizer, load_tokenizer, write_clip_vocab

pytest.importorskip("tokenizers")
pytest.importorskip("sentencepiece")
pytest.importorskip("ftfy")
transformers = pytest.importorskip("transformers")

CLASSES = Path(__file__).parents[1] / "src" / "vitkit" / "data" / "imagenet_classes.txt"
LONG = " ".join(f"word{i} café 東京 😀 &amp;" for i in range(4_000))[:100_000]


def _strings() -> list[str]:
    names = CLASSES.read_text(encoding="utf-8").splitlines()[:200]
    hostile = [
        "", " ", "   ", "\t\n", "\n\n\r\n", "\u3000", "\xa0x\xa0",
        "😀", "👩‍👩‍👧‍👦", "🏳️‍🌈", "🇯🇵🇫🇷", "👍🏽 thumbs", "❤️", "a😀b😀c",
        "東京タワー", "中文 汉字", "한국어", "مرحبا بالعالم", "नमस्ते दुनिया", "Привет, мир",
        "e\u0301te\u0301", "café", "CAFÉ", "ﬁne ﬂour", "Straße", "İstanbul", "ΣΊΣΥΦΟΣ",
        "\u200fRTL\u200e mark", "\u202eevil\u202c", "a\u200bb", "\ufffd", "\ufeffbom",
        "&amp;", "&lt;3", "&amp;amp;", "<b>&amp;amp;</b>", "Tom &amp; Jerry", "&#39;quoted&#39;",
        "&nbsp;x",
        "cafÃ©", "Ã¼ber", "â€œquotesâ€\x9d",
        "<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "a<|endoftext|>b",
        "x <|endoftext|> y <|startoftext|>", "<<|endoftext|>>",
        "</s>", "<unk>", "<pad>", "<s>", "hello </s> world", "</s></s>", "x</s>", "</s>x",
        "a <unk> b", "<unk></s>", "<</s>>", "</S>", "<UNK>", "▁", "▁▁a", "a ▁ b",
        "<start_of_text>", "<end_of_text>", "<START_OF_TEXT>", "a<end_of_text>b",
        "<<start_of_text>", "x <start_of_text> <end_of_text> y",
        "\x00", "a\x00b", "\x01\x02\x1f", "\x7f", "line\x0bbreak", "bell\x07",
        "supercalifragilisticexpialidocious" * 6, "x" * 500, "ab" * 300,
        "0", "12345", "3.14159", "1,000,000", "2024-01-01", "٣٤٥", "①②③",
        "!", "!!!", "?!", "...", "!@#$%^&*()_+-=[]{}|;':\",./<>?`~", "—–-", "«»„“",
        "don't", "it's", "we'll", "THEY'RE", "I'M", "you'd", "o'clock",
        "a photo of a {}.", "A   photo\tof\n a  cat", " leading", "trailing ",
        "a\u0345b1", "\ua7ce\ua7cf letters",  # where regex and Oniguruma disagree on \p{L}
        "a_b_c", "snake_case_label", "CamelCaseLabel", "#hashtag @mention", "http://x.org/a?b=c",
        LONG,
    ]  # fmt: skip
    out = names + [f"This is a photo of {n}." for n in names] + hostile
    assert len(out) > 400 and len(set(out)) == len(out)
    return out


STRINGS = _strings()


def _mismatches(ours: list[list[int]], theirs: list[list[int]]) -> list[str]:
    return [repr(s[:60]) for s, a, b in zip(STRINGS, ours, theirs) if a != b]


# ------------------------------------------------------------------------------ CLIP
def _open_clip_vocab() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip is not installed (its vocabulary makes the CLIP folders)")
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """(a vocab.json + merges.txt folder, a folder saved by transformers, its tokenizer)."""
    _open_clip_vocab()
    plain = write_clip_vocab(tmp_path_factory.mktemp("clip_plain"))
    saved = tmp_path_factory.mktemp("clip_hf")
    transformers.CLIPTokenizer.from_pretrained(plain, model_max_length=77).save_pretrained(saved)
    assert (saved / "tokenizer.json").is_file()
    return plain, saved, transformers.AutoTokenizer.from_pretrained(saved)


def _hf_ids(tok, max_length, strings=STRINGS):
    return [tok(s, truncation=True, max_length=max_length)["input_ids"] for s in strings]


def test_clip_ids_match_transformers(clip):
    plain, saved, tok = clip
    ours = load_tokenizer(saved)
    assert (ours.kind, ours.context_length) == ("clip", 77)
    assert ours.eos_id == ours.pad_id == tok.eos_token_id == 49407
    theirs = _hf_ids(tok, 77)
    assert max(map(len, theirs)) == 77  # the long string was cut
    assert not _mismatches([ours.encode(s) for s in STRINGS], theirs)
    # the same vocabulary as vocab.json + merges.txt only (older checkpoints)
    older = load_tokenizer(plain)
    assert not _mismatches([older.encode(s) for s in STRINGS], theirs)


def test_clip_batch_pads_like_transformers(clip):
    _, saved, tok = clip
    ours = load_tokenizer(saved)
    batch = [*STRINGS[:40], "", "<|endoftext|>", *STRINGS[-30:]]
    want = tok(batch, padding=True, truncation=True, max_length=77, return_tensors="pt")
    got = ours(batch)
    assert isinstance(got, TokenizedText)
    assert got.input_ids.dtype == got.attention_mask.dtype == torch.int64
    assert torch.equal(got.input_ids, want["input_ids"])
    assert torch.equal(got.attention_mask, want["attention_mask"])
    short = ours(["a cat", "a dog"])  # padded to the longest, not to 77
    assert short.input_ids.shape == (2, 4)
    full = ours(["a cat"], padding="max_length")
    assert full.input_ids.shape == (1, 77) and int(full.attention_mask.sum()) == 4
    assert full.input_ids[0, 4:].eq(ours.pad_id).all()


def test_clip_pad_token_is_read(clip, tmp_path):
    """A checkpoint whose pad token is "!" (laion's ViT-bigG, as SDXL's tokenizer_2): pad id 0, and
    transformers then reads every "!" in a text as that special token, which vitkit follows."""
    _, saved, _ = clip
    folder = tmp_path / "bang"
    shutil.copytree(saved, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    bang = dict(content="!", lstrip=False, normalized=False, rstrip=False, single_word=False)
    config.update(pad_token="!", added_tokens_decoder={"0": {**bang, "special": True}})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_tokenizer(folder)
    assert ours.pad_id == tok.pad_token_id == 0 and ours.eos_id == 49407
    strings = [*STRINGS[-120:], "hi!", "wow!! great!"]
    for s in strings:
        assert ours.encode(s) == tok(s, truncation=True, max_length=77)["input_ids"], s
    want = tok(strings[-5:], padding=True, truncation=True, max_length=77, return_tensors="pt")
    got = ours(strings[-5:])
    assert torch.equal(got.input_ids, want["input_ids"])
    assert torch.equal(got.attention_mask, want["attention_mask"])


def test_clip_older_folder_layout(clip, tmp_path):
    """Special tokens as the older hub folders state them (openai/clip-vit-*): dicts with
    normalized=true in tokenizer_config.json and special_tokens_map.json, no added_tokens_decoder;
    "<|ENDOFTEXT|>" is then matched after lowercasing."""
    _, saved, _ = clip
    folder = tmp_path / "older"
    shutil.copytree(saved, folder)
    stored = json.loads((folder / "tokenizer.json").read_text())
    for token in stored["added_tokens"]:
        token["normalized"] = True
    (folder / "tokenizer.json").write_text(json.dumps(stored))
    flags = dict(lstrip=False, normalized=True, rstrip=False, single_word=False)
    eos = {"content": "<|endoftext|>", **flags}
    tokens = {"bos_token": {"content": "<|startoftext|>", **flags}, "eos_token": eos,
              "unk_token": eos, "pad_token": "<|endoftext|>"}  # fmt: skip
    (folder / "special_tokens_map.json").write_text(json.dumps(tokens))
    config = {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True}
    config.update({k: {"__type": "AddedToken", **v} if isinstance(v, dict) else v
                   for k, v in tokens.items()})  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_tokenizer(folder)
    strings = STRINGS[-130:]
    assert tok("<|ENDOFTEXT|>")["input_ids"] == [49406, 49407, 49407]
    assert [ours.encode(s) for s in strings] == _hf_ids(tok, 77, strings)


def test_context_length_caps_the_folders(clip):
    _, saved, tok = clip
    ours = load_tokenizer(saved, context_length=16)
    assert ours.context_length == 16
    for s in STRINGS[200:260] + STRINGS[-5:]:
        assert ours.encode(s) == tok(s, truncation=True, max_length=16)["input_ids"]
    assert load_tokenizer(saved, context_length=500).context_length == 77  # the folder's 77


# ------------------------------------------------------------------------------ open_clip
def test_open_clip_ids_match_open_clip(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    want = open_clip.tokenize(STRINGS)
    assert want.shape == (len(STRINGS), 77)
    ours = load_tokenizer(tmp_path, kind="open_clip")  # the vocabulary of the installed package
    assert (ours.kind, ours.context_length, ours.pad_id, ours.eos_id) == ("open_clip", 77, 0, 49407)
    got = ours(STRINGS)
    assert not _mismatches(got.input_ids.tolist(), want.tolist())
    # real tokens run up to the last <end_of_text>; the zeros after are padding
    ends = [max(i for i, t in enumerate(row) if t == 49407) + 1 for row in want.tolist()]
    lengths = torch.arange(77).expand(len(STRINGS), 77) < torch.tensor(ends)[:, None]
    assert torch.equal(got.attention_mask, lengths.long())
    assert [len(ours.encode(s)) for s in STRINGS] == ends


def test_open_clip_folder_is_detected(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    shutil.copy(_open_clip_vocab(), tmp_path / "bpe_simple_vocab_16e6.txt.gz")
    text_cfg = {"context_length": 32, "vocab_size": 49408}
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": {"text_cfg": text_cfg}})
    )
    ours = load_tokenizer(tmp_path)
    assert (ours.kind, ours.context_length) == ("open_clip", 32)
    assert torch.equal(ours(STRINGS).input_ids, open_clip.tokenize(STRINGS, context_length=32))
    text_cfg["hf_tokenizer_name"] = "timm/ViT-B-16-SigLIP"
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": {"text_cfg": text_cfg}})
    )
    with pytest.raises(ConfigError, match="timm/ViT-B-16-SigLIP"):
        load_tokenizer(tmp_path)


# ------------------------------------------------------------------------------ SigLIP
SIGLIP_VARIANTS = {  # (odd model, config changes)
    # as transformers 5 saves a SiglipTokenizer it built: </s> and <unk> without lstrip/rstrip
    "saved": (False, {}),
    # as SiglipTokenizer asks and transformers 4 saved (the hub's folders): lstrip/rstrip on
    "stripping": (False, {"lstrip": True, "rstrip": True}),
    "odd_model": (True, {}),
    # legacy=false: transformers turns add_dummy_prefix off, which its <unk> prefix makes moot
    "no_dummy_prefix": (False, {"legacy": False}),
}


@pytest.fixture(scope="module")
def spiece_models():
    return {odd: train_spiece(odd) for odd in (False, True)}


@pytest.fixture(params=sorted(SIGLIP_VARIANTS))
def siglip(request, spiece_models, tmp_path):
    odd, change = SIGLIP_VARIANTS[request.param]
    (tmp_path / "spiece.model").write_bytes(spiece_models[odd])
    folder = tmp_path / "hf"
    transformers.SiglipTokenizer(vocab_file=str(tmp_path / "spiece.model")).save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    if "legacy" in change:
        config["legacy"] = change["legacy"]
    for token in config["added_tokens_decoder"].values():
        token.update({k: v for k, v in change.items() if k in ("lstrip", "rstrip")})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder, transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.filterwarnings("ignore:This sequence already has")  # transformers, on "...</s>"
def test_siglip_ids_match_transformers(siglip):
    folder, tok = siglip
    assert type(tok).__name__ == "SiglipTokenizer"
    ours = load_tokenizer(folder)
    assert (ours.kind, ours.context_length) == ("siglip", 64)
    assert ours.pad_id == tok.pad_token_id == 1 and ours.eos_id == tok.eos_token_id == 1
    want = tok(STRINGS, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    got = ours(STRINGS)
    assert got.input_ids.shape == (len(STRINGS), 64)
    assert not _mismatches(got.input_ids.tolist(), want["input_ids"].tolist())
    assert torch.equal(got.attention_mask, want["attention_mask"])
    assert [len(ours.encode(s)) for s in STRINGS] == want["attention_mask"].sum(1).tolist()
    short, some = load_tokenizer(folder, context_length=16), STRINGS[-60:]
    want = tok(some, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    assert torch.equal(short(some).input_ids, want["input_ids"])


# ------------------------------------------------------------------------------ speed
def test_100_kb_of_text_is_cut_to_the_context(clip, spiece_models, tmp_path):
    (tmp_path / "spiece.model").write_bytes(spiece_models[False])
    tokenizers = [load_tokenizer(clip[1]), load_tokenizer(tmp_path)]
    if importlib.util.find_spec("open_clip") is not None:
        tokenizers.append(load_tokenizer(tmp_path, kind="open_clip"))
    for tok in tokenizers:
        ids = tok.encode(LONG)
        assert len(ids) == tok.context_length and ids[-1] == tok.eos_id


def test_folder_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"no tokenizer files.*tokenizer\.json") as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(ConfigError, match=r"spiece\.model"):
        load_tokenizer(tmp_path, kind="siglip")
    with pytest.raises(ConfigError, match="not a folder"):
        load_tokenizer(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="kind"):
        load_tokenizer(tmp_path, kind="bert")
    with pytest.raises(ConfigError, match="context_length"):
        load_tokenizer(tmp_path, context_length=1)


@pytest.mark.parametrize(
    "text",
    [
        b"{not json",
        b"[1, 2]",
        json.dumps({"model": {"type": "Unigram", "vocab": [["a", 0.0]]}}).encode(),
        json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [["a", "b"]]}}).encode(),
        json.dumps({"model": {"type": "BPE", "vocab": ["a"], "merges": []}}).encode(),
        b"\xff\xfe\x00garbage",
    ],
)
def test_corrupt_tokenizer_json(tmp_path, text):
    (tmp_path / "tokenizer.json").write_bytes(text)
    with pytest.raises(ConfigError, match=r"tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_corrupt_spiece_model(tmp_path):
    (tmp_path / "spiece.model").write_bytes(os.urandom(4096))
    with pytest.raises(ConfigError, match=r"spiece\.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "spiece.model").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"spiece\.model"):
        load_tokenizer(tmp_path)


def test_corrupt_config_and_vocab(clip, tmp_path):
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "GemmaTokenizer"}')
    (tmp_path / "spiece.model").write_bytes(b"x")
    with pytest.raises(ConfigError, match="GemmaTokenizer"):
        load_tokenizer(tmp_path)
    folder = tmp_path / "oc"
    folder.mkdir()
    (folder / "bpe_simple_vocab_16e6.txt.gz").write_bytes(b"not gzip")
    with pytest.raises(ConfigError, match="bpe_simple_vocab"):
        load_tokenizer(folder, kind="open_clip")
    left = tmp_path / "left"
    shutil.copytree(clip[1], left)
    (left / "tokenizer_config.json").write_text('{"padding_side": "left"}')
    with pytest.raises(ConfigError, match="padding_side"):
        load_tokenizer(left)
    plain = tmp_path / "plain"
    shutil.copytree(clip[0], plain)
    (plain / "merges.txt").write_text("#version: 0.2\nzz yy\n")
    with pytest.raises(ConfigError, match=r"merges\.txt"):
        load_tokenizer(plain)


def test_oversize_files_are_refused(clip, spiece_models, tmp_path, monkeypatch):
    (tmp_path / "spiece.model").write_bytes(spiece_models[False])
    monkeypatch.setenv("VITKIT_MAX_JSON_BYTES", "100000")
    with pytest.raises(ConfigError, match=r"tokenizer\.json.*JSON_BYTES"):
        load_tokenizer(clip[1])
    with pytest.raises(ConfigError, match=r"spiece\.model.*JSON_BYTES"):
        load_tokenizer(tmp_path)
    (tmp_path / "bpe_simple_vocab_16e6.txt.gz").write_bytes(gzip.compress(b"a b\n" * 100_000))
    with pytest.raises(ConfigError, match="JSON_BYTES"):  # 400 kB once decompressed
        load_tokenizer(tmp_path, kind="open_clip")


def test_symlink_out_of_the_folder_is_refused(clip, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer.json").symlink_to(clip[1] / "tokenizer.json")
    with pytest.raises(ConfigError, match="outside"):
        load_tokenizer(folder)
    # a hub cache snapshot links its files to ../../blobs/, inside the repository's folder
    repo = tmp_path / "models--org--clip"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / "abc").mkdir(parents=True)
    shutil.copy(clip[1] / "tokenizer.json", repo / "blobs" / "f00d")
    (repo / "snapshots" / "abc" / "tokenizer.json").symlink_to("../../blobs/f00d")
    assert load_tokenizer(repo / "snapshots" / "abc").encode("a cat") == [49406, 320, 2368, 49407]
    (repo / "snapshots" / "abc" / "tokenizer.json").unlink()
    (repo / "snapshots" / "abc" / "tokenizer.json").symlink_to(clip[1] / "tokenizer.json")
    with pytest.raises(ConfigError, match="outside"):
        load_tokenizer(repo / "snapshots" / "abc")


def test_missing_library_names_the_extra(spiece_models, tmp_path, monkeypatch):
    (tmp_path / "spiece.model").write_bytes(spiece_models[False])
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    with pytest.raises(ConfigError, match=r"vitkit\[text\]"):
        load_tokenizer(tmp_path)


def test_non_str_input_is_refused(clip):
    tok = load_tokenizer(clip[1])
    assert isinstance(tok, Tokenizer)
    for bad in ([1], [b"bytes"], ["ok", None], 3, None):
        with pytest.raises(ConfigError):
            tok(bad)
    with pytest.raises(ConfigError):
        tok.encode(b"bytes")
    with pytest.raises(ConfigError):
        tok.encode("lone \ud800 surrogate")
    with pytest.raises(ConfigError, match="padding"):
        tok(["a"], padding="longest")
    assert tok("a cat").input_ids.shape == (1, 4)  # one str is one text, as in open_clip
