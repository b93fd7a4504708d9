"""A minimal OpenAI-compatible chat-completions server on 127.0.0.1 for tests: each request takes
the next scripted behaviour (or the default) and every request is counted.

Behaviours (a script entry, `default`, or what `mode_for(body)` returns for one request): "logprobs"
(Yes/No with log-probabilities), "text" (Yes/No without them), "text_other" ("Maybe"), "429" (with a
Retry-After header when `retry_after` is set), "500", "404", "malformed" (not JSON), "hang" (5 s, no
reply), "down" (the connection is closed without a reply: the client sees a connection error). For a
while: rate_limit(seconds, retry_after) answers every request 429, down(seconds) drops every
connection. `models`: the only models served (404 for others). The judge's probe ("[connection
check] ...") is counted in `probes`, not `requests`, and takes no script entry. `replies` counts
what was answered, by behaviour."""

import json
import math
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
                return self.reply(200, owner.completion(body, mode))

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

    def completion(self, body, mode):
        word = "Yes" if self.p_yes >= 0.5 else "No"
        choice = {
            "index": 0,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": word},
        }
        if mode == "logprobs":
            top = [
                {"token": "Yes", "logprob": math.log(self.p_yes), "bytes": None},
                {"token": "No", "logprob": math.log(1 - self.p_yes), "bytes": None},
            ]
            choice["logprobs"] = {
                "content": [
                    {
                        "token": word,
                        "logprob": top[0]["logprob"],
                        "bytes": None,
                        "top_logprobs": top,
                    }
                ]
            }
        if mode == "text_other":
            choice["message"]["content"] = "Maybe"
        n = self.prompt_tokens
        usage = {"prompt_tokens": n, "completion_tokens": 1, "total_tokens": n + 1}
        return {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [choice],
            "usage": usage,
        }

    def close(self):
        self.server.shutdown()
