"""GSM8K and MATH grading: gold-answer parsing, final-answer extraction and LaTeX answer equivalence.

The paper follows MetaMath's evaluation: the model's final answer is what follows the last
``The answer is: `` in its response.

- GSM8K (MetaMath ``extract_answer_number``): the first number after that marker (``a/b`` fractions allowed),
  rounded to an integer and compared with the integer after ``#### `` in the gold answer.
- MATH (MetaMath ``process_results``): the text after the marker up to the first ``".\\n"``, without a
  trailing period, compared with the gold ``\\boxed{}`` content of the reference solution by an equivalence
  check of LaTeX answers.

The ``*_flexible`` extractors also accept responses without the marker (the last ``\\boxed{}``, else the last
number); they give the secondary, lenient metric.

`is_math_equiv` extends Hendrycks' ``is_equiv`` normalisation (``\\dfrac``/``\\tfrac`` -> ``\\frac``,
``\\frac12`` -> ``\\frac{1}{2}``, ``\\left``/``\\right``, units and ``\\text{}``, degrees, dollars, percent,
spaces, ``k = `` prefixes, ``0.5`` vs ``\\frac12``) with a numeric/symbolic comparison through SymPy on a
whitelisted expression subset, and element-wise comparison of tuples, intervals and answer lists.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

ANSWER_MARKER = "The answer is: "

# --------------------------------------------------------------------------- GSM8K


def gsm8k_gold_answer(answer_field: str) -> str:
    """The number after ``#### `` in a GSM8K reference answer, without thousands separators."""
    return answer_field.split("####")[-1].strip().replace(",", "")


_METAMATH_NUMBER = re.compile(r"[\-+]?\d*[\.,/]?\d+")


def _rounded(text: str) -> int | None:
    value = float(text.replace(",", ""))
    if math.isinf(value) or math.isnan(value):
        return None
    return round(value)


def extract_gsm8k_answer(completion: str) -> int | None:
    """MetaMath's ``extract_answer_number``: the first number after the last ``The answer is: ``, rounded.

    ``a/b`` is read as a fraction (``a/0`` as ``a``); no marker or no number gives None.
    """
    parts = completion.split(ANSWER_MARKER)
    if len(parts) < 2:
        return None
    match = _METAMATH_NUMBER.search(parts[-1].strip())
    if not match:
        return None
    text = match.group()
    if "/" in text:
        numerator, denominator = text.split("/")
        if not (_is_number(numerator) and _is_number(denominator)):
            return None
        if denominator == "0":
            return _rounded(numerator)
        fraction = Fraction(text.replace(",", ""))
        return round(float(fraction.numerator / fraction.denominator))
    return _rounded(text)


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


_ANY_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_last_number(text: str) -> float | None:
    """The last number in the text (thousands separators allowed), or None."""
    found = [m.group().rstrip(",") for m in _ANY_NUMBER.finditer(text)]
    for candidate in reversed(found):
        try:
            return float(candidate.replace(",", ""))
        except ValueError:
            continue
    return None


def extract_gsm8k_answer_flexible(completion: str) -> float | None:
    """The MetaMath answer when the marker is there, else the last number of the response."""
    strict = extract_gsm8k_answer(completion)
    if strict is not None:
        return float(strict)
    return extract_last_number(completion)


def gsm8k_is_correct(prediction: float | int | None, gold: str) -> bool:
    """MetaMath's comparison: ``float(prediction) == float(gold)``; a missing prediction is wrong."""
    if prediction is None:
        return False
    try:
        return float(prediction) == float(gold.replace(",", ""))
    except ValueError:
        return False


# --------------------------------------------------------------------------- MATH: extraction


