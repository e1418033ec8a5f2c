"""The bundled demo task: customer-support triage.

A customer message goes in, a one-line JSON answer comes out:

    {"intent": "cancel_order", "order_id": "ORD-48213", "product": "coffee grinder",
     "date": "03/14", "urgency": "high"}

Every field follows from the message: the intent from its wording, the entities are copied from it
(``null`` when absent) and the urgency from urgency markers. Many paraphrase templates, openers, closers
and entity values make memorising insufficient. Generation is deterministic by seed.

The ``hard`` variant writes longer messages with several products and order ids, only one of which is
the subject (the one the intent is about), so a model must find the right entity, not just copy one.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

FIELDS = ("intent", "order_id", "product", "date", "urgency")

# intent -> templates; slots: {order} {product} {date}
TEMPLATES: dict[str, list[str]] = {
    "cancel_order": [
        "Please cancel my order {order} for the {product}.",
        "I want to cancel order {order}, I no longer need the {product}.",
        "Can you cancel {order}? I ordered a {product} by mistake.",
        "Cancel the {product} order {order} please.",
        "I changed my mind about the {product}, please cancel order {order}.",
        "Stop order {order} before it ships, I do not want the {product} anymore.",
    ],
    "track_order": [
        "Where is my order {order}? The {product} has not arrived.",
        "Can you tell me the status of order {order} for a {product}?",
        "I am still waiting for my {product}, order {order}. Where is it?",
        "Tracking for {order} has not updated since {date}. It is a {product}.",
        "When will order {order} arrive? I ordered a {product}.",
        "Has my {product} shipped yet? Order number {order}.",
    ],
    "refund_request": [
        "I want a refund for the {product} from order {order}.",
        "Please refund order {order}, the {product} was not what I expected.",
        "Can I get my money back for the {product}? Order {order}.",
        "I returned the {product} on {date} but have not been refunded for order {order}.",
        "Refund please for {order}, the {product} stopped working.",
    ],
    "return_item": [
        "How do I return the {product} from order {order}?",
        "I would like to send back the {product}, order {order}.",
        "I need a return label for order {order}, the {product} does not fit.",
        "Can I return a {product} I bought on {date}? Order {order}.",
        "I want to return the {product}. My order is {order}.",
    ],
    "damaged_item": [
        "My {product} arrived broken. Order {order}.",
        "The {product} in order {order} was damaged in shipping.",
        "Order {order} came today and the {product} is cracked.",
        "The box for {order} was crushed and the {product} inside is damaged.",
        "I received the {product} on {date} and it was smashed. Order {order}.",
    ],
    "wrong_item": [
        "I ordered a {product} but got something else. Order {order}.",
        "Order {order} contained the wrong item instead of my {product}.",
        "You sent me the wrong product, I expected a {product} in order {order}.",
        "This is not the {product} I ordered. Order number {order}.",
        "Order {order} arrived on {date} with a different item, not the {product}.",
    ],
    "missing_item": [
        "Order {order} arrived but the {product} was missing from the box.",
        "The {product} is missing from my package, order {order}.",
        "I only got part of order {order}, there was no {product}.",
        "My delivery on {date} for {order} did not include the {product}.",
    ],
    "change_address": [
        "I need to change the shipping address for order {order}.",
        "Please update the delivery address on {order}, I moved.",
        "Can you ship order {order} with the {product} to my new address?",
        "Wrong address on order {order}. Can you fix it before {date}?",
        "Send the {product} in order {order} to my office instead of home.",
    ],
    "billing_issue": [
        "I was charged twice for order {order}.",
        "My card was billed the wrong amount for the {product}, order {order}.",
        "There is an unknown charge from {date} on my statement for order {order}.",
        "Why was I charged extra for the {product}? Order {order}.",
        "The invoice for order {order} shows the wrong price for the {product}.",
    ],
    "product_question": [
        "Does the {product} come with a warranty?",
        "Is the {product} compatible with my older model?",
        "What are the dimensions of the {product}?",
        "Can the {product} be used outdoors?",
        "Is the {product} back in stock before {date}?",
        "How long does the battery of the {product} last?",
    ],
    "account_access": [
        "I cannot log in to my account.",
        "I forgot my password and the reset email never came.",
        "My account is locked since {date}, please help.",
        "I cannot sign in to check order {order}.",
        "The login page keeps saying my password is wrong.",
    ],
    "warranty_claim": [
        "My {product} stopped working after two months, I want to use the warranty.",
        "I need a warranty repair for the {product} from order {order}.",
        "The {product} I bought on {date} broke, is it under warranty?",
        "Please start a warranty claim for my {product}, order {order}.",
    ],
}

INTENTS = tuple(TEMPLATES)

PRODUCTS = [
    "wireless earbuds", "coffee grinder", "standing desk", "yoga mat", "phone case", "air fryer",
    "laptop stand", "desk lamp", "water bottle", "gaming mouse", "mechanical keyboard", "smart watch",
    "electric kettle", "hiking boots", "rain jacket", "bluetooth speaker", "office chair", "blender",
    "backpack", "sunglasses", "usb hub", "webcam", "toaster", "vacuum cleaner", "hair dryer",
    "tablet cover", "baby monitor", "camping tent", "road bike helmet", "pressure cooker",
    "noise cancelling headphones", "robot vacuum", "portable charger", "dash cam", "ceiling fan",
    "sewing machine", "drone", "monitor arm", "fitness tracker", "rice cooker",
]

OPENERS = ["", "", "Hi,", "Hello,", "Hi there,", "Good morning,", "Dear support,", "Hey,", "Hello team,"]
CLOSERS = ["", "", "Thanks.", "Thank you.", "Regards.", "Thanks in advance.", "Cheers."]
HIGH = ["This is urgent.", "Please help ASAP!", "I need this fixed today.", "URGENT:", "Please respond immediately."]
LOW = ["No rush.", "Whenever you have time.", "Not urgent.", "When you get a chance."]
FILLERS = [
    "I have been a customer for years.", "I tried the help page already.", "My neighbour had the same problem.",
    "I called yesterday but nobody answered.", "The app did not help.", "I am quite disappointed.",
]


@dataclass(frozen=True)
class Example:
    message: str
    answer: dict

    @property
    def answer_text(self) -> str:
        return format_answer(self.answer)


def format_answer(answer: dict) -> str:
    """The canonical one-line JSON answer (fixed key order, compact)."""
    return json.dumps({k: answer.get(k) for k in FIELDS}, separators=(", ", ": "))


def _order_id(rng: random.Random) -> str:
    style = rng.random()
    digits = "".join(rng.choice("0123456789") for _ in range(rng.choice([5, 6])))
    if style < 0.5:
        return f"ORD-{digits}"
    if style < 0.8:
        return f"#{digits}"
    return f"A{digits}"


def _date(rng: random.Random) -> str:
    """A date as customers type it in forms, MM/DD (copied digit by digit into the answer)."""
    return f"{rng.randint(1, 12):02d}/{rng.randint(1, 28):02d}"


def make_example(rng: random.Random, hard: bool = False, intent: str | None = None) -> Example:
    intent = intent or rng.choice(INTENTS)
    template = rng.choice(TEMPLATES[intent])
    order, product, date = _order_id(rng), rng.choice(PRODUCTS), _date(rng)
    body = template.format(order=order, product=product, date=date)
    answer = {
        "intent": intent,
        "order_id": order if "{order}" in template else None,
        "product": product if "{product}" in template else None,
        "date": date if "{date}" in template else None,
    }
    u = rng.random()
    urgency, marker = ("high", rng.choice(HIGH)) if u < 0.25 else ("low", rng.choice(LOW)) if u < 0.4 else ("normal", "")
    answer["urgency"] = urgency
    parts = [rng.choice(OPENERS)]
    if marker and rng.random() < 0.5:
        parts += [marker, body]
    else:
        parts += [body, marker]
    if hard:
        # distractors: other orders and products the customer mentions in passing
        other_order, other_product = _order_id(rng), rng.choice([p for p in PRODUCTS if p != product])
        distractor = rng.choice([
            f"My earlier order {other_order} was fine.",
            f"I also bought a {other_product} last month and love it.",
            f"Last year I returned a {other_product} with order {other_order} without trouble.",
        ])
        parts.insert(rng.randint(1, len(parts)), distractor)
        parts.insert(rng.randint(1, len(parts)), rng.choice(FILLERS))
    parts.append(rng.choice(CLOSERS))
    message = " ".join(p for p in parts if p)
    return Example(message=message, answer=answer)


def generate(n: int, seed: int = 0, hard: bool = False) -> list[Example]:
    """`n` examples, deterministic for a given seed (and distinct messages)."""
    rng = random.Random(f"slmops-demo-{seed}-{'hard' if hard else 'base'}")
    seen: set[str] = set()
    out: list[Example] = []
    while len(out) < n:
        ex = make_example(rng, hard=hard)
        if ex.message in seen:
            continue
        seen.add(ex.message)
        out.append(ex)
    return out


def to_chat_row(ex: Example) -> dict:
    return {"messages": [{"role": "user", "content": ex.message},
                         {"role": "assistant", "content": ex.answer_text}]}


@dataclass(frozen=True)
class DemoSizes:
    train: int = 4000
    val: int = 300
    test: int = 300
    prompts: int = 2000
    gold: int = 40  # a small labelled set, as a user typically has (2% of the prompts)


def write_demo_data(out_dir: str | Path, seed: int = 0, sizes: DemoSizes = DemoSizes(), hard: bool = False) -> dict:
    """Write train/val/test (chat JSONL), unlabeled prompts and a small gold set; return their paths.

    The splits are disjoint by message text. Prompts carry no answer (for distillation); `gold.jsonl` is
    a small labelled set disjoint from the test split.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    total = sizes.train + sizes.val + sizes.test + sizes.prompts + sizes.gold
    examples = generate(total, seed=seed, hard=hard)
    cuts = {}
    start = 0
    for name, count in (("train", sizes.train), ("val", sizes.val), ("test", sizes.test),
                        ("prompts", sizes.prompts), ("gold", sizes.gold)):
        cuts[name] = examples[start:start + count]
        start += count
    paths = {}
    for name, rows in cuts.items():
        path = out / f"{name}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for ex in rows:
                row = {"prompt": ex.message} if name == "prompts" else to_chat_row(ex)
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        paths[name] = str(path)
    return paths
