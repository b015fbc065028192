"""A resumed run keeps its config: the run's recorded ``config.yaml`` against the one it resumes with,
field by field (:data:`RUN_PINNED`), unless a change is accepted by name."""
from __future__ import annotations

from pathlib import Path

from featinv.checkpoint.config_file import flatten, load_config, to_dict
from featinv.config import RUN_CONFIG, FeatInvConfig, SettingError

# What changes the meaning of a run's trained weights or of its optimiser state: a resumed run must keep
# these (checked against the run's config.yaml) unless a change is accepted by name. Others (max_steps,
# logging, checkpointing, precision, workers) may change between sessions.
RUN_PINNED = ("backbone", "model", "train.lr", "data.batch_size", "data.root")


_DERIVED = ("model.adapter.in_channels",)  # follows from the backbone, which is compared itself


def read_run_config(run_dir: str | Path) -> FeatInvConfig | None:
    """A run's recorded ``config.yaml``, None without one; ValueError naming it when it does not parse
    (it is then left as it is, never rewritten)."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        return load_config(str(path))
    except Exception as e:  # noqa: BLE001 -- YAML syntax, a non-mapping, unknown keys, wrong types
        text = " ".join(str(e).split()) or type(e).__name__
        raise SettingError(f"{{run_dir}}: the run's {path} does not parse ({type(e).__name__}: {text}); fix it, "
                           "or start a new {run_dir} (it is not rewritten)") from None


def _under(key: str, fields) -> bool:
    return any(key == f or key.startswith(f + ".") for f in fields)


def run_config_changes(recorded: FeatInvConfig, now: FeatInvConfig, accept=()) -> list[str]:
    """One phrase per pinned field (:data:`RUN_PINNED`) that differs between a run's recorded config and
    this session's, e.g. ``backbone.name: the run trained 'resnet18', now 'resnet34'``; fields under
    a name in ``accept`` (``train.lr``, or a section such as ``backbone``) are not reported."""
    old, new = flatten(to_dict(recorded)), flatten(to_dict(now))
    changes = []
    for key, value in new.items():
        if not _under(key, RUN_PINNED) or key in _DERIVED or _under(key, accept) or old.get(key) == value:
            continue
        if key == "data.root" and old.get(key) and value and Path(old[key]).resolve() == Path(value).resolve():
            continue  # the same folder, named from another working directory
        changes.append(f"{key}: the run trained {old.get(key)!r}, now {value!r}")
    return changes


def check_resumed_config(run_dir: str | Path, cfg: FeatInvConfig, accept=()) -> None:
    """ValueError naming every pinned field and its two values when ``cfg`` differs from the run's
    recorded config.yaml (see :func:`run_config_changes`); nothing without a config.yaml."""
    unknown = [a for a in accept if not any(_under(a, (f,)) or _under(f, (a,)) for f in RUN_PINNED)]
    if unknown:
        raise SettingError(f"{{accept_change}}: {unknown[0]!r} is not a field a resumed run checks "
                           f"({', '.join(RUN_PINNED)}, or a field under them)")
    recorded = read_run_config(run_dir)
    if recorded is None:
        return
    changes = run_config_changes(recorded, cfg, accept)
    if changes:
        fields = " ".join(f"{{accept_change}} {c.split(':')[0]}" for c in changes)
        raise SettingError(f"{{run_dir}}: resuming {run_dir} with another config: {'; '.join(changes)}; "
                           f"start a new {{run_dir}}, or pass {fields} to continue this run with the change")
