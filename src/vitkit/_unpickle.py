"""One restricted unpickler for the pickles vitkit must read from untrusted files (CIFAR's
python batches, the `.metadata` of a sharded training checkpoint): builtin containers and
scalars, plus the globals its caller names; every other global, persistent id and
allocating call is refused, and the opcodes are walked once before anything is built, so a
length that claims more bytes than the data hold is refused before it is allocated."""

from __future__ import annotations

import builtins
import io
import pickle
import pickletools
from collections.abc import Callable, Mapping
from typing import Any

_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray",
             "int", "float", "bool", "complex"}  # fmt: skip


def _no_size(kind: type) -> Callable[..., Any]:
    """`bytes` / `bytearray` that refuse an int argument (`bytearray(10**12)` allocates)."""

    def make(*args: Any) -> Any:
        if args and not isinstance(args[0], (bytes, bytearray, str, list)):
            raise pickle.UnpicklingError(
                f"{kind.__name__}({type(args[0]).__name__}) is not allowed"
            )
        return kind(*args)

    return make


def _latin1_encode(text: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes: latin-1 only, no other codecs."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode(..., {encoding!r}) is not allowed")
    return text.encode("latin-1", errors)


class _Restricted(pickle.Unpickler):
    def __init__(self, data: bytes, allowed: Mapping[tuple[str, str], Any], **kwargs: Any):
        super().__init__(io.BytesIO(data), **kwargs)
        self.allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            kind = getattr(builtins, name)
            return _no_size(kind) if name in ("bytes", "bytearray") else kind
        if (module, name) == ("_codecs", "encode"):  # how protocol-2 pickles spell bytes
            return _latin1_encode
        if (module, name) in self.allowed:
            return self.allowed[module, name]
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def restricted_loads(data: bytes, allowed: Mapping[tuple[str, str], Any] = {}, **kwargs: Any
                     ) -> Any:  # fmt: skip
    """`pickle.loads(data)` building only builtins and `allowed[(module, name)]`. Raises
    `pickle.UnpicklingError` (or EOFError / ValueError ...) on anything else or on a truncated
    stream; callers turn those into their one-line error."""
    for _ in pickletools.genops(io.BytesIO(data)):
        pass  # raises on a truncated stream or a length beyond the end of the data
    return _Restricted(data, allowed, **kwargs).load()
