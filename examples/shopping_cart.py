"""A shopping cart: user baskets and stock functions answering each other via ``caller``.

- ``example/stock`` (id: item) keeps the quantity on hand. ``restock`` adds to it; a
  ``request-item`` from a cart reserves stock if there is enough and answers the cart
  (its ``context.caller``) with the item's availability.
- ``example/user-shopping-cart`` (id: user) asks the stock when an item is added, puts
  the item in the basket only if the stock answered "in stock", and on ``checkout``
  emits a receipt to the egress and answers the client's request with it.

    python -m examples.shopping_cart
"""

from __future__ import annotations

import asyncio
from typing import Any

from statefun_mesh import (
    IntType,
    LocalMesh,
    StatefulFunctions,
    ValueSpec,
    egress_message_builder,
    make_json_type,
    message_builder,
)

# One JSON type per message kind, so functions dispatch on the value's type name.
RESTOCK = make_json_type("example/RestockItem")
REQUEST_ITEM = make_json_type("example/RequestItem")
AVAILABILITY = make_json_type("example/ItemAvailability")
ADD_TO_CART = make_json_type("example/AddToCart")
CHECKOUT = make_json_type("example/Checkout")
VIEW = make_json_type("example/ViewCart")
BASKET = make_json_type("example/Basket")
RECEIPT = make_json_type("example/Receipt")
RECEIPTS = "example/receipts"

functions = StatefulFunctions()


@functions.bind(typename="example/stock", specs=[ValueSpec(name="quantity", type=IntType)])
def stock(context, message):
    quantity = context.storage.quantity or 0
    if message.is_type(RESTOCK):
        context.storage.quantity = quantity + message.as_type(RESTOCK)["quantity"]
        if context.in_request:
            context.reply(int_value=context.storage.quantity)
    elif message.is_type(REQUEST_ITEM):
        wanted = message.as_type(REQUEST_ITEM)["quantity"]
        in_stock = wanted <= quantity
        if in_stock:
            context.storage.quantity = quantity - wanted
        caller = context.caller
        context.send(
            message_builder(
                target_typename=caller.typename,
                target_id=caller.id,
                value={"item": context.address.id, "quantity": wanted, "in_stock": in_stock},
                value_type=AVAILABILITY,
            )
        )
    else:
        raise TypeError(f"stock does not understand {message.value_typename()}")


@functions.bind(typename="example/user-shopping-cart", specs=[ValueSpec(name="basket", type=BASKET)])
def user_shopping_cart(context, message):
    basket: dict[str, Any] = context.storage.basket or {}
    if message.is_type(ADD_TO_CART):
        add = message.as_type(ADD_TO_CART)
        context.send(
            message_builder(
                target_typename="example/stock",
                target_id=add["item"],
                value={"quantity": add["quantity"]},
                value_type=REQUEST_ITEM,
            )
        )
    elif message.is_type(AVAILABILITY):
        availability = message.as_type(AVAILABILITY)
        if availability["in_stock"]:
            item = availability["item"]
            basket[item] = basket.get(item, 0) + availability["quantity"]
            context.storage.basket = basket
        context.reply(value=availability, value_type=AVAILABILITY)
    elif message.is_type(VIEW):
        context.reply(value=basket, value_type=BASKET)
    elif message.is_type(CHECKOUT):
        receipt = {"user": context.address.id, "items": basket}
        context.send_egress(egress_message_builder(target_typename=RECEIPTS, value=receipt, value_type=RECEIPT))
        del context.storage.basket
        context.reply(value=receipt, value_type=RECEIPT)
    else:
        raise TypeError(f"cart does not understand {message.value_typename()}")


def cart_message(user: str, value: dict[str, Any], value_type: Any):
    return message_builder(
        target_typename="example/user-shopping-cart", target_id=user, value=value, value_type=value_type
    )


async def main() -> None:
    async with LocalMesh(functions) as mesh:
        for item, qty in [("socks", 3), ("hat", 1)]:
            await mesh.send(
                message_builder(
                    target_typename="example/stock", target_id=item, value={"quantity": qty}, value_type=RESTOCK
                )
            )
        for item, qty in [("socks", 2), ("hat", 1), ("socks", 2)]:
            answer = await mesh.request(cart_message("ann", {"item": item, "quantity": qty}, ADD_TO_CART))
            print(f"add {qty} x {item}: {'in stock' if answer.as_type(AVAILABILITY)['in_stock'] else 'out of stock'}")
        receipt = await mesh.request(cart_message("ann", {}, CHECKOUT))
        print(f"checkout: {receipt.as_type(RECEIPT)}")


if __name__ == "__main__":
    asyncio.run(main())
