"""Functions of the idle-timer test (``tests.integration.timer_app:functions``): a scheduler
whose delayed messages are cancelled before they are due."""

from __future__ import annotations

from datetime import timedelta

from statefun_mesh import StatefulFunctions, message_builder

functions = StatefulFunctions()


@functions.bind(typename="it/sched")
def sched(context, message):
    """``"schedule:<token>"`` sends a message to ``it/sink`` in 200 ms; ``"cancel:<token>"`` cancels it."""
    op, token = message.as_string().split(":", 1)
    if op == "schedule":
        context.send_after(
            timedelta(milliseconds=200),
            message_builder(target_typename="it/sink", target_id="s", str_value=token),
            cancellation_token=token,
        )
    else:
        context.cancel_delayed_message(token)


@functions.bind(typename="it/sink")
def sink(context, message):
    raise AssertionError(f"cancelled timer {message.as_string()} fired")
