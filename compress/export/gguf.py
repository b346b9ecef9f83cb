"""GGUF files for llama.cpp, Ollama and LM Studio, written by llama.cpp's own tools or, from a calibrated
variant, with its integer weights carried over exactly.

- `convert`: llama.cpp's converter (gguf_convert.py) on a Phi-3 folder -> a float GGUF (F32/BF16/F16).
- `quantize`: llama-quantize on that file, with an importance matrix from `imatrix` (llama-imatrix on the
  recipe's calibration tokens) and per-tensor types from the variant's ignore/overrides.
- `carry_exact`: a float GGUF whose quantized layers are replaced by a compressed-tensors folder's integer
  weights as Q4_0/Q4_1/Q8_0 blocks (gguf_blocks.py), one tensor at a time.
- `write_modelfile`: Ollama's Modelfile with the checkpoint's chat format and stop tokens.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from compress.export.gguf_blocks import BLOCK, BLOCK_BYTES, block_type, pack_blocks
from compress.runtimes import llama_cpp_tools
from compress.verify.layers import stored_linear

FLOAT_TYPES = ("F32", "F16", "BF16")
OUTTYPE = {"F32": "f32", "BF16": "bf16", "F16": "f16"}  # the source checkpoint's dtype -> converter's
FALLBACK = re.compile(r"(\S+)\s+- ncols\s+(\d+) not divisible by (\d+) \(required for type\s+(\S+)\) -> falling back to\s+(\S+)")


class GgufError(RuntimeError):
    """A llama.cpp tool failed or refused; str() is one sentence with where its log is."""


def gguf_module():
    """llama.cpp's vendored gguf-py (newer than PyPI's gguf of the same version number)."""
    llama_cpp_tools.require()
    path = str(llama_cpp_tools.vendored() / "gguf-py")
    if path not in sys.path:
        sys.path.insert(0, path)
    import gguf

    return gguf


def _run(command: list[str], log: Path, what: str, env: dict | None = None) -> str:
    """Run a tool with its output appended to `log`; -> that output. A failure raises with its last line."""
    completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    output = completed.stdout + completed.stderr
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle:
        handle.write(f"$ {' '.join(command)}\n{output}\n")
    if completed.returncode != 0:
        lines = [line for line in output.splitlines() if line.strip()]
        raise GgufError(f"{what} failed: {lines[-1] if lines else f'exit code {completed.returncode}'} (log: {log})")
    return output


def convert(model_folder: Path, out_file: Path, outtype: str, log: Path) -> Path:
    """A float GGUF of a Phi-3 folder, by llama.cpp's converter (refuses tokenizers it cannot reproduce)."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "compress.export.gguf_convert", str(model_folder), str(out_file), "--outtype", outtype],
         log, "llama.cpp's converter")
    return out_file


def llama_tokens(gguf_file: Path, text_file: Path, log: Path) -> np.ndarray:
    """How llama.cpp tokenizes a text file (special tokens parsed, no escapes processed), without BOS."""
    output = _run([str(llama_cpp_tools.tool("llama-tokenize")), "-m", str(gguf_file), "-f", str(text_file), "--ids",
                   "--no-escape", "--no-bos", "--log-disable"], log, "llama-tokenize")
    line = next(line for line in reversed(output.splitlines()) if line.startswith("["))
    return np.array(json.loads(line), dtype=np.int64)


