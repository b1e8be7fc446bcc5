"""Validate a real response against `/openapi.json`'s own schema for its (path, method, status)."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

DOC_URI = "urn:qwen-serve:openapi"
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def template_of(document: dict[str, Any], path: str) -> str:
    """The document's path template that `path` matches (`{name}` matches one segment)."""
    for template in document["paths"]:
        pattern = re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            return str(template)
    raise AssertionError(f"{path} is not in the document")


def pointer(*parts: str) -> str:
    return "".join("/" + part.replace("~", "~0").replace("/", "~1") for part in parts)


class Checker:
    """Validates real responses against the document's schema for their (path, method, status)."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.registry: Registry[Any] = Registry().with_resource(DOC_URI, DRAFT202012.create_resource(document))
        self.seen: set[tuple[str, str, str]] = set()

    def check(self, path: str, method: str, status: int, body: bytes, content_type: str | None) -> None:
        template = template_of(self.document, path)
        method = method.lower()
        operation = self.document["paths"][template].get(method)
        assert operation is not None, f"{method.upper()} {template} is not in the document"
        responses = operation["responses"]
        assert str(status) in responses, f"{method.upper()} {template} → {status} is not documented"
        self.seen.add((template, method, str(status)))
        documented = responses[str(status)]
        if "content" not in documented:
            assert body == b"", f"{method.upper()} {template} → {status} has a body the document does not give"
            return
        assert content_type is not None and content_type.split(";")[0] in documented["content"]
        where = pointer("paths", template, method, "responses", str(status), "content", "application/json", "schema")
        validator = Draft202012Validator({"$ref": f"{DOC_URI}#{where}"}, registry=self.registry)
        errors = [e.message for e in validator.iter_errors(json.loads(body))]
        assert errors == [], f"{method.upper()} {path} → {status}: {errors} in {body.decode()}"

    def check_response(self, response: httpx.Response) -> None:
        self.check(
            response.request.url.path,
            response.request.method,
            response.status_code,
            response.content,
            response.headers.get("content-type"),
        )
