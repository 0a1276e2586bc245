#!/usr/bin/env python3
"""Uses a relay's completions API with the official `openai` Python client, as a customer would.

    pip install openai
    python3 tools/openai_check.py BASE_URL KEY SMALL_KEY

BASE_URL is the relay's address + /v1; KEY a key with room for a few requests; SMALL_KEY a key
whose quota (30 tokens) allows one 22-token request and not a second. Checks: the model list, a
completion and its `usage` (prompt and completion tokens are bytes), a key the relay does not
know (401, AuthenticationError), an exhausted quota (429, RateLimitError). Prints one JSON line.
"""

import json
import sys

from openai import AuthenticationError, OpenAI, RateLimitError


def main(base, key, small):
    client = OpenAI(api_key=key, base_url=base, max_retries=0)
    models = [m.id for m in client.models.list().data]
    assert len(models) == 1, models
    model = models[0]
    r = client.completions.create(model=model, prompt="ROMEO:", max_tokens=20, temperature=0.8, seed=1)
    assert r.object == "text_completion", r
    assert r.usage.prompt_tokens == 6 and r.usage.completion_tokens == 20, r.usage
    assert r.usage.total_tokens == 26, r.usage
    text = r.choices[0].text
    assert text and r.choices[0].finish_reason == "length", r
    # Same seed, same text: the relay serves one version at a time (it may move on between calls).
    try:
        OpenAI(api_key="tsk-not-a-key", base_url=base, max_retries=0).completions.create(
            model=model, prompt="x", max_tokens=1
        )
        raise AssertionError("an unknown key was served")
    except AuthenticationError as e:
        assert e.status_code == 401, e
    s = OpenAI(api_key=small, base_url=base, max_retries=0)
    first = s.completions.create(model=model, prompt="ab", max_tokens=20)
    assert first.usage.total_tokens == 22, first.usage
    try:
        s.completions.create(model=model, prompt="ab", max_tokens=20)
        raise AssertionError("a request past the quota was served")
    except RateLimitError as e:
        assert e.status_code == 429, e
    print(json.dumps({"model": model, "text": text, "served_tokens": 26 + 22,
                      "unknown_key": 401, "over_quota": 429}))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
