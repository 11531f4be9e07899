"""The greeter: a person counts its visits, and a greeter greets it through egress.

Run it with the embedded defaults (one local peer, state in a temporary directory):

    python -m examples.greeter            # greets a few people, prints the egress
    python -m examples.greeter --state-dir ./greeter-state   # state that survives runs
"""

from __future__ import annotations

import argparse
import asyncio

from statefun_mesh import (
    IntType,
    LocalMesh,
    StatefulFunctions,
    StringType,
    ValueSpec,
    egress_message_builder,
    make_json_type,
    message_builder,
)

GREET_REQUEST = make_json_type("example/GreetRequest")
GREETINGS = "example/greetings"

functions = StatefulFunctions()


@functions.bind(typename="example/person", specs=[ValueSpec(name="visits", type=IntType)])
def person(context, message):
    """Counts this person's visits and asks the greeter to greet them."""
    visits = (context.storage.visits or 0) + 1
    context.storage.visits = visits
    context.send(
        message_builder(
            target_typename="example/greeter",
            target_id=context.address.id,
            value={"name": message.as_string(), "visits": visits},
            value_type=GREET_REQUEST,
        )
    )


@functions.bind(typename="example/greeter")
def greeter(context, message):
    """Turns a visit count into a greeting, sent to the egress (and to a waiting client)."""
    request = message.as_type(GREET_REQUEST)
    greeting = compute_greeting(request["name"], request["visits"])
    context.send_egress(egress_message_builder(target_typename=GREETINGS, value=greeting, value_type=StringType))
    context.reply(str_value=greeting)


def compute_greeting(name: str, visits: int) -> str:
    templates = ["", "Welcome {}", "Nice to see you again {}", "Third time is a charm {}"]
    if visits < len(templates):
        return templates[visits].format(name)
    return f"Nice to see you for the {visits}th time, {name}!"


async def main(state_dir: str | None, people: list[str]) -> None:
    async with LocalMesh(functions, state_dir=state_dir) as mesh:
        greetings = mesh.egress(GREETINGS, start="latest")
        for name in people:
            await mesh.send(message_builder(target_typename="example/person", target_id=name, str_value=name))
        reply = await mesh.request(
            message_builder(target_typename="example/person", target_id=people[0], str_value=people[0])
        )
        count = 0
        async for record in greetings:
            print(f"egress {record.typename} #{record.offset}: {record.as_string()}")
            count += 1
            if count == len(people) + 1:
                break
        print(f"request -> reply: {reply.as_string()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Greet some people on a local statefun_mesh.")
    parser.add_argument("--state-dir", default=None, help="keep state here (default: a temporary directory)")
    parser.add_argument("people", nargs="*", default=["Alice", "Bob", "Alice", "Carol", "Alice"])
    args = parser.parse_args()
    asyncio.run(main(args.state_dir, args.people))
