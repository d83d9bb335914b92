"""
What every script shares: BeagleError, the CLI derived from a script's config dataclass, --device / --dtype,
and output paths (checked before the work, written atomically).

    cfg = cli(DecodeConfig)                            # python decode.py --max-new-tokens 64 --temperature=0.7
    device, dtype = device_and_dtype(cfg.device, cfg.dtype)  # auto: cuda when there is one, bf16 there, else fp32
    check_output(cfg.out, "--out")                     # a wrong kind of path: one line before the work
    write_atomic(path, lambda tmp: tmp.write_text(text))  # never half a file at path
    convs = read_prompt_file("prompts.jsonl")         # [(user turns, category)], bad lines named one by one
"""
import argparse
import ast
import dataclasses
import inspect
import io
import json
import os
import shutil
import sys
import textwrap
import tokenize
import typing
from contextlib import contextmanager
from pathlib import Path

import torch


class BeagleError(Exception):
    """A user-facing problem (bad checkpoint, wrong target, prompt too long...): scripts print it as one line."""


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BeagleError(f"{path} not found") from None
    except (OSError, ValueError) as e:
        raise BeagleError(f"{path} is not readable JSON ({e})") from None


# -----------------------------------------------------------------------------
# the CLI of every script, derived from its config dataclass; device and dtype; atomic writes

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        hint = " (a value that starts with '-': --key=value)" if "expected one argument" in message else ""
        sys.exit(f"error: {message}{hint}")


def field_comments(cls):
    """{field name: its comment}: the `# ...` at the end of the field's line, else the comment lines right above it."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source file (a class made in a REPL): no help texts
        return {}
    notes = {t.start[0]: t.string.lstrip("#").strip()
             for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    lines, comments = source.splitlines(), {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = [notes[i] for i in range(node.lineno, node.end_lineno + 1) if i in notes]
            i = node.lineno - 1
            while not text and i in notes and lines[i - 1].lstrip().startswith("#"):
                i -= 1
            comments[node.target.id] = " ".join(text or [notes[j] for j in range(i + 1, node.lineno)])
    return comments


KINDS = {bool: ("true|false", "true or false"), int: ("INT", "an integer"), float: ("FLOAT", "a number"),
         str: ("STR", "a string")}  # metavar in --help, what an error says was expected


def _coerce(value, option, kind, optional):
    if optional and value.lower() == "none":
        return None
    if kind is bool and value.lower() in ("1", "0", "true", "false", "yes", "no"):
        return value.lower() in ("1", "true", "yes")
    try:
        if kind is not bool:
            return kind(value)
    except ValueError:
        pass
    sys.exit(f"error: {option} expects {KINDS[kind][1]}{' or none' if optional else ''}, got {value!r}")


def cli(config_cls, argv=None):
    """--key value or --key=value for each field of the dataclass (--max-new-tokens sets max_new_tokens), coerced to
    the field's type: bool (a bare --flag is true), int, float, str, and `X | None` (none: None). --help lists the
    options with their comments and defaults. A mistake is a one-line error."""
    hints, comments = typing.get_type_hints(config_cls), field_comments(config_cls)
    parser = _Parser(description=(sys.modules["__main__"].__doc__ or "").strip(), allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = {}
    for f in dataclasses.fields(config_cls):
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
        kind, optional = args[0], type(None) in typing.get_args(hints[f.name])
        if len(args) > 1 or kind not in KINDS:
            raise TypeError(f"{config_cls.__name__}.{f.name}: the CLI takes bool, int, float, str or X | None")
        option = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "none" if default is None else str(default).lower() if kind is bool else repr(default)
        note = (comments.get(f.name, "") + f" (default {shown}{'; none allowed' if optional else ''})").strip()
        parser.add_argument(option, dest=f.name, default=argparse.SUPPRESS, help=note.replace("%", "%%"),
                            metavar=KINDS[kind][0] + ("|none" if optional else ""),
                            nargs="?" if kind is bool else None, const="true" if kind is bool else None)
        kinds[f.name] = option, kind, optional
    given, unknown = parser.parse_known_args(argv)
    if unknown:
        what = "unknown option" if unknown[0].startswith("-") else "unexpected argument"
        sys.exit(f"error: {what} {unknown[0].split('=')[0]!r} (--help lists the options)")
    return config_cls(**{k: _coerce(v, *kinds[k]) for k, v in vars(given).items()})


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def check_at_least(cfg, lows):
    """Integer options' lower bounds, {field: low, or (low, what the lowest values mean)}: one line naming the
    option and what it allows, before any work."""
    for name, low in lows.items():
        low, note = low if isinstance(low, tuple) else (low, "")
        if getattr(cfg, name) < low:
            raise BeagleError(f"--{name.replace('_', '-')} must be >= {low}{note}, got {getattr(cfg, name)}")


def device_and_dtype(device="auto", dtype="auto"):
    """The scripts' --device / --dtype: auto = cuda when there is one; bf16 on a GPU, fp32 on the CPU. The devices
    are the ones the code is written for (auto, cpu, cuda, cuda:N), checked here: torch's own error for a wrong one
    is a traceback that lists twenty device types."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise BeagleError(f"--device must be auto, cpu, cuda or cuda:N (got {device!r})")
    if kind == "cuda" and not torch.cuda.is_available():
        raise BeagleError(f"--device {device}: CUDA is not available here")
    if index and int(index) >= torch.cuda.device_count():
        raise BeagleError(f"--device {device}: there are {torch.cuda.device_count()} GPUs (cuda:0 ..)")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise BeagleError(f"--dtype must be auto or one of {', '.join(DTYPES)} (got {dtype!r})")
    return device, DTYPES[dtype]


