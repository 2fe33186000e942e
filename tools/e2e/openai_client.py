#!/usr/bin/env python3
"""The official `openai` Python client, unchanged, against a running `serve` example.

Checks completions.create and chat.completions.create with and without stream=True (the
streamed pieces must add up to the plain answer), models.list, and that bad requests raise
the client's typed errors. Prints 'N passed, M failed' and exits non-zero on any failure.

    python tools/e2e/openai_client.py --base-url http://127.0.0.1:8000/v1 --api-key KEY
"""

import argparse
import sys
import traceback

import openai

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def ctx(args):
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    return client, model


# A short system message: the default chat preamble does not fit a 64-position fixture.
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
]


@check
def models_list(client, model):
    ids = [m.id for m in client.models.list().data]
    assert ids == [model], ids
    assert client.models.retrieve(model).id == model


@check
def completion_plain_and_streamed(client, model):
    kw = dict(model=model, prompt="Paris is the capital city of", max_tokens=8, temperature=0)
    plain = client.completions.create(**kw)
    choice = plain.choices[0]
    assert plain.object == "text_completion", plain.object
    assert isinstance(choice.text, str) and choice.text, choice
    assert choice.finish_reason in ("stop", "length"), choice.finish_reason
    assert plain.usage.completion_tokens > 0
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    pieces, reason, usage, chunks = [], None, None, 0
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.text)
            reason = c.finish_reason or reason
    assert chunks > 2, chunks
    assert "".join(pieces) == choice.text, (pieces, choice.text)
    assert reason == choice.finish_reason, (reason, choice.finish_reason)
    assert usage is not None and usage.total_tokens == plain.usage.total_tokens, usage


@check
def several_prompts_are_several_choices(client, model):
    out = client.completions.create(model=model, prompt=["Hello", "The cat"], max_tokens=4, temperature=0)
    assert [c.index for c in out.choices] == [0, 1], out.choices
    alone = client.completions.create(model=model, prompt="The cat", max_tokens=4, temperature=0)
    assert out.choices[1].text == alone.choices[0].text


@check
def chat_plain_and_streamed(client, model):
    kw = dict(model=model, messages=MESSAGES, max_tokens=8, temperature=0)
    plain = client.chat.completions.create(**kw)
    choice = plain.choices[0]
    assert plain.object == "chat.completion", plain.object
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str), choice
    assert choice.finish_reason in ("stop", "length"), choice.finish_reason

    pieces, roles, reason = [], [], None
    for chunk in client.chat.completions.create(stream=True, **kw):
        assert chunk.object == "chat.completion.chunk", chunk.object
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            if c.delta.content:
                pieces.append(c.delta.content)
            reason = c.finish_reason or reason
    assert roles == ["assistant"], roles
    assert "".join(pieces) == choice.message.content, (pieces, choice.message.content)
    assert reason == choice.finish_reason


@check
def seeded_sampling_repeats(client, model):
    kw = dict(model=model, messages=MESSAGES, max_tokens=6, temperature=0.9, seed=7)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b, (a, b)


@check
def bad_requests_raise_typed_errors(client, model):
    cases = [
        (openai.BadRequestError, dict(model=model, prompt="x", max_tokens=100000)),
        (openai.BadRequestError, dict(model=model, prompt="x", temperature=5)),
        (openai.BadRequestError, dict(model=model, prompt="x", n=3)),
        (openai.NotFoundError, dict(model="no-such-model", prompt="x")),
    ]
    for err, kw in cases:
        try:
            client.completions.create(**kw)
        except err as e:
            assert e.body and e.body.get("message"), e.body
        else:
            raise AssertionError(f"{kw} did not raise {err.__name__}")
    wrong = openai.OpenAI(base_url=client.base_url, api_key="sk-wrong", max_retries=0)
    try:
        wrong.chat.completions.create(model=model, messages=MESSAGES)
    except openai.AuthenticationError:
        pass
    else:
        raise AssertionError("a wrong API key was accepted")
    # The server still answers afterwards.
    assert client.completions.create(model=model, prompt="ok", max_tokens=1).choices


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default="none")
    args = p.parse_args()
    client, model = ctx(args)
    passed = failed = 0
    for fn in CHECKS:
        try:
            fn(client, model)
            passed += 1
            print(f"ok   {fn.__name__}")
        except Exception:
            failed += 1
            print(f"FAIL {fn.__name__}")
            traceback.print_exc()
    print(f"openai-client: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
