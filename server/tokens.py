"""Which tokens are too weak to guard a server: the refusal `driftsync serve` makes at start."""
from __future__ import annotations

MIN_TOKEN_LENGTH = 16
# Defaults from examples and compose files, and words that used to mean "no token".
KNOWN_WEAK = frozenset({
    "", "none", "off", "null", "false", "no", "0", "change-me", "changeme", "change-me-admin", "change_me",
    "password", "passw0rd", "admin", "secret", "token", "test", "default", "driftsync", "letmein",
})
GENERATE_HINT = "python -c 'import secrets; print(secrets.token_urlsafe(24))'"


def weakness(token: str) -> str | None:
    """Why one token is too weak, or None when it is not."""
    text = token.strip()
    if text.lower() in KNOWN_WEAK or text.lower().startswith(("change-me", "changeme")):
        return "a known default" if text else "empty"
    if len(text) < MIN_TOKEN_LENGTH:
        return f"shorter than {MIN_TOKEN_LENGTH} characters"
    if len(set(text)) < 6:
        return "too repetitive"
    return None


def weak_tokens(tokens: dict[str, str | None]) -> list[str]:
    """'FLAG: reason' for each configured token that is weak; unset (None) ones are not checked.
    A value may be a comma-separated list (rotation): every member must be strong."""
    problems = []
    for flag, value in tokens.items():
        if value is None:
            continue
        members = value.split(",") if value.strip() else [value]
        for reason in filter(None, map(weakness, members)):
            problems.append(f"{flag}: {reason}")
            break
    return problems