@contextmanager
def ranks(device, backend=None):
    """-> (rank, world, device) of this process. Under torchrun (WORLD_SIZE > 1): the process group (nccl on cuda,
    gloo on the cpu, unless `backend` says) and on cuda this rank's GPU, cuda:LOCAL_RANK. On a normal exit the ranks
    meet at a barrier before the group is destroyed, so none tears its connections down while another still uses
    them (rank 0 saves and writes last; a 2-rank gloo test once died of SIGABRT at its end, likely this)."""
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    if world == 1:
        yield 0, 1, device
        return
    torch.distributed.init_process_group(backend or ("nccl" if device.startswith("cuda") else "gloo"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    try:
        yield rank, world, device
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def check_output(path, option, directory=False):
    """Before any work: `path` (given as `option`) can be written as a file (or, with directory, a directory), so a
    wrong kind of path is one line at the start, not a traceback after the work."""
    if not str(path).strip():  # (Path("") is ".": the current directory)
        raise BeagleError(f"{option} is empty; give {'a directory' if directory else 'a file name'}")
    path = Path(path)
    if path.exists() and path.is_dir() != directory:
        raise BeagleError(f"{option} {path} is {'a file' if directory else 'a directory'}; "
                          f"give {'a directory' if directory else 'a file name'}")
    parent = next((p for p in path.parents if p.exists()), Path("."))  # the nearest part of the path that exists
    if not parent.is_dir():
        raise BeagleError(f"{option} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK):
        raise BeagleError(f"{option} {path}: {parent} is not writable")
    return path


def remove_stale_temps(path):
    """Remove the temp files (or directories) of write_atomic(path) whose process has died (path's name "*": of every
    path in that directory): a process killed by SIGKILL never runs its cleanup, and a half-converted model is
    hundreds of MB. A temp file of a live process (another one writing right now) stays."""
    for tmp in Path(path).parent.glob(f".{Path(path).name}.*.tmp"):
        pid = tmp.name.removesuffix(".tmp").rsplit(".", 1)[-1]  # write_atomic's names: .{name}.{pid}.tmp
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0 sends nothing: it only asks whether the process exists
        except ProcessLookupError:  # no such process: nobody will finish or remove this temp file
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        except PermissionError:  # it exists, under another user
            pass


def write_atomic(path, write):
    """write(tmp) writes a file (or a directory) at tmp, beside path, which then replaces path in one rename: a crash
    or an error never leaves half a file at path, and the temp file is removed on failure (and, if a killed process
    left one, on the next write of the same path)."""
    path = Path(path)
    remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise
    return path


# -----------------------------------------------------------------------------
# prompt files (decode.py --prompt-file, --bench)

def is_text(s):
    """A non-blank string that is valid Unicode: no lone surrogates, which is how Python passes on command-line bytes
    that are not UTF-8 (and how JSON can spell them), and which the tokenizer cannot encode."""
    try:
        return isinstance(s, str) and bool(s.strip()) and bool(s.encode("utf-8"))
    except UnicodeEncodeError:
        return False


def short(x, n=40):  # a value as an error message quotes it
    r = repr(x)
    return r if len(r) <= n else r[:n] + "..."


def read_prompt_file(path):
    """A prompt file -> [(turns, category)]: JSONL ({"prompt": str} or {"turns": [str, ...]}, maybe a "category",
    per line) when its first non-blank line opens a JSON object, else plain text, one prompt per line. Blank lines
    are skipped; anything else that is not a prompt is an error naming the file and the line (numbered as in an
    editor, blank lines counted)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise BeagleError(f"cannot read prompts: {e}") from None
    try:
        text = raw.decode("utf-8-sig")  # (-sig: a byte-order mark, as some editors write, is not part of a prompt)
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise BeagleError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}); save the file as UTF-8") from None
    # split at "\n" only: splitlines() would also cut at U+2028 or \x85 inside a prompt
    lines = [(i, line.strip()) for i, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not lines:
        raise BeagleError(f"{path}: no prompts (the file is {'empty' if not text else 'blank lines only'})")
    if not lines[0][1].startswith("{"):
        return [([line], "prompt") for _, line in lines]  # plain text: one prompt per line
    convs = []
    for i, line in lines:
        where = f"{path}:{i}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise BeagleError(f"{where}: not JSON ({e.msg}); the first line is a JSON object, so every line must "
                              "be one") from None
        if not isinstance(row, dict) or ("prompt" in row) == ("turns" in row):
            raise BeagleError(f'{where}: expected a JSON object with "prompt" (a string) or "turns" (a list of '
                              f'strings), got {short(row)}')
        turns = [row["prompt"]] if "prompt" in row else row["turns"]
        if "prompt" in row and not is_text(row["prompt"]):
            raise BeagleError(f'{where}: "prompt" must be a non-blank string, got {short(row["prompt"])}')
        if not isinstance(turns, list) or not turns:
            raise BeagleError(f'{where}: "turns" must be a non-empty list of strings, got {short(turns)}')
        bad = next((j for j, turn in enumerate(turns, 1) if not is_text(turn)), None)
        if bad is not None:
            raise BeagleError(f'{where}: turn {bad} must be a non-blank string, got {short(turns[bad - 1])}')
        if not isinstance(row.get("category", ""), str):
            raise BeagleError(f'{where}: "category" must be a string, got {short(row["category"])}')
        convs.append((turns, row.get("category", "prompt")))
    return convs
