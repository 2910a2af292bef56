"""The model constructors a file may name without the user's say-so, as data.

A checkpoint records how its ANN is built ('package.module:function' and JSON keyword arguments). That
record is the file's words, not the user's: it may name only the constructors listed here, each matched as a
whole string before anything is imported, resolved through its library's own model registry (never by
walking attributes, which reaches every module the library imports: `timm.models._builder:os.system`), and
checked to be defined where that library defines its constructors. Its arguments are plain JSON values that
the constructor's table accepts; nothing that fetches or reads files."""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from snnconv.errors import ConversionError

ALLOW_HINT = (
    "pass the model yourself (CLI: --model pkg.module:factory; API: model=), or --trust-source "
    "(API: trust_source=True) if you trust the file's origin"
)

Check = Callable[[object], bool]


def count(v) -> bool:
    return type(v) is int and 0 <= v <= 1 << 20


def rate(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v) and 0 <= v <= 1


def flag(v) -> bool:
    return type(v) is bool


def off(v) -> bool:
    """pretrained / weights: only the values that fetch nothing (the checkpoint carries the weights)."""
    return v is None or v is False


def size(v) -> bool:
    sides = v if type(v) is list and len(v) == 2 else [v]
    return all(type(s) is int and 1 <= s <= 1 << 14 for s in sides)


def one_of(names: Callable[[], object]) -> Check:
    """A string from a set the library itself lists (asked only once the spec has passed)."""
    return lambda v: type(v) is str and v in names()


def _timm_names():
    import timm

    return set(timm.list_models())


def _torchvision_names():
    import torchvision.models

    return set(torchvision.models.list_models())


EFFICIENTNET_NAMES = {*(f"efficientnet-b{i}" for i in range(9)), "efficientnet-l2"}
EFFICIENTNET_NAMES |= {f"efficientnet-lite{i}" for i in range(5)}

TIMM_KWARGS = {
    "pretrained": off,
    "num_classes": count,
    "in_chans": count,
    "drop_rate": rate,
    "drop_path_rate": rate,
    "img_size": size,
    "global_pool": one_of(lambda: {"", "avg", "max", "avgmax", "catavgmax", "token", "map", "fast"}),
}
TORCHVISION_KWARGS = {
    "weights": off,
    "weights_backbone": off,
    "progress": flag,
    "num_classes": count,
    "dropout": rate,
    "aux_logits": flag,
    "init_weights": flag,
    "transform_input": flag,
}


@dataclass(frozen=True)
class Constructor:
    """One family of constructors: the spellings a file may use (a regex on the whole spec, with a `name`
    group where the library's registry names the model), how that registry resolves the spelling, the module
    its callables are defined in, and the keyword arguments it accepts (name -> check)."""

    spec: re.Pattern
    resolve: Callable[[str | None], Callable | None]
    defined_in: str
    kwargs: dict[str, Check]

    def callable_for(self, match: re.Match) -> Callable | None:
        fn = self.resolve(match.groupdict().get("name"))
        name = match.groupdict().get("name") or match["attr"]
        module = getattr(fn, "__module__", None) or ""
        module_ok = module == self.defined_in or module.startswith(self.defined_in + ".")
        # a plain function, or a class method bound to its own class (EfficientNet.from_name)
        bound_ok = not inspect.ismethod(fn) or (
            isinstance(fn.__self__, type) and fn.__qualname__ == f"{fn.__self__.__qualname__}.{fn.__name__}"
        )
        return fn if module_ok and bound_ok and getattr(fn, "__qualname__", None) == name else None


def _timm_entrypoint(name):
    import timm.models

    return timm.models.model_entrypoint(name) if timm.models.is_model(name) else None


def _torchvision_builder(name):
    import torchvision.models

    return torchvision.models.get_model_builder(name) if name in torchvision.models.list_models() else None


def _torchvision_get_model(_):
    import torchvision.models

    return torchvision.models.get_model


def _timm_create_model(_):
    import timm

    return timm.create_model


def _efficientnet_from_name(_):
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name


