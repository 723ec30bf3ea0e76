"""Keep secrets out of everything a job writes: run records, config copies, wandb, manifests, reports.

Two functions, used by training and curation alike:

- `redact(obj)` returns a copy of a config (dict, list, dataclass) in which the values of keys that look like
  tokens, keys, passwords or secrets, and every value of an environment mapping (`env`, `environment`, `headers`,
  e.g. `vlms.*.env`), are replaced by `REDACTED`; strings that look like a known token format are replaced too,
  and URLs inside strings lose their credentials. The input is never modified.
- `strip_url_credentials(url)` drops `user:pass@` and the signing parameters of presigned / SAS / signed URLs
  (`X-Amz-Signature`, `X-Goog-Signature`, `sig=`, `token=`, ...) from one URL; other strings pass unchanged.

Redaction is by name and shape, so it errs on the side of hiding: a key named `auth_mode` is hidden too. Empty
values (None, "") are kept, so "not set" stays visible.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "<redacted>"

# Words that, as one part of a key name (split at _ - . and camelCase), mark its value as secret.
# Whole parts only: `max_tokens` and `tokenizer` are not secrets, `hf_token` and `apiToken` are.
_SECRET_PARTS = {"token", "secret", "secrets", "password", "passwd", "pwd", "passphrase", "apikey", "credential",
                 "credentials", "auth", "authorization", "cookie", "signature", "sig", "privatekey", "accesskey"}
# "<qualifier> key" pairs: api_key, access-key, secretKey, private_key, ...
_KEY_QUALIFIERS = {"api", "access", "secret", "private", "auth", "ssh", "signing", "encryption", "client",
                   "account", "master", "session"}
# Mappings whose every value is hidden, whatever the entry is called: environment variables and HTTP headers
# routinely carry tokens under arbitrary names.
_ENV_KEYS = {"env", "environ", "environment", "env_vars", "envvars", "headers", "extra_headers"}

# Well-known token shapes, hidden wherever they appear as a value (HF, OpenAI, GitHub, AWS key ids, Slack,
# wandb-style 40-hex keys are not matched: too close to sha1 hashes that manifests legitimately hold).
_TOKEN_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}"
                          r"|github_pat_[A-Za-z0-9_]{20,}|AKIA[0-9A-Z]{16}|ASIA[0-9A-Z]{16}|xox[abposr]-[A-Za-z0-9-]{10,})")

# Query parameters that sign or authorise a URL (lower-cased); any x-amz-* / x-goog-* parameter goes as well,
# since a presigned URL is only usable with all of them and the rest (credential scope, expiry) identifies the key.
_SECRET_QUERY = {"sig", "signature", "token", "access_token", "id_token", "auth", "authorization", "key", "api_key",
                 "apikey", "password", "passwd", "secret", "client_secret", "credential", "policy", "key-pair-id",
                 "x-ms-signature", "sas", "session_token", "security_token"}
_SECRET_QUERY_PREFIXES = ("x-amz-", "x-goog-", "x-oss-")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def _parts(name: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return [p for p in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if p]


def is_secret_key(name: str) -> bool:
    """True when a config key's name says its value is a secret (hf_token, apiKey, db-password, ...)."""
    parts = _parts(str(name))
    if any(p in _SECRET_PARTS for p in parts):
        return True
    return any(a in _KEY_QUALIFIERS and b in ("key", "keys") for a, b in zip(parts, parts[1:]))


def _is_env_key(name: str) -> bool:
    return str(name).lower() in _ENV_KEYS


def strip_url_credentials(url: str) -> str:
    """`url` without `user:pass@` and without signing/authorising query parameters; non-URLs unchanged."""
    if not isinstance(url, str) or "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        kept = [(k, v) for k, v in pairs
                if k.lower() not in _SECRET_QUERY and not k.lower().startswith(_SECRET_QUERY_PREFIXES)]
        if len(kept) != len(pairs):
            query = urlencode(kept)
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """One string with URL credentials stripped and known token shapes hidden (for log lines, error messages)."""
    if not isinstance(text, str):
        return text
    if "://" in text:
        text = _URL_IN_TEXT.sub(lambda m: strip_url_credentials(m.group(0)), text)
    return _TOKEN_VALUE.sub(REDACTED, text)


def redact_argv(argv: list[str]) -> list[str]:
    """A command line safe to record: `key=value` arguments whose (dotted) key looks secret lose their value
    (`--set hf_token=...`, `--api-key=...`), the argument after a secret-looking `--option` too, and every
    argument goes through redact_text."""
    out, hide_next = [], False
    for a in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        if "=" in a and "://" not in a.split("=", 1)[0]:
            k, v = a.split("=", 1)
            last = k.lstrip("-").split(".")[-1]
            out.append(f"{k}={REDACTED}" if v and (is_secret_key(last) or _is_env_key(k.lstrip("-").split(".")[-2]
                       if "." in k else "")) else redact_text(a))
            continue
        if a.startswith("--") and is_secret_key(a[2:]):
            hide_next = True
        out.append(redact_text(a))
    return out


def _hide(value: Any) -> Any:
    if value is None or value == "":
        return value
    if isinstance(value, dict):
        return {k: _hide(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_hide(v) for v in value)
    return REDACTED


def redact(obj: Any) -> Any:
    """A copy of `obj` (dicts, lists, tuples, dataclasses, scalars) safe to write out; see the module docstring."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if _is_env_key(k) or is_secret_key(k):
                out[k] = _hide(v)
            else:
                out[k] = redact(v)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj
