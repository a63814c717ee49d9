#!/usr/bin/env python3
"""Real QUIC peers for tests/e2e_quic.rs, on aioquic.

server ADDR... --port P
    Serves QUIC on every ADDR:P (ALPN "tproxyd-e2e", versions 1 and 2, a
    throwaway self-signed certificate). On each stream it answers
    "peer=ADDR:PORT\\n" (the client address it saw) followed by the bytes
    received, then ends the stream. Prints "ready" once listening.

client --host H --port P --sni NAME [--version 1|2] [--big] [--timeout S]
    One connection and one request; prints one JSON line: the reply, the
    QUIC version used and the milliseconds to the reply. --big adds
    aioquic's 1,200-byte "quantum readiness" transport parameter, so the
    ClientHello spans two Initial packets in two datagrams, as Chrome's
    with a post-quantum key share does. Exit 2 on timeout.
"""

import argparse
import asyncio
import datetime
import json
import ssl
import sys
import time

from aioquic.asyncio import QuicConnectionProtocol, connect, serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import StreamDataReceived
from aioquic.quic.packet import QuicProtocolVersion
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ALPN = "tproxyd-e2e"


class Echo(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._streams = {}

    def quic_event_received(self, event):
        if not isinstance(event, StreamDataReceived):
            return
        data = self._streams.get(event.stream_id, b"") + event.data
        self._streams[event.stream_id] = data
        if not event.end_stream:
            return
        host, port = self._quic._network_paths[0].addr[:2]
        if host.startswith("::ffff:"):
            host = host[len("::ffff:"):]
        peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        reply = f"peer={peer}\n".encode() + data
        self._quic.send_stream_data(event.stream_id, reply, end_stream=True)
        self.transmit()


def self_signed():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tproxyd-e2e")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert, key


async def run_server(addrs, port):
    config = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
    config.certificate, config.private_key = self_signed()
    for addr in addrs:
        await serve(addr, port, configuration=config, create_protocol=Echo)
    print("ready", flush=True)
    await asyncio.Future()


async def request(args):
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN],
        server_name=args.sni,
        verify_mode=ssl.CERT_NONE,
        quantum_readiness_test=args.big,
    )
    if args.version == 2:
        config.supported_versions = [QuicProtocolVersion.VERSION_2]
    started = time.perf_counter()
    async with connect(args.host, args.port, configuration=config) as client:
        reader, writer = await client.create_stream()
        writer.write(b"quic echo me")
        writer.write_eof()
        reply = await reader.read()
        ms = (time.perf_counter() - started) * 1000
        return {"reply": reply.decode(), "version": client._quic._version, "ms": ms}


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("server")
    s.add_argument("addrs", nargs="+")
    s.add_argument("--port", type=int, required=True)
    c = sub.add_parser("client")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--sni", required=True)
    c.add_argument("--version", type=int, default=1, choices=[1, 2])
    c.add_argument("--big", action="store_true")
    c.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args()
    if args.mode == "server":
        asyncio.run(run_server(args.addrs, args.port))
        return
    try:
        out = asyncio.run(asyncio.wait_for(request(args), args.timeout))
    except (asyncio.TimeoutError, ConnectionError) as e:
        print(json.dumps({"error": type(e).__name__}), flush=True)
        sys.exit(2)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
