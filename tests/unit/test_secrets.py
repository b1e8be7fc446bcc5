"""Secret (SPEC §3): no way of printing, encoding, pickling or copying it shows the value; reveal() does."""

from __future__ import annotations

import copy
import json
import logging
import pickle
import string
from dataclasses import dataclass

import pytest

from serve.providers.base import DeviceAuthorization
from serve.secrets import REDACTED, Secret

VALUE = "dc-SECRET-3b1f0e9a"


@pytest.fixture
def secret() -> Secret[str]:
    return Secret(VALUE)


def test_reveal_is_the_only_way_out(secret: Secret[str]) -> None:
    assert secret.reveal() == VALUE
    assert not isinstance(secret, str)


@pytest.mark.parametrize(
    "render",
    [
        str,
        repr,
        format,
        lambda s: format(s, ">40"),
        lambda s: format(s, "s"),
        lambda s: f"{s}",
        lambda s: f"{s!r}",
        lambda s: f"{s!s}",
        lambda s: f"{s!a}",
        lambda s: f"{s:^50}",
        lambda s: "%s" % s,  # noqa: UP031  (the %-operator is the point)
        lambda s: "%r" % s,  # noqa: UP031
        lambda s: "%a" % (s,),  # noqa: UP031
        lambda s: "{}".format(s),  # noqa: UP032  (str.format is the point)
        lambda s: "{!r}".format(s),  # noqa: UP032
        lambda s: string.Template("$s").substitute(s=s),
        lambda s: str([s, {"k": s}, (s,)]),
        lambda s: json.dumps(s, default=str),
        lambda s: json.dumps({"code": s}, default=repr),
    ],
    ids=[
        "str",
        "repr",
        "format",
        "format-spec",
        "format-s",
        "fstring",
        "fstring-r",
        "fstring-s",
        "fstring-a",
        "fstring-spec",
        "percent-s",
        "percent-r",
        "percent-a",
        "str.format",
        "str.format-r",
        "template",
        "containers",
        "json-default-str",
        "json-default-repr",
    ],
)
def test_every_rendering_is_redacted(secret: Secret[str], render: object) -> None:
    text = render(secret)  # type: ignore[operator]
    assert VALUE not in text
    assert REDACTED in text


def test_json_refuses_to_encode_it(secret: Secret[str]) -> None:
    with pytest.raises(TypeError) as caught:
        json.dumps({"device_code": secret})
    assert VALUE not in str(caught.value)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickling_is_refused(secret: Secret[str], protocol: int) -> None:
    with pytest.raises(TypeError) as caught:
        pickle.dumps(secret, protocol=protocol)
    assert VALUE not in str(caught.value)
    with pytest.raises(TypeError):
        pickle.dumps({"nested": [secret]}, protocol=protocol)


def test_copies_stay_secret_and_still_reveal(secret: Secret[str]) -> None:
    for duplicate in (copy.copy(secret), copy.deepcopy(secret), copy.deepcopy({"k": [secret]})["k"][0]):
        assert VALUE not in str(duplicate) and VALUE not in repr(duplicate)
        assert duplicate.reveal() == VALUE


def test_concatenation_fails_rather_than_leaking(secret: Secret[str]) -> None:
    with pytest.raises(TypeError) as caught:
        _ = "code=" + secret  # type: ignore[operator]
    assert VALUE not in str(caught.value)


def test_it_cannot_be_changed_and_compares_by_identity_only(secret: Secret[str]) -> None:
    with pytest.raises(AttributeError):
        secret._value = "other"
    assert secret == secret
    assert secret != Secret(VALUE)
    assert not hasattr(secret, "__dict__")


def test_logging_and_dataclass_reprs_stay_redacted(secret: Secret[str], caplog: pytest.LogCaptureFixture) -> None:
    @dataclass
    class Holder:
        code: Secret[str]

    authorization = DeviceAuthorization(
        device_code=secret, user_code="ABCD-EFGH", verification_uri="https://idp.example/device", code_verifier=secret
    )
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("holder %s, authorization %r, raw %s", Holder(secret), authorization, secret)
    assert VALUE not in caplog.text
    assert VALUE not in repr(authorization)
    assert REDACTED in caplog.text
