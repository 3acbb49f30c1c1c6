"""The ``kangaroo`` command: one typed entry function per command, each in the layer that owns it.

``fit`` and ``validate`` are LightningCLI's (a stage file is their ``--config``). Every other
command is a function registered below through jsonargparse, so its flags and ``--help`` come from
its signature and docstring, and each takes ``--config FILE`` (its options as YAML) and
``--print_config``. The recipe runner calls the same functions.

Flags are spelled as the parameters are (``--max_new_tokens``); the dashed spelling
(``--max-new-tokens``), a bool flag given alone (``--overwrite``) and a repeated list flag
(``--allowed_root a --allowed_root b``) are read as jsonargparse's ``--overwrite=true`` and
``--allowed_root+ a``, so the command lines of earlier releases keep working.
"""

from __future__ import annotations

import importlib
import inspect
import json
import keyword
import os
import sys
import types
import typing
from typing import Any, Callable

from kangaroo import storage

FIT_COMMANDS = ("fit", "validate")

# name -> "module:function" (a command) or a group: {"_help": ..., name: ...}. Modules are
# imported only for the command asked for (and for the listing of `--help`).
COMMANDS: dict[str, Any] = {
    "fit": "kangaroo.cli:fit",
    "validate": "kangaroo.cli:validate",
    "model": {"_help": "inspect model architectures", "summary": "kangaroo.training.commands:model_summary"},
    "data": {
        "_help": "prepare training data",
        "prepare": "kangaroo.training.commands:prepare_stage_data",
        "merge": "kangaroo.data.prepare:merge",
        "stats": "kangaroo.training.commands:epoch_stats",
        "synth": "kangaroo.world.build:synth",
    },
    "curate": {
        "_help": "filter and caption the videos of a manifest (`kangaroo curate --manifest ...` is `curate filter`)",
        "filter": "kangaroo.curate.commands:filter_manifest",
        "caption": "kangaroo.curate.commands:caption",
        "merge": "kangaroo.curate.commands:merge",
    },
    "checkpoint": {"_help": "work with stage checkpoints", "consolidate": "kangaroo.training.commands:consolidate"},
    "export": "kangaroo.inference.commands:export",
    "import": "kangaroo.inference.commands:import_model",
    "chat": "kangaroo.inference.commands:chat",
    "serve": "kangaroo.inference.commands:serve",
    "demo": "kangaroo.inference.commands:demo",
    "eval": "kangaroo.evaluation.run:evaluate",
    "recipe": {"_help": "run or inspect a chain of stages", "run": "kangaroo.recipe.commands:run",
               "show": "kangaroo.recipe.commands:show"},
}
BOOL_WORDS = {"true", "false", "yes", "no", "on", "off"}  # the words jsonargparse reads as a bool


def fit() -> int:
    """Train one curriculum stage from its YAML (LightningCLI: `kangaroo fit --help` lists every option)."""
    raise AssertionError("`kangaroo fit` is LightningCLI's; main() hands it over before parsing")


def validate() -> int:
    """Evaluate a stage on its validation data (LightningCLI: `kangaroo validate --help`)."""
    raise AssertionError("`kangaroo validate` is LightningCLI's; main() hands it over before parsing")


def _resolve(target: str) -> Callable[..., int]:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _components(words: list[str]) -> tuple[dict[str, Any], Callable[..., int] | None, int]:
    """The table jsonargparse builds its parser from: only the chain of the command ``words``
    names (its module alone imported), or the whole level where they stop naming one. Also the
    command's function, when they name one, and how many leading words name it."""
    chain, level, position = [], COMMANDS, 0
    while position < len(words) and isinstance(level, dict) and words[position] in level:
        chain.append(words[position])
        level = level[words[position]]
        position += 1
    if isinstance(level, str):
        leaf = _resolve(level)
        table: Any = leaf
        for depth in range(len(chain) - 1, -1, -1):
            parent = COMMANDS
            for name in chain[:depth]:
                parent = parent[name]
            table = {**({"_help": parent["_help"]} if "_help" in parent else {}), chain[depth]: table}
        return table, leaf, len(chain)

    def load(entry: Any) -> Any:
        if isinstance(entry, str):
            return _resolve(entry)
        return {name: value if name == "_help" else load(value) for name, value in entry.items()}

    return load(COMMANDS), None, 0


