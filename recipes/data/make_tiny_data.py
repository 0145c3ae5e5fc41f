"""Write the small bundled datasets that the tiny recipes and the tests train on.

Run `python recipes/data/make_tiny_data.py` to regenerate them (seeded, so the files come out identical):
- `tiny_math.jsonl`: arithmetic word problems in MetaMathQA's format (query, response, type).
- `tiny_commonsense.json`: true/false and multiple-choice questions in Commonsense170K's format
  (instruction, input, output, answer), as one JSON list like the original file.
- `tiny_chat.jsonl`: short conversations in UltraFeedback-binarized's format (prompt, chosen, rejected messages).
"""

from __future__ import annotations

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = ["Tom", "Ana", "Raj", "Mia", "Leo", "Zoe", "Sam", "Ivy", "Ben", "Eva"]
THINGS = ["apples", "pencils", "marbles", "books", "stickers", "coins", "cards", "shells"]


def math_row(rng: random.Random) -> dict:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 20), rng.randint(2, 9)
    kind = rng.choice(["add", "sub", "mul", "div"])
    if kind == "add":
        query = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
        answer = a + b
        steps = f"{name} has {a} + {b} = {answer} {thing}."
    elif kind == "sub":
        a += b
        query = f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?"
        answer = a - b
        steps = f"{name} has {a} - {b} = {answer} {thing} left."
    elif kind == "mul":
        query = f"{name} buys {b} bags with {a} {thing} in each bag. How many {thing} is that in total?"
        answer = a * b
        steps = f"In total there are {b} * {a} = {answer} {thing}."
    else:
        a *= b
        query = f"{name} shares {a} {thing} equally among {b} friends. How many {thing} does each friend get?"
        answer = a // b
        steps = f"Each friend gets {a} / {b} = {answer} {thing}."
    return {"query": query, "response": f"{steps}\nThe answer is: {answer}", "type": f"tiny_{kind}"}


def commonsense_row(rng: random.Random) -> dict:
    a, b = rng.sample(range(1, 50), 2)
    if rng.random() < 0.5:
        truth = a > b
        instruction = (
            "Please answer the following question with true or false, question: "
            f"is {a} greater than {b}?\n\nAnswer format: true/false"
        )
        answer = "true" if truth else "false"
    else:
        options = [a + b, a + b + 1, abs(a - b), a * 2]
        rng.shuffle(options)
        correct = options.index(a + b) + 1
        instruction = (
            f"Please choose the correct answer to the question: what is {a} plus {b}?\n\n"
            + "".join(f"Answer{i}: {o} " for i, o in enumerate(options, 1)).strip()
            + "\n\nAnswer format: answer1/answer2/answer3/answer4"
        )
        answer = f"answer{correct}"
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def chat_row(rng: random.Random) -> dict:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    n = rng.randint(2, 30)
    prompt = f"Write one short sentence saying that {name} collected {n} {thing}."
    chosen = f"{name} collected {n} {thing}."
    rejected = f"I do not know what {name} did."
    return {
        "prompt": prompt,
        "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}],
        "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": rejected}],
    }


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def main() -> None:
    rng = random.Random(0)
    math_rows = [math_row(rng) for _ in range(320)]
    _write(os.path.join(HERE, "tiny_math.jsonl"), "".join(json.dumps(r) + "\n" for r in math_rows))
    cs_rows = [commonsense_row(rng) for _ in range(160)]
    _write(os.path.join(HERE, "tiny_commonsense.json"), json.dumps(cs_rows, indent=1) + "\n")
    chat_rows = [chat_row(rng) for _ in range(160)]
    _write(os.path.join(HERE, "tiny_chat.jsonl"), "".join(json.dumps(r) + "\n" for r in chat_rows))


if __name__ == "__main__":
    main()
