"""A recording TCP proxy (stdlib asyncio) to put between a caller and a relay.

    tap = Tap("127.0.0.1", relay_port).start()   # listens on tap.port, in a thread
    ... point the caller at ws://127.0.0.1:{tap.port} ...
    tap.stop()
    tap.raw             # every byte, both directions, as it travelled
    tap.messages()      # the WebSocket messages' payloads, unmasked and inflated

What a caller sends is masked (RFC 6455 requires it of clients) and may be compressed
(permessage-deflate), so a search of the raw bytes alone would miss a clear-text prompt
and prove nothing; `messages()` decodes the frames of each direction so that a search
there finds whatever the relay could read.
"""

import asyncio
import re
import struct
import threading
import zlib


class Tap:
    def __init__(self, target_host, target_port, port=0):
        self.target = (target_host, target_port)
        self.port = port  # 0: a free one, read back after start()
        self._conns = []  # per connection: {"up": bytearray, "down": bytearray}
        self._loop = None
        self._server = None
        self._thread = None
        self._ready = threading.Event()

    # --- running ---

    def start(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("the tap did not start")
        return self

    def _run(self):
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)

        async def open_server():
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()

        self._loop.run_until_complete(open_server())
        self._loop.run_forever()
        self._loop.close()

    def stop(self):
        if self._loop is None:
            return

        async def close():
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        fut = asyncio.run_coroutine_threadsafe(close(), self._loop)
        try:
            fut.result(5)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop = None

    async def _handle(self, c_reader, c_writer):
        rec = {"up": bytearray(), "down": bytearray()}
        self._conns.append(rec)
        try:
            r_reader, r_writer = await asyncio.open_connection(*self.target)
        except OSError:
            c_writer.close()
            return

        async def pipe(reader, writer, buf):
            try:
                while True:
                    data = await reader.read(65536)
                    if not data:
                        break
                    buf.extend(data)
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                try:
                    writer.close()
                except Exception:
                    pass

        try:
            await asyncio.gather(pipe(c_reader, r_writer, rec["up"]),
                                 pipe(r_reader, c_writer, rec["down"]), return_exceptions=True)
        except asyncio.CancelledError:
            # stop(): end quietly (a handler task that ends cancelled is logged by
            # asyncio's stream server as an error).
            pass

    # --- what was seen ---

    @property
    def raw(self) -> bytes:
        return b"".join(bytes(c["up"]) + bytes(c["down"]) for c in self._conns)

    def connections(self):
        return len(self._conns)

    def messages(self):
        """[(direction, bytes)] of every WebSocket message seen, decoded."""
        out = []
        for c in self._conns:
            for direction in ("up", "down"):
                for payload in _ws_messages(bytes(c[direction])):
                    out.append((direction, payload))
        return out

    def frame_types(self):
        """The `type` of each JSON message, in order per connection and direction."""
        types = []
        for direction, payload in self.messages():
            m = re.search(rb'"type"\s*:\s*"([A-Za-z_]+)"', payload)
            types.append((direction, m.group(1).decode() if m else "?"))
        return types

    def contains(self, needle: bytes) -> bool:
        """Whether `needle` is anywhere the relay could read it (raw or decoded)."""
        return needle in self.raw or any(needle in p for _, p in self.messages())


def _ws_messages(stream: bytes):
    """The messages of one direction of a WebSocket connection (after its HTTP head)."""
    head_end = stream.find(b"\r\n\r\n")
    if head_end < 0:
        return [stream] if stream else []
    head = stream[:head_end].decode("latin-1").lower()
    deflate = "permessage-deflate" in head  # both heads name it when it is agreed
    data = stream[head_end + 4:]
    if not head.startswith(("get ", "http/1.1 101")):
        return [stream[head_end + 4:]]  # plain HTTP (e.g. the directory): its body
    inflater = zlib.decompressobj(-15) if deflate else None
    messages, pieces, compressed, i = [], [], False, 0
    while i + 2 <= len(data):
        b0, b1 = data[i], data[i + 1]
        fin, rsv1, opcode = b0 & 0x80, b0 & 0x40, b0 & 0x0F
        masked, length = b1 & 0x80, b1 & 0x7F
        i += 2
        if length == 126:
            if i + 2 > len(data):
                break
            length = struct.unpack(">H", data[i:i + 2])[0]
            i += 2
        elif length == 127:
            if i + 8 > len(data):
                break
            length = struct.unpack(">Q", data[i:i + 8])[0]
            i += 8
        key = b""
        if masked:
            key = data[i:i + 4]
            i += 4
        payload = data[i:i + length]
        i += length
        if masked and key:
            payload = bytes(b ^ key[n % 4] for n, b in enumerate(payload))
        if opcode in (0x1, 0x2):
            pieces, compressed = [payload], bool(rsv1)
        elif opcode == 0x0:
            pieces.append(payload)
        else:
            continue  # control frames: close, ping, pong
        if fin:
            body = b"".join(pieces)
            if compressed and inflater is not None:
                try:
                    body = inflater.decompress(body + b"\x00\x00\xff\xff")
                except zlib.error:
                    pass
            messages.append(body)
            pieces = []
    return messages
