"""The baseline of bench_server.py, what a user would write today: transformers'
``GPTNeoXJapaneseForCausalLM`` and ``generate()`` behind ``POST /v1/completions`` (streamed one chunk
per token, or whole) on FastAPI + uvicorn, one generation at a time (a lock).

    python benchmarks/server_baseline.py MODEL_DIR --port 8001 --served-model-name NAME
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from typing import Any

from fastapi import Request  # the handler's annotation, which FastAPI resolves in this module


def run_baseline_server(path: str, port: int, name: str) -> None:
    """The baseline: transformers' model and generate() behind /v1/completions, one request at a time."""
    import threading

    import torch
    import transformers
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from transformers.generation.streamers import BaseStreamer

    transformers.logging.set_verbosity_error()
    model = transformers.GPTNeoXJapaneseForCausalLM.from_pretrained(path).eval()
    tokenizer = transformers.GPTNeoXJapaneseTokenizer.from_pretrained(path)
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        encoded = tokenizer(body["prompt"], return_tensors="pt")
        new = int(body.get("max_tokens", 16))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        class Streamer(BaseStreamer):
            def __init__(self) -> None:
                self.prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if not self.prompt_seen:  # generate() hands the prompt over first
                    self.prompt_seen = True
                    return
                for token in value.reshape(-1).tolist():
                    loop.call_soon_threadsafe(events.put_nowait, int(token))

            def end(self) -> None:
                pass

        def work() -> None:
            try:
                with lock, torch.no_grad():
                    model.generate(
                        **encoded,
                        max_new_tokens=new,
                        eos_token_id=None,  # as ignore_eos: EOS neither stops nor is forbidden
                        do_sample=False,
                        streamer=Streamer(),
                        pad_token_id=tokenizer.eos_token_id,
                    )
                loop.call_soon_threadsafe(events.put_nowait, None)
            except Exception as err:
                loop.call_soon_threadsafe(events.put_nowait, err)

        threading.Thread(target=work, daemon=True).start()
        prompt_tokens = encoded["input_ids"].shape[1]

        def chunk(text: str, finish: str | None) -> bytes:
            piece = {
                "object": "text_completion",
                "model": name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish}],
            }
            return b"data: " + json.dumps(piece, ensure_ascii=False).encode() + b"\n\n"

        async def tokens() -> Any:
            ids: list[int] = []
            sent = ""
            while True:
                item = await events.get()
                if isinstance(item, Exception):
                    raise item
                if item is None:
                    return
                ids.append(item)
                text = tokenizer.decode(ids, skip_special_tokens=True)
                yield item, text[len(sent) :]
                sent = text

        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": new,
            "total_tokens": prompt_tokens + new,
        }
        if not body.get("stream"):
            text = "".join([piece async for _, piece in tokens()])
            choice = {"index": 0, "text": text, "finish_reason": "length"}
            return JSONResponse(
                {"object": "text_completion", "model": name, "choices": [choice], "usage": usage}
            )

        async def stream() -> Any:
            async for _, piece in tokens():
                yield chunk(piece, None)
            yield chunk("", "length")
            if (body.get("stream_options") or {}).get("include_usage"):
                yield b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    # uvicorn re-raises the SIGTERM that stopped it; ignoring it lets the process exit 0, as neoxja's does
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-model-name", required=True)
    args = parser.parse_args()
    run_baseline_server(args.model, args.port, args.served_model_name)


if __name__ == "__main__":
    main()
