"""The per-cell listener's frame deadline: it judges the guest, never our own backpressure."""

from __future__ import annotations

from producer.guest.listener import CellListener, GuestConnection


class Handler:
    cell_id = "cell-1"

    def on_outcomes(self, outcomes: list[object]) -> bool:
        return True

    def on_framing_error(self, error: object) -> None: ...

    def on_connection(self, opened: bool) -> None: ...


def listener_with_partial_frame(started: float) -> tuple[CellListener, GuestConnection]:
    listener = CellListener(Handler(), max_connections=4)  # type: ignore[arg-type]
    conn = GuestConnection(listener)
    listener.admit(conn)
    conn.partial_since = started
    return listener, conn


async def test_a_frame_held_unread_by_a_pause_does_not_expire() -> None:
    listener, conn = listener_with_partial_frame(CellListener.now() - 60)
    listener.pause()
    assert listener.expire_slow(5.0) == 0
    listener.resume()
    # Its deadline starts again when reading resumes, not when the frame began.
    assert conn.partial_since is not None and conn.partial_since >= CellListener.now() - 1
    assert listener.expire_slow(5.0) == 0
    assert listener.expired == 0


async def test_a_frame_that_outlives_the_deadline_while_read_expires() -> None:
    listener, conn = listener_with_partial_frame(CellListener.now() - 60)
    assert listener.expire_slow(5.0) == 1
    assert listener.expired == 1 and conn.partial_since is None