def _spelled_for_jsonargparse(words: list[str], function: Callable[..., int]) -> list[str]:
    """Earlier releases' spellings of the flags of ``function``, in jsonargparse's: dashes in a
    flag's name become underscores, a bool flag alone means true, each occurrence of a list
    flag appends, and a flag named as a Python keyword is its parameter's (``--with`` is ``with_``)."""
    hints = typing.get_type_hints(function)
    kinds = {}
    for name in inspect.signature(function).parameters:
        hint = hints.get(name)
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        args = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
        if args[0] is bool:
            kinds[name] = "bool"
        elif typing.get_origin(args[0]) is list:
            kinds[name] = "list"
    spelled, position = [], 0
    while position < len(words):
        word = words[position]
        position += 1
        if word == "--":
            spelled += words[position - 1:]
            break
        if not word.startswith("--") or len(word) == 2:
            spelled.append(word)
            continue
        name, equals, value = word[2:].partition("=")
        name = name.replace("-", "_")
        if keyword.iskeyword(name) and f"{name}_" in kinds:  # `--with` is the parameter `with_`
            name = f"{name}_"
        following = words[position] if position < len(words) else None
        kind = kinds.get(name)
        if kind == "bool" and not equals and (following is None or following.lower() not in BOOL_WORDS):
            spelled.append(f"--{name}=true")
        elif kind == "list" and not (equals and value.startswith("[")) and not (
                not equals and following is not None and following.startswith("[")):
            spelled.append(f"--{name}+" + (f"={value}" if equals else ""))
        else:
            spelled.append(f"--{name}{equals}{value}")
    positional_lists = [name for name, parameter in inspect.signature(function).parameters.items()
                        if parameter.kind is parameter.POSITIONAL_OR_KEYWORD and kinds.get(name) == "list"]
    if positional_lists:  # jsonargparse reads a positional list as one YAML list: `a b` -> `["a", "b"]`
        values, kept, position = [], [], 0
        while position < len(spelled):
            word = spelled[position]
            if word == "--":  # what follows is positional, as given
                values += spelled[position + 1:]
                break
            if word in ("-h", "--help") or word.startswith("--print_config"):
                kept.append(word)
            elif word.startswith("--"):
                kept.append(word)
                if "=" not in word and position + 1 < len(spelled):
                    kept.append(spelled[position + 1])
                    position += 1
            else:
                values.append(word)
            position += 1
        if values and not (len(values) == 1 and values[0].startswith("[")):
            spelled = ["[" + ", ".join(json.dumps(value) for value in values) + "]", *kept]
    return spelled


def _check_settings_files(words: list[str], function: Callable[..., int]) -> None:
    """``--config`` names a command's own settings; a file of other keys given there (a stage file,
    curation filters, a captioning file: earlier releases' ``--config``) is refused naming the flag
    it belongs to, before jsonargparse reports its keys one by one."""
    import yaml

    parameters = set(inspect.signature(function).parameters)
    for position, word in enumerate(words):
        path = words[position + 1] if word == "--config" and position + 1 < len(words) else (
            word.split("=", 1)[1] if word.startswith("--config=") else None)
        if path is None or not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                settings = yaml.safe_load(handle)
        except (OSError, yaml.YAMLError):
            continue  # jsonargparse says what is wrong with it
        if isinstance(settings, dict) and not set(settings) <= parameters:
            raise ValueError(
                f"--config {path} holds {sorted(set(settings) - parameters)[:4]}, which are no options of this "
                "command: --config is a command's own settings (as --print_config writes them); a stage file is "
                "--stage, curation filters --filters, a captioning file --captions")


def _run_command(words: list[str]) -> int:
    from jsonargparse import auto_cli

    if len(words) > 1 and words[0] == "curate" and words[1].startswith("-") and words[1] not in ("-h", "--help"):
        words = ["curate", "filter", *words[1:]]  # `kangaroo curate --manifest ...`, as before `curate filter`
    components, function, depth = _components(words)
    if function is not None:
        _check_settings_files(words[depth:], function)
        words = words[:depth] + _spelled_for_jsonargparse(words[depth:], function)
    result = auto_cli(components, args=words, as_positional=True, prog="kangaroo",
                      description="Training recipes for Kangaroo video LMMs: `kangaroo COMMAND --help` for one command.")
    return 0 if result is None else int(result)


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    if words and words[0] in FIT_COMMANDS:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        from kangaroo.training.checkpoints import PREEMPTED_EXIT_CODE
        from kangaroo.training.fit import KangarooCLI

        from kangaroo.training.stage_file import fit_arguments

        try:
            fit_arguments(words)  # a stage file naming a base that is missing or not YAML: said plainly
        except ValueError as err:
            print(f"kangaroo: error: {err}", file=sys.stderr)
            return 2
        try:
            KangarooCLI(args=argv)  # None: the command line, read by KangarooCLI
        except SIGTERMException:  # the step finished and PreemptionCheckpoint saved
            return PREEMPTED_EXIT_CODE
        except Exception as err:
            outage = storage.unreachable_store(err)  # past the retry budget; earlier checkpoints are intact
            if outage is None:
                raise
            print(f"kangaroo: error: {outage}", file=sys.stderr)
            return 1
        from kangaroo.distributed import exit_after_success

        exit_after_success()  # several processes: ends here, without the interpreter's teardown
        return 0
    try:
        return _run_command(words)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"kangaroo: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a failed eval shard or stage, named in the message
        print(f"kangaroo: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
