"""The person at the dev IdP's verification page (`serve.dev_idp`), as the README's curl lines act it."""

from __future__ import annotations

import re

import httpx

_CSRF = re.compile(r'name="csrf" value="([^"]*)"')


async def decide(page_url: str, user_code: str, action: str = "approve") -> httpx.Response:
    """Open the page (which sets the session cookie), then send its form with `user_code` and `action`."""
    base = page_url.split("?", 1)[0]
    async with httpx.AsyncClient(trust_env=False, timeout=10) as browser:
        page = await browser.get(page_url)
        match = _CSRF.search(page.text)
        assert page.status_code == 200 and match is not None, page.status_code
        return await browser.post(base, data={"csrf": match.group(1), "user_code": user_code, "action": action})