def imatrix(float_gguf: Path, samples: np.ndarray, model_folder: Path, out_file: Path, threads: int, log: Path) -> dict:
    """llama-imatrix over the recipe's calibration tokens, `samples.shape[1]` tokens a chunk. It reads text, so
    the tokens go in decoded; -> how llama.cpp tokenized that text, against our tokenizer on the same text and
    against the calibration tokens themselves (decoding and encoding again can move a token boundary)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder, local_files_only=True)
    text = tokenizer.decode(samples.reshape(-1).tolist(), skip_special_tokens=False, clean_up_tokenization_spaces=False)
    text_file = out_file.parent / (out_file.name.split(".")[0] + ".txt")
    text_file.write_text(text, encoding="utf-8")
    theirs = llama_tokens(float_gguf, text_file, log)
    encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
    _run([str(llama_cpp_tools.tool("llama-imatrix")), "-m", str(float_gguf), "-f", str(text_file), "--no-escape",
          "--parse-special", "-c", str(samples.shape[1]), "-b", str(samples.shape[1]), "-o", str(out_file), "--no-ppl",
          "-t", str(threads)], log, "llama-imatrix", llama_cpp_tools.environment(threads))
    return {"tokens": len(theirs), "calibration_tokens": int(samples.size), "chunks": len(theirs) // samples.shape[1],
            "same_as_our_tokenizer": theirs.tolist() == list(encoded)}


def quantize(float_gguf: Path, out_file: Path, quant: str, tensor_types: dict[str, str], output_type: str | None,
             embedding_type: str | None, imatrix_file: Path | None, threads: int, log: Path, pure: bool = False) -> dict:
    """llama-quantize. `tensor_types`: exact GGUF tensor name -> type; `pure`: every tensor `quant`, no K-quant mix.
    -> the tensors that fell back to another type."""
    command = [str(llama_cpp_tools.tool("llama-quantize"))] + (["--pure"] if pure else [])
    if imatrix_file is not None:
        command += ["--imatrix", str(imatrix_file)]
    if output_type:
        command += ["--output-tensor-type", output_type.lower()]
    if embedding_type:
        command += ["--token-embedding-type", embedding_type.lower()]
    if tensor_types:
        listing = log.with_name(out_file.stem + ".tensor-types.txt")  # beside the log: not part of the artifact
        listing.write_text("".join(f"^{re.escape(name)}$={kind.lower()}\n" for name, kind in tensor_types.items()))
        command += ["--tensor-type-file", str(listing)]
    output = _run([*command, str(float_gguf), str(out_file), quant, str(threads)], log, "llama-quantize",
                  llama_cpp_tools.environment(threads))
    return {"fell_back": fallbacks(output)}


def fallbacks(quantize_output: str) -> dict[str, str]:
    """{tensor: "q4_K -> q5_0 (rows of 128, not a multiple of 256)"} from llama-quantize's warnings."""
    return {match[1]: f"{match[4]} -> {match[5]} (rows of {match[2]}, not a multiple of {match[3]})"
            for match in FALLBACK.finditer(quantize_output)}


def tensor_types(gguf_file: Path) -> dict[str, str]:
    """{tensor name: GGML type name} as written in the file."""
    reader = gguf_module().GGUFReader(str(gguf_file))
    return {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}


def gguf_name_map(config: dict):
    gguf = gguf_module()
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, int(config["num_hidden_layers"]))


def tensor_name(name_map, hf_name: str) -> str | None:
    """The GGUF tensor name of a Hugging Face tensor (`model.layers.0.mlp.down_proj.weight` -> blk.0.ffn_down.weight)."""
    return name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def carry_exact(float_gguf: Path, calibrated: Path, out_file: Path, config: dict) -> dict[str, str]:
    """`float_gguf` with every quantized Linear of the compressed-tensors folder `calibrated` written as exact
    GGUF blocks and every float tensor of `calibrated` (norms that AWQ rescaled, layers kept float) taken from
    it in the GGUF's own float type. One tensor in memory at a time. -> {GGUF tensor: type written}."""
    from compress.tensors import TensorFolder

    gguf = gguf_module()
    reader = gguf.GGUFReader(str(float_gguf))
    name_map = gguf_name_map(config)
    with TensorFolder(calibrated) as folder:
        schemes = {name[: -len(".weight_packed")]: _scheme(folder, name[: -len(".weight_packed")])
                   for name in folder.keys() if name.endswith(".weight_packed")}
        source: dict[str, tuple[str, str]] = {}  # GGUF name -> ("packed" | "float", Hugging Face name)
        for module in schemes:
            source[tensor_name(name_map, module + ".weight")] = ("packed", module)
        for name in folder.keys():
            if name.rpartition(".")[0] not in schemes and (gguf_name := tensor_name(name_map, name)):
                source[gguf_name] = ("float", name)
        unknown = set(source) - {tensor.name for tensor in reader.tensors} - {"output.weight"}  # a tied head has none
        if unknown:
            raise GgufError(f"llama.cpp's float GGUF has no tensor for {', '.join(sorted(unknown)[:3])}")
        writer = gguf.GGUFWriter(str(out_file), arch=reader.fields["general.architecture"].contents(), use_temp_file=False)
        _copy_metadata(gguf, reader, writer, _file_type(gguf, schemes))
        written = {}
        for tensor in reader.tensors:  # the header lists every tensor's type and size before any data
            kind, hf = source.get(tensor.name, ("copy", ""))
            if kind == "packed":
                (rows, columns), block = schemes[hf]
                shape, qtype = (rows, columns // BLOCK * BLOCK_BYTES[block]), gguf.GGMLQuantizationType[block]
                writer.add_tensor_info(tensor.name, shape, np.dtype(np.uint8), rows * shape[1], raw_dtype=qtype)
            else:
                qtype = tensor.tensor_type
                writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.n_bytes, raw_dtype=qtype)
            written[tensor.name] = qtype.name
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            kind, hf = source.get(tensor.name, ("copy", ""))
            writer.write_tensor_data(_tensor_data(gguf, folder, tensor, kind, hf))
        writer.close()
    return written


