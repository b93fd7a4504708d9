"""A minimal OpenAI-compatible chat-completions server on 127.0.0.1 for tests: each request takes the
next scripted behaviour (or the default) and every request is counted."""
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI:
    def __init__(self, default="logprobs", p_yes=0.8, delay=0.0):
        self.script, self.default, self.p_yes, self.delay = [], default, p_yes, delay
        self.requests, self.lock = [], threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    owner.requests.append(body)
                    mode = owner.script.pop(0) if owner.script else owner.default
                time.sleep(owner.delay)
                if mode == "hang":
                    time.sleep(5)
                    return
                if mode in ("429", "500"):
                    return self.reply(int(mode), {"error": {"message": "try later", "type": "x"}})
                if mode == "malformed":
                    return self.reply(200, None, raw=b"{not json")
                return self.reply(200, owner.completion(body, mode))

            def reply(self, code, obj, raw=None):
                data = raw if raw is not None else json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def completion(self, body, mode):
        word = "Yes" if self.p_yes >= 0.5 else "No"
        choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": word}}
        if mode == "logprobs":
            top = [{"token": "Yes", "logprob": math.log(self.p_yes), "bytes": None},
                   {"token": "No", "logprob": math.log(1 - self.p_yes), "bytes": None}]
            choice["logprobs"] = {"content": [{"token": word, "logprob": top[0]["logprob"], "bytes": None,
                                               "top_logprobs": top}]}
        if mode == "text_other":
            choice["message"]["content"] = "Maybe"
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [choice], "usage": {"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101}}

    def close(self):
        self.server.shutdown()
