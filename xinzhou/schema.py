"""The one JSON-schema helper: tool definitions, argument checking and typing.

Used by the chat format (a parameter's text back to a typed value), the task tools and the
agent's tools (are these arguments valid?), and the server (is this tool definition valid?).
Only the part of JSON Schema that tool definitions use: type (one or a list), enum, anyOf/oneOf,
properties/required, items.

    fn = function_of(tool, i)                          # {"name", "description", "parameters"}
    err = argument_error({"a": 1}, fn["parameters"])    # None, or why not
    value = value_from_text("3", {"type": "integer"})   # 3
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str, "integer": int, "number": (int, float), "boolean": bool,
    "object": dict, "array": list, "null": type(None),
}


def function_of(tool: Mapping[str, Any], i: int = 0) -> Mapping[str, Any]:
    """The function of an OpenAI-style tool ({"type": "function", "function": {...}}) or a bare
    function definition; ValueError naming tools[i] when it has no string name."""
    fn = tool.get("function", tool) if isinstance(tool, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise ValueError(f"tools[{i}]: expected {{'type': 'function', 'function': {{'name': ...}}}}"
                         f", got {tool!r}")
    return fn


def check_tool(tool: Mapping[str, Any], i: int = 0) -> Mapping[str, Any]:
    """function_of, plus a usable schema: a non-empty name and, if given, parameters that are an
    object schema whose properties are schemas. ValueError naming the field otherwise."""
    fn = function_of(tool, i)
    if not fn["name"].strip():
        raise ValueError(f"tools[{i}].function.name: must not be empty")
    params = fn.get("parameters")
    if params is None:
        return fn
    if not isinstance(params, Mapping):
        raise ValueError(f"tools[{i}].function.parameters: expected a JSON schema object, got {params!r}")
    if params.get("type", "object") != "object":
        raise ValueError(f"tools[{i}].function.parameters.type: expected 'object', got {params.get('type')!r}")
    props = params.get("properties", {})
    if not isinstance(props, Mapping) or not all(isinstance(v, Mapping) for v in props.values()):
        raise ValueError(f"tools[{i}].function.parameters.properties: expected an object of schemas")
    for key, spec in props.items():
        t = spec.get("type")
        names = [t] if isinstance(t, str) else t if isinstance(t, list) else [] if t is None else [None]
        bad = [x for x in names if x not in JSON_TYPES]
        if bad:
            raise ValueError(f"tools[{i}].function.parameters.properties.{key}.type: {t!r} is not a JSON type")
    required = params.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ValueError(f"tools[{i}].function.parameters.required: expected a list of property names")
    return fn


def properties_by_tool(tools: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Tool name -> JSON-schema properties of its parameters."""
    out: dict[str, dict[str, Any]] = {}
    for i, t in enumerate(tools):
        fn = function_of(t, i)
        params = fn.get("parameters")
        props = params.get("properties") if isinstance(params, Mapping) else None
        out[fn["name"]] = dict(props) if isinstance(props, Mapping) else {}
    return out


def argument_error(arguments: object, parameters: Mapping[str, Any]) -> str | None:
    """Why `arguments` do not match the object schema `parameters`, or None when they do.

    Checks required keys, unknown keys, each value's JSON type (a bool is not an integer) and enums.
    """
    if not isinstance(arguments, dict):
        return f"arguments must be an object, got {type(arguments).__name__}"
    props = parameters.get("properties", {})
    missing = [k for k in parameters.get("required", []) if k not in arguments]
    if missing:
        return f"missing required argument(s) {missing}"
    for key, value in arguments.items():
        if key not in props:
            return f"unknown argument {key!r}; expected one of {list(props)}"
        spec = props[key]
        want = spec.get("type")
        if want is not None:
            types = [want] if isinstance(want, str) else list(want)
            if not any(
                isinstance(value, JSON_TYPES[t]) and not (isinstance(value, bool) and t in ("integer", "number"))
                for t in types if t in JSON_TYPES
            ):
                return f"argument {key!r} must be {want}, got {type(value).__name__} {value!r}"
        if "enum" in spec and value not in spec["enum"]:
            return f"argument {key!r} must be one of {spec['enum']}, got {value!r}"
    return None


_NOT_JSON = object()


def _json(v: str) -> Any:
    try:
        return json.loads(v)
    except ValueError:
        return _NOT_JSON


def value_from_text(raw: str, schema: Any) -> Any:
    """A tool parameter written as text (M2 writes them so) back to a value: one newline stripped
    each side, then typed by `schema` (None: stays a string). Strings stay raw; everything else is
    read as JSON. A value the schema does not admit keeps what the model wrote, typed if it is JSON."""
    v = raw[1:] if raw.startswith("\n") else raw
    v = v[:-1] if v.endswith("\n") else v
    if schema is None:
        return v
    ok, value = _coerce(v, schema)
    if ok:
        return value
    j = _json(v)
    return v if j is _NOT_JSON else j


def _is_string_schema(schema: Any) -> bool:
    return isinstance(schema, Mapping) and schema.get("type") == "string"


def _coerce(v: str, schema: Any) -> tuple[bool, Any]:
    if not isinstance(schema, Mapping):
        return False, None
    options = schema.get("anyOf") or schema.get("oneOf")
    if isinstance(options, list):
        # strings last: "3" is the integer 3 when the schema allows both
        for option in sorted(options, key=_is_string_schema):
            ok, value = _coerce(v, option)
            if ok:
                return True, value
        return False, None
    enum = schema.get("enum")
    if isinstance(enum, list):
        if v in enum:
            return True, v
        j = _json(v)
        return (True, j) if any(j == e and type(j) is type(e) for e in enum) else (False, None)
    types = schema.get("type")
    if types is None:
        types = "object" if "properties" in schema else "array" if "items" in schema else None
    if types is None:  # an unconstrained schema: JSON if it parses, else the text
        j = _json(v)
        return True, (v if j is _NOT_JSON else j)
    for t in sorted(types if isinstance(types, list) else [types], key=lambda t: t == "string"):
        if t == "string":
            return True, v
        if t == "boolean" and v.strip().lower() in ("true", "false"):
            return True, v.strip().lower() == "true"
        j = _json(v)
        if t == "null" and j is None:
            return True, None
        if t == "integer" and isinstance(j, int) and not isinstance(j, bool):
            return True, j
        if t == "integer" and isinstance(j, float) and j.is_integer():
            return True, int(j)
        if t == "number" and isinstance(j, (int, float)) and not isinstance(j, bool):
            return True, j
        if t == "object" and isinstance(j, dict):
            return True, j
        if t == "array" and isinstance(j, list):
            return True, j
    return False, None