def _tensor_data(gguf, folder, tensor, kind: str, hf: str) -> np.ndarray:
    """One tensor of the output file as GGUFWriter writes it."""
    if kind == "packed":
        return pack_blocks(stored_linear(folder, hf))[1]
    if kind == "float":
        values = folder.tensor(hf).float().numpy().reshape(tensor.data.shape[:-1] + (-1,))
        if tensor.tensor_type.name not in FLOAT_TYPES:
            raise GgufError(f"{tensor.name} is {tensor.tensor_type.name} in the converter's file, not a float type")
        data = gguf.quants.quantize(values, tensor.tensor_type)
        return data.reshape(tensor.data.shape)
    return np.asarray(tensor.data)


def _scheme(folder, module: str) -> tuple[tuple[int, int], str]:
    """((out, in), GGUF block type) of one compressed-tensors Linear, read from its own tensors."""
    shape = tuple(int(size) for size in folder.tensor(f"{module}.weight_shape").tolist())
    bits = folder.shape_and_dtype(f"{module}.weight_packed")[0][1] * 32 // shape[1]
    block = block_type(bits, f"{module}.weight_zero_point" not in folder)
    if block is None:
        raise GgufError(f"{module}: {bits}-bit weights with zero points have no exact GGUF block")
    return shape, block


def _file_type(gguf, schemes: dict) -> int:
    """general.file_type: the block type most quantized layers use (llama.cpp shows it as the model's type)."""
    blocks = [block for _, block in schemes.values()]
    common = max(set(blocks), key=blocks.count) if blocks else "Q4_0"
    return int(getattr(gguf.LlamaFileType, f"MOSTLY_{common}"))


def _copy_metadata(gguf, reader, writer, file_type: int) -> None:
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = int(file_type) if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)


def write_modelfile(folder: Path, gguf_name: str, model_folder: Path, stop_ids: list[int]) -> Path:
    """Ollama's Modelfile: FROM the GGUF, the checkpoint's chat format as a Go template, its stop tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder, local_files_only=True)
    lines = [f"FROM ./{gguf_name}"]
    template = ollama_template(tokenizer) if tokenizer.chat_template else None
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    lines += [f'PARAMETER stop "{token}"' for token in dict.fromkeys(tokenizer.convert_ids_to_tokens(stop_ids))]
    path = folder / "Modelfile"
    path.write_text("\n".join(lines) + "\n")
    return path


MARK = "\x00M\x00"


def ollama_template(tokenizer) -> str | None:
    """The checkpoint's Jinja chat template as Ollama's Go template, found by rendering it around a marker:
    what each role puts before and after its content, what ends a conversation, what opens the reply.
    None when the template does not render single messages of each role (Ollama then reads the GGUF's)."""

    def render(roles: list[str], generation: bool = False) -> str:
        messages = [{"role": role, "content": MARK} for role in roles]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    try:
        prefix_user, after = render(["user"]).split(MARK)
        suffix_user = render(["user", "user"]).split(MARK)[1].removesuffix(prefix_user)
        tail = after.removeprefix(suffix_user)
        reply = render(["user"], generation=True).split(MARK)[1].removeprefix(suffix_user)
        parts = {}
        for role in ("system", "user", "assistant"):
            before, after = render([role]).split(MARK)
            parts[role] = (before, after.removesuffix(tail) if tail else after)
    except Exception:  # noqa: BLE001 - a template that refuses these conversations: leave it to Ollama
        return None
    cases = "".join(f'{{{{ {"if" if index == 0 else "else if"} eq .Role "{role}" }}}}{before}{{{{ .Content }}}}{after}'
                    for index, (role, (before, after)) in enumerate(parts.items()))
    return "{{- range .Messages }}" + cases + "{{ end }}{{ end }}" + reply
