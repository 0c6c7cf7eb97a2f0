"""Policy and Stage: which reducer runs at which site.

Built in Python, from a dict, from YAML / JSON files, or from a one-line spec:

    vision.out=vtc_cls(keep=64); llm.layer.2=fastv(ratio=0.5)

Grammar: stages separated by `;`; each stage `SITE=METHOD(key=value, ...)` (parentheses
optional without arguments). SITE may end in `*` (every index of that family), a range `a:b`
(Python slice, negatives count from the end) or a negative index. Values are Python literals,
parsed with `ast.literal_eval`, never evaluated.
"""
from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PolicyError, SiteError, choices
from .registry import reducer_class
from .reducers.base import Reducer, SiteInfo

_SITE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(\.(\*|-?\d+|(-?\d+)?:(-?\d+)?))?$")


def make_reducer(method: str, params: dict | None = None) -> Reducer:
    """Build a registered reducer by name; unknown parameters name the valid ones."""
    cls = reducer_class(method)
    params = dict(params or {})
    valid = cls.param_names()
    unknown = [k for k in params if k not in valid]
    if unknown:
        raise PolicyError(f"{method}: unknown parameter(s) {choices(unknown)}; valid parameters: {choices(valid)}")
    try:
        return cls(**params)
    except PolicyError:
        raise
    except (TypeError, ValueError) as exc:
        raise PolicyError(f"{method}: {exc}") from exc


def format_value(v) -> str:
    """A Python literal that parse_call reads back as `v` (ast.literal_eval has no `inf`: 1e999)"""
    if isinstance(v, float):
        if math.isnan(v):
            raise PolicyError("nan cannot be written in a policy spec (use to_dict / to_yaml)")
        return repr(v) if math.isfinite(v) else ("1e999" if v > 0 else "-1e999")
    if isinstance(v, (list, tuple)):
        inner = ", ".join(format_value(x) for x in v)
        return f"({inner},)" if isinstance(v, tuple) and len(v) == 1 else (f"({inner})" if isinstance(v, tuple) else f"[{inner}]")
    if isinstance(v, dict):
        return "{" + ", ".join(f"{format_value(k)}: {format_value(x)}" for k, x in v.items()) + "}"
    _check_literal(v)
    return repr(v)


def _check_literal(v) -> None:
    """A value a saved policy can hold: None, a bool, number or string (lists, tuples and dicts
    of them are checked item by item by the callers)."""
    if v is not None and not isinstance(v, (bool, int, float, str)):
        raise PolicyError(f"a policy holding {type(v).__name__} {v!r} cannot be written as a spec, JSON or "
                          "YAML; use a value a policy file can hold (e.g. a registered scorer's name)")


