"""Open Interpreter's own server test flow (tests/test_interpreter.py: test_server and
test_authenticated_acknowledging_breaking_server), replayed against oi-server's compat listener
with Debian's python3-websockets and python3-requests. Run by test/routes/oi-compat.test.ts:
OI_PORT (the compat listener), MAIN_URL, OI_KEY, POEM. Prints one JSON line per step on stdout;
any failed expectation raises, which exits non-zero."""

import asyncio
import json
import os
import sys

import requests
import websockets

PORT = os.environ["OI_PORT"]
BASE = f"http://127.0.0.1:{PORT}"
WS = f"ws://127.0.0.1:{PORT}/"
KEY = os.environ["OI_KEY"]
HEADERS = {"X-API-KEY": KEY}
COMPLETE = {"role": "server", "type": "status", "content": "complete"}


def report(step, **data):
    print(json.dumps({"step": step, **data}), flush=True)


async def recv(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), 120))


async def send_message(ws, text, type_="message"):
    await ws.send(json.dumps({"role": "user", "type": type_, "start": True}))
    await ws.send(json.dumps({"role": "user", "type": type_, "content": text}))
    await ws.send(json.dumps({"role": "user", "type": type_, "end": True}))


async def until_complete(ws, ack=False):
    """Reads to the next complete, as upstream's test loops do; returns (content, frames)."""
    content, frames = "", []
    while True:
        data = await recv(ws)
        if ack and "id" in data:
            await ws.send(json.dumps({"ack": data["id"]}))
            data.pop("id")
        frames.append(data)
        if data.get("type") == "error":
            raise Exception(data["content"])
        if data == COMPLETE:
            return content, frames
        if isinstance(data.get("content"), str):
            content += data["content"]


async def main():
    assert requests.get(f"{BASE}/heartbeat").json() == {"status": "alive"}

    async with websockets.connect(WS) as ws:
        # The auth frame and the chunks right behind it: none of them is lost.
        await ws.send(json.dumps({"auth": KEY}))

        settings = {
            "llm": {"model": "gpt-4o-mini"},
            "messages": [
                {"role": "user", "type": "message", "content": "The secret word is 'crunk'."},
                {"role": "assistant", "type": "message", "content": "Understood."},
            ],
            "custom_instructions": "",
            "auto_run": True,
        }
        refused = requests.post(f"{BASE}/settings", json=settings, headers=HEADERS)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["param"] == "auto_run"
        del settings["auto_run"]
        response = requests.post(f"{BASE}/settings", json=settings, headers=HEADERS)
        assert response.json() == {"status": "success"}, response.text

        await send_message(ws, "What's the secret word?")
        assert await recv(ws) == {"auth": True}
        content, frames = await until_complete(ws)
        assert "crunk" in content, content
        assert frames[0] == {"role": "assistant", "type": "message", "start": True}, frames[0]
        assert frames[-2] == {"role": "assistant", "type": "message", "end": True}, frames[-2]
        report("plain", content=content, frames=frames)

        settings["messages"][0]["content"] = "The secret word is 'barloney'."
        response = requests.post(f"{BASE}/settings", json=settings, headers=HEADERS)
        assert response.status_code == 200, response.text
        await send_message(ws, "What's the secret word?")
        content, _ = await until_complete(ws)
        assert "barloney" in content, content
        report("reset", content=content)

        # auto_run is a tenant setting the socket's key changes through the native API.
        native = requests.patch(
            f"{os.environ['MAIN_URL']}/v1/settings", json={"auto_run": False}, headers={"Authorization": f"Bearer {KEY}"}
        )
        assert native.status_code == 200 and native.json()["auto_run"] is False, native.text
        assert requests.get(f"{BASE}/settings/auto_run", headers=HEADERS).json() == {"auto_run": False}
        response = requests.post(f"{BASE}/settings", json={"messages": [], "custom_instructions": ""}, headers=HEADERS)
        assert response.status_code == 200, response.text

        await send_message(ws, "What's 239023*79043? Use Python.")
        content, frames = await until_complete(ws)
        messages = requests.get(f"{BASE}/settings/messages", headers=HEADERS).json()["messages"]
        assert messages[-1]["type"] == "code", messages
        assert "18893094989" not in content.replace(",", "")
        report("awaiting", content=content, frames=frames, messages=messages)

        await ws.send(json.dumps({"role": "user", "type": "command", "start": True}))
        await ws.send(json.dumps({"role": "user", "type": "command", "content": "go"}))
        await ws.send(json.dumps({"role": "user", "type": "command", "end": True}))
        content, frames = await until_complete(ws)
        assert "18893094989" in content.replace(",", ""), content
        report("go", content=content, frames=frames)

        # A second go has nothing to approve.
        await ws.send(json.dumps({"role": "user", "type": "command", "start": True}))
        await ws.send(json.dumps({"role": "user", "type": "command", "content": "go"}))
        await ws.send(json.dumps({"role": "user", "type": "command", "end": True}))
        error = await recv(ws)
        assert error["role"] == "server" and error["type"] == "error", error
        assert await recv(ws) == COMPLETE
        report("nothing-to-go", error=error)

    # Acknowledgement mode, reading four frames and going away in the middle of the answer.
    poem = ""
    async with websockets.connect(WS + "?acknowledge=true") as ws:
        await ws.send(json.dumps({"auth": KEY}))
        assert await recv(ws) == {"auth": True}
        await send_message(ws, "Write a short poem about Seattle.")
        for _ in range(4):
            data = await recv(ws)
            await ws.send(json.dumps({"ack": data["id"]}))
            data.pop("id")
            assert data != COMPLETE, "It shouldn't have finished this soon"
            if isinstance(data.get("content"), str):
                poem += data["content"]
    first = poem
    async with websockets.connect(WS + "?acknowledge=true") as ws:
        await ws.send(json.dumps({"auth": KEY}))
        assert await recv(ws) == {"auth": True}
        content, frames = await until_complete(ws, ack=True)
        poem += content
    assert poem == os.environ["POEM"], (poem, os.environ["POEM"])
    report("reconnect", first=first, rest=content, frames=frames)

    # A wrong key: refused on the socket (also for every frame after it) and over HTTP.
    async with websockets.connect(WS) as ws:
        await ws.send(json.dumps({"auth": "wrong-key"}))
        assert await recv(ws) == {"auth": False}
        await send_message(ws, "hello")
        replies = [await recv(ws) for _ in range(3)]
        assert replies == [{"auth": False}] * 3, replies
    wrong = requests.get(f"{BASE}/settings/messages", headers={"X-API-KEY": "wrong-key"})
    assert wrong.status_code == 401, wrong.text
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    report("wrong-key", status=wrong.status_code, body=wrong.json())


asyncio.run(main())
sys.exit(0)
