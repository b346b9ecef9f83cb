"""llama.cpp's own converter (the vendored convert_hf_to_gguf.py) on a Phi-3 folder, in a process of its own:

    python -m compress.export.gguf_convert MODEL_FOLDER OUT.gguf --outtype f32|f16|bf16

Two things stop it on folders that transformers 5 saved, both fixed here without editing vendored files:
- Phi-3's converter reads `tokenizer.model` (SentencePiece) unless tokenizer_config.json says GPT2Tokenizer;
  transformers 5 writes `TokenizersBackend` and only tokenizer.json. Without tokenizer.model we take the
  converter's own BPE route (`_set_vocab_gpt2`), which is what GPT2Tokenizer folders get.
- A BPE vocabulary whose pre-tokenizer hash the converter does not know raises NotImplementedError. Where
  tokenizer.json's pre-tokenizer is plain ByteLevel with its regex and there is no normalizer, that *is*
  GPT-2's pre-tokenizer, so we name it `gpt-2`. Anything else is refused with one sentence (exit code 2).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from compress.runtimes.llama_cpp_tools import converter_path

REFUSED = 2


def byte_level_gpt2(folder: Path) -> bool:
    """Whether tokenizer.json pre-tokenizes exactly as GPT-2 does: ByteLevel with its regex, no normalizer."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return False
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    pre = tokenizer.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    return tokenizer.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) \
        and not pre.get("add_prefix_space", False)


class UnsupportedTokenizer(Exception):
    pass


def _patch_converter() -> None:
    from conversion.base import TextModel
    from conversion.phi import Phi3MiniModel

    own_set_vocab, own_pre = Phi3MiniModel.set_vocab, TextModel.get_vocab_base_pre

    def set_vocab(self) -> None:
        if not (self.dir_model / "tokenizer.model").is_file() and (self.dir_model / "tokenizer.json").is_file():
            return self._set_vocab_gpt2()
        return own_set_vocab(self)

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return own_pre(self, tokenizer)
        except NotImplementedError:
            if byte_level_gpt2(self.dir_model):
                return "gpt-2"
            raise UnsupportedTokenizer(
                f"{self.dir_model}: llama.cpp does not know this tokenizer's pre-tokenizer (not in its converter's list, "
                "and not GPT-2's plain ByteLevel), so a GGUF of it would tokenize text differently") from None

    Phi3MiniModel.set_vocab = set_vocab
    TextModel.get_vocab_base_pre = get_vocab_base_pre


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[2] != "--outtype":
        print("usage: python -m compress.export.gguf_convert MODEL_FOLDER OUT.gguf --outtype f32|f16|bf16", file=sys.stderr)
        return REFUSED
    folder, out, outtype = Path(argv[0]), Path(argv[1]), argv[3]
    sys.path[:0] = converter_path()
    _patch_converter()
    import convert_hf_to_gguf

    sys.argv = ["convert_hf_to_gguf.py", str(folder), "--outfile", str(out), "--outtype", outtype]
    try:
        convert_hf_to_gguf.main()
    except UnsupportedTokenizer as error:
        print(f"error: {error}", file=sys.stderr)
        return REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
