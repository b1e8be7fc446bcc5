"""The HTML forms of a page, read as a browser would submit them: a tiny reader on stdlib `html.parser`.

For tests that act as a person on a real IdP's pages: fill a form's text fields, click one of its buttons,
send what a browser would send. It knows `<form>`, `<input>` and `<button>` (with the `form=` attribute that
ties a control outside a form to it, as oidc-provider's device pages do), the page title and its visible
text; nothing else (no `<select>`, `<textarea>` or scripts: the pages the tests read have none that matter).
"""

from __future__ import annotations

from dataclasses import dataclass
from html.parser import HTMLParser
from urllib.parse import urljoin

# Input types that are never sent as a field (submitters are sent only when clicked).
_NOT_FIELDS = frozenset({"submit", "image", "button", "reset", "file"})
_INVISIBLE = frozenset({"script", "style", "title", "noscript"})


@dataclass(frozen=True, slots=True)
class Button:
    """A submit button: what a person reads on it, and the name/value pair it adds when clicked."""

    label: str
    name: str | None
    value: str


@dataclass(frozen=True, slots=True)
class Submission:
    """What a browser sends when a form is submitted."""

    method: str
    url: str
    data: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Form:
    id: str | None
    method: str  # "GET" or "POST"
    action: str  # absolute
    fields: tuple[tuple[str, str], ...]  # the successful controls that are not buttons, in document order
    text_fields: frozenset[str]  # names a person may type into (text, password, email, ...)
    buttons: tuple[Button, ...]

    def submit(self, button: str | None = None, **typed: str) -> Submission:
        """Type `typed` into the named text fields, then click the button labelled `button` (by default the
        form's first button, as pressing Enter does). Raises `LookupError` for a field or button the form
        does not have, so a changed page fails the test instead of sending something else."""
        missing = set(typed) - self.text_fields
        if missing:
            raise LookupError(
                f"form {self.id!r} has no text field {sorted(missing)} (it has {sorted(self.text_fields)})"
            )
        data = [(name, typed.get(name, value)) for name, value in self.fields]
        if button is not None or self.buttons:
            clicked = self.button(button) if button is not None else self.buttons[0]
            if clicked.name:
                data.append((clicked.name, clicked.value))
        return Submission(self.method, self.action, tuple(data))

    def button(self, label: str) -> Button:
        for button in self.buttons:
            if button.label == label:
                return button
        raise LookupError(f"form {self.id!r} has no button {label!r} (it has {[b.label for b in self.buttons]})")


@dataclass(frozen=True, slots=True)
class Page:
    url: str
    status: int
    title: str
    text: str  # the visible text, whitespace collapsed
    forms: tuple[Form, ...]

    def form(self, form_id: str | None = None) -> Form:
        """The form with this id, or the page's only form."""
        if form_id is None:
            if len(self.forms) != 1:
                raise LookupError(f"{self.title!r} has {len(self.forms)} forms, not one")
            return self.forms[0]
        for form in self.forms:
            if form.id == form_id:
                return form
        raise LookupError(f"{self.title!r} has no form {form_id!r} (it has {[f.id for f in self.forms]})")


def parse_page(html: str, url: str, status: int = 200) -> Page:
    """Read `html` served at `url` (relative actions resolve against it)."""
    reader = _Reader()
    reader.feed(html)
    reader.close()
    return reader.page(url, status)


@dataclass(slots=True)
class _RawForm:
    id: str | None
    method: str
    action: str | None


@dataclass(slots=True)
class _Control:
    owner: int | str | None  # the index of the enclosing form, a `form=` id, or None (no form)
    kind: str  # "field", "text" (a field a person types into) or "button"
    name: str | None
    value: str
    label: str = ""


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[_RawForm] = []
        self.controls: list[_Control] = []
        self._open_form: int | None = None
        self._open_button: _Control | None = None
        self._hidden_depth = 0
        self._in_title = False
        self.title = ""
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {key: value if value is not None else "" for key, value in attrs}
        owner: int | str | None = attr.get("form", self._open_form)
        if tag == "form":
            self.forms.append(_RawForm(attr.get("id"), attr.get("method", "get").upper(), attr.get("action")))
            self._open_form = len(self.forms) - 1
        elif tag == "input" and "disabled" not in attr:
            kind = attr.get("type", "text").lower()
            if kind == "submit":
                self.controls.append(
                    _Control(owner, "button", attr.get("name"), attr.get("value", ""), attr.get("value", ""))
                )
            elif kind in ("checkbox", "radio"):
                if "checked" in attr:
                    self.controls.append(_Control(owner, "field", attr.get("name"), attr.get("value", "on")))
            elif kind not in _NOT_FIELDS:
                field = "field" if kind == "hidden" else "text"
                self.controls.append(_Control(owner, field, attr.get("name"), attr.get("value", "")))
        elif tag == "button" and "disabled" not in attr and attr.get("type", "submit").lower() == "submit":
            self._open_button = _Control(owner, "button", attr.get("name"), attr.get("value", ""))
            self.controls.append(self._open_button)
        elif tag in _INVISIBLE:
            self._hidden_depth += 1
            self._in_title = self._in_title or tag == "title"

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._open_form = None
        elif tag == "button":
            self._open_button = None
        elif tag in _INVISIBLE:
            self._hidden_depth = max(0, self._hidden_depth - 1)
            if tag == "title":
                self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        if self._open_button is not None:
            self._open_button.label += data
        if not self._hidden_depth:
            self.text.append(data)

    def page(self, url: str, status: int) -> Page:
        ids = {form.id: index for index, form in enumerate(self.forms) if form.id is not None}
        forms = []
        for index, raw in enumerate(self.forms):
            mine = [
                c for c in self.controls if c.owner == index or (isinstance(c.owner, str) and ids.get(c.owner) == index)
            ]
            forms.append(
                Form(
                    id=raw.id,
                    method=raw.method,
                    # An empty or missing action submits to the page itself (HTML §4.10.21.3).
                    action=urljoin(url, raw.action) if raw.action else url,
                    fields=tuple((c.name, c.value) for c in mine if c.kind != "button" and c.name),
                    text_fields=frozenset(c.name for c in mine if c.kind == "text" and c.name),
                    buttons=tuple(
                        Button(" ".join(c.label.split()), c.name, c.value) for c in mine if c.kind == "button"
                    ),
                )
            )
        text = " ".join(" ".join(self.text).split())
        return Page(url, status, " ".join(self.title.split()), text, tuple(forms))