def format_call(method: str, params: dict) -> str:
    if not params:
        return method
    return f"{method}(" + ", ".join(f"{k}={format_value(v)}" for k, v in params.items()) + ")"


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml_exponents(v):
    """Numbers such as 5e-1 as floats: YAML 1.1 (PyYAML) reads an exponent without a dot in the
    mantissa, or without a sign, as a string"""
    if isinstance(v, dict):
        return {k: _yaml_exponents(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_yaml_exponents(x) for x in v]
    return float(v) if isinstance(v, str) and _EXPONENT.fullmatch(v.strip()) else v


def _plain(v):
    """Tuples -> lists for JSON / YAML (reducers normalise them back)."""
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    _check_literal(v)
    return v


@dataclass
class Stage:
    """One reducer at one site (the site may be a pattern such as `vision.block.*`)."""

    site: str
    reducer: Reducer

    def __post_init__(self):
        if not isinstance(self.site, str) or not _SITE_RE.match(self.site.strip()):
            raise PolicyError(f"malformed site {self.site!r}; a site looks like 'vision.out', 'llm.layer.2', "
                              "'vision.block.*' or 'vision.block.4:8'")
        self.site = self.site.strip()
        if isinstance(self.reducer, str):
            self.reducer = parse_call(self.reducer)
        if not isinstance(self.reducer, Reducer):
            raise PolicyError(f"stage at {self.site!r}: reducer must be a Reducer, got {type(self.reducer).__name__}")

    def to_dict(self) -> dict:
        return {"site": self.site, "method": self.reducer.name,
                "params": {k: _plain(v) for k, v in self.reducer.params().items()}}

    @classmethod
    def from_dict(cls, d) -> "Stage":
        if isinstance(d, str):
            return _one(parse_spec(d))
        if not isinstance(d, dict):
            raise PolicyError(f"a stage must be a dict or a spec string, got {type(d).__name__}")
        d = dict(d)
        site = d.pop("site", None)
        method = d.pop("method", None)
        if site is None or method is None:
            raise PolicyError(f"a stage dict needs 'site' and 'method' keys (got {choices(sorted(d))})")
        params = d.pop("params", None) or {}
        if not isinstance(params, dict):
            raise PolicyError(f"stage {site}={method}: 'params' must be a mapping of parameter names to values, "
                              f"got {type(params).__name__}")
        params = dict(params)  # a copy: the caller's dict stays as given
        both = sorted(set(params) & set(d))
        if both:
            raise PolicyError(f"stage {site}={method}: {choices(both)} given both in 'params' and beside them")
        params.update(d)  # parameters may also sit beside site/method
        return cls(site, make_reducer(method, params))

    def spec(self) -> str:
        return f"{self.site}={self.reducer.spec()}"


def _one(p):
    if len(p.stages) != 1:
        raise PolicyError(f"expected exactly one stage, got {len(p.stages)}")
    return p.stages[0]


@dataclass
class Policy:
    """An ordered list of stages. Stages at the same site run in list order."""

    stages: list = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.stages, (str, dict, Path, Stage, Policy)) or self.stages is None:
            # Policy("vision.out=random(keep=64)") / Policy({"stages": [...]}) read as coerce does,
            # not character by character (or key by key) as stages
            self.stages = Policy.coerce(self.stages).stages
            return
        self.stages = [s if isinstance(s, Stage) else Stage.from_dict(s) for s in self.stages]

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def coerce(cls, obj) -> "Policy":
        """A Policy from a Policy, Stage, list of stages, dict, spec string or YAML/JSON path."""
        if isinstance(obj, Policy):
            return obj
        if obj is None:
            return cls([])
        if isinstance(obj, Stage):
            return cls([obj])
        if isinstance(obj, (list, tuple)):
            return cls(list(obj))
        if isinstance(obj, dict):
            return cls.from_dict(obj)
        if isinstance(obj, Path):
            return cls.from_file(obj)
        if isinstance(obj, str):
            s = obj.strip()
            if not s:
                return cls([])
            if s.lower().endswith((".yaml", ".yml", ".json")) or (("=" not in s) and Path(s).is_file()):
                return cls.from_file(s)
            return parse_spec(s)
        raise PolicyError(f"cannot build a policy from {type(obj).__name__}; give a Policy, a dict, "
                          "a spec string or a path to a YAML/JSON file")

    @classmethod
    def from_dict(cls, d) -> "Policy":
        if isinstance(d, list):
            return cls(d)
        if not isinstance(d, dict) or "stages" not in d:
            raise PolicyError("a policy dict looks like {'stages': [{'site': ..., 'method': ..., 'params': {...}}]}")
        extra = set(d) - {"stages"}
        if extra:
            raise PolicyError(f"unknown policy key(s) {choices(sorted(extra))}; valid keys: stages")
        if d["stages"] is not None and not isinstance(d["stages"], (list, tuple)):
            raise PolicyError(f"'stages' must be a list of stages (dicts or spec strings), got "
                              f"{type(d['stages']).__name__}")
        return cls(list(d["stages"] or []))

    @classmethod
    def from_spec(cls, spec: str) -> "Policy":
        return parse_spec(spec)

    @classmethod
    def from_file(cls, path) -> "Policy":
        path = Path(path)
        if not path.exists():
            raise PolicyError(f"policy file {str(path)!r} not found")
        if not path.is_file():
            raise PolicyError(f"policy file {str(path)!r} is a directory, not a YAML/JSON file")
        text = path.read_text()
        if not text.strip():
            raise PolicyError(f"policy file {str(path)!r} is empty; write stages as {{'stages': [...]}} or one spec line")
        import yaml
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise PolicyError(f"policy file {str(path)!r} does not parse: {exc}") from None
        if isinstance(data, str):
            return parse_spec(data)
        if path.suffix.lower() != ".json":
            data = _yaml_exponents(data)
        return cls.from_dict(data)

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"stages": [s.to_dict() for s in self.stages]}

    def to_spec(self, strict: bool = True) -> str:
        """The policy as one spec line. A parameter no spec can hold (e.g. a scorer passed as a
        Python function) raises PolicyError; strict=False writes it as its repr instead (for
        messages: that line does not parse back)."""
        parts = []
        for st in self.stages:
            try:
                parts.append(st.spec())
            except PolicyError:
                if strict:
                    raise
                params = ", ".join(f"{k}={v!r}" for k, v in st.reducer.params().items())
                parts.append(f"{st.site}={st.reducer.name}({params})")
        return "; ".join(parts)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        import yaml
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path) -> None:
        path = Path(path)
        path.write_text(self.to_json() if path.suffix.lower() == ".json" else self.to_yaml())

    def __str__(self) -> str:
        return self.to_spec(strict=False)

    def __len__(self) -> int:
        return len(self.stages)

    # -- resolution against an adapter's sites -----------------------------------------------
    def resolve(self, sites: dict) -> list:
        """[(concrete site name, reducer)] in policy order; patterns expanded."""
        out = []
        for st in self.stages:
            for name in expand_site(st.site, sites):
                out.append((name, st.reducer))
        return out


