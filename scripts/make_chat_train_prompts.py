"""Write `src/paradec/train/data/chat_prompts.jsonl`: the packaged chat prompts for `paradec train --data chat`.

    .venv/bin/python scripts/make_chat_train_prompts.py

Deterministic: every prompt is composed here from hand-written topics, task templates and phrasing variants
(writing, coding in many languages, math word problems with their numbers drawn from a fixed seed, explanations,
lists, advice, translation of sentences written below, summaries and extraction over passages composed below,
role-play set-ups, rewriting, comparisons and brainstorming). Prompts are de-duplicated, and any prompt that shares
an 8-word sequence (lower-cased, whitespace-split) with a prompt, turn or message of the bench suites
(`src/paradec/bench/data/*.jsonl`) is left out, so training never sees the evaluation text; rerun the script after
the bench suites change. Each record is `{"prompt": ..., "category": ...}`.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from paradec.train.overlap import dev_overlap

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "paradec" / "train" / "data" / "chat_prompts.jsonl"
SEED = 20250607

NAMES = [
    ("Amara", "she", "her"), ("Bruno", "he", "his"), ("Chen", "he", "his"), ("Dalia", "she", "her"),
    ("Emeka", "he", "his"), ("Freya", "she", "her"), ("Gustavo", "he", "his"), ("Hana", "she", "her"),
    ("Ivan", "he", "his"), ("Jovana", "she", "her"), ("Kofi", "he", "his"), ("Leila", "she", "her"),
    ("Mateo", "he", "his"), ("Nadia", "she", "her"), ("Oskar", "he", "his"), ("Priya", "she", "her"),
    ("Quentin", "he", "his"), ("Rosa", "she", "her"), ("Sami", "he", "his"), ("Tamsin", "she", "her"),
    ("Umar", "he", "his"), ("Valentina", "she", "her"), ("Wen", "she", "her"), ("Yusuf", "he", "his"),
]  # fmt: skip


def pick(rng: random.Random, items: list, count: int) -> list:
    return rng.sample(items, min(count, len(items)))


# --- writing --------------------------------------------------------------------------------------------------------

FORMS = [
    "a short poem", "a haiku", "a limerick", "a four-line rhyming verse", "the opening paragraph of a short story",
    "a diary entry", "a bedtime story", "a fable with a clear moral", "a dialogue between two characters",
    "a short toast for a dinner", "a newspaper headline with a two-sentence lede", "a thirty-second radio advert",
    "a short scene for a play", "a postcard message", "a song chorus", "a six-sentence mystery opening",
    "a letter from the future", "a short monologue", "a blog post introduction", "a piece of flash fiction",
]  # fmt: skip
SUBJECTS = [
    "a lighthouse that stopped working", "the first snowfall in a small town", "a cat who is afraid of mice",
    "a bicycle repair shop on a rainy day", "moving to a new city alone", "an umbrella left on a bus",
    "the smell of bread at five in the morning", "a robot learning to garden", "an old library about to close",
    "a neighbourhood football match", "a power cut during a storm", "a grandmother's handwritten recipe book",
    "the last evening of the summer holidays", "a lost dog finding its way home", "a night train over the mountains",
    "a houseplant that grows far too fast", "a street market at dawn", "learning to swim at forty",
    "a wristwatch that runs backwards", "a village harvest festival", "a message found in a bottle",
    "two strangers playing chess in a park", "a noisy upstairs neighbour", "a mountain hut in deep winter",
    "a school science fair volcano", "a crowded morning commute", "a jar of plum jam", "a shy dragon",
    "rain drumming on a tin roof", "an astronaut's first morning back on Earth", "a bakery run by twins",
    "a kite stuck in an oak tree", "a retired teacher's last class reunion", "a foggy ferry crossing",
    "a music box found in an attic", "a community garden in a car park", "a marathon runner at mile twenty",
    "a puppy's first walk in the snow", "a seaside town out of season", "a clockmaker's apprentice",
]  # fmt: skip
WRITING_TWISTS = [
    "", " Keep it under 120 words.", " Use a cheerful tone.", " Make it gently melancholy.",
    " Write it for young children.", " End with a small surprise.", " Fill it with sounds and smells.",
    " Make it funny.", " Keep the words simple.", " Write it in the second person.", " Give it a title.",
]  # fmt: skip
WRITING_ASKS = [
    "Write {form} about {subject}.{twist}",
    "Could you write {form} about {subject}?{twist}",
    "I'd love {form} on the theme of {subject}.{twist}",
    "Compose {form} inspired by {subject}.{twist}",
    "Please draft {form} featuring {subject}.{twist}",
    "Create {form} where the central image is {subject}.{twist}",
]
EMAILS = {
    "my landlord": [
        "reporting a leaking tap in the kitchen",
        "asking whether I may paint the spare room",
        "giving two months' notice that I am moving out",
        "asking when the broken boiler will be repaired",
    ],
    "a colleague in another office": [
        "asking to move our call to next Thursday",
        "sharing the agenda for Monday's review",
        "asking for the figures behind last quarter's report",
        "thanking them for covering my shift",
    ],
    "my manager": [
        "asking for three more days to finish a report",
        "requesting a day off on the 14th",
        "proposing a short weekly check-in",
        "explaining why the launch needs to move by a week",
    ],
    "a long-time customer": [
        "announcing a small price rise from next month",
        "thanking them for ten years of orders",
        "apologising for a delivery that arrived late",
        "inviting them to an open day at our workshop",
    ],
    "my son's teacher": [
        "explaining why he missed school on Tuesday",
        "asking how he is settling in this term",
        "offering to help with the class trip",
    ],
    "the hotel I booked": [
        "asking for a quiet room away from the lift",
        "asking whether there is parking near the entrance",
        "letting them know we will arrive after midnight",
    ],
    "an old classmate": [
        "suggesting we meet up after fifteen years",
        "congratulating them on their new job",
        "asking for advice about studying abroad",
    ],
    "the local council": [
        "reporting a streetlight that has been out for weeks",
        "asking about the new recycling collection days",
        "suggesting a pedestrian crossing outside the school",
    ],
    "a furniture supplier": [
        "asking for a refund for a table that arrived scratched",
        "confirming the delivery date of an order",
        "asking whether the sofa comes in a darker fabric",
    ],
    "a new team member": [
        "welcoming them and explaining their first week",
        "introducing myself before we start working together",
        "sharing a few tips about the office",
    ],
    "my neighbour": [
        "proposing a shared rota for putting out the bins",
        "apologising in advance for noise from a party",
        "asking whether they could feed my cat next weekend",
    ],
}
EMAIL_ASKS = [
    "Write a short email to {who} {why}.",
    "Draft a polite message to {who} {why}. Keep it under 100 words.",
    "Help me write a friendly but clear note to {who} {why}.",
    "I need an email to {who} {why}. Make it sound professional.",
]


def writing(rng: random.Random) -> Iterator[str]:
    for form in FORMS:
        for subject in pick(rng, SUBJECTS, 22):
            yield rng.choice(WRITING_ASKS).format(form=form, subject=subject, twist=rng.choice(WRITING_TWISTS))
    for who, purposes in EMAILS.items():
        for why in purposes:
            for ask in pick(rng, EMAIL_ASKS, 2):
                yield ask.format(who=who, why=why)


# --- coding ---------------------------------------------------------------------------------------------------------

LANGUAGES = [
    "Python", "JavaScript", "TypeScript", "Rust", "Go", "C", "C++", "Java", "Kotlin", "C#", "Ruby", "PHP", "Swift",
    "Haskell", "Lua", "Bash", "R", "Scala", "Elixir", "Julia",
]  # fmt: skip
CODE_TASKS = [
    "reverses the order of the words in a sentence",
    "checks whether a string reads the same backwards, ignoring case and punctuation",
    "merges two sorted arrays into a single sorted array",
    "counts how often each word appears in a piece of text",
    "converts a positive integer to Roman numerals",
    "takes a date written as YYYY-MM-DD and returns the weekday name",
    "computes the greatest common divisor of two integers",
    "removes duplicates from a list while keeping the first occurrence order",
    "flattens a nested list of any depth",
    "finds the longest common prefix shared by a list of strings",
    "compresses a string with run-length encoding, so aaabcc becomes a3b1c2",
    "transposes a matrix stored as a list of rows",
    "checks that every bracket in an expression is matched and properly nested",
    "returns the n-th prime number",
    "rotates an array to the right by k positions",
    "groups a list of words into sets of anagrams",
    "decides whether some text is a valid dotted IPv4 address",
    "computes a moving average with a window of k values",
    "splits a list into chunks of a given size",
    "converts temperatures between Celsius and Fahrenheit in both directions",
    "returns the k smallest values of a list in ascending order",
    "capitalises the first letter of every word in a title",
    "performs binary search on a sorted array and returns the index or -1",
    "computes the edit distance between two strings",
    "reads a CSV file and prints the sum of its third column",
    "lists every permutation of a short string",
    "counts the vowels and consonants in a string",
    "decides whether two axis-aligned rectangles overlap",
    "turns a string of binary digits into its decimal value",
    "finds two positions in an array whose values add up to a target",
    "implements a stack with push, pop and peek",
    "builds a queue out of two stacks",
    "returns the element that occurs most often in a list",
    "formats a number of seconds as hours, minutes and seconds",
    "tells whether a given year is a leap year",
    "computes a factorial without recursion",
    "interleaves the items of two lists of different lengths",
    "returns the median of an unsorted list of numbers",
    "shortens a string to a maximum length, ending it with an ellipsis",
    "implements a small least-recently-used cache with a fixed capacity",
    "retries a failing operation up to three times with a growing delay",
    "merges two maps, adding up the values of keys present in both",
    "checks whether an integer is a power of two using bit operations",
    "prints the Collatz sequence that starts from a given number",
    "validates a password: at least ten characters, one digit and one capital letter",
]
CODE_ASKS = [
    "Write a {lang} function that {task}.",
    "In {lang}, how do I write code that {task}?",
    "Show me idiomatic {lang} that {task}, with a short explanation.",
    "Implement a routine in {lang} which {task}. State its time complexity.",
    "Give me a {lang} snippet that {task}, plus two example calls.",
    "I'm learning {lang}. Write a small program that {task} and walk me through it line by line.",
    "Using {lang}, {task_imperative}. Add tests for the edge cases.",
]
CODE_TOPICS = [
    "error handling", "string formatting", "reading a file line by line", "writing unit tests",
    "iterating over a dictionary or map", "defining a type with a constructor", "working with dates and times",
    "sorting records by one of their fields", "making an HTTP request", "parsing JSON",
    "running tasks concurrently", "reading environment variables", "parsing command-line arguments",
    "immutable versus mutable values", "pattern matching", "generic functions", "closures",
    "package or dependency management", "logging", "null or missing values",
]  # fmt: skip
TOPIC_ASKS = [
    "How does {topic} work in {lang}? Give a short example.",
    "What is the usual way to handle {topic} in {lang}?",
    "Explain {topic} in {lang} to someone who mostly writes {other}.",
    "What are common mistakes with {topic} in {lang}, and how do I avoid them?",
]
BUGGY = [
    ("Python", "return the average of a list", "def average(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total / len(xs) - 1"),
    ("Python", "count the even numbers in a list", "def count_even(xs):\n    n = 0\n    for x in xs:\n        if x % 2:\n            n += 1\n    return n"),
    ("Python", "collect the keys whose value is above a limit", "def keys_above(d, limit):\n    out = []\n    for k, v in d:\n        if v > limit:\n            out.append(k)\n    return out"),
    ("Python", "append an item to a fresh list on each call", "def add_item(item, bucket=[]):\n    bucket.append(item)\n    return bucket"),
    ("JavaScript", "sum an array of numbers", "function sum(xs) {\n  let total;\n  for (const x of xs) total += x;\n  return total;\n}"),
    ("JavaScript", "print the numbers 0 to 4 after a delay", "for (var i = 0; i < 5; i++) {\n  setTimeout(() => console.log(i), 100);\n}"),
    ("JavaScript", "check whether a value is in an array", "function has(xs, v) {\n  return xs.indexOf(v) > 0;\n}"),
    ("C", "copy a string into a buffer", "void copy(char *dst, const char *src) {\n    int i = 0;\n    while (src[i]) { dst[i] = src[i]; i++; }\n}"),
    ("C", "find the largest value in an array", "int max(int *a, int n) {\n    int best = 0;\n    for (int i = 0; i <= n; i++) if (a[i] > best) best = a[i];\n    return best;\n}"),
    ("Go", "double every value in a slice", "func double(xs []int) {\n    for _, x := range xs {\n        x *= 2\n    }\n}"),
    ("Java", "compare two names for equality", "boolean same(String a, String b) {\n    return a == b;\n}"),
    ("Rust", "return the first word of a sentence", "fn first_word(s: &str) -> &str {\n    s.split(' ').last().unwrap_or(\"\")\n}"),
    ("SQL", "count the orders of each customer", "SELECT customer_id, COUNT(*) AS placed\nFROM orders\nORDER BY placed DESC;"),
    ("Bash", "loop over the files in a folder whose names may hold spaces", "for f in $(ls ./photos); do\n  echo \"$f\"\ndone"),
]  # fmt: skip
BUG_ASKS = [
    "This {lang} code should {goal}, but it gives the wrong result. Find the bug and fix it:\n\n{code}",
    "What is wrong with this {lang} snippet? It is meant to {goal}.\n\n{code}",
    "Review this {lang} code, which tries to {goal}. Explain the problem and show a corrected version.\n\n{code}",
]
TABLES = {
    "orders(id, customer_id, total, created_at)": [
        "returns the ten largest orders of last month",
        "computes the total spent by each customer, highest first",
        "counts the orders placed on each day of the week",
        "finds customers whose average order is above 50",
    ],
    "employees(id, name, department, salary, hired_on)": [
        "lists the highest-paid person in every department",
        "counts the people hired in each year",
        "finds departments whose average salary exceeds the company average",
        "shows each employee's salary next to their department's average",
    ],
    "books(id, title, author, year, copies)": [
        "lists the authors with more than three titles",
        "finds the oldest book by each author",
        "returns the titles that have no copies left",
        "counts the books published per decade",
    ],
    "trips(id, rider_id, start_station, end_station, minutes)": [
        "finds the five most common station pairs",
        "computes each rider's longest trip",
        "lists stations where more trips end than start",
        "returns the median trip length per start station",
    ],
}
SQL_ASKS = [
    "Given a table {table}, write an SQL query that {task}.",
    "I have a table {table}. How do I write a query that {task}? Explain the query.",
]


def _imperative(task: str) -> str:
    """'reverses the order ...' -> 'reverse the order ...' (the templates' tasks start with a verb in -s)."""
    verb, _, rest = task.partition(" ")
    if verb.endswith(("sses", "shes", "ches", "xes")):
        verb = verb[:-2]
    elif verb.endswith("ies"):
        verb = verb[:-3] + "y"
    elif verb.endswith("s"):
        verb = verb[:-1]
    return f"write code to {verb} {rest}"


def coding(rng: random.Random) -> Iterator[str]:
    for lang in LANGUAGES:
        for task in pick(rng, CODE_TASKS, 30):
            yield rng.choice(CODE_ASKS).format(lang=lang, task=task, task_imperative=_imperative(task))
        for topic in pick(rng, CODE_TOPICS, 10):
            other = rng.choice([x for x in LANGUAGES if x != lang])
            yield rng.choice(TOPIC_ASKS).format(topic=topic, lang=lang, other=other)
    for lang, goal, code in BUGGY:
        for ask in BUG_ASKS:
            yield ask.format(lang=lang, goal=goal, code=code)
    for table, tasks in TABLES.items():
        for task in tasks:
            for ask in SQL_ASKS:
                yield ask.format(table=table, task=task)


# --- math word problems ---------------------------------------------------------------------------------------------


def _word_problem(rng: random.Random, kind: int) -> str:
    name, he, his = rng.choice(NAMES)
    r = rng.randint
    if kind == 0:
        count, price = r(3, 12), r(2, 9)
        bill = rng.choice([b for b in (20, 50, 100) if b > count * price] or [200])
        return f"{name} buys {count} notebooks at ${price} each and pays with a ${bill} note. How much change does {he} get?"
    if kind == 1:
        hours = r(2, 6)
        speed = r(11, 30) * 5
        return (
            f"A train covers {hours * speed} km in {hours} hours. What is its average speed, and how long would "
            f"it need for {r(3, 12) * speed // 2} km at that speed?"
        )
    if kind == 2:
        people, grams, more = r(2, 6), r(10, 40) * 10, r(7, 15)
        return (
            f"A recipe for {people} people needs {grams} g of flour. How much flour does {name} need for {more} people?"
        )
    if kind == 3:
        side, other = r(3, 15), r(4, 20)
        return f"A rectangle has a perimeter of {2 * (side + other)} cm and one side of {side} cm. What is its area?"
    if kind == 4:
        weekly, start = r(5, 40), r(0, 60)
        goal = start + weekly * r(5, 30) + r(0, weekly - 1)
        return (
            f"{name} has ${start} and saves ${weekly} every week. After how many weeks will {he} have at least ${goal}?"
        )
    if kind == 5:
        price, off, tax = r(40, 250), rng.choice([10, 15, 20, 25, 30, 40]), rng.choice([5, 8, 10, 12, 20])
        return (
            f"A jacket costs ${price} and is marked {off}% off. What is the sale price? If a {tax}% sales tax "
            f"is then added, what does {name} pay?"
        )
    if kind == 6:
        a, b = rng.sample([2, 3, 4, 5, 6, 8, 10, 12], 2)
        return f"One pipe fills a tank in {a} hours and another fills it in {b} hours. How long do both pipes take together?"
    if kind == 7:
        first = r(-20, 90)
        return f"Three consecutive integers add up to {3 * first + 3}. What are they?"
    if kind == 8:
        boys, girls = r(8, 20), r(8, 20)
        return (
            f"A class has {boys} boys and {girls} girls. What fraction of the class are girls, in lowest terms, "
            f"and what percentage is that?"
        )
    if kind == 9:
        per_day, pages = r(12, 45), r(150, 600)
        return (
            f"{name} reads {per_day} pages a day. {his.capitalize()} book has {pages} pages. On which day does "
            f"{he} finish it, and how many pages are left for that last day?"
        )
    if kind == 10:
        litres, km, cost = rng.choice([4.5, 5, 5.5, 6, 6.5, 7, 8]), r(12, 90) * 10, rng.choice([1.6, 1.75, 1.9, 2.1])
        return (
            f"A car uses {litres} litres of fuel per 100 km. How much fuel does a {km} km trip take, and what "
            f"does it cost at ${cost} per litre?"
        )
    if kind == 11:
        workers, days = r(3, 8), r(4, 20)
        more = rng.choice([w for w in range(2, 16) if (workers * days) % w == 0 and w != workers] or [2 * workers])
        return (
            f"{workers} workers build a wall in {days} days. How many days would {more} workers take at the same pace?"
        )
    if kind == 12:
        red, blue, green = r(2, 9), r(2, 9), r(2, 9)
        return (
            f"A bag holds {red} red, {blue} blue and {green} green marbles. What is the chance of drawing a blue "
            f"one? What is the chance of drawing two blue ones in a row without putting the first back?"
        )
    if kind == 13:
        money, rate, years = r(5, 80) * 100, rng.choice([2, 3, 4, 5, 6]), r(2, 10)
        return f"{name} invests ${money} at {rate}% a year, compounded yearly. What is it worth after {years} years?"
    if kind == 14:
        width, length, path = r(6, 20), r(8, 30), rng.choice([0.5, 1, 1.5, 2])
        return (
            f"A garden measures {width} m by {length} m. A path {path} m wide runs around the inside of its edge. "
            f"What area does the path cover?"
        )
    if kind == 15:
        age = r(6, 20)
        mother = 2 * age + r(3, 20)
        return (
            f"{name} is {age} and {his} mother is {mother}. In how many years will the mother be exactly twice "
            f"as old as {name}?"
        )
    if kind == 16:
        base, per, free, used = r(10, 30), rng.choice([2, 3, 4, 5]), r(5, 20), r(8, 40)
        return (
            f"A phone plan costs ${base} a month plus ${per} for every gigabyte beyond {free} GB. {name} used "
            f"{used} GB this month. What is the bill?"
        )
    if kind == 17:
        x, a = r(-12, 15), r(2, 9)
        b = r(-30, 30)
        return (
            f"Solve for x: {a}x {'+' if b >= 0 else '-'} {abs(b)} = {a * x + b}. Check the answer by substituting it."
        )
    if kind == 18:
        pct, number = rng.choice([5, 12, 15, 35, 45, 60, 75]), r(4, 90) * 20
        part, whole = r(3, 40), r(41, 200)
        return f"What is {pct}% of {number}? And what percentage of {whole} is {part}, to one decimal place?"
    if kind == 19:
        length = r(12, 40)
        return (
            f"A ladder {length} feet long leans against a wall with its foot {r(3, length // 3)} feet from the wall. "
            f"How high up the wall does it reach?"
        )
    if kind == 20:
        small, large, small_price = r(200, 500), r(600, 1500), r(2, 5) + 0.49
        return (
            f"A {small} g box of cereal costs ${small_price} and a {large} g box costs ${round(small_price * large / small * rng.uniform(0.75, 1.1), 2)}. "
            f"Which is the better deal per 100 g?"
        )
    if kind == 21:
        start_hour, minutes = r(6, 20), r(35, 400)
        return (
            f"{name} starts a train journey at {start_hour}:{rng.choice(['05', '15', '20', '40', '50'])} and "
            f"travels for {minutes} minutes. At what time does {he} arrive?"
        )
    mean, count, new = r(55, 85), r(4, 9), r(40, 100)
    return (
        f"The mean of {count} test scores is {mean}. After one more test scoring {new}, what is the new mean? "
        f"What score would have kept the mean the same?"
    )


MATH_TAILS = ["", " Show your working.", " Explain each step.", " Give the answer first, then the reasoning."]


def math(rng: random.Random) -> Iterator[str]:
    for kind in range(23):
        for _ in range(16):
            yield _word_problem(rng, kind) + rng.choice(MATH_TAILS)


# --- explanations ---------------------------------------------------------------------------------------------------

CONCEPTS = [
    "how vaccines train the immune system", "why the sky looks blue", "how a refrigerator keeps food cold",
    "what inflation is", "how compound interest grows savings", "how the moon causes tides", "what a blockchain is",
    "how a bill becomes law in a parliament", "why leaves change colour in autumn", "how GPS works out where you are",
    "what photosynthesis does", "how noise-cancelling headphones work", "what the greenhouse effect is",
    "how a CPU cache speeds programs up", "what an API is", "how public-key encryption works", "why bread dough rises",
    "how plate tectonics moves continents", "what supply and demand means", "how the heart pumps blood",
    "what DNS does when you open a website", "how a bicycle stays upright", "what opportunity cost means",
    "how solar panels make electricity", "why we have leap years", "what a recession is",
    "how a sourdough starter works", "what overfitting means in machine learning", "how an electric motor spins",
    "why ice floats on water", "how antibiotics work and why resistance appears", "what the placebo effect is",
    "what garbage collection does in a programming language", "how hurricanes form", "why the moon has phases",
    "what a mortgage is", "how a camera lens focuses light", "what entropy means in physics",
    "how plastic recycling really works", "what a neural network is", "how sleep helps memory",
    "what an index fund is", "how earthquakes are measured", "what version control is for", "how a hash table works",
    "why iron rusts", "what the Doppler effect is", "how stock prices get set", "how bees make honey",
    "what a carbon footprint measures", "how a 3D printer builds an object", "why jet lag happens",
    "how a virus differs from a bacterium", "how wind turbines make power", "how a touch screen senses a finger",
    "why the Western Roman Empire declined, in broad strokes", "how the printing press changed Europe",
    "why the Silk Road mattered", "what the Industrial Revolution changed for ordinary workers",
    "how a thermostat holds a room's temperature", "what recursion is", "how Wi-Fi carries data through the air",
    "what a budget deficit is", "how muscles grow after exercise", "why cutting onions makes you cry",
    "how a magnetic compass works", "what an exchange rate is", "how coffee is decaffeinated", "what the water cycle is",
    "how a nuclear reactor produces heat", "what a black hole is", "what time zones are and why they exist",
    "how an aeroplane wing makes lift", "why sorting algorithms differ in speed", "why the sea is salty",
    "how a loan's interest rate changes what you pay in total", "what a database index does",
    "how fermentation turns milk into yoghurt", "why some people are colour-blind", "how a lock and key work",
]  # fmt: skip
AUDIENCES = [
    "", " to a ten-year-old", " to a curious teenager", " to someone with no science background",
    " to a new colleague", " as you would to an engineer", " in plain language", " with an everyday analogy",
    " in three short paragraphs", " in under 150 words", " and give one common misconception",
]  # fmt: skip
EXPLAIN_ASKS = [
    "Explain {concept}{audience}.",
    "Can you explain {concept}{audience}?",
    "I've never really understood {concept}. Could you explain it{audience}?",
    "Give me a clear explanation of {concept}{audience}.",
    "Help me understand {concept}{audience}.",
    "My friend asked me {concept} and I couldn't answer. Explain it{audience}, please.",
]


def explanations(rng: random.Random) -> Iterator[str]:
    for concept in CONCEPTS:
        for _ in range(5):
            yield rng.choice(EXPLAIN_ASKS).format(concept=concept, audience=rng.choice(AUDIENCES))


# --- lists ----------------------------------------------------------------------------------------------------------

LIST_TOPICS = [
    "ways to save water at home", "indoor plants that cope with little light",
    "questions to ask at the end of a job interview", "games for a long car journey",
    "breakfasts that take under ten minutes", "things to check before buying a used car",
    "ways to make a small room feel larger", "habits that help with focus while studying", "cheap hobbies to pick up",
    "tips for a first visit to a big city", "common mistakes of beginner cooks", "items for a basic first-aid kit",
    "ideas for a rainy weekend with children", "ways to waste less food", "signs that a laptop needs more memory",
    "things to pack for a weekend of camping", "icebreaker questions for a team meeting",
    "habits for writing clearer emails", "vegetables that grow well on a balcony",
    "ways to stay warm without turning up the heating", "reasons a loaf of bread might not rise",
    "topics for a school debate", "ideas for a birthday party on a tight budget",
    "ways to practise a new language every day", "steps to get ready for a job interview",
    "exercises that need no equipment", "ways to make a talk more engaging",
    "questions to ask a landlord before renting", "safety tips for cycling in traffic", "uses for leftover rice",
    "ways to keep a conversation going", "things to do in the first week of a new job",
    "board games that work well for four players", "ways to back up family photos",
    "tips for writing a short story", "small ways to make an office greener", "things that drain a phone battery",
    "ideas for a themed dinner night", "ways to spend less time on screens",
    "questions to think about before adopting a pet",
]  # fmt: skip
LIST_ASKS = [
    "List {n} {topic}.",
    "Give me {n} {topic}, with one sentence on each.",
    "What are {n} good {topic}?",
    "Make a numbered list of {n} {topic}.",
    "Suggest {n} {topic} and order them from easiest to hardest.",
    "Could you brainstorm {n} {topic}? Keep each one short.",
]


def lists(rng: random.Random) -> Iterator[str]:
    for topic in LIST_TOPICS:
        for _ in range(6):
            yield rng.choice(LIST_ASKS).format(n=rng.choice([3, 4, 5, 6, 7, 8, 10, 12]), topic=topic)


# --- advice ---------------------------------------------------------------------------------------------------------

SITUATIONS = [
    "I have two job offers: one pays more, the other has a much shorter commute",
    "my flatmate never does the washing-up", "I get nervous before speaking up in meetings",
    "I want to start running but I always give up after a week", "my team misses deadlines because tasks are vague",
    "I put off big assignments until the last night", "my grandfather refuses to learn to use a smartphone",
    "I keep forgetting people's names right after meeting them", "I want to ask my boss for a raise",
    "my garden soil is heavy clay", "I have one week to prepare for a statistics exam",
    "I want to learn to draw but I think I have no talent", "my dog barks every time the doorbell rings",
    "I am moving abroad and don't speak the language yet", "I want to read more but never find the time",
    "my small shop gets very few online reviews", "a friend and I disagree about politics and it is getting tense",
    "I want to eat less sugar", "I have just become a manager for the first time",
    "code reviews in my team take days and block everyone", "I want to move into data analysis from retail",
    "my daughter has stopped wanting to practise the violin", "I feel sleepy every afternoon at work",
    "I am making a monthly budget for the first time", "I have dozens of browser tabs open and feel overwhelmed",
    "I am hosting dinner for eight people in a tiny flat", "my brother and I argue about caring for our parents",
    "my houseplants keep dying", "I want to get better at saying no to extra work",
    "I have a long-haul flight next month and hate flying",
]  # fmt: skip
ADVICE_ASKS = [
    "{S}. What should I do?",
    "I need some advice: {s}.",
    "{S}. Any practical suggestions?",
    "What would you suggest? {S}.",
    "{S}. Give me a short plan for the next two weeks.",
    "{S}. What are the pros and cons of the options I have?",
    "{S}. What are three things I could try first?",
    "Be honest with me: {s}. Where do I start?",
]


def advice(rng: random.Random) -> Iterator[str]:
    for situation in SITUATIONS:
        capital = situation[0].upper() + situation[1:]
        for ask in pick(rng, ADVICE_ASKS, 7):
            yield ask.format(s=situation, S=capital)


# --- translation ----------------------------------------------------------------------------------------------------

SENTENCES = [
    "The bakery on the corner opens at seven, but the bread is best at nine.",
    "Is there a chemist open late anywhere near the station?", "We missed the last bus, so we walked home under the stars.",
    "My sister is learning to play the cello.", "Please leave the keys with the neighbour if nobody is home.",
    "The meeting has been moved to Friday afternoon.", "I would like a table for three by the window.",
    "It rained all week, yet the garden looks thirsty.", "Turn left after the bridge and look for the blue door.",
    "He forgot his umbrella again, of course.", "The museum is free on the first Sunday of every month.",
    "How long does the train take to reach the coast?", "Our cat sleeps on the warmest chair in the house.",
    "I'm sorry, I didn't catch your name.", "The soup needs a little more salt and a lot more patience.",
    "They are building a new library next to the school.", "Can I pay by card, or only in cash?",
    "My phone battery dies every afternoon.", "We should plant the tomatoes after the last frost.",
    "The concert was cancelled because of the storm.", "Do you know a good place to buy fresh fish?",
    "She runs five kilometres before breakfast.", "This road is closed for repairs until June.",
    "I have been waiting for the delivery since Monday.", "Let's meet at the fountain in the main square.",
    "The children built a snowman with a carrot nose.", "Is breakfast included in the price of the room?",
    "The printer on the second floor is out of paper.", "He speaks quietly, but everyone listens.",
    "My grandmother's garden is full of roses in summer.", "We are out of milk, eggs and coffee.",
    "The lecture starts in ten minutes in room four.", "Could you speak a little more slowly, please?",
    "The ferry leaves every hour from the old harbour.", "I lost my wallet somewhere between the market and here.",
    "Thank you for inviting us; the dinner was wonderful.", "The film was long, but the ending surprised everyone.",
    "Please send me the report before lunch tomorrow.", "The mountains look close, but they are far away.",
    "Our neighbours are moving to another city next month.",
]  # fmt: skip
TARGET_LANGUAGES = [
    "French", "Spanish", "German", "Italian", "Portuguese", "Dutch", "Japanese", "Chinese", "Korean", "Polish",
    "Turkish", "Swedish", "Greek", "Hindi",
]  # fmt: skip
TRANSLATE_ASKS = [
    'Translate into {lang}: "{s}"',
    'How would you say "{s}" in {lang}?',
    'Translate this sentence into {lang} and point out any tricky words: "{s}"',
    'Translate "{s}" into {lang}, once formally and once casually.',
    'Give me the {lang} for "{s}"',
]
FOREIGN = [
    "Je voudrais un café et un croissant, s'il vous plaît.", "Nous partons en vacances la semaine prochaine.",
    "Le musée ferme à dix-huit heures le dimanche.", "Mon frère habite près de la gare.",
    "¿Dónde está la parada del autobús?", "Mañana vamos a la playa con mis primos.",
    "El restaurante está cerrado los lunes.", "Me gusta leer antes de dormir.",
    "Ich habe meinen Schlüssel im Büro vergessen.", "Der Zug hat zwanzig Minuten Verspätung.",
    "Wir treffen uns um acht vor dem Kino.", "Das Wetter ist heute sehr schön.",
    "Vorrei prenotare una camera per due notti.", "Il mercato è aperto solo il sabato mattina.",
]  # fmt: skip


def translation(rng: random.Random) -> Iterator[str]:
    for sentence in SENTENCES:
        for lang in pick(rng, TARGET_LANGUAGES, 5):
            yield rng.choice(TRANSLATE_ASKS).format(lang=lang, s=sentence)
    for sentence in FOREIGN:
        yield f'Translate into English: "{sentence}"'
        yield f'What does "{sentence}" mean? Explain the grammar briefly.'


# --- summaries and extraction over composed passages ----------------------------------------------------------------

TEAMS = ["design", "logistics", "library volunteers", "school parents", "garden club", "support", "finance"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
MONTHS = ["March", "April", "May", "June", "September", "October", "November"]
TASKS_TODO = [
    "update the supplier list", "book the hall for the autumn event", "draft the new welcome leaflet",
    "fix the broken shelf in the storeroom", "collect quotes for new laptops", "write the quarterly newsletter",
    "call the printer about the delay", "plan the volunteer rota", "check the fire exits", "test the booking form",
]  # fmt: skip
CONCERNS = [
    "the rising cost of deliveries", "too few volunteers on weekends", "the slow website", "noise from the road works",
    "late invoices", "confusing signs at the entrance", "the budget for snacks",
]  # fmt: skip
DECISIONS = [
    "try a shared calendar for a month", "hold the summer fair indoors", "pause new orders until June",
    "ask members for feedback by email", "hire a part-time assistant", "move the meetings to the mornings",
]  # fmt: skip
PRODUCTS = [
    ("kettle", "it boils a full jug in about three minutes", "the lid is stiff and hard to open with one hand"),
    ("rucksack", "it has plenty of pockets and the straps are comfortable", "the zip on the side broke in month two"),
    ("desk lamp", "the light is warm and the arm bends anywhere", "it hums quietly at the lowest setting"),
    ("pair of walking boots", "they were waterproof on a very wet hike", "they took two weeks to stop rubbing"),
    ("blender", "it makes smooth soups and smoothies", "it is loud enough to wake the whole house"),
    ("e-reader", "the battery lasts for weeks", "the menus are slow and hard to find your way around"),
    ("office chair", "my back aches much less now", "assembly took over an hour and one screw was missing"),
    ("rice cooker", "the rice comes out perfect every time", "the inner bowl scratches easily"),
]  # fmt: skip
FACILITIES = ["swimming pool", "public library", "cycle path", "community centre", "skate park", "farmers' market"]
TOWNS = ["Ashby Vale", "Port Maren", "Kellington", "Brightwater", "Oldmere", "Saint Ives Cross", "Dunmore Bay"]
EXTRACT_ASKS = {
    "notes": [
        "Summarise these meeting notes in one sentence.", "List the action items in these notes, with owners.",
        "Turn these notes into a table with columns person, task and deadline.",
        "What was decided in this meeting, and what is still open?",
    ],
    "review": [
        "Summarise this product review in one sentence.", "Is this review positive, negative or mixed? Explain.",
        "Extract the pros and cons from this review as two bullet lists.",
        "Write a short, polite reply from the shop to this review.",
    ],
    "news": [
        "Give this news item a headline.", "Extract every number in this text and say what it refers to.",
        "Summarise this for a ten-year-old.", "List the people and places named in this text.",
    ],
    "complaint": [
        "What is the customer's problem and what do they want?", "Extract the order number, dates and request as JSON.",
        "Write a helpful reply to this customer message.", "Rate the urgency of this message from 1 to 5 and explain why.",
    ],
}  # fmt: skip


def _passage(rng: random.Random, kind: str) -> str:
    first, second = rng.sample(NAMES, 2)
    date = f"{rng.randint(2, 28)} {rng.choice(MONTHS)}"
    if kind == "notes":
        return (
            f"Notes from the {rng.choice(TEAMS)} meeting on {rng.choice(DAYS)}: {first[0]} agreed to "
            f"{rng.choice(TASKS_TODO)} by {date}. {second[0]} raised a concern about {rng.choice(CONCERNS)}. "
            f"The group decided to {rng.choice(DECISIONS)}. The next meeting is on {rng.choice(DAYS)} at "
            f"{rng.randint(9, 17)}:00."
        )
    if kind == "review":
        product, good, bad = rng.choice(PRODUCTS)
        verdict = rng.choice(["I would buy it again.", "I'm not sure I would buy it again.", "Three stars from me."])
        return f"I bought this {product} {rng.randint(2, 11)} months ago. On the plus side, {good}. However, {bad}. {verdict}"
    if kind == "news":
        return (
            f"The town of {rng.choice(TOWNS)} opened a new {rng.choice(FACILITIES)} on {date}. The project cost "
            f"{rng.randint(2, 40) * 50_000:,} pounds and took {rng.randint(6, 30)} months. Mayor {first[0]} said it "
            f"would serve about {rng.randint(2, 20) * 500} residents a week, while local resident {second[0]} "
            f"hoped the {rng.choice(['parking', 'opening hours', 'ticket prices'])} would be sorted out soon."
        )
    order = rng.randint(10_000, 99_999)
    problem = rng.choice(
        ["one of the two chairs was missing", "the box was soaked", "the colour was wrong", "it stopped working"]
    )
    request = rng.choice(["a replacement", "a full refund", "someone to collect it", "a call back this week"])
    return (
        f"Hello, my order {order} arrived on {date}, but {problem}. I would like {request}. "
        f"You can reach me on 07{rng.randint(100_000_000, 999_999_999)}. Thanks, {first[0]}"
    )


def extraction(rng: random.Random) -> Iterator[str]:
    for kind, asks in EXTRACT_ASKS.items():
        for _ in range(80):
            task, passage = rng.choice(asks), _passage(rng, kind)
            yield f"{task}\n\n{passage}" if rng.random() < 0.6 else f"{passage}\n\n{task}"


# --- role-play set-ups ----------------------------------------------------------------------------------------------

ROLES = [
    ("a patient museum guide", ["I am a visitor who knows nothing about ancient Egypt", "I keep asking off-topic questions"]),
    ("a strict but fair chess coach", ["I am a beginner who just lost three games", "I want to learn one opening well"]),
    ("a ship's captain in 1850", ["I am a new deckhand on my first voyage", "a storm is coming and I am the cook"]),
    ("a support agent for an internet provider", ["my connection drops every evening", "I want to cancel my contract"]),
    ("an interviewer at a software company", ["I am applying for a junior developer job", "it is my final-round interview"]),
    ("a medieval innkeeper", ["I am a tired traveller looking for a room", "I am trying to sell you a strange map"]),
    ("a travel agent", ["I want a cheap week somewhere warm in February", "I am planning a honeymoon with a tight budget"]),
    ("a friendly librarian", ["I need books for a school project on volcanoes", "I want a novel like one I loved"]),
    ("a detective questioning a witness", ["I saw something odd at the train station", "I am nervous and unsure what I saw"]),
    ("a park ranger", ["I am a hiker who took the wrong trail", "I want to know which animals live in the park"]),
    ("a barista at a busy café", ["I cannot decide what to order", "I am a regular who wants to try something new"]),
    ("a Spanish tutor who speaks only simple Spanish", ["I am a complete beginner", "I want to practise ordering food"]),
    ("a tour guide on Mars in the year 2200", ["I am a tourist on my first day", "I am a journalist writing a story"]),
    ("a nutrition coach", ["I want to eat more vegetables", "I train for a half marathon"]),
    ("a landlord showing a flat", ["I am a student looking for my first place", "I am worried about damp and noise"]),
    ("a reporter interviewing a scientist", ["I am the scientist who studies coral reefs", "I have just found a new moth"]),
    ("a shopkeeper in a fantasy village", ["I am an adventurer with very little gold", "I want to sell a dragon scale"]),
    ("a fitness trainer", ["I have never lifted weights", "I have twenty minutes a day"]),
    ("a debate partner who disagrees with me", ["I think homework should be banned", "I argue cities should ban cars"]),
    ("a wise old tortoise", ["I am a young rabbit in a hurry", "I have lost my way home in the forest"]),
]  # fmt: skip
ROLE_STYLES = [
    "Stay in character.", "Keep your replies short.", "Ask me questions one at a time.",
    "Correct my mistakes gently.", "Start the conversation.",
]  # fmt: skip
ROLE_ASKS = [
    "Let's role-play. You are {role}, and {setup}. {style}",
    "Pretend to be {role}. In this scene, {setup}. {style}",
    "I'd like to practise a conversation. Play {role}; {setup}. {style}",
]


def roleplay(rng: random.Random) -> Iterator[str]:
    for role, setups in ROLES:
        for setup in setups:
            for style in ROLE_STYLES:
                yield rng.choice(ROLE_ASKS).format(role=role, setup=setup, style=style)


# --- rewriting ------------------------------------------------------------------------------------------------------

DRAFTS = [
    "hey can u send me the file asap i need it for the thing tomorrow",
    "The results was good but we needs more time to checking them.",
    "I think that maybe we should possibly consider the option of perhaps moving the date.",
    "Your order is late because of reasons.", "me and him went to the shop and buyed some apples",
    "This product is the best product and everyone should buy this product.",
    "Unfortunately the event which was planned for Saturday has had to be cancelled due to the weather.",
    "Please be advised that the kitchen will be closed for cleaning.",
    "We regret to inform you that your application was not successful at this time.",
    "the meeting is boring and too long and nobody talks", "Its important to drink water everyday.",
    "Our team have worked very hard and achieved many things this year.",
    "If you have any questions don't hesitate to contact me at any time.",
    "The new software are faster then the old one.", "Come to our bake sale on Friday, there will be cake.",
    "I am writing to complain about the noise coming from the flat above mine at night.",
    "Lots of people came and it was nice and we had fun.", "Remember to switch off the lights when you leave.",
    "The train was delayed, so I arrived late, which made me miss the start.",
    "Thank you for your email, I will look into it and get back to you.",
]  # fmt: skip
REWRITES = [
    "Rewrite this to sound more formal:", "Make this sound friendlier:", "Fix the grammar and spelling:",
    "Shorten this as much as you can without losing meaning:", "Rewrite this for a ten-year-old:",
    "Rewrite this more confidently:", "Turn this into a tweet-length sentence:", "Give three alternative versions of this:",
]  # fmt: skip


def rewriting(rng: random.Random) -> Iterator[str]:
    for draft in DRAFTS:
        for ask in pick(rng, REWRITES, 6):
            yield f'{ask} "{draft}"'


# --- comparisons, brainstorming, classification -----------------------------------------------------------------------

COMPARISONS = [
    ("trains", "planes", "a 500 km trip"), ("renting", "buying a home", "a couple in their twenties"),
    ("SQL", "document databases", "a small online shop"), ("e-books", "paper books", "a student"),
    ("a gas hob", "an induction hob", "a family kitchen"), ("cats", "dogs", "someone who works long hours"),
    ("running", "swimming", "a person with sore knees"), ("a laptop", "a tablet", "taking notes at university"),
    ("tea", "coffee", "an afternoon pick-me-up"), ("Python", "JavaScript", "a first programming language"),
    ("a bank loan", "a credit card", "paying for a new boiler"), ("public transport", "a car", "life in a big city"),
    ("paper maps", "phone navigation", "a hiking trip"), ("tiles", "wooden floors", "a busy hallway"),
    ("a smartwatch", "a fitness band", "tracking sleep"), ("solar panels", "a heat pump", "cutting energy bills"),
]  # fmt: skip
COMPARE_ASKS = [
    "Compare {a} and {b} for {use}.",
    "Which is better for {use}: {a} or {b}? Give reasons.",
    "What are the trade-offs between {a} and {b} for {use}?",
]
NAMING = [
    "a bakery that also sells books", "a podcast about local history", "a cycling club for beginners",
    "a budgeting app", "a pet-sitting service", "a board game about trains", "a school robotics team",
    "a vegetable delivery box", "a quiet study café", "a newsletter for amateur astronomers",
    "a hiking group for parents", "a repair café", "a language exchange meet-up", "a small recording studio",
]  # fmt: skip
ISSUES = [
    "a four-day working week", "school uniforms", "homework for young children", "working from home",
    "closing city centres to cars", "later school start times", "banning phones in classrooms",
    "a tax on sugary drinks", "free public transport", "year-round daylight saving time", "open-plan offices",
]  # fmt: skip
GROUPS = [
    ("fruit, vegetable or grain", ["tomato", "barley", "carrot", "mango", "oats", "spinach", "plum", "rye", "leek"]),
    ("mammal, bird, reptile or fish", ["gecko", "otter", "heron", "salmon", "bat", "tortoise", "penguin", "eel"]),
    ("renewable or non-renewable energy", ["coal", "wind", "tidal", "natural gas", "geothermal", "solar", "oil"]),
    ("a noun, a verb or an adjective", ["quickly", "garden", "bright", "swim", "idea", "gentle", "write", "river"]),
]  # fmt: skip


def misc(rng: random.Random) -> Iterator[str]:
    for a, b, use in COMPARISONS:
        for ask in COMPARE_ASKS:
            yield ask.format(a=a, b=b, use=use)
    for thing in NAMING:
        for count in pick(rng, [5, 8, 10, 12], 3):
            yield f"Brainstorm {count} names for {thing}."
    for issue in ISSUES:
        yield f"What are the main arguments for and against {issue}?"
        yield f"Write a balanced paragraph on {issue}, then give your own view."
        yield f"Summarise the debate over {issue} in five bullet points."
    for labels, items in GROUPS:
        for _ in range(8):
            chosen = ", ".join(pick(rng, items, rng.randint(4, len(items))))
            yield f"Classify each of these as {labels}: {chosen}."


CATEGORIES = {
    "writing": writing, "coding": coding, "math": math, "explanation": explanations, "list": lists,
    "advice": advice, "translation": translation, "extraction": extraction, "roleplay": roleplay,
    "rewriting": rewriting, "misc": misc,
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    rng = random.Random(SEED)
    unique: dict[str, str] = {}  # prompt -> category, in the order of first appearance
    for category, generate in CATEGORIES.items():
        for prompt in generate(rng):
            unique.setdefault(prompt.strip(), category)
    overlaps = dev_overlap(list(unique))
    records = [{"prompt": p, "category": c} for (p, c), shared in zip(unique.items(), overlaps) if not shared]
    dropped = sum(overlaps)
    rng.shuffle(records)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    counts = Counter(r["category"] for r in records)
    print(f"wrote {len(records)} prompts to {args.out} ({dropped} left out for sharing 8 words with the bench data)")
    print(", ".join(f"{name} {count}" for name, count in counts.items()))


if __name__ == "__main__":
    main()
