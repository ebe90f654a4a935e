"""Steady load through the proxy with the unmodified OpenAI SDK (AsyncOpenAI), in its own process.

Requests start on a fixed schedule (``--rate`` per second; a quarter of them streamed) for
``--duration`` seconds, at most ``--concurrency`` at once (a request due while that many are in
flight is not sent and is counted as shed: the held rate is what was answered); every ``--feedback-every``-th answer gets a thumbs-up through
``POST /v1/feedback`` (a unique idempotency key each). No retries (``max_retries=0``): a failure is
what the user would see. One JSON line per request goes to ``--out``:
``{"t": start (unix s), "kind": "chat"|"feedback", "ok": bool, "id": interaction id or key,
"err": error class and message, "lat": seconds}``.

Run: ``python -m tests.chaos.load --base-url http://127.0.0.1:8080/v1 --rate 200 --duration 30 --out x.jsonl``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid


async def main(args) -> None:
    import httpx
    from openai import AsyncOpenAI

    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    http = httpx.AsyncClient(limits=limits, timeout=30)
    client = AsyncOpenAI(base_url=args.base_url, api_key="chaos", max_retries=0, http_client=http)
    out = open(args.out, "w", buffering=1)  # line-buffered: the suite reads it while the load runs
    sem = asyncio.Semaphore(args.concurrency)
    msgs = [{"role": "user", "content": "Say something short."}]
    tasks: set[asyncio.Task] = set()
    counter = 0
    shed = 0

    def write(rec: dict) -> None:
        out.write(json.dumps(rec) + "\n")

    async def feedback(iid: str) -> None:
        key = uuid.uuid4().hex
        t = time.time()
        rec = {"t": t, "kind": "feedback", "id": key, "iid": iid}
        try:
            r = await http.post(args.base_url + "/feedback", json={"interaction_id": iid, "kind": "thumbs", "value": 1},
                                headers={"authorization": f"Bearer {args.api_key}", "idempotency-key": key})
            rec.update(ok=r.status_code == 202, err=None if r.status_code == 202 else f"HTTP {r.status_code}: {r.text[:200]}")
        except Exception as exc:  # noqa: BLE001 - recorded
            rec.update(ok=False, err=f"{type(exc).__name__}: {exc}"[:300])
        rec["lat"] = time.time() - t
        write(rec)

    async def one(i: int) -> None:
        async with sem:
            t = time.time()
            rec = {"t": t, "kind": "chat"}
            try:
                if i % 4 == 0:
                    iid = None
                    stream = await client.chat.completions.create(model=args.model, messages=msgs, stream=True)
                    async for chunk in stream:
                        iid = chunk.id
                else:
                    resp = await client.chat.completions.create(model=args.model, messages=msgs)
                    iid = resp.id
                rec.update(ok=True, id=iid, err=None)
            except Exception as exc:  # noqa: BLE001 - recorded: this is what the user saw
                rec.update(ok=False, id=None, err=f"{type(exc).__name__}: {exc}"[:300])
            rec["lat"] = time.time() - t
            write(rec)
        if rec["ok"] and args.feedback_every and i % args.feedback_every == 1:
            await feedback(rec["id"])

    start = time.monotonic()
    while True:
        elapsed = time.monotonic() - start
        if elapsed >= args.duration:
            break
        due = int(elapsed * args.rate) + 1
        while counter < due:
            if len(tasks) >= args.concurrency:
                shed += 1  # the proxy (or this client) is not keeping up: not sent, counted
            else:
                task = asyncio.create_task(one(counter))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            counter += 1
        await asyncio.sleep(0.005)
    if tasks:
        await asyncio.wait(tasks, timeout=60)
    write({"kind": "summary", "scheduled": counter, "shed": shed, "unfinished": len(tasks)})
    out.close()
    await http.aclose()


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", default="standin-model")
    p.add_argument("--rate", type=float, default=200)
    p.add_argument("--duration", type=float, default=30)
    p.add_argument("--concurrency", type=int, default=128)
    p.add_argument("--feedback-every", type=int, default=10)
    p.add_argument("--api-key", default="")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(parse_args()))