# -- spec parsing ---------------------------------------------------------------------------------
def _split_top(s: str, sep: str) -> list:
    parts, depth, quote, cur, escaped = [], 0, None, [], False
    for ch in s:
        if quote:
            cur.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":  # a backslash escapes the next character inside a string literal
                escaped = True
            elif ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if quote or depth != 0:
        raise PolicyError(f"unbalanced brackets or quotes in {s!r}")
    parts.append("".join(cur))
    return parts


def parse_call(text: str) -> Reducer:
    """`method(key=value, ...)` -> a reducer."""
    text = text.strip()
    m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(\((.*)\))?$", text, re.S)
    if not m:
        raise PolicyError(f"malformed method call {text!r}; expected METHOD or METHOD(key=value, ...)")
    method, args = m.group(1), m.group(3)
    params = {}
    if args and args.strip():
        try:
            call = ast.parse(f"_({args})", mode="eval").body
        except SyntaxError as exc:
            hint = ""
            if re.search(r"\)[\s,]*[A-Za-z_][\w.*:-]*\s*=", text):  # "a(...) site=b(...)": a second stage
                hint = "; separate stages with ';', e.g. 'vision.block.*=tome(r=8); vision.out=random(keep=64)'"
            raise PolicyError(f"malformed arguments in {text!r}: {exc.msg}{hint}") from None
        # "f(a=1)(b=2)", "f(a=1).x(b=2)", "f(a=1), g()" parse too: only one plain call is a spec
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "_"):
            raise PolicyError(f"malformed method call {text!r}; expected METHOD or METHOD(key=value, ...)")
        if call.args:
            raise PolicyError(f"{method}: arguments must be named (key=value); "
                              f"valid parameters: {choices(reducer_class(method).param_names())}")
        for kw in call.keywords:
            if kw.arg is None:
                raise PolicyError(f"{method}: '**' is not allowed in a spec")
            if kw.arg in params:
                raise PolicyError(f"{method}: {kw.arg!r} is given twice in {text!r}")
            try:
                params[kw.arg] = ast.literal_eval(kw.value)
            except ValueError:
                raise PolicyError(f"{method}: value of {kw.arg!r} must be a Python literal "
                                  f"(number, string, list, tuple, bool, None), got {ast.unparse(kw.value)!r}") from None
    return make_reducer(method, params)


def parse_spec(spec: str) -> Policy:
    stages = []
    for part in _split_top(spec, ";"):
        part = part.strip()
        if not part:
            continue
        pieces = _split_top(part, "=")
        if len(pieces) < 2:
            raise PolicyError(f"malformed stage {part!r}; expected SITE=METHOD(key=value, ...)")
        site = pieces[0].strip()
        call = "=".join(pieces[1:])
        stages.append(Stage(site, parse_call(call)))
    return Policy(stages)


# -- site expansion -------------------------------------------------------------------------------
def describe_sites(sites: dict) -> str:
    """'vision.block.{0..11}, vision.out' style summary of an adapter's sites."""
    fams: dict = {}
    singles = []
    for info in sites.values():
        if info.index is None:
            singles.append(info.name)
        else:
            fams.setdefault(info.family, []).append(info.index)
    parts = [f"{f}.{{{min(ix)}..{max(ix)}}}" for f, ix in fams.items()]
    return ", ".join(parts + singles)


def expand_site(pattern: str, sites: dict) -> list:
    if pattern in sites:
        return [pattern]
    head, _, sel = pattern.rpartition(".")
    family = sorted((i for i in sites.values() if i.family == head and i.index is not None), key=lambda i: i.index)
    if not family or not re.fullmatch(r"\*|-?\d+|(-?\d+)?:(-?\d+)?", sel):
        raise SiteError(f"unknown site {pattern!r}; valid sites: {describe_sites(sites)}")
    names = [i.name for i in family]
    n = len(names)
    if sel == "*":
        return names
    if ":" in sel:
        a, b = sel.split(":")
        picked = names[slice(int(a) if a else None, int(b) if b else None)]
        if not picked:
            raise SiteError(f"site range {pattern!r} selects nothing; {head} has indices 0..{n - 1}")
        return picked
    i = int(sel)
    if not -n <= i < n:
        raise SiteError(f"unknown site {pattern!r}; {head} has indices 0..{n - 1} (negatives count from the end)")
    return [names[i]]


__all__ = ["Policy", "Stage", "parse_spec", "make_reducer", "expand_site", "describe_sites", "SiteInfo"]