CONSTRUCTORS = (
    Constructor(
        re.compile(r"timm(\.models)?:(?P<attr>create_model)"),
        _timm_create_model,
        "timm.models",
        {"model_name": one_of(_timm_names), **TIMM_KWARGS},
    ),
    Constructor(
        re.compile(r"timm\.models:(?P<attr>(?P<name>[a-z][a-z0-9_]*))"), _timm_entrypoint, "timm.models", TIMM_KWARGS
    ),
    Constructor(
        re.compile(r"torchvision\.models:(?P<attr>get_model)"),
        _torchvision_get_model,
        "torchvision.models",
        {"name": one_of(_torchvision_names), **TORCHVISION_KWARGS},
    ),
    Constructor(
        re.compile(r"torchvision\.models(\.[a-z][a-z0-9_]*)*:(?P<attr>(?P<name>[a-z][a-z0-9_]*))"),
        _torchvision_builder,
        "torchvision.models",
        TORCHVISION_KWARGS,
    ),
    Constructor(
        re.compile(r"efficientnet_lite_pytorch(\.model)?:(?P<attr>EfficientNet\.from_name)"),
        _efficientnet_from_name,
        "efficientnet_lite_pytorch.model",
        {
            "model_name": one_of(lambda: EFFICIENTNET_NAMES),
            "in_channels": count,
            "num_classes": count,
            "image_size": size,
            "dropout_rate": rate,
            "drop_connect_rate": rate,
        },
    ),
)


def listed(spec) -> tuple[Constructor, re.Match] | None:
    """The listed constructor family a spec spells, from the string alone (nothing imported)."""
    for c in CONSTRUCTORS:
        match = c.spec.fullmatch(spec) if isinstance(spec, str) else None
        if match:
            return c, match
    return None


def check_kwargs(spec: str, kwargs, what: str, table: dict[str, Check] | None) -> dict:
    """Keyword arguments read from a file: a JSON object whose every entry `table` accepts. Without a table (the
    user's own factory, named by the user) only numbers, booleans and null pass: a string could name a file."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise ConversionError(f"{what}: source.kwargs must be a JSON object, got {type(kwargs).__name__}")
    for k, v in kwargs.items():
        if table is None:
            ok, accepted = v is None or type(v) in (bool, int, float), "numbers, booleans and null only"
        else:
            ok, accepted = k in table and table[k](v), f"{spec} takes from a file only {', '.join(sorted(table))}"
        if not ok:
            raise ConversionError(
                f"{what}: refusing factory argument {k}={v!r} named by the file ({accepted}); pass the arguments "
                "yourself (CLI: --kwargs), or --trust-source (API: trust_source=True) if you trust the file's origin"
            )
    return kwargs


def file_kwargs(spec: str, kwargs, what: str) -> dict:
    """Arguments a file recorded for a factory the user named: by its table where the factory is listed, else
    only numbers, booleans and null (check_kwargs)."""
    found = listed(spec)
    return check_kwargs(spec, kwargs, what, found[0].kwargs if found else None)


def build(spec, kwargs, what: str):
    """The ANN a file's source record names, if it names a listed constructor with accepted arguments; otherwise
    one ConversionError naming the file, before anything the record names is imported."""
    found = listed(spec)
    if found is None:
        raise ConversionError(
            f"{what}: refusing to import and call {spec!r} named by the file (not a listed model constructor: "
            f"timm.create_model, timm and torchvision model builders, EfficientNet.from_name); {ALLOW_HINT}"
        )
    constructor, match = found
    kwargs = check_kwargs(spec, kwargs, what, constructor.kwargs)
    try:
        fn = constructor.callable_for(match)
    except ImportError as exc:
        raise ConversionError(f"{what}: the model library of {spec!r} is not installed ({exc})") from exc
    if fn is None:
        raise ConversionError(f"{what}: {spec!r} is not a model its library lists; {ALLOW_HINT}")
    from snnconv.io import call_factory

    return call_factory(fn, spec, kwargs)
