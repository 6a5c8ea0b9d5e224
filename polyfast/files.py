"""Reading back the small files polyfast writes (references, critics, metrics): JSON and
safetensors only, so a file from someone else can hold wrong values but never code. A file that
does not decode, or decodes to the wrong shape, is a DataError naming it."""

from __future__ import annotations

import json

from .errors import DataError


def read_json(path: str, what: str):
    """The JSON value in ``path``; DataError naming it and ``what`` it should be otherwise."""
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8-sig"))
    except FileNotFoundError:
        raise DataError(f"no such file (expected {what})", path) from None
    except IsADirectoryError:
        raise DataError(f"a directory, not {what}", path) from None
    except OSError as e:
        raise DataError(f"cannot read it ({e.strerror or e})", path) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"not {what}: not UTF-8 JSON ({e})", path) from None


def read_safetensors(path: str, what: str) -> dict:
    """The tensors of a safetensors file (a JSON header and raw bytes: nothing in it is run);
    DataError naming it when it is missing or not safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except FileNotFoundError:
        raise DataError(f"no such file (expected {what})", path) from None
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"not {what}: not a safetensors file ({e})", path) from None
