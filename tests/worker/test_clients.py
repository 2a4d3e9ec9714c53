"""Real clients behave through the proxy as they do against RabbitMQ itself."""

from __future__ import annotations

import asyncio

import aio_pika
import pika
import pytest

from tests.conftest import proxy_params


@pytest.fixture
def channel(amqplexd):
    connection = pika.BlockingConnection(proxy_params(amqplexd.port))
    yield connection.channel()
    if connection.is_open:
        connection.close()


def test_declare_publish_get_round_trip(channel, queue_name):
    channel.queue_declare(queue_name)
    channel.basic_publish("", queue_name, b"hello", pika.BasicProperties(headers={"k": "v"}))
    method, properties, body = channel.basic_get(queue_name, auto_ack=True)
    assert body == b"hello"
    assert properties.headers == {"k": "v"}
    assert method.message_count == 0


def test_publisher_confirms_ack_every_publish(channel, queue_name):
    channel.queue_declare(queue_name)
    channel.confirm_delivery()
    for i in range(50):
        channel.basic_publish("", queue_name, str(i).encode())
    assert channel.queue_declare(queue_name, passive=True).method.message_count == 50


def test_mandatory_unroutable_publish_is_returned(channel):
    channel.confirm_delivery()
    with pytest.raises(pika.exceptions.UnroutableError):
        channel.basic_publish("", "no-such-queue-anywhere", b"x", mandatory=True)


def test_consume_with_ack_and_nack_requeue(channel, queue_name):
    channel.queue_declare(queue_name)
    channel.basic_qos(prefetch_count=1)
    for body in (b"a", b"b"):
        channel.basic_publish("", queue_name, body)
    seen = []
    for method, _, body in channel.consume(queue_name, inactivity_timeout=5):
        assert method is not None, "delivery did not arrive"
        seen.append((body, method.redelivered))
        if body == b"a" and not method.redelivered:
            channel.basic_nack(method.delivery_tag, requeue=True)
        else:
            channel.basic_ack(method.delivery_tag)
        if len(seen) == 3:
            break
    channel.cancel()
    assert seen[0] == (b"a", False)
    assert (b"a", True) in seen and (b"b", False) in seen


def test_transaction_commit_and_rollback(channel, queue_name):
    channel.queue_declare(queue_name)
    channel.tx_select()
    channel.basic_publish("", queue_name, b"rolled back")
    channel.tx_rollback()
    channel.basic_publish("", queue_name, b"committed")
    channel.tx_commit()
    method, _, body = channel.basic_get(queue_name, auto_ack=True)
    assert body == b"committed"
    assert method.message_count == 0


def test_large_message_survives_split_into_frames(channel, queue_name):
    channel.queue_declare(queue_name)
    payload = bytes(range(256)) * 4000  # ~1 MB: many body frames each way
    channel.basic_publish("", queue_name, payload)
    _, _, body = channel.basic_get(queue_name, auto_ack=True)
    assert body == payload


def test_aio_pika_publish_consume_with_confirms(amqplexd, queue_name):
    async def scenario() -> list[bytes]:
        connection = await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:{amqplexd.port}/")
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            queue = await channel.declare_queue(queue_name)
            for i in range(20):
                await channel.default_exchange.publish(
                    aio_pika.Message(str(i).encode()), routing_key=queue_name
                )
            got = []
            async with queue.iterator() as messages:
                async for message in messages:
                    async with message.process():
                        got.append(message.body)
                    if len(got) == 20:
                        break
            return got

    assert asyncio.run(asyncio.wait_for(scenario(), 30)) == [str(i).encode() for i in range(20)]