def last_boxed_only_string(text: str) -> str | None:
    """The last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed x``) in the text, braces balanced; None if absent."""
    index = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if index < 0:
        return None
    if text.startswith("\\boxed ", index):
        rest = text[index + len("\\boxed ") :]
        return "\\boxed " + re.split(r"[\s$]", rest, maxsplit=1)[0]
    depth = 0
    for position in range(index, len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            depth -= 1
            if depth == 0:
                return text[index : position + 1]
    return None


def remove_boxed(boxed: str | None) -> str | None:
    """``\\boxed{X}`` -> ``X`` (also ``\\fbox{X}`` and ``\\boxed X``); anything else -> None."""
    if boxed is None:
        return None
    for prefix in ("\\boxed ",):
        if boxed.startswith(prefix):
            return boxed[len(prefix) :]
    for prefix in ("\\boxed{", "\\fbox{"):
        if boxed.startswith(prefix) and boxed.endswith("}"):
            return boxed[len(prefix) : -1]
    return None


def math_gold_answer(solution: str) -> str | None:
    """The content of the last ``\\boxed{}`` of a MATH reference solution."""
    return remove_boxed(last_boxed_only_string(solution))


def extract_math_answer(completion: str) -> str | None:
    """MetaMath's MATH extraction: after the last ``The answer is: ``, up to ``".\\n"``, no trailing period."""
    parts = completion.split(ANSWER_MARKER)
    if len(parts) < 2:
        return None
    answer = parts[-1].split(".\n")[0].strip()
    if answer.endswith("."):
        answer = answer[:-1]
    return answer.strip()


def extract_math_answer_flexible(completion: str) -> str | None:
    """The MetaMath answer when the marker is there, else the last ``\\boxed{}``, else the last number."""
    strict = extract_math_answer(completion)
    if strict:
        boxed = remove_boxed(last_boxed_only_string(strict))
        return boxed if boxed is not None else strict
    boxed = remove_boxed(last_boxed_only_string(completion))
    if boxed is not None:
        return boxed
    number = _ANY_NUMBER.findall(completion)
    return number[-1] if number else None


# --------------------------------------------------------------------------- MATH: normalisation


def _fix_fracs(text: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{72}`` -> ``\\frac{1}{72}``, ``\\frac{a}b`` -> ``\\frac{a}{b}``."""
    pieces = text.split("\\frac")
    out = pieces[0]
    for piece in pieces[1:]:
        out += "\\frac"
        if not piece:
            return text
        numerator, rest = _take_group(piece)
        if numerator is None:
            return text
        denominator, rest = _take_group(rest)
        if denominator is None:
            return text
        out += "{" + numerator + "}{" + denominator + "}" + rest
    return out


def _take_group(text: str) -> tuple[str | None, str]:
    """A braced group or a single character from the start of text, and what follows it."""
    if not text:
        return None, text
    if text[0] != "{":
        return text[0], text[1:]
    depth = 0
    for position, char in enumerate(text):
        depth += char == "{"
        depth -= char == "}"
        if depth == 0:
            return text[1:position], text[position + 1 :]
    return None, text


def _fix_sqrt(text: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}`` (a braced or ``[n]`` radicand is left as it is)."""
    return re.sub(r"\\sqrt(?![{\[])(\w)", r"\\sqrt{\1}", text)


def _fix_a_slash_b(text: str) -> str:
    """A plain integer ratio ``a/b`` -> ``\\frac{a}{b}``."""
    match = re.fullmatch(r"(-?\d+)/(\d+)", text)
    return f"\\frac{{{match.group(1)}}}{{{match.group(2)}}}" if match else text


_UNIT_WORDS = r"[a-zA-Z]+(?:\s+[a-zA-Z]+)*"


def _remove_units(text: str) -> str:
    """Units after a value: ``10\\text{ inches}``, ``5\\mbox{ cm}^2``, ``12 dollars`` -> the value."""
    text = re.sub(r"^(.+?)\s*\\(?:text|textbf|mbox|mathrm)\{\s*" + _UNIT_WORDS + r"\s*\}(?:\^\{?\d\}?)?$", r"\1", text)
    match = re.fullmatch(r"(-?[\d.,/]+)\s+(" + _UNIT_WORDS + r")(?:\^\{?\d\}?)?", text)
    if match and len(match.group(2)) > 1:
        text = match.group(1)
    return text


def normalize_math_answer(answer: str) -> str:
    """A canonical string for a LaTeX final answer (Hendrycks' ``strip_string`` rules, extended)."""
    text = str(answer).strip()
    text = text.replace("\n", "").replace("\\!", "")
    text = re.sub(r"\\\\(?=[a-zA-Z])", r"\\", text)  # "\\frac" written with a doubled backslash
    text = text.replace("tfrac", "frac").replace("dfrac", "frac")
    text = text.replace("\\left", "").replace("\\right", "").replace("\\displaystyle", "")
    text = text.replace("\\,", "").replace("\\;", "").replace("\\:", "").replace("\\ ", " ").replace("{,}", ",")
    text = re.sub(r"\^\s*\{?\\circ\}?", "", text).replace("°", "")
    text = text.replace("\\$", "").replace("$", "")
    text = text.strip().rstrip(".").strip()
    text = _remove_units(text)
    text = re.sub(r"\\(?:text|textbf|mbox|mathrm)\{(.*?)\}", r"\1", text)
    text = text.replace("\\%", "").replace("%", "")
    text = text.replace(" .", " 0.").replace("{.", "{0.")
    if not text:
        return text
    if text[0] == ".":
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0].strip()) <= 2:
        text = sides[1]
    text = _fix_sqrt(text)
    text = text.replace(" ", "")
    text = _fix_fracs(text)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", text):
        text = text.replace(",", "")
    if text == "0.5":
        text = "\\frac{1}{2}"
    text = _fix_a_slash_b(text)
    choice = re.fullmatch(r"\(([A-E])\)", text)
    return choice.group(1) if choice else text


