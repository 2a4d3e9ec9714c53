import asyncio

import uvloop

from amqplex.worker.deadlines import HandshakeDeadlines

TIMEOUT = 0.05


class Client:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.expired = loop.create_future()

    def handshake_timed_out(self) -> None:
        assert not self.expired.done(), "told twice"
        self.expired.set_result(self.loop.time())


def run(test) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(test())


def test_clients_expire_in_arrival_order_each_at_its_own_deadline():
    async def test():
        loop = asyncio.get_running_loop()
        deadlines = HandshakeDeadlines(loop, TIMEOUT)
        now = loop.time()
        first, second, third = Client(loop), Client(loop), Client(loop)
        deadlines.add(first, now - 0.04)
        deadlines.add(second, now)
        deadlines.add(third, now + 0.03)
        times = await asyncio.wait_for(
            asyncio.gather(first.expired, second.expired, third.expired), 5
        )
        for arrived, expired in zip((now - 0.04, now, now + 0.03), times, strict=True):
            assert expired >= arrived + TIMEOUT - 0.001
        assert times == sorted(times)
        assert len(deadlines) == 0

    run(test)


def test_a_discarded_client_never_expires():
    async def test():
        loop = asyncio.get_running_loop()
        deadlines = HandshakeDeadlines(loop, TIMEOUT)
        now = loop.time()
        done, waiting = Client(loop), Client(loop)
        deadlines.add(done, now)
        deadlines.add(waiting, now + 0.02)
        deadlines.discard(done)
        expired = await asyncio.wait_for(waiting.expired, 5)
        assert expired >= now + TIMEOUT  # past the discarded one's deadline too
        assert not done.expired.done()

    run(test)


def test_a_client_arriving_after_the_queue_emptied_gets_its_timeout():
    async def test():
        loop = asyncio.get_running_loop()
        deadlines = HandshakeDeadlines(loop, TIMEOUT)
        early = Client(loop)
        deadlines.add(early, loop.time())
        await asyncio.wait_for(early.expired, 5)
        late = Client(loop)
        arrived = loop.time()
        deadlines.add(late, arrived)
        expired = await asyncio.wait_for(late.expired, 5)
        assert expired >= arrived + TIMEOUT - 0.001

    run(test)
