"""What a user typed, as `segment()` arguments, and what a result lacks: one rule for `gsva-segment` and the demo.

A single line ending with "?" is a question; anything else is phrases separated by ";" or new lines.
"""


def parse_query(text: str, allow_question: bool = True) -> dict:
    """`segment()` keyword arguments for what the user typed: `text=` for one line ending with "?" (a question),
    else `targets=`, the phrases separated by ";" or new lines."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if allow_question and len(lines) == 1 and ";" not in lines[0] and lines[0].endswith("?"):
        return {"text": lines[0]}
    phrases = [part.strip() for line in lines for part in line.split(";") if part.strip()]
    if not phrases:
        raise ValueError("type a sentence, or phrases separated by ';' or new lines")
    return {"targets": phrases}


def describe_query(query: dict) -> dict:
    """The query as written into the JSON files: the question, or the phrases asked."""
    return {"question": query["text"]} if "text" in query else {"asked": list(query["targets"])}


def check_result(result, query: dict) -> list[str]:
    """What is missing from one image's result: an asked phrase without a decision, or the result's warnings."""
    problems = list(getattr(result, "warnings", None) or [])
    asked = query.get("targets")
    if asked is not None and len(result.targets) != len(asked):
        missing = asked[len(result.targets) :]
        problems.append(
            f"{len(asked)} targets asked but {len(result.targets)} decided"
            + (f"; no result for {missing}" if missing else "")
        )
    return problems
