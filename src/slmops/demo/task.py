"""The bundled demo task: customer-support triage.

A customer message goes in, a one-line JSON answer comes out:

    {"intent": "cancel_order", "order_id": "ORD-48213", "product": "coffee grinder",
     "date": "03/14", "urgency": "high"}

Every field follows from the message: the intent from its wording, the entities are copied from it
(``null`` when absent) and the urgency from urgency markers. Many paraphrase templates, openers, closers
and entity values make memorising insufficient. Generation is deterministic by seed.

The ``hard`` variant writes longer messages with several products and order ids, only one of which is
the subject (the one the intent is about), so a model must find the right entity, not just copy one.

Fine-tuning extensions (:data:`EXTENSION_TASKS`) add intent families the base task (and the bundled
teacher, trained on the 12 base intents only) never saw, with the same JSON schema: ``gifts``
(``gift_card``, ``price_match``) and ``subscriptions`` (``pause_subscription``, ``loyalty_points``).
:func:`write_finetune_data` writes a fine-tuning set for one of them, with base-task replay against
forgetting and a base-task test split to measure it. The base generator never draws extension intents.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from slmops.errors import BadInputError

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

INTENTS = tuple(TEMPLATES)  # the 12 base intents (what `generate` draws from); keep this order

# Fine-tuning extensions: task -> intent -> templates (same slots and JSON schema as the base task). They
# live apart from TEMPLATES so that the base generator (and every seed's data) stays exactly as it was.
EXTENSION_TEMPLATES: dict[str, dict[str, list[str]]] = {
    "gifts": {
        "gift_card": [
            "My gift card does not work at checkout for order {order}.",
            "How do I redeem the gift card I got with order {order}?",
            "I want to buy a gift card for a friend who wants a {product}.",
            "The gift card balance was not applied to my {product} in order {order}.",
            "Can I pay for the {product} with a gift card that expires on {date}?",
            "I never received the e-gift card I bought on {date}. Order {order}.",
        ],
        "price_match": [
            "I saw the {product} cheaper at another store, can you match the price? Order {order}.",
            "The {product} dropped in price on {date}, can I get the difference back for order {order}?",
            "Do you price match? Another shop sells the {product} for less.",
            "Please match the lower price for the {product} I bought in order {order}.",
            "The {product} went on sale right after I ordered it (order {order}). Can you adjust the price?",
            "Will you pay the price difference if the {product} gets cheaper before {date}?",
        ],
    },
    "subscriptions": {
        "pause_subscription": [
            "Please pause my {product} subscription until {date}.",
            "Can I skip the next delivery of my {product} subscription?",
            "I am travelling, can you put my subscription on hold until {date}?",
            "Pause the subscription from order {order} for now, I have enough.",
            "I want to pause the recurring delivery of the {product} from order {order} for two months.",
            "How do I temporarily stop my {product} subscription without ending it?",
        ],
        "loyalty_points": [
            "My loyalty points for order {order} were never added.",
            "How many reward points do I have left?",
            "Can I use my loyalty points to pay for the {product}?",
            "The points from my purchase on {date} are missing. Order {order}.",
            "I did not get reward points for the {product} in order {order}.",
            "When do my loyalty points expire? I want to use them before {date}.",
        ],
    },
}
EXTENSION_TASKS: dict[str, tuple[str, ...]] = {task: tuple(t) for task, t in EXTENSION_TEMPLATES.items()}
# every intent that `make_example(..., intent=...)` accepts: the base ones, then the extensions'
ALL_TEMPLATES: dict[str, list[str]] = {**TEMPLATES, **{i: t for ts in EXTENSION_TEMPLATES.values() for i, t in ts.items()}}

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
    """One example; `intent` None draws one of the base :data:`INTENTS`. Any intent of
    :data:`ALL_TEMPLATES` (base or extension) may be asked for."""
    intent = intent or rng.choice(INTENTS)
    if intent not in ALL_TEMPLATES:
        raise BadInputError(f"unknown intent {intent!r}", f"use one of {', '.join(ALL_TEMPLATES)}")
    template = rng.choice(ALL_TEMPLATES[intent])
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


# ------------------------------------------------------------------------------ fine-tuning extensions


@dataclass(frozen=True)
class FinetuneSizes:
    train: int = 1000  # rows in train.jsonl (new-task and replayed base-task examples together)
    val: int = 100  # rows in val.jsonl (same mix as train)
    test: int = 200  # new-task examples only: measures the new capability
    test_base: int = 200  # base-task examples only: measures forgetting


def generate_extension(task: str, n: int, seed: int = 0, hard: bool = False) -> list[Example]:
    """`n` examples of extension `task`'s intents (distinct messages), deterministic by seed. The random
    stream is separate from :func:`generate`'s (and from the teacher's), whatever the seed."""
    intents = _extension_intents(task)
    rng = random.Random(f"slmops-finetune-{task}-{seed}-{'hard' if hard else 'base'}")
    return _distinct(n, lambda: make_example(rng, hard=hard, intent=rng.choice(intents)))


def _extension_intents(task: str) -> tuple[str, ...]:
    if task not in EXTENSION_TASKS:
        raise BadInputError(f"unknown fine-tuning task {task!r}", f"use one of {', '.join(EXTENSION_TASKS)}")
    return EXTENSION_TASKS[task]


def _distinct(n: int, make) -> list[Example]:
    seen: set[str] = set()
    out: list[Example] = []
    while len(out) < n:
        ex = make()
        if ex.message not in seen:
            seen.add(ex.message)
            out.append(ex)
    return out


def _write_rows(path: Path, examples: list[Example]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(to_chat_row(ex), ensure_ascii=False) + "\n")


def write_finetune_data(out_dir: str | Path, task: str, seed: int = 0, sizes: FinetuneSizes = FinetuneSizes(),
                        replay: float = 0.25, hard: bool = False) -> dict:
    """Write a fine-tuning set for extension `task` (see :data:`EXTENSION_TASKS`); return paths and counts.

    Files (chat JSONL, rows as :func:`to_chat_row` writes them):

    - ``train.jsonl`` / ``val.jsonl``: ``sizes.train`` / ``sizes.val`` rows, of which ``round(replay * n)``
      are base-task examples (replay, so the fine-tuned model keeps the 12 base intents) and the rest are
      the task's new intents; shuffled.
    - ``test.jsonl``: ``sizes.test`` examples of the new intents only (the new capability).
    - ``test_base.jsonl``: ``sizes.test_base`` base-task examples (the forgetting check).
    - ``task.json``: the task, its intents, seed, replay and counts.

    Every split is disjoint from the others by message text; everything is deterministic by `seed`, from
    random streams of its own (not those of :func:`write_demo_data` or the bundled teacher's training).
    Returns ``{"train", "val", "test", "test_base", "task_file": path, "task": name, "intents": [...],
    "counts": {split: {"new": n, "base": n}}}``.
    """
    intents = _extension_intents(task)
    if not 0 <= replay < 1:
        raise BadInputError(f"replay must be in [0, 1), got {replay}", "e.g. 0.25: a quarter of train/val is base-task data")
    for name in ("train", "val", "test", "test_base"):
        if getattr(sizes, name) < 0:
            raise BadInputError(f"sizes.{name} must be >= 0, got {getattr(sizes, name)}")
    base_n = {"train": round(replay * sizes.train), "val": round(replay * sizes.val), "test": 0,
              "test_base": sizes.test_base}
    new_n = {"train": sizes.train - base_n["train"], "val": sizes.val - base_n["val"], "test": sizes.test,
             "test_base": 0}
    new = generate_extension(task, sum(new_n.values()), seed=seed, hard=hard)
    base_rng = random.Random(f"slmops-finetune-replay-{seed}-{'hard' if hard else 'base'}")
    base = _distinct(sum(base_n.values()), lambda: make_example(base_rng, hard=hard))
    shuffle = random.Random(f"slmops-finetune-shuffle-{task}-{seed}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"task": task, "intents": list(intents), "counts": {}}
    i_new = i_base = 0
    for name in ("train", "val", "test", "test_base"):
        rows = new[i_new:i_new + new_n[name]] + base[i_base:i_base + base_n[name]]
        i_new += new_n[name]
        i_base += base_n[name]
        if name in ("train", "val"):
            shuffle.shuffle(rows)
        path = out / f"{name}.jsonl"
        _write_rows(path, rows)
        result[name] = str(path)
        result["counts"][name] = {"new": new_n[name], "base": base_n[name]}
    task_file = out / "task.json"
    task_file.write_text(json.dumps({
        "task": task, "intents": list(intents), "base_intents": list(INTENTS), "seed": seed, "replay": replay,
        "hard": hard, "counts": result["counts"],
    }, indent=2) + "\n", encoding="utf-8")
    result["task_file"] = str(task_file)
    return result
