"""Write the shipped E2E, SAMSum and MNLI samples in their release formats, deterministically.

Usage: python scripts/make_task_samples.py [--out lora_dist/assets] [--seed 0]
Writes <out>/e2e/{trainset,devset,testset_w_refs}.csv, <out>/samsum/{train,val,test}.json and
<out>/mnli/{train,dev_matched,dev_mismatched}.tsv. The text is synthetic (templates filled from a
seeded RNG) but has the release files' layout, so the loaders see what the real files hold.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

# --- E2E: MRs over the challenge's eight attributes, several references each ---

NAMES = [
    "The Eagle",
    "The Mill",
    "Alimentum",
    "The Golden Curry",
    "Zizzi",
    "Cotto",
    "Aromi",
    "The Wrestlers",
    "Blue Spice",
    "Fitzbillies",
    "Giraffe",
    "The Punter",
    "Strada",
    "Browns Cambridge",
    "Clowns",
    "The Phoenix",
    "The Cricketers",
    "Wildwood",
    "The Vaults",
]
NEAR = [
    "Café Rouge",
    "Burger King",
    "The Sorrento",
    "Raja Indian Cuisine",
    "All Bar One",
    "Express by Holiday Inn",
    "Crowne Plaza Hotel",
    "Café Brazil",
    "Rainbow Vegetarian Café",
]
E2E_VALUES = {
    "eatType": ["coffee shop", "pub", "restaurant"],
    "food": ["English", "French", "Italian", "Japanese", "Chinese", "Indian", "Fast food"],
    "priceRange": ["cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"],
    "customer rating": ["low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"],
    "area": ["city centre", "riverside"],
    "familyFriendly": ["yes", "no"],
    "near": NEAR,
}
CLAUSES: dict[str, list[str]] = {
    "eatType": ["is a {v}", "is a {v} venue", "operates as a {v}"],
    "food": ["serves {v} food", "offers {v} cuisine", "has a {v} menu"],
    "priceRange": ["has a {v} price range", "charges prices in the {v} range"],
    "customer rating": ["has a {v} customer rating", "is rated {v} by customers"],
    "area": ["is located in the {v}", "can be found in the {v} area"],
    "familyFriendly": ["{fam}"],
    "near": ["is near {v}", "is close to {v}", "sits next to {v}"],
}
FAMILY = {
    "yes": ["is family friendly", "welcomes children"],
    "no": ["is not family friendly", "does not welcome children"],
}


def e2e_mr(rng: random.Random) -> dict[str, str]:
    attrs = rng.sample(list(E2E_VALUES), rng.randint(2, 7))
    mr = {"name": rng.choice(NAMES)}
    for key in E2E_VALUES:  # the release lists attributes in this fixed order
        if key in attrs:
            mr[key] = rng.choice(E2E_VALUES[key])
    return mr


def e2e_ref(rng: random.Random, mr: dict[str, str]) -> str:
    parts = []
    for key, value in mr.items():
        if key == "name":
            continue
        clause = rng.choice(CLAUSES[key])
        parts.append(clause.format(v=value, fam=rng.choice(FAMILY.get(value, ["x"]))))
    rng.shuffle(parts)
    name = mr["name"]
    if len(parts) == 1:
        return f"{name} {parts[0]}."
    cut = rng.randint(1, len(parts) - 1)
    pronoun = rng.choice(["It", "This place", "The venue"])
    return f"{name} {_join(parts[:cut])}. {pronoun} {_join(parts[cut:])}."


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def write_e2e(out: Path, rng: random.Random) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    paths = []
    for filename, n_mrs in (("trainset.csv", 30), ("devset.csv", 10), ("testset_w_refs.csv", 10)):
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["mr", "ref"])
        written = 0
        while written < n_mrs:
            mr = e2e_mr(rng)
            text = ", ".join(f"{k}[{v}]" for k, v in mr.items())
            if text in seen:
                continue
            seen.add(text)
            written += 1
            refs = {e2e_ref(rng, mr) for _ in range(rng.randint(2, 5))}
            for ref in sorted(refs):
                writer.writerow([text, ref])
        paths.append(_write(out / filename, buf.getvalue()))
    return paths


# --- SAMSum: short chats with a one- or two-sentence summary ---

PEOPLE = [
    "Amanda",
    "Hannah",
    "Jerry",
    "Olivia",
    "Tom",
    "Lenny",
    "Mia",
    "Kate",
    "Ethan",
    "Greg",
    "Sarah",
    "Paul",
    "Irene",
    "Max",
    "Julia",
    "Ben",
]
PLACES = ["the cinema", "Luigi's", "the gym", "the station", "Anna's place", "the office"]
THINGS = ["charger", "umbrella", "notes from class", "drill", "car keys", "blue jacket"]
TIMES = ["at 6", "at 7:30", "tomorrow morning", "after work", "on Saturday", "in 20 minutes"]


def chat_meet(rng: random.Random, a: str, b: str) -> tuple[list[tuple[str, str]], str]:
    place, time = rng.choice(PLACES), rng.choice(TIMES)
    turns = [
        (a, f"Are we still meeting {time}?"),
        (b, "Yes! Where?"),
        (a, f"What about {place}?"),
        (b, rng.choice(["Perfect :)", "ok, see you there"])),
    ]
    if rng.random() < 0.5:
        turns.append((a, "I'll text you when I'm there"))
    return turns, f"{a} and {b} will meet {time} at {place}."


def chat_borrow(rng: random.Random, a: str, b: str) -> tuple[list[tuple[str, str]], str]:
    thing = rng.choice(THINGS)
    turns = [
        (a, f"Hey {b}, do you still have my {thing}?"),
        (b, "Hmm let me check"),
        (b, "Yes, it's here"),
        (a, f"Can you bring it {rng.choice(TIMES)}?"),
        (b, "Sure, no problem"),
    ]
    return turns, f"{b} has {a}'s {thing} and will bring it back."


def chat_late(rng: random.Random, a: str, b: str) -> tuple[list[tuple[str, str]], str]:
    minutes = rng.choice([10, 15, 20, 30])
    reason = rng.choice(["the bus is stuck in traffic", "my train got cancelled", "I overslept"])
    turns = [
        (a, f"I'm running late, {reason} :("),
        (b, "How late?"),
        (a, f"About {minutes} minutes"),
        (b, rng.choice(["No worries", "ok, I'll order coffee"])),
    ]
    return turns, f"{a} will be about {minutes} minutes late because {_third(reason, a)}."


def _third(reason: str, who: str) -> str:
    return reason.replace("I overslept", f"{who} overslept").replace("my train", "the train")


CHATS: list[Callable[[random.Random, str, str], tuple[list[tuple[str, str]], str]]] = [
    chat_meet,
    chat_borrow,
    chat_late,
]


def write_samsum(out: Path, rng: random.Random) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    used: set[int] = set()
    paths = []
    for filename, n in (("train.json", 40), ("val.json", 20), ("test.json", 20)):
        items = []
        while len(items) < n:
            ident = rng.randint(13_680_000, 13_865_000)
            if ident in used:
                continue
            used.add(ident)
            a, b = rng.sample(PEOPLE, 2)
            turns, summary = rng.choice(CHATS)(rng, a, b)
            dialogue = "\r\n".join(f"{who}: {text}" for who, text in turns)
            items.append({"id": str(ident), "summary": summary, "dialogue": dialogue})
        paths.append(_write(out / filename, json.dumps(items, indent=4) + "\n"))
    return paths


# --- MNLI: each premise gets one hypothesis per label, as in the MultiNLI collection ---

GENRES_MATCHED = ["fiction", "government", "slate", "telephone", "travel"]
GENRES_MISMATCHED = ["facetoface", "letters", "nineeleven", "oup", "verbatim"]
SUBJECTS = [
    "The committee",
    "My neighbour",
    "The old fisherman",
    "A spokesman",
    "The tourists",
    "Our manager",
    "The senator",
    "Her brother",
]
# (premise predicate, entailed, contradicted, neutral addition)
EVENTS = [
    (
        "approved the new budget on Monday",
        "approved a budget",
        "rejected the budget",
        "approved the budget after a long debate",
    ),
    (
        "walked to the harbour before dawn",
        "went to the harbour",
        "stayed home all morning",
        "walked to the harbour to buy fish",
    ),
    (
        'said "we\'ll see about that" and left the room',
        "left the room",
        "never left the room",
        "was angry when leaving the room",
    ),
    (
        "visited three museums in Paris",
        "visited museums",
        "has never been to Paris",
        "enjoyed the museums in Paris",
    ),
    (
        "forgot the keys at the office",
        "did not have the keys",
        "had the keys all along",
        "forgot the keys because of a meeting",
    ),
    (
        "called the bank twice last week",
        "phoned the bank",
        "never contacted the bank",
        "called the bank about a loan",
    ),
]
_TOKEN = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def _binary_parse(tokens: list[str]) -> str:
    return tokens[0] if len(tokens) == 1 else f"( {tokens[0]} {_binary_parse(tokens[1:])} )"


def _parse(tokens: list[str]) -> str:
    tags = " ".join(f"({'.' if not t[0].isalnum() else 'NN'} {t})" for t in tokens)
    return f"(ROOT (S {tags}))"


def write_mnli(out: Path, rng: random.Random) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    base = [
        "index",
        "promptID",
        "pairID",
        "genre",
        "sentence1_binary_parse",
        "sentence2_binary_parse",
        "sentence1_parse",
        "sentence2_parse",
        "sentence1",
        "sentence2",
    ]
    prompt_id, paths = rng.randint(10_000, 20_000), []
    splits = (
        ("train.tsv", 30, GENRES_MATCHED, 1),
        ("dev_matched.tsv", 10, GENRES_MATCHED, 5),
        ("dev_mismatched.tsv", 10, GENRES_MISMATCHED, 5),
    )
    for filename, n_premises, genres, n_annotators in splits:
        labels = [f"label{i}" for i in range(1, n_annotators + 1)]
        lines = ["\t".join([*base, *labels, "gold_label"])]
        for _ in range(n_premises):
            prompt_id += rng.randint(1, 50)
            subject, (pred, ent, con, neu) = rng.choice(SUBJECTS), rng.choice(EVENTS)
            premise = f"{subject} {pred}."
            pairs = [("entailment", ent), ("contradiction", con), ("neutral", neu)]
            genre = rng.choice(genres)
            for gold, predicate in rng.sample(pairs, 3):
                hypothesis = f"{rng.choice([subject, 'Someone'])} {predicate}."
                t1, t2 = _TOKEN.findall(premise), _TOKEN.findall(hypothesis)
                # Annotators mostly agree; one may dissent, never outvoting the gold label.
                votes = [gold] * n_annotators
                if n_annotators > 1 and rng.random() < 0.3:
                    votes[rng.randrange(1, n_annotators)] = rng.choice(
                        [label for label, _ in pairs if label != gold]
                    )
                fields = [
                    str(len(lines) - 1),
                    str(prompt_id),
                    f"{prompt_id}{gold[0]}",
                    genre,
                    _binary_parse(t1),
                    _binary_parse(t2),
                    _parse(t1),
                    _parse(t2),
                    premise,
                    hypothesis,
                    *votes,
                    gold,
                ]
                lines.append("\t".join(fields))
        paths.append(_write(out / filename, "\n".join(lines) + "\n"))
    return paths


def _write(path: Path, text: str) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:  # newline="": bytes as written
        f.write(text)
    return path


def write_samples(out: Path, seed: int = 0) -> list[Path]:
    """Write all three samples under `out`; each task has its own RNG, so each varies alone."""
    return [
        *write_e2e(out / "e2e", random.Random(f"e2e-{seed}")),
        *write_samsum(out / "samsum", random.Random(f"samsum-{seed}")),
        *write_mnli(out / "mnli", random.Random(f"mnli-{seed}")),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parent.parent / "lora_dist" / "assets"
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for path in write_samples(args.out, args.seed):
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
