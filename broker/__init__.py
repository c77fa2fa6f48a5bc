"""mqttalk's embedded MQTT broker: amqtt with the configuration mqttalk needs.

Installed as the ``mqttalk_broker`` package. It is only imported by ``mqttalk broker`` and by the
test fixtures, never on a client command's path (amqtt pulls in asyncio, websockets, yaml...).

amqtt 0.12 traps this module handles:

* Anonymous sessions never get offline QoS 1 messages queued. :class:`QueueingAuthPlugin`
  admits every client *without* marking its session anonymous, so persistent sessions queue.
* amqtt falls short of MQTT 3.1.1 in many ways (keepalive never enforced, so no will for a stalled
  client; in-flight QoS 1/2 messages dropped instead of resent with DUP on reconnect; messages at the
  subscription's QoS instead of the lower one; queued messages with RETAIN set; ...) and has no
  limits. :mod:`mqttalk_broker._conformance` fixes each (see its docstring) and applies the
  ``limits`` section of mqttalk-broker.yaml (packet size, queue per absent session, CONNECT timeout).
* :mod:`mqttalk_broker._fixes` stops amqtt from sending a connecting client the retained messages of
  filters other clients hold, and hands a session over cleanly when its client reconnects while
  amqtt still closes its old connection (a take-over).
* Everything lives in memory. :mod:`mqttalk_broker.persistence` keeps sessions, offline queues and
  retained messages in SQLite so a restart loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

__all__ = ["broker_config", "run", "serve"]

CONFIG_FILE = Path(__file__).with_name("mqttalk-broker.yaml")


def broker_config(
    host: str = "127.0.0.1",
    port: int = 1884,
    *,
    ws_port: int | None = None,
    config_file: Path | None = None,
    db: Path | None = None,
) -> dict[str, Any]:
    """The broker's configuration dict: the YAML file's settings with the listener(s) and the
    persistence database (``db``; None keeps everything in memory) filled in. Its ``limits`` section is
    mqttalk's own (:class:`mqttalk_broker._conformance.Limits`); :func:`serve` takes it out before
    handing the rest to amqtt."""
    import yaml

    config: dict[str, Any] = yaml.safe_load((config_file or CONFIG_FILE).read_text())
    if db is not None:
        config.setdefault("plugins", {})["mqttalk_broker.persistence.SQLitePersistencePlugin"] = {"file": str(db)}
    listeners: dict[str, Any] = {"default": {"type": "tcp", "bind": f"{host}:{port}"}}
    if ws_port is not None:
        listeners["ws"] = {"type": "ws", "bind": f"{host}:{ws_port}"}
    config["listeners"] = listeners
    return config


async def serve(
    config: dict[str, Any], started: asyncio.Event | None = None, stop: asyncio.Event | None = None
) -> None:
    """Run an amqtt broker with ``config`` (from :func:`broker_config`) until ``stop`` is set (or forever)."""
    from amqtt.broker import Broker

    from . import _conformance, _durable, _fixes

    config = dict(config)
    limits = _conformance.Limits.from_config(config.pop("limits", None))
    _fixes.install()
    _conformance.install(limits)
    _durable.install()  # last: it wraps what the two above put in place
    broker = Broker(config)
    await broker.start()
    if started is not None:
        started.set()
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        await broker.shutdown()


def run(
    host: str = "127.0.0.1",
    port: int = 1884,
    *,
    ws_port: int | None = None,
    config_file: Path | None = None,
    db: Path | None = None,
    ready: Any = None,
) -> None:
    """Run the broker in the foreground until SIGINT/SIGTERM. ``ready()`` is called once listening."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # amqtt logs every connect/disconnect at INFO and a stack trace for every client that drops
    # its socket without DISCONNECT (which one-shot CLI processes legitimately do on errors).
    # MQTTALK_BROKER_LOG=WARNING (or DEBUG) shows them when debugging the broker itself.
    logging.getLogger("amqtt").setLevel(os.environ.get("MQTTALK_BROKER_LOG", "CRITICAL").upper())
    logging.getLogger("transitions").setLevel(logging.WARNING)
    config = broker_config(host, port, ws_port=ws_port, config_file=config_file, db=db)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        started = asyncio.Event()
        task = asyncio.create_task(serve(config, started, stop))
        waiter = asyncio.create_task(started.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises the start error
        if ready is not None:
            ready()
        await task

    asyncio.run(main())
