#!/usr/bin/env python3
"""Headless Chromium against the chat page of a running `serve` example.

Loads the page, sends a message, sees the reply arrive in pieces (mid-reply state, then
done), checks the rendered text against the same conversation sent to the API directly,
sends a second message (the conversation is kept and sent whole), reloads (the conversation
is still there), and optionally saves a screenshot taken mid-reply. Prints 'N passed, M
failed' and exits non-zero on any failure.

    python tools/e2e/browser_test.py --url http://127.0.0.1:8000 [--screenshot docs/chat.png]

Needs Debian's `chromium` and `chromium-driver` packages (tools/e2e/run.sh installs them).
"""

import argparse
import json
import os
import sys
import time
import traceback
import urllib.request

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

# Never let Selenium Manager look for drivers online: the Debian packages are used.
os.environ.setdefault("SE_OFFLINE", "true")


def browser(width, height):
    opts = webdriver.ChromeOptions()
    opts.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              f"--window-size={width},{height}"):
        opts.add_argument(a)
    service = Service(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
    return webdriver.Chrome(service=service, options=opts)


def api_reply(url, model, messages, max_tokens):
    """What the API answers for the same conversation, greedy."""
    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens,
                       "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", body,
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)["choices"][0]["message"]["content"]


def last_reply(d):
    return d.execute_script("""
        const m = [...document.querySelectorAll('.msg.assistant')].pop();
        return m ? {state: m.dataset.state, chunks: Number(m.dataset.chunks || 0),
                    text: m.querySelector('.text').textContent} : null;""")


def send(d, text):
    box = d.find_element(By.ID, "input")
    box.clear()
    box.send_keys(text)
    d.find_element(By.ID, "send").click()


def set_field(d, field_id, value):
    d.execute_script("document.getElementById(arguments[0]).value = arguments[1];", field_id, value)


def run(args):
    d = browser(args.width, args.height)
    wait = WebDriverWait(d, args.timeout, poll_frequency=0.02)
    results = []

    def step(name, fn):
        try:
            fn()
            results.append(True)
            print(f"ok   {name}")
        except Exception:
            results.append(False)
            print(f"FAIL {name}")
            traceback.print_exc()
            raise

    state = {}
    try:
        def load():
            d.get(args.url + "/")
            d.execute_script("localStorage.clear();")
            d.refresh()
            assert d.title == "flexgen chat", d.title
            wait.until(lambda d: d.find_element(By.ID, "model").text not in ("", "…"))
            state["model"] = d.find_element(By.ID, "model").text
            assert not state["model"].startswith("model unknown"), state["model"]
            set_field(d, "temperature", "0")
            set_field(d, "max-tokens", str(args.max_tokens))
        step("page loads and names the model", load)

        def first_turn():
            send(d, args.message)
            # Mid-reply: some text shown while the reply is still streaming.
            mid = wait.until(lambda d: (lambda r: r if r and r["state"] == "streaming"
                                        and r["chunks"] >= args.mid_chunks else None)(last_reply(d)))
            if args.screenshot:
                d.save_screenshot(args.screenshot)
                print(f"     screenshot mid-reply ({mid['chunks']} chunks shown) -> {args.screenshot}")
            done = wait.until(lambda d: (lambda r: r if r and r["state"] != "streaming" else None)(last_reply(d)))
            assert done["state"] == "done", done
            assert done["chunks"] > mid["chunks"] >= 1 or done["chunks"] >= 2, (mid, done)
            expected = api_reply(args.url, state["model"],
                                 [{"role": "user", "content": args.message}], args.max_tokens)
            assert done["text"] == expected, (done["text"], expected)
            state["reply1"] = done["text"]
        step("a message gets a streamed reply equal to the API's", first_turn)

        def second_turn():
            send(d, args.second)
            done = wait.until(lambda d: (lambda r: r if r and r["state"] != "streaming"
                                         and len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2
                                         else None)(last_reply(d)))
            assert done["state"] == "done", done
            history = [{"role": "user", "content": args.message},
                       {"role": "assistant", "content": state["reply1"]},
                       {"role": "user", "content": args.second}]
            expected = api_reply(args.url, state["model"], history, args.max_tokens)
            assert done["text"] == expected, (done["text"], expected)
        step("the second reply continues the whole conversation", second_turn)

        def reload_keeps():
            d.refresh()
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg")) == 4)
            roles = [e.get_attribute("class") for e in d.find_elements(By.CSS_SELECTOR, ".msg")]
            assert roles == ["msg user", "msg assistant"] * 2, roles
        step("a reload keeps the conversation", reload_keeps)
    except Exception:
        pass
    finally:
        d.quit()
    passed = sum(results)
    failed = len(results) - passed + (4 - len(results))
    print(f"browser: {passed} passed, {failed} failed")
    return 1 if failed else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--message", default="Hello! What can you do?")
    p.add_argument("--second", default="What is the tallest mountain in the world?")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--mid-chunks", type=int, default=1,
                   help="pieces of the reply to see before calling it mid-reply")
    p.add_argument("--screenshot", help="save a PNG of the page mid-reply")
    p.add_argument("--width", type=int, default=1000)
    p.add_argument("--height", type=int, default=640)
    p.add_argument("--timeout", type=float, default=120)
    args = p.parse_args()
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
