"""A minimal OpenAI-compatible chat-completions server on 127.0.0.1 for tests: each request takes
the next scripted behaviour (or the default) and every request is counted.

Behaviours (a script entry, `default`, or what `mode_for(body)` returns for one request):
"logprobs" (Yes/No with log-probabilities), "text" (Yes/No without them), "text_other"
(`other_text`, "Maybe" unless set), "429" (with a Retry-After header when `retry_after` is set),
"500", "404", "malformed" (not JSON), "hang" (5 s, no reply), "down" (the connection is closed
without a reply: the client sees a connection error). Broken judges: "nan" (log-probabilities
NaN), "huge" (Yes at log-probability +1000), "tiny" (Yes and No both at -1e4), "always_no" ("No"
at P(yes) 0.05, to every question and probe; "always_yes" at 0.95), "empty_choices" (a 200 chat
completion whose `choices` is []), "slowloris" (a valid reply sent one byte every `drip` seconds,
for `slowloris_for` seconds at most, then the connection is closed). For a while:
rate_limit(seconds, retry_after) answers every request 429, down(seconds) drops every connection.
`models`: the only models served (404 for others). `p_yes`: a number, or a function of the
request's body. The judge's probe ("[connection check] Is 2 + 2 equal to N?") is counted in
`probes`, not `requests`, takes no script entry, and is answered right (Yes for N = 4) in the
modes that say Yes or No. `replies` counts what was answered, by behaviour."""

import json
import math
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROBE_MARK = "[connection check]"


class FakeOpenAI:
    def __init__(self, default="logprobs", p_yes=0.8, delay=0.0):
        self.script, self.default, self.p_yes, self.delay = [], default, p_yes, delay
        self.requests, self.probes, self.replies, self.lock = [], [], Counter(), threading.Lock()
        self.mode_for, self.retry_after, self.models, self.prompt_tokens = None, None, None, 100
        self.limited_until = self.down_until = 0.0
        self.other_text, self.drip, self.slowloris_for = "Maybe", 5.0, 60.0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                mode = owner.choose(body)
                time.sleep(owner.delay)
                if mode == "hang":
                    time.sleep(5)
                    return
                if mode == "down":
                    self.close_connection = True  # no status line: the client's connection fails
                    return
                if mode in ("429", "500", "404"):
                    wait = owner.retry_after if mode == "429" else None
                    headers = {"Retry-After": str(wait)} if wait else {}
                    message = (
                        f"The model `{body['model']}` does not exist"
                        if mode == "404"
                        else "try later"
                    )
                    return self.reply(
                        int(mode), {"error": {"message": message, "type": "x"}}, headers=headers
                    )
                if mode == "malformed":
                    return self.reply(200, None, raw=b"{not json")
                if mode == "slowloris":
                    return self.slowloris(json.dumps(owner.completion(body, "logprobs")).encode())
                return self.reply(200, owner.completion(body, mode))

            def slowloris(self, data):
                head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                end = time.time() + owner.slowloris_for
                for i in range(len(head + data)):
                    if time.time() > end:
                        break
                    try:
                        self.wfile.write((head + data)[i : i + 1])
                    except OSError:  # the client gave up
                        break
                    time.sleep(owner.drip)
                self.close_connection = True

            def reply(self, code, obj, raw=None, headers=None):
                data = raw if raw is not None else json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def choose(self, body):
        """This request's behaviour; the request is counted (in probes or
        requests) and so is its reply."""
        probe = body["messages"][0]["content"].startswith(PROBE_MARK)
        with self.lock:
            (self.probes if probe else self.requests).append(body)
            now = time.time()
            if now < self.down_until:
                mode = "down"
            elif now < self.limited_until:
                mode = "429"
            elif self.models is not None and body["model"] not in self.models:
                mode = "404"
            elif (mode := self.mode_for and self.mode_for(body)) is not None:
                pass
            elif self.script and not probe:
                mode = self.script.pop(0)
            else:
                mode = self.default
            self.replies[mode] += 1
        return mode

    def rate_limit(self, seconds, retry_after=None):
        """Every request gets 429 for `seconds` from now (with Retry-After: retry_after)."""
        self.limited_until, self.retry_after = time.time() + seconds, retry_after

    def down(self, seconds):
        """Every connection is dropped without a reply for `seconds` from now."""
        self.down_until = time.time() + seconds

    def p_yes_for(self, body):
        """P(yes) of this request's reply: a probe's is on the right side of 0.5 (Yes for
        "equal to 4"), except from a judge that always says No."""
        content = body["messages"][0]["content"]
        p = self.p_yes(body) if callable(self.p_yes) else self.p_yes
        if content.startswith(PROBE_MARK):
            truth = re.search(r"equal to (\d+)", content).group(1) == "4"
            p = max(p, 1 - p) if truth else min(p, 1 - p)
        return p

    def completion(self, body, mode):
        p_yes = dict(always_no=0.05, always_yes=0.95).get(mode) or self.p_yes_for(body)
        word = "Yes" if p_yes >= 0.5 else "No"
        choice = {
            "index": 0,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": word},
        }
        if mode in ("logprobs", "nan", "huge", "tiny", "always_no", "always_yes"):
            yes, no = dict(nan=(math.nan, math.nan), huge=(1000.0, -1.0), tiny=(-1e4, -1e4)).get(
                mode, (math.log(p_yes), math.log(1 - p_yes))
            )
            top = [
                {"token": "Yes", "logprob": yes, "bytes": None},
                {"token": "No", "logprob": no, "bytes": None},
            ]
            choice["logprobs"] = {
                "content": [
                    {
                        "token": word,
                        "logprob": yes if word == "Yes" else no,
                        "bytes": None,
                        "top_logprobs": top,
                    }
                ]
            }
        if mode == "text_other":
            choice["message"]["content"] = self.other_text
        n = self.prompt_tokens
        usage = {"prompt_tokens": n, "completion_tokens": 1, "total_tokens": n + 1}
        return {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [] if mode == "empty_choices" else [choice],
            "usage": usage,
        }

    def close(self):
        self.server.shutdown()
