"""The one JSON-schema helper: tool definitions checked with the field named, arguments checked,
parameter text typed by its schema."""

import pytest

from xinzhou.schema import argument_error, check_tool, value_from_text

CALC = {"type": "function", "function": {"name": "calc", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "op": {"type": "string", "enum": ["+", "-"]}},
    "required": ["a", "op"]}}}


@pytest.mark.parametrize("tool,message", [
    ({"type": "function", "function": {"description": "no name"}}, r"tools\[0\]: expected"),
    ({"type": "function", "function": {"name": " "}}, r"tools\[0\]\.function\.name: must not be empty"),
    ({"function": {"name": "f", "parameters": "x"}}, r"parameters: expected a JSON schema object"),
    ({"function": {"name": "f", "parameters": {"type": "array"}}}, r"parameters\.type: expected 'object'"),
    ({"function": {"name": "f", "parameters": {"properties": {"a": {"type": "int"}}}}},
     r"properties\.a\.type: 'int' is not a JSON type"),
    ({"function": {"name": "f", "parameters": {"properties": {}, "required": "a"}}}, r"required: expected a list"),
])
def test_bad_tool_definitions_are_named(tool, message):
    with pytest.raises(ValueError, match=message):
        check_tool(tool)


def test_arguments_and_values():
    params = CALC["function"]["parameters"]
    assert check_tool(CALC)["name"] == "calc"
    assert argument_error({"a": 1, "op": "+"}, params) is None
    assert argument_error({"a": True, "op": "+"}, params) == "argument 'a' must be integer, got bool True"
    assert argument_error({"a": 1}, params) == "missing required argument(s) ['op']"
    assert argument_error({"a": 1, "op": "*"}, params) == "argument 'op' must be one of ['+', '-'], got '*'"
    assert argument_error({"a": 1, "op": "+", "b": 2}, params).startswith("unknown argument 'b'")
    assert value_from_text("\n42\n", {"type": "integer"}) == 42
    assert value_from_text("42", {"type": "string"}) == "42"
    assert value_from_text("42", {"anyOf": [{"type": "string"}, {"type": "integer"}]}) == 42
    assert value_from_text("[1, 2]", {"type": "array"}) == [1, 2]
    assert value_from_text("not json", {"type": "integer"}) == "not json"  # kept as written
    assert value_from_text("3", None) == "3"
