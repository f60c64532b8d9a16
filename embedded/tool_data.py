"""Synthetic tool-calling conversations for training the default model's LoRA adapter.

Why synthetic: the adapter has to learn the *behaviour* (call a tool when one fits, pick the
right one, call several at once, answer from a tool's result, answer plainly when no tool
fits) in the Hermes format the chat template renders and vLLM's `hermes` parser reads. Every
tool, prompt and value here is made from this file's own schemas, none of which is a case
or a tool of the validation suite (tasks/validation/cases/default.yaml: weather, stock
price, currency): the suite then measures what the adapter learned, not what it memorised.
`check_disjoint` proves it and the training script runs it.

Deterministic: `examples(n, seed)` returns the same list for the same arguments.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

CITIES = ["Rome", "Oslo", "Lima", "Cairo", "Seoul", "Denver", "Lisbon", "Nairobi", "Dublin", "Hanoi",
          "Zurich", "Perth", "Quito", "Vienna", "Austin", "Krakow", "Accra", "Osaka", "Porto", "Bogota"]
COUNTRIES = {"Italy": "Rome", "Norway": "Oslo", "Peru": "Lima", "Egypt": "Cairo", "Kenya": "Nairobi",
             "Ireland": "Dublin", "Portugal": "Lisbon", "Austria": "Vienna", "Ghana": "Accra",
             "Vietnam": "Hanoi", "Chile": "Santiago", "Canada": "Ottawa", "Spain": "Madrid", "Poland": "Warsaw"}
LANGUAGES = ["Spanish", "German", "Italian", "Japanese", "Portuguese", "Dutch", "Swedish", "Korean"]
PHRASES = ["good morning", "thank you very much", "where is the station", "I love this song",
           "see you tomorrow", "how much does it cost", "the food was delicious", "happy birthday"]
CUISINES = ["thai", "mexican", "indian", "sushi", "vegan", "greek", "korean", "italian"]
MOVIES = ["Dune", "Arrival", "Up", "Alien", "Heat", "Coco", "Jaws", "Inception"]
PEOPLE = ["Anna", "Ravi", "Maria", "Tom", "Lena", "Omar", "Kenji", "Sara"]
WORDS = ["serendipity", "ephemeral", "ubiquitous", "laconic", "gregarious", "meticulous", "resilient"]
CRYPTO = ["BTC", "ETH", "SOL", "ADA", "DOT"]
AIRLINES = ["LH", "BA", "AF", "KL", "IB", "AZ", "SK", "TP"]

FACTS = [
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level."),
    ("How many days are there in a leap year?", "A leap year has 366 days."),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare."),
    ("What gas do plants absorb from the air?", "Plants absorb carbon dioxide from the air."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("Write one sentence about why we have seasons.",
     "We have seasons because the Earth's axis is tilted, so each hemisphere gets more or less direct sunlight during the year."),
    ("Write one sentence about what bees do.", "Bees collect nectar and pollen and pollinate flowers as they move between them."),
    ("Give me a short tip for sleeping better.", "Keep a regular bedtime and avoid screens for an hour before you go to sleep."),
    ("Tell me a fun fact about octopuses.", "An octopus has three hearts and blue blood."),
    ("Explain in one sentence what a noun is.", "A noun is a word that names a person, place, thing or idea."),
    ("What is the opposite of ancient?", "The opposite of ancient is modern."),
    ("Write a one-line greeting for a birthday card.", "Wishing you a wonderful birthday full of joy and laughter!"),
    ("Why do leaves change colour in autumn?",
     "Leaves change colour in autumn because the green chlorophyll breaks down and reveals yellow and orange pigments."),
    ("Say hello in a friendly way.", "Hello! It is nice to meet you. How can I help today?"),
    ("What is a haiku?", "A haiku is a short Japanese poem of three lines with five, seven and five syllables."),
]


@dataclass
class Tool:
    """One training tool: its schema, how people ask for it, a fake result and an answer from it."""

    name: str
    description: str
    params: dict[str, dict]
    required: list[str]
    asks: list[str]
    values: Callable[[random.Random], dict]
    result: Callable[[dict, random.Random], dict]
    answer: str
    optional: dict[str, Callable[[random.Random], object]] = field(default_factory=dict)

    def schema(self) -> dict:
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": {"type": "object", "properties": self.params, "required": self.required}}}


def _s(desc: str, **extra) -> dict:
    return {"type": "string", "description": desc, **extra}


def _n(desc: str) -> dict:
    return {"type": "number", "description": desc}


TOOLS = [
    Tool("get_local_time", "Get the current local time in a city.", {"city": _s("City name, e.g. Rome")}, ["city"],
         ["What time is it in {city} right now?", "Tell me the local time in {city}.", "Can you check the current time in {city}?"],
         lambda r: {"city": r.choice(CITIES)},
         lambda a, r: {"city": a["city"], "time": f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}"},
         "It is {time} in {city} right now."),
    Tool("get_air_quality", "Get the air quality index of a city.", {"city": _s("City name")}, ["city"],
         ["How is the air quality in {city} today?", "What is the air quality index in {city}?", "Is the air clean in {city} at the moment?"],
         lambda r: {"city": r.choice(CITIES)},
         lambda a, r: {"city": a["city"], "aqi": r.randint(5, 180)},
         "The air quality index in {city} is {aqi}."),
    Tool("find_restaurants", "Find restaurants of a cuisine in a city.",
         {"city": _s("City name"), "cuisine": _s("Type of food, e.g. thai")}, ["city", "cuisine"],
         ["Find me a {cuisine} restaurant in {city}.", "Where can I eat {cuisine} food in {city}?", "Any good {cuisine} places in {city}?"],
         lambda r: {"city": r.choice(CITIES), "cuisine": r.choice(CUISINES)},
         lambda a, r: {"restaurants": [f"{a['cuisine'].title()} House", f"Little {a['cuisine'].title()}"], "city": a["city"]},
         "In {city} you could try {restaurants[0]} or {restaurants[1]}."),
    Tool("translate_text", "Translate a text into another language.",
         {"text": _s("The text to translate"), "target_language": _s("Language to translate into")}, ["text", "target_language"],
         ["Translate '{text}' into {target_language}.", "How do you say '{text}' in {target_language}?", "Please translate '{text}' to {target_language}."],
         lambda r: {"text": r.choice(PHRASES), "target_language": r.choice(LANGUAGES)},
         lambda a, r: {"translation": f"[{a['target_language']}] {a['text']}", "target_language": a["target_language"]},
         "In {target_language} that is: {translation}."),
    Tool("calculate_tip", "Calculate the tip for a restaurant bill.",
         {"bill_amount": _n("Bill total"), "tip_percent": _n("Tip percentage, e.g. 15")}, ["bill_amount", "tip_percent"],
         ["What is a {tip_percent}% tip on a bill of {bill_amount}?", "Calculate a {tip_percent} percent tip for {bill_amount} dollars.",
          "My bill is {bill_amount}. How much is a {tip_percent}% tip?"],
         lambda r: {"bill_amount": r.choice([24, 36, 48, 60, 85, 120]), "tip_percent": r.choice([10, 15, 18, 20])},
         lambda a, r: {"tip": round(a["bill_amount"] * a["tip_percent"] / 100, 2)},
         "The tip is {tip}."),
    Tool("get_population", "Get the population of a country.", {"country": _s("Country name")}, ["country"],
         ["What is the population of {country}?", "How many people live in {country}?", "Look up the population of {country}."],
         lambda r: {"country": r.choice(sorted(COUNTRIES))},
         lambda a, r: {"country": a["country"], "population_millions": r.randint(3, 90)},
         "{country} has about {population_millions} million people."),
    Tool("define_word", "Look up the dictionary definition of an English word.", {"word": _s("The word")}, ["word"],
         ["What does '{word}' mean?", "Define the word {word}.", "Look up the meaning of {word}."],
         lambda r: {"word": r.choice(WORDS)},
         lambda a, r: {"word": a["word"], "definition": f"a meaning of {a['word']}"},
         "'{word}' means {definition}."),
    Tool("send_email", "Send an email to a contact.",
         {"to": _s("Recipient name"), "subject": _s("Subject line")}, ["to", "subject"],
         ["Send an email to {to} with the subject '{subject}'.", "Email {to} about '{subject}'.", "Please write to {to}, subject: {subject}."],
         lambda r: {"to": r.choice(PEOPLE), "subject": r.choice(["Lunch on Friday", "Project update", "Holiday plans", "Invoice"])},
         lambda a, r: {"status": "sent", "to": a["to"]},
         "Done: the email to {to} was sent."),
    Tool("get_showtimes", "Get cinema showtimes for a movie in a city.",
         {"movie": _s("Movie title"), "city": _s("City name")}, ["movie", "city"],
         ["When is {movie} showing in {city}?", "Find showtimes for {movie} in {city}.", "Is {movie} playing in {city} tonight?"],
         lambda r: {"movie": r.choice(MOVIES), "city": r.choice(CITIES)},
         lambda a, r: {"movie": a["movie"], "times": [f"{r.randint(17, 19)}:00", f"{r.randint(20, 22)}:30"]},
         "{movie} is showing at {times[0]} and {times[1]}."),
    Tool("track_package", "Track a parcel by its tracking number.", {"tracking_number": _s("Tracking number")}, ["tracking_number"],
         ["Where is my package {tracking_number}?", "Track parcel {tracking_number}.", "What is the status of shipment {tracking_number}?"],
         lambda r: {"tracking_number": f"PK{r.randint(100000, 999999)}"},
         lambda a, r: {"tracking_number": a["tracking_number"], "status": r.choice(["in transit", "out for delivery", "delivered"])},
         "Package {tracking_number} is {status}."),
    Tool("get_flight_status", "Get the status of a flight by its number.", {"flight_number": _s("Flight number, e.g. LH400")}, ["flight_number"],
         ["Is flight {flight_number} on time?", "What is the status of flight {flight_number}?", "Check flight {flight_number} for me."],
         lambda r: {"flight_number": f"{r.choice(AIRLINES)}{r.randint(10, 999)}"},
         lambda a, r: {"flight_number": a["flight_number"], "status": r.choice(["on time", "delayed 20 minutes", "boarding"])},
         "Flight {flight_number} is {status}."),
    Tool("get_crypto_price", "Get the latest price of a cryptocurrency in US dollars.", {"symbol": _s("Coin symbol, e.g. BTC")}, ["symbol"],
         ["What is {symbol} trading at?", "Give me the current price of {symbol}.", "How much is one {symbol} worth now?"],
         lambda r: {"symbol": r.choice(CRYPTO)},
         lambda a, r: {"symbol": a["symbol"], "price_usd": r.randint(1, 900) * 10},
         "One {symbol} costs {price_usd} US dollars."),
    Tool("set_reminder", "Set a reminder at a time.",
         {"text": _s("What to remind about"), "time": _s("Time, e.g. 18:30")}, ["text", "time"],
         ["Remind me to {text} at {time}.", "Set a reminder at {time} to {text}.", "Please remind me at {time}: {text}."],
         lambda r: {"text": r.choice(["call mom", "buy milk", "water the plants", "take my pills"]),
                    "time": f"{r.randint(6, 22):02d}:{r.choice(['00', '15', '30', '45'])}"},
         lambda a, r: {"status": "set", "time": a["time"]},
         "Your reminder is set for {time}."),
    Tool("convert_length", "Convert a length between units.",
         {"value": _n("The length"), "from_unit": _s("Unit", enum=["km", "mi", "m", "ft"]), "to_unit": _s("Unit", enum=["km", "mi", "m", "ft"])},
         ["value", "from_unit", "to_unit"],
         ["Convert {value} {from_unit} to {to_unit}.", "How many {to_unit} is {value} {from_unit}?", "What is {value} {from_unit} in {to_unit}?"],
         lambda r: dict(zip(["from_unit", "to_unit"], r.sample(["km", "mi", "m", "ft"], 2)), value=r.choice([3, 5, 10, 42, 100])),
         lambda a, r: {"result": round(a["value"] * r.uniform(0.3, 3.3), 2), "unit": a["to_unit"]},
         "That is {result} {unit}."),
]
TOOL_BY_NAME = {t.name: t for t in TOOLS}


def _fmt(template: str, values: dict) -> str:
    return template.format(**values)


def _call(tool: Tool, values: dict) -> dict:
    return {"name": tool.name, "arguments": values}


def render_calls(calls: list[dict]) -> str:
    """An assistant turn of tool calls exactly as the chat template renders one in history."""
    return "\n".join("<tool_call>\n" + json.dumps(c, ensure_ascii=False) + "\n</tool_call>" for c in calls)


def _tool_list(rng: random.Random, must: list[Tool], total: int) -> list[dict]:
    others = [t for t in TOOLS if t not in must]
    chosen = must + rng.sample(others, max(0, total - len(must)))
    rng.shuffle(chosen)
    return [t.schema() for t in chosen]


def _answer(tool: Tool, values: dict, result: dict) -> str:
    return tool.answer.format(**{**values, **result})


def _example(kind: str, rng: random.Random) -> dict:
    """One conversation: `messages` (the prompt), `tools`, and `completion` (the assistant text to learn)."""
    if kind == "plain":
        q, a = _plain(rng)
        return {"messages": [{"role": "user", "content": q}], "tools": None, "completion": a}
    if kind == "irrelevant":
        q, a = _plain(rng)
        return {"messages": [{"role": "user", "content": q}], "tools": _tool_list(rng, [], rng.randint(1, 4)), "completion": a}
    tool = rng.choice(TOOLS)
    values = tool.values(rng)
    ask = _fmt(rng.choice(tool.asks), values)
    if kind == "single":
        return {"messages": [{"role": "user", "content": ask}], "tools": _tool_list(rng, [tool], 1),
                "completion": render_calls([_call(tool, values)])}
    if kind == "choose":
        return {"messages": [{"role": "user", "content": ask}], "tools": _tool_list(rng, [tool], rng.randint(2, 4)),
                "completion": render_calls([_call(tool, values)])}
    if kind == "parallel":
        second = tool if rng.random() < 0.5 else rng.choice([t for t in TOOLS if t is not tool])
        values2 = second.values(rng)
        while values2 == values:
            values2 = second.values(rng)
        ask2 = _fmt(rng.choice(second.asks), values2)
        joiner = rng.choice([" Also, ", " And ", " Then: "])
        text = ask + joiner + ask2[0].lower() + ask2[1:]
        tools = _tool_list(rng, list({tool.name: tool, second.name: second}.values()), rng.randint(2, 4))
        return {"messages": [{"role": "user", "content": text}], "tools": tools,
                "completion": render_calls([_call(tool, values), _call(second, values2)])}
    if kind == "result":
        result = tool.result(values, rng)
        call_id = f"call_{rng.randint(1000, 9999)}"
        messages = [
            {"role": "user", "content": ask},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": tool.name, "arguments": json.dumps(values)}}]},
            {"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)},
        ]
        return {"messages": messages, "tools": _tool_list(rng, [tool], rng.randint(1, 3)), "completion": _answer(tool, values, result)}
    raise ValueError(kind)


def _plain(rng: random.Random) -> tuple[str, str]:
    roll = rng.random()
    if roll < 0.3:
        country = rng.choice(sorted(COUNTRIES))
        return f"What is the capital of {country}?", f"The capital of {country} is {COUNTRIES[country]}."
    if roll < 0.5:
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    return rng.choice(FACTS)


# The mix: calling cases dominate, but plain answers stay (with and without tools) so the
# adapter does not learn "always call".
MIX = [("single", 0.18), ("choose", 0.24), ("parallel", 0.14), ("result", 0.16), ("irrelevant", 0.16), ("plain", 0.12)]


def examples(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    kinds, weights = zip(*MIX)
    return [dict(_example(k, rng), kind=k) for k in rng.choices(kinds, weights=weights, k=n)]


def check_disjoint(suite: Path) -> None:
    """Refuse to train if any training tool name or prompt text appears in the validation suite."""
    data = yaml.safe_load(suite.read_text())
    suite_tools = set(data.get("tools", {}))
    overlap = suite_tools & set(TOOL_BY_NAME)
    if overlap:
        raise SystemExit(f"training tools overlap the validation suite: {sorted(overlap)}")
    suite_prompts = {m["content"].strip().lower() for c in data["cases"] for m in c["messages"] if m["role"] == "user"}
    ours = {q.lower() for q, _ in FACTS} | {a.lower() for t in TOOLS for a in t.asks}
    clash = suite_prompts & ours
    if clash:
        raise SystemExit(f"training prompts overlap the validation suite: {sorted(clash)}")
