"""Regenerate the bundled tiny LLaVA data: 24 small PNGs (4 colors x 3 shapes x 2 backgrounds) and
`llava_tiny.json`, LLaVA-format conversations about them (color, shape, background) plus 4 text-only rows.

    python recipes/data/llava_tiny/make_llava_tiny.py

Deterministic: running it again rewrites identical files.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE = 32
COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (235, 210, 20)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
SHORT = "\nAnswer the question using a single word or phrase."


def draw(shape: str, color: tuple[int, int, int], background: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), background)
    pen = ImageDraw.Draw(image)
    box = (5, 5, SIZE - 6, SIZE - 6)
    if shape == "circle":
        pen.ellipse(box, fill=color)
    elif shape == "square":
        pen.rectangle(box, fill=color)
    else:
        pen.polygon([(SIZE // 2, 4), (SIZE - 5, SIZE - 6), (4, SIZE - 6)], fill=color)
    return image


def main() -> None:
    (HERE / "images").mkdir(exist_ok=True)
    rows = []
    index = 0
    for background, bg_rgb in BACKGROUNDS.items():
        for color, rgb in COLORS.items():
            for shape in SHAPES:
                name = f"{color}_{shape}_{background}.png"
                draw(shape, rgb, bg_rgb).save(HERE / "images" / name, optimize=True)
                turns = [
                    ("What color is the shape?" + SHORT, color.capitalize()),
                    ("What shape is it?" + SHORT, shape.capitalize()),
                    ("Is the background white or black?" + SHORT, background.capitalize()),
                ]
                turns = turns[index % 3:] + turns[: index % 3]  # vary which question comes first
                first_q, first_a = turns[0]
                # LLaVA data puts the image token first, a few rows put it last; both must work.
                first_q = f"{first_q}\n<image>" if index % 5 == 4 else f"<image>\n{first_q}"
                conversations = [{"from": "human", "value": first_q}, {"from": "gpt", "value": first_a}]
                for question, answer in turns[1 : 1 + index % 3]:
                    conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
                rows.append({"id": f"tiny-{index:03d}", "image": f"images/{name}", "conversations": conversations})
                index += 1
    text_only = [
        ("What is two plus two?", "Four."),
        ("Name a primary color.", "Red."),
        ("How many sides does a triangle have?", "Three."),
        ("What shape has no corners?", "A circle."),
    ]
    for question, answer in text_only:
        rows.append({
            "id": f"tiny-text-{index:03d}",
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
        })
        index += 1
    (HERE / "llava_tiny.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {len(rows)} rows and {len(COLORS) * len(SHAPES) * len(BACKGROUNDS)} images to {HERE}")


if __name__ == "__main__":
    main()