# --------------------------------------------------------------------------- MATH: equivalence

_SYMPY_ALLOWED = re.compile(r"[0-9a-z+\-*/^().\s]*")
_SYMPY_NAMES = {"sqrt", "pi", "exp", "log", "ln", "sin", "cos", "tan", "e", "i"}


def _latex_to_sympy_source(latex: str) -> str | None:
    """A small LaTeX subset (fractions, roots, powers, pi, products) as SymPy source, or None."""
    text = latex
    for _ in range(10):  # nested fractions and roots, innermost first
        new = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", text)
        new = re.sub(r"\\sqrt\[([^{}\[\]]*)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))", new)
        new = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", new)
        if new == text:
            break
        text = new
    text = text.replace("\\pi", " pi ").replace("\\cdot", "*").replace("\\times", "*")
    text = text.replace("{", "(").replace("}", ")").replace("^", "**")
    if "\\" in text or len(text) > 120 or not _SYMPY_ALLOWED.fullmatch(text):
        return None
    if re.search(r"[a-z]\.|\.[a-z]|\.\.", text):  # a dot only as a decimal point
        return None
    names = set(re.findall(r"[a-z]{2,}", text))
    if not names <= _SYMPY_NAMES:
        return None
    return text


def _to_sympy(latex: str):
    source = _latex_to_sympy_source(latex)
    if source is None:
        return None
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    try:
        return parse_expr(source, transformations=transformations, evaluate=True)
    except Exception:  # noqa: BLE001 - anything unparsable is simply "not comparable"
        return None


def _sympy_equal(left: str, right: str) -> bool:
    import sympy

    a, b = _to_sympy(left), _to_sympy(right)
    if a is None or b is None:
        return False
    try:
        if not a.free_symbols and not b.free_symbols:
            x, y = complex(sympy.N(a)), complex(sympy.N(b))
            return abs(x - y) <= 1e-6 * max(1.0, abs(x), abs(y))
        return sympy.simplify(a - b) == 0
    except Exception:  # noqa: BLE001
        return False


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def _is_bracketed(text: str) -> bool:
    return len(text) > 1 and text[0] in "([" and text[-1] in ")]" and len(_split_top_level(text)) == 1


def _equivalent_normalized(left: str, right: str) -> bool:
    if left == right:
        return True
    if _is_bracketed(left) and _is_bracketed(right):  # tuples and intervals: same brackets, same order
        a, b = _split_top_level(left[1:-1]), _split_top_level(right[1:-1])
        if len(a) > 1 or len(b) > 1:
            return (
                (left[0], left[-1]) == (right[0], right[-1])
                and len(a) == len(b)
                and all(_equivalent_normalized(x, y) for x, y in zip(a, b, strict=True))
            )
    a, b = _split_top_level(left), _split_top_level(right)
    if len(a) == len(b) > 1:  # an unordered list of answers, e.g. the roots "2,-3"
        remaining = list(b)
        for item in a:
            match = next((r for r in remaining if _equivalent_normalized(item, r)), None)
            if match is None:
                return False
            remaining.remove(match)
        return True
    return _sympy_equal(left, right)


def is_math_equiv(prediction: str | None, gold: str | None) -> bool:
    """Whether two LaTeX final answers mean the same thing (None never matches)."""
    if prediction is None or gold is None:
        return False
    try:
        return _equivalent_normalized(normalize_math_answer(prediction), normalize_math_answer(gold))
    except Exception:  # noqa: BLE001 - a malformed answer is wrong, not a crash
        return prediction.strip() == gold.strip()
