"""What every entry point in jobs/ and bench/ shares: ``--config`` plus ``key.sub=value`` overrides,
validated with the data they name before Ray starts; a bad config or data line exits with status 2 and the
field or file:line named."""

from __future__ import annotations

import argparse
import inspect
import io
import re
import sys
import tokenize
from collections.abc import Iterator
from contextlib import contextmanager
from typing import get_args

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from .config import Config, ConfigError, load_config
from .preflight import check_rerun, shared_teacher_path


def at_least_one(text: str) -> int:
    """An argparse type: a positive integer (``--seeds``, ``--parallel``), else exit 2 naming the flag."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"at least 1, got {text!r}")
    return value


def add_parallel(parser: argparse.ArgumentParser) -> None:
    """``--parallel`` of the drivers that train several students from one teacher (``run_sharing_teacher``)."""
    parser.add_argument("--parallel", type=at_least_one, default=1,
                        help="students trained at once once the teacher and store exist (each stage must fit the "
                             "cluster beside the others: student.train.num_workers, cluster.gpus_per_worker)")


def parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="config keys (set in the YAML preset or as key.sub=value):\n"
                                            + "\n".join(config_reference()))
    parser.add_argument("--config", required=True, help="YAML preset, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--restart-from", choices=("teacher", "student"),
                        help="train this stage and every later one again, although finished on disk")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config and the data, print what the run would do, and exit")
    return parser


def inspected(args, config: Config) -> bool:
    """``--print-config`` or ``--dry-run``: print the resolved config or the plan (nothing written, no Ray)."""
    # this module's imports of the package happen where used: --help and config validation start in a second
    from .storage import redact  # neither prints a credential of the URIs it names
    if args.print_config:
        print(redact(config.to_yaml()), end="")
    if args.dry_run:
        from .preflight import load_data, plan
        print(redact(plan(config, load_data(config))))
    return args.print_config or args.dry_run


def start(args, configs: list[Config]) -> None:
    """Before the runs of an entry point: ``--restart-from`` marks each one's stages from that one on to train
    again, then Ray is joined (or a local cluster started) for the first."""
    from .cluster import connect
    from .recipe import restart_from
    if args.restart_from:
        for config in configs:
            restart_from(config, args.restart_from)
    connect(configs[0])


@contextmanager
def user_errors() -> Iterator[None]:
    """One line for an error found once the run is under way: exit 2 for a finished stage under this name that
    was trained on other inputs (see ``--restart-from``), 1 for a stage whose workers found no room on the
    cluster within ``cluster.wait_minutes``, a tracking store that failed as the run started or a checkpoint
    storage lost mid-stage."""
    from .cluster import ResourcesUnavailable
    from .driver import StorageLost
    from .fingerprint import StageChanged
    from .tracking import TrackingUnavailable
    try:
        yield
    except StageChanged as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except (ResourcesUnavailable, StorageLost, TrackingUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


def config_or_exit(path: str, overrides: list[str], check=None, teacher_path: str | None = None) -> Config:
    """The validated config (``check(config)`` may raise ConfigError too) whose data passed the preflight, or
    exit 2 with the message; nothing is written and no cluster is started before.
    ``teacher_path``: the teacher another run will give this one (see ``check_rerun``)."""
    from .preflight import preflight
    try:
        config = load_config(path, overrides)
        if check:
            check(config)
        check_rerun(config, teacher_path)
        preflight(config)
        return config
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def configs_sharing_teacher(path: str, overrides: dict) -> dict:
    """One validated config per key of ``overrides`` (key → its override list), to run with
    ``recipe.run_sharing_teacher``: every later one is checked against the first one's teacher."""
    (first_key, first_overrides), *later = overrides.items()
    first = config_or_exit(path, first_overrides)
    teacher = shared_teacher_path(first)
    return {first_key: first, **{key: config_or_exit(path, values, teacher_path=teacher) for key, values in later}}


def field_notes(section: type[BaseModel]) -> dict[str, str]:
    """Each field's description, else its comment in ``config.py`` (on its line, or the lines just above it)."""
    source = inspect.getsource(section)
    comments = {token.start[0]: token.string.lstrip("#").strip()  # real comments: a '#' in a string is none
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    notes, above = {}, []
    for number, line in enumerate(source.splitlines()[1:], 2):
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(comments.get(number, ""))
            continue
        match = re.match(r"^(\w+):", stripped)
        if match and match[1] in section.model_fields:
            notes[match[1]] = " ".join([*above, comments.get(number, "")]).strip()
        above = []
    return notes | {name: field.description for name, field in section.model_fields.items() if field.description}


def type_name(annotation: object) -> str:
    """A field's type as the config reference writes it: ``int``, ``str | None``, ``Literal['a', 'b']``."""
    kind = re.sub(r"typing\.|Annotated\[(\w+), Strict\(strict=True\)(?:, AllowInfNan\(allow_inf_nan=False\))?\]",
                  r"\1", str(annotation))
    kind = re.sub(r"<class '(?:\w+\.)*(\w+)'>|(?:\w+\.)+(\w+)", r"\1\2", kind)
    return re.sub(r"Optional\[(.*)\]$", r"\1 | None", kind)


def default_text(field: FieldInfo) -> str:
    """A field's default as the config reference writes it (``required`` where it has none)."""
    if field.is_required():
        return "required"
    return "none" if field.default is None else str(field.default)


def config_sections(section: type[BaseModel] | None = None,
                    prefix: str = "") -> Iterator[tuple[str, type[BaseModel], str, FieldInfo]]:
    """Every config key, depth first: (its section's prefix, the section, the field's name, the field). A nested
    section (``teacher.train``) is not a key itself; an optional one (``data.fields``) is, and its keys follow it."""
    section = section or Config
    for name, field in section.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from config_sections(annotation, f"{prefix}{name}.")
            continue
        yield prefix, section, name, field
        for section_type in get_args(annotation):  # an optional section (unset by default): set one to use it
            if isinstance(section_type, type) and issubclass(section_type, BaseModel):
                yield from config_sections(section_type, f"{prefix}{name}.")


def config_reference(section: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every config key with its type, default and note, for ``--help``."""
    lines, notes = [], {}
    for key_prefix, owner, name, field in config_sections(section, prefix):
        note = notes.setdefault(owner, field_notes(owner)).get(name)
        lines.append(f"  {key_prefix}{name} ({type_name(field.annotation)}, default {default_text(field)})"
                     + (f": {note}" if note else ""))
    return lines
